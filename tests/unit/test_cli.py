"""The configuration and key commands of `monogoto-broker`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from service.config import Dialect
from service.dev import dev_settings
from service.keys import api_key_digest, new_api_key, parse_encryption_keys
from service.simulator import DEMO_USERNAME
from tests.config_files import write_text

VALID = """\
redis_url: "memory://"
accounts:
  fleet-eu:
    username: ops@example.com
    password: s3cret-Pass
callers:
  billing:
    api_key_sha256: "sha256:{digest}"
    accounts: ["fleet-eu"]
""".format(digest="ab" * 32)

THREE_MISTAKES = """\
redis_url: "memory://"
upstream: {timeout_seconds: 0}
refresh: {fractoin: 0.5}
accounts:
  fleet-eu:
    username: ops@example.com
    password_file: /no/such/file
"""


def test_check_config_accepts_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid config exits 0 and says so, with what it found."""
    path = write_text(tmp_path, VALID)
    assert main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK (1 account, 1 caller)\n"


def test_check_config_prints_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken config exits 2 and lists each problem on its own line, with its line."""
    path = write_text(tmp_path, THREE_MISTAKES)
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"upstream.timeout_seconds: must be greater than 0 (from {path} line 2)",
        f"refresh.fractoin: unknown key (from {path} line 3)",
        "accounts.fleet-eu.password_file: cannot read /no/such/file (No such file or directory) "
        f"(from {path} line 7)",
    ]


def test_check_config_lists_every_problem_and_its_source_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Problems of single fields, of secrets and across fields come in one run, each naming
    the file's line or the environment variable it came from; warnings come first."""
    text = VALID.replace('"memory://"', '"redis://redis:6379/0"').replace(
        '["fleet-eu"]', '["fleet-eu", "fleet-us"]'
    )
    monkeypatch.setenv("BROKER_UPSTREAM__TIMEOUT", "3")
    monkeypatch.setenv("BROKER_UPSTREAM__TIMEOUT_SECONDS", "0")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD_FILE", "/no/such/file")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_AP__PASSWORD", "s3cret-Pass")
    path = write_text(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"warning: accounts.fleet_ap: created by BROKER_ACCOUNTS__FLEET_AP__PASSWORD, not in "
        f"{path} (environment variables cannot spell '-': accounts named with '-' must be in "
        "the file, and then '_' in a variable stands for their '-')",
        "upstream.timeout_seconds: must be greater than 0 (from BROKER_UPSTREAM__TIMEOUT_SECONDS)",
        "upstream.timeout: unknown key (from BROKER_UPSTREAM__TIMEOUT)",
        "accounts.fleet-eu.password_file: cannot read /no/such/file (No such file or directory) "
        "(from BROKER_ACCOUNTS__FLEET_EU__PASSWORD_FILE)",
        "accounts.fleet_ap.username: required (from BROKER_ACCOUNTS__FLEET_AP__PASSWORD)",
        f"callers.billing.accounts[1]: unknown account 'fleet-us' (from {path} line 9)",
        "encryption_keys_file: required when redis_url is a real Redis (replicas must share "
        "keys); create one with `monogoto-broker new-encryption-key > FILE`",
    ]


def test_check_config_reads_path_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config, BROKER_CONFIG names the file."""
    monkeypatch.setenv("BROKER_CONFIG", str(write_text(tmp_path, THREE_MISTAKES)))
    assert main(["check-config"]) == 2
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_check_config_includes_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Environment overrides are validated too, so a bad one fails the check, naming it."""
    monkeypatch.setenv("BROKER_UPSTREAM__DIALECT", "v2")
    assert main(["check-config", "--config", str(write_text(tmp_path, VALID))]) == 2
    assert capsys.readouterr().out == (
        "upstream.dialect: must be 'legacy' or 'v1' (from BROKER_UPSTREAM__DIALECT)\n"
    )


def test_new_api_key_prints_key_and_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    """new-api-key prints the caller key, then the sha256: digest of exactly that key."""
    assert main(["new-api-key"]) == 0
    key, digest = capsys.readouterr().out.splitlines()
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_new_encryption_key_output_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """new-encryption-key prints one line that is a valid key file by itself."""
    assert main(["new-encryption-key"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert len(parse_encryption_keys(out)) == 1


def _console_script() -> str:
    beside = Path(sys.executable).parent / "monogoto-broker"
    found = str(beside) if beside.exists() else shutil.which("monogoto-broker")
    if found is None:
        pytest.fail("the monogoto-broker console script is not installed")
    return found


def test_installed_command_reports_malformed_yaml_without_traceback(tmp_path: Path) -> None:
    """The installed command turns a YAML syntax error into one line and exit code 2."""
    path = write_text(tmp_path, "accounts:\n  fleet-eu:\n    username: [ops\n")
    env = {
        name: value for name, value in os.environ.items() if not name.upper().startswith("BROKER_")
    }
    done = subprocess.run(  # noqa: S603 (our own installed command)
        [_console_script(), "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith(f"{path}: line 4, column 1: ")


def test_serve_reports_config_problems_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve validates the config first: exit 2, each problem on its own line with where it
    came from (as check-config says it), no traceback."""
    path = write_text(tmp_path, THREE_MISTAKES)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()[1:]
    assert [line.partition(f" (from {path} line ")[0] for line in lines] == [
        "serve: upstream.timeout_seconds: must be greater than 0",
        "serve: refresh.fractoin: unknown key",
        "serve: accounts.fleet-eu.password_file: cannot read /no/such/file "
        "(No such file or directory)",
    ]
    assert all(line.endswith(")") and f"(from {path} line " in line for line in lines)


def test_serve_without_config_says_how_to_give_one(capsys: pytest.CaptureFixture[str]) -> None:
    """serve with neither --config nor BROKER_CONFIG exits 2 naming both."""
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--config" in err
    assert "BROKER_CONFIG" in err


def test_serve_reads_config_path_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config, serve validates the file BROKER_CONFIG names."""
    monkeypatch.setenv("BROKER_CONFIG", str(write_text(tmp_path, THREE_MISTAKES)))
    assert main(["serve"]) == 2
    assert "refresh.fractoin: unknown key" in capsys.readouterr().err


def test_serve_refuses_memory_store_with_several_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """memory:// lives in one process, so serve refuses --workers 2 with exit 2."""
    path = write_text(tmp_path, VALID)
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "memory://" in err
    assert "--workers 1" in err


def test_dev_settings_give_the_demo_caller_both_dialects_on_the_simulator() -> None:
    """dev configures demo-legacy and demo-v1 on the simulator, for the caller it prints."""
    key, digest = new_api_key()
    settings = dev_settings("http://127.0.0.1:8091", digest, redis_url=None)
    assert settings.uses_memory_store
    accounts = settings.accounts_resolved()
    assert {name: account.dialect for name, account in accounts.items()} == {
        "demo-legacy": Dialect.LEGACY,
        "demo-v1": Dialect.V1,
    }
    assert {account.base_url for account in accounts.values()} == {"http://127.0.0.1:8091"}
    assert {account.username for account in accounts.values()} == {DEMO_USERNAME}
    caller = settings.callers["demo"]
    assert caller.key_digests() == (api_key_digest(key),)
    assert all(caller.allows(name) for name in accounts)


def test_dev_settings_with_redis_bring_their_own_encryption_key() -> None:
    """With --redis-url, dev makes an ephemeral encryption key so the broker can start."""
    _, digest = new_api_key()
    settings = dev_settings("http://127.0.0.1:8091", digest, redis_url="redis://127.0.0.1:6390/0")
    assert not settings.uses_memory_store
    assert len(settings.encryption_key_ring()) == 1
