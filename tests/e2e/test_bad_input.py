"""Bad input: fuzzed API requests against a running replica, and broken config files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from service.keys import new_api_key, new_encryption_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import ReliabilityRow, UpstreamCounts, account, broker_config, write_config

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

ACCOUNTS = {"fuzz-v1": account(9, "v1"), "fuzz-legacy": account(10, "legacy")}
TOKEN_PATHS = re.compile(r"/v1/accounts/[^/]+/token(/invalidate)?$")
# Any JWT: the simulator's access and refresh tokens all look like this.
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")
# 503s the contract defines; with a healthy Monogoto they should not even occur.
CONTRACT_503_CODES = {"upstream_unavailable", "credentials_rejected"}
# Checks judged here instead, from the recorded exchanges: `not_a_server_error` (a contract
# 503 is no server error) and `status_code_conformance` (`documented_statuses`: what the
# OpenAPI document lists, a 404 off every route, 401/405 for a method a route lacks). Not
# applicable: `positive_data_acceptance` expects every schema-valid request to succeed, but a
# `min_ttl` beyond the token lifetime is a documented 400 that no schema can express.
EXCLUDED_CHECKS = "not_a_server_error,status_code_conformance,positive_data_acceptance"
# Rejecting a schema-violating request with 413 (body over 64 KiB) is a rejection too.
SCHEMATHESIS_CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422"]
"""
# Answers to a method a route does not have: OPTIONS, or 401 / 405.
UNLISTED_METHOD_STATUSES = {204, 401, 405}


def _beside_python(command: str) -> str:
    beside = Path(sys.executable).parent / command
    found = str(beside) if beside.exists() else shutil.which(command)
    if found is None:
        pytest.fail(f"{command} is not installed")
    return found


def _environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("BROKER_")}


def fuzz(url: str, har: Path, *, key: str | None, examples: int, phases: str) -> str:
    """Run schemathesis against the replica at `url`, recording every exchange in `har`;
    fail with its output unless all its checks pass. Returns its output."""
    config = har.with_suffix(".toml")
    config.write_text(SCHEMATHESIS_CONFIG, encoding="utf-8")
    command = [
        *(_beside_python("schemathesis"), "--config-file", str(config)),
        *("run", f"{url}/schema/openapi.json", "--checks", "all"),
        *("--exclude-checks", EXCLUDED_CHECKS, "--max-examples", str(examples)),
        *("--phases", phases, "--generation-database", "none", "--no-color"),
        *("--output-sanitize", "false", "--report", "har", "--report-har-path", str(har)),
        *("--request-timeout", "30"),
    ]
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    done = subprocess.run(  # noqa: S603 - our own test tool
        command,
        cwd=har.parent,  # where it keeps its cache
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


@dataclass(frozen=True)
class Exchange:
    """One request and its response, from a HAR file."""

    method: str
    url: str
    status: int
    headers: dict[str, str]
    body: str

    @property
    def is_token_answer(self) -> bool:
        """A 200 of a token route: the one place a token may appear."""
        return self.status == 200 and TOKEN_PATHS.search(self.url.split("?")[0]) is not None

    def code(self) -> str:
        """The problem code of an error body, or `-`."""
        try:
            body = json.loads(self.body)
        except ValueError:
            return "-"
        return str(body.get("code", "-")) if isinstance(body, dict) else "-"


def exchanges(har: Path) -> Iterator[Exchange]:
    """The exchanges recorded in `har`."""
    for entry in json.loads(har.read_text(encoding="utf-8"))["log"]["entries"]:
        response = entry["response"]
        yield Exchange(
            method=entry["request"]["method"],
            url=entry["request"]["url"],
            status=response["status"],
            headers={h["name"].lower(): h["value"] for h in response["headers"]},
            body=response.get("content", {}).get("text") or "",
        )


def _segment(part: str) -> str:
    return "[^/]+" if part.startswith("{") else re.escape(part)


def documented_statuses(url: str) -> Callable[[str, str], set[int]]:
    """The statuses the replica's OpenAPI document lists for a method and URL."""
    spec = httpx.get(f"{url}/schema/openapi.json", timeout=10).json()
    routes = [
        (re.compile("/".join(_segment(part) for part in path.split("/"))), operations)
        for path, operations in spec["paths"].items()
    ]

    def statuses(method: str, request_url: str) -> set[int]:
        path = urlsplit(request_url).path
        for pattern, operations in routes:
            if pattern.fullmatch(path):
                operation = operations.get(method.lower())
                if operation is None:
                    return UNLISTED_METHOD_STATUSES
                return {int(status) for status in operation["responses"]}
        return {404}

    return statuses


def leaks(text: str, secrets: Iterable[str]) -> list[str]:
    """What of `secrets`, or any JWT, `text` shows (as short prefixes, not the secrets)."""
    found = [secret[:6] + "..." for secret in secrets if secret in text]
    found += [f"JWT {match[:6]}..." for match in JWT.findall(text)]
    return found


async def test_fuzzed_requests_get_no_server_error_and_leak_no_secret(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Schema-driven fuzzing of every operation, with a caller key, with a key limited to one
    account and without a key, gets no 5xx beyond the contract's 503s, passes every
    applicable schemathesis check, and no answer or log line shows a token outside a token
    answer, a password or a caller key."""
    e2e_simulator.set(rate_limit=10_000, rate_period_seconds=1)
    key, digest = new_api_key()
    limited_key, limited_digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        digest,
        ACCOUNTS,
        upstream={"auth_rate": {"limit": 10_000, "period_seconds": 1}},
    )
    config["callers"]["limited"] = {"api_key_sha256": limited_digest, "accounts": ["fuzz-v1"]}
    [replica] = start_brokers(write_config(tmp_path / "broker.yaml", config), 1)

    runs = {
        "caller key": (key, 10, "coverage,fuzzing,stateful"),
        "key for one account": (limited_key, 5, "coverage,fuzzing"),
        "no key": (None, 5, "coverage,fuzzing"),
    }
    seen: list[Exchange] = []
    for name, (run_key, examples, phases) in runs.items():
        har = tmp_path / f"{name.replace(' ', '-')}.har"
        fuzz(replica.url, har, key=run_key, examples=examples, phases=phases)
        seen.extend(exchanges(har))

    statuses = Counter(f"{e.status} {e.code()}" if e.status >= 400 else str(e.status) for e in seen)
    upstream = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="bad input (API)",
            injected=(
                "schemathesis on all operations: with a caller key, a key for one account, no key"
            ),
            callers_saw=", ".join(f"{n} x {code}" for code, n in sorted(statuses.items())),
            upstream_calls=upstream.describe(),
            rate_limited=upstream.rate_limited,
            reused=upstream.reused,
        )
    )
    server_errors = [
        f"{e.method} {e.url}: {e.status} {e.code()}"
        for e in seen
        if e.status >= 500 and not (e.status == 503 and e.code() in CONTRACT_503_CODES)
    ]
    assert server_errors == []
    documented = documented_statuses(replica.url)
    undocumented = {
        f"{e.method} {e.url.split('?')[0]}: {e.status}"
        for e in seen
        if e.status not in documented(e.method, e.url)
    }
    assert undocumented == set()
    assert sum(1 for e in seen if e.is_token_answer) > 0, "fuzzing never got a token"

    tokens = {json.loads(e.body)["access_token"] for e in seen if e.is_token_answer}
    secrets = [key, limited_key, *(settings["password"] for settings in ACCOUNTS.values())]
    for exchange in seen:
        headers = "\n".join(f"{name}: {value}" for name, value in exchange.headers.items())
        where = f"{exchange.method} {exchange.url} ({exchange.status})"
        assert leaks(headers, [*secrets, *tokens]) == [], f"headers of {where}"
        if exchange.is_token_answer:
            # Its own access token is the answer; nothing else secret may ride along.
            body = json.loads(exchange.body)
            assert leaks(exchange.body.replace(body["access_token"], ""), secrets) == [], where
        else:
            assert leaks(exchange.body, [*secrets, *tokens]) == [], f"body of {where}"
    log = replica.log_lines()
    assert len(log) > 100
    for line in log:
        assert leaks(line, [*secrets, *tokens]) == [], f"log line: {line[:200]}"
    assert replica.stop() == 0


@dataclass(frozen=True)
class BrokenConfig:
    """A config file with one mistake, and what check-config must name."""

    name: str
    content: bytes
    names: str


PASSWORD = "Pw-never-echo-4711"
REDIS_PASSWORD = "Redis-pw-never-echo-0815"
RAW_CALLER_KEY = new_api_key()[0]  # pasted where its digest belongs


def _valid() -> dict[str, Any]:
    return {
        "redis_url": f"redis://:{REDIS_PASSWORD}@redis.example:6379/0",
        "encryption_keys": new_encryption_key(),
        "accounts": {"fleet": {"username": "ops@example.com", "password": PASSWORD}},
        "callers": {"billing": {"api_key_sha256": new_api_key()[1], "accounts": ["fleet"]}},
    }


def _with(path: tuple[str, ...], value: Any) -> bytes:
    config = _valid()
    section = config
    for part in path[:-1]:
        section = section.setdefault(part, {})
    section[path[-1]] = value
    return yaml.safe_dump(config).encode()


def _without(name: str) -> bytes:
    config = _valid()
    del config[name]
    return yaml.safe_dump(config).encode()


def broken_configs(directory: Path) -> list[BrokenConfig]:
    """Config files with one mistake each; `directory` holds what they point at."""
    a_directory = directory / "not-a-file"
    a_directory.mkdir()
    return [
        BrokenConfig("not YAML", b"accounts: [fleet\n  password: " + PASSWORD.encode(), "line"),
        BrokenConfig("not UTF-8", b"\xff\xfe\x00accounts:\x89", "UTF-8"),
        BrokenConfig("a YAML list", b"- redis_url\n- accounts\n", "top level"),
        BrokenConfig("a Python tag", b"redis_url: !!python/object/apply:os.getcwd []\n", "tag"),
        BrokenConfig("an unknown key", _with(("refresh", "fractoin"), 0.5), "refresh.fractoin"),
        BrokenConfig(
            "a wrong type", _with(("upstream", "timeout_seconds"), "soon"), "upstream.timeout"
        ),
        BrokenConfig(
            "a boolean count", _with(("upstream", "auth_rate", "limit"), True), "auth_rate.limit"
        ),
        BrokenConfig(
            "a huge timeout", _with(("upstream", "timeout_seconds"), 1e20), "upstream.timeout"
        ),
        BrokenConfig(
            "a huge window",
            _with(("upstream", "auth_rate", "period_seconds"), 1e26),
            "auth_rate.period",
        ),
        BrokenConfig("no accounts", _without("accounts"), "accounts"),
        BrokenConfig(
            "a short encryption key",
            _with(("encryption_keys",), "k1:" + "QUJD" * 4),
            "encryption_keys",
        ),
        BrokenConfig(
            "an unreadable password_file",
            _with(("accounts", "fleet"), {"username": "o", "password_file": str(a_directory)}),
            "accounts.fleet.password_file",
        ),
        BrokenConfig(
            "a caller key instead of its digest",
            _with(("callers", "billing", "api_key_sha256"), RAW_CALLER_KEY),
            "callers.billing.api_key_sha256",
        ),
        BrokenConfig(
            "a caller naming an unknown account",
            _with(("callers", "billing", "accounts"), ["fleet", "fleet-us"]),
            "callers.billing.accounts[1]",
        ),
        BrokenConfig(
            "a password in a bad Redis URL",
            _with(("redis_url",), f"http://admin:{REDIS_PASSWORD}@redis.example/0"),
            "redis_url",
        ),
    ]


def test_broken_configs_get_clear_check_config_errors(tmp_path: Path) -> None:
    """check-config answers each broken config with exit 2 and a short message naming the
    field or line, never a traceback and never a secret from the file."""
    cases = broken_configs(tmp_path)
    running = []
    for index, case in enumerate(cases):
        path = tmp_path / f"config-{index}.yaml"
        path.write_bytes(case.content)
        running.append(
            subprocess.Popen(  # noqa: S603 - our own command
                [sys.executable, "-m", "service.cli", "check-config", "--config", str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_environment(),
            )
        )
    wrong = []
    for case, process in zip(cases, running, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        output = stdout + stderr
        lines = output.strip().splitlines()
        secrets = [PASSWORD, REDIS_PASSWORD, RAW_CALLER_KEY, RAW_CALLER_KEY.removeprefix("mgb_")]
        if (
            process.returncode != 2
            or "Traceback" in output
            or not 1 <= len(lines) <= 3
            or case.names not in output
            or any(secret in output for secret in secrets)
        ):
            wrong.append(f"{case.name}: exit {process.returncode}: {output.strip()[:300]}")
    assert wrong == []
