"""Injected faults: rules that make the next matching calls misbehave."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

AuthEndpoint = Literal["legacy_auth", "v1_token", "v1_refresh"]
# The protected endpoints stand in for Monogoto's API beyond auth (docs/simulator.md).
ApiEndpoint = Literal["legacy_things", "v1_things"]
Endpoint = Literal[AuthEndpoint, ApiEndpoint]
AUTH_ENDPOINTS: frozenset[str] = frozenset(get_args(AuthEndpoint))
FaultKind = Literal["status", "delay", "drop", "garbage"]
GarbageBody = Literal["not_json", "missing_fields", "expired_token", "opaque_token", "bad_claims"]
# A Retry-After given as a string is sent verbatim ("inf", "1e9", an HTTP date, nonsense), to
# play a Monogoto that sends absurd values; printable ASCII only, so it stays one valid header.
RawHeaderValue = Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]*$", max_length=200)]

# Which optional fields each kind takes; any other given field is a mistake worth a 400.
_PARAMETERS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required, allowed)
    "status": ({"status"}, {"status", "retry_after"}),
    "delay": ({"seconds"}, {"seconds"}),
    "drop": (set(), set()),
    "garbage": ({"body"}, {"body"}),
}


class FaultRule(BaseModel):
    """One fault rule as posted to `/_sim/faults`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    endpoint: Endpoint | None = None
    kind: FaultKind
    count: int = Field(default=1, ge=1)
    status: int | None = Field(default=None, ge=400, le=599)
    retry_after: Annotated[int, Field(ge=0)] | RawHeaderValue | None = None
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    body: GarbageBody | None = None

    @model_validator(mode="after")
    def _parameters_fit_kind(self) -> Self:
        required, allowed = _PARAMETERS[self.kind]
        given = {
            name
            for name in ("status", "retry_after", "seconds", "body")
            if getattr(self, name) is not None
        }
        if missing := sorted(required - given):
            raise ValueError(f"kind {self.kind!r} needs {', '.join(missing)}")
        if extra := sorted(given - allowed):
            raise ValueError(f"kind {self.kind!r} does not take {', '.join(extra)}")
        if self.kind == "garbage" and self.endpoint not in (None, *AUTH_ENDPOINTS):
            # Every garbage body is a broken login answer; a protected endpoint has none.
            raise ValueError(f"kind 'garbage' applies to auth endpoints only, not {self.endpoint}")
        return self

    def matches(self, endpoint: Endpoint) -> bool:
        """Whether a call to `endpoint` uses this rule; a rule without endpoint: any auth call."""
        if self.endpoint is None:
            return endpoint in AUTH_ENDPOINTS
        return self.endpoint == endpoint


@dataclass(slots=True)
class _Armed:
    rule: FaultRule
    remaining: int


class FaultBook:
    """The ordered fault rules and their remaining uses."""

    def __init__(self) -> None:
        self._armed: list[_Armed] = []

    def add(self, rule: FaultRule) -> dict[str, Any]:
        """Append a rule; returns its listing."""
        armed = _Armed(rule, rule.count)
        self._armed.append(armed)
        return _listing(armed)

    def take(self, endpoint: Endpoint) -> FaultRule | None:
        """Use up one use of the first rule matching `endpoint` that has uses left."""
        for armed in self._armed:
            if armed.remaining and armed.rule.matches(endpoint):
                armed.remaining -= 1
                return armed.rule
        return None

    def listing(self) -> list[dict[str, Any]]:
        """Every rule in order, spent ones included, with its remaining uses."""
        return [_listing(armed) for armed in self._armed]

    def clear(self) -> None:
        """Drop every rule."""
        self._armed.clear()


def _listing(armed: _Armed) -> dict[str, Any]:
    return {
        **armed.rule.model_dump(exclude_none=True),
        "endpoint": armed.rule.endpoint,
        "remaining": armed.remaining,
    }
