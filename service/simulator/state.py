"""What the simulator remembers: users, settings, rate-limit logs, tokens, faults, counters."""

from __future__ import annotations

import hmac
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from service.simulator.faults import Endpoint, FaultBook
from service.simulator.limiter import Admission, SlidingLog
from service.simulator.tokens import TokenIssuer

Outcome = Literal[
    "ok",
    "rejected",
    "malformed",
    "rate_limited",
    "refresh_reused",
    "refresh_revoked",
    "refresh_invalid",
    "token_missing",
    "token_invalid",
    "token_expired",
    "token_revoked",
    "injected_status",
    "dropped",
    "garbage",
]


class SimulatorSettings(BaseModel):
    """The knobs tests may turn at runtime through `/_sim/settings`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    token_lifetime_seconds: float = Field(default=4 * 3600, gt=0)
    refresh_lifetime_seconds: float = Field(default=24 * 3600, gt=0)
    rate_limit: int = Field(default=5, ge=1)
    rate_period_seconds: float = Field(default=60, gt=0)
    clock_skew_seconds: float = 0
    latency_seconds: float = Field(default=0, ge=0)

    def updated(self, patch: Mapping[str, Any]) -> SimulatorSettings:
        """A copy with `patch` applied and validated (raises pydantic.ValidationError)."""
        return SimulatorSettings.model_validate({**self.model_dump(), **patch})


class CallCount(TypedDict):
    """One row of `/_sim/stats`."""

    endpoint: str
    user: str
    outcome: str
    count: int


class Stats(TypedDict):
    """The body of `/_sim/stats`."""

    calls: list[CallCount]
    totals: dict[str, dict[str, int]]


class SimulatorState:
    """The simulator's memory; one per process, used from the event loop only."""

    def __init__(
        self,
        users: Mapping[str, str],
        settings: SimulatorSettings | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.users = dict(users)
        self._initial_users = dict(users)
        self.initial_settings = settings or SimulatorSettings()
        self.settings = self.initial_settings
        self.tokens = TokenIssuer(wall_clock)
        self.faults = FaultBook()
        self._limiter = SlidingLog(monotonic)
        self._counts: Counter[tuple[str, str, str]] = Counter()

    def authenticate(self, username: str, password: str) -> bool:
        """Whether the credentials belong to a known user."""
        expected = self.users.get(username)
        # Compare anyway for unknown users, so timing does not reveal which usernames exist.
        given, wanted = password.encode(), (expected or "\0").encode()
        return hmac.compare_digest(given, wanted) and expected is not None

    def admit(self, endpoint: Endpoint, client: str) -> Admission:
        """Apply the rate limit of `endpoint` to a call from `client`."""
        return self._limiter.admit(
            (endpoint, client),
            limit=self.settings.rate_limit,
            period=self.settings.rate_period_seconds,
        )

    def count(self, endpoint: Endpoint, user: str, outcome: Outcome) -> None:
        """Record one answered (or refused) call to an auth or protected endpoint."""
        self._counts[endpoint, user, outcome] += 1

    def revoke(self, username: str) -> bool:
        """Revoke every token issued to a known user so far; False if the user is unknown."""
        if username not in self.users:
            return False
        self.tokens.revoke(username)
        return True

    def set_password(self, username: str, password: str) -> bool:
        """Change a known user's password (the old one is refused from now on); False if the
        user is unknown."""
        if username not in self.users:
            return False
        self.users[username] = password
        return True

    def stats(self) -> Stats:
        """Every call counted so far, per endpoint, user and outcome, plus totals."""
        totals: dict[str, dict[str, int]] = {}
        for (endpoint, _, outcome), count in self._counts.items():
            per_endpoint = totals.setdefault(endpoint, {})
            per_endpoint[outcome] = per_endpoint.get(outcome, 0) + count
        calls = [
            CallCount(endpoint=endpoint, user=user, outcome=outcome, count=count)
            for (endpoint, user, outcome), count in sorted(self._counts.items())
        ]
        return Stats(calls=calls, totals=totals)

    def reset(self) -> None:
        """Clear counters, faults and rate-limit logs and restore the startup settings and
        passwords.

        Users, issued tokens and revocations survive: a client holding a token keeps a valid
        one, and a revoked token stays revoked.
        """
        self.users = dict(self._initial_users)
        self._counts.clear()
        self.faults.clear()
        self._limiter.clear()
        self.settings = self.initial_settings
