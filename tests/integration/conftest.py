"""Integration fixtures: a real simulator process over real HTTP.

- `simulator_users`: the accounts the session simulator knows (username -> password).
- `simulator_url`: base URL of the simulator started once per session.
- `simulator`: a `SimulatorControl` on it, reset before the test (counters, faults,
  rate-limit logs and settings back to the startup defaults of docs/simulator.md).
- `start_simulator`: start an extra simulator with its own CLI flags; stopped at session end.
- `start_replicas`: start broker runtimes (in-process replicas) on the test's Redis and the
  session simulator; stopped after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import yaml

from service.broker.runtime import BrokerRuntime
from service.config import build_settings
from service.keys import new_encryption_key
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


StartReplicas = Callable[..., Coroutine[Any, Any, list[BrokerRuntime]]]

ENCRYPTION_KEYS = new_encryption_key()


def broker_config(
    redis_url: str,
    simulator_url: str,
    users: dict[str, str],
    *,
    accounts: int = 1,
    dialect: str = "v1",
    limit: int = 100,
    period: float = 60.0,
    password: str | None = None,
    max_wait: float = 10.0,
    **refresh: float,
) -> dict[str, Any]:
    """A config with `accounts` accounts `acct-0`... logging in as the simulator's users
    (with `password` instead of theirs if given)."""
    names = sorted(users)
    return {
        "redis_url": redis_url,
        "encryption_keys": ENCRYPTION_KEYS,
        "upstream": {
            "dialect": dialect,
            "base_url": simulator_url,
            "timeout_seconds": 5,
            "auth_rate": {"limit": limit, "period_seconds": period},
        },
        "refresh": {"fraction": 0.75, "min_remaining_seconds": 1, **refresh},
        "api": {"max_wait_seconds": max_wait},
        "accounts": {
            f"acct-{index}": {
                "username": names[index % len(names)],
                "password": password or users[names[index % len(names)]],
            }
            for index in range(accounts)
        },
    }


@pytest.fixture
async def start_replicas(
    redis_url: str, simulator_url: str, simulator_users: dict[str, str]
) -> AsyncIterator[StartReplicas]:
    """A function starting `count` broker runtimes on the test's Redis; stopped after the test."""
    async with AsyncExitStack() as stack:

        async def start(count: int = 1, **options: Any) -> list[BrokerRuntime]:
            config = broker_config(redis_url, simulator_url, simulator_users, **options)
            settings = build_settings(config)
            runtimes = []
            for _ in range(count):
                runtime = await BrokerRuntime.start(settings)
                stack.push_async_callback(runtime.stop)
                runtimes.append(runtime)
            return runtimes

        yield start


def logins(simulator: SimulatorControl) -> int:
    """Successful v1 logins and refreshes the simulator has answered."""
    return simulator.calls("v1_token", "ok") + simulator.calls("v1_refresh", "ok")
