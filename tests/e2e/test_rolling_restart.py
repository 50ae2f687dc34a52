"""A rolling restart of three replicas under load, as a Kubernetes rollout performs it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

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

ACCOUNTS = {"rolling-v1": account(5, "v1"), "rolling-legacy": account(6, "legacy")}
REPLICAS = 3


class TrackedRotation(Rotation):
    """A rotation that knows how many requests each replica still has in flight, so a replica
    is stopped only once the load balancer has drained it (as a preStop hook would wait)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(urls)
        self.in_flight: Counter[str] = Counter()
        self._picked: dict[asyncio.Task[object] | None, str] = {}

    def pick(self) -> str:
        """A replica at random, counted in flight until the calling task's request ends."""
        url = super().pick()
        self.in_flight[url] += 1
        self._picked[asyncio.current_task()] = url
        return url

    def done(self) -> None:
        """The calling task's request has ended."""
        url = self._picked.pop(asyncio.current_task(), None)
        if url is not None:
            self.in_flight[url] -= 1


class TrackedCallers(Callers):
    """Callers that tell their `TrackedRotation` when each request ends."""

    rotation: TrackedRotation

    async def call(self, client: httpx.AsyncClient, name: str) -> None:
        """One token request, counted in flight on its replica while it lasts."""
        try:
            await super().call(client, name)
        finally:
            self.rotation.done()


def drained(rotation: TrackedRotation, url: str) -> Callable[[], bool]:
    """Whether `url` has no request in flight any more."""
    return lambda: rotation.in_flight[url] == 0


def answered_more(callers: Callers, count: int) -> Callable[[], bool]:
    """Whether the callers have had `count` more answers than they have now."""
    target = callers.report.requests + count
    return lambda: callers.report.requests >= target


async def test_rolling_restart_loses_no_request_and_costs_no_login(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Replacing every replica one by one under load fails no caller request, every replica
    exits cleanly, and the fleet logs each account in once for the whole rollout."""
    e2e_simulator.set(token_lifetime_seconds=3600)
    key, digest = new_api_key()
    config = write_config(
        tmp_path / "broker.yaml", broker_config(redis_url, e2e_simulator.base_url, digest, ACCOUNTS)
    )
    replicas = start_brokers(config, REPLICAS)
    rotation = TrackedRotation([replica.url for replica in replicas])
    callers = TrackedCallers(rotation, key, ACCOUNTS, concurrency=40)
    stop = asyncio.Event()
    load = asyncio.create_task(callers.run(until=stop))
    exit_codes: list[int] = []
    started = time.monotonic()
    try:
        await eventually(answered_more(callers, 100), within=30)
        for old in replicas:
            # The replacement starts while the old replica drains and stops (a surge of one).
            replacement = asyncio.create_task(asyncio.to_thread(start_brokers, config, 1))
            rotation.urls.remove(old.url)
            await eventually(drained(rotation, old.url), within=30)
            exit_codes.append(await asyncio.to_thread(old.stop))
            [new] = await replacement
            rotation.urls.append(new.url)
            await eventually(answered_more(callers, 50), within=30)
    finally:
        stop.set()
        await load
    elapsed = time.monotonic() - started

    report = callers.report
    upstream = UpstreamCounts.per_account(e2e_simulator, ACCOUNTS)
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="rolling restart",
            injected=(
                f"{REPLICAS} replicas replaced one by one (out of rotation, SIGTERM, new one "
                f"ready, into rotation) under 40 callers, {elapsed:.0f} s, 2 accounts"
            ),
            callers_saw=report.summary(),
            upstream_calls=(
                f"{total.describe()}; per account "
                f"{ {name: counts.calls for name, counts in upstream.items()} }"
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert exit_codes == [0] * REPLICAS
    assert report.problems == []
    assert report.failed() == 0
    for name in ACCOUNTS:
        assert report.served(name) > 100
        assert upstream[name].calls == 1, f"{name}: logged in more than once"
        assert len(report.tokens[name]) == 1, f"{name}: callers saw more than one token"
    assert total.rate_limited == 0
