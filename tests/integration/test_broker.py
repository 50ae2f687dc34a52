"""The broker core against a real Redis and the simulator over HTTP, time compressed to seconds.

Several `BrokerRuntime`s on one Redis stand for several replicas (the e2e tests use processes).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest
import redis
from pydantic import SecretStr

from service.broker import (
    CredentialsRejectedError,
    InvalidRequestError,
    Outcome,
    UpstreamUnavailableError,
    runtime,
)
from service.broker.budget import Urgency
from service.broker.sync import PULL_BATCH
from service.claims import read_claims
from service.config import build_settings
from service.simulator.client import SimulatorControl
from service.store import RedisStore, TokenRecord, credentials_fingerprint
from tests.integration.conftest import StartReplicas, broker_config, logins
from tests.support import eventually

if TYPE_CHECKING:
    from tests.conftest import RedisServer


async def test_lifetime_and_redis_ttl_come_from_the_token_claims(
    start_replicas: StartReplicas, simulator: SimulatorControl, redis_url: str
) -> None:
    """The served expiry is exp - iat after receipt, and the Redis record expires with it."""
    simulator.set(token_lifetime_seconds=40)
    [replica] = await start_replicas()
    token = await replica.broker.get("acct-0")
    claims = read_claims(token.access_token)
    assert claims["exp"] - claims["iat"] == 40
    assert 38 < token.expires_at - time.time() <= 40
    with redis.Redis.from_url(redis_url) as raw:
        ttl_ms = raw.pttl("mgb:{acct-0}:token")
    assert 37_000 < ttl_ms <= 40_000


async def test_200_concurrent_first_requests_on_three_replicas_log_in_once(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Two hundred callers spread over three replicas cause exactly one upstream login."""
    replicas = await start_replicas(3)
    tokens = await asyncio.gather(
        *(replicas[index % 3].broker.get("acct-0") for index in range(200))
    )
    assert len({token.access_token for token in tokens}) == 1
    assert simulator.calls("v1_token") == 1
    assert simulator.calls("v1_refresh") == 0


async def test_a_local_hit_needs_no_store(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Once cached, a token is served from the process without another upstream call."""
    [replica] = await start_replicas()
    first = await replica.broker.get("acct-0")
    again = await replica.broker.get("acct-0")
    assert again.access_token == first.access_token
    assert again.outcome is Outcome.LOCAL
    assert logins(simulator) == 1


async def test_min_ttl_beyond_the_cached_token_fetches_a_fresh_one(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A caller needing more time than the cached token has left gets a newer token."""
    simulator.set(token_lifetime_seconds=6)
    [replica] = await start_replicas()
    first = await replica.broker.get("acct-0")
    await eventually(lambda: first.expires_at - time.time() < 5)
    fresher = await replica.broker.get("acct-0", min_ttl=5)
    assert fresher.access_token != first.access_token
    assert fresher.expires_at - time.time() >= 5
    with pytest.raises(InvalidRequestError):
        await replica.broker.get("acct-0", min_ttl=60)


async def test_tokens_are_refreshed_ahead_of_expiry(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """With 4 s tokens and nobody asking, the replicas renew each token, through its refresh
    token, before it expires, with one upstream call per renewal."""
    simulator.set(token_lifetime_seconds=4)
    replicas = await start_replicas(2, fraction=0.5, min_remaining_seconds=0.5)
    records: list[TokenRecord] = []

    def renewed_three_times() -> bool:
        cached = replicas[1].broker.state("acct-0").token
        # A new access token, not just a new version: a refresh first stores its record
        # without the refresh token it is about to spend.
        if cached is not None and (
            not records or cached.record.access_token != records[-1].access_token
        ):
            records.append(cached.record)
        return len(records) >= 4

    await eventually(renewed_three_times, within=30)
    for old, new in itertools.pairwise(records):
        assert new.obtained_at < old.expires_at, "a token expired before it was renewed"
    assert simulator.calls("v1_refresh", "ok") >= 3
    assert logins(simulator) <= len(records) + 1
    assert simulator.calls("v1_refresh", "refresh_reused") == 0


async def test_an_invalidate_storm_causes_one_upstream_call(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Fifty reports of the same token across three replicas replace it exactly once."""
    replicas = await start_replicas(3)
    current = await replicas[0].broker.get("acct-0")
    await eventually(
        lambda: len({replica.broker.state("acct-0").version for replica in replicas}) == 1
    )
    before = logins(simulator)
    tokens = await asyncio.gather(
        *(
            replicas[index % 3].broker.invalidate("acct-0", current.access_token)
            for index in range(50)
        )
    )
    assert len({token.access_token for token in tokens}) == 1
    assert tokens[0].access_token != current.access_token
    assert logins(simulator) == before + 1


async def test_reporting_an_already_replaced_token_calls_nobody(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A stale report returns the current token without calling Monogoto."""
    [replica] = await start_replicas()
    old = await replica.broker.get("acct-0")
    new = await replica.broker.invalidate("acct-0", old.access_token)
    calls = logins(simulator)
    again = await replica.broker.invalidate("acct-0", old.access_token)
    assert again.access_token == new.access_token
    assert logins(simulator) == calls


async def test_replicas_converge_on_a_replaced_token(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """After one replica replaces a token, the others serve the new one from their caches."""
    replicas = await start_replicas(3)
    old = await replicas[0].broker.get("acct-0")
    for replica in replicas[1:]:
        await replica.broker.get("acct-0")
    new = await replicas[0].broker.invalidate("acct-0", old.access_token)

    def converged() -> bool:
        states = [replica.broker.state("acct-0").token for replica in replicas]
        return all(state is not None and state.access_token == new.access_token for state in states)

    await eventually(converged, within=5)
    served = await replicas[2].broker.get("acct-0")
    assert served.access_token == new.access_token
    assert served.outcome is Outcome.LOCAL


async def test_the_auth_budget_is_never_exceeded(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Eight accounts on a budget of three per window: all served in turn, zero 429s; a caller
    waits for the next unit instead of being refused."""
    simulator.set(rate_limit=3, rate_period_seconds=3)
    replicas = await start_replicas(2, accounts=8, limit=3, period=3)
    pending = {f"acct-{index}" for index in range(8)}
    told_to_wait: list[float] = []
    waited: list[float] = []
    give_up = time.monotonic() + 40
    while pending and time.monotonic() < give_up:
        for name in sorted(pending):
            started = time.monotonic()
            try:
                await replicas[len(pending) % 2].broker.get(name)
                pending.discard(name)
                waited.append(time.monotonic() - started)
            except UpstreamUnavailableError as error:
                told_to_wait.append(error.retry_after or 0.0)
        await asyncio.sleep(0.2)
    assert not pending, f"never served: {sorted(pending)}"
    assert max(waited) > 1.0, "the budget never ran out, so this test proved nothing"
    assert all(0 < wait <= 4 for wait in told_to_wait)
    assert simulator.calls("v1_token", "rate_limited") == 0
    assert simulator.calls("v1_token") == 8


async def test_rejected_credentials_fail_fast_without_a_storm(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Wrong credentials: one upstream attempt, then every caller gets credentials_rejected."""
    replicas = await start_replicas(2, password="wrong", rejected_backoff_seconds=600)
    results = await asyncio.gather(
        *(replicas[index % 2].broker.get("acct-0") for index in range(100)),
        return_exceptions=True,
    )
    waits = [
        result.retry_after for result in results if isinstance(result, CredentialsRejectedError)
    ]
    assert len(waits) == 100
    assert all(wait is not None and 500 < wait <= 600 for wait in waits)
    assert simulator.calls("v1_token", "rejected") == 1
    assert simulator.calls("v1_token") == 1
    for replica in replicas:
        [view] = replica.broker.accounts()
        assert view.status == "credentials_rejected"


async def test_cached_tokens_are_served_while_redis_is_down(
    start_replicas: StartReplicas, simulator: SimulatorControl, redis_server: RedisServer
) -> None:
    """Redis down: valid cached tokens are still served, the rest fail honestly, and after
    Redis comes back empty the tokens are restored to it without a single login."""
    replicas = await start_replicas(2, accounts=2)
    # Both accounts: readiness below wants a valid token for each (their logins are paced).
    await eventually(
        lambda: all(r.broker.state(a).token for r in replicas for a in ("acct-0", "acct-1"))
    )
    cached = await replicas[0].broker.get("acct-0")
    calls = logins(simulator)
    redis_server.kill()
    try:
        for replica in replicas:
            served = await replica.broker.get("acct-0")
            assert served.access_token == cached.access_token
        # A replacement would need the lock and the budget: without the store, no upstream call.
        with pytest.raises(UpstreamUnavailableError) as refused:
            await replicas[0].broker.invalidate("acct-0", cached.access_token)
        assert refused.value.retry_after
        checks = await replicas[0].readiness()
        assert all(check.ok for check in checks)  # every account still has a valid token
        assert "unreachable" in checks[0].detail
    finally:
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as raw:
        await eventually(lambda: raw.exists("mgb:{acct-0}:token", "mgb:{acct-1}:token") == 2)
    assert logins(simulator) == calls
    fresh = await start_replicas(1, accounts=2)
    assert (await fresh[0].broker.get("acct-0")).access_token == cached.access_token
    assert logins(simulator) == calls


async def test_a_refresh_token_of_unknown_fate_is_never_sent_again(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A refresh whose answer was lost, then a failed login: the next renewal (after the
    failure's back-off) logs in rather than resending the possibly consumed refresh token."""
    [replica] = await start_replicas()
    current = await replica.broker.get("acct-0")
    simulator.fault("drop", endpoint="v1_refresh")
    simulator.fault("status", endpoint="v1_token", status=400)
    with pytest.raises(UpstreamUnavailableError):
        await replica.broker.invalidate("acct-0", current.access_token)
    assert simulator.calls("v1_refresh") == 1
    # Within the failure's Retry-After (5 s) this process does not ask Monogoto again.
    with pytest.raises(UpstreamUnavailableError):
        await replica.broker.invalidate("acct-0", current.access_token)
    assert simulator.calls("v1_token") == 2, "the first login and the failed one, no other"
    renewed: list[str] = []

    async def replaced() -> bool:
        try:
            token = await replica.broker.invalidate("acct-0", current.access_token)
        except UpstreamUnavailableError:
            return False
        renewed.append(token.access_token)
        return True

    await eventually(replaced)
    assert renewed[0] != current.access_token
    assert simulator.calls("v1_refresh") == 1
    assert simulator.calls("v1_token", "ok") == 2


async def test_min_ttl_beyond_any_token_is_refused_even_on_a_cold_replica(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Asking for more time than a token ever has is an invalid request, cached token or not."""
    simulator.set(token_lifetime_seconds=40)
    [replica] = await start_replicas()
    with pytest.raises(InvalidRequestError):
        await replica.broker.get("acct-0", min_ttl=100)
    with pytest.raises(InvalidRequestError):
        await replica.broker.get("acct-0", min_ttl=100)
    assert logins(simulator) == 1


async def test_a_failure_on_one_replica_clears_when_another_renews(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """An account reported failing by one replica is ok again once any replica renews it."""
    first, second = await start_replicas(2)
    current = await first.broker.get("acct-0")
    simulator.fault("status", endpoint="v1_refresh", status=400)
    simulator.fault("status", endpoint="v1_token", status=400)
    with pytest.raises(UpstreamUnavailableError):
        await first.broker.invalidate("acct-0", current.access_token)
    [view] = first.broker.accounts()
    assert view.status == "failing"
    await second.broker.invalidate("acct-0", current.access_token)
    await eventually(lambda: first.broker.accounts()[0].status == "ok")
    assert first.broker.accounts()[0].last_error is None


async def test_rejected_credentials_stay_rejected_while_redis_is_down(
    start_replicas: StartReplicas, simulator: SimulatorControl, redis_server: RedisServer
) -> None:
    """Without Redis, a rejected account still answers credentials_rejected, not a generic 503."""
    [replica] = await start_replicas(password="wrong")
    with pytest.raises(CredentialsRejectedError):
        await replica.broker.get("acct-0")
    redis_server.kill()
    try:
        with pytest.raises(CredentialsRejectedError):
            await replica.broker.get("acct-0")
    finally:
        redis_server.start()
    assert simulator.calls("v1_token") == 1


async def test_the_renewal_plan_follows_the_tokens_and_a_reloaded_budget(
    start_replicas: StartReplicas,
    redis_url: str,
    simulator_url: str,
    simulator_users: dict[str, str],
) -> None:
    """Three accounts without tokens on one call per 10 s: planned at start-up, some at risk
    (their logins come one per 10 s); a reload to a larger budget plans them all in time."""
    [replica] = await start_replicas(accounts=3, limit=1, period=9)
    plan = replica.capacity
    assert all(plan.renewal(f"acct-{index}") is not None for index in range(3))
    [before] = plan.update()
    assert before.at_risk
    assert before.utilisation > 0
    config = broker_config(redis_url, simulator_url, simulator_users, accounts=3, limit=100)
    replica.apply(build_settings(config))
    [after] = plan.update()
    assert after.at_risk == []
    assert after.capacity == pytest.approx(100 / 61)


async def test_a_replica_starting_on_many_stored_records_reads_them_in_batches(
    start_replicas: StartReplicas,
    simulator: SimulatorControl,
    redis_url: str,
    simulator_url: str,
    simulator_users: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica of 450 accounts whose records the store holds has taken them all over once
    started, reading them PULL_BATCH at a time (not one round trip each), with no login."""
    config = broker_config(redis_url, simulator_url, simulator_users, accounts=450)
    settings = build_settings(config)
    store = runtime.open_store(settings)
    now = time.time()
    try:
        for name, account in settings.accounts_resolved().items():
            record = TokenRecord(
                version=int(now * 1000),
                access_token=SecretStr(f"access.{name}"),
                refresh_token=SecretStr(f"refresh.{name}"),
                customer_id=None,
                obtained_at=now,
                expires_at=now + 3600,
                credentials=credentials_fingerprint(account.username, account.password),
            )
            assert await store.save(name, record)
    finally:
        await store.close()
    reads: list[int] = []
    load_many = RedisStore.load_many

    async def counted(self: RedisStore, accounts: Sequence[str]) -> dict[str, TokenRecord | None]:
        reads.append(len(accounts))
        return await load_many(self, accounts)

    monkeypatch.setattr(RedisStore, "load_many", counted)
    [replica] = await start_replicas(accounts=450)
    assert reads == [PULL_BATCH, PULL_BATCH, 450 - 2 * PULL_BATCH]
    assert all(view.expires_at == now + 3600 for view in replica.broker.accounts())
    assert (await replica.broker.get("acct-449")).outcome is Outcome.LOCAL
    assert logins(simulator) == 0


async def test_a_renewal_waiting_for_budget_keeps_its_lock_past_the_lease(
    start_replicas: StartReplicas, simulator: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two accounts on a budget of one per window, two replicas starting cold: the renewal
    that waits a whole window for its unit holds the account's lock all along (its watchdog
    renews the 0.6 s lease), so no other replica starts a second login of that account."""
    monkeypatch.setattr(runtime, "LOCK_LEASE_SECONDS", 0.6)
    simulator.set(rate_limit=1, rate_period_seconds=2)
    replicas = await start_replicas(2, accounts=2, limit=1, period=2)
    started = time.monotonic()
    await asyncio.gather(
        *(replica.broker.get(name) for replica in replicas for name in ("acct-0", "acct-1"))
    )
    assert time.monotonic() - started > 2.0, "one login waited for the next window"
    await asyncio.sleep(3.5)  # a second login of either account would have had its unit
    assert logins(simulator) == 2
    assert simulator.calls("v1_token", "rate_limited") == 0


async def test_the_queue_ranks_the_accounts_the_plan_gives_up_after_the_kept_ones(
    start_replicas: StartReplicas,
) -> None:
    """Both accounts are read, so both renew as used ones; once the plan gives one up, its
    renewals rank with the idle ones, after the other's."""
    [replica] = await start_replicas(accounts=2)
    for name in ("acct-0", "acct-1"):
        await replica.broker.get(name)
    assert replica.broker.given_up("acct-1") is False  # the plan fits: nothing given up
    claims = [replica.broker.renewal_claim(name).urgency for name in ("acct-0", "acct-1")]
    assert claims == [Urgency.RENEWAL, Urgency.RENEWAL]
    replica.broker.given_up = lambda name: name == "acct-1"
    claims = [replica.broker.renewal_claim(name).urgency for name in ("acct-0", "acct-1")]
    assert claims == [Urgency.RENEWAL, Urgency.IDLE]
