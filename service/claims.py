"""Token lifetimes from a JWT's own claims (broker.md rule 5), and token fingerprints for logs."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt

# A token whose exp lies further in the past than this is expired whatever the issuer's clock
# says; closer than this it may be clock skew, which exp - iat is immune to.
MAX_CLOCK_SKEW_SECONDS = 3600.0


class LifetimeSource(StrEnum):
    """Where a token's lifetime came from."""

    EXP_MINUS_IAT = "exp-iat"
    EXP_MINUS_NOW = "exp-now"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Lifetime:
    """How long a token is valid, counted from the moment it was requested."""

    seconds: float
    source: LifetimeSource


class UnusableTokenError(ValueError):
    """The token looks like a JWT but its claims are unreadable, inconsistent or expired."""


def fingerprint(token: str) -> str:
    """Identify a token in logs without revealing it: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def looks_like_jwt(token: str) -> bool:
    """Whether the token has the three dot-separated segments of a compact JWS."""
    return token.count(".") == 2


def _numeric_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UnusableTokenError(f"claim {name!r} is not a number")
    return float(value)


def read_claims(token: str) -> dict[str, Any]:
    """Decode a JWT's payload without verifying it (the broker is not its audience)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as error:
        raise UnusableTokenError(f"unreadable JWT ({type(error).__name__})") from None
    if not isinstance(claims, dict):  # pragma: no cover - PyJWT always returns a dict
        raise UnusableTokenError("JWT payload is not an object")
    return claims


def token_lifetime(token: str, *, now: float, default_seconds: float) -> Lifetime:
    """The token's lifetime, to be applied to the local time at which it was requested.

    `exp - iat` when both claims exist (immune to clock skew between Monogoto and us), else
    `exp - now`, else `default_seconds` for tokens that are not JWTs or carry no `exp`.
    Raises UnusableTokenError for a JWT that is malformed or already expired.
    """
    if not looks_like_jwt(token):
        return Lifetime(default_seconds, LifetimeSource.DEFAULT)
    claims = read_claims(token)
    exp = _numeric_claim(claims, "exp")
    iat = _numeric_claim(claims, "iat")
    if exp is None:
        return Lifetime(default_seconds, LifetimeSource.DEFAULT)
    if exp + MAX_CLOCK_SKEW_SECONDS <= now:
        raise UnusableTokenError("token expired long ago")
    if iat is not None:
        if exp <= iat:
            raise UnusableTokenError("token expires before it was issued")
        return Lifetime(exp - iat, LifetimeSource.EXP_MINUS_IAT)
    if exp <= now:
        raise UnusableTokenError("token already expired")
    return Lifetime(exp - now, LifetimeSource.EXP_MINUS_NOW)
