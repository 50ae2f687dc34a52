"""`monogoto-broker dev`: the printed curl commands work as printed, and it stops cleanly."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from service.simulator import DEMO_USERNAME
from tests.support import free_port

_START_SECONDS = 60
_STOP_SECONDS = 30
_POLL_SECONDS = 0.05


class DevProcess:
    """A `monogoto-broker dev` child process with its output in files."""

    def __init__(self, port: int, directory: Path) -> None:
        self.stdout_path = directory / "dev.out"
        self.stderr_path = directory / "dev.err"
        env = {name: value for name, value in os.environ.items() if not name.startswith("BROKER_")}
        command = [sys.executable, "-m", "service.cli", "dev", "--port", str(port)]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env)  # noqa: S603

    def printed_line(self, pattern: str) -> str:
        """The first stdout line matching `pattern`, stripped, waiting for it up to a deadline."""
        deadline = time.monotonic() + _START_SECONDS
        while True:
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                if re.search(pattern, line):
                    return line.strip()
            assert self.process.poll() is None, f"dev exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"dev printed no {pattern!r}:\n{self.output()}"
            time.sleep(_POLL_SECONDS)

    def output(self) -> str:
        """Everything it printed so far, stdout then stderr."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[DevProcess, int]]:
    """A running `dev` process on a free port, killed at the end if a test left it running."""
    port = free_port()
    process = DevProcess(port, tmp_path)
    yield process, port
    if process.process.poll() is None:
        process.process.kill()
        process.process.wait()


def run_printed(line: str) -> subprocess.CompletedProcess[str]:
    """Run a printed curl command exactly as printed."""
    argv = shlex.split(line)
    assert argv[0] == "curl"
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603


def test_printed_curls_fetch_a_demo_token_and_list_the_accounts(
    dev: tuple[DevProcess, int],
) -> None:
    """Both printed curls, run as printed, work: a demo-v1 JWT, then both demo accounts."""
    process, port = dev
    token_line = process.printed_line(r"^\s*curl .*/v1/accounts/demo-v1/token$")
    accounts_line = process.printed_line(r"^\s*curl .*/v1/accounts$")
    assert f" http://127.0.0.1:{port}/" in token_line

    token = run_printed(token_line)
    accounts = run_printed(accounts_line)

    assert token.returncode == 0, token.stderr
    body = json.loads(token.stdout)
    assert body["account"] == "demo-v1"
    assert body["token_type"] == "Bearer"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == DEMO_USERNAME
    assert accounts.returncode == 0, accounts.stderr
    rows = json.loads(accounts.stdout)["accounts"]
    assert {row["name"]: row["dialect"] for row in rows} == {
        "demo-legacy": "legacy",
        "demo-v1": "v1",
    }


def test_sigterm_stops_dev_with_exit_code_0(dev: tuple[DevProcess, int]) -> None:
    """After SIGTERM, dev shuts both servers down and exits 0; each server's start and stop
    lines say which server they are from."""
    process, _ = dev
    process.printed_line(r"^\s*curl ")

    process.process.send_signal(signal.SIGTERM)

    assert process.process.wait(_STOP_SECONDS) == 0, process.output()
    lines = [json.loads(line) for line in process.stderr_path.read_text().splitlines()]
    for message in ("Application startup complete.", "Application shutdown complete."):
        servers = sorted(line.get("server", "?") for line in lines if line["message"] == message)
        assert servers == ["broker", "simulator"], process.output()


def run_printed_shell(*lines: str) -> subprocess.CompletedProcess[str]:
    """Run printed lines with a shell, as a user pasting them would, with this interpreter's
    environment first on PATH (where `python3` has the client installed)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(  # noqa: S603
        ["/bin/sh", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": path},
    )


def test_printed_script_and_client_examples_reach_the_simulator_s_api(
    dev: tuple[DevProcess, int],
) -> None:
    """The token command in a curl header, and the Python client's one-liner, both get the
    demo user's things from the simulator's protected v1 endpoint."""
    process, _ = dev
    export = process.printed_line(r"^\s*export MONOGOTO_BROKER_API_KEY=")
    curl = process.printed_line(r"^\s*curl .*\$\(.* token demo-v1 .*/v1/things$")
    client = process.printed_line(r"^\s*python3 -c ")

    by_curl = run_printed_shell(export, curl)
    by_client = run_printed_shell(client)

    assert by_curl.returncode == 0, by_curl.stderr
    assert json.loads(by_curl.stdout)["things"]
    assert by_client.returncode == 0, by_client.stderr
    assert "'things'" in by_client.stdout
