"""The auth budget's planner: who gets the next unit when the budget is contended, and how
long an attempt waits for it (on the in-process store, whose queue the contract tests in
tests/integration/test_stores.py hold to the Redis store's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest
from pydantic import SecretStr

from service.broker.budget import (
    CLAIM,
    WINDOW_MARGIN_SECONDS,
    AuthBudget,
    BudgetExhaustedError,
    Claim,
    SupersededError,
    Urgency,
)
from service.config import Account, AuthRate, Dialect
from service.store import MemoryStore
from service.upstream import Operation

PERIOD = 0.3
# One unit per window: the broker widens the configured period by its margin.
WINDOW = PERIOD + WINDOW_MARGIN_SECONDS


def account(name: str) -> Account:
    return Account(
        name=name,
        username=name,
        password=SecretStr("secret"),
        dialect=Dialect.V1,
        base_url="https://api.example",
        timeout_seconds=5.0,
    )


def budget(store: MemoryStore) -> AuthBudget:
    return AuthBudget(store, AuthRate(limit=1, period_seconds=PERIOD))


async def attempt(auth: AuthBudget, name: str, claim: Claim, granted: list[str]) -> None:
    """One attempt of `name` under `claim`; its name is noted when it got its unit."""
    CLAIM.set(claim)
    await auth.before_attempt(account(name), Operation.LOGIN)
    granted.append(name)


async def started(*attempts: Awaitable[None]) -> list[asyncio.Task[None]]:
    """Start the attempts one after the other, each queued before the next starts."""
    tasks = []
    for item in attempts:
        tasks.append(asyncio.ensure_future(item))
        await asyncio.sleep(0.05)
    return tasks


def waiting(urgency: Urgency, at: float, seconds: float = 10.0) -> Claim:
    return Claim(urgency, at, wait_until=time.time() + seconds)


async def test_a_caller_waits_for_the_next_unit_instead_of_failing() -> None:
    """With the budget spent, a caller's attempt gets the next unit within one window."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    await attempt(auth, "first", waiting(Urgency.DEMAND, time.time()), granted)
    began = time.monotonic()
    await attempt(auth, "second", waiting(Urgency.DEMAND, time.time()), granted)
    assert granted == ["first", "second"]
    assert WINDOW - 0.1 <= time.monotonic() - began <= WINDOW + 0.5


async def test_demand_first_then_renewals_by_deadline_then_idle_ones() -> None:
    """Queued in the worst order, the attempts get units by class, then by time."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    now = time.time()
    await attempt(auth, "spends-the-unit", waiting(Urgency.DEMAND, now), granted)
    tasks = await started(
        attempt(auth, "idle", waiting(Urgency.IDLE, now - 100), granted),
        attempt(auth, "late-deadline", waiting(Urgency.RENEWAL, now + 50), granted),
        attempt(auth, "early-deadline", waiting(Urgency.RENEWAL, now + 20), granted),
        attempt(auth, "caller", waiting(Urgency.DEMAND, now + 1), granted),
    )
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5 * WINDOW + 2)
    assert granted[1:] == ["caller", "early-deadline", "late-deadline", "idle"]


async def test_a_caller_joining_a_waiting_renewal_moves_it_to_the_front() -> None:
    """A renewal waiting behind others gets the next unit once a caller waits for it."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    now = time.time()
    await attempt(auth, "spends-the-unit", waiting(Urgency.DEMAND, now), granted)
    joined = waiting(Urgency.IDLE, now)
    tasks = await started(
        attempt(auth, "renewal", waiting(Urgency.RENEWAL, now), granted),
        attempt(auth, "joined", joined, granted),
    )
    joined.join(waiting(Urgency.DEMAND, time.time()))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=3 * WINDOW + 2)
    assert granted[1:] == ["joined", "renewal"]


async def test_a_forced_renewal_never_waits() -> None:
    """A forced renewal is refused at once, with the honest wait, when no unit is free."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    await attempt(auth, "first", waiting(Urgency.DEMAND, time.time()), granted)
    began = time.monotonic()
    with pytest.raises(BudgetExhaustedError) as refused:
        await attempt(auth, "forced", Claim(Urgency.FORCED, time.time()), granted)
    assert time.monotonic() - began < 0.5
    assert 0 < refused.value.retry_after <= WINDOW


async def test_a_claim_gives_up_when_no_unit_comes_in_its_time() -> None:
    """A caller who may wait less than the next unit takes is refused at once, told when."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    await attempt(auth, "first", waiting(Urgency.DEMAND, time.time()), granted)
    began = time.monotonic()
    with pytest.raises(BudgetExhaustedError) as refused:
        await attempt(auth, "hurried", waiting(Urgency.DEMAND, time.time(), 0.3), granted)
    assert time.monotonic() - began < 0.5
    assert 0.3 < refused.value.retry_after <= WINDOW


def test_priorities_order_by_class_then_time() -> None:
    """Any demand before any renewal, renewals by deadline, idle ones after, forced last."""
    now = time.time()
    order = [
        Claim(Urgency.DEMAND, now + 3600),
        Claim(Urgency.RENEWAL, now - 60),
        Claim(Urgency.RENEWAL, now),
        Claim(Urgency.IDLE, now - 3600),
        Claim(Urgency.FORCED, 0.0),
    ]
    assert sorted(order, key=lambda claim: claim.priority) == order


def test_a_forced_claim_keeps_its_class_when_joined() -> None:
    """A forced renewal was charged to its caller and keeps the reserve: joining leaves it."""
    forced = Claim(Urgency.FORCED, time.time())
    forced.join(Claim(Urgency.DEMAND, time.time(), wait_until=time.time() + 10))
    assert forced.urgency is Urgency.FORCED
    assert forced.wait_until == 0.0


async def test_a_waiting_renewal_stops_once_it_is_no_longer_needed() -> None:
    """Asked after each wait, a renewal that became unnecessary gives up its place at once."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    await attempt(auth, "first", waiting(Urgency.DEMAND, time.time()), granted)
    claim = waiting(Urgency.RENEWAL, time.time())
    checks: list[float] = []

    async def still_needed() -> bool:
        checks.append(time.monotonic())
        return False

    claim.still_needed = still_needed
    began = time.monotonic()
    with pytest.raises(SupersededError):
        await attempt(auth, "renewal", claim, granted)
    assert granted == ["first"]
    assert len(checks) == 1
    assert checks[0] - began <= 1.1, "asked after its first wait (at most a second)"


async def test_a_renewal_that_lost_its_lock_stops_waiting() -> None:
    """Withdrawn (its lock lost), a waiting attempt gives up without taking a unit."""
    auth = budget(MemoryStore())
    granted: list[str] = []
    await attempt(auth, "first", waiting(Urgency.DEMAND, time.time()), granted)
    claim = waiting(Urgency.RENEWAL, time.time())
    task = asyncio.ensure_future(attempt(auth, "renewal", claim, granted))
    await asyncio.sleep(0.1)
    claim.withdraw()
    with pytest.raises(BudgetExhaustedError):
        await asyncio.wait_for(task, timeout=1.0)
    assert granted == ["first"]
