"""The renewal plan of a process: planned from its accounts' states, shown in two gauges and
per account, and logged once when it stops fitting and once when it fits again."""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from service.broker.capacity import CapacityMonitor
from service.broker.core import TokenBroker
from service.broker.state import AccountState, LocalToken
from service.config import Settings, build_settings
from service.store import TokenRecord

NOW = 1_800_000_000.0
NAMES = ("fleet-eu", "fleet-us", "fleet-ap")


def settings(**overrides: Any) -> Settings:
    """Three accounts on one budget of one call per 9 s (10 s with the budget's margin)."""
    return build_settings(
        {
            "redis_url": "memory://",
            "upstream": {
                "dialect": "v1",
                "auth_rate": {"limit": 1, "period_seconds": 9},
                **overrides,
            },
            "refresh": {"fraction": 0.5, "min_remaining_seconds": 5},
            "accounts": {
                name: {"username": f"{name}@example.com", "password": "pw-0451"} for name in NAMES
            },
        }
    )


class Broker:
    """The part of TokenBroker the monitor reads: each account's state."""

    def __init__(self) -> None:
        self.states = {name: AccountState() for name in NAMES}

    def find(self, account: str) -> AccountState | None:
        return self.states.get(account)


def token(account: str, *, obtained_at: float, lifetime: float = 100.0) -> LocalToken:
    """A cached token of `account`."""
    record = TokenRecord(
        version=1,
        access_token=SecretStr("token-of-" + account),
        refresh_token=None,
        customer_id=None,
        obtained_at=obtained_at,
        expires_at=obtained_at + lifetime,
    )
    return LocalToken(account, record, "token-of-" + account)


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("monogoto_broker_" + name)


@pytest.fixture
def broker() -> Broker:
    """Accounts whose tokens were obtained 10, 20 and 30 s ago, all read just now."""
    fake = Broker()
    for age, name in zip((10, 20, 30), NAMES, strict=True):
        fake.states[name].token = token(name, obtained_at=NOW - age)
        fake.states[name].last_read = NOW
    return fake


def test_the_plan_follows_the_states_and_sets_the_gauges(broker: Broker) -> None:
    """Three 100 s tokens on one call per 10 s: each renewal at its refresh point (half the
    lifetime), well before its deadline; the utilisation is 3 calls per 95 s over 0.1/s."""
    monitor = CapacityMonitor(cast(TokenBroker, broker), settings())
    [plan] = monitor.update(NOW)
    assert plan.utilisation == pytest.approx(3 / 95 / 0.1)
    assert gauge("auth_budget_utilisation") == pytest.approx(3 / 95 / 0.1)
    assert gauge("accounts_at_risk") == 0
    renewal = monitor.renewal("fleet-ap")
    assert renewal is not None
    assert (renewal.next_renewal_at, renewal.at_risk) == (NOW + 20.0, False)


def test_an_account_with_rejected_credentials_is_left_out(broker: Broker) -> None:
    """Nobody renews it before its back-off ends: it takes no slot, and has no renewal."""
    broker.states["fleet-us"].rejected_until = NOW + 300
    monitor = CapacityMonitor(cast(TokenBroker, broker), settings())
    [plan] = monitor.update(NOW)
    assert set(plan.renewals) == {"fleet-eu", "fleet-ap"}
    assert monitor.renewal("fleet-us") is None


def test_accounts_on_different_base_urls_are_planned_on_their_own_budgets() -> None:
    """Each Monogoto base URL has its own budget, so its own plan; the gauge shows the
    highest utilisation."""
    loaded = settings()
    loaded.accounts["fleet-ap"].base_url = "https://other.example.com"
    monitor = CapacityMonitor(cast(TokenBroker, Broker()), loaded)
    plans = monitor.update(NOW)
    assert sorted(len(plan.renewals) for plan in plans) == [1, 2]
    # No tokens: the default lifetime (3600 s) for each.
    assert gauge("auth_budget_utilisation") == pytest.approx(2 / 3595 / 0.1)


def test_one_warning_when_the_plan_stops_fitting_one_info_when_it_fits_again(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """Without tokens, three accounts need a login at once on one call per 10 s: two are at
    risk, logged once with their names; the next plans log nothing until it fits again."""
    monitor = CapacityMonitor(cast(TokenBroker, broker), settings())
    saved = {name: state.token for name, state in broker.states.items()}
    caplog.set_level(logging.INFO, logger="service.broker.capacity")
    monitor.update(NOW)
    assert caplog.records == []
    for state in broker.states.values():
        state.token = None
    monitor.update(NOW)
    monitor.update(NOW + 5)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.at_risk == 2  # type: ignore[attr-defined]
    assert len(warning.accounts) == 2  # type: ignore[attr-defined]
    assert set(warning.accounts) < set(NAMES)  # type: ignore[attr-defined]
    assert gauge("accounts_at_risk") == 2
    caplog.clear()
    for name, state in broker.states.items():
        state.token = saved[name]
    monitor.update(NOW)
    monitor.update(NOW + 5)
    [info] = caplog.records
    assert info.levelno == logging.INFO
    assert gauge("accounts_at_risk") == 0
    for record in [*caplog.records, warning]:
        assert "token-of-" not in record.getMessage() + str(record.__dict__)
