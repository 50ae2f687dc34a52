"""Request and response bodies of the HTTP API (docs/api.md), as msgspec structs.

msgspec encodes and validates these natively, which keeps the token hot path cheap, and
Litestar derives the OpenAPI schemas from them.
"""

from __future__ import annotations

import math
import time
from typing import Annotated

import msgspec

from service.broker import AccountStatus, AccountView, CredentialsStatus, IssuedToken
from service.broker.plan import Renewal
from service.config import Dialect

_BEARER = "Bearer"  # the only token type Monogoto issues
# Generous for a JWT, small enough that nobody posts a novel.
MAX_ACCESS_TOKEN_LENGTH = 16 * 1024
# Far above any valid body (an invalidate request carries one token); larger ones get 413.
MAX_BODY_BYTES = 64 * 1024


def utc_iso(timestamp: float) -> str:
    """Wall-clock seconds as ISO 8601 UTC with a `Z`, in whole seconds (rounded down)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _utc_iso_or_none(timestamp: float | None) -> str | None:
    return None if timestamp is None else utc_iso(timestamp)


def seconds_left(expires_at: float, now: float) -> int:
    """`expires_in`: whole seconds from `now` until `expires_at`, never below 0."""
    return max(0, math.floor(expires_at - now))


class TokenBody(msgspec.Struct):
    """A token handed to a caller."""

    account: str
    access_token: str
    token_type: str
    expires_at: str
    expires_in: int
    customer_id: str | None

    @classmethod
    def of(cls, token: IssuedToken, *, now: float) -> TokenBody:
        """The body for `token`; `expires_in` counts whole seconds from `now`, never below 0."""
        return cls(
            account=token.account,
            access_token=token.access_token,
            token_type=_BEARER,
            expires_at=utc_iso(token.expires_at),
            expires_in=seconds_left(token.expires_at, now),
            customer_id=token.customer_id,
        )


class InvalidateBody(msgspec.Struct, forbid_unknown_fields=True):
    """A token Monogoto rejected, as reported by a caller."""

    access_token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ACCESS_TOKEN_LENGTH)]


class AccountBody(msgspec.Struct):
    """One account's state; never a token."""

    name: str
    dialect: Dialect
    status: AccountStatus
    expires_at: str | None
    last_refresh_at: str | None
    last_error: str | None
    credentials: CredentialsStatus
    next_renewal_at: str | None
    at_risk: bool

    @classmethod
    def of(cls, view: AccountView, renewal: Renewal | None) -> AccountBody:
        """The body for one account, with its place in the renewal plan if it has one."""
        return cls(
            name=view.name,
            dialect=view.dialect,
            status=view.status,
            expires_at=_utc_iso_or_none(view.expires_at),
            last_refresh_at=_utc_iso_or_none(view.last_refresh_at),
            last_error=view.last_error,
            credentials=view.credentials,
            next_renewal_at=None if renewal is None else utc_iso(renewal.next_renewal_at),
            at_risk=renewal is not None and renewal.at_risk,
        )


class VerifiedBody(msgspec.Struct):
    """The outcome of a login made to verify an account's configured credentials."""

    account: str
    credentials: CredentialsStatus
    detail: str


class AccountsBody(msgspec.Struct):
    """The accounts a caller may use."""

    accounts: list[AccountBody]


class CheckBody(msgspec.Struct):
    """One readiness check."""

    name: str
    ok: bool
    detail: str


class StoreTopologyBody(msgspec.Struct):
    """The store's nodes as last reached: its topology (memory, standalone, sentinel or
    cluster), the masters it writes to (host:port) and how many nodes are known (masters,
    replicas and, with Sentinel, sentinels)."""

    topology: str
    masters: list[str]
    nodes: int


class ReadinessBody(msgspec.Struct):
    """Whether this process can serve tokens, and why."""

    ready: bool
    checks: list[CheckBody]
    store: StoreTopologyBody | None = None


class HealthBody(msgspec.Struct):
    """The process is alive."""

    status: str
