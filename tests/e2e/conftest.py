"""End-to-end fixtures: broker replicas as real `monogoto-broker serve` processes.

- `start_brokers`: start `serve` processes on a config file; stopped (SIGTERM) after the test.
- `e2e_simulator`: a simulator process of its own, reset before each test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.simulator.client import SimulatorControl
from service.simulator.process import SimulatorProcess
from tests.support import ServeProcess

StartBrokers = Callable[[Path, int], list[ServeProcess]]


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
    """A simulator process for the end-to-end tests, with the documented demo user."""
    log_path = tmp_path_factory.mktemp("e2e-simulator") / "simulator.log"
    with SimulatorProcess.start(log_path=log_path) as simulator:
        yield simulator.url


@pytest.fixture
def e2e_simulator(e2e_simulator_url: str) -> Iterator[SimulatorControl]:
    """Control of the end-to-end simulator, reset for this test."""
    with SimulatorControl(e2e_simulator_url) as control:
        control.reset()
        yield control
