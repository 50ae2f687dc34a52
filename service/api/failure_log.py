"""How often a failing token request is logged at WARNING.

When Monogoto rejects an account's credentials, every request for that account fails until the
back-off ends: one WARNING per request would be thousands of identical lines. The first failure
of an (account, code) is logged at WARNING, then at most one per `interval`, carrying how many
were not; the others go to DEBUG.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic

FAILURE_LOG_STATE_KEY = "failure_log"  # app.state entry holding the FailureLog
WARNING_INTERVAL_SECONDS = 10.0


@dataclass(slots=True)
class _Window:
    warned_at: float
    suppressed: int = 0


class FailureLog:
    """Per (account, problem code): when the last WARNING was, and how many failed since."""

    def __init__(self, interval: float = WARNING_INTERVAL_SECONDS) -> None:
        self._interval = interval
        # Keys are configured accounts (others are refused before the broker is asked) and the
        # broker's few problem codes: a bounded set.
        self._windows: dict[tuple[str, str], _Window] = {}

    def warning_due(self, account: str, code: str) -> int | None:
        """Count one failure. The number of failures not logged at WARNING since the last
        WARNING if this one should be logged at WARNING, else None (log it at DEBUG)."""
        now = monotonic()
        window = self._windows.get((account, code))
        if window is None:
            self._windows[account, code] = _Window(now)
            return 0
        if now - window.warned_at >= self._interval:
            suppressed = window.suppressed
            window.warned_at = now
            window.suppressed = 0
            return suppressed
        window.suppressed += 1
        return None
