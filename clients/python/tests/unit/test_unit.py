"""The client on its own, without a broker: the cache rule, Retry-After, argument checks,
credential files, an unreachable broker, and the public names.

Only the package, httpx and pytest are needed (no event-loop plugin), so these also run from
the built wheel on the oldest supported Python (clients/python/check-wheel).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import monogoto_broker_client
from monogoto_broker_client import (
    BrokerError,
    BrokerRefusedError,
    BrokerUnavailableError,
    MonogotoAuth,
    MonogotoRequestsAuth,
    TokenSource,
)
from monogoto_broker_client._source import cache_seconds, fingerprint, parse_retry_after

KEY = "mgb_unit-test-key-0123456789"


def closed_port() -> int:
    """A port of 127.0.0.1 nobody listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("expires_in", "margin", "seconds"),
    [
        (14400, 60, 14340),
        (100, 60, 40),
        (61, 60, 1),
        (60, 60, 30),  # not below expires_in: half of it
        (10, 60, 5),
        (0, 60, 0),
        (30, 0, 30),
    ],
)
def test_cache_seconds(expires_in: float, margin: float, seconds: float) -> None:
    assert cache_seconds(expires_in, margin) == seconds


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (None, None),
        ("", None),
        ("-1", None),
        ("inf", None),
        ("nan", None),
        ("soon", None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_parse_retry_after_http_date() -> None:
    later = datetime.now(timezone.utc) + timedelta(seconds=30)
    seconds = parse_retry_after(format_datetime(later, usegmt=True))
    assert seconds is not None
    assert 28 <= seconds <= 30
    assert parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0


def test_fingerprint_is_the_brokers() -> None:
    assert fingerprint("abc") == hashlib.sha256(b"abc").hexdigest()[:12]


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"api_key": KEY, "api_key_file": "/run/key"},
        {"api_key_file": "/run/key", "service_account_token_file": "/run/token"},
    ],
)
def test_exactly_one_credential(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        TokenSource("http://broker:8080", "fleet-eu", **arguments)


@pytest.mark.parametrize(
    ("broker_url", "arguments", "problem"),
    [
        ("broker:8080", {}, "http:// or https://"),
        ("ftp://broker", {}, "http:// or https://"),
        ("http://", {}, "http:// or https://"),
        ("http://user:secret@broker", {}, "user name or password"),
        ("http://broker/?x=1", {}, "query"),
        ("http://broker", {"api_key": "  "}, "api_key is empty"),
        ("http://broker", {"api_key": "two words"}, "spaces or control characters"),
        ("http://broker", {"margin": -1}, "margin"),
        ("http://broker", {"margin": float("nan")}, "margin"),
        ("http://broker", {"max_wait": float("inf")}, "max_wait"),
        ("http://broker", {"timeout": 0}, "timeout"),
    ],
)
def test_bad_arguments_are_refused(
    broker_url: str, arguments: dict[str, Any], problem: str
) -> None:
    arguments = {"api_key": KEY, **arguments}
    with pytest.raises(ValueError, match=problem):
        TokenSource(broker_url, "fleet-eu", **arguments)


def test_empty_account_is_refused() -> None:
    with pytest.raises(ValueError, match="account"):
        TokenSource("http://broker", "", api_key=KEY)


def test_repr_hides_the_key_and_shows_a_file() -> None:
    source = TokenSource("http://broker:8080/", "fleet-eu", api_key=f" {KEY}\n")
    assert KEY not in repr(source)
    assert repr(source) == (
        "TokenSource(broker_url='http://broker:8080', account='fleet-eu', api_key=<hidden>, "
        "margin=60, timeout=15, max_wait=30)"
    )
    assert KEY not in repr(MonogotoAuth(source))
    assert KEY not in repr(MonogotoRequestsAuth(source))
    from_file = TokenSource("http://broker", "a", api_key_file=Path("/run/secrets/key"))
    assert "api_key_file='/run/secrets/key'" in repr(from_file)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        ("\n  \n", "it is empty"),
        ("first second\n", "spaces or control characters"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_unusable_key_file_raises_before_any_request(
    tmp_path: Path, content: str | bytes | None, reason: str
) -> None:
    key_file = tmp_path / "key"
    if isinstance(content, str):
        key_file.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        key_file.write_bytes(content)
    # Nobody listens there: the error must come from the file, not from the network.
    source = TokenSource(f"http://127.0.0.1:{closed_port()}", "a", api_key_file=key_file)
    with source, pytest.raises(BrokerError) as failed:
        source.token()
    error = failed.value
    assert type(error) is BrokerError
    assert (error.status, error.code) == (None, "credentials_unreadable")
    assert reason in str(error)
    assert str(key_file) in str(error)
    assert "first" not in str(error)


def test_unreachable_broker_raises_unavailable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    key_file = tmp_path / "key"
    key_file.write_text(KEY, encoding="utf-8")
    with TokenSource(url, "fleet-eu", api_key_file=key_file, max_wait=0) as source:
        with pytest.raises(BrokerUnavailableError) as failed:
            source.token()
        with pytest.raises(BrokerUnavailableError):
            source.invalidate("a-token")
    error = failed.value
    assert (error.status, error.code, error.retry_after) == (None, "unreachable", None)
    assert "ConnectError" in error.detail
    assert url in str(error)
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert KEY not in f"{error} {error!r} {error.__cause__!r}"


def test_unreachable_broker_is_asked_again_within_max_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Waits of 0.5 s, 1 s, 2 s...: with max_wait 1.2 s, one wait, then the error."""
    caplog.set_level(logging.INFO, logger="monogoto_broker_client")
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    source = TokenSource(url, "fleet-eu", api_key=KEY, max_wait=1.2)
    with source, pytest.raises(BrokerUnavailableError) as failed:
        source.token()
    elapsed = time.monotonic() - started
    waits = [getattr(record, "retry_after", None) for record in caplog.records]
    assert waits == [0.5]
    assert 0.5 <= elapsed < 1.2
    assert failed.value.code == "unreachable"
    # The message says how long the client waited (measured, so 0.5 s or a little more).
    said = re.search(r"gave up after (\d+\.\d) s \(max_wait 1\.2 s\)", str(failed.value))
    assert said is not None, str(failed.value)
    assert 0.5 <= float(said.group(1)) <= round(elapsed, 1)


def test_unreachable_broker_raises_unavailable_async() -> None:
    async def fetch() -> None:
        url = f"http://127.0.0.1:{closed_port()}"
        async with TokenSource(url, "fleet-eu", api_key=KEY, max_wait=0) as source:
            await source.atoken()

    # Not asyncio.run(), which would replace (and on 3.9 leak) the loop an async test plugin
    # may have left current.
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(BrokerUnavailableError) as failed:
            loop.run_until_complete(fetch())
    finally:
        loop.close()
    assert failed.value.code == "unreachable"


def test_public_names() -> None:
    assert set(monogoto_broker_client.__all__) == {
        "BrokerError",
        "BrokerRefusedError",
        "BrokerUnavailableError",
        "MonogotoAuth",
        "MonogotoRequestsAuth",
        "TokenSource",
        "__version__",
    }
    assert monogoto_broker_client.__version__[0].isdigit()
    assert issubclass(BrokerRefusedError, BrokerError)
    assert issubclass(BrokerUnavailableError, BrokerError)
    assert issubclass(BrokerError, Exception)
    assert issubclass(MonogotoAuth, httpx.Auth)
    assert MonogotoAuth.requires_request_body
    error = BrokerRefusedError("refused", status=403, code="forbidden", detail="no")
    assert (error.status, error.code, error.detail, error.retry_after) == (
        403,
        "forbidden",
        "no",
        None,
    )
    assert str(error) == "refused"
