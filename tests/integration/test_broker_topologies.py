"""The broker on a Redis Sentinel set: refreshes wait for a replica to hold the note that spends
the refresh token, and log in instead when none acknowledges in time. And what it logs when
its store, of any topology, cannot be reached."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from service.broker.runtime import BrokerRuntime
from service.config import build_settings
from service.simulator.client import SimulatorControl
from tests.integration.conftest import broker_config
from tests.support import free_port
from tests.topologies import RedisSentinelSet

UNREPLICATED = "monogoto_broker_store_unreplicated_notes_total"


@pytest.fixture
async def replica_on_sentinel(
    sentinel_url: str, simulator_url: str, simulator_users: dict[str, str]
) -> AsyncIterator[BrokerRuntime]:
    """One broker runtime with a v1 account, its store behind Sentinel."""
    settings = build_settings(broker_config(sentinel_url, simulator_url, simulator_users))
    runtime = await BrokerRuntime.start(settings)
    yield runtime
    await runtime.stop()


def counts(simulator: SimulatorControl) -> tuple[int, int]:
    """Successful v1 logins and refreshes so far."""
    return simulator.calls("v1_token", "ok"), simulator.calls("v1_refresh", "ok")


def unreplicated() -> float:
    """Notes no replica acknowledged, as this process counted them."""
    return REGISTRY.get_sample_value(UNREPLICATED) or 0.0


async def test_a_refresh_is_sent_only_once_a_replica_holds_its_note(
    redis_sentinel: RedisSentinelSet,
    replica_on_sentinel: BrokerRuntime,
    simulator: SimulatorControl,
) -> None:
    """With the replica answering, a renewal refreshes; with the replica frozen, the note that
    would spend the refresh token is not acknowledged, so the broker logs in instead and the
    refresh token is never sent (a failover then could not bring a spent one back)."""
    broker = replica_on_sentinel.broker
    first = await broker.get("acct-0")
    logins, refreshes = counts(simulator)

    # Two callers, as each may force one renewal of an account a minute.
    second = await broker.invalidate("acct-0", first.access_token, caller="billing")
    assert second.access_token != first.access_token
    assert counts(simulator) == (logins, refreshes + 1), "a refresh, not a login"

    before = unreplicated()
    with redis_sentinel.replica().paused():
        third = await broker.invalidate("acct-0", second.access_token, caller="telemetry")
    assert third.access_token != second.access_token
    assert counts(simulator) == (logins + 1, refreshes + 1), "a login, not a refresh"
    assert unreplicated() == before + 1
    assert simulator.calls("v1_refresh", "refresh_reused") == 0


@pytest.mark.parametrize(
    ("template", "where"),
    [
        ("redis://:hunter2@127.0.0.1:{port}/3", "127.0.0.1:{port}/3"),
        (
            "redis+sentinel://:hunter2@127.0.0.1:{port}/mymaster?sentinel_password=hunter2",
            "master 'mymaster' of sentinels 127.0.0.1:{port}, db 0",
        ),
        ("redis+cluster://:hunter2@127.0.0.1:{port}", "cluster of 127.0.0.1:{port}"),
    ],
)
async def test_an_unreachable_store_is_logged_with_its_address_and_the_reason(
    caplog: pytest.LogCaptureFixture,
    simulator_url: str,
    simulator_users: dict[str, str],
    template: str,
    where: str,
) -> None:
    """Started against a store nobody listens on, the broker says where it looked and why it
    failed, without the password."""
    port = free_port()
    config = broker_config(template.format(port=port), simulator_url, simulator_users)
    with caplog.at_level(logging.WARNING, logger="service"):
        runtime = await BrokerRuntime.start(build_settings(config))
        await runtime.stop()
    [line] = [r for r in caplog.records if r.getMessage().startswith("token store unavailable")]
    assert getattr(line, "store", None) == where.format(port=port)
    assert "Error" in getattr(line, "reason", "")
    assert "hunter2" not in caplog.text
