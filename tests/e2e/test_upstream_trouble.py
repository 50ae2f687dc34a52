"""Monogoto misbehaves while a token is due: 5xx, a timeout, a dropped connection, a 429."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    limited_config,
    upstream_results,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 20.0
FRACTION = 0.25  # due after 5 s: the trouble hits well before the token runs out
TIMEOUT_SECONDS = 1.0
LIMIT = 5
PERIOD_SECONDS = 3.0
ACCOUNTS = {"trouble-v1": account(0, "v1")}
# Used in this order by the calls of the renewal that is due: the refresh gets a 503 (its
# outcome unknown, so the broker logs in instead), then the login's retries meet the rest.
FAULTS: tuple[dict[str, Any], ...] = (
    {"kind": "status", "status": 503, "count": 2},
    {"kind": "delay", "seconds": 2 * TIMEOUT_SECONDS, "count": 1},
    {"kind": "drop", "count": 1},
    {"kind": "status", "status": 429, "retry_after": 2, "count": 1},
)
INJECTED = sum(int(fault["count"]) for fault in FAULTS)


async def test_upstream_trouble_is_retried_within_budget_while_callers_keep_their_token(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A renewal meeting 5xx, a timeout, a dropped connection and a 429 retries a bounded
    number of times within the shared budget (no 429 from Monogoto's own limiter), callers
    keep the valid token meanwhile, a fresh token comes once Monogoto recovers, and the
    metrics count every attempt as Monogoto saw it."""
    key, config = limited_config(
        e2e_simulator,
        redis_url,
        ACCOUNTS,
        LIMIT,
        PERIOD_SECONDS,
        upstream={"timeout_seconds": TIMEOUT_SECONDS},
        refresh={"fraction": FRACTION, "min_remaining_seconds": 1},
        lifetime=LIFETIME_SECONDS,
    )
    urls = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    await eventually(lambda: UpstreamCounts.read(e2e_simulator).outcomes["ok"] == 1)
    for fault in FAULTS:
        e2e_simulator.fault(**fault)

    stop = asyncio.Event()
    callers = Callers(Rotation(urls), key, ACCOUNTS, concurrency=20)
    load = asyncio.create_task(callers.run(until=stop))
    name = next(iter(ACCOUNTS))
    # Recovered: every fault was met, and callers moved on to a token issued after them.
    await eventually(
        lambda: (
            all(rule["remaining"] == 0 for rule in e2e_simulator.faults())
            and len(callers.report.tokens[name]) >= 2
        ),
        within=LIFETIME_SECONDS,
    )
    stop.set()
    await load

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    results = upstream_results(urls)
    reliability(
        ReliabilityRow(
            scenario="upstream trouble",
            injected=(
                "at the refresh point: 503 x 2, a 2 s delay (timeout 1 s), a dropped "
                "connection, 429 with Retry-After 2; budget "
                f"{LIMIT} per {PERIOD_SECONDS:.0f} s (Monogoto's limit the same)"
            ),
            callers_saw=f"{report.summary()}; {len(report.tokens[name])} tokens in turn",
            upstream_calls=(
                f"{total.describe()}; broker metrics by result "
                + ", ".join(f"{result} {count}" for result, count in sorted(results.items()))
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert report.failed() == 0, report.summary()
    assert report.problems == []
    assert total.rate_limited == 0
    assert total.reused == 0
    # Bounded: the first login, each faulted attempt once, and one login that succeeded.
    assert total.calls == 1 + INJECTED + 1
    # Each attempt as Monogoto saw it: the delayed call was handled (ok there), timed out here.
    assert results["timeout"] == 1
    assert results["rate_limited"] == 1
    assert results["error"] == 2 + 1  # the 503s and the dropped connection
    assert results["ok"] == total.outcomes["ok"] - 1
    assert sum(results.values()) == total.calls
