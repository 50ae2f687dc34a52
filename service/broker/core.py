"""TokenBroker: local cache, shared store, and one upstream call per need (broker.md rules 1-3)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from service.broker.budget import CLAIM, Claim, SupersededError, Urgency, budget_scope
from service.broker.model import (
    AccountView,
    CredentialsRejectedError,
    CredentialsStatus,
    InvalidRequestError,
    IssuedToken,
    Outcome,
    RenewalRateLimitedError,
    UnknownAccountError,
    UpstreamUnavailableError,
)
from service.broker.plan import SAFETY_MARGIN_SECONDS, refresh_offset, used_lately
from service.broker.renewer import Renewer
from service.broker.state import AccountState
from service.claims import fingerprint
from service.config import Account, RefreshSettings
from service.metrics import LOCK_WAIT, STORE_ERRORS, AccountGauges
from service.store import (
    StoreUnavailableError,
    TokenRecord,
    TokenStore,
    credentials_fingerprint,
)
from service.upstream import MonogotoClient

log = logging.getLogger(__name__)

Wanted = Callable[[TokenRecord], bool]

# How often a replica waiting for another's login re-reads the store when no notification comes.
POLL_SECONDS = 0.25
# What a caller is told to wait when the store is down and there is no valid token.
STORE_RETRY_AFTER_SECONDS = 5.0
# What a caller is told to wait when its request outlived `api.max_wait_seconds`: the renewal
# goes on meanwhile, and usually ends within a few seconds.
STILL_OBTAINING_RETRY_AFTER_SECONDS = 5.0
# A caller may force one renewal of an account per this interval (Monogoto's own window).
FORCED_RENEWAL_INTERVAL_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Verified:
    """The outcome of an operator's verification: `credentials` is `verified` or `rejected`."""

    account: str
    credentials: CredentialsStatus
    detail: str


@dataclass(frozen=True, slots=True)
class Timing:
    """How the lock protects one upstream renewal, and how long others wait for it.

    The lease is short and renewed by its holder's watchdog every `lease_seconds / 3` while it
    works, so a holder that dies holds the others up for one lease at most. Waiters (the obtain
    tasks, not callers: a caller waits `max_wait_seconds` at most) give up after
    `wait_seconds`, the longest a live holder can take.
    """

    lease_seconds: float
    wait_seconds: float
    max_wait_seconds: float = 10.0


def _nothing_given_up(_: str) -> bool:
    return False


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
        # Told the name of each account that changes (`watch`).
        self._watchers: list[Callable[[str], None]] = []
        self._changed = self._tell_watchers  # one bound method, shared by every state
        self._states = {name: self._new_state(name, account) for name, account in accounts.items()}
        self._renewer = Renewer(accounts, refresh, store, client, self._states)
        # Per account: the obtain in flight, and the caller it charges a forced renewal to.
        self._flights: dict[str, tuple[asyncio.Future[tuple[TokenRecord, Outcome]], str | None]]
        self._flights = {}
        # Whether the renewal plan gives an account up (set by the plan's monitor, if any).
        self.given_up: Callable[[str], bool] = _nothing_given_up
        # Per account: the claim on the auth budget of the obtain in flight.
        self._claims: dict[str, Claim] = {}

    def apply(self, accounts: dict[str, Account], refresh: RefreshSettings, timing: Timing) -> None:
        """Take a reloaded configuration at once (no request waits for it).

        A removed account's renewal in progress is cancelled and its requests get 403, like an
        unknown account's; an added one starts without a token. An account whose credentials
        changed forgets the rejection and back-off of the old ones in this process (the shared
        rejection marker names the credentials it applies to) and, unless its current token was
        obtained with the new ones, has them verified at once by one login, which the account's
        lock and the shared budget make one for the whole fleet. Everyone waiting for a change
        looks again: refresh points may have moved.
        """
        for name in self._accounts.keys() - accounts.keys():
            flight, _ = self._flights.get(name, (None, None))
            if flight is not None:
                flight.cancel()
            del self._states[name]
        for name, account in accounts.items():
            credentials = credentials_fingerprint(account.username, account.password)
            state = self._states.get(name)
            if state is None:
                self._states[name] = self._new_state(name, account)
            elif credentials != state.credentials:
                log.info(
                    "account credentials changed; verifying them",
                    extra={"event": "credentials.changed", "account": name},
                )
                state.credentials_changed(name, credentials)
        self._accounts, self._names = accounts, tuple(accounts)
        self._refresh, self._timing = refresh, timing
        self._renewer.apply(accounts, refresh)
        for name, state in self._states.items():
            state.notify(name)

    def _new_state(self, name: str, account: Account) -> AccountState:
        """The state of a newly configured account, its gauges published."""
        credentials = credentials_fingerprint(account.username, account.password)
        state = AccountState(credentials, on_change=self._changed)
        state.publish(name)
        return state

    def gauges(self) -> list[AccountGauges]:
        """Every configured account's per-account metrics as they are now (the metrics
        exposition may read them from another thread: the accounts are copied first)."""
        return [state.gauges(name) for name, state in list(self._states.items())]

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call `callback` with the account's name whenever an account changes (its token, its
        credentials, its rejection or back-off, or the config)."""
        self._watchers.append(callback)

    def _tell_watchers(self, account: str) -> None:
        for callback in self._watchers:
            callback(account)

    @property
    def names(self) -> tuple[str, ...]:
        """The configured account names."""
        return self._names

    def state(self, account: str) -> AccountState:
        """This process's view of `account` (KeyError if it is not configured)."""
        return self._states[account]

    def find(self, account: str) -> AccountState | None:
        """This process's view of `account`, None if it is not configured."""
        return self._states.get(account)

    def _state(self, account: str) -> AccountState:
        """`state`, for a request: UnknownAccountError (403) if the account is not configured
        (a reload removed it after the caller was authorised)."""
        try:
            return self._states[account]
        except KeyError:
            raise UnknownAccountError from None

    async def get(
        self, account: str, *, min_ttl: float = 0.0, caller: str | None = None
    ) -> IssuedToken:
        """A token of `account` with at least max(min_ttl, min_remaining) seconds left.

        A renewal that only `min_ttl` calls for (the current token is still good by the
        broker's own rules) is forced: if it comes to an upstream call, that call is charged
        to `caller` (429 when it already forced one lately).
        """
        state = self._state(account)
        need = max(min_ttl, self._refresh.min_remaining_seconds)
        local = state.token
        now = time.time()
        if local is not None and local.good_until - now >= need:
            state.last_read = now
            return local.issue(Outcome.LOCAL)
        if local is not None:
            self._check_reachable(min_ttl, local.record)
        forced = local is not None and self._keeps(local.record)
        claim = Claim(Urgency.FORCED, now) if forced else self._caller_claim(account, now)
        record, outcome = await self._waited(
            self._obtain(
                account,
                lambda record: record.usable_until - time.time() >= need,
                claim,
                take_fetched=True,
                forced_by=(caller or "") if forced else None,
            )
        )
        self._check_reachable(min_ttl, record)
        issued = self._issue(account, record, outcome)
        state.last_read = time.time()
        if forced and outcome is Outcome.FETCHED:
            return replace(issued, forced=True)
        return issued

    async def invalidate(
        self, account: str, access_token: str, *, caller: str | None = None
    ) -> IssuedToken:
        """Replace `access_token` if it is still current; else return the current token.

        Reporting a token that is still good by the broker's own rules forces a renewal: it is
        charged to `caller` first (429 if it already forced one lately; the token is then not
        revoked). Then the token is revoked, here at once and for every replica through the
        store, before anything else can fail: it is never served again, whether or not a
        replacement comes.
        """
        state = self._state(account)
        local = state.token
        if local is not None and local.access_token != access_token and local.usable(self._need):
            return local.issue(Outcome.LOCAL)
        log.info(
            "token reported as rejected",
            extra={"account": account, "token": fingerprint(access_token)},
        )
        if local is not None and local.access_token == access_token and self._keeps(local.record):
            await self._charge(account, caller or "", report=fingerprint(access_token))
        await self._revoke(account, access_token)
        record, outcome = await self._waited(
            self._obtain(
                account,
                lambda record: (
                    record.access_token.get_secret_value() != access_token
                    and record.usable_until - time.time() >= self._need
                ),
                self._demand(time.time()),
                revoke=access_token,
            )
        )
        issued = self._issue(account, record, outcome)
        if issued.access_token == access_token:
            # Never answer a report with the token reported (e.g. a store gone back in time).
            raise UpstreamUnavailableError(
                "no replacement for the reported token yet",
                retry_after=STILL_OBTAINING_RETRY_AFTER_SECONDS,
            )
        return issued

    async def refresh(self, account: str) -> Outcome:
        """Renew `account` if its token is due (or missing), or if its configured credentials
        are still to be verified; SHARED if another replica did."""
        state = self._states[account]
        claim = self.renewal_claim(account)
        _, outcome = await self._obtain(
            account, lambda record: not self.due(record) and not state.needs_login(record), claim
        )
        return outcome

    def needs_verification(self, account: str) -> bool:
        """Whether the configured credentials of `account` are to be verified by a login now
        (they differ from those its current token was obtained with)."""
        state = self._states[account]
        return state.token is not None and state.needs_login(state.token.record)

    async def verify(self, account: str) -> Verified:
        """Log in with `account`'s configured credentials now (an operator asked), within the
        shared budget and under the account's lock; a login another task of this process or
        another replica makes meanwhile with the same credentials counts. Raises
        UpstreamUnavailableError when no answer can be had."""
        state = self._states[account]
        started = time.time()

        def verified(record: TokenRecord) -> bool:
            return record.credentials == state.credentials and record.obtained_at >= started

        try:
            # The operator waits for the answer as a caller waits for a token.
            claim = self._demand(started)
            await self._waited(self._obtain(account, verified, claim, verify=True))
        except CredentialsRejectedError as error:
            detail = error.detail
            if error.retry_after:
                detail += f"; not tried again for {error.retry_after:.0f} s unless reset"
            return Verified(account, CredentialsStatus.REJECTED, detail)
        return Verified(
            account, CredentialsStatus.VERIFIED, "Monogoto accepted the configured credentials"
        )

    async def reset(self, account: str) -> None:
        """Clear `account`'s rejection marker and back-off, in the store and, through a notice
        on the change channel, in every replica (an operator asked)."""
        try:
            await self._store.reset(account)
        except StoreUnavailableError:
            STORE_ERRORS.labels("reset").inc()
            raise UpstreamUnavailableError(
                "the token store is unavailable; the account cannot be reset now",
                retry_after=STORE_RETRY_AFTER_SECONDS,
            ) from None
        self.forget_failures(account)

    def forget_failures(self, account: str) -> None:
        """Clear this process's rejection and back-off of `account` (a reset was announced)."""
        self._states[account].clear_failures(account)

    def _caller_claim(self, account: str, now: float) -> Claim:
        """The claim of a caller that waits for `account`'s token: demand, unless the renewal
        plan gives the account up (past capacity), when it waits behind the renewals of the
        accounts kept, as their renewals do: the budget goes where the plan can keep tokens
        valid, and this caller gets 503 with the time until a unit may be free."""
        if self.given_up(account):
            return Claim(
                Urgency.IDLE,
                self.deadline(account),
                wait_until=now + self._timing.max_wait_seconds,
            )
        return self._demand(now)

    def _demand(self, now: float) -> Claim:
        """The claim of a caller that waits for a token: first come, first served, for as long
        as the caller waits."""
        return Claim(Urgency.DEMAND, now, wait_until=now + self._timing.max_wait_seconds)

    def deadline(self, account: str) -> float:
        """When `account`'s token must be renewed at the latest (wall clock): the cached token's
        expiry less `min_remaining_seconds` and a margin for the call; now if there is none."""
        token = self._states[account].token
        now = time.time()
        if token is None or not token.usable(0.0):
            return now
        # The plan's own deadline (plan.py), so the queue orders renewals as the plan does.
        return token.expires_at - self._need - SAFETY_MARGIN_SECONDS

    def renewal_claim(self, account: str) -> Claim:
        """A background renewal's claim: by deadline, after the renewals of accounts read lately
        if nobody read this one lately here (`plan.used_lately`). It waits for a unit until
        the token expires (callers of the account then wait with it), or for as long as a lock
        waiter would wait for it when there is no token."""
        state = self._states[account]
        now = time.time()
        token = state.token
        lifetime = None if token is None else token.record.lifetime
        idle = (
            not used_lately(state.last_read, lifetime, now)
            # Past capacity the plan gives some accounts up, and the queue agrees: their
            # renewals come after the others', so the failures stay with them.
            or self.given_up(account)
        )
        expires_at = 0.0 if token is None else token.expires_at
        return Claim(
            Urgency.IDLE if idle else Urgency.RENEWAL,
            self.deadline(account),
            wait_until=max(expires_at, now + self._timing.wait_seconds),
        )

    def _issue(self, account: str, record: TokenRecord, outcome: Outcome) -> IssuedToken:
        """The cached token after an obtain; 503 if it cannot be served (the store offered a
        record older than one this process knows, and the newer one is revoked)."""
        token = self._state(account).adopt(account, record)
        if not token.usable(0.0):
            raise UpstreamUnavailableError(
                "no valid token yet", retry_after=STILL_OBTAINING_RETRY_AFTER_SECONDS
            )
        return token.issue(outcome)

    @staticmethod
    def _check_reachable(min_ttl: float, record: TokenRecord) -> None:
        """400 for a `min_ttl` that no token of this account can meet: a new token has its
        whole lifetime left only at the instant it is issued."""
        if min_ttl >= record.lifetime:
            raise InvalidRequestError(
                f"min_ttl must be less than this account's token lifetime ({record.lifetime:.0f} s)"
            )

    def _keeps(self, record: TokenRecord) -> bool:
        """Whether the broker itself would keep serving `record` now (so renewing it is a
        caller's choice, not a need)."""
        return record.usable_until - time.time() >= self._need and not self.due(record)

    async def _revoke(self, account: str, access_token: str) -> None:
        """Mark `access_token` revoked if it is the current token: in this process at once, and
        in the store (compare-and-set, published) unless a newer record is there already; a
        store that cannot be reached gets it from the version poll later."""
        state = self._states[account]
        for _ in range(2):  # once more if another replica wrote the same version meanwhile
            try:
                record = await self._current(account)
            except StoreUnavailableError:
                STORE_ERRORS.labels("obtain").inc()
                record = None if state.token is None else state.token.record
            if (
                record is None
                or record.revoked
                or record.access_token.get_secret_value() != access_token
            ):
                return
            revoked = replace(record, revoked=True, version=record.version + 1)
            state.adopt(account, revoked)
            try:
                if await self._store.save(account, revoked):
                    return
            except StoreUnavailableError:
                STORE_ERRORS.labels("save").inc()
                return

    async def _charge(self, account: str, caller: str, *, report: str = "") -> None:
        """Count a forced renewal against `caller`; 429 if it already forced one lately. With
        `report` (the reported token's fingerprint), reports of that same token count once."""
        try:
            wait = await self._store.take_forced(
                account, caller, FORCED_RENEWAL_INTERVAL_SECONDS, report=report
            )
        except StoreUnavailableError:
            STORE_ERRORS.labels("take_forced").inc()
            raise UpstreamUnavailableError(
                "the token store is unavailable; the current token cannot be renewed now",
                retry_after=STORE_RETRY_AFTER_SECONDS,
            ) from None
        if wait > 0:
            raise RenewalRateLimitedError(
                "this caller already forced a renewal of this account within the last "
                f"{FORCED_RENEWAL_INTERVAL_SECONDS:.0f} s; the current token is still valid",
                retry_after=wait,
            )

    async def _waited(
        self, obtaining: Awaitable[tuple[TokenRecord, Outcome]]
    ) -> tuple[TokenRecord, Outcome]:
        """`obtaining`, for at most `max_wait_seconds`: then 503, while the obtain goes on."""
        try:
            async with asyncio.timeout(self._timing.max_wait_seconds):
                return await obtaining
        except TimeoutError:
            raise UpstreamUnavailableError(
                "the token is still being obtained; try again shortly",
                retry_after=STILL_OBTAINING_RETRY_AFTER_SECONDS,
            ) from None

    def refresh_point(self, record: TokenRecord) -> float:
        """When a record is due: at `fraction` of its lifetime, earlier if that would leave less
        than `min_remaining_seconds`, but never before half that point (a misconfigured minimum
        longer than the lifetime must not turn into a login loop)."""
        if record.revoked:
            return record.obtained_at
        return record.obtained_at + refresh_offset(
            record.lifetime, self._refresh.fraction, self._need
        )

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
        state.adopt(account, self._renewer.trusted(account, record))
        return True

    async def reseed(self) -> None:
        """Tell a store that lost data (restarted, rolled back, failed over) what this process
        knows: the refresh tokens it spent and the rejections in force. (Newer records are
        written back by the store sync's version poll.)"""
        await self._renewer.reseed()

    @property
    def _need(self) -> float:
        return self._refresh.min_remaining_seconds

    async def _obtain(
        self,
        account: str,
        wanted: Wanted,
        claim: Claim,
        *,
        take_fetched: bool = False,
        revoke: str | None = None,
        forced_by: str | None = None,
        verify: bool = False,
    ) -> tuple[TokenRecord, Outcome]:
        """One in-flight obtain per account in this process; late callers share its result,
        and its claim on the auth budget takes theirs where they are more urgent.

        A joiner whose `wanted` the shared result does not meet starts the next round, unless
        `take_fetched` and the result came from Monogoto just now: a token that new is as good
        as any will be, and asking again would only repeat the call. `forced_by` names the
        caller a renewal is charged to when it was forced (see `get`). With `verify`, the
        renewal is a login (see `verify`).
        """
        while True:
            flight, owner = self._flights.get(account, (None, None))
            # A finished flight not yet cleared away must not be joined: its result is final,
            # and awaiting it again would spin without ever yielding to the loop.
            if flight is None or flight.done():
                flight = asyncio.ensure_future(
                    self._obtain_once(
                        account, wanted, claim, revoke=revoke, forced_by=forced_by, verify=verify
                    )
                )
                self._flights[account] = (flight, forced_by)
                self._claims[account] = claim
                flight.add_done_callback(lambda done: self._landed(account, done))
                # shield: a caller hanging up must not cancel the work others are waiting for.
                return await self._shielded(account, flight)
            self._claims[account].join(claim)
            try:
                record, outcome = await self._shielded(account, flight)
            except RenewalRateLimitedError:
                if owner == forced_by:
                    raise
                continue  # another caller's allowance ran out: no answer for this request
            # Never take_fetched for a replacement: a flight that began before the report may
            # have fetched the very token being reported.
            if wanted(record) or (take_fetched and outcome is Outcome.FETCHED):
                return record, outcome

    async def _shielded(
        self, account: str, flight: asyncio.Future[tuple[TokenRecord, Outcome]]
    ) -> tuple[TokenRecord, Outcome]:
        """The flight's result; UnknownAccountError if a reload removed the account (which
        cancelled its flight)."""
        try:
            return await asyncio.shield(flight)
        except asyncio.CancelledError:
            if flight.cancelled() and account not in self._accounts:
                raise UnknownAccountError from None
            raise

    def _landed(self, account: str, flight: asyncio.Future[tuple[TokenRecord, Outcome]]) -> None:
        if self._flights.get(account, (None, None))[0] is flight:
            del self._flights[account]
            del self._claims[account]
        # Everyone who waited may have hung up; the outcome is already logged and counted.
        if not flight.cancelled():
            flight.exception()

    async def cancel_flights(self, within: float) -> None:
        """Cancel every obtain in progress (shutdown: nobody is left to wait for them) and wait
        up to `within` seconds for them to end: each still releases its account's lock, and
        none may use the store once it is closed (it would open a new connection nobody
        closes)."""
        flights = [flight for flight, _ in self._flights.values()]
        for flight in flights:
            flight.cancel()
        if flights:
            await asyncio.wait(flights, timeout=within)

    async def _obtain_once(
        self,
        account: str,
        wanted: Wanted,
        claim: Claim,
        *,
        revoke: str | None,
        forced_by: str | None,
        verify: bool = False,
    ) -> tuple[TokenRecord, Outcome]:
        # This task's own context: the budget sees how urgent its upstream attempts are.
        CLAIM.set(claim)
        try:
            record = await self._current(account)
            if record is not None and wanted(record):
                return self._adopted(account, record, Outcome.SHARED)
            await self._renewer.check_rejected(account)
            self._renewer.raise_if_backing_off(account)
            held = await self._lock(account, wanted)
            if isinstance(held, TokenRecord):
                return self._adopted(account, held, Outcome.SHARED)
            record, outcome = await self._obtain_locked(
                account, wanted, held, revoke, forced_by, verify=verify
            )
            return self._adopted(account, record, outcome)
        except StoreUnavailableError:
            return self._without_store(account, wanted)

    def _adopted(
        self, account: str, record: TokenRecord, outcome: Outcome
    ) -> tuple[TokenRecord, Outcome]:
        # Cached by the obtain itself, so a result nobody waits for any more still counts.
        self._states[account].adopt(account, record)
        return record, outcome

    async def _current(self, account: str) -> TokenRecord | None:
        """The newest record known: the store's, or this process's if the store's is older
        (it went back in time), which is then written back. A refresh token known to be
        spent is left out either way."""
        stored = await self._store.load(account)
        spent = None if stored is None else self._renewer.spent(account, stored)
        if stored is not None and spent is not None:
            # The store offers a refresh token this process spent: it forgot (went back in
            # time, or was told the token came back unsent). Remind it, for every replica.
            await self._store.remember_spent(account, [spent])
            stored = replace(stored, refresh_token=None)
        local = self._states[account].token
        if local is None or (stored is not None and stored.version >= local.record.version):
            return stored
        await self.restore(account)
        return local.record

    async def restore(self, account: str) -> bool:
        """Write this process's record back to a store that holds an older one (or none);
        whether it was written."""
        state = self._states.get(account)  # None once a reload removed the account
        token = None if state is None else state.token
        # An expired record would be refused anyway: no round trip for it every second.
        if token is None or token.expires_at <= time.time() + 1:
            return False
        # Two write-backs at once are harmless: the compare-and-set refuses the second.
        restored = bool(await self._store.save(account, token.record))
        if restored:
            log.warning(
                "token record restored to the store, which held an older one or none",
                extra={"account": account, "version": token.record.version},
            )
        return restored

    async def _obtain_locked(
        self,
        account: str,
        wanted: Wanted,
        lock: str,
        revoke: str | None,
        forced_by: str | None,
        *,
        verify: bool = False,
    ) -> tuple[TokenRecord, Outcome]:
        state = self._states[account]
        state.refreshing = True
        watchdog = asyncio.create_task(self._keep_lock(account, lock))
        try:
            record = await self._current(account)  # re-check: someone may just have written
            if record is not None and wanted(record):
                return record, Outcome.SHARED
            await self._renewer.check_rejected(account)
            if forced_by is not None:
                # Only now is it sure that the caller's request costs an upstream call.
                await self._charge(account, forced_by)
            # A report was charged and revoked before its obtain began (see `invalidate`), so a
            # flight that replaces a reported token is never a forced one.
            revoked = (
                revoke is not None
                and record is not None
                and record.access_token.get_secret_value() == revoke
            )
            verify = verify or (record is not None and state.needs_login(record))
            found: list[TokenRecord] = []

            async def still_needed() -> bool:
                """Re-checked while the renewal waits for budget (the store may have come
                back empty and had the record written back, another replica may have won)."""
                record = await self._current(account)
                if record is not None and wanted(record):
                    found.append(record)
                    return False
                return True

            claim = CLAIM.get()
            if claim is not None:
                claim.still_needed = still_needed
            try:
                renewed = await self._renewer.renew(
                    account, record, lock=lock, revoke=revoked, verify=verify
                )
            except SupersededError:
                return found[-1], Outcome.SHARED
            return renewed, Outcome.FETCHED
        finally:
            watchdog.cancel()
            state.refreshing = False
            await self._release(account, lock)

    async def _keep_lock(self, account: str, lock: str) -> None:
        """The holder's watchdog: renew the lease while the renewal runs."""
        lease = self._timing.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await self._store.extend_lock(account, lock, lease):
                    # Lost (it expired, or the store restarted): fenced writes now fail, and
                    # the spent refresh token is noted, so nothing is sent twice.
                    log.warning(
                        "lost the account's lock while renewing", extra={"account": account}
                    )
                    # An attempt still waiting for budget is not made: another replica may
                    # be renewing the account by now.
                    claim = CLAIM.get()
                    if claim is not None:
                        claim.withdraw()
                    return
            except StoreUnavailableError:
                STORE_ERRORS.labels("extend_lock").inc()

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
                await self._hasten(account)
                try:
                    async with asyncio.timeout(min(POLL_SECONDS, remaining)):
                        await changed.wait()
                except TimeoutError:
                    pass
        finally:
            LOCK_WAIT.observe(time.monotonic() - started)

    async def _hasten(self, account: str) -> None:
        """A caller waits for a renewal another replica holds the lock for: that renewal's
        claim on the budget becomes this caller's, if more urgent."""
        claim = CLAIM.get()
        if claim is None or claim.urgency is not Urgency.DEMAND:
            return
        scope = budget_scope(self._accounts[account].base_url)
        await self._store.hasten(scope, account, claim.priority)

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
