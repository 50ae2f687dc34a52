"""Token lifetimes from claims (broker.md rule 5) and fingerprints."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
import pytest

from service.claims import (
    MAX_CLOCK_SKEW_SECONDS,
    LifetimeSource,
    UnusableTokenError,
    fingerprint,
    token_lifetime,
)

NOW = 1_800_000_000.0
DEFAULT = 3600.0


def _jwt(**claims: Any) -> str:
    return jwt.encode(claims, "a-signing-key-of-at-least-32-bytes!", algorithm="HS256")


def test_lifetime_is_exp_minus_iat_whatever_the_issuers_clock() -> None:
    """A token from an issuer whose clock is 10 minutes behind still gets its full lifetime."""
    skewed_iat = NOW - 600
    token = _jwt(iat=skewed_iat, exp=skewed_iat + 14_400)

    lifetime = token_lifetime(token, now=NOW, default_seconds=DEFAULT)

    assert lifetime.seconds == 14_400
    assert lifetime.source is LifetimeSource.EXP_MINUS_IAT


def test_lifetime_without_iat_is_exp_minus_now() -> None:
    """Without iat, the remaining time on the local clock is the lifetime."""
    lifetime = token_lifetime(_jwt(exp=NOW + 90), now=NOW, default_seconds=DEFAULT)

    assert lifetime.seconds == 90
    assert lifetime.source is LifetimeSource.EXP_MINUS_NOW


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("opaque-0123456789abcdef", id="not-a-jwt"),
        pytest.param(_jwt(iat=NOW, sub="user"), id="jwt-without-exp"),
    ],
)
def test_token_without_exp_gets_the_default_lifetime(token: str) -> None:
    """Tokens that carry no exp fall back to the configured default lifetime."""
    lifetime = token_lifetime(token, now=NOW, default_seconds=DEFAULT)

    assert lifetime.seconds == DEFAULT
    assert lifetime.source is LifetimeSource.DEFAULT


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("eyJhbGciOiJIUzI1NiJ9.!!!not-base64!!!.c2ln", id="payload-not-base64"),
        pytest.param(
            _segment(b'{"alg":"HS256"}') + "." + _segment(b"[1, 2]") + ".c2ln",
            id="payload-not-an-object",
        ),
        pytest.param(_jwt(iat=NOW, exp="tomorrow"), id="exp-not-a-number"),
        pytest.param(_jwt(iat=True, exp=NOW + 60), id="iat-boolean"),
        pytest.param(_jwt(iat=NOW, exp=NOW), id="expires-when-issued"),
        pytest.param(_jwt(iat=NOW - 7200, exp=NOW - 7100), id="expired-long-ago"),
        pytest.param(_jwt(exp=NOW - 1), id="expired-without-iat"),
    ],
)
def test_unusable_jwt_is_rejected(token: str) -> None:
    """A JWT with unreadable, inconsistent or expired claims is refused, not cached."""
    with pytest.raises(UnusableTokenError):
        token_lifetime(token, now=NOW, default_seconds=DEFAULT)


def test_recently_expired_by_local_clock_is_accepted_as_skew() -> None:
    """exp slightly in the local past is clock skew when iat says the token is fresh."""
    iat = NOW - MAX_CLOCK_SKEW_SECONDS / 2
    lifetime = token_lifetime(_jwt(iat=iat, exp=iat + 60), now=NOW, default_seconds=DEFAULT)

    assert lifetime.seconds == 60


def test_fingerprint_is_short_sha256_prefix_and_hides_the_token() -> None:
    """Logs can correlate a token by fingerprint without being able to use it."""
    token = _jwt(iat=NOW, exp=NOW + 60)

    assert fingerprint(token) == hashlib.sha256(token.encode()).hexdigest()[:12]
