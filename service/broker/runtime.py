"""Everything one broker process runs, started and stopped as one (the app's lifespan)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from service.audit import AuditLog, open_audit_log
from service.broker.budget import AuthBudget
from service.broker.capacity import CapacityMonitor
from service.broker.core import Timing, TokenBroker
from service.broker.refresher import Refresher
from service.broker.sync import StoreSync
from service.config import Settings
from service.crypto import TokenCipher
from service.metrics import ACCOUNTS
from service.store import MemoryStore, RedisStore, StoreUnavailableError, Survey, TokenStore
from service.upstream import MonogotoClient, RetryPolicy

log = logging.getLogger(__name__)

# Beyond the worst case of one renewal (a refresh, then a login, each fully retried).
LEASE_MARGIN_SECONDS = 5.0
# The lock's lease, renewed by its holder every third of it: a holder that dies holds the other
# replicas up for at most this long.
LOCK_LEASE_SECONDS = 9.0
STOP_TIMEOUT_SECONDS = 10.0
# How long shutdown waits for the cancelled obtains to release their locks (a store round trip
# each, within the store's own timeout) before it closes the store.
FLIGHTS_STOP_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: its name, whether it passes, and a short explanation."""

    name: str
    ok: bool
    detail: str


def build_retry_policy(settings: Settings) -> RetryPolicy:
    """The client's retry bounds, as configured in `upstream.retry`."""
    configured = settings.upstream.retry
    return RetryPolicy(
        max_attempts=configured.max_attempts, max_elapsed_seconds=configured.max_elapsed_seconds
    )


def timing_for(settings: Settings, retry: RetryPolicy) -> Timing:
    """A short lease (its holder renews it), and a wait for the holder that outlives the
    slowest renewal any account can take (a refresh, then a login, each fully retried)."""
    slowest = max(account.timeout_seconds for account in settings.accounts_resolved().values())
    longest = 2 * retry.worst_case_seconds(slowest) + LEASE_MARGIN_SECONDS
    return Timing(
        lease_seconds=LOCK_LEASE_SECONDS,
        wait_seconds=longest + LOCK_LEASE_SECONDS,
        max_wait_seconds=settings.api.max_wait_seconds,
    )


def open_store(settings: Settings) -> TokenStore:
    """The in-process store for `memory://`, else Redis with the configured key ring."""
    if settings.uses_memory_store:
        return MemoryStore()
    ring = settings.encryption_key_ring()
    if not ring:
        raise RuntimeError(
            "a real Redis needs encryption_keys_file (replicas must share keys); "
            "create one with `monogoto-broker new-encryption-key > FILE`"
        )
    return RedisStore.from_url(
        settings.redis_url.get_secret_value(), prefix=settings.key_prefix, cipher=TokenCipher(ring)
    )


class BrokerRuntime:
    """The store, the Monogoto client, the broker and its background tasks."""

    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        http: httpx.AsyncClient,
        broker: TokenBroker,
        sync: StoreSync,
        *,
        client: MonogotoClient,
        budget: AuthBudget,
        audit: AuditLog,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.audit = audit
        self._store = store
        # The store's nodes as the last readiness check found them (None until it reached them).
        self.store_survey: Survey | None = None
        self._http = http
        self._sync = sync
        self._client = client
        self._budget = budget
        self._refresher = Refresher(broker, settings.refresh)
        # The renewal plan: its gauges, and each account's next renewal for /v1/accounts.
        self.capacity = CapacityMonitor(broker, settings)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, settings: Settings) -> BrokerRuntime:
        """Connect and start background tasks; raises if the store cannot be set up."""
        store = open_store(settings)
        retry = build_retry_policy(settings)
        max_retry_after = settings.upstream.max_retry_after_seconds
        budget = AuthBudget(store, settings.upstream.auth_rate, max_cool_down=max_retry_after)
        http = httpx.AsyncClient(follow_redirects=False)
        client = MonogotoClient(
            http,
            default_lifetime=settings.refresh.default_lifetime_seconds,
            retry=retry,
            max_retry_after=max_retry_after,
            before_attempt=budget.before_attempt,
            on_rate_limited=budget.rate_limited,
        )
        broker = TokenBroker(
            settings.accounts_resolved(),
            settings.refresh,
            store,
            client,
            timing_for(settings, retry),
        )
        audit = open_audit_log(settings)
        runtime = cls(
            settings,
            store,
            http,
            broker,
            StoreSync(broker, store),
            client=client,
            budget=budget,
            audit=audit,
        )
        await runtime._warm_up()
        runtime._spawn()
        return runtime

    async def _warm_up(self) -> None:
        # Take over tokens other replicas already hold, so a restart costs no login.
        try:
            await self._sync.poll_once()
        except StoreUnavailableError as error:
            log.warning(
                "token store unavailable at start; will keep trying",
                extra={"store": self._store.address, "reason": error.reason},
            )
            self._sync.store_ok = False

    def _spawn(self) -> None:
        # The first plan at once, from the tokens the warm-up found.
        self.capacity.update()
        coroutines = [
            self._sync.listen_forever(),
            self._sync.poll_forever(),
            self.capacity.run_forever(),
            self._refresher.run_forever(),
        ]
        self._refresher.follow(self.broker.names)
        self._tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
        ACCOUNTS.attach(self.broker.gauges)

    def apply(self, settings: Settings) -> None:
        """Take a reloaded configuration at once: accounts (an added one is renewed from now on,
        a removed one's renewal in progress is cancelled), credentials, the refresh, retry,
        timeout and budget settings, and the key ring. The settings that cannot change live
        (`service.config.changes.RESTART_SETTINGS`) must be those already in use."""
        retry = build_retry_policy(settings)
        upstream = settings.upstream
        self._client.configure(
            default_lifetime=settings.refresh.default_lifetime_seconds,
            retry=retry,
            max_retry_after=upstream.max_retry_after_seconds,
        )
        self._budget.configure(upstream.auth_rate, max_cool_down=upstream.max_retry_after_seconds)
        ring = settings.encryption_key_ring()
        if isinstance(self._store, RedisStore) and ring:
            self._store.use_cipher(TokenCipher(ring))
            self._sync.retry_unreadable()
        self._refresher.refresh = settings.refresh
        self.broker.apply(
            settings.accounts_resolved(), settings.refresh, timing_for(settings, retry)
        )
        self.capacity.configure(settings)
        self._refresher.follow(self.broker.names)
        self.settings = settings

    async def stop(self) -> None:
        """Write the audit lines still batched, stop background tasks, then close connections."""
        # The server answered every request before the lifespan ends, so the batch is complete;
        # written first, before anything that could hang or fail.
        self.audit.close()
        ACCOUNTS.detach(self.broker.gauges)
        self._sync.stop()
        self._tasks += self._refresher.stop()
        for task in self._tasks:
            task.cancel()
        await self.broker.cancel_flights(FLIGHTS_STOP_SECONDS)
        # Closing the store wakes any task blocked on a Redis read, should a cancellation be
        # lost inside the client library (the subscription must not keep shutdown waiting).
        await self._store.close()
        done, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                # Expected while connections close under a task's feet; worth a trace only.
                log.debug("background task ended with an error", exc_info=task.exception())
        if stuck:
            log.error("background tasks did not stop", extra={"tasks": len(stuck)})
        await self._http.aclose()

    async def readiness(self) -> list[Check]:
        """Whether this process can serve tokens: ready when every check passes.

        The store check passes while the store answers (tokens can be obtained) and, without
        it, while every account still has a valid cached token (static stability, rule 8).
        The audit check fails only with `audit.fail_closed` while its lines cannot be written.
        """
        return [await self._store_check(), Check("audit", *self.audit.check())]

    async def _store_check(self) -> Check:
        now = time.time()
        views = self.broker.accounts()
        cached = sum(1 for view in views if view.expires_at is not None and view.expires_at > now)
        summary = f"{cached} of {len(views)} accounts have a valid cached token"
        try:
            self.store_survey = await self._store.topology()
        except StoreUnavailableError:
            return Check("store", cached == len(views), f"unreachable; {summary}")
        return Check("store", True, f"reachable; {summary}")
