"""Credentials are verified when they differ from those the stored token was obtained with."""

from __future__ import annotations

import asyncio

import pytest

from service.broker import CredentialsRejectedError, CredentialsStatus
from service.simulator.client import SimulatorControl
from tests.integration.conftest import StartReplicas
from tests.support import eventually


async def test_a_wrong_password_is_rejected_once_while_the_cached_token_is_served(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Three replicas started with a wrong password over a valid stored token: one login,
    every replica shows `rejected` and the alert's gauge, callers still get the token."""
    [good] = await start_replicas()
    token = await good.broker.get("acct-0")
    assert good.broker.state("acct-0").credentials_status() is CredentialsStatus.VERIFIED
    wrong = await start_replicas(3, password="not-the-password")

    def all_rejected() -> bool:
        states = [replica.broker.state("acct-0") for replica in wrong]
        return all(s.credentials_status() is CredentialsStatus.REJECTED for s in states)

    await eventually(all_rejected, within=15)
    assert simulator.calls("v1_token") == 2  # the good login, then one verification
    # The alert's gauge: 1 on every replica configured with the wrong password, 0 on the other.
    assert [replica.broker.gauges()[0].rejected for replica in [good, *wrong]] == [
        False,
        True,
        True,
        True,
    ]
    served = await wrong[0].broker.get("acct-0")
    assert served.access_token == token.access_token


async def test_the_right_password_again_is_verified_and_clears_the_rejection(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """After a rejection, a replica with the right password is verified without a new login."""
    [good] = await start_replicas()
    await good.broker.get("acct-0")
    [wrong] = await start_replicas(password="not-the-password")
    await eventually(
        lambda: wrong.broker.state("acct-0").credentials_status() is CredentialsStatus.REJECTED,
        within=15,
    )
    [again] = await start_replicas()
    state = again.broker.state("acct-0")
    assert state.credentials_status() is CredentialsStatus.VERIFIED
    assert state.rejected_until == 0


async def test_a_reset_clears_the_rejection_in_every_replica(
    start_replicas: StartReplicas, simulator: SimulatorControl
) -> None:
    """Two replicas hold a rejection of their (wrong) password; an operator's reset on one
    clears it in both, and Monogoto is asked again at once: one login for the fleet."""
    first, second = await start_replicas(2, password="not-the-password")
    with pytest.raises(CredentialsRejectedError):
        await first.broker.get("acct-0")
    with pytest.raises(CredentialsRejectedError):
        await second.broker.get("acct-0")
    assert simulator.calls("v1_token") == 1  # the second replica honoured the marker
    held = second.broker.state("acct-0").rejected_until
    await first.broker.reset("acct-0")
    # Both forget the rejection; their renewers try again at once, and the lock and marker
    # make that one login, rejected again, which both replicas then hold.
    await eventually(lambda: simulator.calls("v1_token") == 2)
    await eventually(
        lambda: all(r.broker.state("acct-0").rejected_until > held for r in (first, second))
    )
    await asyncio.sleep(1.0)
    assert simulator.calls("v1_token") == 2
