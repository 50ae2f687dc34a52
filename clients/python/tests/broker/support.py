"""What the client's broker tests share: the accounts and callers of the session broker, the
`monogoto-broker` processes, and reading the broker's counters and steering the simulator.

Everything goes through the `monogoto-broker` command and HTTP, nothing through the broker's
Python code: so these tests also run on a Python the broker does not support (3.9, 3.10), with
the client installed from its wheel (clients/python/check-wheel). The command is
$MONOGOTO_BROKER_BIN, else `monogoto-broker` next to the running Python, else the repository's
`.venv/bin/monogoto-broker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

#: Accounts on the main simulator (legacy dialect), each with its own user.
ACCOUNTS = (
    "fleet",
    "invalidate",
    "ainvalidate",
    "rotation",
    "unavailable",
    "recovers",
    "auth-sync",
    "auth-async",
    "auth-persistent",
    "auth-dialect",
    "auth-requests",
    "refused",
    "secrets",
    "restart",
)
#: The account on the second simulator, whose tokens live `SHORT_LIFETIME` seconds.
SHORT = "short"
SHORT_LIFETIME = 8
#: Callers and the accounts each may use.
CALLERS = {
    "main": ["*"],
    "rot-a": ["rotation"],
    "rot-b": ["rotation"],
    "limited": [SHORT],
}

_REPOSITORY = Path(__file__).resolve().parents[4]
_LISTENING = re.compile(r"listening on (http://\S+)")
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_POLL_SECONDS = 0.05
_STOP_SECONDS = 30.0


def user_of(account: str) -> str:
    """The simulator user an account logs in as."""
    return f"{account}@example.com"


def broker_command() -> list[str]:
    """How to run `monogoto-broker`."""
    given = os.environ.get("MONOGOTO_BROKER_BIN")
    if given:
        return [given]
    beside = Path(sys.executable).with_name("monogoto-broker")
    if beside.exists():
        return [str(beside)]
    return [str(_REPOSITORY / ".venv" / "bin" / "monogoto-broker")]


def new_api_key() -> tuple[str, str]:
    """A caller key and its digest for the config, as `monogoto-broker new-api-key` makes them
    (docs/api.md: the config holds `sha256:` and the key's hex SHA-256)."""
    key = "mgb_" + secrets.token_urlsafe(32)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def write_key(path: Path, key: str) -> None:
    """Replace `path` atomically with a file holding `key` and a newline."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(f"{key}\n", encoding="utf-8")
    temporary.replace(path)


def write_yaml(path: Path, content: Any) -> Path:
    """Write `content` as JSON, which every YAML reader reads too."""
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Process:
    """A `monogoto-broker` child process writing to a log file."""

    def __init__(self, arguments: Sequence[str], log_path: Path) -> None:
        self.log_path = log_path
        # The broker's own settings must come from the config file only.
        env = {name: value for name, value in os.environ.items() if not name.startswith("BROKER_")}
        env["TMPDIR"] = str(log_path.parent)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [*broker_command(), *arguments], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def log(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, ready: Any, timeout: float) -> Any:
        """Poll `ready()` until it returns something true, which is returned; raise with the log
        if the process exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            found = ready()
            if found:
                return found
            if self.process.poll() is not None:
                raise RuntimeError(f"{what}: exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {timeout} s:\n{self.log()}")
            time.sleep(_POLL_SECONDS)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after a while."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def start_simulator(
    arguments: Sequence[str], log_path: Path, timeout: float = 60.0
) -> tuple[Process, str]:
    """`monogoto-broker simulator --port 0 ...`, returned once healthy, and its URL."""
    process = Process(["simulator", "--port", "0", *arguments], log_path)
    try:
        found = process.wait_for("simulator", lambda: _LISTENING.search(process.log()), timeout)
        url: str = found.group(1)
        process.wait_for("simulator", lambda: _answers(f"{url}/_sim/healthz"), timeout)
    except BaseException:
        process.stop()
        raise
    return process, url


def start_broker(
    config: Path, log_path: Path, port: int | None = None, timeout: float = 90.0
) -> tuple[Process, str]:
    """`monogoto-broker serve --workers 1` on `port` (default: a free one), returned once
    ready, and its URL."""
    port = port or free_port()
    arguments = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    process = Process([*arguments, "--workers", "1"], log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_for("broker", lambda: _answers(f"{url}/readyz"), timeout)
    except BaseException:
        process.stop()
        raise
    return process, url


@dataclass(frozen=True)
class Stack:
    """What the session started: URLs and the callers' keys."""

    broker_url: str
    simulator_url: str
    short_simulator_url: str
    keys: dict[str, str]


class Simulator:
    """The simulator's control API (docs/simulator.md), what these tests need of it."""

    def __init__(self, base_url: str) -> None:
        self._http = httpx.Client(base_url=f"{base_url}/_sim", timeout=10.0)

    def close(self) -> None:
        """Release the connections."""
        self._http.close()

    def reset(self) -> None:
        """Counters, faults and settings back to the start."""
        self._http.post("/reset").raise_for_status()

    def fault(self, kind: str, **rule: Any) -> None:
        """Append a fault rule (`endpoint`, `status`, `count`, ...)."""
        self._http.post("/faults", json={"kind": kind, **rule}).raise_for_status()

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._http.delete("/faults").raise_for_status()

    def revoke(self, username: str) -> None:
        """Revoke every token issued to `username` so far."""
        self._http.post(f"/users/{quote(username, safe='')}/revoke").raise_for_status()

    def calls(self, endpoint: str, outcome: str | None = None) -> int:
        """How many calls to `endpoint` were counted (with that outcome)."""
        answer = self._http.get("/stats")
        answer.raise_for_status()
        return sum(
            row["count"]
            for row in answer.json()["calls"]
            if row["endpoint"] == endpoint and outcome in (None, row["outcome"])
        )


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    samples = []
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(found.group(2) or ""))
        samples.append((found.group(1), labels, float(found.group(3))))
    return samples


@dataclass(frozen=True)
class Broker:
    """Reads the broker's counters (`/metrics`)."""

    url: str

    def count(self, name: str, **labels: str) -> int:
        """The sum of the samples of `name` whose labels include `labels`."""
        return int(
            sum(
                value
                for sample, found, value in _samples(self.url)
                if sample == name and all(found.get(key) == want for key, want in labels.items())
            )
        )

    def requests(self, account: str, caller: str, outcome: str | None = None) -> int:
        """`monogoto_broker_token_requests_total` of `caller` for `account` (all outcomes, or
        one): every GET .../token and invalidate that reached the broker."""
        labels = {"account": account, "caller": caller}
        if outcome is not None:
            labels["outcome"] = outcome
        return self.count("monogoto_broker_token_requests_total", **labels)

    def refused(self, reason: str) -> int:
        """`monogoto_broker_caller_auth_failures_total` for `reason` (`unknown`, ...)."""
        return self.count("monogoto_broker_caller_auth_failures_total", reason=reason)
