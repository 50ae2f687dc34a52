"""The config sections below the top level, and `Account`, an account with defaults applied."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from service.config.fields import BaseUrl, Loc, raise_problems, read_secret
from service.keys import DIGEST_PREFIX

ALL_ACCOUNTS = "*"
_DIGEST = re.compile(r"[0-9a-f]{64}")

# Upper bounds of durations: far beyond any sensible setting, yet small enough that every
# Redis expiry derived from them (lock lease, budget window, failure marker, record TTL) is one
# Redis accepts. Without them, `timeout_seconds: 1e20` passed the checks and every renewal
# then failed as "store unavailable".
MAX_TIMEOUT_SECONDS = 600.0
MAX_RETRY_SECONDS = 3600.0
MAX_RETRY_AFTER_SECONDS = 900.0
MAX_PERIOD_SECONDS = 86400.0
MAX_REFRESH_SECONDS = 7 * 86400.0


class Dialect(StrEnum):
    """Which of Monogoto's two authentication APIs an account uses."""

    LEGACY = "legacy"
    V1 = "v1"


DEFAULT_BASE_URLS = {
    Dialect.LEGACY: "https://console.monogoto.io",
    Dialect.V1: "https://api.monogoto.io",
}


class _Section(BaseModel):
    # hide_input_in_errors: a raw ValidationError printed elsewhere must not show a password.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: object) -> object:
        # No section field is a flag: YAML's `true` would otherwise pass as the number 1.
        if isinstance(value, bool):
            raise ValueError("must not be true or false")
        return value


class AuthRate(_Section):
    """Upstream login/refresh budget shared by all replicas, per base URL."""

    limit: int = Field(5, ge=1)
    period_seconds: float = Field(60.0, gt=0, le=MAX_PERIOD_SECONDS)


class RetrySettings(_Section):
    """How hard one login or refresh tries before giving up; with the timeout, it bounds the
    lock lease (how long a dead holder keeps other replicas waiting)."""

    max_attempts: int = Field(4, ge=1)
    max_elapsed_seconds: float = Field(30.0, gt=0, le=MAX_RETRY_SECONDS)


class UpstreamSettings(_Section):
    """Defaults for every account's Monogoto connection."""

    dialect: Dialect = Dialect.LEGACY
    base_url: BaseUrl | None = None
    timeout_seconds: float = Field(10.0, gt=0, le=MAX_TIMEOUT_SECONDS)
    auth_rate: AuthRate = Field(default_factory=AuthRate)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    # Caps Monogoto's Retry-After (and the shared cool-down after a 429): an absurd value such
    # as `1e9` must not stall every replica for decades or be passed on to callers.
    max_retry_after_seconds: float = Field(300.0, gt=0, le=MAX_RETRY_AFTER_SECONDS)


class ApiSettings(_Section):
    """How the token API treats its callers."""

    # No token request is held longer than this: then 503 with Retry-After, while the renewal
    # it waited for goes on in the background.
    max_wait_seconds: float = Field(10.0, gt=0, le=MAX_TIMEOUT_SECONDS)


class RefreshSettings(_Section):
    """When tokens are renewed ahead of expiry."""

    fraction: float = Field(0.75, gt=0, lt=1)
    min_remaining_seconds: float = Field(60.0, ge=0, le=MAX_REFRESH_SECONDS)
    default_lifetime_seconds: float = Field(3600.0, gt=0, le=MAX_REFRESH_SECONDS)
    # After Monogoto rejects an account's credentials, no replica tries it again for this long:
    # retrying wrong credentials quickly can get the account locked.
    rejected_backoff_seconds: float = Field(300.0, gt=0, le=MAX_REFRESH_SECONDS)


@dataclass(frozen=True, slots=True)
class Account:
    """An account with the upstream defaults applied: what the Monogoto client needs."""

    name: str
    username: str
    password: SecretStr
    dialect: Dialect
    base_url: str
    timeout_seconds: float


class AccountSettings(_Section):
    """One Monogoto login as written in the config."""

    username: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: Path | None = None
    dialect: Dialect | None = None
    base_url: BaseUrl | None = None
    timeout_seconds: float | None = Field(None, gt=0, le=MAX_TIMEOUT_SECONDS)

    @model_validator(mode="after")
    def _read_password(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        password = read_secret(self, "password", problems)
        raise_problems(problems)
        self.password = SecretStr(password or "")
        return self

    def resolve(self, name: str, upstream: UpstreamSettings) -> Account:
        """Apply the upstream defaults; the default base URL follows the effective dialect."""
        if self.password is None:
            raise RuntimeError(f"account {name!r} was not validated")
        dialect = self.dialect or upstream.dialect
        return Account(
            name=name,
            username=self.username,
            password=self.password,
            dialect=dialect,
            base_url=self.base_url or upstream.base_url or DEFAULT_BASE_URLS[dialect],
            timeout_seconds=self.timeout_seconds or upstream.timeout_seconds,
        )


class CallerSettings(_Section):
    """An internal service allowed to fetch tokens, identified by the digest of its key."""

    api_key_sha256: SecretStr | None = None
    api_key_sha256_file: Path | None = None
    accounts: list[str]

    @field_validator("accounts")
    @classmethod
    def _not_empty(cls, accounts: list[str]) -> list[str]:
        if not accounts:
            raise ValueError(f"list at least one account name, or '{ALL_ACCOUNTS}' for all")
        return accounts

    @model_validator(mode="after")
    def _read_digest(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        text = read_secret(self, "api_key_sha256", problems)
        if text is not None:
            digest = text.strip().lower().removeprefix(DIGEST_PREFIX)
            if _DIGEST.fullmatch(digest):
                self.api_key_sha256 = SecretStr(digest)
            else:
                where = "api_key_sha256_file" if self.api_key_sha256_file else "api_key_sha256"
                problems.append(((where,), "must be 'sha256:' and 64 hex digits (see new-api-key)"))
        raise_problems(problems)
        return self

    def key_digest(self) -> str:
        """Lowercase hex SHA-256 of this caller's key."""
        if self.api_key_sha256 is None:
            raise RuntimeError("caller was not validated")
        return self.api_key_sha256.get_secret_value()

    def allows(self, account: str) -> bool:
        """Whether this caller may fetch tokens of `account`."""
        return ALL_ACCOUNTS in self.accounts or account in self.accounts
