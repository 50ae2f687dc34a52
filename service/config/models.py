"""The config sections below the top level, and `Account`, an account with defaults applied."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.config.fields import (
    BaseUrl,
    Loc,
    Problems,
    ServiceAccountName,
    check_fields,
    raise_problems,
    read_secret,
)
from service.keys import DIGEST_PREFIX
from service.tls import TlsFileError, canonical_subject, check_client_ca, check_key_pair

ALL_ACCOUNTS = "*"
DIGEST_FIELDS = ("api_key_sha256", "api_key_sha256_file")
# Every kind of credential a caller may be configured with; a caller needs at least one.
CREDENTIAL_FIELDS = (*DIGEST_FIELDS, "client_subjects", "service_accounts")
_NO_CREDENTIAL = f"required (set {', '.join(CREDENTIAL_FIELDS[:-1])} or {CREDENTIAL_FIELDS[-1]})"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_BAD_DIGEST = "must be 'sha256:' and 64 hex digits (see new-api-key)"
# How the keys of `new-api-key` begin (service/keys.py): a caller key pasted where its digest
# belongs is named as such, without quoting it.
_KEY_PREFIX = "mgb_"
_PASTED_KEY = (
    "this looks like the key itself (line 1 of new-api-key); give the sha256:... digest (line 2)"
)
_EMPTY_DIGEST_LIST = "list at least one digest (several only while rotating a key)"

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
    def _no_booleans(cls, value: object, info: ValidationInfo) -> object:
        # Only a field declared as a flag takes one: YAML's `true` would otherwise pass as the
        # number 1.
        flag = cls.model_fields[str(info.field_name)].annotation is bool
        if isinstance(value, bool) and not flag:
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

    @model_validator(mode="wrap")
    @classmethod
    def _read_password(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        return check_fields(cls, data, handler, {("password", "password_file"): cls._password})

    def _password(self) -> Problems:
        problems: Problems = []
        password = read_secret(self, "password", problems)
        if password is not None:
            self.password = SecretStr(password)
        return problems

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


ClientSubject = Annotated[str, AfterValidator(canonical_subject)]


class CallerSettings(_Section):
    """An internal service allowed to fetch tokens, identified by the digest of its key, by
    the subject of its client certificate (with `tls.client_ca_file`), by its Kubernetes
    ServiceAccounts (`namespace/name`), or by several of these.

    A caller may have several key digests, so that its key can be rotated without downtime:
    the new digest is added next to the old one, the caller moves to the new key, and the old
    digest is removed.
    """

    api_key_sha256: SecretStr | list[SecretStr] | None = None
    api_key_sha256_file: Path | None = None
    # RFC 4514 subjects, spelt canonically (`CN=fleet-ingest,O=telemetry`).
    client_subjects: list[ClientSubject] | None = None
    service_accounts: list[ServiceAccountName] | None = None
    accounts: list[str]
    # May use the operator actions (verify, reset) on every configured account.
    admin: bool = False
    # Lowercase hex digests, in the configured order (none for a caller without keys); filled
    # in by `_read_digests`.
    _digests: tuple[str, ...] | None = PrivateAttr(default=None)
    # Where each digest was configured: its location and a message prefix ("line 3: ").
    _sources: tuple[tuple[Loc, str], ...] = PrivateAttr(default=())

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _one_or_more_digests(cls, value: object) -> object:
        # Checked here so that a wrong type gets one plain message instead of one per member
        # of the union; never quotes the value.
        if isinstance(value, list):
            problems: list[tuple[Loc, str]] = [
                ((index,), "must be a string")
                for index, item in enumerate(value)
                if not isinstance(item, str | SecretStr)
            ]
            raise_problems(problems)
        elif value is not None and not isinstance(value, str | SecretStr):
            raise ValueError("must be a digest or a list of digests")
        return value

    @field_validator("service_accounts")
    @classmethod
    def _distinct_service_accounts(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if not names:
            raise ValueError("list at least one 'namespace/name', or leave service_accounts out")
        problems: list[tuple[Loc, str]] = []
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if first.setdefault(name, index) != index:
                problems.append(
                    ((index,), f"same service account as service_accounts[{first[name]}]")
                )
        raise_problems(problems)
        return names

    @field_validator("accounts")
    @classmethod
    def _not_empty(cls, accounts: list[str]) -> list[str]:
        if not accounts:
            raise ValueError(f"list at least one account name, or '{ALL_ACCOUNTS}' for all")
        return accounts

    @field_validator("client_subjects")
    @classmethod
    def _some_subjects(cls, subjects: list[str] | None) -> list[str] | None:
        if subjects is not None and not subjects:
            raise ValueError("list at least one subject, or leave client_subjects out")
        return subjects

    @model_validator(mode="wrap")
    @classmethod
    def _read_digests(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        return check_fields(cls, data, handler, {CREDENTIAL_FIELDS: cls.read_digests})

    def _has_other_credentials(self) -> bool:
        """Whether the caller has a credential besides keys (keys are then optional)."""
        return bool(self.client_subjects or self.service_accounts)

    def read_digests(self) -> Problems:
        """Read and check this caller's digests (inline or from its file) and keep them for
        `key_digests`; the problems found, by location below the caller. A caller with client
        subjects or service accounts needs no digest."""
        problems: Problems = []
        digests: list[str] = []
        sources: list[tuple[Loc, str]] = []
        keys_set = self.api_key_sha256 is not None or self.api_key_sha256_file is not None
        if not keys_set:
            if not self._has_other_credentials():
                problems.append((("api_key_sha256",), _NO_CREDENTIAL))
            else:
                self._digests = self._sources = ()
            return problems
        for loc, prefix, text in self._digest_entries(problems):
            digest = text.strip().lower().removeprefix(DIGEST_PREFIX)
            if any(line.strip().startswith(_KEY_PREFIX) for line in text.splitlines()):
                problems.append((loc, prefix + _PASTED_KEY))
            elif not _DIGEST.fullmatch(digest):
                problems.append((loc, prefix + _BAD_DIGEST))
            elif digest in digests:
                first_loc, first_prefix = sources[digests.index(digest)]
                problems.append(
                    (loc, prefix + f"same digest as {_describe(first_loc, first_prefix)}")
                )
            else:
                digests.append(digest)
                sources.append((loc, prefix))
        if not problems:
            self.api_key_sha256 = [SecretStr(digest) for digest in digests]
            self._digests = tuple(digests)
            self._sources = tuple(sources)
        return problems

    def _digest_entries(self, problems: Problems) -> list[tuple[Loc, str, str]]:
        """Each configured digest text with its location and message prefix (`line 3: ` in a
        file of several)."""
        entries: list[tuple[Loc, str, str]] = []
        value = self.api_key_sha256
        if isinstance(value, list) and self.api_key_sha256_file is None:
            if not value:
                problems.append((("api_key_sha256",), _EMPTY_DIGEST_LIST))
            for index, item in enumerate(value):
                entries.append((("api_key_sha256", index), "", item.get_secret_value()))
        else:
            text = read_secret(self, "api_key_sha256", problems)
            if text is not None and self.api_key_sha256_file is not None:
                lines = [
                    (number, line.strip())
                    for number, line in enumerate(text.splitlines(), start=1)
                    if line.strip()
                ]
                for number, line in lines:
                    prefix = f"line {number}: " if len(lines) > 1 else ""
                    entries.append((("api_key_sha256_file",), prefix, line))
            elif text is not None:
                entries.append((("api_key_sha256",), "", text))
        return entries

    def key_digests(self) -> tuple[str, ...]:
        """Lowercase hex SHA-256 of each of this caller's keys (several while rotating)."""
        if self._digests is None:
            raise RuntimeError("caller was not validated")
        return self._digests

    def digest_source(self, index: int) -> tuple[Loc, str]:
        """Where the `index`-th digest was configured: its location below this caller and a
        message prefix (`"line 3: "` for a file of several digests, else empty)."""
        return self._sources[index]

    def allows(self, account: str) -> bool:
        """Whether this caller may fetch tokens of `account`."""
        return ALL_ACCOUNTS in self.accounts or account in self.accounts


def _describe(loc: Loc, prefix: str) -> str:
    """`api_key_sha256[0]` or `line 2`: how a problem refers to another digest of the caller."""
    if prefix:
        return prefix.removesuffix(": ")
    name, *index = loc
    return f"{name}[{index[0]}]" if index else str(name)


class TlsSettings(_Section):
    """The broker's listener over TLS; with `client_ca_file`, clients may also present a
    certificate (mTLS) that callers' `client_subjects` can be matched against."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _check_files(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        return check_fields(
            cls,
            data,
            handler,
            {("cert_file", "key_file"): cls._key_pair, ("client_ca_file",): cls._client_ca},
        )

    def _key_pair(self) -> Problems:
        # Both are required; a missing one is reported as such, and this check waits for it.
        if "cert_file" not in self.model_fields_set or "key_file" not in self.model_fields_set:
            return []
        try:
            check_key_pair(self.cert_file, self.key_file)
        except TlsFileError as error:
            return [((error.field,), str(error))]
        return []

    def _client_ca(self) -> Problems:
        if self.client_ca_file is None:
            return []
        try:
            check_client_ca(self.client_ca_file)
        except TlsFileError as error:
            return [((error.field,), str(error))]
        return []


AUDIT_STDOUT = "-"
# An HMAC key shorter than its hash's block of security (32 bytes for SHA-256) would be the
# weakest part of the fingerprint.
MIN_AUDIT_KEY_CHARS = 32
_SHORT_AUDIT_KEY = (
    f"must be at least {MIN_AUDIT_KEY_CHARS} characters; create one with `openssl rand -hex 32`"
)


class AuditSettings(BaseModel):
    """The audit log: one JSON line per token handed out, invalidated or refused.

    Not a `_Section`: `fail_closed` is the one flag of the configuration.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)

    # "-" is standard output; anything else a file, appended to and reopened when rotated away.
    path: str = Field(AUDIT_STDOUT, min_length=1)
    hmac_key: SecretStr | None = None
    hmac_key_file: Path | None = None
    fail_closed: bool = False

    @model_validator(mode="wrap")
    @classmethod
    def _read_hmac_key(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        return check_fields(cls, data, handler, {("hmac_key", "hmac_key_file"): cls._hmac_key})

    def _hmac_key(self) -> Problems:
        problems: Problems = []
        key = read_secret(self, "hmac_key", problems, required=False)
        if key is None:
            return problems
        if len(key.strip()) < MIN_AUDIT_KEY_CHARS:
            where = "hmac_key_file" if self.hmac_key_file is not None else "hmac_key"
            problems.append(((where,), _SHORT_AUDIT_KEY))
        else:
            self.hmac_key = SecretStr(key)
        return problems

    @property
    def to_stdout(self) -> bool:
        """Whether the lines go to standard output rather than a file."""
        return self.path == AUDIT_STDOUT
