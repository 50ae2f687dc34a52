"""Three broker processes on one Redis, many concurrent callers, several token lifetimes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Cadence,
    Callers,
    ReliabilityRow,
    Rotation,
    account,
    broker_config,
    write_config,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 6.0
FRACTION = 0.5
RUN_SECONDS = 20.0
ACCOUNTS = {"fleet-v1": account(0, "v1"), "fleet-legacy": account(1, "legacy")}


async def test_three_replicas_serve_every_caller_with_one_upstream_call_per_cycle(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Every caller gets a valid token; upstream calls track refresh cycles, with no 429 and
    no reused refresh token, across three replicas and several token lifetimes."""
    e2e_simulator.set(token_lifetime_seconds=LIFETIME_SECONDS, rate_limit=10, rate_period_seconds=5)
    key, digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        digest,
        ACCOUNTS,
        upstream={"auth_rate": {"limit": 10, "period_seconds": 5}},
        refresh={"fraction": FRACTION, "min_remaining_seconds": 1},
    )
    started = time.monotonic()  # the first replica logs in as soon as it starts
    replicas = start_brokers(write_config(tmp_path / "broker.yaml", config), 3)
    callers = Callers(Rotation([r.url for r in replicas]), key, ACCOUNTS, concurrency=40)
    await callers.run(RUN_SECONDS)
    elapsed = time.monotonic() - started

    report = callers.report
    cadence = Cadence.read(
        e2e_simulator,
        ACCOUNTS,
        elapsed=elapsed,
        fraction=FRACTION,
        lifetime=LIFETIME_SECONDS,
    )
    reliability(
        ReliabilityRow(
            scenario="steady load (reference)",
            injected=(
                f"none: 3 replicas, 40 callers for {RUN_SECONDS:.0f} s, "
                f"{LIFETIME_SECONDS:.0f} s token lifetime, 2 accounts"
            ),
            callers_saw=report.summary(),
            upstream_calls=cadence.describe(),
            rate_limited=cadence.total.rate_limited,
            reused=cadence.total.reused,
        )
    )
    cadence.check(report, RUN_SECONDS)
    for name in ACCOUNTS:
        assert report.served(name) > 100
    for replica in replicas:
        assert replica.stop() == 0
