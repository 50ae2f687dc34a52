"""`monogoto-broker token ACCOUNT`, and the example service of docs/callers.md, against a real
`serve` process and the simulator."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from service.claims import read_claims
from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from service.simulator.protected import V1_THINGS_PATH
from service.token_command import (
    API_KEY_ENV,
    BROKER_URL_ENV,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from tests.support import ServeProcess, free_port

LEGACY, V1 = "fleet", "fleet-v1"
EXAMPLE = Path(__file__).parents[2] / "clients" / "python" / "examples" / "things.py"
TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Broker:
    """A running broker and the keys of its two callers."""

    url: str
    key: str  # may use LEGACY only
    other_key: str  # may use V1 only


@dataclass(frozen=True)
class Result:
    """What one run of the command printed."""

    code: int
    stdout: str
    stderr: str


def write_config(path: Path, simulator_url: str, users: dict[str, str]) -> tuple[str, str]:
    """Two accounts (legacy and v1) and two callers, each allowed one of them."""
    key, digest = new_api_key()
    other_key, other_digest = new_api_key()
    config = {
        "redis_url": "memory://",
        "upstream": {"base_url": simulator_url},
        "refresh": {"min_remaining_seconds": 5},
        "accounts": {
            LEGACY: {"username": "ops@example.com", "password": users["ops@example.com"]},
            V1: {
                "username": "fleet@example.com",
                "password": users["fleet@example.com"],
                "dialect": "v1",
            },
        },
        "callers": {
            "cron": {"api_key_sha256": digest, "accounts": [LEGACY]},
            "other": {"api_key_sha256": other_digest, "accounts": [V1]},
        },
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return key, other_key


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory,
    simulator_url: str,
    simulator_users: dict[str, str],
) -> Iterator[Broker]:
    """One `serve` process for the module's tests."""
    directory = tmp_path_factory.mktemp("token-command")
    config = directory / "broker.yaml"
    key, other_key = write_config(config, simulator_url, simulator_users)
    process = ServeProcess(config, directory)
    try:
        process.wait_until_ok("/readyz", TIMEOUT_SECONDS)
        yield Broker(process.url, key, other_key)
    finally:
        process.kill()


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run `monogoto-broker token ARGS` with a clean environment plus `env`."""
    clean = {
        name: value
        for name, value in os.environ.items()
        if name not in (API_KEY_ENV, BROKER_URL_ENV) and not name.startswith("BROKER_")
    }
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "service.cli", "token", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def key_file(tmp_path: Path, key: str) -> Path:
    """A file holding `key`, with a trailing newline as editors and Secrets leave it."""
    path = tmp_path / "caller-key"
    path.write_text(key + "\n", encoding="utf-8")
    return path


def test_prints_the_token_alone(broker: Broker, tmp_path: Path) -> None:
    """Exit 0, and standard output is the broker's current token and one newline."""
    result = run(LEGACY, "--broker", broker.url, "--key-file", str(key_file(tmp_path, broker.key)))
    assert (result.code, result.stderr) == (EXIT_OK, "")
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token
    served = httpx.get(
        f"{broker.url}/v1/accounts/{LEGACY}/token",
        headers={"Authorization": f"Bearer {broker.key}"},
    ).json()
    assert token == served["access_token"]
    assert read_claims(token)["exp"] > 0


def test_reads_the_broker_and_the_key_from_the_environment(broker: Broker) -> None:
    """$MONOGOTO_BROKER_URL and $MONOGOTO_BROKER_API_KEY stand in for the options."""
    result = run(V1, env={BROKER_URL_ENV: broker.url, API_KEY_ENV: broker.other_key})
    assert result.code == EXIT_OK, result.stderr
    assert read_claims(result.stdout.strip())["exp"] > 0


@pytest.mark.parametrize(
    ("account", "extra", "expected"),
    [
        (LEGACY, ["--min-ttl", "604800"], "400 invalid_request: min_ttl must be less than"),
        (V1, [], "403 forbidden: This caller may not use this account."),
    ],
)
def test_a_refusal_exits_3_with_the_broker_s_problem(
    broker: Broker, tmp_path: Path, account: str, extra: list[str], expected: str
) -> None:
    """A request the broker refuses prints its status, code and detail; nothing on stdout."""
    path = key_file(tmp_path, broker.key)
    result = run(account, "--broker", broker.url, "--key-file", str(path), *extra)
    assert result.code == EXIT_REFUSED
    assert result.stdout == ""
    assert result.stderr.startswith(f"token: {expected}")


def test_an_unknown_key_exits_3_without_echoing_it(broker: Broker, tmp_path: Path) -> None:
    """401 for a key the broker does not know; the key is not repeated anywhere."""
    unknown, _ = new_api_key()
    result = run(LEGACY, "--broker", broker.url, "--key-file", str(key_file(tmp_path, unknown)))
    assert result.code == EXIT_REFUSED
    assert result.stderr.startswith("token: 401 unauthenticated")
    assert unknown not in result.stderr + result.stdout


def test_an_unreachable_broker_exits_4(tmp_path: Path) -> None:
    """Nothing listening: exit 4 with a one-line reason."""
    key, _ = new_api_key()
    broker = f"http://127.0.0.1:{free_port()}"
    result = run(LEGACY, "--broker", broker, "--key-file", str(key_file(tmp_path, key)))
    assert result.code == EXIT_UNAVAILABLE
    assert result.stderr == "token: broker unreachable (ConnectError)\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([LEGACY], "token: no credential: give --key-file"),
        ([LEGACY, "--key-file", "/no/such/key"], "token: cannot read /no/such/key"),
        ([LEGACY, "--broker", "ftp://broker", "--key-file", __file__], "token: --broker must be"),
    ],
)
def test_usage_problems_exit_2(args: list[str], expected: str) -> None:
    """No credential, an unreadable key file or a bad URL: exit 2 before asking anyone."""
    result = run(*args)
    assert result.code == EXIT_USAGE
    assert result.stderr.startswith(expected)


def test_a_broker_without_a_token_exits_4_after_its_retry_after(
    tmp_path: Path, simulator: SimulatorControl, simulator_users: dict[str, str]
) -> None:
    """Monogoto fails every login: the broker answers 503 with Retry-After; the command waits
    as told while that fits in --max-wait, then exits 4 with the broker's problem."""
    simulator.fault("status", endpoint="legacy_auth", status=503, count=1000)
    config = tmp_path / "broker.yaml"
    key, _ = write_config(config, simulator.base_url, simulator_users)
    process = ServeProcess(config, tmp_path)
    try:
        process.wait_until_ok("/healthz", TIMEOUT_SECONDS)
        path = key_file(tmp_path, key)
        result = run(LEGACY, "--broker", process.url, "--key-file", str(path), "--max-wait", "0")
    finally:
        process.kill()
        simulator.clear_faults()  # the session's simulator serves other tests' brokers too
    assert result.code == EXIT_UNAVAILABLE
    assert result.stderr.startswith("token: 503 upstream_unavailable")
    assert "retry after" in result.stderr


def test_the_output_works_as_a_curl_header(
    broker: Broker, tmp_path: Path, simulator_url: str
) -> None:
    """The documented use, run by a shell: curl -H "Authorization: Bearer $(... token ...)"
    against Monogoto's (the simulator's) protected endpoint answers 200."""
    path = key_file(tmp_path, broker.other_key)
    token = f"{shlex.quote(sys.executable)} -m service.cli token {V1} --key-file {path}"
    script = (
        f'curl -sS --fail-with-body -H "Authorization: Bearer $({token})" '
        f"{simulator_url}{V1_THINGS_PATH}"
    )
    done = subprocess.run(  # noqa: S603
        ["/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, BROKER_URL_ENV: broker.url},
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["things"]


def test_the_example_service_survives_a_revoked_token(
    broker: Broker, tmp_path: Path, simulator_url: str
) -> None:
    """docs/callers.md's example service lists the things, and lists them again after
    Monogoto (the simulator) revoked every token the broker held for the account."""
    env = {
        **os.environ,
        "MONOGOTO_BROKER_URL": broker.url,
        "MONOGOTO_ACCOUNT": V1,
        "BROKER_KEY_FILE": str(key_file(tmp_path, broker.other_key)),
        "MONOGOTO_API_URL": simulator_url,
    }

    def run_example() -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603
            [sys.executable, str(EXAMPLE)],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )

    with SimulatorControl(simulator_url) as simulator:
        before = run_example()
        refused = simulator.calls("v1_things", "token_revoked")
        simulator.revoke("fleet@example.com")
        after = run_example()
        assert simulator.calls("v1_things", "token_revoked") == refused + 1
    assert before.returncode == 0, before.stderr
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout != ""
