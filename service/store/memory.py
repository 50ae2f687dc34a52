"""The shared store kept in this process, for `redis_url: memory://` (one replica only)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from service.claims import fingerprint
from service.store.base import QUEUE_POLL_SECONDS, QUEUE_STALE_SECONDS, Change, Saved, Spent
from service.store.records import FailureRecord, TokenRecord
from service.store.topology import MasterState, Survey

# One process for the store's whole life: its epoch never changes.
_EPOCH = "memory"


class MemoryStore:
    """`TokenStore` in process memory, with the semantics of the Redis store.

    Token records and failure markers expire on the wall clock (their times are wall-clock);
    locks, budgets and cool-downs run on the monotonic clock.
    """

    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}
        self._failures: dict[str, FailureRecord] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._grants: dict[str, deque[float]] = {}
        self._cool_until: dict[str, float] = {}
        # Per budget scope: the renewal queue (account -> priority) and when each account's
        # claim was last registered (monotonic).
        self._queues: dict[str, dict[str, float]] = {}
        self._seen: dict[str, dict[str, float]] = {}
        self._spent: dict[str, dict[str, float]] = {}
        self._forced: dict[tuple[str, str], tuple[float, str]] = {}
        # None tells a subscriber that the store closed.
        self._subscribers: set[asyncio.Queue[Change | None]] = set()

    async def load(self, account: str) -> TokenRecord | None:
        """The account's current record, or None if there is none or its token expired; a
        refresh token remembered as spent is left out."""
        record = self._records.get(account)
        if record is not None and record.expires_at <= time.time():
            del self._records[account]
            return None
        if record is not None and record.refresh_token is not None:
            spent = self._spent.get(account, {})
            if spent.get(fingerprint(record.refresh_token.get_secret_value()), 0) > time.time():
                return replace(record, refresh_token=None)
        return record

    async def load_many(self, accounts: Sequence[str]) -> dict[str, TokenRecord | None]:
        """Each account's record as `load` gives it."""
        return {account: await self.load(account) for account in accounts}

    async def save(
        self,
        account: str,
        record: TokenRecord,
        *,
        lock: str | None = None,
        spends: Spent | None = None,
    ) -> Saved:
        """Keep `record` unless it is expired, a record of equal or higher version is kept, or
        `lock` is given and no longer held with it."""
        if lock is not None and not self._holds(account, lock):
            return Saved(written=False)
        current = await self.load(account)
        if record.expires_at <= time.time() or (
            current is not None and current.version >= record.version
        ):
            return Saved(written=False)
        self._records[account] = record
        if spends is not None:
            await self.remember_spent(account, [spends])
        change = Change(account=account, version=record.version)
        for queue in self._subscribers:
            queue.put_nowait(change)
        return Saved(written=True)

    async def versions(self, accounts: Sequence[str]) -> dict[str, int]:
        """The kept version per account, 0 where there is none."""
        found = {account: await self.load(account) for account in accounts}
        return {
            account: 0 if record is None else record.version for account, record in found.items()
        }

    async def remember_spent(self, account: str, spent: Sequence[Spent]) -> None:
        """Remember refresh tokens as spent, each until its `until`."""
        now = time.time()
        kept = {fp: until for fp, until in self._spent.get(account, {}).items() if until > now}
        for item in spent:
            if item.until:
                kept[item.fingerprint] = max(kept.get(item.fingerprint, 0.0), item.until)
            else:
                kept.pop(item.fingerprint, None)
        self._spent[account] = kept

    async def changes(self) -> AsyncIterator[Change]:
        """Every save from now on, in order; ends when the store closes."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (change := await queue.get()) is not None:
                yield change
        finally:
            self._subscribers.discard(queue)

    async def acquire_lock(self, account: str, lease_seconds: float) -> str | None:
        """Take the account's lock for `lease_seconds`; its release token, or None if held."""
        now = time.monotonic()
        held = self._locks.get(account)
        if held is not None and held[1] > now:
            return None
        token = secrets.token_hex(16)
        self._locks[account] = (token, now + lease_seconds)
        return token

    async def release_lock(self, account: str, token: str) -> None:
        """Release the lock if `token` still holds it."""
        if self._holds(account, token):
            del self._locks[account]

    async def extend_lock(self, account: str, token: str, lease_seconds: float) -> bool:
        """Renew the lease of the lock `token` holds; False if it is no longer held with it."""
        if not self._holds(account, token):
            return False
        self._locks[account] = (token, time.monotonic() + lease_seconds)
        return True

    def _holds(self, account: str, token: str) -> bool:
        held = self._locks.get(account)
        return held is not None and held[0] == token and held[1] > time.monotonic()

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
        """0.0 if a unit of `scope`'s budget was granted, else the seconds to wait; `account`
        queued at `priority` as in the Redis store."""
        limit -= reserve
        now = time.monotonic()
        queue = self._queues.setdefault(scope, {})
        seen = self._seen.setdefault(scope, {})
        register = bool(account) and enqueue
        if register:
            queue[account] = min(priority, queue.get(account, priority))
            seen[account] = now
        for member, at in list(seen.items()):
            if at < now - QUEUE_STALE_SECONDS:
                del seen[member]
                queue.pop(member, None)
        cooling = self._cool_until.get(scope, 0.0) - now
        if cooling > 0:
            return cooling
        grants = self._grants.setdefault(scope, deque())
        # A grant exactly one period old still counts, as in the Redis store.
        while grants and grants[0] < now - period_seconds:
            grants.popleft()
        rank = 0
        if register:
            # Equal priorities are ordered by name, as in a Redis sorted set.
            rank = sum(
                (score, member) < (queue[account], account) for member, score in queue.items()
            )
        elif account:
            rank = sum(score < priority for score in queue.values())
        count = len(grants)
        if register and queue[account] < priority:
            pace = 0.0  # hastened by a caller's claim, which is never paced
        paced_until = grants[-1] + pace if grants and pace > 0 else now
        if rank < limit - count and paced_until <= now:
            grants.append(now)
            if register:
                del queue[account], seen[account]
            return 0.0
        shortest = QUEUE_POLL_SECONDS if account else 0.001
        if not grants:
            return max(shortest, period_seconds)
        if rank < limit - count:
            return max(shortest, paced_until - now)
        frees_at = grants[min(count - 1, count - limit + rank)] + period_seconds
        return max(shortest, frees_at - now, paced_until - now)

    async def hasten(self, scope: str, account: str, priority: float) -> None:
        """Lower the priority of `account`'s queued claim to `priority`, if it is queued."""
        queue = self._queues.get(scope, {})
        if account in queue:
            queue[account] = min(queue[account], priority)

    async def cool_down(self, scope: str, seconds: float) -> None:
        """Grant no budget of `scope` for `seconds`, unless a longer cool-down is in force."""
        until = time.monotonic() + seconds
        self._cool_until[scope] = max(self._cool_until.get(scope, 0.0), until)

    async def take_forced(
        self, account: str, caller: str, interval_seconds: float, *, report: str = ""
    ) -> float:
        """0.0 if `caller` may force a renewal of `account` now (and it is counted), else the
        seconds until it may; reports of the same token (`report`) count once."""
        now = time.monotonic()
        allowed_at, charged = self._forced.get((account, caller), (0.0, ""))
        if allowed_at > now:
            return 0.0 if report and report == charged else allowed_at - now
        self._forced[account, caller] = (now + interval_seconds, report)
        return 0.0

    async def epoch(self) -> str:
        """Always the same: this store lives and dies with the process."""
        return _EPOCH

    async def load_failure(self, account: str) -> FailureRecord | None:
        """The account's credentials-rejected marker, if one is in force."""
        failure = self._failures.get(account)
        if failure is not None and failure.retry_at <= time.time():
            del self._failures[account]
            return None
        return failure

    async def save_failure(self, account: str, failure: FailureRecord) -> None:
        """Record rejected credentials until `failure.retry_at` (nothing if that has passed)."""
        if failure.retry_at > time.time():
            self._failures[account] = failure

    async def clear_failure(self, account: str) -> None:
        """Forget the account's credentials-rejected marker."""
        self._failures.pop(account, None)

    async def reset(self, account: str) -> None:
        """Forget the account's marker and tell every subscriber of the reset."""
        await self.clear_failure(account)
        for queue in self._subscribers:
            queue.put_nowait(Change(account=account, version=0, reset=True))

    @property
    def address(self) -> str:
        """This process."""
        return "memory://"

    async def topology(self) -> Survey:
        """One node: this process."""
        return Survey("memory", {"in-process": MasterState(_EPOCH, 0)}, 1)

    async def close(self) -> None:
        """End every change iterator."""
        for queue in self._subscribers:
            queue.put_nowait(None)
