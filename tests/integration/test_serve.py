"""`monogoto-broker serve` as a real process: tokens over HTTP, JSON logs, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.keys import new_api_key, new_encryption_key
from service.serving import EXIT_STARTUP_FAILURE
from service.simulator.client import SimulatorControl
from tests.support import ServeProcess

_START_SECONDS = 90  # several workers each import the web stack on a busy machine
_STOP_SECONDS = 60
_POLL_SECONDS = 0.1
_LOGIN_LATENCY_SECONDS = 3.0
_TOKEN_REQUESTS = 6
ACCOUNT = "fleet"


def write_config(path: Path, simulator_url: str, users: dict[str, str], **extra: Any) -> str:
    """Write a one-account config on the simulator; returns the caller key it accepts."""
    key, digest = new_api_key()
    username = "ops@example.com"
    config = {
        "redis_url": "memory://",
        "upstream": {"base_url": simulator_url, "dialect": "legacy"},
        "accounts": {ACCOUNT: {"username": username, "password": users[username]}},
        "callers": {"tests": {"api_key_sha256": digest, "accounts": ["*"]}},
        **extra,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return key


class StartServe(Protocol):
    """Starts `serve` and returns once it is healthy."""

    def __call__(self, config: Path, *, workers: int) -> ServeProcess: ...


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[StartServe]:
    """A function starting `serve --config F --workers N`; leftovers are killed at the end."""
    started: list[ServeProcess] = []

    def start(config: Path, *, workers: int) -> ServeProcess:
        directory = tmp_path / f"serve-{len(started)}"
        directory.mkdir()
        process = ServeProcess(config, directory, workers=workers)
        started.append(process)
        process.wait_until_ok("/healthz", _START_SECONDS)
        return process

    yield start
    for process in started:
        process.kill()


def assert_logs_are_safe_json(lines: list[str], secrets: list[str]) -> None:
    """Every line is a JSON object with the house fields, and no secret appears anywhere."""
    assert lines, "serve logged nothing"
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
    text = "\n".join(lines)
    for secret in secrets:
        assert secret not in text


def auth(key: str) -> dict[str, str]:
    """The header that authenticates a caller."""
    return {"Authorization": f"Bearer {key}"}


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds, up to a deadline."""
    deadline = time.monotonic() + _START_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(_POLL_SECONDS)


def graceful_stop_during_login(
    serve: ServeProcess, simulator: SimulatorControl, key: str
) -> tuple[httpx.Response, str]:
    """Fetch a token, make the next login slow, ask for a new token, SIGTERM mid-login.

    Returns the answer to that in-flight request and the token it replaced.
    """
    with httpx.Client(base_url=serve.url, headers=auth(key), timeout=60.0) as http:
        first = http.get(f"/v1/accounts/{ACCOUNT}/token")
        assert first.status_code == 200, first.text
        old_token: str = first.json()["access_token"]
        simulator.set(latency_seconds=_LOGIN_LATENCY_SECONDS)
        logins_before = simulator.calls("legacy_auth", user="ops@example.com")
        answers: list[httpx.Response] = []
        invalidate = threading.Thread(
            target=lambda: answers.append(
                http.post(
                    f"/v1/accounts/{ACCOUNT}/token/invalidate", json={"access_token": old_token}
                )
            )
        )
        invalidate.start()
        # The simulator counts a login when it arrives and answers it seconds later.
        wait_for(
            lambda: simulator.calls("legacy_auth", user="ops@example.com") > logins_before,
            "the broker to log in again",
        )
        serve.process.send_signal(signal.SIGTERM)
        invalidate.join(_STOP_SECONDS)
    assert answers, "the in-flight request got no answer"
    return answers[0], old_token


def test_serve_hands_out_tokens_logs_json_and_drains_on_sigterm(
    tmp_path: Path,
    start_serve: StartServe,
    simulator: SimulatorControl,
    simulator_users: dict[str, str],
) -> None:
    """One worker: tokens over HTTP, JSON logs without secrets, SIGTERM lets a login finish."""
    config = tmp_path / "broker.yaml"
    key = write_config(config, simulator.base_url, simulator_users)
    serve = start_serve(config, workers=1)

    try:
        answer, old_token = graceful_stop_during_login(serve, simulator, key)
    finally:
        simulator.set(latency_seconds=0)

    assert answer.status_code == 200, answer.text
    new_token = answer.json()["access_token"]
    assert new_token != old_token
    assert serve.process.wait(_STOP_SECONDS) == 0, serve.log()
    secrets = [old_token, new_token, key, *simulator_users.values()]
    assert_logs_are_safe_json(serve.log_lines(), secrets)


def test_serve_with_two_workers_shares_redis_and_metrics(
    tmp_path: Path,
    start_serve: StartServe,
    simulator: SimulatorControl,
    simulator_users: dict[str, str],
    redis_url: str,
) -> None:
    """Two workers on Redis: tokens, metrics of both workers (gauges as their maximum), clean
    SIGTERM, temp dir removed."""
    config = tmp_path / "broker.yaml"
    extra = {"redis_url": redis_url, "encryption_keys": new_encryption_key()}
    key = write_config(config, simulator.base_url, simulator_users, **extra)
    serve = start_serve(config, workers=2)

    # prometheus-client's multiprocess mode: one set of files per worker, in serve's directory.
    [metrics_dir] = serve.temp_dir.iterdir()
    wait_for(lambda: len(_writers(metrics_dir)) == 2, "both workers to write metric files")
    for _ in range(_TOKEN_REQUESTS):  # each on a new connection, so both workers get some
        with httpx.Client(base_url=serve.url, timeout=30.0) as http:
            fetched = http.get(f"/v1/accounts/{ACCOUNT}/token", headers=auth(key))
            assert fetched.status_code == 200, fetched.text
    with httpx.Client(base_url=serve.url, timeout=30.0) as http:
        metrics = http.get("/metrics")
    try:
        answer, old_token = graceful_stop_during_login(serve, simulator, key)
    finally:
        simulator.set(latency_seconds=0)

    assert metrics.status_code == 200
    assert token_requests(metrics.text) == _TOKEN_REQUESTS
    # The plan's gauges, one series each: the maximum over the workers.
    for gauge in ("auth_budget_utilisation", "accounts_at_risk"):
        [line] = [x for x in metrics.text.splitlines() if x.startswith(f"monogoto_broker_{gauge} ")]
        assert float(line.split()[1]) >= 0
    # The per-account gauges, from the files the workers write (each its maximum over the
    # workers): the token's expiry, and its credentials verified by the login.
    samples = account_samples(metrics.text)
    assert samples[("token_expiry_timestamp_seconds", "")] > time.time()
    assert samples[("credentials_rejected", "")] == 0
    assert samples[("account_credentials", "verified")] == 1
    assert answer.status_code == 200, answer.text
    new_token = answer.json()["access_token"]
    assert new_token != old_token
    assert serve.process.wait(_STOP_SECONDS) == 0, serve.log()
    assert not metrics_dir.exists()
    secrets = [old_token, new_token, key, *simulator_users.values()]
    assert_logs_are_safe_json(serve.log_lines(), secrets)


def test_serve_keeps_an_idle_connection_open_past_a_retry_after(
    tmp_path: Path,
    start_serve: StartServe,
    simulator: SimulatorControl,
    simulator_users: dict[str, str],
) -> None:
    """A caller that waits out a typical Retry-After (5 s), then reuses its keep-alive
    connection, is answered on it instead of finding it closed under its request."""
    config = tmp_path / "broker.yaml"
    key = write_config(config, simulator.base_url, simulator_users)
    serve = start_serve(config, workers=1)
    request = (
        f"GET /v1/accounts/{ACCOUNT}/token HTTP/1.1\r\nHost: broker\r\n"
        f"Authorization: Bearer {key}\r\n\r\n"
    ).encode()
    # A raw socket, because an HTTP client would quietly reconnect if the server had closed it.
    with socket.create_connection(("127.0.0.1", serve.port), timeout=30) as connection:
        connection.sendall(request)
        assert read_status_line(connection).startswith(b"HTTP/1.1 200")
        # The idle time is the behaviour under test, not a wait for something to happen.
        time.sleep(6.0)
        connection.sendall(request)
        assert read_status_line(connection).startswith(b"HTTP/1.1 200")
    assert serve.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_exits_non_zero_when_the_workers_fail_to_start(tmp_path: Path, workers: int) -> None:
    """A valid config, but a process environment in which every worker's lifespan startup fails:
    `SSL_CERT_FILE` names a CA bundle that is not there (say, a Secret that was not mounted), so
    the broker runtime cannot make its HTTP client for Monogoto, which loads that bundle when it
    is made. `serve` stops with uvicorn's startup-failure code and says so, instead of exiting 0
    (several workers, uvicorn's supervisor returned normally) or only with uvicorn's own lines
    (one worker)."""
    config = tmp_path / "broker.yaml"
    extra = {"redis_url": "redis://127.0.0.1:6379/0", "encryption_keys": new_encryption_key()}
    write_config(config, "http://127.0.0.1:9", {"ops@example.com": "unused"}, **extra)
    missing = {"SSL_CERT_FILE": str(tmp_path / "not-mounted" / "ca-bundle.crt")}
    serve = ServeProcess(config, tmp_path / "serve", workers=workers, env=missing)
    try:
        exit_code = serve.process.wait(_STOP_SECONDS)
    finally:
        serve.kill()

    assert exit_code == EXIT_STARTUP_FAILURE, serve.log()
    assert "FileNotFoundError" in serve.log()  # the missing bundle, not another failure
    assert_one_startup_failure_logged(serve)
    assert list(serve.temp_dir.iterdir()) == []  # the metrics directory of several workers


def test_serve_stops_when_a_restarted_worker_cannot_load_the_app(
    tmp_path: Path,
    start_serve: StartServe,
    simulator: SimulatorControl,
    simulator_users: dict[str, str],
    redis_url: str,
) -> None:
    """A worker that dies is restarted; if its replacement cannot even build the app (the config
    file was broken since `serve` validated it), `serve` stops with an error instead of
    restarting it forever (the factory's exception used to end it with code 1, not 3)."""
    config = tmp_path / "broker.yaml"
    extra = {"redis_url": redis_url, "encryption_keys": new_encryption_key()}
    write_config(config, simulator.base_url, simulator_users, **extra)
    serve = start_serve(config, workers=2)
    [metrics_dir] = serve.temp_dir.iterdir()
    wait_for(lambda: len(_writers(metrics_dir)) == 2, "both workers to write metric files")

    config.write_text("accounts: {}\n", encoding="utf-8")
    os.kill(int(min(_writers(metrics_dir))), signal.SIGKILL)

    assert serve.process.wait(_STOP_SECONDS) == EXIT_STARTUP_FAILURE, serve.log()
    assert "at least one account is required" in serve.log()
    assert_one_startup_failure_logged(serve)


def assert_one_startup_failure_logged(serve: ServeProcess) -> None:
    """All of serve's output is JSON lines, one of them serve's own error about the failed start."""
    records = [json.loads(line) for line in serve.log_lines()]
    errors = [
        record
        for record in records
        if record["logger"] == "service.serving" and record["level"] == "ERROR"
    ]
    assert len(errors) == 1, serve.log()
    assert errors[0]["message"].startswith("a worker failed to start"), errors[0]


def read_status_line(connection: socket.socket) -> bytes:
    """Read one whole response (headers and a Content-Length body); its status line, or b""
    if the server closed the connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        if not chunk:
            return b""
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head.split(b"\r\n", 1)[0]


def account_samples(exposition: str) -> dict[tuple[str, str], float]:
    """ACCOUNT's `monogoto_broker_` samples by name (without the prefix) and `state` label."""
    return {
        (sample.name.removeprefix("monogoto_broker_"), sample.labels.get("state", "")): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.labels.get("account") == ACCOUNT
        and "caller" not in sample.labels
        and "operation" not in sample.labels
    }


def token_requests(exposition: str) -> float:
    """The total of `monogoto_broker_token_requests_total` over all labels."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "monogoto_broker_token_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def _writers(metrics_dir: Path) -> set[str]:
    """Process ids that wrote metric files (named `<kind>_<pid>.db`)."""
    return {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("*.db")}
