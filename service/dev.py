"""`monogoto-broker dev`: the simulator and the broker in one process, with demo accounts."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import logging
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from service.config import ConfigError, Settings, build_settings
from service.keys import new_api_key, new_encryption_key
from service.logs import configure_logging
from service.simulator import DEMO_PASSWORD, DEMO_USERNAME
from service.simulator.protected import V1_THINGS_PATH
from service.token_command import API_KEY_ENV

EXIT_USAGE = 2
EXIT_START_FAILED = 1
# Short: nothing here is worth waiting for, and the user pressed Ctrl-C.
_GRACEFUL_SHUTDOWN_SECONDS = 3

# Which of the two servers logs a line: each is served by a task of its own, and what it starts
# (the broker's background tasks, its requests) inherits the task's context.
_SERVER: contextvars.ContextVar[str] = contextvars.ContextVar("dev_server", default="")


class _ServerLabel(logging.Filter):
    """Adds `server` (`simulator` or `broker`) to every line one of the two servers logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = _SERVER.get()
        if name and not hasattr(record, "server"):
            record.server = name
        return True


def dev_settings(simulator_url: str, caller_digest: str, redis_url: str | None) -> Settings:
    """The dev configuration: two demo accounts on the simulator, one caller for all of them."""
    data: dict[str, Any] = {
        "redis_url": redis_url or "memory://",
        # Apart from a real broker's keys, should the Redis be shared with one.
        "key_prefix": "mgb-dev",
        "upstream": {"base_url": simulator_url},
        "accounts": {
            f"demo-{dialect}": {
                "username": DEMO_USERNAME,
                "password": DEMO_PASSWORD,
                "dialect": dialect,
            }
            for dialect in ("legacy", "v1")
        },
        "callers": {"demo": {"api_key_sha256": caller_digest, "accounts": ["*"]}},
    }
    if redis_url:
        # A throwaway key: tokens a previous run stored cannot be decrypted and are fetched anew.
        data["encryption_keys"] = new_encryption_key()
    return build_settings(data)


def run_dev(*, host: str, port: int, redis_url: str | None) -> int:
    """Serve the simulator and the broker in one process until SIGTERM/SIGINT; the exit code."""
    # Imported here: they pull in the whole web stack, which `serve` only needs in its workers.
    from service.api.app import create_app  # noqa: PLC0415
    from service.simulator.app import create_simulator_app  # noqa: PLC0415
    from service.simulator.state import SimulatorState  # noqa: PLC0415

    try:
        broker_socket = socket.create_server((host, port), family=_family(host))
    except OSError as error:
        print(f"dev: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
        return EXIT_START_FAILED
    simulator_socket = socket.create_server(("127.0.0.1", 0))
    simulator_url = _url(simulator_socket)
    key, digest = new_api_key()
    try:
        settings = dev_settings(simulator_url, digest, redis_url)
    except ConfigError as error:
        broker_socket.close()
        simulator_socket.close()
        for problem in error.problems:
            print(f"dev: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with _one_log_format():
        simulator_app = create_simulator_app(SimulatorState({DEMO_USERNAME: DEMO_PASSWORD}))
    simulator = _DevServer(_server_config(simulator_app))
    broker = _DevServer(_server_config(create_app(settings)))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ServerLabel())
    banner = _banner(_url(broker_socket), simulator_url, key, in_memory=redis_url is None)
    with broker_socket, simulator_socket:
        started = asyncio.run(
            _serve_both(simulator, simulator_socket, broker, broker_socket, banner)
        )
    return 0 if started else EXIT_START_FAILED


@contextlib.contextmanager
def _one_log_format() -> Iterator[None]:
    """Undo the log handlers Litestar's default logging config adds while building an app.

    The simulator app keeps that default (its own command logs in Litestar's format); here both
    servers share one process and should log one way: JSON lines (`configure_logging`).
    """
    loggers = [logging.getLogger(), logging.getLogger("litestar")]
    before = [(set(logger.handlers), logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, propagate) in zip(loggers, before, strict=True):
        for handler in set(logger.handlers) - handlers:
            logger.removeHandler(handler)
        logger.propagate = propagate
    configure_logging("INFO")


class _DevServer(uvicorn.Server):
    """A uvicorn server that says when it is up and leaves signals to its owner.

    `_serve_both` runs two of them in one loop and stops them in order; uvicorn's own signal
    handling would let the second server's handlers replace the first's.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing; the owner handles SIGINT and SIGTERM."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then set `up` if that worked."""
        await super().startup(sockets=sockets)
        if self.started:
            self.up.set()


def _server_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )


async def _serve_both(
    simulator: _DevServer,
    simulator_socket: socket.socket,
    broker: _DevServer,
    broker_socket: socket.socket,
    banner: str,
) -> bool:
    """Start the simulator, then the broker; print `banner`; stop both on a signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.create_task(stop.wait())
    running: list[tuple[_DevServer, asyncio.Task[None]]] = []
    servers = (("simulator", simulator, simulator_socket), ("broker", broker, broker_socket))
    for name, server, sock in servers:
        task = asyncio.create_task(_serve(name, server, sock))
        running.append((server, task))
        if not await _started(server, task):
            break
    else:
        print(banner, flush=True)
        await asyncio.wait(
            [stopped, *(task for _, task in running)], return_when=asyncio.FIRST_COMPLETED
        )
    # The broker first: its in-flight requests may still be waiting for the simulator.
    for server, task in reversed(running):
        server.should_exit = True
        await task
    stopped.cancel()
    return broker.started


async def _serve(name: str, server: uvicorn.Server, sock: socket.socket) -> None:
    _SERVER.set(name)  # in this task's own context: labels what this server logs
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        # uvicorn exits the process when an app's lifespan startup fails; here that must not
        # leave the other server without a graceful shutdown. uvicorn has logged the cause.
        server.should_exit = True


async def _started(server: _DevServer, task: asyncio.Task[None]) -> bool:
    up = asyncio.create_task(server.up.wait())
    await asyncio.wait([up, task], return_when=asyncio.FIRST_COMPLETED)
    up.cancel()
    return server.started


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1" if sock.family == socket.AF_INET else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _banner(broker_url: str, simulator_url: str, key: str, *, in_memory: bool) -> str:
    store = "in-memory store" if in_memory else "Redis store"
    curl = f"curl -s -H 'Authorization: Bearer {key}'"
    token = f"{_command()} token demo-v1 --broker {broker_url}"
    things = f"{simulator_url}{V1_THINGS_PATH}"
    client = (
        "import httpx; from monogoto_broker_client import MonogotoAuth, TokenSource; "
        f"source = TokenSource('{broker_url}', 'demo-v1', api_key='{key}'); "
        f"print(httpx.get('{things}', auth=MonogotoAuth(source)).json())"
    )
    return "\n".join(
        [
            f"broker:     {broker_url} ({store}; accounts demo-legacy and demo-v1)",
            f"simulator:  {simulator_url} (demo user {DEMO_USERNAME})",
            f"caller key: {key}",
            "            (caller 'demo', all accounts; a throwaway key made for this run only)",
            "try:",
            f"  {curl} {broker_url}/v1/accounts/demo-v1/token",
            f"  {curl} {broker_url}/v1/accounts",
            "a token in a script, used against Monogoto's (here the simulator's) API:",
            f"  export {API_KEY_ENV}={key}",
            f'  curl -s -H "Authorization: Bearer $({token})" {things}',
            "the Python client (pip install ./clients/python; see docs/callers.md):",
            f"  python3 -c {shlex.quote(client)}",
            "Ctrl-C stops both.",
        ]
    )


def _command() -> str:
    """How to run this same `monogoto-broker` again, as it was started."""
    program = Path(sys.argv[0])
    if program.name == "monogoto-broker":
        return shlex.quote(str(program))
    return f"{shlex.quote(sys.executable)} -m service.cli"
