"""Sliding-log rate limiter, as Monogoto applies it per client IP and auth endpoint."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Admission:
    """The limiter's verdict on one call."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: int | None  # whole seconds, only when refused


class SlidingLog:
    """At most `limit` admitted calls per key in ANY window of `period` seconds.

    Refused calls are not logged, so a refused caller learns exactly when a slot frees up.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logs: dict[Hashable, deque[float]] = {}

    def admit(self, key: Hashable, *, limit: int, period: float) -> Admission:
        """Log a call under `key` if the window has room, else say how long to wait."""
        now = self._clock()
        log = self._logs.setdefault(key, deque())
        while log and log[0] + period <= now:
            log.popleft()
        if len(log) < limit:
            log.append(now)
            return Admission(
                allowed=True, limit=limit, remaining=limit - len(log), retry_after=None
            )
        # The limit may have been lowered below the log's length: a slot frees up only once
        # enough of the oldest calls have left, not just the very oldest.
        frees_at = log[len(log) - limit] + period
        wait = max(1, math.ceil(frees_at - now))
        return Admission(allowed=False, limit=limit, remaining=0, retry_after=wait)

    def clear(self) -> None:
        """Forget every logged call."""
        self._logs.clear()
