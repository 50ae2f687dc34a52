"""HTTP request metrics grouped by route template, measured around the whole Litestar app.

The series are those of Litestar's Prometheus middleware (`<prefix>http_requests_total`,
`..._request_duration_seconds`, `..._requests_error_total`, labels `method`, `path`,
`status_code`, `app_name`), recorded at a fraction of its per-request cost:

- Not as a Litestar middleware: once a route has any middleware, Litestar puts a second
  exception-handling layer under it, which costs every request more than the metrics do.
  `MeteredLitestar` measures around its own ASGI entry point instead, and reads the route
  template Litestar wrote into the scope while routing. A request that matched no route (404,
  405) has none and is not recorded, as with the middleware.
- No Request object and no label dicts; each labelled series is looked up once, then kept.
- No in-progress gauge: it would cost two more locked writes per request and, with one event
  loop answering in well under a millisecond, read 0 at nearly every scrape. Requests that wait
  (for a renewal, for Redis) show in the duration histogram and in `lock_wait_seconds`.
"""

from __future__ import annotations

import time
from typing import cast

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.types import (
    HTTPScope,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Message,
    Receive,
    Scope,
    Send,
)
from prometheus_client import Counter, Histogram

from service.metrics import PREFIX

APP_NAME = "monogoto-broker"
_LABELS = ("method", "path", "status_code", "app_name")
_SERVER_ERROR = 500

REQUESTS = Counter(PREFIX + "http_requests_total", "Total requests", _LABELS)
DURATION = Histogram(
    PREFIX + "http_request_duration_seconds", "Request duration, in seconds", _LABELS
)
ERRORS = Counter(PREFIX + "http_requests_error_total", "Total errors in requests", _LABELS)


class _Series:
    """The labelled series of one (method, route template, status)."""

    __slots__ = ("duration", "errors", "requests")

    def __init__(self, method: str, path: str, status: int) -> None:
        labels = (method, path, str(status), APP_NAME)
        self.requests = REQUESTS.labels(*labels)
        self.duration = DURATION.labels(*labels)
        self.errors = ERRORS.labels(*labels) if status >= _SERVER_ERROR else None

    def record(self, duration: float) -> None:
        """One request answered in `duration` seconds."""
        if self.errors is not None:
            self.errors.inc()
        self.requests.inc()
        self.duration.observe(duration)


# Keys are methods and templates of matched routes and the statuses they answered with: a
# bounded set.
_series: dict[tuple[str, str, int], _Series] = {}


def _record(method: str, path: str, status: int, duration: float) -> None:
    series = _series.get((method, path, status))
    if series is None:
        series = _series[method, path, status] = _Series(method, path, status)
    series.record(duration)


class MeteredLitestar(Litestar):
    """Litestar that counts and times every HTTP request that matched a route."""

    async def __call__(
        self,
        scope: Scope | LifeSpanScope,
        receive: Receive | LifeSpanReceive,
        send: Send | LifeSpanSend,
    ) -> None:
        """Serve the request through Litestar, then record it under its route template."""
        if scope["type"] != ScopeType.HTTP:
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        status = 200

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)  # type: ignore[arg-type]

        try:
            await super().__call__(scope, receive, status_send)
        finally:
            # Until the app returns: the body is sent by then (Litestar runs no background task
            # on these routes), one clock read fewer than timing the body message.
            duration = time.perf_counter() - started
            request = cast(HTTPScope, scope)
            template = request.get("path_template")
            if template is not None:
                _record(request["method"], template, status, duration)
