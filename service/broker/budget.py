"""The shared auth budget: every upstream attempt, retries included, takes a unit first."""

from __future__ import annotations

import hashlib
import logging
import math
from contextvars import ContextVar
from enum import Enum

from service.config import Account, AuthRate
from service.metrics import AUTH_BUDGET_DENIED
from service.store import StoreUnavailableError, TokenStore
from service.upstream import Operation, UpstreamError

log = logging.getLogger(__name__)

# Grants are spaced on Redis's clock but counted by Monogoto on arrival; network jitter can bring
# two requests closer together than they were granted, so the window is widened by this much.
WINDOW_MARGIN_SECONDS = 1.0
# A 429 without Retry-After cools everyone down for this long (but never past the cap below).
DEFAULT_COOL_DOWN_SECONDS = 60.0
# No cool-down lasts longer than this by default (config: upstream.max_retry_after_seconds).
DEFAULT_MAX_COOL_DOWN_SECONDS = 300.0


class Urgency(Enum):
    """Why a renewal is made: a token is needed, or a caller forced one while the current
    token was still good (a `min_ttl` it cannot meet, the report of a still-valid token)."""

    NEEDED = "needed"
    FORCED = "forced"


#: The urgency of the renewal the current task makes; set by the broker for its obtain task.
URGENCY: ContextVar[Urgency] = ContextVar("renewal_urgency", default=Urgency.NEEDED)


class BudgetExhaustedError(UpstreamError):
    """The shared budget has no unit left: the attempt was not made (nothing was sent)."""

    result = "budget_exhausted"
    unprocessed = True

    def __init__(self, account: str, operation: Operation, retry_after: float) -> None:
        super().__init__(account, operation, f"auth budget exhausted for {retry_after:.1f} s")
        self.retry_after = retry_after


def budget_scope(base_url: str) -> str:
    """The budget is per Monogoto base URL (Monogoto limits per client IP and endpoint)."""
    return hashlib.sha256(base_url.encode()).hexdigest()[:16]


class AuthBudget:
    """Plugs the store's sliding-log limiter into the Monogoto client's hooks.

    `max_cool_down` caps the cool-down after a 429, with or without Retry-After.
    """

    def __init__(
        self,
        store: TokenStore,
        rate: AuthRate,
        *,
        max_cool_down: float = DEFAULT_MAX_COOL_DOWN_SECONDS,
    ) -> None:
        self._store = store
        self.configure(rate, max_cool_down=max_cool_down)

    def configure(
        self, rate: AuthRate, *, max_cool_down: float = DEFAULT_MAX_COOL_DOWN_SECONDS
    ) -> None:
        """Take new settings (a config reload): the next attempt counts against them."""
        if not 0 < max_cool_down < math.inf:
            raise ValueError(f"max_cool_down must be finite and > 0, not {max_cool_down!r}")
        self._limit = rate.limit
        self._window = rate.period_seconds + WINDOW_MARGIN_SECONDS
        self._max_cool_down = max_cool_down

    async def before_attempt(self, account: Account, operation: Operation) -> None:
        """Take a unit or raise BudgetExhaustedError (StoreUnavailableError if Redis is down)."""
        # A renewal a caller forced leaves half the budget to renewals that keep tokens valid.
        reserve = self._limit // 2 if URGENCY.get() is Urgency.FORCED else 0
        wait = await self._store.take_budget(
            budget_scope(account.base_url), self._limit, self._window, reserve=reserve
        )
        if wait > 0:
            AUTH_BUDGET_DENIED.inc()
            raise BudgetExhaustedError(account.name, operation, wait)

    async def rate_limited(self, account: Account, retry_after: float | None) -> None:
        """Monogoto said 429: hold every replica back for its Retry-After (at most the cap)."""
        wanted = DEFAULT_COOL_DOWN_SECONDS
        # The client already drops a non-finite Retry-After; this hook does not rely on it.
        if retry_after is not None and math.isfinite(retry_after):
            wanted = retry_after
        seconds = min(wanted, self._max_cool_down)
        log.warning(
            "Monogoto rate-limited us; cooling down the shared budget",
            extra={"account": account.name, "cool_down_seconds": seconds},
        )
        try:
            await self._store.cool_down(budget_scope(account.base_url), seconds)
        except StoreUnavailableError:
            # The 429 itself matters more to the caller than failing to share it.
            log.warning("could not share the cool-down: store unavailable")
