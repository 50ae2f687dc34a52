"""`monogoto-broker serve`: the broker under uvicorn, one or several worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, cast

import uvicorn
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from service.config import CONFIG_ENV, ConfigError, Settings, TlsSettings, load_settings
from service.logs import configure_logging
from service.tls import RELOAD_CHECK_SECONDS, CertificateReloader, tls_extension
from service.watch import FileWatch

EXIT_USAGE = 2
# A worker failed to start: uvicorn's own exit code for it, whatever the number of workers.
EXIT_STARTUP_FAILURE = STARTUP_FAILURE
APP_FACTORY = "service.api.app:create_app_from_env"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# In-flight requests get this long to finish after SIGTERM; Kubernetes' default grace is 30 s.
GRACEFUL_SHUTDOWN_SECONDS = 25
# How long an idle keep-alive connection stays open. Longer than any Retry-After the broker
# sends (at most the auth-budget window, 60 s + 1 s by default) and than the idle timeouts of
# common load balancers (60 s): a client that waits as told, then reuses its connection, must not
# race the server closing it (uvicorn's default of 5 s equals a typical Retry-After).
KEEP_ALIVE_SECONDS = 75

log = logging.getLogger(__name__)


class WorkerStartupError(Exception):
    """A worker process exited before it served: building its app, its lifespan startup or
    binding its socket failed."""


def _fail(command: str, *lines: str) -> int:
    for line in lines:
        print(f"{command}: {line}", file=sys.stderr)
    return EXIT_USAGE


def run_serve(config: Path | None, *, host: str, port: int, workers: int) -> int:
    """Validate the config, then serve the broker until SIGTERM/SIGINT; the exit code."""
    if config is None:
        return _fail("serve", "no config file given (--config PATH or BROKER_CONFIG)")
    try:
        settings = load_settings(config)
    except ConfigError as error:
        return _fail("serve", f"{config} is not valid:", *error.report)
    problem = _usage_problem(settings, port=port, workers=workers)
    if problem is not None:
        return _fail("serve", problem)
    # Only these are used here; the workers load their own settings, and this copy would stay
    # for as long as they serve (about 1 MiB with 1,000 accounts).
    metrics_port, tls = settings.metrics_port, settings.tls
    del settings
    configure_logging("INFO")
    # Workers load the app themselves (one per process) and find the config here.
    # Absolute, but not resolved: a mounted ConfigMap's file is a symlink whose target directory
    # is replaced on every update, and the workers watch the file by its own name.
    os.environ[CONFIG_ENV] = str(config.absolute())
    signal.signal(signal.SIGTERM, _exit_cleanly)
    # Until the workers follow it (they reload the config), SIGHUP must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.ExitStack() as running:
        running.enter_context(_metrics_directory(workers))
        try:
            running.enter_context(_metrics_server(host, metrics_port))
        except OSError as error:
            log.error(f"cannot serve the metrics on port {metrics_port}: {error.strerror}")
            return EXIT_STARTUP_FAILURE
        try:
            serve_app(APP_FACTORY, host=host, port=port, workers=workers, tls=tls)
        except WorkerStartupError as error:
            log.error(str(error), extra={"workers": workers})
            return EXIT_STARTUP_FAILURE
    return 0


def _usage_problem(settings: Settings, *, port: int, workers: int) -> str | None:
    """What makes a valid config unusable with these `serve` options, if anything."""
    if settings.uses_memory_store and workers > 1:
        return (
            f"redis_url memory:// keeps tokens inside one process; it cannot serve {workers} "
            "workers (use --workers 1, or a real Redis)"
        )
    if settings.metrics_port == port:
        return f"metrics_port {port} is the port serve listens on (--port): choose another one"
    return None


def serve_app(
    factory: str, *, host: str, port: int, workers: int, tls: TlsSettings | None = None
) -> None:
    """Serve the ASGI app `factory` ("module:function") with the production server settings.

    `serve` uses it for the broker; the benchmark serves its baseline app through it too, so
    both sides of a comparison run under exactly the same server. Raises WorkerStartupError
    when a worker fails to start; the others are then stopped.

    This is `uvicorn.run` minus its options we do not use, plus the outcome it drops: with one
    worker it exits with STARTUP_FAILURE, but with several its supervisor stops on a worker's
    STARTUP_FAILURE and returns as if all went well. So the supervisor is run here, and its
    workers' exit codes are checked after it returns.

    With `tls`, every worker serves HTTPS and reloads the certificate when its files change.
    """
    config = _ServerConfig(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        lifespan="on",
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        tls=tls,
    )
    if workers == 1:
        server = uvicorn.Server(config)
        try:
            server.run()
        except SystemExit as exit_:
            if exit_.code != STARTUP_FAILURE:
                raise
        if not server.started:
            raise WorkerStartupError(
                f"a worker failed to start (process [{os.getpid()}]; see the error above)"
            )
        return
    supervisor = _Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        pids = ", ".join(str(pid) for pid in failed)
        raise WorkerStartupError(
            f"a worker failed to start (process [{pids}]; see the error above); "
            "all workers were stopped"
        )


class _ServerConfig(uvicorn.Config):
    """uvicorn's Config, except that an app factory raising any exception is a failed start,
    plus TLS with certificates reloaded when their files change.

    uvicorn exits with STARTUP_FAILURE when the app cannot be imported or its lifespan startup
    fails, and its supervisor then stops instead of restarting the worker. An exception from
    the factory itself (other than TypeError) escapes instead: the worker dies with exit code 1
    and the supervisor restarts it, again and again. (The instance is pickled into each worker,
    which loads the app with this method.)

    TLS: uvicorn builds the SSLContext from its `ssl_*` options in `load`, in each worker, and
    reads the files only then. The worker's listener keeps that context object, so the reloader
    loads the rotated files into the same object, which new handshakes then use. It runs as
    uvicorn's `callback_notify`, which each worker's server calls from its own main loop every
    `timeout_notify` seconds: in the event-loop thread that also performs the handshakes (no
    thread racing OpenSSL over the context), in every worker, for as long as it serves,
    without replacing uvicorn's supervisor or server.
    """

    def __init__(self, app: str, *, tls: TlsSettings | None, **options: Any) -> None:
        if tls is not None:
            options |= {
                "ssl_certfile": str(tls.cert_file),
                "ssl_keyfile": str(tls.key_file),
                "timeout_notify": RELOAD_CHECK_SECONDS,
                "callback_notify": self._reload_certificate,
            }
        if tls is not None and tls.client_ca_file is not None:
            options |= {
                "ssl_ca_certs": str(tls.client_ca_file),
                # Optional, not required: probes and metrics scrapers present no certificate;
                # one that is presented must chain to the CA or the handshake fails.
                "ssl_cert_reqs": ssl.CERT_OPTIONAL,
                "http": _ClientCertProtocol,
            }
        super().__init__(app, **options)
        self.tls = tls
        self._reloader: CertificateReloader | None = None

    def load(self) -> None:
        # SIGHUP reloads the config (the app's lifespan follows it); until then, it must not
        # end the process as it would by default.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # The files are looked at before uvicorn reads them: a rotation in between is then
        # seen as a change at the first check, instead of never.
        files = None
        if self.tls is not None:
            files = FileWatch((self.tls.cert_file, self.tls.key_file), wait_for_all=True)
        try:
            super().load()
        except Exception:
            logging.getLogger("uvicorn.error").exception("Error loading ASGI app")
            sys.exit(STARTUP_FAILURE)
        if self.tls is not None and self.ssl is not None and files is not None:
            self._reloader = CertificateReloader(
                self.ssl, self.tls.cert_file, self.tls.key_file, files=files
            )

    async def _reload_certificate(self) -> None:
        if self._reloader is not None:
            self._reloader.reload_if_changed()


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers, except that SIGHUP is passed on to every
    worker, which reloads its config itself (`service.reload`); uvicorn's own would restart
    them all."""

    def handle_hup(self) -> None:
        log.info(
            "SIGHUP received: every worker reloads the config", extra={"event": "config.sighup"}
        )
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


class _ClientCertProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus the ASGI "tls" extension in every request's scope.

    uvicorn does not put the client's certificate in the scope; only the protocol sees the
    transport, whose SSL object holds the certificate the handshake verified. asyncio calls
    `connection_made` once the handshake is complete, so the certificate is read there, once
    per connection, and every request of the connection gets it through `self.app`, the ASGI
    app uvicorn's protocol runs each request with.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTls(self.app, tls_extension(ssl_object))


class _WithTls:
    """An ASGI app that adds a connection's "tls" extension to the scope of its requests."""

    def __init__(self, app: ASGI3Application, tls: dict[str, Any]) -> None:
        self._app = app
        self._tls = tls

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        request = cast(dict[str, Any], scope)  # an HTTP scope, which may carry extensions
        request["extensions"] = {**(request.get("extensions") or {}), "tls": self._tls}
        await self._app(scope, receive, send)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; the
    # default action would report "killed by SIGTERM" where the shutdown was a clean one.
    # Before uvicorn has installed its own handlers, this ends the process just as cleanly.
    raise SystemExit(0)


@contextlib.contextmanager
def _metrics_server(host: str, port: int | None) -> Iterator[None]:
    """With `port`, serve the metrics there over plain HTTP from this process, for as long as
    the workers run.

    Served by the supervising process rather than by a worker: with several workers it sums
    their files (prometheus-client's multiprocess mode; this process writes none), with one it
    is that worker's process. The listener is not the workers' (uvicorn would give it their TLS
    and the whole API), so a NetworkPolicy can open it to Prometheus alone.
    """
    if port is None:
        yield
        return
    registry = REGISTRY
    if MULTIPROC_ENV in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, thread = start_http_server(port, addr=host, registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _metrics_directory(workers: int) -> Iterator[None]:
    """With several workers, give prometheus-client a fresh private directory to aggregate in."""
    if workers == 1:
        # An inherited value would put the single process into multiprocess mode needlessly.
        os.environ.pop(MULTIPROC_ENV, None)
        yield
        return
    directory = tempfile.mkdtemp(prefix="monogoto-broker-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)
