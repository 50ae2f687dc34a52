"""`Settings`, the top level of the configuration, and the shared secrets it reads."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.config.caller_auth import CallerAuthSettings
from service.config.fields import (
    KeyPrefix,
    Loc,
    Name,
    Problems,
    errors_below,
    raise_problems,
    read_secret,
    valid_part,
)
from service.config.models import (
    ALL_ACCOUNTS,
    CREDENTIAL_FIELDS,
    Account,
    AccountSettings,
    ApiSettings,
    AuditSettings,
    CallerSettings,
    RefreshSettings,
    TlsSettings,
    UpstreamSettings,
)
from service.config.redis_url import check_store_url
from service.keys import EncryptionKey, parse_encryption_keys

ENV_PREFIX = "BROKER_"
_SHARED_SECRETS = ("redis_url", "redis_url_file", "encryption_keys", "encryption_keys_file")


class Settings(BaseSettings):
    """The whole broker configuration."""

    model_config = SettingsConfigDict(
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
    tls: TlsSettings | None = None
    # Serve /metrics on this port (plain HTTP) instead of the API's port.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    caller_auth: CallerAuthSettings = Field(default_factory=CallerAuthSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The given values only: `service.config.loading` merges the `BROKER_*` environment
        variables into the file's values itself, knowing where each value came from."""
        return (init_settings,)

    @field_validator("redis_url")
    @classmethod
    def _check_inline_redis_url(cls, url: SecretStr) -> SecretStr:
        check_store_url(url.get_secret_value())
        return url

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _port_not_boolean(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must not be true or false")
        return value

    @field_validator("accounts")
    @classmethod
    def _some_accounts(cls, accounts: dict[str, AccountSettings]) -> dict[str, AccountSettings]:
        if not accounts:
            raise ValueError("at least one account is required")
        return accounts

    @model_validator(mode="wrap")
    @classmethod
    def _check_across_fields(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        """The checks combining fields run even when some fields are invalid, on the fields
        they need as long as those are valid, so that one run reports every problem."""
        if isinstance(data, cls) or not isinstance(data, Mapping):
            return handler(data)
        try:
            settings = handler(data)
        except ValidationError as error:
            errors = error.errors()
            problems = _caller_problems(*_callers_in(data, errors))
            tls = data.get("tls")
            has_client_ca = isinstance(tls, Mapping) and tls.get("client_ca_file") is not None
            problems += _subject_problems(has_client_ca, _subjects_in(data, errors))
            problems += _service_account_problems(*_service_accounts_in(cls, data, errors))
            shared = valid_part(cls, data, errors, _SHARED_SECRETS)
            if shared is not None:
                problems += shared._read_shared_secrets()
            raise_problems(problems, errors)
            raise  # not reached: there are errors
        callers = {name: (caller.accounts, caller) for name, caller in settings.callers.items()}
        problems = _caller_problems(settings.accounts, callers)
        subjects = {name: caller.client_subjects for name, caller in settings.callers.items()}
        has_client_ca = settings.tls is not None and settings.tls.client_ca_file is not None
        problems += _subject_problems(has_client_ca, subjects)
        problems += _service_account_problems(
            settings.caller_auth.kubernetes is not None,
            {name: caller.service_accounts for name, caller in settings.callers.items()},
        )
        problems += settings._read_shared_secrets()
        raise_problems(problems)
        return settings

    def _read_shared_secrets(self) -> Problems:
        problems: Problems = []
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
        if problems:
            return problems
        if url is not None:
            self.redis_url = SecretStr(url)
        if keys is not None:
            self.encryption_keys = SecretStr(keys)
        return problems

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


# A caller as far as the checks across callers can see it: its account list and the caller
# holding its digests, each None where invalid.
_CallerView = tuple[list[str] | None, CallerSettings | None]


def _callers_in(
    data: Mapping[str, Any], errors: list[ErrorDetails]
) -> tuple[Collection[str] | None, dict[str, _CallerView]]:
    """The account names and the callers of raw `data` that failed validation (`errors`), as
    far as they are valid: a caller's account list and digests are checked on their own."""
    accounts = data.get("accounts")
    names = (
        [name for name in accounts if isinstance(name, str)]
        if isinstance(accounts, Mapping)
        else None
    )
    callers: dict[str, _CallerView] = {}
    raw = data.get("callers")
    for name, entry in raw.items() if isinstance(raw, Mapping) else ():
        below = errors_below(errors, "callers", name)
        listed = valid_part(CallerSettings, entry, below, ("accounts",))
        keys = valid_part(CallerSettings, entry, below, CREDENTIAL_FIELDS)
        callers[str(name)] = (
            listed.accounts if listed is not None and "accounts" in entry else None,
            keys if keys is not None and not keys.read_digests() else None,
        )
    return names, callers


def _caller_problems(
    accounts: Collection[str] | None, callers: Mapping[str, _CallerView]
) -> Problems:
    """Callers naming accounts that are not configured (unless `accounts` is unknown), and
    callers sharing a key."""
    problems: Problems = []
    owners: dict[str, str] = {}
    for name, (granted, caller) in callers.items():
        for index, account in enumerate(granted or ()):
            if accounts is not None and account != ALL_ACCOUNTS and account not in accounts:
                problems.append(
                    (("callers", name, "accounts", index), f"unknown account '{account}'")
                )
        if caller is None:
            continue
        for index, digest in enumerate(caller.key_digests()):
            owner = owners.setdefault(digest, name)
            if owner != name:
                where, prefix = caller.digest_source(index)
                problems.append(
                    (
                        ("callers", name, *where),
                        f"{prefix}same key as caller '{owner}' (each caller needs its own)",
                    )
                )
    return problems


def _subjects_in(
    data: Mapping[str, Any], errors: list[ErrorDetails]
) -> dict[str, list[str] | None]:
    """The valid `client_subjects` of each caller of raw `data` that failed validation."""
    subjects: dict[str, list[str] | None] = {}
    raw = data.get("callers")
    for name, entry in raw.items() if isinstance(raw, Mapping) else ():
        below = errors_below(errors, "callers", name)
        listed = valid_part(CallerSettings, entry, below, ("client_subjects",))
        subjects[str(name)] = listed.client_subjects if listed is not None else None
    return subjects


def _subject_problems(has_client_ca: bool, callers: Mapping[str, list[str] | None]) -> Problems:
    """Client subjects without a client CA to verify certificates against, and a subject listed
    twice (by one caller or by two)."""
    problems: Problems = []
    owners: dict[str, tuple[str, int]] = {}
    for name, subjects in callers.items():
        for index, subject in enumerate(subjects or ()):
            where: Loc = ("callers", name, "client_subjects", index)
            owner, first = owners.setdefault(subject, (name, index))
            if owner != name:
                problems.append(
                    (where, f"same subject as caller '{owner}' (each caller needs its own)")
                )
            elif first != index:
                problems.append((where, f"same subject as client_subjects[{first}]"))
        if subjects and not has_client_ca:
            problems.append(
                (
                    ("callers", name, "client_subjects"),
                    "needs tls.client_ca_file (the CA that client certificates must chain to)",
                )
            )
    return problems


def _service_accounts_in(
    cls: type[Settings], data: Mapping[str, Any], errors: list[ErrorDetails]
) -> tuple[bool | None, dict[str, list[str] | None]]:
    """Whether `caller_auth.kubernetes` is set (None if `caller_auth` is invalid) and each
    caller's service accounts (None where invalid), from raw `data` that failed validation."""
    auth = valid_part(cls, data, errors, ("caller_auth",))
    kubernetes = None if auth is None else auth.caller_auth.kubernetes is not None
    callers: dict[str, list[str] | None] = {}
    raw = data.get("callers")
    for name, entry in raw.items() if isinstance(raw, Mapping) else ():
        below = errors_below(errors, "callers", name)
        part = valid_part(CallerSettings, entry, below, ("service_accounts",))
        callers[str(name)] = None if part is None else part.service_accounts
    return kubernetes, callers


def _service_account_problems(
    kubernetes: bool | None, callers: Mapping[str, list[str] | None]
) -> Problems:
    """Service accounts without `caller_auth.kubernetes` to check their tokens (unless that is
    unknown), and service accounts of two callers."""
    problems: Problems = []
    owners: dict[str, str] = {}
    for name, accounts in callers.items():
        if accounts and kubernetes is False:
            problems.append(
                (
                    ("callers", name, "service_accounts"),
                    "needs caller_auth.kubernetes (the issuer and audiences that ServiceAccount "
                    "tokens are checked against)",
                )
            )
        for index, account in enumerate(accounts or ()):
            owner = owners.setdefault(account, name)
            if owner != name:
                problems.append(
                    (
                        ("callers", name, "service_accounts", index),
                        f"same service account as caller '{owner}' (each caller needs its own)",
                    )
                )
    return problems
