"""What an audit line holds, and how it is encoded and stamped with the time."""

from __future__ import annotations

import time
from enum import StrEnum

import msgspec

LOGGER_NAME = "monogoto_broker.audit"


class AuditOutcome(StrEnum):
    """What became of a token request, as the audit log says."""

    ISSUED = "issued"  # a token was handed out
    FORCED = "forced"  # handed out after a renewal only the caller's min_ttl called for
    INVALIDATED = "invalidated"  # a reported token was answered with a current one
    DENIED = "denied"  # 401 or 403: the caller is unknown or may not use the account
    FAILED = "failed"  # the broker could not serve it (503, 429, 400)
    # Operator actions (admin callers):
    VERIFIED = "verified"  # a login with the configured credentials succeeded
    REJECTED = "rejected"  # Monogoto refused them (now, or a rejection still in force)
    RESET = "reset"  # the account's rejection and back-off were cleared


class AuditLine(msgspec.Struct, kw_only=True, gc=False):
    """One line of the audit log (docs/operations.md, "The audit log").

    `gc=False`: its fields are strings and numbers, which cannot form a cycle, so the garbage
    collector need not track one object more per request.
    """

    time: str
    level: str
    logger: str = LOGGER_NAME
    message: str
    audit: bool = True
    event: str
    outcome: AuditOutcome
    status: int
    code: str | None = None
    request_id: str
    caller: str | None
    auth: str | None
    credential: str | None
    pod: str | None = None
    account: str | None
    source: str | None = None
    token_hmac: str | None = None
    reported_hmac: str | None = None
    reason: str | None = None
    replica: str
    pid: int


MESSAGES = {
    AuditOutcome.ISSUED: "token issued",
    AuditOutcome.FORCED: "token issued after a forced renewal",
    AuditOutcome.INVALIDATED: "token invalidated",
    AuditOutcome.DENIED: "token request denied",
    AuditOutcome.FAILED: "token request failed",
    AuditOutcome.VERIFIED: "account credentials verified",
    AuditOutcome.REJECTED: "account credentials rejected",
    AuditOutcome.RESET: "account reset",
}
# Refusals and failures of an operator action say so, not "token request ...".
ACTION_MESSAGES = {
    AuditOutcome.DENIED: "operator action denied",
    AuditOutcome.FAILED: "operator action failed",
}
LEVELS = dict.fromkeys(AuditOutcome, "INFO") | {
    AuditOutcome.DENIED: "WARNING",
    AuditOutcome.FAILED: "WARNING",
    AuditOutcome.REJECTED: "WARNING",
}


# Stand-ins for the two fields that differ between the lines of repeated cache hits: msgspec
# writes them as `\u0000time` and `\u0000id`, which no other field of a line can hold.
_TIME_MARK = "\x00time"
_ID_MARK = "\x00id"
_ENCODED_TIME_MARK = b"\\u0000time"
_ENCODED_ID_MARK = b"\\u0000id"


class Template:
    """A line's JSON with its time and request id left out: the parts around them.

    The token GET is the broker's hottest route, and at thousands of cache hits per second
    the same caller gets the same token again and again; building and encoding a whole line
    per request cost about a tenth of the route's CPU time (bench/, docs/performance.md). The
    line is encoded by msgspec once per (caller, account, token, outcome); each request then
    joins the parts with its time and request id, both plain ASCII without characters JSON
    would escape (digits and punctuation; request ids are checked or made so).
    """

    __slots__ = ("event", "outcome", "parts")

    def __init__(self, line: AuditLine) -> None:
        self.event = line.event
        self.outcome = line.outcome
        marked = msgspec.structs.replace(line, time=_TIME_MARK, request_id=_ID_MARK)
        encoded = msgspec.json.encode(marked) + b"\n"
        head, _, rest = encoded.partition(_ENCODED_TIME_MARK)
        middle, _, tail = rest.partition(_ENCODED_ID_MARK)
        self.parts = (head, middle, tail)

    def render(self, time_text: str, request_id: str) -> bytes:
        """The line with this time and request id."""
        head, middle, tail = self.parts
        return b"".join((head, time_text.encode(), middle, request_id.encode(), tail))


class Clock:
    """ISO 8601 UTC timestamps with microseconds; the part up to the second is formatted once
    per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
