"""`MonogotoAuth` and `MonogotoRequestsAuth` on the simulator's protected endpoint (`GET /things`,
legacy dialect) with tokens from the session broker: a revoked token is reported once and the
request retried once; a 401 that persists is returned, not looped."""

from __future__ import annotations

import httpx
import pytest

from clients.python.tests.broker.support import Broker, Simulator, Stack, user_of
from monogoto_broker_client import MonogotoAuth, MonogotoRequestsAuth, TokenSource


def test_revoked_token_is_reported_once_and_the_request_retried(
    stack: Stack, sim: Simulator, broker: Broker
) -> None:
    """Monogoto revokes the token: 401, one invalidate, the retry with the replacement gets
    200. The caller sees only the 200 (the 401 is in its history)."""
    account = "auth-sync"
    sent: list[str] = []
    source = TokenSource(stack.broker_url, account, api_key=stack.keys["main"])
    monogoto = httpx.Client(
        base_url=stack.simulator_url,
        auth=MonogotoAuth(source),
        event_hooks={"request": [lambda request: sent.append(request.url.path)]},
    )
    with source, monogoto:
        assert monogoto.get("/things").status_code == 200
        old = source.token()
        sim.revoke(user_of(account))
        before = broker.requests(account, "main")
        answer = monogoto.get("/things")
        assert answer.status_code == 200, answer.text
        assert [earlier.status_code for earlier in answer.history] == [401]
        assert sent == ["/things"] * 3
        assert broker.requests(account, "main") - before == 1
        assert source.token() != old
        assert monogoto.get("/things").status_code == 200
    assert sim.calls("legacy_things", outcome="token_revoked") == 1
    assert sim.calls("legacy_things", outcome="ok") == 3


async def test_async_revoked_token_is_reported_once_and_the_request_retried(
    stack: Stack, sim: Simulator, broker: Broker
) -> None:
    """The same with an `httpx.AsyncClient`."""
    account = "auth-async"
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request.url.path)

    source = TokenSource(stack.broker_url, account, api_key=stack.keys["main"])
    monogoto = httpx.AsyncClient(
        base_url=stack.simulator_url, auth=MonogotoAuth(source), event_hooks={"request": [record]}
    )
    async with source, monogoto:
        assert (await monogoto.get("/things")).status_code == 200
        old = await source.atoken()
        sim.revoke(user_of(account))
        before = broker.requests(account, "main")
        answer = await monogoto.get("/things")
        assert answer.status_code == 200, answer.text
        assert [earlier.status_code for earlier in answer.history] == [401]
        assert sent == ["/things"] * 3
        assert broker.requests(account, "main") - before == 1
        assert await source.atoken() != old
    assert sim.calls("legacy_things", outcome="token_revoked") == 1
    assert sim.calls("legacy_things", outcome="ok") == 2


def test_401_that_persists_is_returned_after_one_retry(
    stack: Stack, sim: Simulator, broker: Broker
) -> None:
    """The replacement is revoked too (just before the retry reaches Monogoto): the second 401
    is returned, after exactly two requests and one report. Asked again within the minute, the
    broker will not renew the token again (429): the 401 is returned after one request."""
    account = "auth-persistent"
    user = user_of(account)
    sent: list[str] = []

    def before_sending(request: httpx.Request) -> None:
        sent.append(request.url.path)
        if len(sent) == 2:
            sim.revoke(user)  # the replacement, which this request carries, is revoked

    source = TokenSource(stack.broker_url, account, api_key=stack.keys["main"])
    monogoto = httpx.Client(
        base_url=stack.simulator_url,
        auth=MonogotoAuth(source),
        event_hooks={"request": [before_sending]},
    )
    with source, monogoto:
        source.token()
        sim.revoke(user)
        before = broker.requests(account, "main")
        answer = monogoto.get("/things")
        assert answer.status_code == 401
        assert answer.text == "Access denied: access token has been revoked"
        assert [earlier.status_code for earlier in answer.history] == [401]
        assert sent == ["/things"] * 2
        assert (
            sim.calls("legacy_things") == sim.calls("legacy_things", outcome="token_revoked") == 2
        )
        assert broker.requests(account, "main") - before == 1

        again = monogoto.get("/things")
        assert again.status_code == 401
        assert again.history == []
        assert sent == ["/things"] * 3
        assert broker.requests(account, "main", outcome="error") >= 1
        assert broker.requests(account, "main") - before == 2


def test_token_of_the_other_dialect_gets_two_401s_and_no_loop(
    stack: Stack, sim: Simulator, broker: Broker
) -> None:
    """A legacy token sent to the v1 endpoint is refused whatever it is: two requests, one
    report, and the 401 in Monogoto's v1 shape comes back to the caller."""
    account = "auth-dialect"
    source = TokenSource(stack.broker_url, account, api_key=stack.keys["main"])
    monogoto = httpx.Client(base_url=stack.simulator_url, auth=MonogotoAuth(source))
    with source, monogoto:
        source.token()
        before = broker.requests(account, "main")
        answer = monogoto.get("/v1/things")
    assert answer.status_code == 401
    assert answer.json()["message"] == "Invalid access token (issued for the legacy API)"
    assert len(answer.history) == 1
    assert sim.calls("v1_things") == sim.calls("v1_things", outcome="token_invalid") == 2
    assert broker.requests(account, "main") - before == 1


def test_requests_auth_reports_a_revoked_token_and_retries_once(
    stack: Stack, sim: Simulator, broker: Broker
) -> None:
    """`MonogotoRequestsAuth` on a `requests.Session`: the same report and single retry."""
    requests = pytest.importorskip("requests")
    account = "auth-requests"
    source = TokenSource(stack.broker_url, account, api_key=stack.keys["main"])
    with source, requests.Session() as session:
        session.auth = MonogotoRequestsAuth(source)
        assert session.get(f"{stack.simulator_url}/things", timeout=10).status_code == 200
        old = source.token()
        sim.revoke(user_of(account))
        before = broker.requests(account, "main")
        answer = session.get(f"{stack.simulator_url}/things", timeout=10)
        assert answer.status_code == 200, answer.text
        assert [earlier.status_code for earlier in answer.history] == [401]
        assert broker.requests(account, "main") - before == 1
        assert source.token() != old

        # Revoked again at once: the broker will not renew the token again within the minute
        # (429), so the 401 comes back without a retry.
        sim.revoke(user_of(account))
        answer = session.get(f"{stack.simulator_url}/things", timeout=10)
        assert answer.status_code == 401
    assert sim.calls("legacy_things", outcome="token_revoked") == 2
    assert sim.calls("legacy_things", outcome="ok") == 2
