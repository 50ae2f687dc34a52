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
from service.keys import parse_encryption_keys

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


@pytest.fixture(autouse=True)
def _no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate every test from BROKER_* variables of the surrounding shell."""
    for name in list(os.environ):
        if name.upper().startswith("BROKER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_accepts_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid config exits 0 and says so, with what it found."""
    path = write(tmp_path, VALID)
    assert main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK (1 account, 1 caller)\n"


def test_check_config_prints_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken config exits 2 and lists each problem on its own line."""
    path = write(tmp_path, THREE_MISTAKES)
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        "upstream.timeout_seconds: must be greater than 0",
        "refresh.fractoin: unknown key",
        "accounts.fleet-eu.password_file: cannot read /no/such/file (No such file or directory)",
    ]


def test_check_config_reads_path_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config, BROKER_CONFIG names the file."""
    monkeypatch.setenv("BROKER_CONFIG", str(write(tmp_path, THREE_MISTAKES)))
    assert main(["check-config"]) == 2
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_check_config_includes_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Environment overrides are validated too, so a bad one fails the check."""
    monkeypatch.setenv("BROKER_UPSTREAM__DIALECT", "v2")
    assert main(["check-config", "--config", str(write(tmp_path, VALID))]) == 2
    assert capsys.readouterr().out == "upstream.dialect: must be 'legacy' or 'v1'\n"


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
    path = write(tmp_path, "accounts:\n  fleet-eu:\n    username: [ops\n")
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
