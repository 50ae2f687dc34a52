"""The lock lease follows the configured retry bounds (how long a dead holder blocks others)."""

from __future__ import annotations

from typing import Any

import pytest

from service.broker.runtime import build_retry_policy, timing_for
from service.config import ConfigError, build_settings


def settings(**upstream: Any) -> Any:
    """Settings with one account and `upstream` as given."""
    return build_settings(
        {
            "redis_url": "memory://",
            "upstream": upstream,
            "accounts": {"fleet-eu": {"username": "ops@example.com", "password": "pw-0451"}},
        }
    )


def test_default_lease_is_short_and_the_wait_outlives_a_renewal_fully_retried() -> None:
    """With the defaults (10 s timeout, 30 s of retries) the lease is 9 s (its holder renews
    it), replicas wait up to 85 s (a refresh and a login, fully retried) plus a lease for a
    live holder, and no caller waits more than api.max_wait_seconds (10 s)."""
    loaded = settings()
    timing = timing_for(loaded, build_retry_policy(loaded))
    assert (timing.lease_seconds, timing.wait_seconds) == (9.0, 94.0)
    assert timing.max_wait_seconds == 10.0


def test_shorter_retry_bounds_shorten_the_wait_not_the_lease() -> None:
    """Tighter retry bounds shorten how long replicas wait for a live holder; the lease, which
    bounds how long a dead one holds them up, stays short either way."""
    loaded = settings(timeout_seconds=2, retry={"max_attempts": 2, "max_elapsed_seconds": 3})
    policy = build_retry_policy(loaded)
    assert (policy.max_attempts, policy.max_elapsed_seconds) == (2, 3.0)
    timing = timing_for(loaded, policy)
    assert (timing.lease_seconds, timing.wait_seconds) == (9.0, 24.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_attempts", 0, "must be at least 1"),
        ("max_elapsed_seconds", 0, "must be greater than 0"),
    ],
)
def test_retry_bounds_are_checked(field: str, value: int, message: str) -> None:
    """A retry bound that allows no attempt is refused at its dotted path."""
    with pytest.raises(ConfigError) as caught:
        settings(retry={field: value})
    assert caught.value.problems == [f"upstream.retry.{field}: {message}"]
