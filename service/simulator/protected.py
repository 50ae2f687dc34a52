"""What the protected endpoints answer: Monogoto's API beyond auth, reduced to listing things.

Each checks the bearer token the way the real API does, so a caller can test its 401 handling;
the bodies are small stand-ins (docs/simulator.md, "Protected endpoints").
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from service.simulator.auth import JSON, TEXT, Answer, phrase
from service.simulator.faults import ApiEndpoint
from service.simulator.state import Outcome, SimulatorState
from service.simulator.tokens import Dialect, Verdict, identity

LEGACY_THINGS_PATH = "/things"
V1_THINGS_PATH = "/v1/things"

_DIALECTS: dict[ApiEndpoint, Dialect] = {"legacy_things": "legacy", "v1_things": "v1"}
_MISSING = "Missing or malformed Authorization header (expected 'Bearer <access token>')"
_THINGS_PER_USER = 2


def protected_answer(
    sim: SimulatorState, endpoint: ApiEndpoint, authorization: str | None
) -> Answer:
    """Judge the bearer token, apply the first fault rule naming `endpoint`, count the call.

    No rate limit and no `latency_seconds` here: those model Monogoto's auth endpoints.
    """
    dialect = _DIALECTS[endpoint]
    verdict = _judge(sim, dialect, authorization)
    fault = sim.faults.take(endpoint)
    if fault is not None and fault.kind == "status":
        status = fault.status or 500  # FaultRule guarantees a status for this kind
        result = _error(dialect, "injected_status", verdict.user, status, phrase(status))
        if fault.retry_after is not None:
            result.headers["Retry-After"] = str(fault.retry_after)
    else:
        result = _handle(dialect, verdict)
        if fault is not None and fault.kind == "delay":
            result.delay += fault.seconds or 0.0
        elif fault is not None and fault.kind == "drop":
            result.outcome, result.drop = "dropped", True
    sim.count(endpoint, result.user, result.outcome)
    return result


def _judge(sim: SimulatorState, dialect: Dialect, authorization: str | None) -> Verdict:
    token = _bearer(authorization)
    if token is None:
        return Verdict("token_missing", "-", _MISSING)
    return sim.tokens.verify_access(token, dialect=dialect, skew=sim.settings.clock_skew_seconds)


def _bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(char.isspace() for char in token):
        return None
    return token


def _handle(dialect: Dialect, verdict: Verdict) -> Answer:
    if verdict.outcome != "ok":
        message = verdict.reason
        if dialect == "legacy":  # in the words of its login's `Access denied`
            message = f"Access denied: {message[0].lower()}{message[1:]}"
        result = _error(dialect, verdict.outcome, verdict.user, 401, message)
        # RFC 6750 §3: a 401 names the scheme, and says when a presented token was refused.
        refused = verdict.outcome != "token_missing"
        result.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"' if refused else "Bearer"
        return result
    if dialect == "legacy":
        return Answer("ok", verdict.user, 200, _legacy_things(verdict.user))
    return Answer("ok", verdict.user, 200, _v1_things(verdict.user))


def _error(dialect: Dialect, outcome: Outcome, user: str, status: int, message: str) -> Answer:
    """The dialect's error: legacy plain text like its login's, v1 Monogoto's JSON."""
    if dialect == "legacy":
        return Answer(outcome, user, status, message, media_type=TEXT)
    body = {"status_code": status, "message": message, "request_id": str(uuid.uuid4())}
    return Answer(outcome, user, status, body, media_type=JSON)


def _sims(username: str) -> list[tuple[str, str]]:
    """(ICCID, IMEI) of the user's simulated SIMs, stable per username."""
    sims = []
    for index in range(_THINGS_PER_USER):
        number = int(hashlib.sha256(f"{username}#{index}".encode()).hexdigest(), 16)
        sims.append((f"89972{number % 10**14:014d}", f"35{number // 10**14 % 10**13:013d}"))
    return sims


def _legacy_things(username: str) -> list[dict[str, Any]]:
    customer_id = identity(username).customer_id
    return [
        {
            "ThingId": f"ThingId_ICCID_{iccid}",
            "CustomerId": customer_id,
            "ThingName": f"Simulated SIM {index + 1}",
            "ExternalUniqueId": iccid,
            "ExternalUniqueType": "ICCID",
            "IMEI": imei,
            "State": "Active",
        }
        for index, (iccid, imei) in enumerate(_sims(username))
    ]


def _v1_things(username: str) -> dict[str, Any]:
    things = [
        {
            "thing_id": f"ThingId_ICCID_{iccid}",
            "iccid": iccid,
            "name": f"Simulated SIM {index + 1}",
            "imei": imei,
            "state": "active",
        }
        for index, (iccid, imei) in enumerate(_sims(username))
    ]
    return {"customer_id": identity(username).customer_id, "things": things, "total": len(things)}
