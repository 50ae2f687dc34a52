"""What the three auth endpoints answer, decided without any HTTP machinery."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from service.simulator.faults import AuthEndpoint, FaultRule
from service.simulator.state import Outcome, SimulatorState
from service.simulator.tokens import Dialect, bad_claims_token, identity, opaque_token

JSON = "application/json"
TEXT = "text/plain"
HTML = "text/html"

ACCESS_DENIED = "Access denied"
TOO_MANY_REQUESTS = "Too Many Requests"

_FIELDS: dict[AuthEndpoint, tuple[str, ...]] = {
    "legacy_auth": ("UserName", "Password"),
    "v1_token": ("username", "password"),
    "v1_refresh": ("refresh_token",),
}


@dataclass(slots=True)
class Answer:
    """An endpoint's response, and how to deliver it."""

    outcome: Outcome
    user: str
    status: int
    content: dict[str, Any] | list[Any] | str
    media_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    drop: bool = False  # close the connection after the headers instead of sending the body


@dataclass(frozen=True, slots=True)
class _Call:
    user: str  # as named by the call ("-" if none)
    fields: dict[str, str] | None  # None when the body is malformed
    problem: str = ""


def answer(sim: SimulatorState, endpoint: AuthEndpoint, client: str, body: bytes) -> Answer:
    """Rate-limit, fault-inject, handle and count one call to `endpoint` from `client`.

    The call's effects (a spent refresh token) happen here, before any delay or dropped
    connection: a client that gives up waiting cannot tell whether its call took effect.
    """
    call = _parse(sim, endpoint, body)
    admission = sim.admit(endpoint, client)
    headers = {
        "X-RateLimit-Limit": str(admission.limit),
        "X-RateLimit-Remaining": str(admission.remaining),
    }
    if admission.retry_after is not None:
        headers["Retry-After"] = str(admission.retry_after)
        result = Answer("rate_limited", call.user, 429, {"message": TOO_MANY_REQUESTS})
    else:
        result = _with_fault(sim, endpoint, call, sim.faults.take(endpoint))
    result.headers = {**headers, **result.headers}
    result.delay += sim.settings.latency_seconds
    sim.count(endpoint, result.user, result.outcome)
    return result


def _with_fault(
    sim: SimulatorState, endpoint: AuthEndpoint, call: _Call, fault: FaultRule | None
) -> Answer:
    if fault is None:
        return _handle(sim, endpoint, call)
    if fault.kind == "status":
        status = fault.status or 500  # FaultRule guarantees a status for this kind
        result = Answer("injected_status", call.user, status, {"message": phrase(status)})
        if fault.retry_after is not None:
            result.headers["Retry-After"] = str(fault.retry_after)
        return result
    if fault.kind == "garbage":
        return _garbage(sim, endpoint, call.user, fault.body or "not_json")
    result = _handle(sim, endpoint, call)
    if fault.kind == "delay":
        result.delay += fault.seconds or 0.0
    else:
        result.outcome, result.drop = "dropped", True
    return result


def _handle(sim: SimulatorState, endpoint: AuthEndpoint, call: _Call) -> Answer:
    if call.fields is None:
        return Answer("malformed", call.user, 400, {"message": call.problem})
    if endpoint == "v1_refresh":
        return _refresh(sim, call.fields["refresh_token"])
    username, password = (call.fields[name] for name in _FIELDS[endpoint])
    if not sim.authenticate(username, password):
        if endpoint == "legacy_auth":
            return Answer("rejected", username, 404, ACCESS_DENIED, media_type=TEXT)
        return Answer("rejected", username, 401, {"message": "Invalid username or password"})
    if endpoint == "legacy_auth":
        token = _access(sim, username, "legacy")
        return Answer("ok", username, 200, _legacy_body(username, token))
    return Answer("ok", username, 200, _v1_pair(sim, username))


def _refresh(sim: SimulatorState, token: str) -> Answer:
    redemption = sim.tokens.redeem(token, skew=sim.settings.clock_skew_seconds)
    if redemption.outcome == "ok":
        return Answer("ok", redemption.user, 200, _v1_pair(sim, redemption.user))
    message = {
        "refresh_reused": "Refresh token already used",
        "refresh_revoked": "Refresh token has been revoked",
    }.get(redemption.outcome, "Invalid refresh token")
    return Answer(redemption.outcome, redemption.user, 401, {"message": message})


def _garbage(sim: SimulatorState, endpoint: AuthEndpoint, user: str, kind: str) -> Answer:
    legacy = endpoint == "legacy_auth"
    if kind == "not_json":
        page = "<html><body><h1>Service temporarily unavailable</h1></body></html>"
        return Answer("garbage", user, 200, page, media_type=HTML)
    if kind == "missing_fields":
        partial = {"UserName": user, "Role": "Admin"} if legacy else {"token_type": "Bearer"}
        return Answer("garbage", user, 200, partial)
    settings = sim.settings
    if kind == "expired_token":
        token = sim.tokens.expired_access_token(
            user,
            lifetime=settings.token_lifetime_seconds,
            skew=settings.clock_skew_seconds,
            dialect="legacy" if legacy else "v1",
        )
    else:
        token = opaque_token() if kind == "opaque_token" else bad_claims_token()
    content = _legacy_body(user, token) if legacy else _v1_pair(sim, user, access=token)
    return Answer("garbage", user, 200, content)


def json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object; ValueError says what is wrong."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("body must be a JSON object")
    return payload


def _parse(sim: SimulatorState, endpoint: AuthEndpoint, body: bytes) -> _Call:
    names = _FIELDS[endpoint]
    try:
        payload = json_object(body)
    except ValueError as error:
        return _Call("-", None, str(error))
    named = payload.get(names[0])
    user = "-" if not isinstance(named, str) else named
    if endpoint == "v1_refresh" and isinstance(named, str):
        user = sim.tokens.owner(named)
    if wrong := [name for name in names if not isinstance(payload.get(name), str)]:
        return _Call(user, None, f"missing or non-string field(s): {', '.join(wrong)}")
    return _Call(user, {name: payload[name] for name in names})


def _access(sim: SimulatorState, username: str, dialect: Dialect) -> str:
    settings = sim.settings
    return sim.tokens.access_token(
        username,
        lifetime=settings.token_lifetime_seconds,
        skew=settings.clock_skew_seconds,
        dialect=dialect,
    )


def _v1_pair(sim: SimulatorState, username: str, *, access: str | None = None) -> dict[str, Any]:
    settings = sim.settings
    refresh = sim.tokens.refresh_token(
        username, lifetime=settings.refresh_lifetime_seconds, skew=settings.clock_skew_seconds
    )
    return {
        "token_type": "Bearer",
        "access_token": access or _access(sim, username, "v1"),
        "refresh_token": refresh,
    }


def _legacy_body(username: str, token: str) -> dict[str, Any]:
    ids = identity(username)
    return {
        "token": token,
        # Legacy accounts get a refresh token but no endpoint to use it with.
        "refreshToken": opaque_token(),
        "CustomerId": ids.customer_id,
        "UserId": ids.user_id,
        "UserName": username,
        "Role": "Admin",
        "Realm": "monogoto",
        "OrganizationId": ids.organization_id,
        "UserProfile": {
            "FirstName": username.partition("@")[0].capitalize(),
            "LastName": "Simulated",
            "Email": username,
            "Phone": "+10000000000",
            "Language": "en",
            "TimeZone": "UTC",
        },
    }


def phrase(status: int) -> str:
    """The reason phrase of an HTTP status, for injected status faults."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Injected fault"
