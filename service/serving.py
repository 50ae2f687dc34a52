"""`monogoto-broker serve`: the broker under uvicorn, one or several worker processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from service.config import CONFIG_ENV, ConfigError, load_settings
from service.logs import configure_logging

EXIT_USAGE = 2
APP_FACTORY = "service.api.app:create_app_from_env"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# In-flight requests get this long to finish after SIGTERM; Kubernetes' default grace is 30 s.
GRACEFUL_SHUTDOWN_SECONDS = 25
# How long an idle keep-alive connection stays open. Longer than any Retry-After the broker
# sends (at most the auth-budget window, 60 s + 1 s by default) and than the idle timeouts of
# common load balancers (60 s): a client that waits as told, then reuses its connection, must not
# race the server closing it (uvicorn's default of 5 s equals a typical Retry-After).
KEEP_ALIVE_SECONDS = 75


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
        return _fail("serve", f"{config} is not valid:", *error.problems)
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
        serve_app(APP_FACTORY, host=host, port=port, workers=workers)
    return 0


def serve_app(factory: str, *, host: str, port: int, workers: int) -> None:
    """Serve the ASGI app `factory` ("module:function") with the production server settings.

    `serve` uses it for the broker; the benchmark serves its baseline app through it too, so
    both sides of a comparison run under exactly the same server.
    """
    uvicorn.run(
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
