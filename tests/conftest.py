"""Fixtures shared by every test level: a real `redis-server` on a free port.

- `redis_server`: the session's server process (`RedisServer`). A test that stops or kills it
  must `start()` it again before it ends.
- `redis_url`: the URL of that server, running and emptied (FLUSHALL) for this test.

At the end of a run it prints the reliability table of the end-to-end scenarios that ran
(this conftest is the one pytest-xdist's controller loads).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from tests.e2e.harness import RELIABILITY_PROPERTY, TABLE_HEADER
from tests.support import free_port

_POLL_SECONDS = 0.05
_LOG_TAIL_LINES = 30


class RedisServer:
    """A `redis-server` child process without persistence, restartable on the same port."""

    #: How the server's first reply to a PING may start once it takes commands.
    ready_replies: tuple[bytes, ...] = (b"+PONG",)

    def __init__(self, executable: str, directory: Path) -> None:
        self.port = free_port()
        self.log_path = directory / "redis-server.log"
        self._executable = executable
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The `redis://` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may still be starting)."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0, args: Sequence[str] = ()) -> None:
        """Start the server unless it runs, with `args` as extra `redis-server` arguments;
        return once it answers PING. It starts empty unless its directory holds a `dump.rdb`."""
        if self.running:
            return
        command = [
            self._executable,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(self._directory)),
            *args,
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if not self.running:
                raise RuntimeError(f"redis-server exited on start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer in {timeout}s:\n{self.log_tail()}")
            time.sleep(_POLL_SECONDS)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (SIGTERM), killing it after `timeout`; its data is lost."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process.wait()

    def kill(self) -> None:
        """End the server abruptly (SIGKILL), as a crash would."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        self._process.wait()

    def flush(self) -> None:
        """Delete every key."""
        with redis.Redis(port=self.port, socket_timeout=5.0) as client:
            client.flushall()

    def log_tail(self) -> str:
        """The last lines the server wrote."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(self.ready_replies)
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real `redis-server` for the whole session."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not on PATH: the integration tests need a real Redis. "
            "Install it (Debian/Ubuntu: `apt-get install redis-server`; macOS: "
            "`brew install redis`) and run the tests again."
        )
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's Redis, running and empty."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the reliability table of the scenarios that ran, passed or failed."""
    rows = [
        str(value)
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if getattr(report, "when", None) == "call"
        for name, value in report.user_properties
        if name == RELIABILITY_PROPERTY
    ]
    if rows:
        terminalreporter.section("reliability (end-to-end scenarios)")
        terminalreporter.write_line(TABLE_HEADER)
        for row in sorted(rows):
            terminalreporter.write_line(row)
