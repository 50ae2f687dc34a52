"""The store interface shared by Redis and the in-process store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.store.records import FailureRecord, TokenRecord
from service.store.topology import Survey

#: A queued claim on the auth budget not registered again within this time is dropped.
QUEUE_STALE_SECONDS = 3.0
#: The shortest wait the budget names to a queued caller (it asks again then).
QUEUE_POLL_SECONDS = 0.05


class StoreUnavailableError(Exception):
    """The store cannot be reached or did not answer in time; the operation had no effect
    that the caller can rely on."""

    @property
    def reason(self) -> str:
        """What the Redis client said (e.g. `Error 111 connecting to 10.0.0.7:6379. Connection
        refused.`), for logs: the client names hosts and ports, never passwords."""
        cause = self.__cause__
        text = f"{type(cause).__name__}: {cause}" if cause is not None else str(self)
        return text[:300]


@dataclass(frozen=True, slots=True)
class Change:
    """A published write: `account` now holds the record of `version`. With `reset`, an
    operator cleared the account's rejection and back-off instead (`version` is 0)."""

    account: str
    version: int
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Spent:
    """A refresh token that was (or is about to be) sent: its fingerprint, and until when it
    must be remembered (its own expiry, when known). `until` 0 takes a token back that was
    noted as spent but certainly never sent."""

    fingerprint: str
    until: float


@dataclass(frozen=True, slots=True)
class Saved:
    """What became of a save: true when written. `replicated` is False only for a write that
    noted a refresh token as spent, was made, and no replica of the store acknowledged in
    time: a failover could still lose it, so the token must not be sent (broker.md rule 7)."""

    written: bool
    replicated: bool = True

    def __bool__(self) -> bool:
        return self.written


class TokenStore(Protocol):
    """Shared state of all replicas: token records, locks, the auth budget, failure markers.

    Every method may raise StoreUnavailableError.
    """

    async def load(self, account: str) -> TokenRecord | None:
        """The account's current record (decrypted), or None if there is none. A refresh token
        remembered as spent is left out of the record."""
        ...

    async def load_many(self, accounts: Sequence[str]) -> dict[str, TokenRecord | None]:
        """Each account's record as `load` gives it (one round trip)."""
        ...

    async def save(
        self,
        account: str,
        record: TokenRecord,
        *,
        lock: str | None = None,
        spends: Spent | None = None,
    ) -> Saved:
        """Write `record` unless the stored one has an equal or higher version, expiring it with
        the token, and publish the change; false if refused. With `lock` (a release token) the
        write is fenced: refused unless that lock is still held with it. `spends` is remembered
        as spent in the same step; see `Saved.replicated`."""
        ...

    async def remember_spent(self, account: str, spent: Sequence[Spent]) -> None:
        """Remember refresh tokens as spent (re-seeding a store that lost them)."""
        ...

    async def versions(self, accounts: Sequence[str]) -> dict[str, int]:
        """The stored version of each account, 0 where there is no record (one round trip)."""
        ...

    def changes(self) -> AsyncIterator[Change]:
        """Writes by any replica, as they are published; ends or raises StoreUnavailableError
        when the subscription is lost (messages sent meanwhile are lost too)."""
        ...

    async def acquire_lock(self, account: str, lease_seconds: float) -> str | None:
        """Take the account's lock for `lease_seconds`; its release token, or None if held."""
        ...

    async def release_lock(self, account: str, token: str) -> None:
        """Release the lock if `token` still holds it."""
        ...

    async def extend_lock(self, account: str, token: str, lease_seconds: float) -> bool:
        """Renew the lease of the lock `token` holds; False if it is no longer held with it."""
        ...

    async def take_budget(
        self,
        scope: str,
        limit: int,
        period_seconds: float,
        *,
        reserve: int = 0,
        account: str = "",
        priority: float = 0.0,
        enqueue: bool = True,
        pace: float = 0.0,
    ) -> float:
        """Take one unit of the auth budget of `scope`: 0.0 when granted, else the seconds until
        a unit may be free (at most `limit` grants in any window of `period_seconds`, and none
        during a cool-down). With `reserve`, a unit is granted only while more than `reserve`
        are free: those are kept for more urgent renewals.

        With `account`, the units are shared out through the scope's renewal queue: the account
        is queued at `priority` (lower is more urgent; a lower claim by any replica stands) and
        a unit is granted only while its rank in the queue is below the free units; the grant
        takes it out of the queue, and an entry not queued again within
        `QUEUE_STALE_SECONDS` is dropped (its replica gave up or is gone). Without `enqueue`
        (a caller that will not wait), the account is not queued and ranks after every more
        urgent claim. A queued caller is told to wait at least `QUEUE_POLL_SECONDS`.

        With `pace` (seconds), a unit is granted only once the scope's last grant is at least
        that old: paced claims are spread over the window instead of taking its units at once.
        """
        ...

    async def hasten(self, scope: str, account: str, priority: float) -> None:
        """Lower `account`'s queued claim in `scope` to `priority` if it is queued (a caller
        waits for another replica's renewal of it); nothing if it is not."""
        ...

    async def take_forced(
        self, account: str, caller: str, interval_seconds: float, *, report: str = ""
    ) -> float:
        """Count a renewal of `account` that `caller` forces: 0.0 if allowed (at most one per
        `interval_seconds`), else the seconds until it is. `report`, the fingerprint of a
        reported token: further reports of the token already charged for are allowed."""
        ...

    async def epoch(self) -> str:
        """An identifier that changes whenever the store may have lost or gone back on what it
        held (a restart, a failover); the budget is held back for a window when it does."""
        ...

    async def cool_down(self, scope: str, seconds: float) -> None:
        """Grant no budget of `scope` for `seconds` (Monogoto said 429); never shortens one."""
        ...

    async def load_failure(self, account: str) -> FailureRecord | None:
        """The account's credentials-rejected marker, if one is in force."""
        ...

    async def save_failure(self, account: str, failure: FailureRecord) -> None:
        """Record rejected credentials until `failure.retry_at`."""
        ...

    async def clear_failure(self, account: str) -> None:
        """Forget the credentials-rejected marker (a login succeeded)."""
        ...

    async def reset(self, account: str) -> None:
        """Forget the credentials-rejected marker and publish a reset notice (`Change.reset`),
        so that every replica forgets its own rejection and back-off of the account."""
        ...

    async def topology(self) -> Survey:
        """The nodes the store stands on (for readiness): returns if the store answers, raises
        StoreUnavailableError otherwise."""
        ...

    @property
    def address(self) -> str:
        """Where the store is, for logs: hosts, ports, database or service name; never a
        password."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
