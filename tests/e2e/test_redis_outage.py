"""Redis dies for a while and comes back empty, under load, on three replicas."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.conftest import RedisServer
from tests.e2e.harness import (
    Callers,
    Readiness,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    broker_config,
    readiness,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.e2e.conftest import Record, StartBrokers

OUTAGE_SECONDS = 20.0
# Long enough to stay valid, and not due for renewal, for the whole scenario.
LIFETIME_SECONDS = 120.0
ACCOUNTS = {"outage-legacy": account(0, "legacy"), "outage-v1": account(1, "v1")}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: it is killed, and other tests must not notice."""
    executable = shutil.which("redis-server")
    assert executable is not None, "redis-server is not on PATH"
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(executable, directory)
    server.start()
    yield server
    server.stop()


def stored_versions(server: RedisServer) -> dict[str, int]:
    """Each account's record version in Redis (0 if it has none)."""
    with redis.Redis(port=server.port, socket_timeout=5.0) as client:
        return {name: int(client.hget(f"mgb:{{{name}}}:token", "v") or 0) for name in ACCOUNTS}


async def all_ready(urls: list[str], detail_starts: str, into: list[Readiness]) -> bool:
    """Whether every replica's store check detail starts as given; their answers go `into`."""
    said = await asyncio.gather(*(asyncio.to_thread(readiness, url) for url in urls))
    into[:] = said
    return all(r.detail.startswith(detail_starts) for r in said)


async def test_redis_outage_serves_cached_tokens_and_restores_without_logins(
    tmp_path: Path,
    own_redis: RedisServer,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """With Redis dead for 20 s, callers keep getting their still-valid tokens and every replica
    stays ready, saying the store is unreachable; when Redis returns empty, the replicas put
    the records back, with no new login."""
    e2e_simulator.set(token_lifetime_seconds=LIFETIME_SECONDS)
    key, digest = new_api_key()
    config = broker_config(own_redis.url, e2e_simulator.base_url, digest, ACCOUNTS)
    urls = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    every = f"{len(ACCOUNTS)} of {len(ACCOUNTS)} accounts have a valid cached token"
    await eventually(lambda: all_ready(urls, f"reachable; {every}", []), within=20)
    before = stored_versions(own_redis)

    stop = asyncio.Event()
    callers = Callers(Rotation(urls), key, ACCOUNTS, concurrency=20)
    load = asyncio.create_task(callers.run(until=stop))
    own_redis.kill()
    killed_at = time.monotonic()
    during: list[Readiness] = []
    await eventually(lambda: all_ready(urls, "unreachable", during))
    await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - killed_at))  # the outage itself
    served_before_restart = callers.report.served()
    restarted_at = time.monotonic()
    own_redis.start()
    await eventually(lambda: stored_versions(own_redis) == before)
    restored_in = time.monotonic() - restarted_at
    after: list[Readiness] = []
    await eventually(lambda: all_ready(urls, "reachable", after))
    stop.set()
    await load

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="Redis outage",
            injected=(
                f"Redis SIGKILLed for {OUTAGE_SECONDS:.0f} s under load (3 replicas, "
                f"{LIFETIME_SECONDS:.0f} s tokens), restarted empty"
            ),
            callers_saw=(
                f"{report.summary()} ({served_before_restart} by the end of the outage); "
                f"/readyz 200 during (store unreachable, tokens cached) and after; "
                f"records back in Redis {restored_in:.1f} s after the restart began"
            ),
            upstream_calls=f"{total.describe()}: the first logins only, none after the restart",
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    # Static stability: every replica still had every token, so it could serve, and said so.
    assert [r.status for r in during] == [200] * len(urls)
    assert all(every in r.detail for r in during)
    assert [r.status for r in after] == [200] * len(urls)
    assert report.failed() == 0, report.summary()
    assert report.problems == []
    assert served_before_restart > 0
    # Rebuilt from the replicas' memory: the same records, and no login since the first ones.
    assert total.calls == len(ACCOUNTS)
    assert total.rate_limited == 0
    assert total.reused == 0
