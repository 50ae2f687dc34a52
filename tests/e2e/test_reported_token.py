"""A caller reports its token as rejected, and Monogoto then refuses the replacement: no
replica serves the reported token again, and a new one comes once Monogoto answers again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    ReliabilityRow,
    UpstreamCounts,
    account,
    limited_config,
    ok_on_every_replica,
    write_config,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 600
REJECTED_BACKOFF_SECONDS = 3.0
NAME = "reported"
ACCOUNTS = {NAME: account(7, "v1")}
# Requests each replica gets right after the failed invalidate.
ASKS_PER_REPLICA = 3
RECOVERY_BOUND_SECONDS = 30.0

# Monogoto's refusal: (status of every auth call, what the invalidate must answer).
REFUSALS = {
    "unavailable": (503, "upstream_unavailable"),
    "rejected": (401, "credentials_rejected"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
async def test_a_reported_token_whose_replacement_failed_is_never_served_again(
    refusal: str,
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """After an invalidate that Monogoto's refusal leaves unsatisfied (503, or the credentials
    rejected), every replica answers 503 instead of the reported token; once Monogoto answers
    again, every replica serves a new token."""
    status, code = REFUSALS[refusal]
    key, config = limited_config(
        e2e_simulator,
        redis_url,
        ACCOUNTS,
        limit=50,
        period_seconds=10,
        refresh={"rejected_backoff_seconds": REJECTED_BACKOFF_SECONDS},
        lifetime=LIFETIME_SECONDS,
    )
    replicas = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    await ok_on_every_replica(replicas, key, NAME)
    token_url = f"/v1/accounts/{NAME}/token"
    served: Counter[str] = Counter()  # every token served after the report, by fingerprint
    answers: Counter[str] = Counter()  # answers to the GETs after the report
    retry_after: list[int] = []

    async def ask(client: httpx.AsyncClient, url: str) -> str | None:
        """GET the token at `url`; the token served, if any."""
        response = await client.get(f"{url}{token_url}")
        if response.status_code == 200:
            answers["200"] += 1
            token: str = response.json()["access_token"]
            served[token] += 1
            return token
        answers[f"{response.status_code} {response.json().get('code', '-')}"] += 1
        if "Retry-After" in response.headers:
            retry_after.append(int(response.headers["Retry-After"]))
        return None

    async def ask_several(client: httpx.AsyncClient, url: str) -> None:
        for _ in range(ASKS_PER_REPLICA):
            await ask(client, url)

    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        reported = (await client.get(f"{replicas[0]}{token_url}")).json()["access_token"]
        # Monogoto refuses every renewal from now on; a caller reports its token at a replica.
        e2e_simulator.fault("status", status=status, count=1000)
        invalidated = await client.post(
            f"{replicas[1]}{token_url}/invalidate", json={"access_token": reported}
        )
        invalidate_code = invalidated.json().get("code", "-")
        # Right after, every replica is asked (at once, and again).
        await asyncio.gather(*(ask_several(client, url) for url in replicas))
        refused = dict(answers)

        # Monogoto answers again: every replica serves a new token soon.
        e2e_simulator.clear_faults()
        cleared = time.monotonic()

        async def renewed(url: str) -> float:
            while True:
                if await ask(client, url) not in (None, reported):
                    return time.monotonic() - cleared
                await asyncio.sleep(0.25)

        async with asyncio.timeout(RECOVERY_BOUND_SECONDS + 10):
            recovery = await asyncio.gather(*(renewed(url) for url in replicas))

    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario=f"reported token, replacement {refusal}",
            injected=(
                f"a caller invalidates its token; Monogoto answers every renewal {status} until "
                f"cleared; 3 replicas asked {ASKS_PER_REPLICA} times each right after"
            ),
            callers_saw=(
                f"invalidate {invalidated.status_code} {invalidate_code}; then "
                f"{', '.join(f'{n} x {c}' for c, n in sorted(refused.items()))}; reported "
                f"token served {served[reported]} times; new token on every replica "
                f"{max(recovery):.1f} s after the fault was cleared"
            ),
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert invalidated.status_code == 503, invalidated.text
    assert invalidate_code == code
    assert "Retry-After" in invalidated.headers
    assert served[reported] == 0, "the reported token was served again"
    # While Monogoto refuses, there is no token to serve: 503 with Retry-After, every time.
    assert refused == {f"503 {code}": len(replicas) * ASKS_PER_REPLICA}, refused
    assert len(retry_after) >= len(replicas) * ASKS_PER_REPLICA
    assert max(recovery) <= RECOVERY_BOUND_SECONDS
    assert total.rate_limited == 0
    assert total.reused == 0
