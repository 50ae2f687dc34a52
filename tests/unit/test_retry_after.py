"""Monogoto's Retry-After is taken with care: absurd values are dropped or capped, never trusted."""

from __future__ import annotations

import os
import time
from email.utils import formatdate
from typing import Any, cast

import httpx
import pytest
from pydantic import SecretStr

from service.broker.budget import DEFAULT_COOL_DOWN_SECONDS, AuthBudget
from service.config import Account, AuthRate, ConfigError, Dialect, build_settings
from service.store import TokenStore
from service.upstream import MonogotoClient
from service.upstream.client import retry_after_seconds

CAP = 300.0
ACCOUNT = Account(
    name="fleet-eu",
    username="ops@example.com",
    password=SecretStr("pw-0451"),
    dialect=Dialect.V1,
    base_url="https://api.example.test",
    timeout_seconds=5.0,
)


def parse(value: str | None, cap: float = CAP) -> float | None:
    """What the client makes of a 429 with this Retry-After header (None: no header)."""
    headers = {} if value is None else {"Retry-After": value}
    return retry_after_seconds(httpx.Response(429, headers=headers), cap)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("7.5", 7.5),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("-inf", None),
        ("inf", None),
        ("Infinity", None),
        ("nan", None),
        ("1e400", None),  # overflows to inf
        ("1e9", CAP),
        ("1000000000", CAP),
        ("abc", None),
        ("", None),
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),  # looks like a date, is none
    ],
)
def test_retry_after_seconds(header: str, expected: float | None) -> None:
    """Seconds between 0 and the cap; a non-finite or unparsable value counts as absent."""
    assert parse(header) == expected


def test_no_retry_after_is_none() -> None:
    """A 429 without the header has no Retry-After."""
    assert parse(None) is None


def test_http_date_is_seconds_from_now() -> None:
    """An HTTP date a minute ahead means about 60 s."""
    seconds = parse(formatdate(time.time() + 60, usegmt=True))
    assert seconds == pytest.approx(60, abs=2)


def test_far_future_http_date_is_capped() -> None:
    """A date decades ahead waits no longer than the cap."""
    assert parse("Fri, 31 Dec 9999 23:59:59 GMT") == CAP
    assert parse(formatdate(time.time() + 1e9, usegmt=True)) == CAP


def test_past_http_date_is_zero() -> None:
    """A date already gone means: retry now."""
    assert parse("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_http_date_without_zone_is_utc() -> None:
    """`-0000` (no zone claimed) is read as UTC, not as the broker's local time."""
    header = formatdate(time.time() + 60)  # "... -0000"
    assert header.endswith(" -0000")
    with_local_zone = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "America/New_York"
        time.tzset()
        assert parse(header) == pytest.approx(60, abs=2)
    finally:
        if with_local_zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = with_local_zone
        time.tzset()


def test_cap_is_the_one_given() -> None:
    """A smaller cap applies to seconds and dates alike."""
    assert parse("120", cap=30) == 30
    assert parse(formatdate(time.time() + 120, usegmt=True), cap=30) == 30
    assert parse("10", cap=30) == 10


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
async def test_client_refuses_a_useless_cap(cap: float) -> None:
    """The cap must be a finite number of seconds above 0."""
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="max_retry_after"):
            MonogotoClient(http, default_lifetime=60, max_retry_after=cap)


class CoolDowns:
    """Records the cool-downs the budget asks the store for."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def cool_down(self, _scope: str, seconds: float) -> None:
        self.seconds.append(seconds)


async def cool_down_for(retry_after: float | None, **budget: Any) -> float:
    """The cool-down AuthBudget sets after a 429 with this Retry-After."""
    store = CoolDowns()
    await AuthBudget(cast(TokenStore, store), AuthRate(), **budget).rate_limited(
        ACCOUNT, retry_after
    )
    [seconds] = store.seconds
    return seconds


async def test_cool_down_follows_retry_after() -> None:
    """A sane Retry-After is the cool-down; none means the default."""
    assert await cool_down_for(7.0) == 7.0
    assert await cool_down_for(None) == DEFAULT_COOL_DOWN_SECONDS


async def test_cool_down_never_exceeds_the_cap() -> None:
    """Neither Monogoto's Retry-After nor the default cool-down outlasts max_cool_down."""
    assert await cool_down_for(1e9) == 300.0
    assert await cool_down_for(None, max_cool_down=30.0) == 30.0
    assert await cool_down_for(120.0, max_cool_down=30.0) == 30.0


@pytest.mark.parametrize("retry_after", [float("inf"), float("nan")])
async def test_non_finite_retry_after_cools_down_for_the_default(retry_after: float) -> None:
    """Even if a non-finite value got this far, it counts as absent."""
    assert await cool_down_for(retry_after) == DEFAULT_COOL_DOWN_SECONDS


@pytest.mark.parametrize("cap", [0.0, float("inf"), float("nan")])
def test_budget_refuses_a_useless_cap(cap: float) -> None:
    """The cool-down cap must be a finite number of seconds above 0."""
    with pytest.raises(ValueError, match="max_cool_down"):
        AuthBudget(cast(TokenStore, CoolDowns()), AuthRate(), max_cool_down=cap)


def settings(**upstream: Any) -> Any:
    """Settings with one account and `upstream` as given."""
    return build_settings(
        {
            "redis_url": "memory://",
            "upstream": upstream,
            "accounts": {"fleet-eu": {"username": "ops@example.com", "password": "pw-0451"}},
        }
    )


def test_max_retry_after_setting_defaults_to_300() -> None:
    """Five minutes unless configured."""
    assert settings().upstream.max_retry_after_seconds == 300.0
    assert settings(max_retry_after_seconds=900).upstream.max_retry_after_seconds == 900.0


@pytest.mark.parametrize("value", [0, -1, 901, "inf", "nan"])
def test_max_retry_after_setting_is_bounded(value: object) -> None:
    """Above 0 and at most 900 s (a longer cap would let an absurd Retry-After stall everyone)."""
    with pytest.raises(ConfigError, match="max_retry_after_seconds"):
        settings(max_retry_after_seconds=value)
