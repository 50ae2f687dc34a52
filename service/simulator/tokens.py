"""Signed tokens, per-user identities, single-use refresh tokens and revocation."""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jwt

ISSUER = "monogoto-simulator"
_ALGORITHM = "HS256"
# How long past expiry a refresh token is remembered. Judged on the unskewed clock, so tests
# that move the clock skew back and forth don't lose tokens they still expect to work.
_RETENTION_SECONDS = 24 * 3600
_EXPIRED_AGO_SECONDS = 24 * 3600

Dialect = Literal["legacy", "v1"]
RedeemOutcome = Literal["ok", "refresh_reused", "refresh_revoked", "refresh_invalid"]
# token_missing: no bearer token at all, decided before a token is looked at.
AccessOutcome = Literal["ok", "token_missing", "token_invalid", "token_expired", "token_revoked"]
_API_NAMES: dict[str, str] = {"legacy": "the legacy API", "v1": "the v1 API"}


@dataclass(frozen=True, slots=True)
class Identity:
    """The stable account data Monogoto returns for a user."""

    username: str
    customer_id: str
    user_id: str
    organization_id: str


def identity(username: str) -> Identity:
    """Derive a user's ids from the username, so they are stable across restarts."""
    digest = hashlib.sha256(username.encode()).hexdigest()
    return Identity(
        username=username,
        customer_id=f"cid_{digest[:16]}",
        user_id=f"uid_{digest[16:32]}",
        organization_id=f"org_{digest[32:48]}",
    )


@dataclass(frozen=True, slots=True)
class Redemption:
    """What became of a presented refresh token; `user` is its owner or "-"."""

    outcome: RedeemOutcome
    user: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a presented access token is worth; `user` is its owner or "-", `reason` says why."""

    outcome: AccessOutcome
    user: str
    reason: str


def _numeric(value: float) -> int | float:
    return int(value) if value == int(value) else value


class TokenIssuer:
    """Signs JWTs with a per-process secret and tracks which refresh tokens are still usable."""

    def __init__(self, clock: Callable[[], float] = time.time, secret: bytes | None = None) -> None:
        self._clock = clock
        self._secret = secret or secrets.token_bytes(32)
        self._usable: dict[str, str] = {}  # jti -> owner
        self._spent: dict[str, str] = {}  # jti -> owner, kept past expiry to recognise reuse
        self._expiries: list[tuple[float, str]] = []  # heap of (exp, jti) over both dicts
        # user -> how often their tokens were revoked. Every token carries its user's count at
        # issue as `epoch`; one from an older epoch is revoked. Costs nothing per token.
        self._epochs: dict[str, int] = {}

    def access_token(
        self, username: str, *, lifetime: float, skew: float = 0.0, dialect: Dialect = "v1"
    ) -> str:
        """A signed access token valid for `lifetime` seconds from the (skewed) server clock."""
        iat = int(self._clock() + skew)
        return self._sign(username, "access", dialect, iat, lifetime)[0]

    def expired_access_token(
        self, username: str, *, lifetime: float, skew: float = 0.0, dialect: Dialect = "v1"
    ) -> str:
        """A well-formed access token whose `exp` lies a day in the past."""
        # Far enough back that no client can mistake it for mere clock skew.
        exp = int(self._clock() + skew) - _EXPIRED_AGO_SECONDS
        return self._sign(username, "access", dialect, exp - lifetime, lifetime)[0]

    def refresh_token(self, username: str, *, lifetime: float, skew: float = 0.0) -> str:
        """A signed (v1) refresh token that can be redeemed once."""
        self._forget(expired_before=self._clock() - _RETENTION_SECONDS)
        iat = int(self._clock() + skew)
        token, jti = self._sign(username, "refresh", "v1", iat, lifetime)
        self._usable[jti] = username
        heapq.heappush(self._expiries, (iat + lifetime, jti))
        return token

    def owner(self, token: str) -> str:
        """The user a refresh token was issued to, or "-" if it is not one of ours."""
        return _owner(self._claims(token))

    def revoke(self, username: str) -> None:
        """Revoke every token issued to `username` so far; tokens issued later are valid."""
        self._epochs[username] = self._epoch(username) + 1

    def verify_access(self, token: str, *, dialect: Dialect, skew: float = 0.0) -> Verdict:
        """Judge a bearer token presented to a protected endpoint of `dialect`.

        Invalid unless it is an access token this issuer signed for `dialect`; then expired
        (on the skewed clock) before revoked before ok.
        """
        claims = self._claims(token)
        if not claims:
            return Verdict("token_invalid", "-", "Invalid access token (not issued by this API)")
        user = _owner(claims)
        if claims["typ"] != "access":
            return Verdict("token_invalid", user, "Invalid access token (a refresh token)")
        if claims["dialect"] != dialect:
            issued_for = _API_NAMES.get(str(claims["dialect"]), "another API")
            return Verdict("token_invalid", user, f"Invalid access token (issued for {issued_for})")
        if float(claims["exp"]) <= self._clock() + skew:
            return Verdict("token_expired", user, "Access token has expired")
        if self._revoked(claims):
            return Verdict("token_revoked", user, "Access token has been revoked")
        return Verdict("ok", user, "")

    def redeem(self, token: str, *, skew: float = 0.0) -> Redemption:
        """Spend a refresh token: ok once, reused after that, revoked after the user's tokens
        were revoked, invalid if unknown or expired."""
        self._forget(expired_before=self._clock() - _RETENTION_SECONDS)
        now = self._clock() + skew
        claims = self._claims(token)
        if not claims or claims.get("typ") != "refresh":
            return Redemption("refresh_invalid", _owner(claims))
        jti, user = str(claims["jti"]), str(claims["sub"])
        if float(claims["exp"]) <= now:
            return Redemption("refresh_invalid", user)
        if jti in self._spent:
            return Redemption("refresh_reused", user)
        if self._revoked(claims):
            return Redemption("refresh_revoked", user)
        if self._usable.pop(jti, None) is None:
            return Redemption("refresh_invalid", user)
        self._spent[jti] = user
        return Redemption("ok", user)

    def _epoch(self, username: str) -> int:
        return self._epochs.get(username, 0)

    def _revoked(self, claims: dict[str, Any]) -> bool:
        return int(claims["epoch"]) < self._epoch(_owner(claims))

    def _sign(
        self, username: str, typ: str, dialect: Dialect, iat: float, lifetime: float
    ) -> tuple[str, str]:
        jti = secrets.token_hex(16)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": username,
            "iat": _numeric(iat),
            "exp": _numeric(iat + lifetime),
            "jti": jti,
            "typ": typ,
            "dialect": dialect,
            "epoch": self._epoch(username),
            "CustomerId": identity(username).customer_id,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), jti

    def _claims(self, token: str) -> dict[str, Any]:
        """Claims of a token we signed, whatever its age; empty if it is not ours."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=ISSUER,
                # Expiry is judged against the simulator's own (possibly skewed) clock instead.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["sub", "exp", "jti", "typ", "dialect", "epoch"],
                },
            )
        except jwt.InvalidTokenError:
            return {}
        return claims

    def _forget(self, *, expired_before: float) -> None:
        while self._expiries and self._expiries[0][0] < expired_before:
            _, jti = heapq.heappop(self._expiries)
            self._usable.pop(jti, None)
            self._spent.pop(jti, None)


def _owner(claims: dict[str, Any]) -> str:
    return str(claims.get("sub", "-"))


def opaque_token() -> str:
    """A random token that is not a JWT."""
    return secrets.token_urlsafe(32)


def bad_claims_token() -> str:
    """Three dot-separated segments, like a JWT, but the payload is not base64-encoded JSON."""
    header = base64.urlsafe_b64encode(json.dumps({"alg": _ALGORITHM, "typ": "JWT"}).encode())
    payload = base64.urlsafe_b64encode(b"\xff\xfe not json {")
    signature = base64.urlsafe_b64encode(secrets.token_bytes(32))
    return b".".join(part.rstrip(b"=") for part in (header, payload, signature)).decode()
