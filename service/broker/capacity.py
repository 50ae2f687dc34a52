"""Keeps this process's renewal plan current (docs/broker.md, "Renewal planning").

Every few seconds the plan is made again from what this process knows of each account (its
token, when a caller last read it) and the auth budget's settings. It sets the utilisation and
at-risk gauges, logs one WARNING when the plan stops fitting and one INFO line when it fits
again, and tells `/v1/accounts` each account's next planned renewal.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.broker.budget import WINDOW_MARGIN_SECONDS
from service.broker.core import TokenBroker
from service.broker.plan import AccountInput, Budget, Plan, Renewal, make_plan
from service.config import RefreshSettings, Settings
from service.metrics import ACCOUNTS_AT_RISK, AUTH_BUDGET_UTILISATION

log = logging.getLogger(__name__)

# How often the plan is made again.
PLAN_INTERVAL_SECONDS = 5.0
# How many of the accounts at risk a log line names.
NAMED_AT_RISK = 5


class CapacityMonitor:
    """The renewal plan of one process, one per budget (Monogoto base URL)."""

    def __init__(self, broker: TokenBroker, settings: Settings) -> None:
        self._broker = broker
        self._renewals: dict[str, Renewal] = {}
        self._fitting = True
        self.configure(settings)
        # The budget's queue ranks renewals of the accounts this plan gives up after the others.
        broker.given_up = self.given_up

    def configure(self, settings: Settings) -> None:
        """Take the accounts, refresh and budget settings of a (reloaded) config; the next
        plan follows them."""
        self._refresh: RefreshSettings = settings.refresh
        rate = settings.upstream.auth_rate
        # The budget grants `limit` units per period widened by its margin.
        self._budget = Budget(rate.limit, rate.period_seconds + WINDOW_MARGIN_SECONDS)
        groups: dict[str, list[str]] = {}
        for name, account in settings.accounts_resolved().items():
            groups.setdefault(account.base_url, []).append(name)
        self._groups = list(groups.values())

    def renewal(self, account: str) -> Renewal | None:
        """The account's place in the latest plan (None if it has none: not yet planned, or
        its credentials are rejected)."""
        return self._renewals.get(account)

    def given_up(self, account: str) -> bool:
        """Whether the latest plan gives `account` up (past capacity)."""
        renewal = self._renewals.get(account)
        return renewal is not None and renewal.given_up

    def update(self, now: float | None = None) -> list[Plan]:
        """Plan again, set the gauges and log a change between fitting and not; the plans,
        one per budget."""
        now = time.time() if now is None else now
        plans = [self._plan(names, now) for names in self._groups]
        self._renewals = {name: r for plan in plans for name, r in plan.renewals.items()}
        utilisation = max((plan.utilisation for plan in plans), default=0.0)
        at_risk = [name for plan in plans for name in plan.at_risk]
        AUTH_BUDGET_UTILISATION.set(utilisation)
        ACCOUNTS_AT_RISK.set(len(at_risk))
        fitting = all(plan.fits for plan in plans)
        if fitting != self._fitting:
            self._fitting = fitting
            if fitting:
                log.info(
                    "the auth budget keeps every account renewed again",
                    extra={"utilisation": round(utilisation, 3)},
                )
            else:
                log.warning(
                    "the auth budget cannot keep every account renewed in time",
                    extra={
                        "utilisation": round(utilisation, 3),
                        "at_risk": len(at_risk),
                        "accounts": at_risk[:NAMED_AT_RISK],
                    },
                )
        return plans

    def _plan(self, names: list[str], now: float) -> Plan:
        accounts: list[AccountInput] = []
        for name in names:
            state = self._broker.find(name)
            if state is None:
                continue  # a reload removed it a moment ago
            if state.rejected_until > now:
                continue  # not renewed before its back-off ends; its own alert tells
            token = state.token
            if token is None:
                lifetime, expires_at = self._refresh.default_lifetime_seconds, None
            else:
                lifetime = token.record.lifetime
                expires_at = token.good_until if token.good_until > 0 else None
            accounts.append(AccountInput(name, lifetime, expires_at, state.last_read))
        return make_plan(
            accounts,
            self._budget,
            min_remaining=self._refresh.min_remaining_seconds,
            fraction=self._refresh.fraction,
            now=now,
        )

    async def run_forever(self) -> None:
        """Plan again every PLAN_INTERVAL_SECONDS until cancelled."""
        while True:
            await asyncio.sleep(PLAN_INTERVAL_SECONDS)
            try:
                self.update()
            except Exception:
                log.exception("the renewal plan failed")
