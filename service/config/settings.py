"""`Settings`, the top level of the configuration, and the shared secrets it reads."""

from __future__ import annotations

from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.config.fields import (
    KeyPrefix,
    Loc,
    Name,
    raise_problems,
    read_secret,
)
from service.config.models import (
    ALL_ACCOUNTS,
    Account,
    AccountSettings,
    ApiSettings,
    CallerSettings,
    RefreshSettings,
    UpstreamSettings,
)
from service.config.redis_url import check_store_url
from service.keys import EncryptionKey, parse_encryption_keys

ENV_PREFIX = "BROKER_"


class Settings(BaseSettings):
    """The whole broker configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        allow_inf_nan=False,
        hide_input_in_errors=True,
    )

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_url_file: Path | None = None
    key_prefix: KeyPrefix = "mgb"
    encryption_keys: SecretStr | None = None
    encryption_keys_file: Path | None = None
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    refresh: RefreshSettings = Field(default_factory=RefreshSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    accounts: dict[Name, AccountSettings] = Field(default_factory=dict, validate_default=True)
    callers: dict[Name, CallerSettings] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first: it is deep-merged over the file's values (init kwargs)."""
        return env_settings, init_settings

    @field_validator("redis_url")
    @classmethod
    def _check_inline_redis_url(cls, url: SecretStr) -> SecretStr:
        check_store_url(url.get_secret_value())
        return url

    @field_validator("accounts")
    @classmethod
    def _some_accounts(cls, accounts: dict[str, AccountSettings]) -> dict[str, AccountSettings]:
        if not accounts:
            raise ValueError("at least one account is required")
        return accounts

    @field_validator("callers")
    @classmethod
    def _check_callers(
        cls, callers: dict[str, CallerSettings], info: ValidationInfo
    ) -> dict[str, CallerSettings]:
        problems: list[tuple[Loc, str]] = []
        accounts = info.data.get("accounts")  # absent when the accounts themselves are invalid
        owners: dict[str, str] = {}
        for name, caller in callers.items():
            for index, account in enumerate(caller.accounts):
                if accounts is not None and account != ALL_ACCOUNTS and account not in accounts:
                    problems.append(((name, "accounts", index), f"unknown account '{account}'"))
            for index, digest in enumerate(caller.key_digests()):
                owner = owners.setdefault(digest, name)
                if owner != name:
                    where, prefix = caller.digest_source(index)
                    problems.append(
                        (
                            (name, *where),
                            f"{prefix}same key as caller '{owner}' (each caller needs its own)",
                        )
                    )
        raise_problems(problems)
        return callers

    @model_validator(mode="after")
    def _read_shared_secrets(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        url = read_secret(self, "redis_url", problems)
        if url is not None and self.redis_url_file is not None:
            try:
                check_store_url(url)
            except ValueError as error:
                problems.append((("redis_url_file",), str(error)))
                url = None
        keys = read_secret(self, "encryption_keys", problems, required=False)
        keys_set = self.encryption_keys is not None or self.encryption_keys_file is not None
        if keys is not None:
            try:
                parse_encryption_keys(keys)
            except ValueError as error:
                where = "encryption_keys_file" if self.encryption_keys_file else "encryption_keys"
                problems.append(((where,), str(error)))
        elif not keys_set and url is not None and urlsplit(url).scheme != "memory":
            problems.append(
                (
                    ("encryption_keys_file",),
                    "required when redis_url is a real Redis (replicas must share keys); "
                    "create one with `monogoto-broker new-encryption-key > FILE`",
                )
            )
        raise_problems(problems)
        if url is not None:
            self.redis_url = SecretStr(url)
        if keys is not None:
            self.encryption_keys = SecretStr(keys)
        return self

    @property
    def uses_memory_store(self) -> bool:
        """True for `memory://`: the in-process store, one replica only."""
        return urlsplit(self.redis_url.get_secret_value()).scheme == "memory"

    def encryption_key_ring(self) -> list[EncryptionKey]:
        """The configured keys, the first encrypts; empty if none are configured."""
        if self.encryption_keys is None:
            return []
        return parse_encryption_keys(self.encryption_keys.get_secret_value())

    def account(self, name: str) -> Account:
        """The resolved account `name`; KeyError if it is not configured."""
        return self.accounts[name].resolve(name, self.upstream)

    def accounts_resolved(self) -> dict[str, Account]:
        """Every configured account, resolved."""
        return {name: self.account(name) for name in self.accounts}
