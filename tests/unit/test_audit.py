"""The audit log's configuration and writer: keys, destinations, rotation, failures."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY

from service.audit import (
    AuditLine,
    AuditLog,
    AuditOutcome,
    AuditUnavailableError,
    FileSink,
    audit_key,
    open_audit_log,
)
from service.config import ConfigError, build_settings, check_config
from tests.config_files import write

KEY = "k" * 32
PASSWORD = "pw-Secret-0451"
KEY_LINE = "k1:" + base64.b64encode(bytes(range(32))).decode()
OTHER_KEY_LINE = "k2:" + base64.b64encode(bytes(range(1, 33))).decode()


def config(**overrides: Any) -> dict[str, Any]:
    """A minimal valid configuration, with top-level keys replaced by `overrides`."""
    return {
        "redis_url": "memory://",
        "accounts": {"fleet-eu": {"username": "ops@example.com", "password": PASSWORD}},
        **overrides,
    }


def check(tmp_path: Path, data: dict[str, Any]) -> list[str]:
    """What `check-config` reports for `data` written to a file (named without its folder)."""
    with pytest.raises(ConfigError) as caught:
        check_config(write(tmp_path, data))
    return [text.replace(f"{tmp_path}/", "") for text in caught.value.report]


def line(
    audit: AuditLog,
    outcome: AuditOutcome = AuditOutcome.ISSUED,
    *,
    request_id: str | None = None,
    credential: str = "sha256:1a2b3c4d",
) -> AuditLine:
    """A line of a token handed to caller `billing` (with a new request id unless given)."""
    return audit.line(
        event="token.get",
        outcome=outcome,
        status=200,
        request_id=audit.new_request_id() if request_id is None else request_id,
        caller="billing",
        auth="api_key",
        credential=credential,
        account="fleet-eu",
        source="local",
        token_hmac=audit.fingerprint("a-token"),
    )


def failures() -> float:
    """The audit_write_failures_total counter."""
    return REGISTRY.get_sample_value("monogoto_broker_audit_write_failures_total") or 0.0


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an audit file."""
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()]


# --- configuration ------------------------------------------------------------------------


def test_audit_defaults_to_stdout_and_fails_open() -> None:
    """Without an `audit` section the log goes to standard output and never stops tokens."""
    audit = build_settings(config()).audit
    assert (audit.path, audit.fail_closed, audit.hmac_key) == ("-", False, None)
    assert audit.to_stdout


def test_audit_settings_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit.*` is set in the file, its key from a file, overridden by BROKER_AUDIT__*."""
    key_file = tmp_path / "audit-hmac"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    monkeypatch.setenv("BROKER_AUDIT__FAIL_CLOSED", "true")
    monkeypatch.setenv("BROKER_AUDIT__PATH", "/var/log/broker/audit.log")
    settings = build_settings(config(audit={"path": "-", "hmac_key_file": str(key_file)}))
    assert settings.audit.fail_closed is True
    assert settings.audit.path == "/var/log/broker/audit.log"
    assert audit_key(settings) == KEY.encode()


def test_audit_problems_are_reported_with_their_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config names every audit problem and where it came from, never the key."""
    monkeypatch.setenv("BROKER_AUDIT__HMAC_KEY", "short-Secret")
    report = check(
        tmp_path,
        config(audit={"path": "", "fail_closed": "maybe", "hmac_key_file": "/nonexistent/k"}),
    )
    assert report == [
        "audit.path: must not be empty (from config.yaml line 7)",
        "audit.fail_closed: must be true or false (from config.yaml line 8)",
        "audit.hmac_key: must be at least 32 characters; create one with "
        "`openssl rand -hex 32` (from BROKER_AUDIT__HMAC_KEY)",
    ]
    assert not any("short-Secret" in text for text in report)


def test_audit_key_and_its_file_are_exclusive(tmp_path: Path) -> None:
    """Setting both the key and its file is a problem, as for every secret."""
    key_file = tmp_path / "audit-hmac"
    key_file.write_text(KEY, encoding="utf-8")
    report = check(tmp_path, config(audit={"hmac_key": KEY, "hmac_key_file": str(key_file)}))
    assert report == [
        "audit.hmac_key_file: set either hmac_key or hmac_key_file, not both "
        "(from config.yaml line 8)"
    ]


def test_audit_key_defaults_to_one_derived_from_the_first_encryption_key() -> None:
    """Replicas sharing a key ring fingerprint alike without an audit key of their own; the
    derived key is not the encryption key, and follows the ring's first key."""
    ring = build_settings(config(encryption_keys=f"{KEY_LINE}\n{OTHER_KEY_LINE}"))
    same = build_settings(config(encryption_keys=f"{KEY_LINE},{OTHER_KEY_LINE}"))
    other = build_settings(config(encryption_keys=OTHER_KEY_LINE))
    derived = audit_key(ring)
    assert derived is not None
    assert len(derived) == 32
    assert derived == audit_key(same)
    assert derived != audit_key(other)
    assert derived != bytes(range(32))
    assert audit_key(build_settings(config())) is None


# --- writer -------------------------------------------------------------------------------


def test_a_line_has_the_documented_fields(tmp_path: Path) -> None:
    """One JSON object per line, with the fields operations.md lists, flushed on close."""
    path = tmp_path / "audit.log"
    audit = open_audit_log(build_settings(config(audit={"path": str(path)})))
    audit.record(line(audit))
    audit.close()
    [written] = read_lines(path)
    assert written["audit"] is True
    assert written["logger"] == "monogoto_broker.audit"
    assert (written["event"], written["outcome"], written["status"]) == ("token.get", "issued", 200)
    assert written["token_hmac"].startswith("hmac-sha256:")
    assert len(written["token_hmac"]) == len("hmac-sha256:") + 16
    assert written["pid"] == os.getpid()
    assert written["time"].endswith("Z")
    assert set(written) == set(AuditLine.__struct_fields__)


def test_lines_are_batched_until_flushed(tmp_path: Path) -> None:
    """Without fail_closed, lines recorded while the event loop runs wait for the flush."""
    path = tmp_path / "audit.log"
    audit = AuditLog(FileSink(path), KEY.encode(), fail_closed=False)

    async def record_two() -> None:
        audit.record(line(audit))
        audit.record(line(audit))
        assert not path.exists() or path.read_text() == ""
        audit.flush()

    asyncio.run(record_two())
    audit.close()
    assert len(read_lines(path)) == 2


def test_closing_writes_the_lines_still_batched(tmp_path: Path) -> None:
    """A graceful stop (the lifespan closes the log) writes the lines waiting in the batch."""
    path = tmp_path / "audit.log"
    audit = AuditLog(FileSink(path), KEY.encode(), fail_closed=False)

    async def record_then_stop() -> None:
        for _ in range(3):
            audit.record(line(audit))
        assert not path.exists() or path.read_text() == ""
        audit.close()

    asyncio.run(record_then_stop())
    assert len(read_lines(path)) == 3


def test_a_file_rotated_away_is_reopened(tmp_path: Path) -> None:
    """After the file is renamed (rotated), the next line goes to a new file at the path."""
    path = tmp_path / "audit.log"
    audit = AuditLog(FileSink(path), KEY.encode(), fail_closed=True)
    audit.record(line(audit))
    path.rename(tmp_path / "audit.log.1")
    audit.record(line(audit))
    audit.record(line(audit))
    audit.close()
    assert len(read_lines(tmp_path / "audit.log.1")) == 1
    assert len(read_lines(path)) == 2


def test_a_file_deleted_is_recreated(tmp_path: Path) -> None:
    """A file removed under the writer is created again by the next line."""
    path = tmp_path / "audit.log"
    audit = AuditLog(FileSink(path), KEY.encode(), fail_closed=True)
    audit.record(line(audit))
    path.unlink()
    audit.record(line(audit))
    audit.close()
    assert len(read_lines(path)) == 1


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    """A path below a regular file: no file can be created there, not even by root."""
    blocker = tmp_path / "logs"
    blocker.write_text("not a directory", encoding="utf-8")
    return blocker / "audit.log"


def make_writable(path: Path) -> None:
    """Turn the blocker of an `unwritable` path into the directory it should have been."""
    path.parent.unlink()
    path.parent.mkdir()


def test_unwritable_path_fail_closed_refuses_tokens_and_readiness(unwritable: Path) -> None:
    """With fail_closed, a line that cannot be written stops the token (503 with
    Retry-After), readiness says why, and both recover once the file can be written."""
    audit = open_audit_log(
        build_settings(config(audit={"path": str(unwritable), "fail_closed": True}))
    )
    ok, detail = audit.check()
    assert not ok
    assert f"cannot write to {unwritable} (Not a directory)" in detail
    before = failures()
    with pytest.raises(AuditUnavailableError) as refused:
        audit.record(line(audit), handing_out=True)
    assert (refused.value.status, refused.value.code) == (503, "audit_unavailable")
    assert refused.value.retry_after
    assert failures() == before + 1
    # A denial is answered as it is, whether or not its line is written.
    audit.record(line(audit, AuditOutcome.DENIED))
    make_writable(unwritable)
    assert audit.check() == (True, f"writing to {unwritable}")
    audit.record(line(audit), handing_out=True)
    audit.close()
    assert len(read_lines(unwritable)) == 1


def test_unwritable_path_fail_open_counts_lost_lines(unwritable: Path) -> None:
    """Without fail_closed, lines that cannot be written are counted and lost, tokens are
    served and readiness stays true, saying so."""
    audit = open_audit_log(build_settings(config(audit={"path": str(unwritable)})))
    before = failures()
    audit.record(line(audit), handing_out=True)
    audit.record(line(audit), handing_out=True)
    audit.flush()
    assert failures() == before + 2
    ok, detail = audit.check()
    assert ok
    assert "Not a directory" in detail
    assert "lines are being lost" in detail
    audit.close()


def test_a_batch_is_written_in_whole_lines_of_at_most_4_kib(tmp_path: Path) -> None:
    """Many lines go out in writes of at most 4 KiB, each ending at a line's end, so lines
    of several processes sharing a pipe or file never interleave."""
    writes: list[bytes] = []

    class Recording:
        name = "recording"

        def write(self, data: bytes) -> None:
            writes.append(data)

        def reopen(self) -> None:
            pass

        def close(self) -> None:
            pass

    audit = AuditLog(Recording(), KEY.encode(), fail_closed=False)
    for _ in range(100):
        audit.record(line(audit))
    audit.close()
    assert len(writes) > 1
    assert all(len(data) <= 4096 and data.endswith(b"\n") for data in writes)
    assert sum(data.count(b"\n") for data in writes) == 100


def test_a_repeated_line_is_the_line_with_its_own_time_and_request_id(tmp_path: Path) -> None:
    """Lines written from the cached encoding of a repeated line (cache hits) are the full
    line with each request's own time and id, whatever the other fields hold."""
    path = tmp_path / "audit.log"
    audit = AuditLog(FileSink(path), KEY.encode(), fail_closed=True)
    first = line(audit, request_id="built-with", credential='CN=a "quoted", O=\\ unusual')
    for request_id in ("r-1", "7f1c2a9e-3b1d/4c55+9a0e=2f6b:1c9d.8e21_x"):
        audit.record_repeated("same", lambda: first, request_id)
    audit.close()
    lines = read_lines(path)
    assert [written["request_id"] for written in lines] == [
        "r-1",
        "7f1c2a9e-3b1d/4c55+9a0e=2f6b:1c9d.8e21_x",
    ]
    expected = json.loads(msgspec.json.encode(first))
    for written in lines:
        assert written["time"].endswith("Z")
        assert {**written, "time": None, "request_id": None} == {
            **expected,
            "time": None,
            "request_id": None,
        }
