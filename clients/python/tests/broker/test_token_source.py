"""`TokenSource` against the session broker: shared fetches, the cache's lifetime, invalidation,
and credential files that change on disk."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from clients.python.tests.broker.support import SHORT, Broker, Stack, write_key
from monogoto_broker_client import TokenSource

THREADS = 20
CALLS_PER_THREAD = 50
TASKS = 200
LOGGER = "monogoto_broker_client"


def test_1000_calls_from_20_threads_make_one_broker_request(stack: Stack, broker: Broker) -> None:
    """Threads that find the cache empty at the same moment share one fetch."""
    before = broker.requests("fleet", "main")
    start = threading.Barrier(THREADS)
    tokens: list[str] = []
    failures: list[BaseException] = []

    def call(source: TokenSource) -> None:
        try:
            start.wait()
            tokens.extend(source.token() for _ in range(CALLS_PER_THREAD))
        except BaseException as error:  # reported by the test below
            failures.append(error)

    with TokenSource(stack.broker_url, "fleet", api_key=stack.keys["main"]) as source:
        threads = [threading.Thread(target=call, args=(source,)) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    assert not failures
    assert len(tokens) == THREADS * CALLS_PER_THREAD == 1000
    assert len(set(tokens)) == 1
    assert broker.requests("fleet", "main") - before == 1


async def test_200_concurrent_tasks_make_one_broker_request(stack: Stack, broker: Broker) -> None:
    """Tasks of one event loop that find the cache empty share one fetch."""
    before = broker.requests("fleet", "main")
    async with TokenSource(stack.broker_url, "fleet", api_key=stack.keys["main"]) as source:
        tokens = await asyncio.gather(*(source.atoken() for _ in range(TASKS)))
        again = await source.atoken()

    assert len(tokens) == TASKS
    assert set(tokens) == {again}
    assert broker.requests("fleet", "main") - before == 1


def _handed_out_for(caplog: pytest.LogCaptureFixture) -> tuple[float, float]:
    """`expires_in` and the cache time the client logged for the one token it fetched."""
    records = [record for record in caplog.records if hasattr(record, "cache_seconds")]
    assert len(records) == 1, [record.getMessage() for record in records]
    expires_in = float(getattr(records[0], "expires_in"))  # noqa: B009
    seconds = float(getattr(records[0], "cache_seconds"))  # noqa: B009
    caplog.clear()
    return expires_in, seconds


def _wait_for_young_token(stack: Stack, at_least: int) -> None:
    """Wait until the broker's token of the short account has `at_least` seconds left (asking
    as caller `limited`, whose requests the tests do not count)."""
    url = f"{stack.broker_url}/v1/accounts/{SHORT}/token"
    headers = {"Authorization": f"Bearer {stack.keys['limited']}"}
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=10) as http:
        while True:
            answer = http.get(url, headers=headers)
            assert answer.status_code == 200, answer.text
            if answer.json()["expires_in"] >= at_least:
                return
            assert time.monotonic() < deadline, "the broker never renewed the short account"
            time.sleep(0.1)


def _check_refetch_point(
    source: TokenSource,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    rule: Callable[[float], float],
) -> float:
    """Fetch a token, check the cache time the client chose by `rule` (expires_in -> seconds);
    ask every 100 ms until just before that time has passed (no broker request), then once
    just after (exactly one). Returns the `expires_in` of the first token."""
    before = broker.requests(SHORT, "main")
    sent = time.monotonic()
    token = source.token()
    received = time.monotonic()
    expires_in, seconds = _handed_out_for(caplog)
    assert seconds == pytest.approx(rule(expires_in))
    assert broker.requests(SHORT, "main") - before == 1

    # The client's deadline lies between `sent + seconds` and `received + seconds`; the last
    # call starts well before it, should the machine be slow.
    last_call = sent + seconds - 0.5
    calls = 0
    while time.monotonic() < last_call:
        assert source.token() == token
        calls += 1
        time.sleep(max(0.0, min(0.1, last_call - time.monotonic())))
    assert calls >= 1
    assert broker.requests(SHORT, "main") - before == 1, "asked the broker before the deadline"

    time.sleep(max(0.0, received + seconds + 0.05 - time.monotonic()))
    source.token()
    assert broker.requests(SHORT, "main") - before == 2, "no broker request after the deadline"
    _handed_out_for(caplog)
    source.token()
    assert broker.requests(SHORT, "main") - before == 2
    return expires_in


def test_token_is_refetched_once_expires_in_minus_margin_passes_not_before(
    stack: Stack, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A token received with `expires_in` seconds left is handed out for `expires_in - margin`
    seconds (the short account's tokens live 8 s; the broker renews them after 6)."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    margin = 3.0
    _wait_for_young_token(stack, 6)
    with TokenSource(stack.broker_url, SHORT, api_key=stack.keys["main"], margin=margin) as source:
        expires_in = _check_refetch_point(
            source, broker, caplog, lambda expires_in: expires_in - margin
        )
    assert expires_in > margin


def test_margin_not_below_expires_in_caches_for_half_of_it(
    stack: Stack, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """With the default margin (60 s) and 8-second tokens, a token is handed out for half the
    time it had left when it arrived."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _wait_for_young_token(stack, 6)
    with TokenSource(stack.broker_url, SHORT, api_key=stack.keys["main"]) as source:
        expires_in = _check_refetch_point(source, broker, caplog, lambda expires_in: expires_in / 2)
    assert expires_in <= source.margin


def test_invalidate_from_20_threads_makes_one_report_and_returns_the_replacement(
    stack: Stack, broker: Broker
) -> None:
    """Threads reporting the same token share one invalidate; the replacement is cached, and
    reporting the old token again costs no broker request."""
    source = TokenSource(stack.broker_url, "invalidate", api_key=stack.keys["main"])
    with source:
        old = source.token()
        before = broker.requests("invalidate", "main")
        fetched = broker.requests("invalidate", "main", outcome="fetched")
        start = threading.Barrier(THREADS)
        replacements: list[str] = []

        def report() -> None:
            start.wait()
            replacements.append(source.invalidate(old))

        threads = [threading.Thread(target=report) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(replacements) == THREADS
        (new,) = set(replacements)
        assert new != old
        # One report, for which the broker obtained a new token from Monogoto.
        assert broker.requests("invalidate", "main", outcome="fetched") - fetched == 1
        assert broker.requests("invalidate", "main") - before == 1

        assert source.token() == new
        assert source.invalidate(old) == new
        assert broker.requests("invalidate", "main") - before == 1


async def test_ainvalidate_from_50_tasks_makes_one_report(stack: Stack, broker: Broker) -> None:
    """The same for tasks."""
    async with TokenSource(stack.broker_url, "ainvalidate", api_key=stack.keys["main"]) as source:
        old = await source.atoken()
        before = broker.requests("ainvalidate", "main")
        replacements = await asyncio.gather(*(source.ainvalidate(old) for _ in range(50)))
        (new,) = set(replacements)
        assert new != old
        assert broker.requests("ainvalidate", "main") - before == 1
        assert await source.atoken() == new
        assert await source.ainvalidate(old) == new
        assert broker.requests("ainvalidate", "main") - before == 1


def _swap_secret_volume(volume: Path, key: str, version: int) -> None:
    """Update `volume` the way the kubelet updates a Secret volume: write the files into a new
    directory, then swap the `..data` symlink to it (`key` -> `..data/key` stays put)."""
    directory = volume / f"..v{version}"
    directory.mkdir()
    (directory / "key").write_text(f"{key}\n", encoding="utf-8")
    link = volume / "..data_tmp"
    link.symlink_to(directory.name)
    link.replace(volume / "..data")
    if not (volume / "key").is_symlink():
        (volume / "key").symlink_to("..data/key")


def test_key_file_rotated_on_disk_is_used_for_the_next_request(
    stack: Stack, broker: Broker, tmp_path: Path
) -> None:
    """The key file is read again when it changes: a Secret volume's symlink swap, then a
    plain atomic rewrite. Each broker request is counted for the caller whose key it sent."""
    volume = tmp_path / "secret"
    volume.mkdir()
    _swap_secret_volume(volume, stack.keys["rot-a"], 1)
    key_file = volume / "key"
    count = {caller: broker.requests("rotation", caller) for caller in ("rot-a", "rot-b")}

    def counted() -> dict[str, int]:
        return {caller: broker.requests("rotation", caller) - count[caller] for caller in count}

    with TokenSource(stack.broker_url, "rotation", api_key_file=key_file) as source:
        first = source.token()
        assert counted() == {"rot-a": 1, "rot-b": 0}

        _swap_secret_volume(volume, stack.keys["rot-b"], 2)
        second = source.invalidate(first)  # a broker request, with the new key
        assert counted() == {"rot-a": 1, "rot-b": 1}

        write_key(key_file, stack.keys["rot-a"])  # replaces the symlink with a plain file
        third = source.invalidate(second)
        assert counted() == {"rot-a": 2, "rot-b": 1}
        assert source.token() == third
    assert len({first, second, third}) == 3


def test_service_account_token_file_is_sent_as_a_bearer(
    stack: Stack, broker: Broker, tmp_path: Path
) -> None:
    """A service-account token file works like a key file (here holding a caller key: the
    broker's own tests cover real ServiceAccount tokens), whitespace around it stripped."""
    token_file = tmp_path / "token"
    token_file.write_text(f"  {stack.keys['main']}\n\n", encoding="utf-8")
    os.chmod(token_file, 0o400)
    before = broker.requests("fleet", "main")
    with TokenSource(
        stack.broker_url, "fleet", service_account_token_file=str(token_file)
    ) as source:
        assert source.token()
    assert broker.requests("fleet", "main") - before == 1
