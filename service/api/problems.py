"""The one place where exceptions become RFC 9457 `application/problem+json` responses.

Every problem has `type` (`about:blank`: the `code` member names the problem), `title` (the
HTTP reason phrase), `status`, `detail` and a stable `code` (docs/api.md). Details are fixed
texts or the broker's own messages, never the request's content: an invalid token or key sent
by a caller is not echoed back.
"""

from __future__ import annotations

import logging
import math
import traceback
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap

from service.api.schemas import MAX_ACCESS_TOKEN_LENGTH, MAX_BODY_BYTES
from service.api.security import ForbiddenError, UnauthenticatedError
from service.broker import BrokerError
from service.broker.model import MAX_MIN_TTL_SECONDS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Problems are never cached: some answer token routes, and a 503 must be retried, not replayed.
_HEADERS = {"Cache-Control": "no-store"}
_CODES_BY_STATUS = {
    HTTPStatus.NOT_FOUND: "not_found",
    HTTPStatus.METHOD_NOT_ALLOWED: "method_not_allowed",
}
_DESCRIPTIONS = {
    400: "`invalid_request`: bad `min_ttl` (or one at least the token lifetime) or malformed body.",
    401: "`unauthenticated`: missing or unknown caller key, or an invalid ServiceAccount token "
    "or one of no caller (`WWW-Authenticate: Bearer`).",
    403: "`forbidden`: the caller may not use this account, or it does not exist.",
    413: f"`invalid_request`: a body over {MAX_BODY_BYTES // 1024} KiB.",
    429: "`renewal_rate_limited`: this caller already forced a renewal of this account in the "
    "last minute (a `min_ttl` the current token cannot meet, or the report of a token still "
    "valid); the current token stays valid and nothing was sent to Monogoto; `Retry-After` set.",
    503: "`upstream_unavailable` (Monogoto unreachable, erroring or rate limiting), "
    "`credentials_rejected` (Monogoto rejects the account's credentials) or "
    "`audit_unavailable` (`audit.fail_closed` is set and the audit log cannot be written); "
    "`Retry-After` set.",
}

_TOO_LARGE = f"The request body must be at most {MAX_BODY_BYTES // 1024} KiB."


class Problem(msgspec.Struct):
    """An RFC 9457 problem detail with the broker's stable `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str


def problem(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response[bytes]:
    """A problem+json response."""
    body = Problem("about:blank", HTTPStatus(status).phrase, status, detail, code)
    return Response(
        msgspec.json.encode(body),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=_HEADERS | (headers or {}),
    )


def problem_responses(
    *statuses: int, descriptions: dict[int, str] | None = None
) -> dict[int, ResponseSpec]:
    """OpenAPI `responses` documenting the problems a route may answer; `descriptions`
    replaces the usual description of a status where the route means something else by it."""
    described = _DESCRIPTIONS | (descriptions or {})
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=described[status],
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status in statuses
    }


def _broker_error(_: Request[Any, Any, Any], error: BrokerError) -> Response[bytes]:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return problem(error.status, error.code, error.detail, headers)


def _unauthenticated(_: Request[Any, Any, Any], __: UnauthenticatedError) -> Response[bytes]:
    return problem(
        401,
        "unauthenticated",
        "A valid caller key is required: Authorization: Bearer <caller key>.",
        {"WWW-Authenticate": "Bearer"},
    )


def _forbidden(_: Request[Any, Any, Any], error: ForbiddenError) -> Response[bytes]:
    # Only the broker's own fixed texts are messages of this error.
    return problem(403, "forbidden", str(error) or "This caller may not use this account.")


def _invalid_request_detail(request: Request[Any, Any, Any], error: HTTPException) -> str:
    # Litestar names the offending parameter in `extra`; only our own names are repeated.
    sources = error.extra if isinstance(error.extra, list) else []
    if any(isinstance(item, dict) and item.get("key") == "min_ttl" for item in sources):
        return f"min_ttl must be a whole number of seconds from 0 to {MAX_MIN_TTL_SECONDS}."
    if request.method == "POST":  # the one route with a body: invalidate
        return (
            'The body must be a JSON object {"access_token": "<the rejected token>"} '
            f"of at most {MAX_ACCESS_TOKEN_LENGTH} characters."
        )
    return "The request is malformed."


def _http_exception(request: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    status = error.status_code
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return _internal_error(request, error)
    if status == HTTPStatus.BAD_REQUEST:
        return problem(status, "invalid_request", _invalid_request_detail(request, error))
    if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        return problem(status, "invalid_request", _TOO_LARGE)
    code = _CODES_BY_STATUS.get(HTTPStatus(status), "invalid_request")
    # Only headers Litestar set itself (e.g. `Allow` on 405); the detail is the reason phrase.
    return problem(status, code, HTTPStatus(status).phrase + ".", dict(error.headers or {}))


def _internal_error(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    # The exception's message may quote a token or a password: log its type and frames only.
    log.error(
        "unhandled exception",
        extra={
            "event": "http.internal_error",
            "error_type": f"{type(error).__module__}.{type(error).__qualname__}",
            "route": request.scope.get("path_template"),
            "stack": "".join(traceback.format_tb(error.__traceback__)),
        },
    )
    return problem(500, "internal_error", "Internal error; see the broker's logs.")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    BrokerError: _broker_error,
    UnauthenticatedError: _unauthenticated,
    ForbiddenError: _forbidden,
    HTTPException: _http_exception,
    Exception: _internal_error,
}
