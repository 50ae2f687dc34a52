"""Integration fixtures: a real simulator process over real HTTP.

- `simulator_users`: the accounts the session simulator knows (username -> password).
- `simulator_url`: base URL of the simulator started once per session.
- `simulator`: a `SimulatorControl` on it, reset before the test (counters, faults,
  rate-limit logs and settings back to the startup defaults of CONTRACT §1).
- `start_simulator`: start an extra simulator with its own CLI flags; stopped at session end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import yaml

from service.simulator import DEMO_PASSWORD, DEMO_USERNAME
from service.simulator.client import SimulatorControl
from service.simulator.process import SimulatorProcess

SIMULATOR_USERS = {
    DEMO_USERNAME: DEMO_PASSWORD,
    "ops@example.com": "s3cret",
    "fleet@example.com": "fleet-password",
}


@pytest.fixture(scope="session")
def simulator_users() -> dict[str, str]:
    """The users of the session simulator, username -> password."""
    return dict(SIMULATOR_USERS)


@pytest.fixture(scope="session")
def start_simulator(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SimulatorProcess]]:
    """A function that starts a simulator with extra CLI flags on a free port."""
    started: list[SimulatorProcess] = []

    def start(*args: str) -> SimulatorProcess:
        directory = tmp_path_factory.mktemp("simulator")
        process = SimulatorProcess.start(*args, log_path=directory / "simulator.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def simulator_url(
    tmp_path_factory: pytest.TempPathFactory,
    start_simulator: Callable[..., SimulatorProcess],
    simulator_users: dict[str, str],
) -> str:
    """Base URL of the session's simulator, which knows `simulator_users`."""
    users_file = tmp_path_factory.mktemp("simulator-users") / "users.yaml"
    users_file.write_text(yaml.safe_dump(simulator_users), encoding="utf-8")
    return start_simulator("--users", str(users_file)).url


@pytest.fixture
def simulator(simulator_url: str) -> Iterator[SimulatorControl]:
    """Control of the session simulator, freshly reset for this test."""
    with SimulatorControl(simulator_url) as control:
        control.reset()
        yield control
