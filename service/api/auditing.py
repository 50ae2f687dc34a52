"""The token routes' audit lines (service.audit): who asked for which account's token, how it
authenticated, and what came of it. Each request that reaches a token route's authorisation
writes one line, whatever its answer, except one refused as malformed (400 before the broker
is asked), which hands out, revokes and refuses nothing."""

from __future__ import annotations

import re
from typing import Any, cast

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service.api.dependencies import provide_runtime
from service.api.security import (
    CALLERS_STATE_KEY,
    AuthMethod,
    Caller,
    ForbiddenError,
    UnauthenticatedError,
    authorise,
    requires_admin,
)
from service.audit import AuditLine, AuditLog, AuditOutcome
from service.broker import BrokerError, IssuedToken
from service.keys import DIGEST_PREFIX

INVALIDATE_EVENT = "token.invalidate"
_REQUEST_ID_HEADER = b"x-request-id"
# A caller's request id is kept if it is a plain token of this shape (a UUID, a trace id),
# else the broker makes one: the audit log must not carry arbitrary text from a request.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# A key digest identifies a key: enough of it to tell a caller's keys apart while rotating.
_DIGEST_SHOWN = 8

Connection = ASGIConnection[Any, Any, Any, Any]


def audit_log(connection: Connection) -> AuditLog:
    """The running audit log (started with the broker runtime by the app's lifespan)."""
    return provide_runtime(connection.app.state).audit


def request_id(connection: Connection, audit: AuditLog) -> str:
    """The request's `X-Request-ID` if it is a plain id, else one made for it."""
    # Raw ASGI headers, as for `Authorization` (security.py): names arrive lower-cased.
    for name, value in connection.scope["headers"]:
        if name == _REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return audit.new_request_id()


def _credential(caller: Caller) -> str:
    if caller.method is AuthMethod.API_KEY:
        return DIGEST_PREFIX + caller.credential[:_DIGEST_SHOWN]
    return caller.credential


def audit_issued(
    audit: AuditLog,
    caller: Caller,
    account: str,
    event: str,
    token: IssuedToken,
    *,
    rid: str,
    reported: str | None = None,
) -> None:
    """The line of a token about to be handed out; AuditUnavailableError (503) instead of the
    token with `audit.fail_closed` when it cannot be written."""
    if event == INVALIDATE_EVENT:
        outcome = AuditOutcome.INVALIDATED
    else:
        outcome = AuditOutcome.FORCED if token.forced else AuditOutcome.ISSUED

    def build() -> AuditLine:
        return audit.line(
            event=event,
            outcome=outcome,
            status=200,
            request_id=rid,
            caller=caller.name,
            auth=caller.method,
            credential=_credential(caller),
            pod=caller.pod,
            account=account,
            source=token.outcome,
            token_hmac=audit.fingerprint(token.access_token),
            reported_hmac=None if reported is None else audit.fingerprint(reported),
        )

    # Everything in the line but its time and request id: a cache hit's line repeats.
    key = (outcome, caller, account, token.outcome, token.access_token, reported)
    audit.record_repeated(key, build, rid)


def audit_failed(
    audit: AuditLog,
    caller: Caller,
    account: str,
    event: str,
    error: BrokerError,
    *,
    rid: str,
    reported: str | None = None,
) -> None:
    """The line of a token request the broker could not serve (503, 429, 400)."""
    audit.record(
        audit.line(
            event=event,
            outcome=AuditOutcome.FAILED,
            status=error.status,
            code=error.code,
            request_id=rid,
            caller=caller.name,
            auth=caller.method,
            credential=_credential(caller),
            pod=caller.pod,
            account=account,
            reported_hmac=None if reported is None else audit.fingerprint(reported),
        )
    )


def _audit_denied(
    connection: Connection, account: str, event: str, error: Exception, *, action: bool = False
) -> None:
    audit = audit_log(connection)
    configured = account in connection.app.state[CALLERS_STATE_KEY].accounts
    caller = cast(Caller | None, connection.scope.get("user"))
    if isinstance(error, UnauthenticatedError):
        status, code, reason, caller = 401, "unauthenticated", str(error), None
    else:
        status, code = 403, "forbidden"
        reason = "not_admin" if action else "not_allowed" if configured else "unknown_account"
    audit.record(
        audit.line(
            event=event,
            outcome=AuditOutcome.DENIED,
            status=status,
            code=code,
            request_id=request_id(connection, audit),
            caller=None if caller is None else caller.name,
            auth=None if caller is None else caller.method,
            credential=None if caller is None else _credential(caller),
            pod=None if caller is None else caller.pod,
            # A name nobody configured is the caller's text: left out, as in the app's logs.
            account=account if configured else None,
            reason=reason,
            action=action,
        )
    )


def audit_action(
    connection: Connection,
    caller: Caller,
    account: str,
    event: str,
    outcome: AuditOutcome,
    *,
    error: BrokerError | None = None,
) -> None:
    """The line of an operator action on a configured account: its outcome, or the error it
    was answered with."""
    audit = audit_log(connection)
    audit.record(
        audit.line(
            event=event,
            outcome=outcome,
            status=200 if error is None else error.status,
            code=None if error is None else error.code,
            request_id=request_id(connection, audit),
            caller=caller.name,
            auth=caller.method,
            credential=_credential(caller),
            pod=caller.pod,
            account=account,
            action=True,
        )
    )


async def requires_audited_admin(connection: Connection, handler: BaseRouteHandler) -> None:
    """Guard of the operator actions: `requires_admin` (401 or 403 if not), with refusals
    audited under the route's event (its `opt["audit_event"]`)."""
    try:
        await requires_admin(connection, handler)
    except (UnauthenticatedError, ForbiddenError) as error:
        event = handler.opt["audit_event"]
        _audit_denied(connection, connection.path_params["account"], event, error, action=True)
        raise


async def authorise_audited(connection: Connection, account: str, event: str) -> Caller:
    """`authorise`, writing the audit line of a refusal (401, 403) before it is answered."""
    try:
        return await authorise(connection, account)
    except (UnauthenticatedError, ForbiddenError) as error:
        _audit_denied(connection, account, event, error)
        raise


async def requires_audited_account_access(connection: Connection, _: BaseRouteHandler) -> None:
    """Guard of the invalidate route: `authorise` the caller for the account named in the path
    (401 or 403 if not), with refusals audited.

    One guard for both checks: Litestar copies the route handler for every guard it runs, on
    every request (GET token skips guards altogether and calls `authorise_audited` itself).
    """
    await authorise_audited(connection, connection.path_params["account"], INVALIDATE_EVENT)
