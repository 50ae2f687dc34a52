"""JSON-lines logging: field names, extras, uvicorn's loggers and idempotence."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from service.logs import configure_logging

_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def restore_logging(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Put the root and uvicorn loggers back as they were (after capsys is in place)."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {
        name: (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
        for name in names
        for logger in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.usefixtures("restore_logging")
def test_record_with_extras_is_one_json_object_per_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record with `extra` fields becomes one JSON line with the house fields and the extras."""
    configure_logging("INFO")
    logging.getLogger("service.api.tokens").info(
        "token issued", extra={"account": "fleet-eu", "caller": "billing", "expires_in": 42}
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "token issued"
    assert record["level"] == "INFO"
    assert record["logger"] == "service.api.tokens"
    assert _ISO_UTC.fullmatch(str(record["time"]))
    assert (record["account"], record["caller"], record["expires_in"]) == (
        "fleet-eu",
        "billing",
        42,
    )


@pytest.mark.usefixtures("restore_logging")
def test_configuring_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Calling configure_logging again still gives exactly one line per record."""
    configure_logging("INFO")
    configure_logging("INFO")
    logging.getLogger("service").warning("once")
    assert [record["message"] for record in _json_lines(capsys.readouterr().err)] == ["once"]


@pytest.mark.usefixtures("restore_logging")
def test_level_filters_records(capsys: pytest.CaptureFixture[str]) -> None:
    """Records below the configured level are not written."""
    configure_logging("warning")
    logging.getLogger("service").info("quiet")
    logging.getLogger("service").error("loud")
    assert [record["message"] for record in _json_lines(capsys.readouterr().err)] == ["loud"]


@pytest.mark.usefixtures("restore_logging")
def test_uvicorn_logs_become_json_and_access_log_is_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Uvicorn's server messages come out as JSON; its access log writes nothing."""
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.addHandler(logging.StreamHandler())  # as uvicorn's own config would
    uvicorn_error.propagate = False
    configure_logging("INFO")
    uvicorn_error.info("Started server process")
    access = logging.getLogger("uvicorn.access")
    assert not access.hasHandlers()
    access.info('127.0.0.1 - "GET /v1/accounts/x/token?min_ttl=1 HTTP/1.1" 200')
    err = capsys.readouterr().err
    assert [record["message"] for record in _json_lines(err)] == ["Started server process"]
    assert "min_ttl" not in err
