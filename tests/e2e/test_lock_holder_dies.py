"""The replica holding an account's lock dies in the middle of its upstream call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    USERNAMES,
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    account_statuses,
    broker_config,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

TIMEOUT_SECONDS = 4.0
# One attempt, no retry: the lease is 2 x (1 + 4) + 5 = 15 s (broker/runtime.py timing_for).
RETRY = {"max_attempts": 1, "max_elapsed_seconds": 1.0}
LEASE_SECONDS = 2 * (RETRY["max_elapsed_seconds"] + TIMEOUT_SECONDS) + 5.0
# Slow enough to kill the holder mid-call, quicker than the timeout (a live holder succeeds).
SLOW_CALL_SECONDS = 3.5
# The legacy account's renewal is a login; the v1 account's is a refresh (a single-use token).
ACCOUNTS = {"dies-legacy": account(0, "legacy"), "dies-v1": account(1, "v1")}
SLOW_ENDPOINTS = {"dies-legacy": "legacy_auth", "dies-v1": "v1_refresh"}


async def test_a_survivor_takes_over_when_the_lock_holder_dies_mid_call(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A replica killed while renewing holds nobody up for longer than its lease: a survivor
    renews within the lease plus one call, callers keep their valid tokens meanwhile, and no
    refresh token is sent twice."""
    e2e_simulator.set(token_lifetime_seconds=600, rate_limit=50, rate_period_seconds=10)
    key, digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        digest,
        ACCOUNTS,
        upstream={
            "timeout_seconds": TIMEOUT_SECONDS,
            "retry": RETRY,
            "auth_rate": {"limit": 50, "period_seconds": 10},
        },
    )
    doomed, *survivors = start_brokers(write_config(tmp_path / "broker.yaml", config), 3)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        old = {
            name: (await client.get(f"{doomed.url}/v1/accounts/{name}/token")).json()
            for name in ACCOUNTS
        }
        for name in ACCOUNTS:
            await eventually(
                lambda name=name: all(  # type: ignore[misc]
                    account_statuses(s.url, key)[name] == "ok" for s in survivors
                )
            )
        before = {name: slow_calls(e2e_simulator, name) for name in ACCOUNTS}
        for endpoint in SLOW_ENDPOINTS.values():
            e2e_simulator.fault("delay", endpoint=endpoint, seconds=SLOW_CALL_SECONDS)

        # Callers on the survivors, who keep using the tokens they have.
        stop = asyncio.Event()
        callers = Callers(Rotation([s.url for s in survivors]), key, ACCOUNTS, concurrency=10)
        load = asyncio.create_task(callers.run(until=stop))
        # Monogoto rejected both tokens, so a caller reports them; the doomed replica renews.
        reports = [
            asyncio.create_task(invalidate(client, doomed.url, name, old[name]["access_token"]))
            for name in ACCOUNTS
        ]
        # Kill it once Monogoto has taken both calls (and spent the refresh token).
        await eventually(
            lambda: all(slow_calls(e2e_simulator, name) > before[name] for name in ACCOUNTS)
        )
        doomed.kill()
        killed_at = time.monotonic()
        died = await asyncio.gather(*reports, return_exceptions=True)

        # The caller reports again, at a survivor; it waits for the lease to run out.
        async def takeover(name: str, url: str) -> float:
            body = await invalidate(client, url, name, old[name]["access_token"])
            assert body["access_token"] != old[name]["access_token"]
            return time.monotonic() - killed_at

        seconds = await asyncio.gather(
            *(takeover(name, s.url) for name, s in zip(ACCOUNTS, survivors, strict=True))
        )
        stop.set()
        await load

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    per_account = {
        name: UpstreamCounts.read(e2e_simulator, USERNAMES[index]).describe()
        for index, name in enumerate(ACCOUNTS)
    }
    reliability(
        ReliabilityRow(
            scenario="lock holder dies",
            injected=(
                f"renewing replica SIGKILLed mid-call (login / v1 refresh held "
                f"{SLOW_CALL_SECONDS} s by Monogoto); lease {LEASE_SECONDS:.0f} s"
            ),
            callers_saw=(
                f"{report.summary()}; new token {max(seconds):.1f} s after the kill "
                f"(bound {LEASE_SECONDS + TIMEOUT_SECONDS:.0f} s)"
            ),
            upstream_calls=f"{total.describe()}; per account {per_account}",
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert all(isinstance(outcome, httpx.TransportError) for outcome in died), (
        "the holder finished before it was killed; the scenario did not happen"
    )
    # The lock was taken before the kill, so its lease ends less than LEASE_SECONDS after it;
    # a waiter re-tries the lock every 0.25 s and then makes one call, which takes far less
    # than its timeout. So lease + timeout is a generous bound.
    assert max(seconds) <= LEASE_SECONDS + TIMEOUT_SECONDS
    assert report.failed() == 0, report.summary()
    assert report.problems == []
    assert total.rate_limited == 0
    assert total.reused == 0


async def invalidate(client: httpx.AsyncClient, url: str, name: str, token: str) -> dict[str, str]:
    """Report `token` of account `name` as rejected; the replacement's body."""
    response = await client.post(
        f"{url}/v1/accounts/{name}/token/invalidate", json={"access_token": token}
    )
    response.raise_for_status()
    body: dict[str, str] = response.json()
    return body


def slow_calls(simulator: SimulatorControl, name: str) -> int:
    """Calls so far to the endpoint that account `name`'s renewal goes to."""
    user = USERNAMES[list(ACCOUNTS).index(name)]
    return simulator.calls(SLOW_ENDPOINTS[name], user=user)
