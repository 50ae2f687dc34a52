"""The broker's ASGI application: the one place the Litestar object is built."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from importlib.metadata import version
from pathlib import Path

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from service.api.accounts import AccountController
from service.api.actions import AccountActionController
from service.api.dependencies import DEPENDENCIES, RUNTIME_STATE_KEY
from service.api.failure_log import FAILURE_LOG_STATE_KEY, FailureLog
from service.api.http_metrics import MeteredLitestar
from service.api.ops import MetricsController, OpsController
from service.api.problems import EXCEPTION_HANDLERS
from service.api.schemas import MAX_BODY_BYTES
from service.api.security import CALLERS_STATE_KEY, CallerDirectory
from service.api.tokens import TokenController
from service.broker.runtime import BrokerRuntime
from service.config import ConfigError, Settings, config_path_from_env, load_settings
from service.logs import configure_logging
from service.reload import ConfigReloader

_SECURITY_SCHEME = "callerKey"
_DESCRIPTION = """\
Hands out valid Monogoto access tokens to authenticated internal callers.

Callers authenticate with `Authorization: Bearer <caller key>`, or on Kubernetes with
`Authorization: Bearer <ServiceAccount token>` when the broker accepts them. Errors are RFC 9457
`application/problem+json` with a stable `code`: `invalid_request` (400, 413), `unauthenticated`
(401), `forbidden` (403, also for accounts that do not exist), `upstream_unavailable` and
`credentials_rejected` (503, with `Retry-After`), `not_found`, `method_not_allowed` and
`internal_error`. Callers configured with `admin: true` may also verify an account's
credentials and reset its back-off (operator actions). Operations endpoints (`/healthz`,
`/readyz`, `/metrics`) need no caller key. With mTLS configured, a request without
`Authorization` may authenticate with a client certificate instead.
"""


def _openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="monogoto-broker",
        version=version("monogoto-broker"),
        description=_DESCRIPTION,
        path="/schema",
        render_plugins=[JsonRenderPlugin()],
        use_handler_docstrings=True,
        components=Components(
            security_schemes={
                _SECURITY_SCHEME: SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="A caller key (`monogoto-broker new-api-key`) or a "
                    "projected Kubernetes ServiceAccount token.",
                )
            }
        ),
    )


def create_app(settings: Settings, *, config: Path | None = None) -> Litestar:
    """The broker app for `settings`; its lifespan starts and stops the broker runtime and,
    given the `config` file `settings` came from, reloads it live (`service.reload`).

    HTTP requests are counted and timed by route template (`/v1/accounts/{account}/token`,
    never the raw path) around the whole app (`MeteredLitestar`).
    """
    callers = CallerDirectory(
        settings.callers, frozenset(settings.accounts), settings.caller_auth.kubernetes
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        callers.start()
        try:
            runtime = await BrokerRuntime.start(settings)
            app.state[RUNTIME_STATE_KEY] = runtime

            def apply(new: Settings) -> None:
                # Both at once: no request sees callers allowed an account the broker lacks.
                runtime.apply(new)
                current: CallerDirectory = app.state[CALLERS_STATE_KEY]
                app.state[CALLERS_STATE_KEY] = current.replaced(
                    new.callers, frozenset(new.accounts)
                )

            reloader = None if config is None else ConfigReloader(config, settings, apply)
            try:
                async with nullcontext() if reloader is None else reloader.running():
                    yield
            finally:
                del app.state[RUNTIME_STATE_KEY]
                await runtime.stop()
        finally:
            await callers.stop()

    # With metrics_port, `serve` exposes the metrics there, keeping them off the callers' port.
    metrics = [] if settings.metrics_port is not None else [MetricsController]
    # No router-wide guard: each /v1 controller guards itself (requires_caller, or on the token
    # routes `authorise_audited`, which includes it), so a request runs one guard only.
    api = Router(
        path="/v1",
        route_handlers=[AccountController, AccountActionController, TokenController],
        security=[{_SECURITY_SCHEME: []}],
    )
    return MeteredLitestar(
        route_handlers=[api, OpsController, *metrics],
        lifespan=[lifespan],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        state=State({CALLERS_STATE_KEY: callers, FAILURE_LOG_STATE_KEY: FailureLog()}),
        openapi_config=_openapi_config(),
        request_max_body_size=MAX_BODY_BYTES,
        # Our JSON logging is configured by the process (service.logs); Litestar's default
        # logging config would replace it, and debug mode would put tracebacks in responses.
        logging_config=None,
        debug=False,
    )


def create_app_from_env() -> Litestar:
    """`uvicorn --factory` entry point: JSON logs, config from `BROKER_CONFIG`."""
    configure_logging()
    path = config_path_from_env()
    if path is None:
        raise ConfigError(["no config file given: set BROKER_CONFIG to the config file's path"])
    return create_app(load_settings(path), config=path)
