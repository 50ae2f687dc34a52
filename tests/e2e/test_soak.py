"""Soak: steady load on three replicas for ten minutes, with token lifetimes of seconds.

Opt-in (`.venv/bin/pytest -m soak -n 0 -s tests/e2e/test_soak.py`); `SOAK_SECONDS` shortens or
lengthens the run (default 600).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import redis

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
from tests.support import ServeProcess

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 10.0
FRACTION = 0.5
REPLICAS = 3
SAMPLE_SECONDS = 5.0
# Memory may settle a little after warm-up (allocator arenas, caches filling): beyond this, it
# grows with the run, which is a leak.
RSS_TOLERANCE = 1.10
RSS_SLACK_BYTES = 4 * 1024 * 1024
# Sockets and descriptors come and go with the load (callers' keep-alive connections among
# them); a leak grows past this.
COUNT_SLACK = {"fds": 10, "threads": 2, "redis_connections": 5, "upstream_connections": 5}
REDIS_CLIENTS_SLACK = 5
ACCOUNTS = {"soak-v1": account(11, "v1"), "soak-legacy": account(1, "legacy")}


@dataclass(frozen=True)
class Sample:
    """One replica's resources at one moment."""

    rss: int
    fds: int
    threads: int
    redis_connections: int
    upstream_connections: int


@dataclass
class Samples:
    """Resources of every replica, and Redis's client count, sampled through the run."""

    replicas: dict[int, list[tuple[float, Sample]]] = field(default_factory=dict)
    redis_clients: list[tuple[float, int]] = field(default_factory=list)


def sample(process: psutil.Process, redis_port: int, upstream_port: int) -> Sample:
    """The resources of `process` and its children right now."""
    processes = [process, *process.children(recursive=True)]
    connections = [c for p in processes for c in p.net_connections(kind="tcp")]
    return Sample(
        rss=sum(p.memory_info().rss for p in processes),
        fds=sum(p.num_fds() for p in processes),
        threads=sum(p.num_threads() for p in processes),
        redis_connections=sum(1 for c in connections if c.raddr and c.raddr.port == redis_port),
        upstream_connections=sum(
            1 for c in connections if c.raddr and c.raddr.port == upstream_port
        ),
    )


async def watch(
    replicas: list[ServeProcess],
    redis_url: str,
    upstream_port: int,
    samples: Samples,
    stop: asyncio.Event,
) -> None:
    """Sample every `SAMPLE_SECONDS` until `stop` is set."""
    processes = {index: psutil.Process(r.process.pid) for index, r in enumerate(replicas)}
    client = redis.Redis.from_url(redis_url)
    redis_port = client.connection_pool.connection_kwargs["port"]
    started = time.monotonic()
    try:
        while not stop.is_set():
            now = time.monotonic() - started
            for index, process in processes.items():
                found = sample(process, redis_port, upstream_port)
                samples.replicas.setdefault(index, []).append((now, found))
            clients = int(client.info("clients")["connected_clients"])
            samples.redis_clients.append((now, clients))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)
    finally:
        client.close()


def between(series: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """The values sampled from `start` to `end` seconds into the run."""
    return [value for at, value in series if start <= at <= end]


@pytest.mark.soak
async def test_soak_keeps_memory_sockets_and_refreshes_flat(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Under steady load for the whole run, every caller gets a valid token, tokens are
    renewed once per cycle, and no replica's memory, descriptors or connections (nor Redis's
    client count) keep growing."""
    duration = float(os.environ.get("SOAK_SECONDS", "600"))
    window = min(60.0, duration / 4)  # after a window of warm-up, compare first and last
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
    started = time.monotonic()
    replicas = start_brokers(write_config(tmp_path / "broker.yaml", config), REPLICAS)
    callers = Callers(Rotation([r.url for r in replicas]), key, ACCOUNTS, concurrency=30)
    samples = Samples()
    stop = asyncio.Event()
    upstream_port = int(e2e_simulator.base_url.rsplit(":", 1)[1].split("/")[0])
    watcher = asyncio.create_task(watch(replicas, redis_url, upstream_port, samples, stop))
    try:
        await callers.run(duration)
    finally:
        stop.set()
        await watcher
    elapsed = time.monotonic() - started

    report = callers.report
    cadence = Cadence.read(
        e2e_simulator,
        ACCOUNTS,
        elapsed=elapsed,
        fraction=FRACTION,
        lifetime=LIFETIME_SECONDS,
    )
    first = (window, 2 * window)
    last = (duration - window, duration + SAMPLE_SECONDS)
    growth: list[str] = []
    figures: list[str] = []
    for index, series in samples.replicas.items():
        for name in ("rss", *COUNT_SLACK):
            values = [(at, float(getattr(found, name))) for at, found in series]
            before, after = between(values, *first), between(values, *last)
            assert before, f"no samples from {first[0]:.0f} to {first[1]:.0f} s"
            assert after, f"no samples after {last[0]:.0f} s"
            if name == "rss":
                mean_before, mean_after = statistics.mean(before), statistics.mean(after)
                figures.append(
                    f"r{index} RSS {mean_before / 2**20:.1f}->{mean_after / 2**20:.1f} MiB"
                )
                if mean_after > mean_before * RSS_TOLERANCE + RSS_SLACK_BYTES:
                    growth.append(f"replica {index} {name}: {mean_before:.0f} -> {mean_after:.0f}")
            else:
                figures.append(f"r{index} {name} {max(before):.0f}->{max(after):.0f}")
                if max(after) > max(before) + COUNT_SLACK[name]:
                    growth.append(f"replica {index} {name}: {max(before):.0f} -> {max(after):.0f}")
    clients = [(at, float(count)) for at, count in samples.redis_clients]
    clients_before, clients_after = between(clients, *first), between(clients, *last)
    figures.append(f"redis clients {max(clients_before):.0f}->{max(clients_after):.0f}")
    if max(clients_after) > max(clients_before) + REDIS_CLIENTS_SLACK:
        growth.append(f"redis clients: {max(clients_before):.0f} -> {max(clients_after):.0f}")
    print("\nsoak figures (first window -> last window): " + "; ".join(figures))

    reliability(
        ReliabilityRow(
            scenario="soak",
            injected=(
                f"none: {REPLICAS} replicas, 30 callers for {duration:.0f} s, "
                f"{LIFETIME_SECONDS:.0f} s token lifetime, 2 accounts"
            ),
            callers_saw=report.summary(),
            upstream_calls=(
                f"{cadence.describe()}; resources flat: {'yes' if not growth else 'NO'}"
            ),
            rate_limited=cadence.total.rate_limited,
            reused=cadence.total.reused,
        )
    )
    cadence.check(report, duration)
    assert growth == []
    for replica in replicas:
        assert replica.stop() == 0
