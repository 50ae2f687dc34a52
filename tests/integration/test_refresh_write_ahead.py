"""A refresh token is noted as spent in the store before it is sent (broker.md rule 7), so a
replica that dies mid-refresh leaves no refresh token for another replica to send twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.broker.runtime import BrokerRuntime
from service.config import build_settings
from service.keys import new_encryption_key
from service.simulator.client import SimulatorControl
from tests.support import eventually

ACCOUNT = "acct-0"


@pytest.fixture
async def replicas(
    redis_url: str, simulator_url: str, simulator_users: dict[str, str]
) -> AsyncIterator[list[BrokerRuntime]]:
    """Two broker runtimes on the test's Redis with one v1 account; stopped after the test."""
    username = sorted(simulator_users)[0]
    config: dict[str, Any] = {
        "redis_url": redis_url,
        "encryption_keys": new_encryption_key(),
        "upstream": {
            "dialect": "v1",
            "base_url": simulator_url,
            "timeout_seconds": 5,
            "auth_rate": {"limit": 100, "period_seconds": 60},
        },
        "refresh": {"fraction": 0.75, "min_remaining_seconds": 1},
        "accounts": {ACCOUNT: {"username": username, "password": simulator_users[username]}},
    }
    settings = build_settings(config)
    started = [await BrokerRuntime.start(settings) for _ in range(2)]
    yield started
    for runtime in started:
        await runtime.stop()


async def test_a_renewal_cut_off_mid_refresh_leaves_no_refresh_token_to_reuse(
    replicas: list[BrokerRuntime], simulator: SimulatorControl
) -> None:
    """While a refresh is in flight the stored record has no refresh token; when its replica
    dies, the next renewal logs in instead of sending the (spent) refresh token again."""
    simulator.set(token_lifetime_seconds=600)
    first, second = replicas
    old = await first.broker.get(ACCOUNT)
    simulator.fault("delay", endpoint="v1_refresh", seconds=3)
    cut_off = asyncio.ensure_future(first.broker.invalidate(ACCOUNT, old.access_token))
    await eventually(lambda: simulator.calls("v1_refresh", "ok") == 1)

    def refresh_token_noted_spent() -> bool:
        seen = second.broker.state(ACCOUNT).token
        return seen is not None and seen.record.refresh_token is None

    # The other replica learns of the note through the store, before Monogoto answers.
    await eventually(refresh_token_noted_spent, within=2)
    seen = second.broker.state(ACCOUNT).token
    assert seen is not None
    assert seen.access_token == old.access_token, "the valid access token stays in use"

    await first.broker.cancel_flights(within=5)  # the replica dies before Monogoto answers
    with pytest.raises(asyncio.CancelledError):
        await cut_off
    new = await second.broker.invalidate(ACCOUNT, old.access_token)

    assert new.access_token != old.access_token
    assert simulator.calls("v1_refresh", "refresh_reused") == 0
    assert simulator.calls("v1_token", "ok") == 2  # the first login, and the one replacing it
