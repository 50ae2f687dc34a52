"""The renewal plan: deadlines are met whenever the load fits the budget, renewals go by
deadline under contention, idle accounts are given up first, and the load figures add up."""

from __future__ import annotations

import time

import pytest

from service.broker.plan import (
    SAFETY_MARGIN_SECONDS,
    AccountInput,
    Budget,
    Plan,
    make_plan,
    refresh_offset,
)

NOW = 1_800_000_000.0
# The simulator's figures of the capacity benchmark: 60 s tokens, 10 calls per 10 s.
LIFETIME = 60.0
MIN_REMAINING = 5.0
FRACTION = 0.75
SIMULATOR_BUDGET = Budget(limit=10, window_seconds=10.0)


def plan(accounts: list[AccountInput], budget: Budget, **overrides: float) -> Plan:
    """The plan as of NOW with the simulator's refresh settings, unless overridden."""
    settings = {"min_remaining": MIN_REMAINING, "fraction": FRACTION, "now": NOW, **overrides}
    return make_plan(accounts, budget, **settings)


def staggered(
    count: int,
    *,
    lifetime: float = LIFETIME,
    min_remaining: float = MIN_REMAINING,
    read: float = NOW,
) -> list[AccountInput]:
    """`count` accounts whose tokens were obtained one after another over the last renewal
    interval (lifetime - min_remaining - margin), the oldest first: a steady state."""
    interval = lifetime - min_remaining - SAFETY_MARGIN_SECONDS
    return [
        AccountInput(
            name=f"account-{index:04d}",
            lifetime=lifetime,
            expires_at=NOW - (count - index) * interval / count + lifetime + 0.5,
            last_read=read,
        )
        for index in range(count)
    ]


@pytest.mark.parametrize("share", [0.5, 0.8, 0.9, 0.95])
def test_every_deadline_is_met_while_the_load_fits(share: float) -> None:
    """Up to 95 % of what the budget can renew (calls per second times (lifetime -
    min_remaining)), every account's next renewal comes before its deadline, and none before
    its refresh point."""
    count = int(share * SIMULATOR_BUDGET.capacity * (LIFETIME - MIN_REMAINING))
    accounts = staggered(count)
    result = plan(accounts, SIMULATOR_BUDGET)
    assert result.utilisation == pytest.approx(share, abs=0.02)
    assert result.at_risk == []
    assert result.fits
    for account in accounts:
        renewal = result.renewals[account.name]
        assert account.expires_at is not None
        due = account.expires_at - LIFETIME + refresh_offset(LIFETIME, FRACTION, MIN_REMAINING)
        assert max(due, NOW) <= renewal.next_renewal_at <= renewal.deadline
        assert renewal.deadline == pytest.approx(
            account.expires_at - MIN_REMAINING - SAFETY_MARGIN_SECONDS
        )


def test_deadlines_are_met_for_idle_and_used_accounts_alike_while_the_load_fits() -> None:
    """Idle accounts are renewed too, as long as the budget has room for them."""
    accounts = staggered(48)
    mixed = [
        AccountInput(a.name, a.lifetime, a.expires_at, a.last_read if i % 2 else 0.0)
        for i, a in enumerate(accounts)
    ]
    result = plan(mixed, SIMULATOR_BUDGET)
    assert result.at_risk == []
    assert {r.used for r in result.renewals.values()} == {True, False}


def test_v1_tokens_on_five_logins_a_minute() -> None:
    """4-hour tokens, 60 s min_remaining, 5 calls per minute: 1,100 accounts fit (92 %), all on
    time; 1,195 are the capacity."""
    budget = Budget(limit=5, window_seconds=60.0)
    accounts = staggered(1100, lifetime=4 * 3600.0, min_remaining=60.0)
    result = plan(accounts, budget, min_remaining=60.0)
    assert result.utilisation == pytest.approx(1100 * 60 / (5 * (4 * 3600 - 60)))
    assert result.at_risk == []
    full = staggered(1195, lifetime=4 * 3600.0, min_remaining=60.0)
    capacity = plan(full, budget, min_remaining=60.0)
    assert capacity.utilisation == pytest.approx(1.0, abs=0.001)


def test_an_uncontended_renewal_waits_for_its_refresh_point() -> None:
    """With room in the budget, a token is renewed at `fraction` of its lifetime, as today."""
    account = AccountInput("fleet-eu", 3600.0, NOW + 3000.0, last_read=NOW)
    result = plan([account], Budget(5, 60.0), min_remaining=60.0)
    renewal = result.renewals["fleet-eu"]
    assert renewal.next_renewal_at == pytest.approx(NOW + 3000.0 - 3600.0 + 0.75 * 3600.0)
    assert renewal.deadline == pytest.approx(NOW + 3000.0 - 60.0 - SAFETY_MARGIN_SECONDS)
    assert not renewal.at_risk
    assert renewal.used


def test_renewals_go_by_deadline_under_contention() -> None:
    """Four renewals due at once on one call per 10 s: the earliest deadline first, so each
    one's slot comes in time (in the order of their names, one would not)."""
    budget = Budget(limit=1, window_seconds=10.0)
    # Tokens of 100 s, renewed from half their lifetime: all four are due now.
    left = {"d": 20.0, "b": 45.0, "a": 35.0, "c": 27.0}
    accounts = [AccountInput(name, 100.0, NOW + s, last_read=NOW) for name, s in left.items()]
    result = plan(accounts, budget, fraction=0.5)
    slots = {name: r.next_renewal_at - NOW for name, r in result.renewals.items()}
    assert slots == pytest.approx({"d": 0.0, "c": 10.0, "a": 20.0, "b": 30.0})
    # Deadlines: 20 - 5 - 2 = 13, then 20, 28 and 38 s from now.
    deadlines = {name: r.deadline - NOW for name, r in result.renewals.items()}
    assert deadlines == pytest.approx({"d": 13.0, "c": 20.0, "a": 28.0, "b": 38.0})
    assert result.at_risk == []


def test_a_used_account_goes_before_an_idle_one_with_the_same_deadline() -> None:
    """Same deadline: the account callers read lately is renewed first."""
    budget = Budget(limit=1, window_seconds=10.0)
    accounts = [
        AccountInput("idle", 100.0, NOW + 20.0, last_read=NOW - 201.0),
        AccountInput("used", 100.0, NOW + 20.0, last_read=NOW - 199.0),
    ]
    result = plan(accounts, budget, fraction=0.5)
    assert result.renewals["used"].next_renewal_at == NOW
    assert result.renewals["idle"].next_renewal_at == NOW + 10.0
    assert not result.renewals["idle"].used
    assert result.at_risk == []


def test_used_accounts_are_renewed_before_idle_ones_whose_deadlines_come_first() -> None:
    """Three used accounts and five idle ones whose deadlines come first, all due, one unit per
    10 s: as the budget's queue serves renewals of used accounts first, the plan renews them
    first and they keep their deadlines; the idle ones, renewed after them, are at risk,
    although earliest-deadline-first alone would have favoured them."""
    budget = Budget(limit=1, window_seconds=10.0)
    used = [AccountInput(f"used-{i}", 100.0, NOW + 45.0, last_read=NOW - i) for i in range(3)]
    idle = [AccountInput(f"idle-{i}", 100.0, NOW + 25.0) for i in range(5)]
    result = plan(used + idle, budget, fraction=0.5)
    assert sorted(result.renewals[a.name].next_renewal_at - NOW for a in used) == [0, 10, 20]
    assert sorted(result.at_risk) == [a.name for a in idle]
    # Below capacity: a passing crowd, nobody given up.
    assert result.utilisation < 1
    assert not any(r.given_up for r in result.renewals.values())


def test_a_renewal_planned_within_the_safety_margin_is_not_at_risk() -> None:
    """Two accounts due at once on one unit per 10 s: the second's slot comes 1 s after its
    deadline, inside the 2 s safety margin (its call still has a second before the token is down
    to min_remaining): late for the order, not at risk. 3 s after it, it is."""
    budget = Budget(limit=1, window_seconds=10.0)
    for late, at_risk in ((1.0, []), (3.0, ["second"])):
        expires = NOW + 10.0 + MIN_REMAINING + SAFETY_MARGIN_SECONDS - late
        accounts = [
            AccountInput("first", 100.0, NOW + 5.0 + MIN_REMAINING + SAFETY_MARGIN_SECONDS),
            AccountInput("second", 100.0, expires),
        ]
        result = plan(accounts, budget, fraction=0.1)
        assert result.renewals["second"].next_renewal_at == NOW + 10.0
        assert result.renewals["second"].next_renewal_at > result.renewals["second"].deadline
        assert result.at_risk == at_risk


def test_under_overload_the_same_used_accounts_are_given_up_whenever_they_were_read() -> None:
    """More used accounts than the budget can keep: the same few are at risk (not a scattering
    of accounts), whichever of them was read last: plans made seconds apart, while callers keep
    reading every account, give up the same accounts."""
    budget = Budget(limit=1, window_seconds=10.0)
    accounts = [
        AccountInput(f"account-{i}", 100.0, NOW + 20.0 + i, last_read=NOW - 10.0 * i)
        for i in range(6)
    ]
    result = plan(accounts, budget, fraction=0.5)
    # Deadlines 13 to 18 s from now: two slots (0 and 10 s) come in time.
    assert sorted(result.at_risk) == [f"account-{i}" for i in range(2, 6)]
    reread = [
        AccountInput(a.name, a.lifetime, a.expires_at, last_read=NOW - 10.0 * (5 - i))
        for i, a in enumerate(accounts)
    ]
    again = plan(reread, budget, fraction=0.5)
    assert sorted(again.at_risk) == sorted(result.at_risk)
    # A passing crowd, not past capacity: the queue gives nobody up for it.
    assert result.utilisation < 1
    assert not any(r.given_up for r in again.renewals.values())


def test_past_capacity_the_plan_gives_up_the_idle_accounts() -> None:
    """110 % of the capacity in a steady state, a third of the accounts idle: the utilisation
    says so, and the accounts at risk are idle ones only."""
    accounts = staggered(60)
    mixed = [
        AccountInput(a.name, a.lifetime, a.expires_at, 0.0 if i % 3 == 0 else a.last_read)
        for i, a in enumerate(accounts)
    ]
    result = plan(mixed, SIMULATOR_BUDGET)
    assert result.utilisation == pytest.approx(60 / 55)
    assert not result.fits
    # About five accounts more than fit, all of them idle.
    assert 5 <= len(result.at_risk) <= 8
    assert all(not result.renewals[name].used for name in result.at_risk)
    # Past capacity, the queue gives up the same accounts.
    assert all(result.renewals[name].given_up for name in result.at_risk)


def test_accounts_without_a_token_are_due_now() -> None:
    """No token (or an expired one): due at once, the deadline is now; on one call per 10 s
    the first is in time, the others are at risk until their logins come."""
    budget = Budget(limit=1, window_seconds=10.0)
    accounts = [
        AccountInput("none", 3600.0, None, last_read=NOW),
        AccountInput("expired", 3600.0, NOW - 1.0),
    ]
    result = plan(accounts, budget)
    assert result.renewals["none"].next_renewal_at == NOW
    assert result.renewals["none"].deadline == NOW
    assert result.renewals["expired"].next_renewal_at == NOW + 10.0
    assert result.at_risk == ["expired"]


def test_load_and_utilisation() -> None:
    """The load is one call per (lifetime - min_remaining) per account, in calls per second;
    the utilisation is that over the budget's calls per second."""
    accounts = [
        AccountInput("v1", 14400.0, None),
        AccountInput("legacy", 3600.0, None),
    ]
    result = plan(accounts, Budget(5, 60.0), min_remaining=60.0)
    load = 1 / 14340 + 1 / 3540
    assert result.load == pytest.approx(load)
    assert result.capacity == pytest.approx(5 / 60)
    assert result.utilisation == pytest.approx(load * 12)
    empty = plan([], Budget(5, 60.0))
    assert (empty.utilisation, empty.at_risk, empty.fits) == (0.0, [], True)


def test_a_thousand_accounts_past_capacity_plan_in_well_under_a_second() -> None:
    """It runs every few seconds in every process: 1,000 accounts, overloaded (the slowest
    case, a search for how many can be kept), take a fraction of a second."""
    accounts = staggered(1000, lifetime=3600.0, min_remaining=60.0, read=0.0)
    budget = Budget(limit=5, window_seconds=60.0)
    started = time.perf_counter()
    result = plan(accounts, budget, min_remaining=60.0)
    elapsed = time.perf_counter() - started
    assert result.utilisation > 3
    assert result.at_risk
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_past_capacity_as_few_accounts_as_possible_are_given_up() -> None:
    """1,300 v1 accounts on 5 calls per 61 s (the budget's own window), where about 1,175 fit:
    about 125 are at risk, not more."""
    accounts = staggered(1300, lifetime=4 * 3600.0, min_remaining=60.0)
    result = plan(accounts, Budget(limit=5, window_seconds=61.0), min_remaining=60.0)
    capacity = 5 / 61 * (4 * 3600 - 60)
    assert result.utilisation == pytest.approx(1300 / capacity)
    assert 1300 - capacity <= len(result.at_risk) <= 1300 - capacity + 5


def test_past_capacity_accounts_are_at_risk_even_when_their_next_renewals_fit() -> None:
    """44 used accounts of 45 s tokens on 60 calls per 61 s (110 % of what it renews): the
    next renewals all fit in the budget's free units, but the steady state cannot keep every
    account, so the plan gives up as many as the load exceeds the capacity, by name."""
    accounts = [
        AccountInput(f"account-{i:02d}", 45.0, NOW + 10.0 + 35.0 * i / 44, last_read=NOW)
        for i in range(44)
    ]
    result = plan(accounts, Budget(limit=60, window_seconds=61.0))
    assert result.utilisation == pytest.approx(44 / 40 / (60 / 61))
    kept = int(40 * 60 / 61)  # 39 accounts' calls fit
    assert sorted(result.at_risk) == [f"account-{i}" for i in range(kept, 44)]
    assert all(result.renewals[name].given_up for name in result.at_risk)
