"""Redis dies and comes back empty in the middle of a cold-start burst over budget."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    limited_config,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.conftest import RedisServer
    from tests.e2e.conftest import Record, StartBrokers

LIMIT = 5
PERIOD_SECONDS = 10.0
# All v1: every login goes to the one simulator endpoint whose limit equals the broker's budget
# (the simulator limits each endpoint apart, the broker counts them together).
ACCOUNTS = {f"restart-{index}": account(index, "v1") for index in range(8)}
SERVED_WITHIN_SECONDS = 45.0


class LoginClock:
    """When (monotonic) the simulator counted each successful login, polled in the background."""

    def __init__(self, simulator: SimulatorControl) -> None:
        self.times: list[float] = []
        self._simulator = simulator
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Poll until `stop`."""
        while not self._stop.is_set():
            self.poll()
            await asyncio.sleep(0.05)
        self.poll()

    def poll(self) -> None:
        """Note the logins counted since the last look (all at the time of this look)."""
        count = self._simulator.calls("v1_token", outcome="ok")
        now = time.monotonic()
        self.times.extend(now for _ in range(count - len(self.times)))

    def stop(self) -> None:
        """End `run` after its next look."""
        self._stop.set()


async def test_redis_restarted_empty_mid_burst_costs_no_429(
    tmp_path: Path,
    redis_url: str,
    redis_server: RedisServer,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Eight accounts on three fresh replicas with budget for five per window; once the first
    window's five logins are spent, Redis is SIGKILLed and restarted empty (budget log,
    cool-down and locks gone). The fleet holds the budget back for a window instead of
    spending a second one at once: no 429 from Monogoto, each account logged in once, and
    every account served in the end."""
    key, config = limited_config(
        e2e_simulator, redis_url, ACCOUNTS, LIMIT, PERIOD_SECONDS, lifetime=600
    )
    logins = LoginClock(e2e_simulator)
    watching = asyncio.create_task(logins.run())
    started = time.monotonic()
    replicas = await asyncio.to_thread(
        start_brokers, write_config(tmp_path / "broker.yaml", config), 3
    )
    stop = asyncio.Event()
    callers = Callers(
        Rotation([r.url for r in replicas]), key, ACCOUNTS, concurrency=16, pause=0.05
    )
    load = asyncio.create_task(callers.run(until=stop))
    try:
        # The refreshers log in at once: the first window's budget is spent within seconds.
        await eventually(lambda: len(logins.times) >= LIMIT, within=20)
        redis_server.kill()
        killed_at = time.monotonic()
        redis_server.start()
        restarted_at = time.monotonic()
        await eventually(
            lambda: all(callers.report.served(name) > 0 for name in ACCOUNTS),
            within=SERVED_WITHIN_SECONDS,
        )
        served_at = time.monotonic()
    finally:
        redis_server.start()  # the session's Redis must run when this test ends
        stop.set()
        await load
        logins.stop()
        await watching

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    per_account = {
        name: counts.calls
        for name, counts in UpstreamCounts.per_account(e2e_simulator, ACCOUNTS).items()
    }
    first, after_restart = logins.times[0], logins.times[LIMIT:]
    # When Monogoto's own window would have admitted the next login, and when it came.
    window_frees = first + PERIOD_SECONDS - restarted_at
    next_login = (after_restart[0] - restarted_at) if after_restart else float("nan")
    reliability(
        ReliabilityRow(
            scenario="Redis restarted empty mid-burst",
            injected=(
                f"{len(ACCOUNTS)} v1 accounts on 3 fresh replicas, budget {LIMIT} per "
                f"{PERIOD_SECONDS:.0f} s (Monogoto's limit the same); Redis SIGKILLed "
                f"{killed_at - first:.1f} s after the first login, once {LIMIT} were spent, "
                "and restarted empty at once"
            ),
            callers_saw=(
                f"{report.summary()}; every account served {served_at - started:.1f} s after "
                f"the start; first login after the restart {next_login:.1f} s after it (Monogoto "
                f"would have taken one after {max(0.0, window_frees):.1f} s)"
            ),
            upstream_calls=f"{total.describe()}; per account {sorted(per_account.values())}",
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert total.rate_limited == 0
    assert total.reused == 0
    assert set(report.codes()) <= {"200", "503 upstream_unavailable"}, report.summary()
    assert report.problems == []
    # Each account logged in once: the five records were written back by the replicas that
    # held them, not obtained again.
    assert per_account == dict.fromkeys(ACCOUNTS, 1)
    assert total.calls == len(ACCOUNTS)
    for replica in replicas:
        assert replica.process.poll() is None, replica.log()
