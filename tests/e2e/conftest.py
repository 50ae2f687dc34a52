"""End-to-end fixtures: broker replicas as real `monogoto-broker serve` processes.

- `start_brokers`: start broker processes on a config file; stopped (SIGTERM) after the test.
- `e2e_simulator`: a simulator process of its own, reset before each test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.simulator.client import SimulatorControl
from service.simulator.process import SimulatorProcess
from tests.support import free_port

_POLL_SECONDS = 0.05


class BrokerProcess:
    """A `monogoto-broker serve` child process, its URL and its log (JSON lines)."""

    def __init__(self, config: Path, log_path: Path, *, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            *(sys.executable, "-m", "service.cli", "serve", "--config", str(config)),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)),
        ]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once `/readyz` answers 200; raise with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"broker exited with {self.process.returncode}:\n{self.log()}"
                    )
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broker not ready in {timeout} s:\n{self.log()}")
                time.sleep(_POLL_SECONDS)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")


StartBrokers = Callable[[Path, int], list[BrokerProcess]]


@pytest.fixture
def start_brokers(tmp_path: Path) -> Iterator[StartBrokers]:
    """A function starting `count` brokers on `config` together; returns once all are ready."""
    started: list[BrokerProcess] = []

    def start(config: Path, count: int) -> list[BrokerProcess]:
        brokers = [
            BrokerProcess(config, tmp_path / f"broker-{len(started) + index}.log")
            for index in range(count)
        ]
        started.extend(brokers)
        for broker in brokers:
            broker.wait_ready()
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
