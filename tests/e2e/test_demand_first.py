"""Demand first: during a cold start that the auth budget takes several windows for, a caller
asking for an account nobody asked for yet gets the next unit of budget, ahead of the
background logins of the accounts nobody reads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from service.broker.budget import WINDOW_MARGIN_SECONDS
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    ReliabilityRow,
    UpstreamCounts,
    account,
    limited_config,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIMIT = 10
PERIOD_SECONDS = 10.0
# The broker widens its window for network jitter (docs/broker.md, shared auth budget).
BROKER_WINDOW_SECONDS = PERIOD_SECONDS + WINDOW_MARGIN_SECONDS
# Time for the login itself, and for a loaded machine.
CALL_SECONDS = 2.0
ACCOUNTS = {f"demand-{index}": account(index) for index in range(30)}
# Three callers, one per replica, each asking for a different account without a token.
ASKED = 3


async def test_a_caller_gets_the_next_unit_ahead_of_background_logins(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """30 accounts on a budget of 10 per 10 s start cold on three replicas: the background
    logins take their units one at a time (paced over the window) and queue the rest. Once a
    window's worth is spent, callers asking for three accounts that have no token yet are
    each served within their budget slot (the units the window frees, one per pace) plus one
    upstream call, not told 503 and not left behind the 20 accounts queued before them: the
    background logins get none of those units meanwhile. Every account logs in once, and
    Monogoto never says 429."""
    key, config = limited_config(
        e2e_simulator,
        redis_url,
        ACCOUNTS,
        LIMIT,
        PERIOD_SECONDS,
        lifetime=60,
        refresh={"fraction": 0.75, "min_remaining_seconds": 5},
    )
    # A caller may wait up to a whole window for its unit.
    config["api"] = {**config.get("api", {}), "max_wait_seconds": BROKER_WINDOW_SECONDS + 4}
    replicas = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]

    def calls() -> dict[str, int]:
        counts = UpstreamCounts.per_account(e2e_simulator, ACCOUNTS)
        return {name: count.calls for name, count in counts.items()}

    # Background logins are paced: a window's units take a window to spend.
    await eventually(lambda: sum(calls().values()) >= LIMIT, within=BROKER_WINDOW_SECONDS + 5)
    before = calls()
    asked = [name for name, count in before.items() if count == 0][-ASKED:]

    async def ask(client: httpx.AsyncClient, replica: str, name: str) -> tuple[int, str, float]:
        started = time.monotonic()
        response = await client.get(
            f"{replica}/v1/accounts/{name}/token", headers={"Authorization": f"Bearer {key}"}
        )
        code = "" if response.status_code == 200 else response.json().get("code", "-")
        return response.status_code, code, time.monotonic() - started

    # The window is full: its units free one per pace, each to the next caller in line.
    slot = ASKED * BROKER_WINDOW_SECONDS / LIMIT
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(ask(client, replica, name) for replica, name in zip(replicas, asked, strict=True))
        )
    served = calls()
    # Units the background logins got while the callers waited (one may have been granted
    # just before the callers' claims reached the queue).
    background = sum(served[name] - before[name] for name in ACCOUNTS if name not in asked)
    await eventually(
        lambda: all(count >= 1 for count in calls().values()),
        within=3 * BROKER_WINDOW_SECONDS + 5,
    )
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="demand first during a cold start",
            injected=(
                f"{len(ACCOUNTS)} accounts on 3 fresh replicas, budget {LIMIT} per "
                f"{PERIOD_SECONDS:.0f} s (Monogoto's limit the same); {ASKED} callers ask for "
                "accounts without a token once a window's worth is spent"
            ),
            callers_saw=", ".join(
                f"{status} {code}".strip() + f" after {seconds:.1f} s"
                for status, code, seconds in answers
            )
            + f" (their units at most {slot:.1f} s away); background logins meanwhile "
            + str(background),
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert [status for status, _, _ in answers] == [200] * ASKED, answers
    assert all(seconds <= slot + CALL_SECONDS for _, _, seconds in answers), (answers, slot)
    assert background <= 1, "the queued background logins took the callers' units"
    assert total.rate_limited == 0
    assert calls() == dict.fromkeys(ACCOUNTS, 1), "one login per account"
