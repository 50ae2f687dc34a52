"""Renews every account ahead of expiry, in every replica (broker.md rule 5).

Each account is renewed at the cached token's refresh point (`fraction` of its lifetime, plus
random jitter so replicas and accounts do not align). One task keeps every account's next
wake-up in a heap and starts a renewal, a task of its own while it runs, when one comes; an
account that changes meanwhile (a new token, reloaded credentials, an operator's reset) is
looked at again at once. The broker's lock and re-check make sure only the first replica to
wake calls Monogoto; the others find the new record and go back to sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Collection
from dataclasses import dataclass

from service.broker.core import TokenBroker
from service.broker.model import BrokerError, CredentialsRejectedError
from service.config import RefreshSettings

log = logging.getLogger(__name__)

# Jitter spreads wake-ups over this share of the lifetime (never past the need for a new token).
JITTER_FRACTION = 0.05
RETRY_MIN_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


@dataclass(slots=True)
class _Account:
    """One account's place in the schedule."""

    # Wake-ups queued in the heap under another generation are stale.
    generation: int = 0
    # Renewals failed in a row (the back-off grows with them).
    failures: int = 0
    # The next wake-up ends the pause after a failed renewal (rather than start one).
    pausing: bool = False
    # The account changed while its renewal ran: no pause after it.
    changed: bool = False
    renewal: asyncio.Task[None] | None = None


class Refresher:
    """One task for every account, and one more per renewal in progress."""

    def __init__(self, broker: TokenBroker, refresh: RefreshSettings) -> None:
        self._broker = broker
        self.refresh = refresh
        self._accounts: dict[str, _Account] = {}
        # (when on the loop's clock, generation, account), the earliest first.
        self._heap: list[tuple[float, int, str]] = []
        # Accounts that changed since the task last looked.
        self._changed: set[str] = set()
        self._wake = asyncio.Event()
        self._stopped = False
        broker.watch(self._account_changed)

    def next_refresh_in(self, account: str) -> float:
        """Seconds until this replica should try to renew `account`'s cached token."""
        token = self._broker.state(account).token
        if token is None or self._broker.needs_verification(account):
            return 0.0
        record = token.record
        refresh_at = self._broker.refresh_point(record)
        # Jitter only delays, and by at most half the time still left before expiry.
        spread = min(
            JITTER_FRACTION * record.lifetime, max(0.0, record.expires_at - refresh_at) / 2
        )
        # S311: jitter spreads replicas apart; it needs no cryptographic randomness.
        wake_at = refresh_at + random.uniform(0, spread)  # noqa: S311
        return max(0.0, wake_at - time.time())

    def follow(self, accounts: Collection[str]) -> None:
        """Renew exactly `accounts` from now on: a removed account's renewal in progress is
        cancelled, an added one is looked at at once."""
        for account in self._accounts.keys() - set(accounts):
            renewal = self._accounts.pop(account).renewal
            if renewal is not None:
                renewal.cancel()
        for account in accounts:
            if account not in self._accounts:
                self._accounts[account] = _Account()
                self._changed.add(account)
        self._wake.set()

    def stop(self) -> list[asyncio.Task[None]]:
        """Start no more renewals; the renewals in progress (to cancel)."""
        self._stopped = True
        return [entry.renewal for entry in self._accounts.values() if entry.renewal is not None]

    def _account_changed(self, account: str) -> None:
        entry = self._accounts.get(account)
        if entry is None:
            return
        if entry.renewal is not None:
            entry.changed = True
        else:
            self._changed.add(account)
            self._wake.set()

    async def run_forever(self) -> None:
        """Start each account's renewal when it is due, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            changed, self._changed = self._changed, set()
            for account in changed:
                entry = self._accounts.get(account)
                # A renewal in progress looks again when it ends.
                if entry is not None and entry.renewal is None:
                    # A change ends a pause early: its refresh point moved, or it was reset.
                    entry.pausing = False
                    self._schedule(account, entry)
            now = loop.time()
            while self._heap and self._heap[0][0] <= now:
                _, generation, account = heapq.heappop(self._heap)
                entry = self._accounts.get(account)
                if entry is None or entry.generation != generation or entry.renewal is not None:
                    continue  # removed, or looked at again since
                if entry.pausing:
                    entry.pausing = False
                    self._schedule(account, entry)
                else:
                    self._start(account, entry)
            timeout = self._heap[0][0] - loop.time() if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _schedule(self, account: str, entry: _Account) -> None:
        """Wake up at the account's refresh point, or renew it now if that has come."""
        delay = self.next_refresh_in(account)
        if delay > 0:
            self._wake_in(account, entry, delay)
        else:
            self._start(account, entry)

    def _wake_in(self, account: str, entry: _Account, delay: float) -> None:
        entry.generation += 1
        when = asyncio.get_running_loop().time() + delay
        heapq.heappush(self._heap, (when, entry.generation, account))
        if len(self._heap) > 2 * len(self._accounts) + 64:
            # Stale wake-ups (accounts looked at again, or removed) would pile up.
            self._heap = [item for item in self._heap if self._current(item)]
            heapq.heapify(self._heap)

    def _current(self, item: tuple[float, int, str]) -> bool:
        entry = self._accounts.get(item[2])
        return entry is not None and entry.generation == item[1]

    def _start(self, account: str, entry: _Account) -> None:
        if self._stopped:
            return
        entry.generation += 1  # any wake-up still queued is stale
        entry.changed = False
        entry.renewal = asyncio.create_task(self._renew(account, entry))

    async def _renew(self, account: str, entry: _Account) -> None:
        try:
            pause = await self._attempt(account, entry)
        finally:
            entry.renewal = None
        if self._accounts.get(account) is not entry:
            return  # removed meanwhile
        if pause is None or entry.changed:
            # Renewed, or changed since the attempt began (a new token elsewhere, reloaded
            # credentials, an operator's reset of the back-off): no pause.
            self._schedule(account, entry)
        else:
            entry.pausing = True
            self._wake_in(account, entry, pause)
        self._wake.set()

    async def _attempt(self, account: str, entry: _Account) -> float | None:
        """Renew `account` once: None when that went well, else how long to pause."""
        try:
            await self._broker.refresh(account)
        except CredentialsRejectedError as error:
            return error.retry_after or self.refresh.rejected_backoff_seconds
        except BrokerError as error:
            entry.failures += 1
            return self._retry_delay(entry.failures, error.retry_after)
        except Exception:
            entry.failures += 1
            log.exception("refresh failed unexpectedly", extra={"account": account})
            return self._retry_delay(entry.failures, None)
        entry.failures = 0
        return None

    @staticmethod
    def _retry_delay(failures: int, retry_after: float | None) -> float:
        backoff = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (failures - 1))
        # S311: as above, jitter only.
        jittered = random.uniform(backoff / 2, backoff)  # noqa: S311
        return max(jittered, retry_after or 0.0)
