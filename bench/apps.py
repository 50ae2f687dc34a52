"""The apps the benchmark serves besides the broker itself, built by `serve_app` factories.

- `create_bare_app`: the bare framework: one Litestar route at the token path answering a fixed
  body as large as a real token response. No authentication, metrics, logging or broker: the
  cost of Litestar and the server alone, the baseline the broker is measured against.
- `create_floor_app`: the least Litestar can do on that route, for reference: a handler that
  declares no parameters (no signature-model pass) and hands back one response built at start-up
  (no response building per request). The broker's token route works this way too, so the
  broker's distance to this floor is what its own per-request work costs.
- `create_uncached_app`: the real broker app, except that every token request reads and
  decrypts the account's record from Redis instead of taking this process's cached token:
  what a request costs when the local cache misses.
- `create_logged_app`: the real broker app with its DEBUG line per local-cache hit written too
  (the broker logs those at DEBUG, below its INFO level), to show what one line per request
  would cost.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.response.base import ASGIResponse

from service.api.app import create_app
from service.api.dependencies import RUNTIME_STATE_KEY
from service.broker import IssuedToken, Outcome, UpstreamUnavailableError
from service.broker.runtime import BrokerRuntime, open_store
from service.config import config_path_from_env, load_settings
from service.logs import configure_logging

BODY_BYTES_ENV = "BENCH_BODY_BYTES"


def _fixed_body() -> bytes:
    """A JSON body of `BENCH_BODY_BYTES` bytes."""
    size = int(os.environ.get(BODY_BYTES_ENV, "512"))
    filler = size - len(b'{"access_token":""}')
    return b'{"access_token":"' + b"x" * max(0, filler) + b'"}'


def create_bare_app() -> Litestar:
    """Litestar answering the token route with a fixed JSON body of `BENCH_BODY_BYTES` bytes."""
    body = _fixed_body()

    @get("/v1/accounts/{account:str}/token", operation_id="bareToken", sync_to_thread=False)
    def token(account: str) -> Response[bytes]:
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    return Litestar(route_handlers=[token], logging_config=None, debug=False, openapi_config=None)


def create_floor_app() -> Litestar:
    """The bare app's route and body, answered with one pre-built response and no parameters."""
    answer = ASGIResponse(
        body=_fixed_body(), media_type="application/json", headers={"Cache-Control": "no-store"}
    )

    @get("/v1/accounts/{account:str}/token", operation_id="floorToken")
    async def token(request: Request[Any, Any, Any]) -> ASGIResponse:
        return answer

    return Litestar(route_handlers=[token], logging_config=None, debug=False, openapi_config=None)


def create_uncached_app() -> Litestar:
    """The broker app whose token route skips the local cache (one Redis read and decrypt)."""
    configure_logging()
    path = config_path_from_env()
    if path is None:
        raise RuntimeError("BROKER_CONFIG must name the broker's config file")
    settings = load_settings(path)
    app = create_app(settings)
    store = open_store(settings)

    async def read_through(
        account: str, *, min_ttl: float = 0.0, caller: str | None = None
    ) -> IssuedToken:
        record = await store.load(account)
        if record is None:
            raise UpstreamUnavailableError("no token in the store")
        return IssuedToken(
            account=account,
            access_token=record.access_token.get_secret_value(),
            expires_at=record.expires_at,
            customer_id=record.customer_id,
            outcome=Outcome.SHARED,
        )

    def bypass_cache(app: Litestar) -> None:
        runtime: BrokerRuntime = app.state[RUNTIME_STATE_KEY]
        # Instance attribute: only this process's broker reads through; the class is untouched.
        runtime.broker.get = read_through  # type: ignore[method-assign]

    async def close_store(_: Litestar) -> None:
        await store.close()

    app.on_startup.append(bypass_cache)
    app.on_shutdown.append(close_store)
    return app


def create_logged_app() -> Litestar:
    """The broker app writing its token routes' DEBUG lines: one log line per request."""
    configure_logging()
    path = config_path_from_env()
    if path is None:
        raise RuntimeError("BROKER_CONFIG must name the broker's config file")
    app = create_app(load_settings(path))
    logging.getLogger("service.api.tokens").setLevel(logging.DEBUG)
    return app
