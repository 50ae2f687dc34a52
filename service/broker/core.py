"""TokenBroker: local cache, shared store, and one upstream call per need (DESIGN rules 1-3)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.broker.model import (
    AccountView,
    InvalidRequestError,
    IssuedToken,
    Outcome,
    UpstreamUnavailableError,
)
from service.broker.renewer import Renewer
from service.broker.state import AccountState
from service.claims import fingerprint
from service.config import Account, RefreshSettings
from service.metrics import LOCK_WAIT, STORE_ERRORS
from service.store import StoreUnavailableError, TokenRecord, TokenStore
from service.upstream import MonogotoClient

log = logging.getLogger(__name__)

Wanted = Callable[[TokenRecord], bool]

# How often a replica waiting for another's login re-reads the store when no notification comes.
POLL_SECONDS = 0.25
# What a caller is told to wait when the store is down and there is no valid token.
STORE_RETRY_AFTER_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Timing:
    """How long the lock protects one upstream renewal, and how long others wait for it."""

    lease_seconds: float
    wait_seconds: float


class TokenBroker:
    """Hands out valid tokens: from this process's cache, from the store, or from Monogoto."""

    def __init__(
        self,
        accounts: dict[str, Account],
        refresh: RefreshSettings,
        store: TokenStore,
        client: MonogotoClient,
        timing: Timing,
    ) -> None:
        self._accounts = accounts
        self._refresh = refresh
        self._store = store
        self._client = client
        self._timing = timing
        self._names = tuple(accounts)
        self._states = {name: AccountState() for name in accounts}
        self._renewer = Renewer(accounts, refresh, store, client, self._states)
        self._flights: dict[str, asyncio.Future[tuple[TokenRecord, Outcome]]] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The configured account names."""
        return self._names

    def state(self, account: str) -> AccountState:
        """This process's view of `account` (KeyError if it is not configured)."""
        return self._states[account]

    async def get(self, account: str, *, min_ttl: float = 0.0) -> IssuedToken:
        """A token of `account` with at least max(min_ttl, min_remaining) seconds left."""
        state = self._states[account]
        need = max(min_ttl, self._refresh.min_remaining_seconds)
        local = state.token
        if local is not None and local.expires_at - time.time() >= need:
            return local.issue(Outcome.LOCAL)
        if local is not None and min_ttl > local.record.lifetime:
            raise InvalidRequestError(
                f"min_ttl exceeds this account's token lifetime ({local.record.lifetime:.0f} s)"
            )
        record, outcome = await self._obtain(
            account, lambda record: record.expires_at - time.time() >= need, take_fetched=True
        )
        issued = state.adopt(account, record).issue(outcome)
        if min_ttl > record.lifetime:
            raise InvalidRequestError(
                f"min_ttl exceeds this account's token lifetime ({record.lifetime:.0f} s)"
            )
        return issued

    async def invalidate(self, account: str, access_token: str) -> IssuedToken:
        """Replace `access_token` if it is still current; else return the current token."""
        state = self._states[account]
        local = state.token
        if local is not None and local.access_token != access_token and local.usable(self._need):
            return local.issue(Outcome.LOCAL)
        log.info(
            "token reported as rejected",
            extra={"account": account, "token": fingerprint(access_token)},
        )
        record, outcome = await self._obtain(
            account,
            lambda record: (
                record.access_token.get_secret_value() != access_token
                and record.expires_at - time.time() >= self._need
            ),
        )
        return state.adopt(account, record).issue(outcome)

    async def refresh(self, account: str) -> Outcome:
        """Renew `account` if its token is due (or missing); SHARED if another replica did."""
        record, outcome = await self._obtain(account, lambda record: not self.due(record))
        self._states[account].adopt(account, record)
        return outcome

    def refresh_point(self, record: TokenRecord) -> float:
        """When a record is due: at `fraction` of its lifetime, earlier if that would leave less
        than `min_remaining_seconds`, but never before half that point (a misconfigured minimum
        longer than the lifetime must not turn into a login loop)."""
        fraction_point = self._refresh.fraction * record.lifetime
        by_minimum = record.lifetime - self._need
        return record.obtained_at + max(fraction_point / 2, min(fraction_point, by_minimum))

    def due(self, record: TokenRecord) -> bool:
        """Whether a record has reached its refresh point."""
        return time.time() >= self.refresh_point(record)

    def accounts(self) -> list[AccountView]:
        """Every configured account's state."""
        return [
            self._states[name].view(name, account.dialect)
            for name, account in self._accounts.items()
        ]

    def accept(self, account: str, record: TokenRecord) -> bool:
        """Take a record another replica wrote, if it is newer than ours; whether it was."""
        state = self._states.get(account)
        if state is None or not state.newer(record):
            return False
        state.adopt(account, record)
        return True

    @property
    def _need(self) -> float:
        return self._refresh.min_remaining_seconds

    async def _obtain(
        self, account: str, wanted: Wanted, *, take_fetched: bool = False
    ) -> tuple[TokenRecord, Outcome]:
        """One in-flight obtain per account in this process; late callers share its result.

        A joiner whose `wanted` the shared result does not meet starts the next round, unless
        `take_fetched` and the result came from Monogoto just now: a token that new is as good
        as any will be, and asking again would only repeat the call.
        """
        while True:
            flight = self._flights.get(account)
            # A finished flight not yet cleared away must not be joined: its result is final,
            # and awaiting it again would spin without ever yielding to the loop.
            if flight is None or flight.done():
                flight = asyncio.ensure_future(self._obtain_once(account, wanted))
                self._flights[account] = flight
                flight.add_done_callback(lambda done: self._landed(account, done))
                # shield: a caller hanging up must not cancel the work others are waiting for.
                return await asyncio.shield(flight)
            record, outcome = await asyncio.shield(flight)
            # Never take_fetched for a replacement: a flight that began before the report may
            # have fetched the very token being reported.
            if wanted(record) or (take_fetched and outcome is Outcome.FETCHED):
                return record, outcome

    def _landed(self, account: str, flight: asyncio.Future[tuple[TokenRecord, Outcome]]) -> None:
        if self._flights.get(account) is flight:
            del self._flights[account]
        # Everyone who waited may have hung up; the outcome is already logged and counted.
        if not flight.cancelled():
            flight.exception()

    def cancel_flights(self) -> None:
        """Cancel every obtain in progress (shutdown: nobody is left to wait for them)."""
        for flight in list(self._flights.values()):
            flight.cancel()

    async def _obtain_once(self, account: str, wanted: Wanted) -> tuple[TokenRecord, Outcome]:
        try:
            record = await self._store.load(account)
            if record is not None and wanted(record):
                return record, Outcome.SHARED
            await self._renewer.check_rejected(account)
            held = await self._lock(account, wanted)
            if isinstance(held, TokenRecord):
                return held, Outcome.SHARED
            return await self._obtain_locked(account, wanted, held)
        except StoreUnavailableError:
            return self._without_store(account, wanted)

    async def _obtain_locked(
        self, account: str, wanted: Wanted, lock: str
    ) -> tuple[TokenRecord, Outcome]:
        state = self._states[account]
        state.refreshing = True
        try:
            record = await self._store.load(account)  # re-check: someone may just have written
            if record is not None and wanted(record):
                return record, Outcome.SHARED
            await self._renewer.check_rejected(account)
            return await self._renewer.renew(account, record), Outcome.FETCHED
        finally:
            state.refreshing = False
            await self._release(account, lock)

    async def _lock(self, account: str, wanted: Wanted) -> str | TokenRecord:
        """Take the account's lock (its release token), or wait for the holder's record.

        A holder that died leaves the lock to expire with its lease, and then a waiter takes it.
        """
        state = self._states[account]
        started = time.monotonic()
        deadline = started + self._timing.wait_seconds
        try:
            while True:
                changed = state.changed
                lock = await self._store.acquire_lock(account, self._timing.lease_seconds)
                if lock is not None:
                    return lock
                if state.token is not None and wanted(state.token.record):
                    return state.token.record
                record = await self._store.load(account)
                if record is not None and wanted(record):
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamUnavailableError(
                        "another replica is still obtaining this account's token",
                        retry_after=POLL_SECONDS * 4,
                    )
                try:
                    async with asyncio.timeout(min(POLL_SECONDS, remaining)):
                        await changed.wait()
                except TimeoutError:
                    pass
        finally:
            LOCK_WAIT.observe(time.monotonic() - started)

    def _without_store(self, account: str, wanted: Wanted) -> tuple[TokenRecord, Outcome]:
        """Static stability: no store means no lock and no budget, so no upstream call; serve
        what this process has if it will do."""
        STORE_ERRORS.labels("obtain").inc()
        state = self._states[account]
        if state.token is not None and wanted(state.token.record):
            return state.token.record, Outcome.LOCAL
        self._renewer.raise_if_rejected(account)
        raise UpstreamUnavailableError(
            "no valid token, and the token store is unavailable",
            retry_after=STORE_RETRY_AFTER_SECONDS,
        )

    async def _release(self, account: str, lock: str) -> None:
        try:
            await self._store.release_lock(account, lock)
        except StoreUnavailableError:
            STORE_ERRORS.labels("release_lock").inc()  # the lease will expire on its own
