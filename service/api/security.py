"""Caller authentication (`Authorization: Bearer <caller key>` or `Bearer <ServiceAccount
token>`, or a client certificate) and per-account permission.

The caller table is built once at start-up, keyed by the SHA-256 of each caller's key (a caller
has several while its key is rotated, each an entry of its own): a request costs one hash, one
dict lookup and one constant-time comparison. A credential that is no known key but has the
shape of a JWT is verified as a ServiceAccount token (service/api/service_accounts.py) when
`caller_auth.kubernetes` is configured, the same hash being the key of the verified tokens.
A request without an `Authorization` header is identified by its client certificate's subject,
if the connection has a verified one (mTLS: `service/serving.py` puts it in the scope as the
ASGI "tls" extension). A caller that may not use an account and an account that does not exist
get the same 403, so callers cannot enumerate the configured accounts.
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

from service.api.service_accounts import ServiceAccountVerifier, TokenRejectedError, looks_like_jwt
from service.config import CallerSettings, KubernetesAuthSettings
from service.keys import api_key_digest
from service.metrics import CALLER_AUTH_FAILURES, TOKEN_REQUESTS

log = logging.getLogger(__name__)

CALLERS_STATE_KEY = "callers"  # app.state entry holding the CallerDirectory
DENIED = "denied"  # the outcome label of token_requests_total for a refused configured account
_BEARER = "bearer"


class UnauthenticatedError(Exception):
    """No usable caller credential, or one that belongs to no caller (401)."""


class ForbiddenError(Exception):
    """The caller may not use this account, or the account does not exist (403); or, with
    `ADMIN_ONLY` as its message, the caller is not an admin."""


ADMIN_ONLY = "Only callers configured with admin: true may do this."


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
    `admin` callers may use the operator actions on every configured account.
    """

    name: str
    accounts: frozenset[str]
    credential: str
    method: AuthMethod = AuthMethod.API_KEY
    pod: str | None = None
    admin: bool = False


class CallerDirectory:
    """Every configured caller, found by the digest of the key it presents, by the subject of
    its client certificate, or, when `kubernetes` names a cluster, by the ServiceAccount its
    token from that cluster proves."""

    def __init__(
        self,
        callers: Mapping[str, CallerSettings],
        accounts: frozenset[str],
        kubernetes: KubernetesAuthSettings | None = None,
        *,
        verifier: ServiceAccountVerifier | None = None,
    ) -> None:
        self.accounts = accounts
        self._by_digest: dict[str, Caller] = {}
        self._by_subject: dict[str, Caller] = {}
        # namespace/name -> the caller's name and the accounts it may use
        self._by_service_account: dict[str, tuple[str, frozenset[str]]] = {}
        self._admins = frozenset(name for name, settings in callers.items() if settings.admin)
        for name, settings in callers.items():
            allowed = frozenset(account for account in accounts if settings.allows(account))
            # Every digest of a caller (several while its key is rotated) finds that caller.
            for digest in settings.key_digests():
                self._by_digest[digest] = Caller(
                    name=name, accounts=allowed, credential=digest, admin=settings.admin
                )
            for subject in settings.client_subjects or ():
                self._by_subject[subject] = Caller(
                    name=name,
                    accounts=allowed,
                    credential=subject,
                    method=AuthMethod.CLIENT_CERTIFICATE,
                    admin=settings.admin,
                )
            for service_account in settings.service_accounts or ():
                self._by_service_account[service_account] = (name, allowed)
        if verifier is None and kubernetes is not None:
            verifier = ServiceAccountVerifier(kubernetes)
        self.service_accounts = verifier

    def replaced(
        self, callers: Mapping[str, CallerSettings], accounts: frozenset[str]
    ) -> CallerDirectory:
        """The directory of a reloaded config's `callers`, sharing this one's ServiceAccount
        verifier (the cluster's keys, the tokens verified): `caller_auth` does not change live."""
        return CallerDirectory(callers, accounts, verifier=self.service_accounts)

    def start(self) -> None:
        """Start fetching the keys ServiceAccount tokens are checked against, if configured."""
        if self.service_accounts is not None:
            self.service_accounts.keys.start()

    async def stop(self) -> None:
        """Stop what `start` started."""
        if self.service_accounts is not None:
            await self.service_accounts.keys.stop()

    async def authenticate(
        self, authorization: str | None, client_subject: str | None = None
    ) -> Caller:
        """The caller whose key or ServiceAccount token the `Authorization` header carries or,
        without that header, the caller with the verified client certificate's subject
        `client_subject` (RFC 4514); raises UnauthenticatedError."""
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
            if self.service_accounts is not None and looks_like_jwt(key):
                return await self._service_account_caller(self.service_accounts, key, digest)
            _refuse("unknown")
        return caller

    async def _service_account_caller(
        self, verifier: ServiceAccountVerifier, token: str, digest: str
    ) -> Caller:
        try:
            identity = await verifier.verify(token, digest)
        except TokenRejectedError as error:
            metric = "keys_unavailable" if error.reason == "keys_unavailable" else "invalid_token"
            _refuse(metric, detail=error.reason)
        found = self._by_service_account.get(identity.service_account)
        if found is None:
            # A genuine token of a ServiceAccount no caller has is an unknown credential.
            namespace, _, account = identity.service_account.partition("/")
            _refuse("unknown", namespace=namespace, serviceaccount=account)
        name, allowed = found
        return Caller(
            name=name,
            accounts=allowed,
            credential=identity.service_account,
            method=AuthMethod.SERVICE_ACCOUNT,
            pod=identity.pod,
            admin=name in self._admins,
        )


def _bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != _BEARER or not key or " " in key:
        return None
    return key


def _refuse(reason: str, **context: str) -> NoReturn:
    """Count and log a refused credential (`context`: what is known of it, never the
    credential itself), then raise UnauthenticatedError."""
    CALLER_AUTH_FAILURES.labels(reason).inc()
    log.warning(
        "caller authentication failed",
        extra={"event": "caller.refused", "reason": reason, **context},
    )
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


async def _identify(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    callers: CallerDirectory = connection.app.state[CALLERS_STATE_KEY]
    authorization = _authorization(connection)
    caller = await callers.authenticate(
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
    await _identify(connection)


async def requires_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: identify the caller (else 401) and require that it is an admin (else 403)."""
    caller = await _identify(connection)
    if caller.admin:
        return
    CALLER_AUTH_FAILURES.labels("forbidden").inc()
    log.warning(
        "operator action denied",
        extra={
            "event": "account.action_denied",
            "caller": caller.name,
            "route": connection.scope.get("path_template"),
            "reason": "not_admin",
        },
    )
    raise ForbiddenError(ADMIN_ONLY)


async def authorise(connection: ASGIConnection[Any, Any, Any, Any], account: str) -> Caller:
    """Identify the caller (else UnauthenticatedError, a 401), then require that it may use the
    configured `account` (else ForbiddenError, a 403); the caller."""
    caller = await _identify(connection)
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
