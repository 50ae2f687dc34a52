"""The client against a real broker: `monogoto-broker serve` on real simulators, over HTTP.

- `stack` (session): two simulators (the main one, and one issuing 8-second tokens), one
  broker (`serve --workers 1`, `memory://` store) with the accounts and callers of
  `support.py`, and the callers' keys. Stopped at the end of the session.
- `sim` (autouse): the main simulator's control API, reset before each test (counters,
  faults, settings): a fault left behind would fail the next test's logins.
- `broker`: the broker's counters (`/metrics`).

Every account has a simulator user of its own, so revoking one user's tokens or faulting one
account's logins touches no other test, and each test's forced renewals (one per caller,
account and minute) are its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from clients.python.tests.broker.support import (
    ACCOUNTS,
    CALLERS,
    SHORT,
    SHORT_LIFETIME,
    Broker,
    Simulator,
    Stack,
    new_api_key,
    start_broker,
    start_simulator,
    user_of,
    write_yaml,
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A broker on two simulators, shared by the client's tests."""
    directory = tmp_path_factory.mktemp("client-stack")
    users = {user_of(account): f"pw-{account}" for account in (*ACCOUNTS, SHORT)}
    users_file = write_yaml(directory / "users.yaml", users)
    # No simulator rate limit to speak of: tests log in again and again, and the broker renews
    # the short-lived account every 6 s.
    common = ["--users", str(users_file), "--rate-limit", "100000"]
    with ExitStack() as started:
        main, main_url = start_simulator(common, directory / "simulator.log")
        started.callback(main.stop)
        short, short_url = start_simulator(
            [*common, "--token-lifetime", str(SHORT_LIFETIME)], directory / "short-simulator.log"
        )
        started.callback(short.stop)
        keys, callers = {}, {}
        for name, allowed in CALLERS.items():
            keys[name], digest = new_api_key()
            callers[name] = {"api_key_sha256": digest, "accounts": allowed}
        accounts = {
            account: {"username": user_of(account), "password": users[user_of(account)]}
            for account in ACCOUNTS
        }
        accounts[SHORT] = {
            "username": user_of(SHORT),
            "password": users[user_of(SHORT)],
            "base_url": short_url,
        }
        config = {
            "redis_url": "memory://",
            "upstream": {
                "dialect": "legacy",
                "base_url": main_url,
                "timeout_seconds": 5,
                "auth_rate": {"limit": 100000, "period_seconds": 60},
                # One attempt per renewal: a faulted login makes the broker answer 503 at once.
                "retry": {"max_attempts": 1},
            },
            "refresh": {"min_remaining_seconds": 1},
            "accounts": accounts,
            "callers": callers,
        }
        config_path = write_yaml(directory / "broker.yaml", config)
        broker, broker_url = start_broker(config_path, directory / "broker.log")
        started.callback(broker.stop)
        yield Stack(broker_url, main_url, short_url, keys)


@pytest.fixture(autouse=True)
def sim(stack: Stack) -> Iterator[Simulator]:
    """The main simulator, reset for this test."""
    control = Simulator(stack.simulator_url)
    try:
        control.reset()
        yield control
    finally:
        control.close()


@pytest.fixture
def broker(stack: Stack) -> Broker:
    """The session broker's counters."""
    return Broker(stack.broker_url)
