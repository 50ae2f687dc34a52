"""Caller authentication (`Authorization: Bearer <caller key>`, or a client certificate) and
per-account permission.

The caller table is built once at start-up, keyed by the SHA-256 of each caller's key (a caller
has several while its key is rotated, each an entry of its own): a request costs one hash, one
dict lookup and one constant-time comparison. A request without an `Authorization` header is
identified by its client certificate's subject, if the connection has a verified one (mTLS:
`service/serving.py` puts it in the scope as the ASGI "tls" extension). A caller that may not
use an account and an account that does not exist get the same 403, so callers cannot enumerate
the configured accounts.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service.config import CallerSettings
from service.keys import api_key_digest
from service.metrics import CALLER_AUTH_FAILURES, TOKEN_REQUESTS

log = logging.getLogger(__name__)

CALLERS_STATE_KEY = "callers"  # app.state entry holding the CallerDirectory
DENIED = "denied"  # the outcome label of token_requests_total for a refused configured account
_BEARER = "bearer"


class UnauthenticatedError(Exception):
    """No usable caller credential, or one that belongs to no caller (401)."""


class ForbiddenError(Exception):
    """The caller may not use this account, or the account does not exist (403)."""


class AuthMethod(StrEnum):
    """How a caller proved who it is."""

    API_KEY = "api_key"
    SERVICE_ACCOUNT = "service_account"
    CLIENT_CERTIFICATE = "client_certificate"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller and the configured accounts it may use.

    `credential` names what the caller presented, by `method`: the digest of its API key (one
    of several while the key is rotated), the `namespace/name` of its ServiceAccount, or its
    client certificate's subject. `pod` is the pod a ServiceAccount token is bound to, if any.
    A key digest identifies a key, so it stays out of metrics and logs (they use `name`).
    """

    name: str
    accounts: frozenset[str]
    credential: str
    method: AuthMethod = AuthMethod.API_KEY
    pod: str | None = None


class CallerDirectory:
    """Every configured caller, found by the digest of the key it presents or by the subject
    of its client certificate."""

    def __init__(self, callers: Mapping[str, CallerSettings], accounts: frozenset[str]) -> None:
        self.accounts = accounts
        self._by_digest: dict[str, Caller] = {}
        self._by_subject: dict[str, Caller] = {}
        for name, settings in callers.items():
            allowed = frozenset(account for account in accounts if settings.allows(account))
            # Every digest of a caller (several while its key is rotated) finds that caller.
            for digest in settings.key_digests():
                self._by_digest[digest] = Caller(name=name, accounts=allowed, credential=digest)
            for subject in settings.client_subjects or ():
                self._by_subject[subject] = Caller(
                    name=name,
                    accounts=allowed,
                    credential=subject,
                    method=AuthMethod.CLIENT_CERTIFICATE,
                )

    def authenticate(self, authorization: str | None, client_subject: str | None = None) -> Caller:
        """The caller whose key the `Authorization` header carries or, without that header, the
        caller with the verified client certificate's subject `client_subject` (RFC 4514);
        raises UnauthenticatedError."""
        if authorization is None and client_subject is not None:
            caller = self._by_subject.get(client_subject)
            if caller is None:
                _refuse("unknown")
            return caller
        key = _bearer_key(authorization)
        if key is None:
            _refuse("missing")
        digest = api_key_digest(key)
        caller = self._by_digest.get(digest)
        # Looking up a SHA-256 digest reveals nothing usable about the key; the final
        # comparison is constant-time all the same.
        if caller is None or not hmac.compare_digest(digest, caller.credential):
            _refuse("unknown")
        return caller


def _bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != _BEARER or not key or " " in key:
        return None
    return key


def _refuse(reason: str) -> NoReturn:
    CALLER_AUTH_FAILURES.labels(reason).inc()
    log.warning("caller authentication failed", extra={"event": "caller.refused", "reason": reason})
    raise UnauthenticatedError(reason)


def _authorization(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    # Straight from the raw ASGI headers (names arrive lower-cased): building Litestar's
    # Headers object for one header would cost more than the whole lookup.
    for name, value in connection.scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def _client_subject(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    # Only a connection whose handshake verified a client certificate has a name here.
    extensions: dict[str, Any] = connection.scope.get("extensions") or {}
    tls = extensions.get("tls")
    return tls.get("client_cert_name") if tls else None


def _identify(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    callers: CallerDirectory = connection.app.state[CALLERS_STATE_KEY]
    authorization = _authorization(connection)
    caller = callers.authenticate(
        authorization, _client_subject(connection) if authorization is None else None
    )
    connection.scope["user"] = caller
    return caller


async def requires_caller(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: identify the caller by its key or client certificate (else 401) and make it the
    connection's user.

    A guard rather than an authentication middleware, so that the refusal becomes a response
    inside the route, where the HTTP metrics see its real status. Guards are coroutines:
    Litestar runs a plain-function guard in a worker thread.
    """
    _identify(connection)


def authorise(connection: ASGIConnection[Any, Any, Any, Any], account: str) -> Caller:
    """Identify the caller (else UnauthenticatedError, a 401), then require that it may use the
    configured `account` (else ForbiddenError, a 403); the caller."""
    caller = _identify(connection)
    if account in caller.accounts:
        return caller
    CALLER_AUTH_FAILURES.labels("forbidden").inc()
    configured = account in connection.app.state[CALLERS_STATE_KEY].accounts
    # An unknown account is not counted under its name: that would let any caller mint labels.
    if configured:
        TOKEN_REQUESTS.labels(account, caller.name, DENIED).inc()
    log.warning(
        "token request denied",
        extra={
            "event": "token.denied",
            "account": account if configured else None,
            "caller": caller.name,
            "outcome": DENIED,
            "reason": "not_allowed" if configured else "unknown_account",
        },
    )
    raise ForbiddenError


async def requires_account_access(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: `authorise` the caller for the account named in the path (401 or 403 if not).

    One guard for both checks: Litestar copies the route handler for every guard it runs, on
    every request (GET token skips guards altogether and calls `authorise` itself).
    """
    authorise(connection, connection.path_params["account"])
