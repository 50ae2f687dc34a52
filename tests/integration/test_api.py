"""The broker's HTTP API (docs/api.md) end to end: the app under uvicorn on a real Redis,
with the simulator over HTTP."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api import create_app, failure_log
from service.claims import fingerprint
from service.config import build_settings
from service.keys import api_key_digest, new_encryption_key
from service.logs import JsonLinesFormatter
from service.simulator.client import SimulatorControl
from tests.support import served
from tests.topologies import RedisServer

Client = httpx.AsyncClient

ENCRYPTION_KEYS = new_encryption_key()
BILLING_KEY = "mgb_billing-test-key"
OPS_KEY = "mgb_ops-test-key"
BILLING = {"Authorization": f"Bearer {BILLING_KEY}"}
OPS = {"Authorization": f"Bearer {OPS_KEY}"}
PROBLEM_JSON = "application/problem+json"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
TOKEN_KEYS = {"account", "access_token", "token_type", "expires_at", "expires_in", "customer_id"}
ACCOUNT_KEYS = {
    *("name", "dialect", "status", "expires_at", "last_refresh_at", "last_error"),
    *("credentials", "next_renewal_at", "at_risk"),
}
CONTRACT_METRICS = [
    "monogoto_broker_token_requests_total",
    "monogoto_broker_upstream_requests_total",
    "monogoto_broker_upstream_request_duration_seconds",
    "monogoto_broker_token_expiry_timestamp_seconds",
    "monogoto_broker_auth_budget_denied_total",
    "monogoto_broker_lock_wait_seconds",
    "monogoto_broker_caller_auth_failures_total",
    "monogoto_broker_auth_budget_utilisation",
    "monogoto_broker_accounts_at_risk",
]
# Callers and services must see the same problem whatever is wrong with a request: these
# would give it away if a body echoed what was sent.
MARKER = "SENT-BY-CALLER-7f3a"


def _config(redis_url: str, simulator_url: str, **accounts: Any) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "encryption_keys": ENCRYPTION_KEYS,
        "upstream": {"base_url": simulator_url, "auth_rate": {"limit": 1000}},
        "accounts": accounts,
        "callers": {
            "billing": {"api_key_sha256": api_key_digest(BILLING_KEY), "accounts": ["fleet-eu"]},
            "ops": {"api_key_sha256": api_key_digest(OPS_KEY), "accounts": ["*"]},
        },
    }


def _running(config: dict[str, Any]) -> AbstractAsyncContextManager[Client]:
    """The broker app served by uvicorn on a free port, and an HTTP client of it."""
    return served(create_app(build_settings(config)))


@pytest.fixture
def sim(simulator: SimulatorControl) -> SimulatorControl:
    """The simulator with its rate limit out of the way of tests that are not about it."""
    simulator.set(rate_limit=1000)
    return simulator


@pytest.fixture
async def client(
    sim: SimulatorControl, redis_url: str, simulator_url: str, simulator_users: dict[str, str]
) -> AsyncIterator[Client]:
    """A broker on the test's Redis with a legacy, a v1, an unused and a wrongly configured
    account."""
    config = _config(
        redis_url,
        simulator_url,
        **{
            "fleet-eu": {"username": "ops@example.com", "password": "s3cret"},
            "fleet-us": {
                "username": "fleet@example.com",
                "password": simulator_users["fleet@example.com"],
                "dialect": "v1",
            },
            "spare": {"username": "demo@monogoto.example", "password": "demo-password"},
            "locked": {"username": "ops@example.com", "password": "not-the-password"},
        },
    )
    async with _running(config) as client:
        yield client


def _assert_problem(
    response: httpx.Response, status: int, code: str, *, sent: str = MARKER
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["type"], str)
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    assert sent not in response.text
    return body


def _assert_token_body(response: httpx.Response, account: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == TOKEN_KEYS
    assert body["account"] == account
    assert body["token_type"] == "Bearer"
    assert isinstance(body["access_token"], str)
    assert ISO_UTC.fullmatch(body["expires_at"])
    assert isinstance(body["expires_in"], int)
    assert body["expires_in"] >= 0
    assert body["customer_id"] is None or isinstance(body["customer_id"], str)
    expires_at = time.mktime(time.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    expires_at -= time.timezone  # mktime reads local time; the string is UTC (no DST in UTC)
    # expires_in counts from the moment of the answer: both name the same instant.
    assert abs(expires_at - time.time() - body["expires_in"]) < 5
    return body


async def _metric(client: Client, name: str, **labels: str) -> float:
    """The value of one sample in `/metrics`, 0 if it has not been written yet."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def _served(client: Client, account: str, caller: str) -> float:
    total = 0.0
    for outcome in ("local", "shared", "fetched"):
        total += await _metric(
            client,
            "monogoto_broker_token_requests_total",
            account=account,
            caller=caller,
            outcome=outcome,
        )
    return total


async def test_token_body_headers_and_metric(client: Client) -> None:
    """A caller gets its account's token as the contract's body, uncached, and it is counted."""
    before = await _served(client, "fleet-eu", "billing")
    response = await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)
    body = _assert_token_body(response, "fleet-eu")
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "ops@example.com"
    assert body["customer_id"].startswith("cid_")
    assert await _served(client, "fleet-eu", "billing") == before + 1


async def test_v1_account_token(client: Client) -> None:
    """A v1 account's token is served the same way, for a caller allowed every account."""
    body = _assert_token_body(
        await client.get("/v1/accounts/fleet-us/token", headers=OPS), "fleet-us"
    )
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "fleet@example.com"


async def test_min_ttl_is_honoured(client: Client) -> None:
    """`min_ttl` within the token's lifetime gives a token with at least that much left."""
    response = await client.get("/v1/accounts/fleet-eu/token?min_ttl=3600", headers=BILLING)
    assert _assert_token_body(response, "fleet-eu")["expires_in"] >= 3600 - 1


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "604801", "99999999999999999999"])
async def test_invalid_min_ttl_is_400(client: Client, value: str) -> None:
    """`min_ttl` must be a whole number of seconds from 0 to 7 days."""
    response = await client.get(f"/v1/accounts/fleet-eu/token?min_ttl={value}", headers=BILLING)
    body = _assert_problem(response, 400, "invalid_request", sent=value)
    assert "min_ttl" in body["detail"]
    assert response.headers["cache-control"] == "no-store"


async def test_min_ttl_beyond_token_lifetime_is_400(client: Client) -> None:
    """Asking for more time than any token of the account lives is the caller's mistake."""
    _assert_token_body(await client.get("/v1/accounts/fleet-eu/token", headers=BILLING), "fleet-eu")
    response = await client.get("/v1/accounts/fleet-eu/token?min_ttl=604800", headers=BILLING)
    _assert_problem(response, 400, "invalid_request")


async def test_invalidate_returns_a_new_token(client: Client, sim: SimulatorControl) -> None:
    """Reporting the current token gets a different one in the same body, served from then on."""
    old = _assert_token_body(
        await client.get("/v1/accounts/fleet-eu/token", headers=BILLING), "fleet-eu"
    )
    logins = sim.calls("legacy_auth", outcome="ok", user="ops@example.com")
    response = await client.post(
        "/v1/accounts/fleet-eu/token/invalidate",
        headers=BILLING,
        json={"access_token": old["access_token"]},
    )
    new = _assert_token_body(response, "fleet-eu")
    assert new["access_token"] != old["access_token"]
    assert sim.calls("legacy_auth", outcome="ok", user="ops@example.com") == logins + 1
    again = await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)
    assert again.json()["access_token"] == new["access_token"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json " + MARKER.encode(),
        b"{}",
        b'{"access_token": ""}',
        b'{"access_token": 7}',
        b'["' + MARKER.encode() + b'"]',
        b'{"access_token": "' + MARKER.encode() + b'", "extra": 1}',
        b'{"access_token": "' + MARKER.encode() * 1000 + b'"}',
    ],
    ids=["not-json", "empty-object", "empty-token", "number", "array", "unknown-field", "too-long"],
)
async def test_malformed_invalidate_body_is_400(client: Client, body: bytes) -> None:
    """A body that is not `{"access_token": "<non-empty string>"}` is refused, never echoed."""
    response = await client.post(
        "/v1/accounts/fleet-eu/token/invalidate",
        headers=BILLING | {"Content-Type": "application/json"},
        content=body,
    )
    _assert_problem(response, 400, "invalid_request")
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing"),
        (f"Basic {OPS_KEY}", "missing"),
        ("Bearer", "missing"),
        (f"Bearer {MARKER}", "unknown"),
    ],
    ids=["no-header", "other-scheme", "no-key", "unknown-key"],
)
@pytest.mark.parametrize("path", ["/v1/accounts/fleet-eu/token", "/v1/accounts"])
async def test_missing_or_unknown_key_is_401(
    client: Client, authorization: str | None, reason: str, path: str
) -> None:
    """Without a known caller key the API answers 401 with a Bearer challenge, and counts it."""
    before = await _metric(client, "monogoto_broker_caller_auth_failures_total", reason=reason)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.get(path, headers=headers)
    _assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    after = await _metric(client, "monogoto_broker_caller_auth_failures_total", reason=reason)
    assert after == before + 1


async def test_rotated_caller_key_overlaps_then_the_old_one_is_refused(
    sim: SimulatorControl, redis_url: str, simulator_url: str
) -> None:
    """While a caller's key is rotated, its old and new key both authenticate as that caller
    (counted under its name, never a digest); once the old digest is removed, the old key is
    401 and the new one goes on working."""
    new_key = "mgb_billing-rotated-key"
    new = {"Authorization": f"Bearer {new_key}"}
    accounts = {
        "fleet-eu": {"username": "ops@example.com", "password": "s3cret"},
        "spare": {"username": "demo@monogoto.example", "password": "demo-password"},
    }
    config = _config(redis_url, simulator_url, **accounts)
    billing = config["callers"]["billing"]
    billing["api_key_sha256"] = [
        api_key_digest(BILLING_KEY),
        "sha256:" + api_key_digest(new_key),
    ]
    async with _running(config) as client:
        before = await _served(client, "fleet-eu", "billing")
        for headers in (BILLING, new, BILLING):
            response = await client.get("/v1/accounts/fleet-eu/token", headers=headers)
            _assert_token_body(response, "fleet-eu")
            listed = await client.get("/v1/accounts", headers=headers)
            assert [account["name"] for account in listed.json()["accounts"]] == ["fleet-eu"]
        assert await _served(client, "fleet-eu", "billing") == before + 3
        metrics = (await client.get("/metrics")).text
        for key in (BILLING_KEY, new_key):
            assert api_key_digest(key)[:12] not in metrics
            assert key not in metrics

    billing["api_key_sha256"] = [api_key_digest(new_key)]
    async with _running(config) as client:
        unknown = await _metric(
            client, "monogoto_broker_caller_auth_failures_total", reason="unknown"
        )
        before = await _served(client, "fleet-eu", "billing")
        refused = await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)
        _assert_problem(refused, 401, "unauthenticated")
        after = await _metric(
            client, "monogoto_broker_caller_auth_failures_total", reason="unknown"
        )
        assert after == unknown + 1
        response = await client.get("/v1/accounts/fleet-eu/token", headers=new)
        _assert_token_body(response, "fleet-eu")
        assert await _served(client, "fleet-eu", "billing") == before + 1


async def test_unknown_account_looks_like_a_forbidden_one(client: Client) -> None:
    """A caller cannot tell an account it may not use from one that does not exist."""
    forbidden = await client.get("/v1/accounts/spare/token", headers=BILLING)
    unknown = await client.get(f"/v1/accounts/{MARKER}/token", headers=BILLING)
    _assert_problem(forbidden, 403, "forbidden")
    _assert_problem(unknown, 403, "forbidden")
    assert unknown.json() == forbidden.json()
    assert dict(unknown.headers) == dict(forbidden.headers)
    invalidate = await client.post(
        f"/v1/accounts/{MARKER}/token/invalidate", headers=BILLING, json={"access_token": "x"}
    )
    assert invalidate.json() == forbidden.json()


async def test_denials_are_counted_without_unknown_names(client: Client) -> None:
    """A refused configured account counts as `denied`; an unknown name never becomes a label."""
    labels = {"account": "spare", "caller": "billing", "outcome": "denied"}
    before = await _metric(client, "monogoto_broker_token_requests_total", **labels)
    forbidden = await _metric(
        client, "monogoto_broker_caller_auth_failures_total", reason="forbidden"
    )
    await client.get("/v1/accounts/spare/token", headers=BILLING)
    await client.get(f"/v1/accounts/{MARKER}/token", headers=OPS)
    assert await _metric(client, "monogoto_broker_token_requests_total", **labels) == before + 1
    after = await _metric(client, "monogoto_broker_caller_auth_failures_total", reason="forbidden")
    assert after == forbidden + 2
    assert MARKER not in (await client.get("/metrics")).text


async def test_rejected_credentials_are_503_with_retry_after(client: Client) -> None:
    """An account whose password Monogoto rejects is `credentials_rejected`, with Retry-After."""
    before = await _metric(
        client,
        "monogoto_broker_token_requests_total",
        account="locked",
        caller="ops",
        outcome="error",
    )
    response = await client.get("/v1/accounts/locked/token", headers=OPS)
    body = _assert_problem(response, 503, "credentials_rejected", sent="not-the-password")
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["cache-control"] == "no-store"
    assert "not-the-password" not in body["detail"]
    after = await _metric(
        client,
        "monogoto_broker_token_requests_total",
        account="locked",
        caller="ops",
        outcome="error",
    )
    assert after == before + 1


async def test_upstream_rate_limit_is_503_with_retry_after(
    sim: SimulatorControl, redis_url: str, simulator_url: str
) -> None:
    """When Monogoto rate limits and there is no token, callers get `upstream_unavailable`."""
    sim.fault("status", endpoint="v1_token", status=429, retry_after=120, count=10)
    v1 = {"username": "fleet@example.com", "password": "fleet-password", "dialect": "v1"}
    async with _running(_config(redis_url, simulator_url, **{"fleet-eu": v1})) as client:
        response = await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)
        _assert_problem(response, 503, "upstream_unavailable")
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["cache-control"] == "no-store"


async def test_accounts_are_filtered_per_caller(client: Client) -> None:
    """`/v1/accounts` lists only the caller's accounts, with their state and never a token."""
    token = (await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)).json()
    response = await client.get("/v1/accounts", headers=BILLING)
    assert response.status_code == 200
    assert [account["name"] for account in response.json()["accounts"]] == ["fleet-eu"]
    everything = await client.get("/v1/accounts", headers=OPS)
    accounts = everything.json()["accounts"]
    assert sorted(account["name"] for account in accounts) == [
        "fleet-eu",
        "fleet-us",
        "locked",
        "spare",
    ]
    for account in accounts:
        assert set(account) == ACCOUNT_KEYS
        assert account["dialect"] in ("legacy", "v1")
        assert account["status"] in (
            "ok",
            "refreshing",
            "failing",
            "credentials_rejected",
            "no_token",
        )
        for field in ("expires_at", "last_refresh_at", "next_renewal_at"):
            assert account[field] is None or ISO_UTC.fullmatch(account[field])
        assert isinstance(account["at_risk"], bool)
    fleet_eu = next(account for account in accounts if account["name"] == "fleet-eu")
    assert fleet_eu["status"] == "ok"
    assert fleet_eu["expires_at"] == token["expires_at"]
    # Planned at start-up (no token yet: a login at once), or since with the token.
    assert fleet_eu["next_renewal_at"] is not None
    assert token["access_token"] not in response.text + everything.text


async def test_operations_endpoints_need_no_key(client: Client, redis_server: RedisServer) -> None:
    """Liveness, readiness and metrics answer without a caller key; readiness describes the
    store it reached."""
    health = await client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    for check in ready.json()["checks"]:
        assert set(check) == {"name", "ok", "detail"}
        assert check["ok"] is True
    assert ready.json()["store"] == {
        "topology": "standalone",
        "masters": [f"127.0.0.1:{redis_server.port}"],
        "nodes": 1,
    }
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")


async def test_metrics_names_and_route_templates(client: Client) -> None:
    """`/metrics` has every metric docs/api.md lists and labels HTTP requests by route template."""
    await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)
    text = (await client.get("/metrics")).text
    names = {family.name for family in text_string_to_metric_families(text)}
    for name in CONTRACT_METRICS:
        assert name.removesuffix("_total") in names, name
    assert 'path="/v1/accounts/{account}/token"' in text
    assert "/v1/accounts/fleet-eu/token" not in text


async def test_openapi_lists_the_api(client: Client) -> None:
    """The OpenAPI document has the API operations, the caller-key scheme, problems and every
    field of an account."""
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    operations = {
        operation["operationId"]: (path, method)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    assert operations == {
        "getToken": ("/v1/accounts/{account}/token", "get"),
        "invalidateToken": ("/v1/accounts/{account}/token/invalidate", "post"),
        "listAccounts": ("/v1/accounts", "get"),
        "verifyAccountCredentials": ("/v1/accounts/{account}/verify", "post"),
        "resetAccount": ("/v1/accounts/{account}/reset", "post"),
    }
    scheme = next(iter(schema["components"]["securitySchemes"].values()))
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    get_token = schema["paths"]["/v1/accounts/{account}/token"]["get"]
    for status in ("401", "403", "503"):
        assert PROBLEM_JSON in get_token["responses"][status]["content"]
    account = schema["components"]["schemas"]["AccountBody"]
    assert set(account["required"]) == ACCOUNT_KEYS
    assert account["properties"]["at_risk"]["type"] == "boolean"
    assert schema["info"]["version"]


async def test_unknown_route_and_method_are_problems(client: Client) -> None:
    """Unknown paths are 404 `not_found`, wrong methods 405 `method_not_allowed`."""
    _assert_problem(await client.get(f"/v2/{MARKER}", headers=OPS), 404, "not_found")
    response = await client.delete("/v1/accounts", headers=OPS)
    _assert_problem(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


async def test_token_appears_only_in_token_bodies(client: Client) -> None:
    """No answer other than a token body ever contains the token."""
    token = (await client.get("/v1/accounts/fleet-eu/token", headers=OPS)).json()["access_token"]
    answers = [
        await client.get("/v1/accounts", headers=OPS),
        await client.get("/v1/accounts/spare/token", headers=BILLING),
        await client.get("/v1/accounts/fleet-eu/token?min_ttl=-1", headers=OPS),
        await client.get("/v1/accounts/locked/token", headers=OPS),
        await client.post(
            "/v1/accounts/fleet-eu/token/invalidate", headers=OPS, json={"access_token": ""}
        ),
        await client.get(
            "/v1/accounts/fleet-eu/token", headers={"Authorization": f"Bearer {token}"}
        ),
        await client.get("/healthz"),
        await client.get("/readyz"),
        await client.get("/metrics"),
        await client.get("/schema/openapi.json"),
    ]
    for answer in answers:
        assert token not in answer.text, answer.request.url
        assert token not in str(answer.headers)


@pytest.fixture
def api_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Log records of the API at DEBUG and above."""
    with caplog.at_level(logging.DEBUG, logger="service"):
        yield caplog


def _token_records(logs: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in logs.records if getattr(record, "event", None) == event]


async def test_one_log_line_per_token_request(
    client: Client, api_logs: pytest.LogCaptureFixture
) -> None:
    """Each token request logs one line with caller, outcome and fingerprint, never the token:
    at DEBUG for a GET answered from the local cache, at INFO for every other answer."""
    api_logs.clear()
    first = (await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)).json()
    second = (await client.get("/v1/accounts/fleet-eu/token", headers=BILLING)).json()
    gets = _token_records(api_logs, "token.get")
    assert len(gets) == 2
    for record, token in zip(gets, [first, second], strict=True):
        fields = record.__dict__
        assert (fields["account"], fields["caller"]) == ("fleet-eu", "billing")
        assert fields["outcome"] in ("local", "shared", "fetched")
        assert record.levelno == (logging.DEBUG if fields["outcome"] == "local" else logging.INFO)
        assert fields["token_fingerprint"] == fingerprint(token["access_token"])
        assert isinstance(fields["expires_in"], int)
    # The first answer put the token in this process's cache: the second came from there.
    assert (gets[1].outcome, gets[1].levelno) == ("local", logging.DEBUG)  # type: ignore[attr-defined]

    replaced = await client.post(
        "/v1/accounts/fleet-eu/token/invalidate",
        headers=BILLING,
        json={"access_token": first["access_token"]},
    )
    assert replaced.status_code == 200
    [invalidate] = _token_records(api_logs, "token.invalidate")
    assert invalidate.levelno == logging.INFO
    assert invalidate.outcome in ("shared", "fetched")  # type: ignore[attr-defined]

    formatter = JsonLinesFormatter()
    for record in api_logs.records:
        text = formatter.format(record)
        for token in (first, second, replaced.json()):
            assert token["access_token"] not in text


async def test_failed_token_request_logs_a_warning(
    client: Client, api_logs: pytest.LogCaptureFixture
) -> None:
    """A token request the broker cannot serve logs one WARNING line with the problem code."""
    api_logs.clear()
    response = await client.get("/v1/accounts/locked/token", headers=OPS)
    assert response.status_code == 503
    [record] = _token_records(api_logs, "token.get")
    assert record.levelno == logging.WARNING
    assert (record.outcome, record.code) == ("error", "credentials_rejected")  # type: ignore[attr-defined]


async def test_repeated_failures_log_one_warning_per_interval(
    client: Client, api_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of failing requests for one account logs one WARNING and the rest at DEBUG; the
    next WARNING, once the interval has passed, says how many failures it left out."""
    now = [1000.0]
    monkeypatch.setattr(failure_log, "monotonic", lambda: now[0])
    api_logs.clear()
    burst = await asyncio.gather(
        *(client.get("/v1/accounts/locked/token", headers=OPS) for _ in range(20))
    )
    assert {response.status_code for response in burst} == {503}
    records = _token_records(api_logs, "token.get")
    assert len(records) == 20
    [warning] = [record for record in records if record.levelno == logging.WARNING]
    assert (warning.code, warning.suppressed) == ("credentials_rejected", 0)  # type: ignore[attr-defined]
    assert sum(1 for record in records if record.levelno == logging.DEBUG) == 19

    now[0] += failure_log.WARNING_INTERVAL_SECONDS
    api_logs.clear()
    await client.get("/v1/accounts/locked/token", headers=OPS)
    [record] = _token_records(api_logs, "token.get")
    assert (record.levelno, record.suppressed) == (logging.WARNING, 19)  # type: ignore[attr-defined]
    assert '"suppressed":19' in JsonLinesFormatter().format(record)


async def test_http_metrics_count_refusals_under_their_real_status(client: Client) -> None:
    """A 401 shows in the HTTP request metrics as 401 on the route template, not as a 200."""
    labels = {"path": "/v1/accounts", "status_code": "401"}
    before = await _metric(client, "monogoto_broker_http_requests_total", **labels)
    response = await client.get("/v1/accounts")
    assert response.status_code == 401
    after = await _metric(client, "monogoto_broker_http_requests_total", **labels)
    assert after == before + 1


async def test_http_metrics_time_requests_by_route_template_only(client: Client) -> None:
    """Token requests are counted and timed under the route template, never the account's
    path; a path that matches no route leaves no series at all."""
    template = {"method": "GET", "path": "/v1/accounts/{account}/token", "status_code": "200"}
    duration = "monogoto_broker_http_request_duration_seconds_count"
    before = await _metric(client, duration, **template)
    requests_before = await _metric(client, "monogoto_broker_http_requests_total", **template)
    for _ in range(3):
        assert (await client.get("/v1/accounts/fleet-eu/token", headers=OPS)).status_code == 200
    assert (await client.get("/v1/no-such-route", headers=OPS)).status_code == 404

    assert await _metric(client, duration, **template) == before + 3
    assert (
        await _metric(client, "monogoto_broker_http_requests_total", **template)
        == requests_before + 3
    )
    text = (await client.get("/metrics")).text
    assert "/v1/accounts/fleet-eu/token" not in text
    assert "no-such-route" not in text
