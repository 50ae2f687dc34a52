"""How `TokenSource` fails against the session broker: refusals at once, 503s waited out within
`max_wait`, and never a token or a key in a message, a log line or a repr."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
import pytest

from clients.python.tests.broker.support import (
    Broker,
    Simulator,
    Stack,
    new_api_key,
    user_of,
    write_key,
)
from monogoto_broker_client import (
    BrokerError,
    BrokerRefusedError,
    BrokerUnavailableError,
    MonogotoAuth,
    TokenSource,
)

LOGGER = "monogoto_broker_client"
# Far more failed logins than the broker makes while a test runs.
FAULTS = 10_000


def test_unknown_key_raises_refused_401_at_once(stack: Stack, broker: Broker) -> None:
    """An unknown caller key: one request, then BrokerRefusedError saying what is wrong."""
    unknown, _ = new_api_key()
    before = broker.refused("unknown")
    started = time.monotonic()
    source = TokenSource(stack.broker_url, "fleet", api_key=unknown)
    with source, pytest.raises(BrokerRefusedError) as refused:
        source.token()
    assert time.monotonic() - started < 2
    assert broker.refused("unknown") - before == 1
    error = refused.value
    assert (error.status, error.code, error.retry_after) == (401, "unauthenticated", None)
    assert "caller key or service-account token is missing or unknown" in str(error)
    assert "api_key=<hidden>" in str(error)
    assert unknown not in f"{error} {error!r} {error.detail}"


def test_unknown_key_in_a_file_names_the_file(stack: Stack, broker: Broker, tmp_path: Path) -> None:
    """The 401's message names the key file (never its content)."""
    unknown, _ = new_api_key()
    key_file = tmp_path / "broker-key"
    write_key(key_file, unknown)
    before = broker.refused("unknown")
    source = TokenSource(stack.broker_url, "fleet", api_key_file=key_file)
    with source, pytest.raises(BrokerRefusedError) as refused:
        source.token()
    assert broker.refused("unknown") - before == 1
    assert refused.value.status == 401
    assert str(key_file) in str(refused.value)
    assert unknown not in str(refused.value)


def test_account_the_caller_may_not_use_raises_refused_403(stack: Stack, broker: Broker) -> None:
    """A known caller asking for an account outside its list, or for no account at all."""
    before = broker.requests("fleet", "limited", outcome="denied")
    forbidden = broker.refused("forbidden")
    for account in ("fleet", "no-such-account"):
        source = TokenSource(stack.broker_url, account, api_key=stack.keys["limited"])
        with source, pytest.raises(BrokerRefusedError) as refused:
            source.token()
        assert (refused.value.status, refused.value.code) == (403, "forbidden")
        assert f"this caller may not use account {account!r}" in str(refused.value)
    assert broker.requests("fleet", "limited", outcome="denied") - before == 1
    assert broker.refused("forbidden") - forbidden == 2


def test_wrong_route_and_second_forced_renewal_are_refused(stack: Stack, broker: Broker) -> None:
    """404 (a broker_url with a wrong path) and 429 (reporting the fresh replacement within the
    minute) are refused at once; a 429 carries its Retry-After."""
    wrong = TokenSource(f"{stack.broker_url}/broker", "refused", api_key=stack.keys["main"])
    with wrong, pytest.raises(BrokerRefusedError) as missing:
        wrong.token()
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert "is broker_url" in str(missing.value)

    with TokenSource(stack.broker_url, "refused", api_key=stack.keys["main"]) as source:
        first = source.token()
        second = source.invalidate(first)
        before = broker.requests("refused", "main")
        with pytest.raises(BrokerRefusedError) as limited:
            source.invalidate(second)
        assert broker.requests("refused", "main") - before == 1
        error = limited.value
        assert (error.status, error.code) == (429, "renewal_rate_limited")
        assert error.retry_after is not None
        assert 0 < error.retry_after <= 60
        assert source.token() == second  # the broker still hands out the current token


def _lose_token(stack: Stack, sim: Simulator, account: str, broker: Broker) -> None:
    """Make the broker drop `account`'s token and fail every login: report the token while
    Monogoto's logins fail with 503. The report gets a 503 at once (max_wait 0)."""
    with TokenSource(stack.broker_url, account, api_key=stack.keys["main"], max_wait=0) as source:
        token = source.token()
        sim.fault("status", endpoint="legacy_auth", status=503, count=FAULTS)
        before = broker.requests(account, "main")
        with pytest.raises(BrokerUnavailableError) as unavailable:
            source.invalidate(token)
    assert broker.requests(account, "main") - before == 1
    error = unavailable.value
    assert (error.status, error.code) == (503, "upstream_unavailable")
    assert error.retry_after is not None
    assert "gave up after" in str(error)
    assert token not in f"{error} {error!r}"


def _waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the client logged before asking again after a 503."""
    return [
        float(getattr(record, "retry_after"))  # noqa: B009
        for record in caplog.records
        if record.name == LOGGER and hasattr(record, "retry_after")
    ]


def test_503_is_waited_out_within_max_wait_then_raised(
    stack: Stack, sim: Simulator, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """While the broker has no token, each 503's Retry-After is waited only while the total
    stays within max_wait; then BrokerUnavailableError with the broker's code."""
    _lose_token(stack, sim, "unavailable", broker)
    caplog.set_level(logging.INFO, logger=LOGGER)
    # The broker's Retry-After is at most 5 s here: at least one wait fits, not every one.
    max_wait = 7.0
    before = broker.requests("unavailable", "main")
    source = TokenSource(
        stack.broker_url, "unavailable", api_key=stack.keys["main"], max_wait=max_wait
    )
    started = time.monotonic()
    with source, pytest.raises(BrokerUnavailableError) as unavailable:
        source.token()
    elapsed = time.monotonic() - started

    waits = _waits(caplog)
    assert waits
    assert broker.requests("unavailable", "main") - before == len(waits) + 1
    assert sum(waits) <= elapsed < max_wait + 1  # a retry starts within max_wait
    error = unavailable.value
    assert (error.status, error.code) == (503, "upstream_unavailable")
    assert error.retry_after is not None
    assert elapsed + error.retry_after > max_wait  # the next wait would have passed it
    assert f"max_wait {max_wait:g} s" in str(error)


def test_503_is_waited_out_until_the_broker_has_a_token(
    stack: Stack, sim: Simulator, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller with enough max_wait gets the token once Monogoto is back, having waited each
    503's Retry-After."""
    _lose_token(stack, sim, "recovers", broker)
    caplog.set_level(logging.INFO, logger=LOGGER)
    errors = broker.requests("recovers", "main", outcome="error")
    before = broker.requests("recovers", "main")
    outcome: list[str | BaseException] = []
    source = TokenSource(stack.broker_url, "recovers", api_key=stack.keys["main"], max_wait=30)

    def fetch() -> None:
        try:
            outcome.append(source.token())
        except BaseException as error:  # checked below
            outcome.append(error)

    started = time.monotonic()
    caller = threading.Thread(target=fetch)
    caller.start()
    # Monogoto comes back once the caller has been told 503.
    while broker.requests("recovers", "main", outcome="error") == errors:
        assert caller.is_alive(), outcome
        time.sleep(0.05)
    sim.clear_faults()
    caller.join(40)
    elapsed = time.monotonic() - started
    source.close()

    assert len(outcome) == 1
    token = outcome[0]
    assert isinstance(token, str), token
    waits = _waits(caplog)
    assert waits
    assert elapsed >= sum(waits)
    assert broker.requests("recovers", "main") - before == len(waits) + 1
    with httpx.Client(base_url=stack.simulator_url) as monogoto:
        assert monogoto.get("/things", headers={"Authorization": f"Bearer {token}"}).is_success


def test_no_token_or_key_in_reprs_messages_or_logs(
    stack: Stack, sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens and keys never appear in a repr, str, exception or log record (every logger, at
    DEBUG), through fetches, a 401 from Monogoto with its report, and broker errors."""
    caplog.set_level(logging.DEBUG)
    secrets = [*stack.keys.values()]
    seen: list[str] = []
    source = TokenSource(stack.broker_url, "secrets", api_key=stack.keys["main"], max_wait=0)
    auth = MonogotoAuth(source)
    with httpx.Client(base_url=stack.simulator_url, auth=auth) as monogoto:
        assert monogoto.get("/things").status_code == 200
        secrets.append(source.token())
        sim.revoke(user_of("secrets"))
        answer = monogoto.get("/things")
        assert answer.status_code == 200
        secrets.append(source.token())
    seen += [repr(source), str(source), repr(auth), str(auth)]

    unknown, _ = new_api_key()
    key_file = tmp_path / "key"
    write_key(key_file, unknown)
    secrets.append(unknown)
    failing = [
        TokenSource(stack.broker_url, "secrets", api_key=unknown),
        TokenSource(stack.broker_url, "secrets", api_key_file=key_file),
        TokenSource(stack.broker_url, "fleet", api_key=stack.keys["limited"]),
        TokenSource("http://127.0.0.1:9", "secrets", api_key=unknown, max_wait=0),
    ]
    for client in failing:
        with client, pytest.raises(BrokerError) as failed:
            client.token()
        error = failed.value
        seen += [repr(client), str(error), repr(error), error.detail, repr(error.__cause__)]
    with source, pytest.raises(BrokerRefusedError) as limited:
        source.invalidate(source.token())  # a second forced renewal within the minute
    assert limited.value.status == 429
    seen += [str(limited.value), repr(limited.value)]

    seen += [caplog.text]
    seen += [repr(vars(record)) for record in caplog.records]
    assert any("fingerprint" in record.getMessage() for record in caplog.records)
    assert len(set(secrets)) == len(secrets)
    for secret in secrets:
        for text in seen:
            assert secret not in text
