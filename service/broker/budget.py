"""The shared auth budget: every upstream attempt, retries included, takes a unit first."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
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


# Priorities of the renewal queue: the class first, then a time in ms (lower is more urgent).
CLASS_SCALE = 1e13
# A background renewal asks the budget again at least this often while it waits (a caller
# may have joined meanwhile, or a more urgent claim left the queue).
MAX_POLL_SECONDS = 1.0


class Urgency(Enum):
    """Why a renewal is made, in the order the budget serves them under contention.

    DEMAND: a caller waits for an account that has no usable token (first come, first
    served). RENEWAL: a background renewal of an account callers read (earliest deadline
    first). IDLE: the same for an account nobody read lately. FORCED: a caller forced one while
    the current token was still good (a `min_ttl` it cannot meet, the report of a still-valid
    token); it never waits, and leaves half the budget to the others.
    """

    DEMAND = 0
    RENEWAL = 1
    IDLE = 2
    FORCED = 3


@dataclass(slots=True)
class Claim:
    """What one obtain asks of the budget: its urgency, the time that orders it within its
    class (a caller's arrival, a renewal's deadline; wall clock), and until when it waits for a
    unit (wall clock; 0 to never wait). A caller joining a renewal in progress raises its
    claim (`join`), and the waiting attempt sees it at once."""

    urgency: Urgency
    at: float
    wait_until: float = 0.0
    # Set when the obtain lost the account's lock: no attempt is made for it any more.
    withdrawn: bool = False
    # Asked after each wait, before the budget is asked again: false when the renewal is no
    # longer needed (another replica wrote a token that will do meanwhile).
    still_needed: Callable[[], Awaitable[bool]] | None = field(default=None, repr=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def priority(self) -> float:
        """The queue's score: the class, then the time in ms."""
        return self.urgency.value * CLASS_SCALE + max(0, int(self.at * 1000))

    def join(self, other: Claim) -> None:
        """Take `other`'s claim too where it is more urgent (a forced claim stays as it is:
        its caller was charged for it, and it keeps the reserve)."""
        if self.urgency is Urgency.FORCED:
            return
        if other.priority < self.priority:
            self.urgency, self.at = other.urgency, other.at
        self.wait_until = max(self.wait_until, other.wait_until)
        self.changed.set()

    def withdraw(self) -> None:
        """The obtain lost the account's lock (its lease ran out, the store lost it): another
        replica may be renewing the account now, so its waiting attempt gives up."""
        self.withdrawn = True
        self.changed.set()


#: The claim of the obtain the current task makes; set by the broker for its obtain task.
#: Without one (no broker), an attempt is a renewal that does not wait.
CLAIM: ContextVar[Claim | None] = ContextVar("renewal_claim", default=None)


# Background renewals take their units one at a time, `window / limit` apart, instead of a
# window's units at once: renewals stay spread over time, so the tokens they give fall due
# spread too, and a sliding window's bursts cannot pile every deadline onto one moment. A
# waiting caller (demand) may still take every free unit at once; a forced renewal does not
# wait at all, and keeps to its reserve instead.
PACED = frozenset({Urgency.RENEWAL, Urgency.IDLE})


class BudgetExhaustedError(UpstreamError):
    """The shared budget has no unit left: the attempt was not made (nothing was sent)."""

    result = "budget_exhausted"
    unprocessed = True

    def __init__(self, account: str, operation: Operation, retry_after: float) -> None:
        super().__init__(account, operation, f"auth budget exhausted for {retry_after:.1f} s")
        self.retry_after = retry_after


class SupersededError(BudgetExhaustedError):
    """The renewal stopped waiting for budget because it is no longer needed: nothing was
    sent, and the record that made it unnecessary is there to take."""

    result = "superseded"


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
        """Take a unit, waiting for it in the renewal queue as long as the obtain's claim
        allows; else raise BudgetExhaustedError (StoreUnavailableError if Redis is down)."""
        claim = CLAIM.get() or Claim(Urgency.RENEWAL, time.time())
        scope = budget_scope(account.base_url)
        while True:
            if claim.withdrawn:
                raise BudgetExhaustedError(account.name, operation, MAX_POLL_SECONDS)
            # A renewal a caller forced leaves half the budget to renewals that keep tokens
            # valid.
            forced = claim.urgency is Urgency.FORCED
            reserve = self._limit // 2 if forced else 0
            left = claim.wait_until - time.time()
            claim.changed.clear()
            wait = await self._store.take_budget(
                scope,
                self._limit,
                self._window,
                reserve=reserve,
                account=account.name,
                priority=claim.priority,
                enqueue=left > 0,
                pace=self._window / self._limit if claim.urgency in PACED else 0.0,
            )
            if wait <= 0:
                return
            if claim.withdrawn:
                raise BudgetExhaustedError(account.name, operation, MAX_POLL_SECONDS)
            left = claim.wait_until - time.time()
            if wait > left and not claim.changed.is_set():
                AUTH_BUDGET_DENIED.inc()
                raise BudgetExhaustedError(account.name, operation, wait)
            # Asked again when a unit may be free, when the claim changes, and at least every
            # MAX_POLL_SECONDS: claims ahead of this one may have left.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, MAX_POLL_SECONDS)):
                    await claim.changed.wait()
            if claim.still_needed is not None and not await claim.still_needed():
                raise SupersededError(account.name, operation, 0.0)

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
