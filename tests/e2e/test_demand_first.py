"""Demand first: during a cold start that the auth budget takes several windows for, a caller
asking for an account nobody asked for yet gets the next unit of budget, ahead of the
background logins of the accounts nobody reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
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
# A budget the cold start's logins do not fill: 20 accounts, 20 units per 20 s window.
PLENTY = {f"plenty-{index}": account(index) for index in range(20)}
PLENTY_LIMIT = 20
PLENTY_PERIOD_SECONDS = 20.0


def calls(simulator: SimulatorControl, accounts: Mapping[str, Mapping[str, str]]) -> dict[str, int]:
    """The upstream calls made for each of `accounts`."""
    counts = UpstreamCounts.per_account(simulator, accounts)
    return {name: count.calls for name, count in counts.items()}


async def ask_each(replicas: list[str], names: list[str], key: str) -> list[tuple[int, str, float]]:
    """Ask for the token of `names[i]` through `replicas[i]`, all at once: each answer's status,
    problem code ('' for 200) and seconds."""

    async def ask(client: httpx.AsyncClient, replica: str, name: str) -> tuple[int, str, float]:
        started = time.monotonic()
        response = await client.get(
            f"{replica}/v1/accounts/{name}/token", headers={"Authorization": f"Bearer {key}"}
        )
        code = "" if response.status_code == 200 else response.json().get("code", "-")
        return response.status_code, code, time.monotonic() - started

    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(ask(client, replica, name) for replica, name in zip(replicas, names, strict=True))
        )


def describe(answers: list[tuple[int, str, float]]) -> str:
    """The answers as the reliability table shows them."""
    return ", ".join(
        f"{status} {code}".strip() + f" after {seconds:.1f} s" for status, code, seconds in answers
    )


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

    # Background logins are paced: a window's units take a window to spend.
    await eventually(
        lambda: sum(calls(e2e_simulator, ACCOUNTS).values()) >= LIMIT,
        within=BROKER_WINDOW_SECONDS + 5,
    )
    before = calls(e2e_simulator, ACCOUNTS)
    asked = [name for name, count in before.items() if count == 0][-ASKED:]
    # The window is full: its units free one per pace, each to the next caller in line.
    slot = ASKED * BROKER_WINDOW_SECONDS / LIMIT
    answers = await ask_each(replicas, asked, key)
    served = calls(e2e_simulator, ACCOUNTS)
    # Units the background logins got while the callers waited (one may have been granted
    # just before the callers' claims reached the queue).
    background = sum(served[name] - before[name] for name in ACCOUNTS if name not in asked)
    await eventually(
        lambda: all(count >= 1 for count in calls(e2e_simulator, ACCOUNTS).values()),
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
            callers_saw=describe(answers)
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
    assert calls(e2e_simulator, ACCOUNTS) == dict.fromkeys(ACCOUNTS, 1), "one login per account"


async def test_a_caller_is_not_held_back_by_another_replicas_paced_login(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """20 accounts start cold on three replicas with units to spare (20 per 20 s): the
    background logins are paced, one unit every 1.05 s, and each holds its account's lock,
    on any replica, while it waits for its turn. Callers on the three replicas asking for
    accounts without a token are each served within one pace plus one upstream call: the login
    holding the lock takes the caller's claim and is no longer paced, instead of waiting its
    turn among the others (up to 20 s). Every account logs in once, and Monogoto never says
    429."""
    key, config = limited_config(
        e2e_simulator,
        redis_url,
        PLENTY,
        PLENTY_LIMIT,
        PLENTY_PERIOD_SECONDS,
        lifetime=120,
        refresh={"fraction": 0.75, "min_remaining_seconds": 5},
    )
    replicas = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    before = calls(e2e_simulator, PLENTY)
    asked = [name for name, count in before.items() if count == 0][-ASKED:]
    assert len(asked) == ASKED, "the cold start was over before the callers asked"
    pace = (PLENTY_PERIOD_SECONDS + WINDOW_MARGIN_SECONDS) / PLENTY_LIMIT
    answers = await ask_each(replicas, asked, key)
    await eventually(
        lambda: all(count >= 1 for count in calls(e2e_simulator, PLENTY).values()),
        within=PLENTY_PERIOD_SECONDS + WINDOW_MARGIN_SECONDS + 10,
    )
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="demand first with units to spare",
            injected=(
                f"{len(PLENTY)} accounts on 3 fresh replicas, budget {PLENTY_LIMIT} per "
                f"{PLENTY_PERIOD_SECONDS:.0f} s (Monogoto's limit the same); {ASKED} callers ask "
                f"for accounts without a token while the paced logins (one per {pace:.2f} s) "
                "hold their locks"
            ),
            callers_saw=describe(answers),
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert [status for status, _, _ in answers] == [200] * ASKED, answers
    assert all(seconds <= pace + CALL_SECONDS for _, _, seconds in answers), (answers, pace)
    assert total.rate_limited == 0
    assert calls(e2e_simulator, PLENTY) == dict.fromkeys(PLENTY, 1), "one login per account"
