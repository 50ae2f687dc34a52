"""The broker trusts nothing the shared store says about the past, and no caller with the
shared budget: in-process replicas on a real Redis, the simulator over HTTP.

The end-to-end versions, with `serve` processes and real restarts, are in tests/e2e.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio

from service.broker import (
    CredentialsRejectedError,
    CredentialsStatus,
    InvalidRequestError,
    RenewalRateLimitedError,
    UpstreamUnavailableError,
)
from service.broker.model import AccountStatus
from service.simulator.client import SimulatorControl
from tests.integration.conftest import StartReplicas, logins
from tests.support import eventually

TOKEN_KEY = "mgb:{acct-0}:token"
SPENT_KEY = "mgb:{acct-0}:spent"


async def test_a_store_gone_back_in_time_never_makes_a_refresh_token_sent_twice(
    start_replicas: StartReplicas, simulator: SimulatorControl, redis_url: str
) -> None:
    """The store is rolled back to a record whose refresh token was spent since (and forgets
    that it was spent): the replica renews from the newer record it knows, writes that back,
    and Monogoto sees no refresh token twice."""
    simulator.set(token_lifetime_seconds=60)
    [replica] = await start_replicas()
    first = await replica.broker.get("acct-0")
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        old = await raw.hgetall(TOKEN_KEY)
        second = await replica.broker.invalidate("acct-0", first.access_token, caller="one")
        assert simulator.calls("v1_refresh", "ok") == 1
        newest = replica.broker.state("acct-0").version
        # Back in time: the old record, and no memory of spent refresh tokens.
        await raw.delete(TOKEN_KEY, SPENT_KEY)
        await raw.hset(TOKEN_KEY, items=[b"v", old[b"v"], b"e", old[b"e"]])
        third = await replica.broker.invalidate("acct-0", second.access_token, caller="two")
        assert third.access_token not in {first.access_token, second.access_token}
        assert simulator.calls("v1_refresh", "refresh_reused") == 0
        assert int(await raw.hget(TOKEN_KEY, "v") or 0) > newest
    finally:
        await raw.aclose()


async def test_a_replica_writes_its_newer_record_back_to_a_store_gone_back(
    start_replicas: StartReplicas, simulator: SimulatorControl, redis_url: str
) -> None:
    """Without any request, the store sync notices the older stored record and replaces it with
    the newer one it holds, so replicas that join later start from the newest record."""
    [replica] = await start_replicas()
    first = await replica.broker.get("acct-0")
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        old = await raw.hgetall(TOKEN_KEY)
        await replica.broker.invalidate("acct-0", first.access_token)
        newest = replica.broker.state("acct-0").version
        await raw.hset(TOKEN_KEY, items=[b"v", old[b"v"], b"e", old[b"e"]])

        async def restored() -> bool:
            return int(await raw.hget(TOKEN_KEY, "v") or 0) == newest

        await eventually(restored)
    finally:
        await raw.aclose()
    [joiner] = await start_replicas()
    token = await joiner.broker.get("acct-0")
    assert token.access_token != first.access_token
    assert logins(simulator) == 2


async def test_a_reported_token_is_never_served_again_when_its_replacement_fails(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """After an invalidate whose renewal Monogoto refused, no replica hands out the reported
    token; once Monogoto answers again, a new token is served."""
    # Every failed attempt counts against Monogoto's limit too: keep it out of the way.
    simulator.set(rate_limit=1000)
    reporter, other = await start_replicas(2)
    reported = await reporter.broker.get("acct-0")
    await eventually(lambda: other.broker.state("acct-0").token is not None)
    for endpoint in ("v1_refresh", "v1_token"):
        simulator.fault("status", endpoint=endpoint, status=503, count=100)
    with pytest.raises(UpstreamUnavailableError):
        await reporter.broker.invalidate("acct-0", reported.access_token)

    async def refused_everywhere() -> bool:
        for replica in (reporter, other):
            try:
                token = await replica.broker.get("acct-0")
            except UpstreamUnavailableError:
                continue
            assert token.access_token != reported.access_token, "the reported token came back"
            return False
        return True

    await eventually(refused_everywhere)
    simulator.clear_faults()

    async def replaced() -> bool:
        try:
            token = await other.broker.get("acct-0")
        except UpstreamUnavailableError:
            return False
        assert token.access_token != reported.access_token
        return True

    await eventually(replaced, within=30)


async def test_a_caller_forcing_renewals_gets_one_per_minute(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A `min_ttl` just under the lifetime, or the report of a still-valid token, forces a
    renewal: one per caller and account and minute; then 429 without an upstream call. Another
    caller is not held back by it."""
    simulator.set(token_lifetime_seconds=60)
    [replica] = await start_replicas()
    first = await replica.broker.get("acct-0")
    await asyncio.sleep(1.5)  # the token has less than 59 s left from now on
    forced = await replica.broker.get("acct-0", min_ttl=59, caller="greedy")
    assert forced.access_token != first.access_token
    await asyncio.sleep(1.5)
    with pytest.raises(RenewalRateLimitedError) as refused:
        await replica.broker.get("acct-0", min_ttl=59, caller="greedy")
    assert refused.value.retry_after is not None
    assert 50 < refused.value.retry_after <= 60
    with pytest.raises(RenewalRateLimitedError):
        await replica.broker.invalidate("acct-0", forced.access_token, caller="greedy")
    assert logins(simulator) == 2
    polite = await replica.broker.invalidate("acct-0", forced.access_token, caller="polite")
    assert polite.access_token != forced.access_token
    assert logins(simulator) == 3


async def test_min_ttl_of_the_whole_lifetime_is_refused_naming_it(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """No token ever has its whole lifetime left when served: 400 naming the lifetime."""
    simulator.set(token_lifetime_seconds=60)
    [replica] = await start_replicas()
    await replica.broker.get("acct-0")
    with pytest.raises(InvalidRequestError, match=r"lifetime \(60 s\)"):
        await replica.broker.get("acct-0", min_ttl=60)
    assert logins(simulator) == 1


async def test_no_caller_waits_longer_than_max_wait(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A slow login answers the caller with 503 after `api.max_wait_seconds`; the login goes
    on and its token is served afterwards, without a second call."""
    [replica] = await start_replicas(max_wait=1.0)
    simulator.fault("delay", endpoint="v1_token", seconds=3)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailableError) as waited:
        await replica.broker.get("acct-0")
    assert time.monotonic() - started < 2.5
    assert waited.value.retry_after is not None
    await eventually(lambda: replica.broker.state("acct-0").token is not None)
    await replica.broker.get("acct-0")
    assert simulator.calls("v1_token") == 1


async def test_a_rejection_of_other_credentials_holds_nobody_back(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A replica with a wrong password marks the account rejected; a replica with the right
    one is not held back by that marker. The wrong replica then serves the right one's token,
    while still saying that its own credentials are rejected (and not trying them again)."""
    [wrong] = await start_replicas(password="wrong")
    with pytest.raises(CredentialsRejectedError):
        await wrong.broker.get("acct-0")
    assert wrong.broker.accounts()[0].status == AccountStatus.CREDENTIALS_REJECTED
    [right] = await start_replicas()
    token = await right.broker.get("acct-0")
    assert simulator.calls("v1_token", "ok") == 1
    await eventually(lambda: wrong.broker.state("acct-0").token is not None)
    assert (await wrong.broker.get("acct-0")).access_token == token.access_token
    assert wrong.broker.accounts()[0].status == AccountStatus.CREDENTIALS_REJECTED
    assert wrong.broker.accounts()[0].credentials is CredentialsStatus.REJECTED
    assert right.broker.accounts()[0].credentials is CredentialsStatus.VERIFIED
    assert simulator.calls("v1_token") == 2  # one rejected login, one good one


async def test_a_report_revokes_the_token_even_while_the_account_is_rejected(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Monogoto rejects the account's credentials (marker in force) and a caller reports the
    still-valid token: the report fails, and the token is never served again."""
    simulator.set(token_lifetime_seconds=60)
    [replica] = await start_replicas()
    first = await replica.broker.get("acct-0")
    await asyncio.sleep(1.5)
    for endpoint in ("v1_refresh", "v1_token"):
        simulator.fault("status", endpoint=endpoint, status=401, count=100)
    with pytest.raises(CredentialsRejectedError):
        await replica.broker.get("acct-0", min_ttl=59, caller="batch")
    assert (await replica.broker.get("acct-0")).access_token == first.access_token
    with pytest.raises(CredentialsRejectedError):
        await replica.broker.invalidate("acct-0", first.access_token, caller="api")
    with pytest.raises(CredentialsRejectedError):
        await replica.broker.get("acct-0")


async def test_another_caller_s_refused_renewal_does_not_answer_a_report(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """A caller whose forced renewals are used up, asking at the same time as another caller
    reports the token: the first gets 429, the report gets a new token."""
    simulator.set(token_lifetime_seconds=60)
    [replica] = await start_replicas()
    await replica.broker.get("acct-0")
    await asyncio.sleep(1.5)
    current = await replica.broker.get("acct-0", min_ttl=59, caller="greedy")
    await asyncio.sleep(1.5)
    greedy, report = await asyncio.gather(
        replica.broker.get("acct-0", min_ttl=59, caller="greedy"),
        replica.broker.invalidate("acct-0", current.access_token, caller="polite"),
        return_exceptions=True,
    )
    assert isinstance(greedy, RenewalRateLimitedError)
    assert not isinstance(report, BaseException), report
    assert report.access_token != current.access_token
