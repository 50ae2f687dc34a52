"""Keeps this process's cache in step with the store (broker.md rule 9).

Two paths, because pub/sub messages are lost while a connection is down: a subscription that
pulls a record as soon as another replica publishes it, and a poll of every account's version
once a second that catches whatever the subscription missed.

The poll also trusts nothing the store says about the past: it writes locally held records back
to a store that holds older ones or none (restarted, restored from an older snapshot, failed
over), so the fleet needs no new logins and never goes back to a spent refresh token; and when
the store's epoch changes, it re-seeds the spent refresh tokens and rejections this process
knows of (the store holds the auth budget back by itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from service.broker.core import TokenBroker
from service.metrics import STORE_ERRORS, STORE_FAILOVERS
from service.store import StoreUnavailableError, TokenStore

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 1.0
# Records read in one round trip when many are newer than ours (at start-up, all of them).
PULL_BATCH = 200
RESUBSCRIBE_MIN_SECONDS = 0.5
RESUBSCRIBE_MAX_SECONDS = 5.0


class StoreSync:
    """The subscription and the version poll, as two background tasks."""

    def __init__(self, broker: TokenBroker, store: TokenStore) -> None:
        self._broker = broker
        self._store = store
        self.store_ok = True
        # Versions whose record would not load (e.g. sealed with a key we lack): not re-read
        # every second; a newer version is tried again.
        self._unreadable: dict[str, int] = {}
        self._stopped = False
        self._epoch = ""

    def retry_unreadable(self) -> None:
        """Load records that would not load again (the key ring changed)."""
        self._unreadable.clear()

    def stop(self) -> None:
        """Make the background loops end at their next turn."""
        self._stopped = True

    async def pull(self, account: str, version: int) -> None:
        """Load `account`'s record, stored at `version`, and cache it if it is newer than ours."""
        await self.pull_many([(account, version)])

    async def pull_many(self, stored: Sequence[tuple[str, int]]) -> None:
        """`pull` for each (account, version), the records read PULL_BATCH at a time (one round
        trip each)."""
        wanted = [(account, v) for account, v in stored if self._unreadable.get(account) != v]
        for start in range(0, len(wanted), PULL_BATCH):
            batch = wanted[start : start + PULL_BATCH]
            records = await self._store.load_many([account for account, _ in batch])
            for account, version in batch:
                record = records[account]
                if record is None:
                    self._unreadable[account] = version
                elif self._broker.accept(account, record):
                    log.debug("cache updated from store", extra={"account": account})

    async def poll_once(self) -> None:
        """Check the store's epoch, then compare every account's stored version with ours:
        pull newer records, write back ours where the store's is older or gone."""
        epoch = await self._store.epoch()
        if self._epoch and epoch != self._epoch:
            STORE_FAILOVERS.inc()
            survey = await self._store.topology()
            log.warning(
                "token store restarted or failed over; restoring what this replica knows "
                "and holding the auth budget back for one window",
                extra={"topology": survey.kind, "masters": sorted(survey.masters)},
            )
            await self._broker.reseed()
        self._epoch = epoch
        stored = await self._store.versions(self._broker.names)
        self.store_ok = True
        newer: list[tuple[str, int]] = []
        for account, version in stored.items():
            state = self._broker.find(account)
            if state is None:
                continue  # removed by a config reload meanwhile
            if version > state.version:
                newer.append((account, version))
            elif version < state.version:
                await self._broker.restore(account)
        await self.pull_many(newer)

    async def poll_forever(self) -> None:
        """Run `poll_once` every second; a store outage is noted and waited out."""
        while not self._stopped:
            try:
                await self.poll_once()
            except StoreUnavailableError as error:
                if self.store_ok:
                    log.warning(
                        "token store unavailable; serving cached tokens",
                        extra={"store": self._store.address, "reason": error.reason},
                    )
                self.store_ok = False
                STORE_ERRORS.labels("poll").inc()
            await asyncio.sleep(POLL_INTERVAL_SECONDS)

    async def listen_forever(self) -> None:
        """Follow published changes, resubscribing with backoff when the connection drops."""
        backoff = RESUBSCRIBE_MIN_SECONDS
        while not self._stopped:
            try:
                async for change in self._store.changes():
                    backoff = RESUBSCRIBE_MIN_SECONDS
                    if change.reset and change.account in self._broker.names:
                        log.info(
                            "account reset by an operator; back-off cleared",
                            extra={"event": "account.reset_seen", "account": change.account},
                        )
                        self._broker.forget_failures(change.account)
                    elif change.account in self._broker.names and (
                        change.version > self._broker.state(change.account).version
                    ):
                        await self.pull(change.account, change.version)
            except StoreUnavailableError:
                STORE_ERRORS.labels("subscribe").inc()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESUBSCRIBE_MAX_SECONDS)
