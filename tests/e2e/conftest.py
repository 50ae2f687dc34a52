"""End-to-end fixtures: broker replicas as real `monogoto-broker serve` processes.

- `start_brokers`: start `serve` processes on a config file; stopped (SIGTERM) after the test.
- `e2e_simulator`: a simulator process of its own, with the users of `harness.USERS`, reset
  before each test.
- `reliability`: records the scenario's row of the reliability table on the test's report (so
  it also travels from pytest-xdist workers); `tests/conftest.py` prints all rows at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from service.simulator.client import SimulatorControl
from service.simulator.process import SimulatorProcess
from tests.e2e.harness import RELIABILITY_PROPERTY, USERS, ReliabilityRow
from tests.support import ServeProcess

StartBrokers = Callable[[Path, int], list[ServeProcess]]
Record = Callable[[ReliabilityRow], None]


@pytest.fixture
def start_brokers(tmp_path: Path) -> Iterator[StartBrokers]:
    """A function starting `count` brokers on `config` together; returns once all are ready."""
    started: list[ServeProcess] = []

    def start(config: Path, count: int) -> list[ServeProcess]:
        brokers = [
            ServeProcess(config, tmp_path / f"broker-{len(started) + index}")
            for index in range(count)
        ]
        started.extend(brokers)
        for broker in brokers:
            broker.wait_until_ok()
        return brokers

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture(scope="session")
def e2e_simulator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A simulator process for the end-to-end tests, knowing the users of `harness.USERS`."""
    directory = tmp_path_factory.mktemp("e2e-simulator")
    users = directory / "users.yaml"
    users.write_text(yaml.safe_dump(USERS), encoding="utf-8")
    log_path = directory / "simulator.log"
    with SimulatorProcess.start("--users", str(users), log_path=log_path) as simulator:
        yield simulator.url


@pytest.fixture
def e2e_simulator(e2e_simulator_url: str) -> Iterator[SimulatorControl]:
    """Control of the end-to-end simulator, reset for this test."""
    with SimulatorControl(e2e_simulator_url) as control:
        control.reset()
        yield control


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Record:
    """Record this scenario's row of the reliability table (also printed right away)."""

    def record(row: ReliabilityRow) -> None:
        print(f"\n{row.markdown()}")  # the figures this scenario measured
        request.node.user_properties.append((RELIABILITY_PROPERTY, row.markdown()))

    return record
