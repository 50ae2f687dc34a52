"""The Refresher on a stand-in broker: one task wakes each account at its refresh point, a change
looks at it again at once, a failure pauses it (a change ends the pause), a removed account is
left alone, and only renewals in progress have tasks of their own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
from pydantic import SecretStr

from service.broker.core import TokenBroker
from service.broker.model import UpstreamUnavailableError
from service.broker.refresher import Refresher
from service.broker.state import AccountState
from service.config import RefreshSettings
from service.store import TokenRecord


def record(lifetime: float, *, version: int = 1) -> TokenRecord:
    now = time.time()
    return TokenRecord(
        version=version,
        access_token=SecretStr(f"access-{version}"),
        refresh_token=None,
        customer_id=None,
        obtained_at=now,
        expires_at=now + lifetime,
    )


class Broker:
    """What the Refresher uses of TokenBroker: a record is due at half its lifetime; a renewal
    adopts a 60 s record, or raises what `failing` holds for the account."""

    def __init__(self, names: list[str]) -> None:
        self._watchers: list[Callable[[str], None]] = []
        self.states = {name: AccountState(on_change=self._tell) for name in names}
        self.renewed: list[str] = []
        self.failing: dict[str, Exception] = {}
        self.hold = asyncio.Event()
        self.hold.set()

    def watch(self, callback: Callable[[str], None]) -> None:
        self._watchers.append(callback)

    def _tell(self, account: str) -> None:
        for callback in self._watchers:
            callback(account)

    def state(self, account: str) -> AccountState:
        return self.states[account]

    def needs_verification(self, account: str) -> bool:
        return False

    def refresh_point(self, record: TokenRecord) -> float:
        return record.obtained_at + record.lifetime / 2

    async def refresh(self, account: str) -> None:
        await self.hold.wait()
        self.renewed.append(account)
        if account in self.failing:
            raise self.failing[account]
        state = self.states[account]
        state.adopt(account, record(60.0, version=state.version + 1))


@pytest.fixture
async def running() -> AsyncIterator[tuple[Broker, Refresher]]:
    broker = Broker(["a", "b", "c"])
    refresher = Refresher(cast(TokenBroker, broker), RefreshSettings())
    task = asyncio.create_task(refresher.run_forever())
    yield broker, refresher
    task.cancel()
    for renewal in [task, *refresher.stop()]:
        renewal.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_accounts_are_renewed_at_their_refresh_points(
    running: tuple[Broker, Refresher],
) -> None:
    """Without a token an account is renewed at once; with one, not before its refresh point
    (half of a 0.4 s lifetime here, plus up to 5 % jitter), and then again."""
    broker, refresher = running
    broker.states["b"].adopt("b", record(0.4))
    broker.states["c"].adopt("c", record(3600.0))
    refresher.follow(["a", "b", "c"])
    await settle()
    assert broker.renewed == ["a"]
    await asyncio.sleep(0.1)
    assert broker.renewed == ["a"]
    await asyncio.sleep(0.2)
    assert broker.renewed == ["a", "b"]
    # One task in all while nothing is being renewed.
    assert refresher.stop() == []


async def test_a_change_looks_at_the_account_again_at_once(
    running: tuple[Broker, Refresher],
) -> None:
    """A token with a nearer refresh point (one already due, here) is renewed without waiting
    for the old point."""
    broker, refresher = running
    broker.states["a"].adopt("a", record(3600.0))
    refresher.follow(["a"])
    await settle()
    assert broker.renewed == []
    broker.states["a"].adopt("a", record(0.0, version=5))
    await settle()
    assert broker.renewed == ["a"]


async def test_a_failure_pauses_the_account_until_a_change(
    running: tuple[Broker, Refresher],
) -> None:
    """A failed renewal is not tried again during its pause (retry_after 30 s), unless the
    account changes meanwhile (an operator's reset, say)."""
    broker, refresher = running
    broker.failing["a"] = UpstreamUnavailableError("down", retry_after=30.0)
    refresher.follow(["a"])
    await settle()
    assert broker.renewed == ["a"]
    await asyncio.sleep(0.1)
    assert broker.renewed == ["a"]
    del broker.failing["a"]
    broker.states["a"].clear_failures("a")
    await settle()
    assert broker.renewed == ["a", "a"]
    assert broker.states["a"].version == 1


async def test_a_change_during_a_failing_renewal_ends_its_pause(
    running: tuple[Broker, Refresher],
) -> None:
    """A change while the renewal runs (a new token from another replica, say) means no pause
    after it fails: the account is looked at again at once."""
    broker, refresher = running
    broker.failing["a"] = UpstreamUnavailableError("down", retry_after=30.0)
    broker.hold.clear()
    refresher.follow(["a"])
    await settle()
    broker.states["a"].adopt("a", record(0.0, version=7))  # due at once
    broker.hold.set()
    await settle()
    assert broker.renewed[:2] == ["a", "a"]


async def test_a_removed_account_is_renewed_no_more(running: tuple[Broker, Refresher]) -> None:
    """Removing an account cancels its renewal in progress; nothing is started for it again."""
    broker, refresher = running
    broker.hold.clear()
    before = asyncio.all_tasks()
    refresher.follow(["a", "b"])
    await settle()
    renewals = asyncio.all_tasks() - before
    assert len(renewals) == 2
    refresher.follow(["b"])
    await settle()
    assert sorted(renewal.cancelled() for renewal in renewals) == [False, True]
    broker.hold.set()
    await settle()
    assert broker.renewed == ["b"]
    broker.states["a"].clear_failures("a")
    await settle()
    assert broker.renewed == ["b"]
