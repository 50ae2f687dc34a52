"""A broker restart: cached tokens keep being handed out, and a caller that needs the broker
meanwhile waits (within max_wait) until it is back."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
import pytest

from clients.python.tests.broker.support import (
    Stack,
    free_port,
    new_api_key,
    start_broker,
    user_of,
    write_yaml,
)
from monogoto_broker_client import TokenSource

ACCOUNT = "restart"


def test_broker_restart_is_waited_out(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker of its own (on the session's simulator) is stopped and started again on the
    same port. Meanwhile a source with a cached token goes on handing it out without the
    broker, and a source without one retries the refused connections until the broker answers.
    """
    caplog.set_level(logging.INFO, logger="monogoto_broker_client")
    key, digest = new_api_key()
    config = write_yaml(
        tmp_path / "broker.yaml",
        {
            "redis_url": "memory://",
            "upstream": {"dialect": "legacy", "base_url": stack.simulator_url},
            "accounts": {ACCOUNT: {"username": user_of(ACCOUNT), "password": f"pw-{ACCOUNT}"}},
            "callers": {"restarter": {"api_key_sha256": digest, "accounts": ["*"]}},
        },
    )
    port = free_port()
    broker, url = start_broker(config, tmp_path / "broker-1.log", port)
    cached = TokenSource(url, ACCOUNT, api_key=key)
    waiting = TokenSource(url, ACCOUNT, api_key=key, max_wait=60)
    outcome: list[str | BaseException] = []

    def fetch() -> None:
        try:
            outcome.append(waiting.token())
        except BaseException as error:  # checked below
            outcome.append(error)

    try:
        first = cached.token()
        broker.stop()
        assert cached.token() == first  # from the cache: the broker is not asked

        caller = threading.Thread(target=fetch)
        caller.start()
        deadline = time.monotonic() + 10
        while not any(hasattr(record, "retry_after") for record in caplog.records):
            assert time.monotonic() < deadline, "the caller never waited"
            time.sleep(0.05)
        broker, _ = start_broker(config, tmp_path / "broker-2.log", port)
        caller.join(60)
    finally:
        broker.stop()
        cached.close()
        waiting.close()

    assert len(outcome) == 1
    token = outcome[0]
    assert isinstance(token, str), token
    waits = [record for record in caplog.records if hasattr(record, "retry_after")]
    assert {getattr(record, "code") for record in waits} == {"unreachable"}  # noqa: B009
    with httpx.Client(base_url=stack.simulator_url) as monogoto:
        assert monogoto.get("/things", headers={"Authorization": f"Bearer {token}"}).is_success
