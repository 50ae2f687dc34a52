"""Running the simulator: users file, socket, uvicorn."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn
import yaml

from service.simulator import DEMO_PASSWORD, DEMO_USERNAME
from service.simulator.app import create_simulator_app
from service.simulator.state import SimulatorSettings, SimulatorState

EXIT_USAGE = 2
EXIT_BIND = 1
# Delayed answers may be in flight at shutdown; don't let them hold the process for long.
_GRACEFUL_SHUTDOWN_SECONDS = 3
# Idle keep-alive connections stay open like behind a typical API load balancer (60 s and more),
# not uvicorn's 5 s: that equals httpx's own keep-alive expiry, so a client reusing a connection
# after about 5 s would race the close and see a dropped request that never arrived.
_KEEP_ALIVE_SECONDS = 75


class UsersFileError(Exception):
    """The users file is missing or not a mapping of username to password."""


def load_users(path: Path | None) -> dict[str, str]:
    """Read a YAML mapping of username to password; without a file, the demo user."""
    if path is None:
        return {DEMO_USERNAME: DEMO_PASSWORD}
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsersFileError(f"cannot read users file {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise UsersFileError(
            f"users file {path} is not valid YAML: {' '.join(str(error).split())}"
        ) from error
    if not isinstance(document, dict) or not document:
        raise UsersFileError(
            f"users file {path} must be a non-empty mapping of username to password"
        )
    for username, password in document.items():
        if not isinstance(username, str) or not username:
            raise UsersFileError(
                f"users file {path}: username {username!r} must be a non-empty string"
            )
        if not isinstance(password, str) or not password:
            # Never echo the value: it is meant to be a password.
            raise UsersFileError(
                f"users file {path}: password of {username!r} must be a non-empty string (quote it)"
            )
    return dict(document)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _users_phrase(count: int) -> str:
    return "1 user" if count == 1 else f"{count} users"


def run_simulator(
    *,
    host: str,
    port: int,
    token_lifetime: float,
    refresh_lifetime: float,
    rate_limit: int,
    rate_period: float,
    users_file: Path | None,
) -> int:
    """Serve the simulator until interrupted; returns the process exit code.

    Port 0 picks a free port; the first line on stdout says where it listens.
    """
    try:
        users = load_users(users_file)
    except UsersFileError as error:
        print(f"simulator: {error}", file=sys.stderr)
        return EXIT_USAGE
    settings = SimulatorSettings(
        token_lifetime_seconds=token_lifetime,
        refresh_lifetime_seconds=refresh_lifetime,
        rate_limit=rate_limit,
        rate_period_seconds=rate_period,
    )
    try:
        sock = _bind(host, port)
    except OSError as error:
        print(
            f"simulator: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr
        )
        return EXIT_BIND
    app = create_simulator_app(SimulatorState(users, settings))
    config = uvicorn.Config(
        app,
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=_KEEP_ALIVE_SECONDS,
        server_header=False,
    )
    url = _url(sock)
    print(f"Monogoto simulator listening on {url} ({_users_phrase(len(users))})")
    if users_file is None:
        # The demo password is public (docs/simulator.md); passwords from a file are never shown.
        print(f"demo user: {DEMO_USERNAME} / {DEMO_PASSWORD}")
        print(
            f"try: curl -s -X POST {url}/v1/auth/token -H 'Content-Type: application/json' "
            f'-d \'{{"username": "{DEMO_USERNAME}", "password": "{DEMO_PASSWORD}"}}\''
        )
    sys.stdout.flush()
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0
