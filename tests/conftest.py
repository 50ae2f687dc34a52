"""Fixtures shared by every test level: real Redis deployments on free ports (see
`tests/topologies.py`).

- `redis_server`: the session's server process (`RedisServer`). A test that stops or kills it
  must `start()` it again before it ends.
- `redis_url`: the URL of that server, running and emptied (FLUSHALL) for this test.
- `redis_sentinel`: the session's Sentinel set (`RedisSentinelSet`: master, replica, three
  sentinels watching `mymaster`). A test may kill its master; the next test restores it.
- `sentinel_url`: its `redis+sentinel://` URL, every process back up (the master may be either
  data node) and emptied for this test.
- `redis_cluster`: the session's Redis Cluster of three masters (`RedisClusterSet`).
- `cluster_url`: its `redis+cluster://` URL, every node back up and emptied for this test.
- `redis_cluster_with_replicas`: the session's Redis Cluster of three masters with one replica
  each; started only if a test asks for it (as are the two above).
- `replicated_cluster_url`: like `cluster_url`, for that cluster.

The Redis fixtures fail the test if `redis-server` (or, for a cluster, `redis-cli`) is not on
PATH. Session fixtures exist once per pytest-xdist worker.

At the end of a run it prints the reliability table of the end-to-end scenarios that ran
(this conftest is the one pytest-xdist's controller loads).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from tests.e2e.harness import RELIABILITY_PROPERTY, TABLE_HEADER
from tests.topologies import RedisClusterSet, RedisSentinelSet

# Re-exported (`as`): the tests import it from here for their type hints.
from tests.topologies import RedisServer as RedisServer  # noqa: PLC0414


def _executable(name: str) -> str:
    """The path of `redis-server` or `redis-cli`; the test fails if it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: the integration tests need a real Redis. "
            "Install it (Debian/Ubuntu: `apt-get install redis-server`; macOS: "
            "`brew install redis`) and run the tests again."
        )
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real `redis-server` for the whole session."""
    server = RedisServer(_executable("redis-server"), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's Redis, running and empty."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url


Deployment = TypeVar("Deployment", RedisSentinelSet, RedisClusterSet)

#: Attempts at starting a deployment whose free ports another process took meanwhile.
_PORT_CLASH_ATTEMPTS = 3


def _started(make: Callable[[], Deployment]) -> Deployment:
    """A deployment made by `make` and started; made again on other free ports if a port it
    was given was taken before its server could bind it (`free_port` only finds a port that
    is free now)."""
    for attempt in range(1, _PORT_CLASH_ATTEMPTS + 1):
        deployment = make()
        try:
            deployment.start()
        except RuntimeError as error:
            if "Address already in use" not in str(error) or attempt == _PORT_CLASH_ATTEMPTS:
                raise
            continue
        return deployment
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelSet]:
    """A real Sentinel deployment (master, replica, three sentinels) for the whole session."""
    topology = _started(
        lambda: RedisSentinelSet(
            _executable("redis-server"), tmp_path_factory.mktemp("redis-sentinel")
        )
    )
    yield topology
    topology.stop()


@pytest.fixture
def sentinel_url(redis_sentinel: RedisSentinelSet) -> str:
    """The `redis+sentinel://` URL of the session's Sentinel set, healthy and empty."""
    redis_sentinel.restore()
    redis_sentinel.flush()
    return redis_sentinel.url


def _cluster(
    tmp_path_factory: pytest.TempPathFactory, replicas_per_master: int
) -> Iterator[RedisClusterSet]:
    topology = _started(
        lambda: RedisClusterSet(
            _executable("redis-server"),
            _executable("redis-cli"),
            tmp_path_factory.mktemp("redis-cluster"),
            masters=3,
            replicas_per_master=replicas_per_master,
        )
    )
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    """A real Redis Cluster of three masters without replicas for the whole session."""
    yield from _cluster(tmp_path_factory, replicas_per_master=0)


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterSet) -> str:
    """The `redis+cluster://` URL of the session's cluster, healthy and empty."""
    redis_cluster.restore()
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_cluster_with_replicas(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterSet]:
    """A real Redis Cluster of three masters with one replica each for the whole session."""
    yield from _cluster(tmp_path_factory, replicas_per_master=1)


@pytest.fixture
def replicated_cluster_url(redis_cluster_with_replicas: RedisClusterSet) -> str:
    """The `redis+cluster://` URL of the session's replicated cluster, healthy and empty."""
    redis_cluster_with_replicas.restore()
    redis_cluster_with_replicas.flush()
    return redis_cluster_with_replicas.url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the reliability table of the scenarios that ran, passed or failed."""
    rows = [
        str(value)
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if getattr(report, "when", None) == "call"
        for name, value in report.user_properties
        if name == RELIABILITY_PROPERTY
    ]
    if rows:
        terminalreporter.section("reliability (end-to-end scenarios)")
        terminalreporter.write_line(TABLE_HEADER)
        for row in sorted(rows):
            terminalreporter.write_line(row)
