"""`monogoto-broker serve`: the broker under uvicorn, one or several worker processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.config import CONFIG_ENV, ConfigError, load_settings
from service.logs import configure_logging

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
    if settings.uses_memory_store and workers > 1:
        return _fail(
            "serve",
            f"redis_url memory:// keeps tokens inside one process; it cannot serve {workers} "
            "workers (use --workers 1, or a real Redis)",
        )
    configure_logging("INFO")
    # Workers load the app themselves (one per process) and find the config here.
    os.environ[CONFIG_ENV] = str(config.resolve())
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with _metrics_directory(workers):
        try:
            serve_app(APP_FACTORY, host=host, port=port, workers=workers)
        except WorkerStartupError as error:
            log.error(str(error), extra={"workers": workers})
            return EXIT_STARTUP_FAILURE
    return 0


def serve_app(factory: str, *, host: str, port: int, workers: int) -> None:
    """Serve the ASGI app `factory` ("module:function") with the production server settings.

    `serve` uses it for the broker; the benchmark serves its baseline app through it too, so
    both sides of a comparison run under exactly the same server. Raises WorkerStartupError
    when a worker fails to start; the others are then stopped.

    This is `uvicorn.run` minus its options we do not use, plus the outcome it drops: with one
    worker it exits with STARTUP_FAILURE, but with several its supervisor stops on a worker's
    STARTUP_FAILURE and returns as if all went well. So the supervisor is run here, and its
    workers' exit codes are checked after it returns.
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
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        pids = ", ".join(str(pid) for pid in failed)
        raise WorkerStartupError(
            f"a worker failed to start (process [{pids}]; see the error above); "
            "all workers were stopped"
        )


class _ServerConfig(uvicorn.Config):
    """uvicorn's Config, except that an app factory raising any exception is a failed start.

    uvicorn exits with STARTUP_FAILURE when the app cannot be imported or its lifespan startup
    fails, and its supervisor then stops instead of restarting the worker. An exception from
    the factory itself (other than TypeError) escapes instead: the worker dies with exit code 1
    and the supervisor restarts it, again and again. (The instance is pickled into each worker,
    which loads the app with this method.)
    """

    def load(self) -> None:
        try:
            super().load()
        except Exception:
            logging.getLogger("uvicorn.error").exception("Error loading ASGI app")
            sys.exit(STARTUP_FAILURE)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; the
    # default action would report "killed by SIGTERM" where the shutdown was a clean one.
    # Before uvicorn has installed its own handlers, this ends the process just as cleanly.
    raise SystemExit(0)


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
