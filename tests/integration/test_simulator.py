"""The simulator, driven over real HTTP, answers as docs/simulator.md says, control API included."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from service.simulator import DEMO_PASSWORD, DEMO_USERNAME
from service.simulator.client import SimulatorControl, SimulatorControlError
from service.simulator.process import SimulatorProcess

PATHS = {"legacy_auth": "/Auth", "v1_token": "/v1/auth/token", "v1_refresh": "/v1/auth/refresh"}
LEGACY_FIELDS = {
    "token",
    "refreshToken",
    "CustomerId",
    "UserId",
    "UserName",
    "Role",
    "Realm",
    "OrganizationId",
    "UserProfile",
}
V1_FIELDS = {"token_type", "access_token", "refresh_token"}


@pytest.fixture
def http(simulator: SimulatorControl) -> Iterator[httpx.Client]:
    """A plain HTTP client of the freshly reset simulator."""
    with httpx.Client(base_url=simulator.base_url, timeout=10) as client:
        yield client


def legacy(
    http: httpx.Client, user: str = DEMO_USERNAME, password: str = DEMO_PASSWORD
) -> httpx.Response:
    return http.post("/Auth", json={"UserName": user, "Password": password})


def v1(
    http: httpx.Client, user: str = DEMO_USERNAME, password: str = DEMO_PASSWORD
) -> httpx.Response:
    return http.post("/v1/auth/token", json={"username": user, "password": password})


def refresh(http: httpx.Client, token: str) -> httpx.Response:
    return http.post("/v1/auth/refresh", json={"refresh_token": token})


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def until_admitted(call: Callable[[], httpx.Response], timeout: float = 10) -> httpx.Response:
    """Repeat `call` while it is rate limited, up to a deadline."""
    deadline = time.monotonic() + timeout
    while (response := call()).status_code == 429:
        assert time.monotonic() < deadline, "the rate-limit window never slid"
        time.sleep(0.05)
    return response


# --- legacy dialect ---------------------------------------------------------------------


def test_legacy_login_has_the_documented_shape(http: httpx.Client) -> None:
    """Legacy /Auth answers the account data with a signed JWT carrying the CustomerId."""
    response = legacy(http)
    assert response.status_code == 200
    body = response.json()
    assert body.keys() >= LEGACY_FIELDS
    assert body["UserName"] == DEMO_USERNAME
    assert body["Role"] == "Admin"
    assert body["CustomerId"].startswith("cid_")
    assert {"FirstName", "LastName", "Email", "Phone", "Language", "TimeZone"} <= set(
        body["UserProfile"]
    )
    token = claims(body["token"])
    assert token["sub"] == DEMO_USERNAME
    assert token["iss"] == "monogoto-simulator"
    assert token["CustomerId"] == body["CustomerId"]
    assert token["exp"] - token["iat"] == 4 * 3600
    assert body["refreshToken"]
    assert body["refreshToken"].count(".") != 2  # opaque, not a JWT


def test_legacy_ids_are_stable_per_user(
    http: httpx.Client, simulator_users: dict[str, str]
) -> None:
    """The same user always gets the same CustomerId; different users get different ones."""
    first, again = legacy(http).json(), legacy(http).json()
    other = legacy(http, "ops@example.com", simulator_users["ops@example.com"]).json()
    assert first["CustomerId"] == again["CustomerId"]
    assert first["token"] != again["token"]
    assert other["CustomerId"] != first["CustomerId"]


@pytest.mark.parametrize(
    ("user", "password"), [(DEMO_USERNAME, "wrong"), ("nobody@example.com", DEMO_PASSWORD)]
)
def test_legacy_bad_credentials_are_404_access_denied(
    http: httpx.Client, simulator: SimulatorControl, user: str, password: str
) -> None:
    """Wrong password or unknown user: 404 with the plain-text body `Access denied`."""
    response = legacy(http, user, password)
    assert response.status_code == 404
    assert response.text == "Access denied"
    assert response.headers["content-type"].startswith("text/plain")
    assert simulator.calls("legacy_auth", "rejected", user=user) == 1


MALFORMED = [b"not json", b"[]", b'{"UserName": "a"}', b'{"UserName": 1, "Password": "x"}']


@pytest.mark.parametrize("body", MALFORMED)
def test_legacy_malformed_body_is_400(
    http: httpx.Client, simulator: SimulatorControl, body: bytes
) -> None:
    """A body that is not a JSON object with string UserName and Password gets 400."""
    response = http.post("/Auth", content=body)
    assert response.status_code == 400
    assert response.json()["message"]
    assert simulator.calls("legacy_auth", "malformed") == 1


# --- v1 dialect -------------------------------------------------------------------------


def test_v1_token_returns_a_bearer_pair_with_contract_lifetimes(http: httpx.Client) -> None:
    """v1 login gives an access JWT valid 4 h and a refresh JWT valid 24 h."""
    response = v1(http)
    assert response.status_code == 200
    body = response.json()
    assert body.keys() == V1_FIELDS
    assert body["token_type"] == "Bearer"
    access, refresh_claims = claims(body["access_token"]), claims(body["refresh_token"])
    assert access["exp"] - access["iat"] == 4 * 3600
    assert refresh_claims["exp"] - refresh_claims["iat"] == 24 * 3600
    assert access["sub"] == refresh_claims["sub"] == DEMO_USERNAME
    assert access["jti"] != refresh_claims["jti"]
    assert abs(access["iat"] - time.time()) < 300


def test_token_lifetimes_follow_settings(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Lifetimes set at runtime apply to tokens issued afterwards, in both dialects."""
    simulator.set(token_lifetime_seconds=30, refresh_lifetime_seconds=90)
    pair = v1(http).json()
    legacy_token = claims(legacy(http).json()["token"])
    access, refresh_claims = claims(pair["access_token"]), claims(pair["refresh_token"])
    assert access["exp"] - access["iat"] == 30
    assert legacy_token["exp"] - legacy_token["iat"] == 30
    assert refresh_claims["exp"] - refresh_claims["iat"] == 90


def test_clock_skew_shifts_token_times(http: httpx.Client, simulator: SimulatorControl) -> None:
    """A clock skew moves iat/exp as if Monogoto's clock were off by that much."""
    simulator.set(clock_skew_seconds=7200)
    access = claims(v1(http).json()["access_token"])
    assert access["iat"] > time.time() + 3600


@pytest.mark.parametrize(
    ("user", "password"), [(DEMO_USERNAME, "wrong"), ("nobody@example.com", DEMO_PASSWORD)]
)
def test_v1_bad_credentials_are_401(
    http: httpx.Client, simulator: SimulatorControl, user: str, password: str
) -> None:
    """v1 login with bad credentials gets a 401 JSON error."""
    response = v1(http, user, password)
    assert response.status_code == 401
    assert response.json()["message"]
    assert simulator.calls("v1_token", "rejected", user=user) == 1


@pytest.mark.parametrize("path", ["/v1/auth/token", "/v1/auth/refresh"])
@pytest.mark.parametrize("body", [b"", b"{", b'"x"', b'{"username": "a"}', b'{"refresh_token": 5}'])
def test_v1_malformed_body_is_400(http: httpx.Client, path: str, body: bytes) -> None:
    """v1 endpoints answer 400 to bodies without the expected string fields."""
    response = http.post(path, content=body)
    assert response.status_code == 400
    assert response.json()["message"]


def test_refresh_rotates_the_pair(http: httpx.Client, simulator: SimulatorControl) -> None:
    """A refresh gives a new pair, whose refresh token works in turn."""
    first = v1(http).json()
    second = refresh(http, first["refresh_token"])
    assert second.status_code == 200
    pair = second.json()
    assert pair.keys() == V1_FIELDS
    assert pair["refresh_token"] != first["refresh_token"]
    assert claims(pair["access_token"])["sub"] == DEMO_USERNAME
    assert refresh(http, pair["refresh_token"]).status_code == 200
    assert simulator.calls("v1_refresh", "ok", user=DEMO_USERNAME) == 2


def test_reused_refresh_token_is_401(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Refresh tokens are single-use: the second use gets 401 and counts as refresh_reused."""
    token = v1(http).json()["refresh_token"]
    assert refresh(http, token).status_code == 200
    reused = refresh(http, token)
    assert reused.status_code == 401
    assert reused.json()["message"]
    assert simulator.calls("v1_refresh", "refresh_reused", user=DEMO_USERNAME) == 1


def test_unknown_refresh_tokens_are_401_invalid(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """Garbage, a foreign JWT or an access token is no refresh token: 401 refresh_invalid."""
    pair = v1(http).json()
    foreign = jwt.encode(
        {"sub": DEMO_USERNAME, "jti": "x", "exp": 2**40}, "other-secret-32-bytes-long-enough"
    )
    for token in ("garbage", foreign, pair["access_token"]):
        assert refresh(http, token).status_code == 401
    assert simulator.calls("v1_refresh", "refresh_invalid", user="-") == 2
    assert simulator.calls("v1_refresh", "refresh_invalid", user=DEMO_USERNAME) == 1


def test_expired_refresh_token_is_401_invalid(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A refresh token past its exp (on the simulator's clock) is refused as invalid."""
    token = v1(http).json()["refresh_token"]
    simulator.set(clock_skew_seconds=2 * 24 * 3600)
    assert refresh(http, token).status_code == 401
    assert simulator.calls("v1_refresh", "refresh_invalid", user=DEMO_USERNAME) == 1


def test_reset_keeps_issued_tokens(http: httpx.Client, simulator: SimulatorControl) -> None:
    """A reset clears counters but a refresh token issued before it still works."""
    token = v1(http).json()["refresh_token"]
    simulator.reset()
    assert refresh(http, token).status_code == 200
    assert simulator.stats()["totals"] == {"v1_refresh": {"ok": 1}}


# --- users ------------------------------------------------------------------------------


def test_every_user_logs_in_through_both_dialects(
    http: httpx.Client, simulator_users: dict[str, str]
) -> None:
    """Each user of the users file logs in via /Auth and /v1/auth/token with its own password."""
    for user, password in simulator_users.items():
        assert legacy(http, user, password).json()["UserName"] == user
        assert claims(v1(http, user, password).json()["access_token"])["sub"] == user
    other_password = simulator_users["ops@example.com"]
    assert legacy(http, "fleet@example.com", other_password).status_code == 404


def test_without_users_file_serves_the_demo_user_and_cli_settings(
    start_simulator: Callable[..., SimulatorProcess],
) -> None:
    """Without --users only the demo user exists; CLI flags become the startup settings."""
    process = start_simulator("--token-lifetime", "120", "--rate-limit", "7", "--rate-period", "30")
    with httpx.Client(base_url=process.url, timeout=10) as client:
        response = v1(client)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "7"
        access = claims(response.json()["access_token"])
        assert access["exp"] - access["iat"] == 120
        assert legacy(client).status_code == 200
        assert legacy(client, "ops@example.com", "s3cret").status_code == 404
    with SimulatorControl(process.url) as control:
        settings = control.settings()
    assert settings["rate_period_seconds"] == 30
    assert settings["refresh_lifetime_seconds"] == 24 * 3600
    process.stop()


def test_demo_start_prints_a_working_curl(start_simulator: Callable[..., SimulatorProcess]) -> None:
    """The printed curl command, run as printed, logs the demo user in."""
    process = start_simulator()
    lines = process.log_path.read_text().splitlines()
    printed = next(line for line in lines if line.startswith("try: "))
    argv = shlex.split(printed.removeprefix("try: "))

    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603

    assert argv[0] == "curl"
    assert result.returncode == 0, result.stderr
    assert claims(json.loads(result.stdout)["access_token"])["sub"] == DEMO_USERNAME
    assert f"demo user: {DEMO_USERNAME} / {DEMO_PASSWORD}" in lines


@pytest.mark.parametrize(
    "content",
    [None, "ops@example.com: [unclosed", "- a\n- b\n", "{}\n", "ops@example.com: 123456\n"],
)
def test_bad_users_file_exits_2_with_one_line(tmp_path: Path, content: str | None) -> None:
    """A missing or invalid users file stops the simulator with exit 2 and one clear line."""
    users_file = tmp_path / "users.yaml"
    if content is not None:
        users_file.write_text(content, encoding="utf-8")
    command = [sys.executable, "-m", "service.cli", "simulator", "--port", "0"]
    result = subprocess.run(  # noqa: S603
        [*command, "--users", str(users_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "users file" in result.stderr
    assert "123456" not in result.stderr


# --- rate limit -------------------------------------------------------------------------


def test_rate_limit_refuses_with_429_and_headers(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """Over the limit: 429 Too Many Requests with Retry-After; every answer has X-RateLimit-*."""
    simulator.set(rate_limit=3, rate_period_seconds=60)
    answers = [v1(http), v1(http, password="wrong"), http.post("/v1/auth/token", content=b"x")]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0"]
    refused = v1(http)
    assert refused.status_code == 429
    assert refused.json() == {"message": "Too Many Requests"}
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert simulator.calls("v1_token", "rate_limited", user=DEMO_USERNAME) == 1


def test_rate_limit_window_slides(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Refused calls don't extend the window: once the oldest call ages out, calls pass again."""
    simulator.set(rate_limit=2, rate_period_seconds=1)
    assert [legacy(http).status_code for _ in range(2)] == [200, 200]
    refused = legacy(http)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert until_admitted(lambda: legacy(http)).status_code == 200
    assert simulator.calls("legacy_auth", "ok") == 3
    assert simulator.calls("legacy_auth", "rate_limited") >= 1


def test_rate_limits_are_per_endpoint(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Each auth endpoint has its own budget."""
    simulator.set(rate_limit=1)
    assert legacy(http).status_code == 200
    assert legacy(http).status_code == 429
    pair = v1(http)
    assert pair.status_code == 200
    assert refresh(http, pair.json()["refresh_token"]).status_code == 200
    assert v1(http).status_code == 429


def test_rate_limits_are_per_client_ip(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Another client IP has its own budget."""
    simulator.set(rate_limit=1)
    assert legacy(http).status_code == 200
    assert legacy(http).status_code == 429
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=simulator.base_url, transport=transport, timeout=10) as other:
        assert legacy(other).status_code == 200


# --- faults -----------------------------------------------------------------------------


def test_status_fault_answers_that_status_count_times(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A status fault answers its status for `count` matching calls, then calls pass again."""
    simulator.fault("status", endpoint="v1_token", status=503, count=2)
    assert [v1(http).status_code for _ in range(3)] == [503, 503, 200]
    assert legacy(http).status_code == 200
    assert simulator.calls("v1_token", "injected_status", user=DEMO_USERNAME) == 2
    assert [rule["remaining"] for rule in simulator.faults()] == [0]


def test_status_fault_429_carries_retry_after(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """An injected 429 carries the requested Retry-After and the rate-limit headers."""
    simulator.fault("status", status=429, retry_after=7)
    response = legacy(http)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-RateLimit-Remaining"] == "4"


@pytest.mark.parametrize("value", ["inf", "1e9", "-5", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_status_fault_sends_a_string_retry_after_verbatim(
    http: httpx.Client, simulator: SimulatorControl, value: str
) -> None:
    """A string retry_after goes out as it is: a Monogoto that sends absurd values."""
    simulator.fault("status", status=429, retry_after=value)
    assert legacy(http).headers["Retry-After"] == value


def test_first_matching_fault_rule_applies(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Rules are used in order; a rule for another endpoint is skipped."""
    simulator.fault("status", endpoint="legacy_auth", status=500)
    simulator.fault("status", status=502)
    simulator.fault("status", status=503)
    assert v1(http).status_code == 502
    assert v1(http).status_code == 503
    assert legacy(http).status_code == 500


def test_rate_limit_is_applied_before_faults(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A call refused by the rate limit does not use up a fault."""
    simulator.set(rate_limit=1)
    assert v1(http).status_code == 200
    simulator.fault("status", status=500)
    assert v1(http).status_code == 429
    assert [rule["remaining"] for rule in simulator.faults()] == [1]


def test_delay_fault_outlasts_client_timeout_and_still_spends_the_token(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A delayed refresh times out the client, yet its refresh token is spent (as upstream)."""
    token = v1(http).json()["refresh_token"]
    simulator.fault("delay", endpoint="v1_refresh", seconds=2)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/auth/refresh", json={"refresh_token": token}, timeout=0.5)
    assert refresh(http, token).status_code == 401
    assert simulator.calls("v1_refresh", "ok") == 1
    assert simulator.calls("v1_refresh", "refresh_reused") == 1


def test_latency_setting_delays_every_auth_call(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """latency_seconds holds every auth answer back, long enough to time out a client."""
    simulator.set(latency_seconds=2)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/Auth", json={"UserName": "x", "Password": "y"}, timeout=0.5)
    simulator.set(latency_seconds=0)
    assert legacy(http).status_code == 200


def test_drop_fault_closes_the_connection_mid_response(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A drop fault leaves the client with a connection closed before the full response."""
    simulator.fault("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        v1(http)
    assert v1(http).status_code == 200
    assert simulator.calls("v1_token", "dropped", user=DEMO_USERNAME) == 1


def assert_normal_shape(endpoint: str, body: dict[str, Any]) -> str:
    """Check the dialect's success shape; returns the access token."""
    if endpoint == "legacy_auth":
        assert body.keys() >= LEGACY_FIELDS
        return str(body["token"])
    assert body.keys() == V1_FIELDS
    return str(body["access_token"])


@pytest.mark.parametrize("endpoint", ["legacy_auth", "v1_token"])
@pytest.mark.parametrize(
    "kind", ["not_json", "missing_fields", "expired_token", "opaque_token", "bad_claims"]
)
def test_garbage_fault_answers_200_with_a_broken_body(
    http: httpx.Client, simulator: SimulatorControl, endpoint: str, kind: str
) -> None:
    """Garbage faults answer 200 with the chosen defect, otherwise in the dialect's shape."""
    simulator.fault("garbage", endpoint=endpoint, body=kind)
    response = legacy(http) if endpoint == "legacy_auth" else v1(http)
    assert response.status_code == 200
    assert simulator.calls(endpoint, "garbage", user=DEMO_USERNAME) == 1
    if kind == "not_json":
        assert response.headers["content-type"].startswith("text/html")
        with pytest.raises(json.JSONDecodeError):
            response.json()
        return
    body = response.json()
    if kind == "missing_fields":
        assert not body.keys() & {"token", "access_token", "refresh_token", "refreshToken"}
        return
    token = assert_normal_shape(endpoint, body)
    if kind == "expired_token":
        assert claims(token)["exp"] < time.time() - 12 * 3600
    else:
        assert token.count(".") == (2 if kind == "bad_claims" else 0)
        with pytest.raises(jwt.DecodeError):
            claims(token)


# --- control API ------------------------------------------------------------------------


def test_stats_count_every_call_once(http: httpx.Client, simulator: SimulatorControl) -> None:
    """Stats list each call once per endpoint, user and outcome, sorted, with totals."""
    simulator.set(rate_limit=2)
    legacy(http)
    legacy(http, password="wrong")
    legacy(http)
    http.post("/v1/auth/refresh", content=b"{}")
    assert simulator.stats() == {
        "calls": [
            {"endpoint": "legacy_auth", "user": DEMO_USERNAME, "outcome": "ok", "count": 1},
            {
                "endpoint": "legacy_auth",
                "user": DEMO_USERNAME,
                "outcome": "rate_limited",
                "count": 1,
            },
            {"endpoint": "legacy_auth", "user": DEMO_USERNAME, "outcome": "rejected", "count": 1},
            {"endpoint": "v1_refresh", "user": "-", "outcome": "malformed", "count": 1},
        ],
        "totals": {
            "legacy_auth": {"ok": 1, "rejected": 1, "rate_limited": 1},
            "v1_refresh": {"malformed": 1},
        },
    }


def test_settings_update_partially_and_reset_restores(simulator: SimulatorControl) -> None:
    """PUT /_sim/settings changes only the given fields; a reset restores the startup values."""
    startup = simulator.settings()
    assert startup["rate_limit"] == 5
    assert startup["rate_period_seconds"] == 60
    assert startup["latency_seconds"] == 0
    changed = simulator.set(rate_limit=9, clock_skew_seconds=-30)
    assert changed == {**startup, "rate_limit": 9, "clock_skew_seconds": -30}
    assert simulator.settings() == changed
    simulator.reset()
    assert simulator.settings() == startup


def test_reset_clears_counters_faults_and_rate_limit_logs(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """After a reset nothing is counted, no fault is armed and the full budget is back."""
    simulator.set(rate_limit=1)
    legacy(http)
    simulator.fault("status", status=500)
    simulator.reset()
    assert simulator.stats() == {"calls": [], "totals": {}}
    assert simulator.faults() == []
    response = legacy(http)
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "4"


def test_fault_rules_are_listed_and_cleared(simulator: SimulatorControl) -> None:
    """GET /_sim/faults lists rules with remaining uses; DELETE removes them all."""
    simulator.fault("delay", endpoint="v1_refresh", seconds=1.5, count=3)
    simulator.fault("garbage", body="opaque_token")
    assert simulator.faults() == [
        {"endpoint": "v1_refresh", "kind": "delay", "count": 3, "seconds": 1.5, "remaining": 3},
        {"endpoint": None, "kind": "garbage", "count": 1, "body": "opaque_token", "remaining": 1},
    ]
    simulator.clear_faults()
    assert simulator.faults() == []


@pytest.mark.parametrize(
    "settings",
    [
        {"rate_limit": 0},
        {"rate_limit": "5"},
        {"token_lifetime_seconds": -1},
        {"latency_seconds": -0.5},
        {"no_such_setting": 1},
    ],
)
def test_invalid_settings_are_400(simulator: SimulatorControl, settings: dict[str, Any]) -> None:
    """Invalid settings are refused with 400 and leave the settings unchanged."""
    before = simulator.settings()
    with pytest.raises(SimulatorControlError, match="400"):
        simulator.set(**settings)
    assert simulator.settings() == before


@pytest.mark.parametrize(
    "rule",
    [
        {"kind": "explode"},
        {"kind": "status"},
        {"kind": "status", "status": 200},
        {"kind": "delay", "seconds": 1, "status": 500},
        {"kind": "garbage", "body": "nonsense"},
        {"kind": "drop", "endpoint": "/Auth"},
        {"kind": "drop", "count": 0},
        {"kind": "status", "status": 429, "retry_after": -1},
        {"kind": "status", "status": 429, "retry_after": "1\r\nX-Injected: 1"},
    ],
)
def test_invalid_fault_rules_are_400(
    http: httpx.Client, simulator: SimulatorControl, rule: dict[str, Any]
) -> None:
    """Invalid fault rules are refused with 400 and a message, and nothing is armed."""
    response = http.post("/_sim/faults", json=rule)
    assert response.status_code == 400
    assert response.json()["message"]
    assert simulator.faults() == []


def test_control_rejects_non_json(http: httpx.Client) -> None:
    """Control endpoints answer 400 to a body that is not a JSON object."""
    assert http.put("/_sim/settings", content=b"rate_limit=1").status_code == 400
    assert http.post("/_sim/faults", content=b"[]").status_code == 400


# --- protected endpoints ----------------------------------------------------------------

THINGS = {"legacy": "/things", "v1": "/v1/things"}
DIALECTS = ["legacy", "v1"]
OTHER = {"legacy": "v1", "v1": "legacy"}


LOGIN_ENDPOINT = {"legacy": "legacy_auth", "v1": "v1_token"}


def access_token(
    http: httpx.Client, dialect: str, user: str = DEMO_USERNAME, password: str = DEMO_PASSWORD
) -> str:
    """Log in through `dialect` (as the demo user by default); the access token."""
    if dialect == "legacy":
        return str(legacy(http, user, password).json()["token"])
    return str(v1(http, user, password).json()["access_token"])


def things(
    http: httpx.Client, dialect: str, token: str | None, *, scheme: str = "Bearer"
) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"{scheme} {token}"}
    return http.get(THINGS[dialect], headers=headers)


def assert_refused(response: httpx.Response, dialect: str, reason: str) -> None:
    """A 401 in the dialect's error shape whose message contains `reason` (case-insensitive)."""
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if dialect == "legacy":
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text.startswith("Access denied: ")
        message = response.text
    else:
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body.keys() == {"status_code", "message", "request_id"}
        assert body["status_code"] == 401
        assert body["request_id"]
        message = body["message"]
    assert reason.lower() in message.lower()


@pytest.fixture(scope="module")
def own_simulator_url(start_simulator: Callable[..., SimulatorProcess]) -> str:
    """A simulator for this module alone (demo user only): revocations there touch no other test."""
    return start_simulator().url


@pytest.fixture
def own(own_simulator_url: str) -> Iterator[SimulatorControl]:
    """Control of this module's own simulator, reset for the test (revocations stay)."""
    with SimulatorControl(own_simulator_url) as control:
        control.reset()
        yield control


@pytest.fixture
def own_http(own: SimulatorControl) -> Iterator[httpx.Client]:
    """A plain HTTP client of this module's own simulator."""
    with httpx.Client(base_url=own.base_url, timeout=10) as client:
        yield client


@pytest.mark.parametrize("dialect", DIALECTS)
def test_valid_access_token_lists_the_users_things(
    http: httpx.Client, simulator: SimulatorControl, dialect: str
) -> None:
    """A fresh access token of the dialect gets 200 and that user's things, counted as ok."""
    response = things(http, dialect, access_token(http, dialect))
    assert response.status_code == 200
    body = response.json()
    if dialect == "legacy":
        assert isinstance(body, list)
        assert body
        assert {"ThingId", "CustomerId", "ThingName", "ExternalUniqueId", "State"} <= set(body[0])
        assert body[0]["ThingId"] == f"ThingId_ICCID_{body[0]['ExternalUniqueId']}"
        customer = body[0]["CustomerId"]
    else:
        assert body.keys() == {"customer_id", "things", "total"}
        assert body["total"] == len(body["things"]) > 0
        assert {"thing_id", "iccid", "name", "imei", "state"} <= set(body["things"][0])
        customer = body["customer_id"]
    assert customer == legacy(http).json()["CustomerId"]
    assert simulator.calls(f"{dialect}_things", "ok", user=DEMO_USERNAME) == 1


def test_each_user_gets_its_own_stable_things(
    http: httpx.Client, simulator_users: dict[str, str]
) -> None:
    """The same user always sees the same things; another user sees others."""
    first = things(http, "v1", access_token(http, "v1")).json()
    again = things(http, "v1", access_token(http, "v1")).json()
    ops = "ops@example.com"
    other = things(http, "v1", access_token(http, "v1", ops, simulator_users[ops])).json()
    assert first == again
    assert {t["iccid"] for t in first["things"]}.isdisjoint(t["iccid"] for t in other["things"])


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    "value", [None, "", "Bearer", "Basic ZGVtbzpkZW1v", "Token abc", "Bearer two words"]
)
def test_missing_or_malformed_authorization_is_401(
    http: httpx.Client, simulator: SimulatorControl, dialect: str, value: str | None
) -> None:
    """No Authorization header, or one that is not `Bearer <token>`: 401, token_missing."""
    headers = {} if value is None else {"Authorization": value}
    response = http.get(THINGS[dialect], headers=headers)
    assert_refused(response, dialect, "missing or malformed authorization header")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert simulator.calls(f"{dialect}_things", "token_missing", user="-") == 1


@pytest.mark.parametrize("dialect", DIALECTS)
def test_bearer_scheme_is_case_insensitive(http: httpx.Client, dialect: str) -> None:
    """`bearer` works like `Bearer` (RFC 9110 auth schemes are case-insensitive)."""
    assert things(http, dialect, access_token(http, dialect), scheme="bearer").status_code == 200


@pytest.mark.parametrize("dialect", DIALECTS)
def test_forged_and_garbage_tokens_are_401_invalid(
    http: httpx.Client, simulator: SimulatorControl, dialect: str
) -> None:
    """A token with our claims but another key, or no JWT at all: 401, token_invalid, user -."""
    genuine = claims(access_token(http, dialect))
    forged = jwt.encode(genuine, "not-the-simulator-secret-but-long-enough", algorithm="HS256")
    tampered = access_token(http, dialect)[:-4] + "AAAA"
    for token in (forged, tampered, "garbage", "a.b.c"):
        response = things(http, dialect, token)
        assert_refused(response, dialect, "not issued by this API")
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert simulator.calls(f"{dialect}_things", "token_invalid", user="-") == 4


@pytest.mark.parametrize("dialect", DIALECTS)
def test_other_dialects_token_is_401_invalid(
    http: httpx.Client, simulator: SimulatorControl, dialect: str
) -> None:
    """A valid access token of the other dialect is refused, saying which API issued it."""
    response = things(http, dialect, access_token(http, OTHER[dialect]))
    issued_for = "legacy API" if OTHER[dialect] == "legacy" else "v1 API"
    assert_refused(response, dialect, f"issued for the {issued_for}")
    assert simulator.calls(f"{dialect}_things", "token_invalid", user=DEMO_USERNAME) == 1


def test_refresh_token_is_not_an_access_token(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A v1 refresh token presented as a bearer token gets 401, token_invalid (either dialect)."""
    token = v1(http).json()["refresh_token"]
    for dialect in DIALECTS:
        assert_refused(things(http, dialect, token), dialect, "a refresh token")
        assert simulator.calls(f"{dialect}_things", "token_invalid", user=DEMO_USERNAME) == 1
    assert refresh(http, token).status_code == 200  # it is still a usable refresh token


@pytest.mark.parametrize("dialect", DIALECTS)
def test_expired_access_token_is_401_expired(
    http: httpx.Client, simulator: SimulatorControl, dialect: str
) -> None:
    """With a 1 s token lifetime the token works until it has expired, then 401 expired."""
    simulator.set(token_lifetime_seconds=1)
    token = access_token(http, dialect)
    time.sleep(1.05)  # exp = whole-second iat + 1 <= issue time + 1
    assert_refused(things(http, dialect, token), dialect, "expired")
    assert simulator.calls(f"{dialect}_things", "token_expired", user=DEMO_USERNAME) == 1


def test_expiry_is_judged_by_the_simulators_clock(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """Moving the clock skew past exp expires a token; moving it back makes it valid again."""
    token = access_token(http, "v1")
    simulator.set(clock_skew_seconds=4 * 3600)
    assert_refused(things(http, "v1", token), "v1", "expired")
    simulator.set(clock_skew_seconds=0)
    assert things(http, "v1", token).status_code == 200


@pytest.mark.parametrize("dialect", DIALECTS)
def test_garbage_fault_expired_token_is_401_expired(
    http: httpx.Client, simulator: SimulatorControl, dialect: str
) -> None:
    """The `expired_token` garbage body hands out a token the protected endpoint calls expired."""
    simulator.fault("garbage", endpoint=LOGIN_ENDPOINT[dialect], body="expired_token")
    assert_refused(things(http, dialect, access_token(http, dialect)), dialect, "expired")


def test_revoke_refuses_every_earlier_token_and_a_new_login_works(
    own: SimulatorControl, own_http: httpx.Client
) -> None:
    """After a revoke, the user's access tokens (both dialects) and refresh tokens are refused;
    tokens issued afterwards work."""
    legacy_token = access_token(own_http, "legacy")
    pair = v1(own_http).json()
    assert things(own_http, "v1", pair["access_token"]).status_code == 200

    own.revoke(DEMO_USERNAME)

    assert_refused(things(own_http, "legacy", legacy_token), "legacy", "revoked")
    assert_refused(things(own_http, "v1", pair["access_token"]), "v1", "revoked")
    refused = refresh(own_http, pair["refresh_token"])
    assert refused.status_code == 401
    assert "revoked" in refused.json()["message"]
    assert own.calls("v1_refresh", "refresh_revoked", user=DEMO_USERNAME) == 1
    for dialect in DIALECTS:
        assert own.calls(f"{dialect}_things", "token_revoked", user=DEMO_USERNAME) == 1
        assert things(own_http, dialect, access_token(own_http, dialect)).status_code == 200
    new_pair = v1(own_http).json()
    renewed = refresh(own_http, new_pair["refresh_token"])
    assert renewed.status_code == 200
    assert things(own_http, "v1", renewed.json()["access_token"]).status_code == 200


def test_revoked_tokens_stay_revoked_after_a_reset(
    own: SimulatorControl, own_http: httpx.Client
) -> None:
    """A reset keeps issued tokens valid and revoked ones revoked."""
    token = access_token(own_http, "v1")
    own.revoke(DEMO_USERNAME)
    own.reset()
    assert_refused(things(own_http, "v1", token), "v1", "revoked")


def test_a_changed_password_is_the_only_one_until_a_reset(
    own: SimulatorControl, own_http: httpx.Client
) -> None:
    """After `set_password` only the new password logs in (both dialects) and tokens issued
    before stay valid; a reset restores the startup password."""
    token = access_token(own_http, "v1")
    own.set_password(DEMO_USERNAME, "rotated-password")
    assert legacy(own_http).status_code == 404
    assert v1(own_http).status_code == 401
    assert things(own_http, "v1", token).status_code == 200
    for dialect in DIALECTS:
        assert access_token(own_http, dialect, password="rotated-password")
    own.reset()
    assert access_token(own_http, "v1")
    with pytest.raises(SimulatorControlError, match="404"):
        own.set_password("nobody@example.com", "x")


def test_revoke_unknown_user_is_404(own: SimulatorControl, own_http: httpx.Client) -> None:
    """Revoking a user the simulator does not know: 404 with a message; the client raises."""
    response = own_http.post("/_sim/users/nobody@example.com/revoke")
    assert response.status_code == 404
    assert "nobody@example.com" in response.json()["message"]
    with pytest.raises(SimulatorControlError, match="404"):
        own.revoke("nobody@example.com")


def test_protected_calls_are_counted_per_outcome(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """Stats list protected calls under their own endpoint names, with totals."""
    token = access_token(http, "v1")
    things(http, "v1", token)
    things(http, "v1", token)
    things(http, "v1", None)
    things(http, "legacy", token)
    assert simulator.stats()["totals"] == {
        "v1_token": {"ok": 1},
        "v1_things": {"ok": 2, "token_missing": 1},
        "legacy_things": {"token_invalid": 1},
    }


def test_protected_endpoints_are_not_rate_limited(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """The auth rate limit does not apply to protected endpoints, nor do they use it up."""
    simulator.set(rate_limit=1)
    token = access_token(http, "v1")
    responses = [things(http, "v1", token) for _ in range(5)]
    assert [response.status_code for response in responses] == [200] * 5
    assert "X-RateLimit-Limit" not in responses[0].headers


@pytest.mark.parametrize("dialect", DIALECTS)
def test_status_fault_on_a_protected_endpoint(
    http: httpx.Client, simulator: SimulatorControl, dialect: str
) -> None:
    """A status rule naming a protected endpoint answers that status in the dialect's shape."""
    token = access_token(http, dialect)
    simulator.fault("status", endpoint=f"{dialect}_things", status=503, retry_after=3)
    response = things(http, dialect, token)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    if dialect == "legacy":
        assert response.text == "Service Unavailable"
    else:
        assert response.json()["status_code"] == 503
        assert response.json()["message"] == "Service Unavailable"
    assert things(http, dialect, token).status_code == 200
    assert simulator.calls(f"{dialect}_things", "injected_status", user=DEMO_USERNAME) == 1


def test_rule_without_endpoint_leaves_protected_endpoints_alone(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A rule for any endpoint means any auth endpoint: protected calls don't use it up."""
    token = access_token(http, "v1")
    simulator.fault("status", status=500)
    assert things(http, "v1", token).status_code == 200
    assert [rule["remaining"] for rule in simulator.faults()] == [1]
    assert v1(http).status_code == 500


def test_drop_fault_on_a_protected_endpoint(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """A drop rule naming a protected endpoint closes the connection mid-response."""
    token = access_token(http, "v1")
    simulator.fault("drop", endpoint="v1_things")
    with pytest.raises(httpx.RemoteProtocolError):
        things(http, "v1", token)
    assert things(http, "v1", token).status_code == 200
    assert simulator.calls("v1_things", "dropped", user=DEMO_USERNAME) == 1


def test_garbage_rule_for_a_protected_endpoint_is_400(
    http: httpx.Client, simulator: SimulatorControl
) -> None:
    """Garbage bodies are broken login answers: a garbage rule naming a protected endpoint is
    refused."""
    response = http.post(
        "/_sim/faults", json={"endpoint": "v1_things", "kind": "garbage", "body": "not_json"}
    )
    assert response.status_code == 400
    assert simulator.faults() == []
