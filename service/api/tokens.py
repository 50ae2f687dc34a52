"""`/v1/accounts/{account}/token`: hand out a valid token, and replace one Monogoto rejected."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, Any, cast
from urllib.parse import parse_qsl

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import CacheControlHeader, State
from litestar.enums import ParamType
from litestar.exceptions import ValidationException
from litestar.openapi.spec import OpenAPIType, Operation, Parameter, Schema
from litestar.params import Body, FromPath
from litestar.response.base import ASGIResponse

from service.api.auditing import (
    INVALIDATE_EVENT,
    audit_failed,
    audit_issued,
    audit_log,
    authorise_audited,
    request_id,
    requires_audited_account_access,
)
from service.api.dependencies import provide_broker
from service.api.failure_log import FAILURE_LOG_STATE_KEY, FailureLog
from service.api.problems import problem_responses
from service.api.schemas import InvalidateBody, TokenBody, seconds_left
from service.api.security import Caller
from service.audit import AuditUnavailableError
from service.broker import BrokerError, IssuedToken, Outcome
from service.broker.core import TokenBroker
from service.broker.model import MAX_MIN_TTL_SECONDS
from service.claims import fingerprint
from service.metrics import token_requests

log = logging.getLogger(__name__)

GET_EVENT = "token.get"
ERROR = "error"  # the outcome label of token_requests_total when the broker cannot serve
_JSON = "application/json"

TokenRequest = Request[Caller, Any, State]


class _Answer(Response[TokenBody]):
    """A token answer whose ASGI response is built once per route, then handed out again.

    For a returned Response, Litestar builds a new ASGI response on every request: it merges
    the route's headers (here `Cache-Control`) into the response's, encodes them and renders
    the body. Everything it passes besides the request belongs to the route, so for the same
    route the result is the same; this answer builds it the first time and returns that after.
    An ASGI response keeps no state between calls, so concurrent requests can share it.
    """

    __slots__ = ("_built", "_built_for")

    def __init__(self, body: bytes) -> None:
        # The body is already JSON: Litestar sends bytes as they are; the schema says TokenBody.
        super().__init__(cast(TokenBody, body), media_type=_JSON)
        self._built: ASGIResponse | None = None
        self._built_for: object = None

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], **route: Any
    ) -> ASGIResponse:
        """The ASGI response for `request`: the one built for its route, if there is one."""
        handler = request.scope["route_handler"]
        if self._built is None or self._built_for is not handler:
            self._built = super().to_asgi_response(app, request, **route)
            self._built_for = handler
        return self._built


@dataclass(slots=True)
class _Rendered:
    """One account's last answer; reused while token and `expires_in` are the same, so under
    load one answer serves every request of a second."""

    access_token: str
    expires_at: float
    customer_id: str | None
    expires_in: int
    response: _Answer
    fingerprint: str


# One entry per configured account (the guard lets no other name through).
_rendered: dict[str, _Rendered] = {}


def _render(token: IssuedToken, now: float) -> _Rendered:
    """The answer for `token`: under load, the same one serves every request of a second."""
    expires_in = seconds_left(token.expires_at, now)
    last = _rendered.get(token.account)
    if (
        last is not None
        and last.expires_in == expires_in
        and last.expires_at == token.expires_at
        and last.access_token == token.access_token
        and last.customer_id == token.customer_id
    ):
        return last
    rendered = _Rendered(
        access_token=token.access_token,
        expires_at=token.expires_at,
        customer_id=token.customer_id,
        expires_in=expires_in,
        response=_Answer(msgspec.json.encode(TokenBody.of(token, now=now))),
        fingerprint=last.fingerprint
        if last is not None and last.access_token == token.access_token
        else fingerprint(token.access_token),
    )
    _rendered[token.account] = rendered
    return rendered


def _broker(request: TokenRequest) -> TokenBroker:
    # Called directly rather than injected: a dependency would cost a signature-model pass per
    # request on the hottest route.
    return provide_broker(request.app.state)


def _log_failure(
    request: TokenRequest,
    error: BrokerError,
    account: str,
    caller: Caller,
    event: str,
    **context: str,
) -> None:
    failures: FailureLog = request.app.state[FAILURE_LOG_STATE_KEY]
    suppressed = failures.warning_due(account, error.code)
    if suppressed is None and not log.isEnabledFor(logging.DEBUG):
        return
    extra: dict[str, object] = {
        "event": event,
        "account": account,
        "caller": caller.name,
        **context,
        "outcome": ERROR,
        "code": error.code,
    }
    if suppressed is None:
        log.debug("token request failed", extra=extra)
    else:
        extra["suppressed"] = suppressed
        log.warning("token request failed", extra=extra)


async def _serve(
    request: TokenRequest,
    issuing: Awaitable[IssuedToken],
    account: str,
    caller: Caller,
    event: str,
    *,
    reported: str | None = None,
    **context: str,
) -> Response[TokenBody]:
    """Await the broker, then count, log and audit the request: one metric, one log line and
    one audit line each (service.api.auditing).

    A GET answered from this process's cache logs at DEBUG: at thousands of requests per second
    nobody reads those lines (the metric counts them); every other answer logs at INFO. A
    failure logs at WARNING at most once per (account, code) and interval, else at DEBUG.
    """
    audit = audit_log(request)
    rid = request_id(request, audit)
    try:
        token = await issuing
        # Before the answer: with audit.fail_closed, no line means no token (503).
        audit_issued(audit, caller, account, event, token, rid=rid, reported=reported)
    except BrokerError as error:
        token_requests(account, caller.name, ERROR).inc()
        _log_failure(request, error, account, caller, event, request_id=rid, **context)
        if error.code != AuditUnavailableError.code:
            audit_failed(audit, caller, account, event, error, rid=rid, reported=reported)
        raise
    rendered = _render(token, time.time())
    outcome = token.outcome
    token_requests(account, caller.name, outcome).inc()
    level = logging.DEBUG if outcome is Outcome.LOCAL and event == GET_EVENT else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level,
            "token issued",
            extra={
                "event": event,
                "request_id": rid,
                "account": account,
                "caller": caller.name,
                **context,
                "outcome": str(outcome),
                "token_fingerprint": rendered.fingerprint,
                "expires_in": rendered.expires_in,
            },
        )
    return rendered.response


_MIN_TTL = "min_ttl"
_MIN_TTL_DESCRIPTION = (
    "Seconds the token must still be valid for, at least `refresh.min_remaining_seconds`; "
    "the broker renews it first if needed. Less than the account's token lifetime (else 400). "
    "A renewal only this parameter calls for is forced: one per caller, account and minute "
    "(else 429 `renewal_rate_limited`)."
)
# The struct refuses unknown members (400); Litestar's schema for it does not say so itself.
_NO_OTHER_MEMBERS = {"additional_properties": False}
_MinTtl = Annotated[int, msgspec.Meta(ge=0, le=MAX_MIN_TTL_SECONDS)]


def _min_ttl(query: bytes) -> int:
    """`min_ttl` from the raw query string, read as Litestar reads query parameters (blank
    values kept, the last one wins, lax string-to-int conversion); 400 if it is not valid."""
    value = None
    if query:
        for key, item in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == _MIN_TTL:
                value = item
    if value is None:
        return 0
    try:
        return msgspec.convert(value, _MinTtl, strict=False)
    except msgspec.ValidationError as error:
        raise ValidationException(
            detail="Validation failed",
            extra=[{"message": str(error), "key": _MIN_TTL, "source": "query"}],
        ) from None


@dataclass
class _GetTokenOperation(Operation):
    """The OpenAPI operation of GET token, with the `min_ttl` query parameter its handler
    reads itself (a declared parameter would cost a validation pass before authorisation)."""

    parameters: list[Parameter | Any] | None = field(default=None)

    def __post_init__(self) -> None:
        self.parameters = [
            *(self.parameters or []),
            Parameter(
                name=_MIN_TTL,
                param_in=ParamType.QUERY,
                required=False,
                description=_MIN_TTL_DESCRIPTION,
                schema=Schema(
                    type=OpenAPIType.INTEGER,
                    default=0,
                    minimum=0.0,
                    maximum=float(MAX_MIN_TTL_SECONDS),
                    description=_MIN_TTL_DESCRIPTION,
                ),
            ),
        ]


class TokenController(Controller):
    """An account's current access token."""

    path = "/accounts/{account:str}/token"
    tags = ("tokens",)
    cache_control = CacheControlHeader(no_store=True)

    @get(
        operation_id="getToken",
        summary="Get a valid access token",
        responses=problem_responses(400, 401, 403, 429, 503),
        operation_class=_GetTokenOperation,
    )
    async def get_token(self, request: TokenRequest) -> Response[TokenBody]:
        """A token of `account` with at least `max(min_ttl, refresh.min_remaining_seconds)`
        seconds left. Use it as `Authorization: Bearer <access_token>` against Monogoto."""
        # The hottest route takes no parameters and runs no guard: Litestar would copy the
        # route handler for the guard and validate a signature model on every request.
        account: str = request.path_params["account"]
        caller = await authorise_audited(request, account, GET_EVENT)
        min_ttl = _min_ttl(request.scope["query_string"])
        return await _serve(
            request,
            _broker(request).get(account, min_ttl=min_ttl, caller=caller.name),
            account,
            caller,
            GET_EVENT,
        )

    @post(
        "/invalidate",
        operation_id="invalidateToken",
        summary="Report a token Monogoto rejected",
        status_code=200,
        responses=problem_responses(400, 401, 403, 413, 429, 503),
        guards=[requires_audited_account_access],
    )
    async def invalidate_token(
        self,
        request: TokenRequest,
        account: FromPath[str],
        data: Annotated[InvalidateBody, Body(schema_extra=_NO_OTHER_MEMBERS)],
    ) -> Response[TokenBody]:
        """If the reported token is still the current one, the broker obtains a new one;
        if it was already replaced, the current one comes back without calling Monogoto."""
        return await _serve(
            request,
            _broker(request).invalidate(account, data.access_token, caller=request.user.name),
            account,
            request.user,
            INVALIDATE_EVENT,
            reported=data.access_token,
            reported_fingerprint=fingerprint(data.access_token),
        )
