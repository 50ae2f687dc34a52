"""Monogoto answers 429 with absurd Retry-After values: `inf`, `1e9`, a date a century ahead."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    broker_config,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

# upstream.max_retry_after_seconds, far below its default (300 s) to keep the scenario short.
CAP_SECONDS = 8
_NOW = datetime.now(UTC)
ABSURD = ("inf", "1e9", format_datetime(_NOW.replace(year=_NOW.year + 100), usegmt=True))
ACCOUNTS = {"absurd-v1": account(0, "v1")}
# Three cool-downs of at most the cap each, then the login; generous for a loaded machine.
SERVED_WITHIN_SECONDS = len(ABSURD) * (CAP_SECONDS + 5) + 10


class Watch:
    """Polls, in the background, the simulator's auth calls (when each was counted) and the
    longest shared cool-down Redis holds (the budget's `cooldown` keys)."""

    def __init__(self, simulator: SimulatorControl, redis_url: str) -> None:
        self.calls: list[float] = []
        self.longest_cool_down_ms = 0
        self._simulator = simulator
        self._redis = redis.asyncio.Redis.from_url(redis_url)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Poll until `stop`."""
        try:
            while not self._stop.is_set():
                count = UpstreamCounts.read(self._simulator).calls
                now = time.monotonic()
                self.calls.extend(now for _ in range(count - len(self.calls)))
                async for key in self._redis.scan_iter(match="mgb:{budget:*}:cooldown"):
                    self.longest_cool_down_ms = max(
                        self.longest_cool_down_ms, await self._redis.pttl(key)
                    )
                await asyncio.sleep(0.05)
        finally:
            await self._redis.aclose()

    def stop(self) -> None:
        """End `run` after its current look."""
        self._stop.set()


async def test_absurd_retry_after_is_capped_for_callers_and_the_shared_cool_down(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A cold account's logins meet three 429s whose Retry-After is `inf`, `1e9` and an HTTP
    date a century ahead. Callers get 503 with a Retry-After of at most the cap (never a 500),
    the shared cool-down never exceeds the cap, and once the 429s stop a token comes after
    three cool-downs of at most the cap, not after decades."""
    e2e_simulator.set(token_lifetime_seconds=600, rate_limit=50, rate_period_seconds=10)
    for value in ABSURD:
        e2e_simulator.fault("status", endpoint="v1_token", status=429, retry_after=value)
    key, digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        digest,
        ACCOUNTS,
        upstream={
            "auth_rate": {"limit": 20, "period_seconds": 10},
            "max_retry_after_seconds": CAP_SECONDS,
        },
    )
    watch = Watch(e2e_simulator, redis_url)
    watching = asyncio.create_task(watch.run())
    replicas = await asyncio.to_thread(
        start_brokers, write_config(tmp_path / "broker.yaml", config), 2
    )
    name = next(iter(ACCOUNTS))
    stop = asyncio.Event()
    callers = Callers(
        Rotation([r.url for r in replicas]), key, ACCOUNTS, concurrency=10, pause=0.05
    )
    load = asyncio.create_task(callers.run(until=stop))
    try:
        await eventually(lambda: callers.report.served(name) > 0, within=SERVED_WITHIN_SECONDS)
        await asyncio.sleep(1.0)  # callers keep the token coming
    finally:
        stop.set()
        await load
        watch.stop()
        await watching

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    gaps = [later - earlier for earlier, later in zip(watch.calls, watch.calls[1:], strict=False)]
    reliability(
        ReliabilityRow(
            scenario="absurd Retry-After",
            injected=(
                f"429 with Retry-After {', '.join(repr(value) for value in ABSURD)} on a cold "
                f"account's logins, one after another; 2 replicas, "
                f"max_retry_after_seconds {CAP_SECONDS}"
            ),
            callers_saw=(
                f"{report.summary()}; Retry-After {min(report.retry_after, default=0)}-"
                f"{max(report.retry_after, default=0)} s; longest shared cool-down "
                f"{watch.longest_cool_down_ms / 1000:.1f} s; upstream calls "
                + ", ".join(f"{gap:.1f}" for gap in gaps)
                + " s apart"
            ),
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert report.problems == []
    assert set(report.codes()) <= {"200", "503 upstream_unavailable"}, report.summary()
    assert report.codes()["503 upstream_unavailable"] > 0
    assert len(report.retry_after) == report.failed(), "a 503 without Retry-After"
    assert all(1 <= seconds <= CAP_SECONDS for seconds in report.retry_after)
    # Each 429 cooled the fleet down (Retry-After absent or over the cap: the cap), no longer.
    assert CAP_SECONDS * 1000 - 2000 <= watch.longest_cool_down_ms <= CAP_SECONDS * 1000
    # One call per 429 (each answered by a cool-down, not a retry storm), then the login.
    assert total.outcomes == {"injected_status": len(ABSURD), "ok": 1}
    assert total.rate_limited == 0
    assert all(rule["remaining"] == 0 for rule in e2e_simulator.faults())
    for replica in replicas:
        log = replica.log()
        assert "Traceback" not in log
        assert "refresh failed unexpectedly" not in log
