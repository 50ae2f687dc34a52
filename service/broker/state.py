"""What one process knows about each account: its cached token and how renewals went."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from service.broker.model import (
    AccountStatus,
    AccountView,
    CredentialsStatus,
    IssuedToken,
    Outcome,
)
from service.config import Dialect
from service.metrics import AccountGauges, publish
from service.store import FailureRecord, TokenRecord


@dataclass(frozen=True, slots=True)
class LocalToken:
    """A record held in memory, its token already decrypted and unwrapped for the hot path."""

    account: str
    record: TokenRecord
    access_token: str = field(repr=False)
    local: IssuedToken = field(init=False, repr=False, compare=False)
    # Until when the token may be served: its expiry, 0 once revoked (read on the hot path).
    good_until: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: every local-cache hit hands out this same (immutable) object.
        object.__setattr__(self, "local", self._issued(Outcome.LOCAL))
        object.__setattr__(self, "good_until", self.record.usable_until)

    @property
    def expires_at(self) -> float:
        """When the access token expires (wall clock)."""
        return self.record.expires_at

    def usable(self, need: float) -> bool:
        """Whether it may be served with at least `need` seconds left (never once revoked)."""
        return self.good_until - time.time() >= need

    def issue(self, outcome: Outcome) -> IssuedToken:
        """This token as handed to a caller."""
        return self.local if outcome is Outcome.LOCAL else self._issued(outcome)

    def _issued(self, outcome: Outcome) -> IssuedToken:
        return IssuedToken(
            account=self.account,
            access_token=self.access_token,
            expires_at=self.record.expires_at,
            customer_id=self.record.customer_id,
            outcome=outcome,
        )


class Verification(Enum):
    """Whether this process has yet to verify the account's configured credentials."""

    # At start-up: the first record seen decides. One obtained with other credentials needs a
    # verification; one from a broker that did not fingerprint them (or none) does not.
    FIRST_RECORD = "first_record"
    # The credentials differ from those the current record was obtained with: the record is
    # due at once, and its renewal is a login with the configured credentials.
    PENDING = "pending"
    DONE = "done"


@dataclass(slots=True)
class AccountState:
    """One account as this process sees it.

    `credentials` is the fingerprint of the configured username and password.
    """

    credentials: str = ""
    token: LocalToken | None = None
    refreshing: bool = False
    last_refresh_at: float | None = None
    last_error: str | None = None
    rejected_until: float = 0.0
    # When this process learnt of the rejection in force: a grant obtained later, by any
    # replica, ends it.
    rejected_since: float = 0.0
    # After a transient failure, no new attempt from this process before this (monotonic).
    retry_at: float = 0.0
    verification: Verification = Verification.FIRST_RECORD
    # Monogoto refused the configured credentials, and nothing has shown them good since.
    credentials_rejected: bool = False
    # When a caller was last served a token of this account by this process (wall clock; 0.0
    # if never): accounts nobody reads are renewed last when the budget is short.
    last_read: float = 0.0
    # Told the account's name on every change (the Refresher looks at the account again).
    on_change: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # Replaced on every change; waiters hold the one current when they looked. Made only when
    # someone waits: most accounts have nobody waiting most of the time.
    _changed: asyncio.Event | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the account's next change."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    @property
    def version(self) -> int:
        """Version of the cached record, 0 if none."""
        return 0 if self.token is None else self.token.record.version

    def newer(self, record: TokenRecord) -> bool:
        """Whether `record` is newer than the cached one."""
        return record.version > self.version

    def adopt(self, account: str, record: TokenRecord) -> LocalToken:
        """Cache `record` unless ours is newer; returns the cached token either way."""
        if self.token is None or record.version > self.token.record.version:
            if self.token is None or record.obtained_at > self.token.record.obtained_at:
                # A new grant, by any replica: the account is healthy again.
                self.last_refresh_at = record.obtained_at
                self.last_error = None
                self.retry_at = 0.0
                # A grant made with other credentials (a replica configured otherwise) says
                # nothing of ours: a rejection of ours stands, though its token is served.
                ours = record.credentials in (None, self.credentials)
                if ours and self.rejected_until and record.obtained_at > self.rejected_since:
                    self.rejected_until = 0.0
                if record.credentials == self.credentials:
                    self.credentials_rejected = False
            self.token = LocalToken(account, record, record.access_token.get_secret_value())
            self._verified_by(record)
            self.publish(account)
            self.notify(account)
        return self.token

    def _verified_by(self, record: TokenRecord) -> None:
        """Settle what `record` says about the configured credentials."""
        if record.credentials == self.credentials:
            self.verification = Verification.DONE
        elif self.verification is Verification.FIRST_RECORD:
            known = record.credentials is not None
            self.verification = Verification.PENDING if known else Verification.DONE

    def needs_login(self, record: TokenRecord) -> bool:
        """Whether `record` is to be replaced by a login that verifies the credentials."""
        return self.verification is Verification.PENDING and record.credentials != self.credentials

    def credentials_changed(self, account: str, credentials: str) -> None:
        """The configured credentials are now those of fingerprint `credentials`: forget what
        was known of the old ones (their rejection, any back-off) and verify the new ones
        unless the current record was obtained with them."""
        self.credentials = credentials
        token = self.token
        if token is None:
            self.verification = Verification.FIRST_RECORD
        elif token.record.credentials == credentials:
            self.verification = Verification.DONE
        else:
            self.verification = Verification.PENDING
        self.clear_failures(account)  # wakes the Refresher: a verification is due at once

    def clear_failures(self, account: str) -> None:
        """Forget rejections and back-offs: the next renewal may call Monogoto at once."""
        self.rejected_until = self.rejected_since = self.retry_at = 0.0
        self.last_error = None
        self.credentials_rejected = False
        self.publish(account)
        self.notify(account)

    def notify(self, account: str) -> None:
        """Wake everyone waiting for a change of this account, and tell `on_change`."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        if self.on_change is not None:
            self.on_change(account)

    def failed(self, detail: str, retry_after: float = 0.0) -> None:
        """A renewal by this process failed for a transient reason; Monogoto is not asked again
        from this process for `retry_after` seconds."""
        self.last_error = detail
        self.retry_at = time.monotonic() + retry_after

    def rejected(self, account: str, failure: FailureRecord) -> None:
        """Monogoto rejects the credentials until at least `failure.retry_at`."""
        if failure.retry_at > self.rejected_until:
            if self.rejected_until <= time.time():
                self.rejected_since = time.time()
            self.rejected_until = failure.retry_at
        self.last_error = failure.detail
        self.credentials_rejected = True
        self.publish(account)

    def credentials_status(self) -> CredentialsStatus:
        """What is known of the configured credentials."""
        if self.credentials_rejected:
            return CredentialsStatus.REJECTED
        token = self.token
        if token is not None and token.record.credentials == self.credentials:
            return CredentialsStatus.VERIFIED
        return CredentialsStatus.UNVERIFIED

    def gauges(self, account: str) -> AccountGauges:
        """The account's per-account metrics as they are now."""
        token = self.token
        return AccountGauges(
            account=account,
            # A revoked token is served no more: for alerts, it expired.
            expires_at=None if token is None else token.record.usable_until,
            rejected=self.rejected_until != 0.0,
            credentials=self.credentials_status().value,
        )

    def publish(self, account: str) -> None:
        """Record the account's metrics after a change (see service.metrics.publish)."""
        publish(self.gauges(account))

    def status(self) -> AccountStatus:
        """The account's status for `/v1/accounts`."""
        if self.rejected_until > time.time():
            # Also while a token another replica obtained (with other credentials) is served.
            return AccountStatus.CREDENTIALS_REJECTED
        if self.refreshing:
            return AccountStatus.REFRESHING
        if self.last_error is not None:
            return AccountStatus.FAILING
        token = self.token
        if token is None or not token.usable(0.0):
            return AccountStatus.NO_TOKEN
        return AccountStatus.OK

    def view(self, name: str, dialect: Dialect) -> AccountView:
        """The account's state without secrets."""
        token = self.token
        return AccountView(
            name=name,
            dialect=dialect,
            status=self.status(),
            expires_at=None if token is None else token.expires_at,
            last_refresh_at=self.last_refresh_at,
            last_error=self.last_error,
            credentials=self.credentials_status(),
        )
