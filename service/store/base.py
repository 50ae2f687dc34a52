"""The store interface shared by Redis and the in-process store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.store.records import FailureRecord, TokenRecord


class StoreUnavailableError(Exception):
    """The store cannot be reached or did not answer in time; the operation had no effect
    that the caller can rely on."""


@dataclass(frozen=True, slots=True)
class Change:
    """A published write: `account` now holds the record of `version`."""

    account: str
    version: int


class TokenStore(Protocol):
    """Shared state of all replicas: token records, locks, the auth budget, failure markers.

    Every method may raise StoreUnavailableError.
    """

    async def load(self, account: str) -> TokenRecord | None:
        """The account's current record (decrypted), or None if there is none."""
        ...

    async def save(self, account: str, record: TokenRecord) -> bool:
        """Write `record` unless the stored one has an equal or higher version, expiring it with
        the token, and publish the change; False if refused."""
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

    async def take_budget(self, scope: str, limit: int, period_seconds: float) -> float:
        """Take one unit of the auth budget of `scope`: 0.0 when granted, else the seconds until
        a unit may be free (at most `limit` grants in any window of `period_seconds`, and none
        during a cool-down)."""
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

    async def ping(self) -> None:
        """Return if the store answers; raise StoreUnavailableError otherwise."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
