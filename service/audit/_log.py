"""The audit log: one JSON line per token request, batched, written whole."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterator

import msgspec
from prometheus_client import Counter

from service.audit._line import (
    ACTION_MESSAGES,
    LEVELS,
    MESSAGES,
    AuditLine,
    AuditOutcome,
    Clock,
    Template,
)
from service.audit._sink import ATOMIC_WRITE_BYTES, Sink
from service.broker import BrokerError
from service.metrics import AUDIT_LINES, AUDIT_WRITE_FAILURES

log = logging.getLogger(__name__)

# Lines wait at most this long before they are written, unless 4 KiB of them wait sooner.
FLUSH_SECONDS = 0.2
WARNING_INTERVAL_SECONDS = 10.0
RETRY_AFTER_SECONDS = 5.0
_FINGERPRINT_HEX = 16
_CACHED_FINGERPRINTS = 64
_CACHED_TEMPLATES = 256  # lines of repeated cache hits: callers x accounts, at most


class AuditUnavailableError(BrokerError):
    """`audit.fail_closed` is set and the request's audit line could not be written."""

    code = "audit_unavailable"


class AuditLog:
    """Builds, batches and writes audit lines; knows whether the last write failed.

    With `fail_closed`, every line is written before the request is answered, and a failure
    to write the line of a token handed out raises AuditUnavailableError (503). Otherwise lines
    are batched (written within FLUSH_SECONDS, at most 4 KiB per write) and a failure loses
    them, counted in `audit_write_failures_total` and logged at most once per interval.
    """

    def __init__(self, sink: Sink, key: bytes, *, fail_closed: bool) -> None:
        self.fail_closed = fail_closed
        self._sink = sink
        self._key = key
        self._clock = Clock()
        self._replica = socket.gethostname()
        self._pid = os.getpid()
        # Request ids made here: unique per process by the prefix, then counted.
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)
        self._fingerprints: dict[str, str] = {}
        self._templates: dict[Hashable, Template] = {}
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        # Lines made since the last flush, by (event, outcome): added to the metric per batch.
        self._made: dict[tuple[str, AuditOutcome], int] = {}
        self._counters: dict[tuple[str, AuditOutcome], Counter] = {}
        # Why the last write failed; None while writing works.
        self.failure: str | None = None
        self._warned_at = -WARNING_INTERVAL_SECONDS
        self._lost_since_warning = 0

    @property
    def target(self) -> str:
        """Where the lines go."""
        return self._sink.name

    def new_request_id(self) -> str:
        """A request id for a request that brought none."""
        return f"{self._id_prefix}-{next(self._ids):x}"

    def fingerprint(self, token: str) -> str:
        """The token's HMAC-SHA256 under the audit key, truncated: it names the token in the
        audit log without revealing it."""
        known = self._fingerprints.get(token)
        if known is None:
            digest = hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()
            known = "hmac-sha256:" + digest[:_FINGERPRINT_HEX]
            if len(self._fingerprints) >= _CACHED_FINGERPRINTS:
                self._fingerprints.clear()
            self._fingerprints[token] = known
        return known

    def record(self, line: AuditLine, *, handing_out: bool = False) -> None:
        """Write (or batch) `line`. With `fail_closed`, raises AuditUnavailableError when the
        line of a token about to be handed out (`handing_out`) cannot be written."""
        self._add(msgspec.json.encode(line) + b"\n", line.event, line.outcome, handing_out)

    def record_repeated(
        self, key: Hashable, build: Callable[[], AuditLine], request_id: str
    ) -> None:
        """`record(build(), handing_out=True)` for a line that repeats but for its time and
        request id, such as a cache hit's: `key` names everything else in it, and `build` is
        called only the first time (see Template)."""
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= _CACHED_TEMPLATES:
                self._templates.clear()
            template = self._templates[key] = Template(build())
        data = template.render(self._clock.now(), request_id)
        self._add(data, template.event, template.outcome, handing_out=True)

    def _add(self, data: bytes, event: str, outcome: AuditOutcome, handing_out: bool) -> None:
        key = (event, outcome)
        self._made[key] = self._made.get(key, 0) + 1
        if self.fail_closed:
            written = self._write([data])
            self._count()
            if not written and handing_out:
                raise AuditUnavailableError(
                    "the audit log cannot be written; no token is handed out without its line",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= ATOMIC_WRITE_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a command, a test): write at once
                self.flush()
            else:
                self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def line(
        self,
        *,
        event: str,
        outcome: AuditOutcome,
        status: int,
        request_id: str,
        caller: str | None,
        auth: str | None,
        credential: str | None,
        account: str | None,
        pod: str | None = None,
        code: str | None = None,
        source: str | None = None,
        token_hmac: str | None = None,
        reported_hmac: str | None = None,
        reason: str | None = None,
        action: bool = False,
    ) -> AuditLine:
        """A line with these fields, stamped with the time, level, message and replica; with
        `action`, the line of an operator action rather than a token request."""
        messages = MESSAGES | ACTION_MESSAGES if action else MESSAGES
        return AuditLine(
            time=self._clock.now(),
            level=LEVELS[outcome],
            message=messages[outcome],
            event=event,
            outcome=outcome,
            status=status,
            code=code,
            request_id=request_id,
            caller=caller,
            auth=auth,
            credential=credential,
            pod=pod,
            account=account,
            source=source,
            token_hmac=token_hmac,
            reported_hmac=reported_hmac,
            reason=reason,
            replica=self._replica,
            pid=self._pid,
        )

    def start(self) -> None:
        """Open the destination; a failure is reported as a failed write would be."""
        try:
            self._sink.reopen()
        except OSError as error:
            self._failed(error, 0)

    def flush(self) -> None:
        """Write every batched line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            lines, self._pending, self._pending_bytes = self._pending, [], 0
            self._write(lines)
        self._count()

    def close(self) -> None:
        """Write every batched line, then release the destination (graceful shutdown)."""
        self.flush()
        self._sink.close()

    def check(self) -> tuple[bool, str]:
        """Readiness: (ok, detail). Not ok only with `fail_closed` while writing fails; a
        failed destination is tried again here, so readiness comes back once it works."""
        if self.failure is not None:
            try:
                self._sink.reopen()
            except OSError as error:
                self.failure = _describe(self._sink, error)
            else:
                self.failure = None
        if self.failure is None:
            return True, f"writing to {self.target}"
        if self.fail_closed:
            return False, f"{self.failure}; token requests get 503 (audit.fail_closed)"
        return True, f"{self.failure}; lines are being lost (audit.fail_closed is false)"

    def _write(self, lines: list[bytes]) -> bool:
        """Write `lines`, whole lines per write() call; False if any is lost."""
        lost = 0
        error: OSError | None = None
        for batch in _batches(lines):
            try:
                self._sink.write(batch)
            except OSError as failed:
                error = failed
                lost += batch.count(b"\n")
        if error is None:
            if self.failure is not None:
                log.info("audit log writable again", extra={"event": "audit.recovered"})
                self.failure = None
            return True
        self._failed(error, lost)
        return False

    def _failed(self, error: OSError, lost: int) -> None:
        self.failure = _describe(self._sink, error)
        AUDIT_WRITE_FAILURES.inc(lost)
        self._lost_since_warning += lost
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            log.warning(
                "audit log write failed",
                extra={
                    "event": "audit.write_failed",
                    "target": self.target,
                    "reason": error.strerror or type(error).__name__,
                    "lines": self._lost_since_warning,
                    "fail_closed": self.fail_closed,
                },
            )
            self._warned_at = now
            self._lost_since_warning = 0

    def _count(self) -> None:
        made, self._made = self._made, {}
        for (event, outcome), lines in made.items():
            child = self._counters.get((event, outcome))
            if child is None:
                child = self._counters[event, outcome] = AUDIT_LINES.labels(event, str(outcome))
            child.inc(lines)


def _batches(lines: list[bytes]) -> Iterator[bytes]:
    """`lines` joined into batches of at most ATOMIC_WRITE_BYTES (a longer line alone)."""
    batch: list[bytes] = []
    size = 0
    for data in lines:
        if batch and size + len(data) > ATOMIC_WRITE_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        yield b"".join(batch)


def _describe(sink: Sink, error: OSError) -> str:
    return f"cannot write to {sink.name} ({error.strerror or type(error).__name__})"
