"""Cold start with more accounts than the auth budget allows per window, all asked for at once."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass, field
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

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIMIT = 3
PERIOD_SECONDS = 4.0
# The broker widens its window for network jitter (docs/broker.md, shared auth budget).
BROKER_WINDOW_SECONDS = PERIOD_SECONDS + WINDOW_MARGIN_SECONDS
ACCOUNTS = {f"burst-{index}": account(index, "v1" if index % 2 else "legacy") for index in range(8)}
CALLERS_PER_ACCOUNT = 3
GIVE_UP_SECONDS = 60.0


@dataclass
class Caller:
    """One service that wants one account's token and honours Retry-After."""

    account: str
    retry_after: list[int] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    served: bool = False
    # Seconds from the first request until served.
    waited: float = 0.0


async def ask_until_served(
    client: httpx.AsyncClient, replicas: list[str], key: str, caller: Caller, index: int
) -> None:
    """Ask (each time at the next replica) until served; on 503 wait exactly its Retry-After."""
    headers = {"Authorization": f"Bearer {key}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GIVE_UP_SECONDS
    while loop.time() < deadline:
        url = f"{replicas[index % len(replicas)]}/v1/accounts/{caller.account}/token"
        index += 1
        response = await client.get(url, headers=headers)
        if response.status_code == 200:
            caller.answers["200"] += 1
            caller.served = True
            caller.waited = loop.time() - deadline + GIVE_UP_SECONDS
            return
        caller.answers[f"{response.status_code} {response.json().get('code', '-')}"] += 1
        if response.status_code != 503 or "Retry-After" not in response.headers:
            return  # anything else is a failure the test reports
        seconds = int(response.headers["Retry-After"])
        caller.retry_after.append(seconds)
        await asyncio.sleep(seconds)  # what an honest caller does: come back when told


async def test_cold_start_over_budget_serves_every_account_without_a_429(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Eight accounts asked for at once on three fresh replicas, with budget for three per
    window: every caller is served in the end, waiting for its account's unit of budget (or
    told an honest Retry-After when that would take longer than api.max_wait_seconds), with
    one login per account and no 429 from Monogoto."""
    key, config = limited_config(
        e2e_simulator, redis_url, ACCOUNTS, LIMIT, PERIOD_SECONDS, lifetime=600
    )
    replicas = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    callers = [Caller(name) for name in ACCOUNTS for _ in range(CALLERS_PER_ACCOUNT)]
    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(
            *(
                ask_until_served(client, replicas, key, caller, index)
                for index, caller in enumerate(callers)
            )
        )

    answers = sum((caller.answers for caller in callers), Counter[str]())
    retry_after = [seconds for caller in callers for seconds in caller.retry_after]
    per_account = {
        name: counts.calls
        for name, counts in UpstreamCounts.per_account(e2e_simulator, ACCOUNTS).items()
    }
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="cold-start burst over budget",
            injected=(
                f"{len(ACCOUNTS)} accounts, {len(callers)} callers at once on 3 fresh replicas; "
                f"budget {LIMIT} per {PERIOD_SECONDS:.0f} s (Monogoto's limit the same)"
            ),
            callers_saw=(
                ", ".join(f"{count} x {code}" for code, count in sorted(answers.items()))
                + f"; Retry-After {min(retry_after, default=0)}-{max(retry_after, default=0)} s"
                + f", at most {max(len(c.retry_after) for c in callers)} waits per caller"
                + f"; the last served after {max(c.waited for c in callers):.1f} s"
            ),
            upstream_calls=f"{total.describe()}; per account {sorted(per_account.values())}",
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert all(caller.served for caller in callers), answers
    assert set(answers) <= {"200", "503 upstream_unavailable"}
    assert max(caller.waited for caller in callers) > BROKER_WINDOW_SECONDS, (
        "the burst should have exceeded the budget"
    )
    # Honest: never longer than the window, and a caller coming back when told finds the
    # budget moved on: each further wait means another account took the freed unit, and
    # there are only len(ACCOUNTS) - 1 other accounts.
    assert all(1 <= seconds <= math.ceil(BROKER_WINDOW_SECONDS) for seconds in retry_after)
    assert all(len(caller.retry_after) <= len(ACCOUNTS) for caller in callers)
    assert total.rate_limited == 0
    assert per_account == dict.fromkeys(ACCOUNTS, 1)
    assert total.calls == len(ACCOUNTS)
