"""Bounded, jittered retries of upstream calls that honour Retry-After (broker.md rule 6)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from service.config import Account
from service.upstream.errors import Operation, RateLimitedError, TransientError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one login or refresh tries before giving up."""

    max_attempts: int = 4
    # No attempt starts after this many seconds from the first (a 429 whose Retry-After reaches
    # past it ends the call at once, so the caller can tell its own callers when to come back).
    max_elapsed_seconds: float = 30.0
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0

    def worst_case_seconds(self, timeout_seconds: float) -> float:
        """Upper bound on the duration of one retried call, e.g. for lock leases."""
        return self.max_elapsed_seconds + timeout_seconds


def _is_retryable(error: BaseException, *, resend_safe: bool) -> bool:
    if not isinstance(error, RateLimitedError | TransientError):
        return False
    # A request that may have reached Monogoto is only repeated where repeating is harmless.
    return resend_safe or error.unprocessed


class _Wait:
    """Retry-After when Monogoto gave one (plus a little jitter), else full-jitter backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = wait_random_exponential(
            multiplier=policy.initial_backoff_seconds, max=policy.max_backoff_seconds
        )

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            # S311: jitter only spreads replicas apart; it needs no cryptographic randomness.
            return error.retry_after + random.uniform(0, min(1.0, 0.1 * error.retry_after))  # noqa: S311
        return float(self._backoff(state))


def retrying(
    policy: RetryPolicy, account: Account, operation: Operation, *, resend_safe: bool
) -> AsyncRetrying:
    """A tenacity loop for one upstream operation; the last error is re-raised as it is."""

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "upstream attempt failed, retrying",
            extra={
                "account": account.name,
                "operation": str(operation),
                "attempt": state.attempt_number,
                "result": getattr(error, "result", "error"),
                "reason": getattr(error, "detail", type(error).__name__),
                "wait_seconds": round(state.upcoming_sleep, 3),
            },
        )

    return AsyncRetrying(
        retry=retry_if_exception(lambda error: _is_retryable(error, resend_safe=resend_safe)),
        stop=stop_after_attempt(policy.max_attempts)
        | stop_before_delay(policy.max_elapsed_seconds),
        wait=_Wait(policy),
        before_sleep=log_retry,
        reraise=True,
    )
