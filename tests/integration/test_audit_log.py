"""The audit log through the real app (uvicorn, real Redis, the simulator over HTTP): every
token request appears exactly once, with who asked, how it authenticated and what came of it,
and nothing secret (docs/operations.md, "The audit log")."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api import create_app
from service.config import build_settings
from service.keys import api_key_digest, new_encryption_key
from service.simulator.client import SimulatorControl
from tests.support import eventually, served

Client = httpx.AsyncClient

ENCRYPTION_KEYS = new_encryption_key()
HMAC_KEY = "audit-Secret-" + "0123456789abcdef" * 2
BILLING_KEY = "mgb_billing-audit-test-key"
OPS_KEY = "mgb_ops-audit-test-key"
PASSWORD = "s3cret"
SPARE_PASSWORD = "demo-password"
LOCKED_PASSWORD = "not-the-password"
LIFETIME = 60


def _config(redis_url: str, simulator_url: str, audit: dict[str, Any]) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        # A store of its own: a token another test left for the same account would be a cache hit.
        "key_prefix": f"audit-{secrets.token_hex(4)}",
        "encryption_keys": ENCRYPTION_KEYS,
        "upstream": {"base_url": simulator_url, "auth_rate": {"limit": 1000}},
        # A short lifetime lets a min_ttl force a renewal; renewals are not due before 45 s.
        "refresh": {"min_remaining_seconds": 5},
        "accounts": {
            "fleet-eu": {"username": "ops@example.com", "password": PASSWORD},
            "spare": {"username": "demo@monogoto.example", "password": SPARE_PASSWORD},
            "locked": {"username": "ops@example.com", "password": LOCKED_PASSWORD},
        },
        "callers": {
            "billing": {"api_key_sha256": api_key_digest(BILLING_KEY), "accounts": ["fleet-eu"]},
            "ops": {"api_key_sha256": api_key_digest(OPS_KEY), "accounts": ["*"]},
        },
        "audit": audit,
    }


def _running(config: dict[str, Any]) -> AbstractAsyncContextManager[Client]:
    """The broker app served by uvicorn on a free port until the block ends (its lifespan
    shutdown then flushes the audit log), and an HTTP client of it."""
    return served(create_app(build_settings(config)))


def _auth(key: str, request_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Request-ID": request_id}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()]


def _hmac(token: str) -> str:
    digest = hmac.new(HMAC_KEY.encode(), token.encode(), hashlib.sha256).hexdigest()
    return "hmac-sha256:" + digest[:16]


def _key_prefix(key: str) -> str:
    return "sha256:" + api_key_digest(key)[:8]


@pytest.fixture
def sim(simulator: SimulatorControl) -> SimulatorControl:
    """The simulator with short-lived tokens and its rate limit out of the way."""
    simulator.set(rate_limit=1000, token_lifetime_seconds=LIFETIME)
    return simulator


async def test_every_token_request_is_audited_once(
    sim: SimulatorControl, redis_url: str, simulator_url: str, tmp_path: Path
) -> None:
    """Issued (cached), forced (fetched), invalidated, denied (401, 403) and failed requests
    each write one line with the caller, how it authenticated, the account, the outcome and
    the token's HMAC fingerprint; other routes write none."""
    path = tmp_path / "audit.log"
    sent: dict[str, tuple[int, str]] = {}  # request id -> (status, access token or "")
    config = _config(redis_url, simulator_url, {"path": str(path), "hmac_key": HMAC_KEY})
    async with _running(config) as client:

        async def ask(rid: str, key: str, url: str, **kwargs: Any) -> httpx.Response:
            method = client.post if url.endswith("/invalidate") else client.get
            answer = await method(url, headers=_auth(key, rid), **kwargs)
            token = answer.json().get("access_token", "") if answer.status_code == 200 else ""
            sent[rid] = (answer.status_code, token)
            return answer

        # The broker logs in by itself as it starts; once it has, a GET is a cache hit. (Asked
        # sooner, the first GET would be a cache hit or the login, whichever came first.)
        async def logged_in() -> bool:
            listed = await client.get("/v1/accounts", headers=_auth(OPS_KEY, "not-audited"))
            [fleet] = [a for a in listed.json()["accounts"] if a["name"] == "fleet-eu"]
            return fleet["expires_at"] is not None

        await eventually(logged_in)
        first = await ask("get-1", BILLING_KEY, "/v1/accounts/fleet-eu/token")
        await ask("get-2", BILLING_KEY, "/v1/accounts/fleet-eu/token")
        # Wait (by polling, each poll audited too) until the token has less than 59 s left:
        # then min_ttl=59 is a renewal only the caller calls for, a forced one.
        polls = 0

        async def aged() -> bool:
            nonlocal polls
            polls += 1
            answer = await ask(f"poll-{polls}", OPS_KEY, "/v1/accounts/fleet-eu/token")
            return int(answer.json()["expires_in"]) <= LIFETIME - 2

        await eventually(aged, within=10)
        forced = await ask("forced", OPS_KEY, "/v1/accounts/fleet-eu/token?min_ttl=59")
        assert forced.json()["access_token"] != first.json()["access_token"]
        reported = forced.json()["access_token"]
        # ops just forced a renewal: reporting the still-valid token forces another, too soon.
        limited = await ask(
            "inv-limited",
            OPS_KEY,
            "/v1/accounts/fleet-eu/token/invalidate",
            json={"access_token": reported},
        )
        assert limited.status_code == 429
        invalidated = await ask(
            "inv",
            BILLING_KEY,
            "/v1/accounts/fleet-eu/token/invalidate",
            json={"access_token": reported},
        )
        assert invalidated.status_code == 200
        assert (
            await ask("unknown-key", "mgb_nobody", "/v1/accounts/fleet-eu/token")
        ).status_code == 401
        assert (
            await ask("not-allowed", BILLING_KEY, "/v1/accounts/spare/token")
        ).status_code == 403
        assert (
            await ask("no-account", BILLING_KEY, "/v1/accounts/nowhere/token")
        ).status_code == 403
        assert (
            await ask(
                "inv-denied",
                BILLING_KEY,
                "/v1/accounts/spare/token/invalidate",
                json={"access_token": reported},
            )
        ).status_code == 403
        assert (await ask("rejected", OPS_KEY, "/v1/accounts/locked/token")).status_code == 503
        missing = await client.get("/v1/accounts/fleet-eu/token")
        assert missing.status_code == 401
        for other in ("/v1/accounts", "/healthz", "/readyz", "/metrics"):
            await client.get(other, headers=_auth(OPS_KEY, "not-audited"))

    lines = _lines(path)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_id.setdefault(line["request_id"], []).append(line)
    assert "not-audited" not in by_id
    missing_lines = [line for line in lines if line["request_id"] not in sent]
    assert len(missing_lines) == 1, "the request without an X-Request-ID got an id of its own"
    assert (missing_lines[0]["status"], missing_lines[0]["reason"]) == (401, "missing")
    assert {rid: len(found) for rid, found in by_id.items() if rid in sent} == dict.fromkeys(
        sent, 1
    )
    for line in lines:
        assert line["audit"] is True
        assert line["logger"] == "monogoto_broker.audit"
        assert line["time"].endswith("Z")
        assert line["replica"]
        assert isinstance(line["pid"], int)

    def one(rid: str) -> dict[str, Any]:
        [line] = by_id[rid]
        return line

    billing = {"caller": "billing", "auth": "api_key", "credential": _key_prefix(BILLING_KEY)}
    ops = {"caller": "ops", "auth": "api_key", "credential": _key_prefix(OPS_KEY)}
    for rid, who, outcome, source in [
        ("get-1", billing, "issued", "local"),
        ("get-2", billing, "issued", "local"),
        ("forced", ops, "forced", "fetched"),
        ("inv", billing, "invalidated", "fetched"),
    ]:
        line = one(rid)
        assert {key: line[key] for key in who} == who, rid
        assert (line["event"], line["outcome"], line["status"]) == (
            "token.invalidate" if rid == "inv" else "token.get",
            outcome,
            200,
        ), rid
        assert (line["account"], line["source"], line["code"]) == ("fleet-eu", source, None), rid
        assert line["token_hmac"] == _hmac(sent[rid][1]), rid
    assert one("inv")["reported_hmac"] == _hmac(reported)
    assert one("get-1")["level"] == "INFO"

    denials = {
        "unknown-key": (None, None, "fleet-eu", 401, "unauthenticated", "unknown", "token.get"),
        "not-allowed": (
            "billing",
            "api_key",
            "spare",
            403,
            "forbidden",
            "not_allowed",
            "token.get",
        ),
        "no-account": (
            "billing",
            "api_key",
            None,
            403,
            "forbidden",
            "unknown_account",
            "token.get",
        ),
        "inv-denied": (
            "billing",
            "api_key",
            "spare",
            403,
            "forbidden",
            "not_allowed",
            "token.invalidate",
        ),
    }
    for rid, expected in denials.items():
        line = one(rid)
        fields = ("caller", "auth", "account", "status", "code", "reason", "event")
        assert tuple(line[field] for field in fields) == expected, rid
        assert (line["outcome"], line["level"], line["token_hmac"]) == ("denied", "WARNING", None)
    limited_line = one("inv-limited")
    assert (limited_line["outcome"], limited_line["status"], limited_line["code"]) == (
        "failed",
        429,
        "renewal_rate_limited",
    )
    assert limited_line["reported_hmac"] == _hmac(reported)
    rejected = one("rejected")
    assert (rejected["outcome"], rejected["status"], rejected["code"]) == (
        "failed",
        503,
        "credentials_rejected",
    )

    text = path.read_text(encoding="utf-8")
    secrets = [token for _, token in sent.values() if token] + [
        BILLING_KEY,
        OPS_KEY,
        api_key_digest(BILLING_KEY),
        api_key_digest(OPS_KEY),
        PASSWORD,
        SPARE_PASSWORD,
        LOCKED_PASSWORD,
        HMAC_KEY,
        ENCRYPTION_KEYS,
        "mgb_nobody",
    ]
    for secret in secrets:
        assert secret not in text


async def test_audit_lines_are_counted_by_event_and_outcome(
    sim: SimulatorControl, redis_url: str, simulator_url: str, tmp_path: Path
) -> None:
    """`audit_lines_total` counts lines by event and outcome only: no caller, no key."""
    config = _config(redis_url, simulator_url, {"path": str(tmp_path / "audit.log")})
    async with _running(config) as client:
        await client.get("/v1/accounts/fleet-eu/token", headers=_auth(BILLING_KEY, "a"))
        await client.get("/v1/accounts/spare/token", headers=_auth(BILLING_KEY, "b"))
        samples: list[str] = []

        async def counted() -> bool:
            # Lines are counted as their batch is written, within a fraction of a second.
            metrics = (await client.get("/metrics")).text
            samples[:] = [
                line
                for line in metrics.splitlines()
                if line.startswith("monogoto_broker_audit_lines_total{")
            ]
            return any('outcome="denied"' in line for line in samples)

        await eventually(counted)
    assert any('event="token.get",outcome="issued"' in line for line in samples)
    assert any('event="token.get",outcome="denied"' in line for line in samples)
    for line in samples:
        assert "billing" not in line
        assert "sha256" not in line


async def test_a_request_id_that_is_not_a_plain_id_is_replaced(
    sim: SimulatorControl, redis_url: str, simulator_url: str, tmp_path: Path
) -> None:
    """An X-Request-ID with spaces or control characters is not copied into the log: the
    broker makes an id of its own for that request."""
    path = tmp_path / "audit.log"
    config = _config(redis_url, simulator_url, {"path": str(path)})
    async with _running(config) as client:
        await client.get(
            "/v1/accounts/fleet-eu/token",
            headers=_auth(BILLING_KEY, 'x", "caller": "forged'),
        )
    [line] = _lines(path)
    assert line["caller"] == "billing"
    assert "forged" not in line["request_id"]


async def test_fail_closed_with_an_unwritable_path_hands_out_no_token(
    sim: SimulatorControl, redis_url: str, simulator_url: str, tmp_path: Path
) -> None:
    """With fail_closed and an audit file that cannot be written, token requests get 503
    `audit_unavailable` with Retry-After, and readiness is false, saying why."""
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the directory should be", encoding="utf-8")
    config = _config(
        redis_url, simulator_url, {"path": str(blocker / "audit.log"), "fail_closed": True}
    )
    async with _running(config) as client:
        answer = await client.get("/v1/accounts/fleet-eu/token", headers=_auth(BILLING_KEY, "a"))
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "audit_unavailable"
        assert int(answer.headers["retry-after"]) >= 1
        assert "access_token" not in answer.text
        invalidated = await client.post(
            "/v1/accounts/fleet-eu/token/invalidate",
            headers=_auth(OPS_KEY, "b"),
            json={"access_token": "whatever"},
        )
        assert invalidated.status_code == 503
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        [audit] = [check for check in ready.json()["checks"] if check["name"] == "audit"]
        assert audit["ok"] is False
        assert "Not a directory" in audit["detail"]
        # Once the file can be written, readiness and tokens come back without a restart.
        blocker.unlink()
        blocker.mkdir()
        assert (await client.get("/readyz")).status_code == 200
        again = await client.get("/v1/accounts/fleet-eu/token", headers=_auth(BILLING_KEY, "c"))
        assert again.status_code == 200
    assert [line["request_id"] for line in _lines(blocker / "audit.log")] == ["c"]


async def test_operator_actions_are_audited(
    tmp_path: Path, sim: SimulatorControl, redis_url: str, simulator_url: str
) -> None:
    """An admin's verify and reset each write one line with their outcome; a non-admin's
    attempt writes a `denied` line. No password in any line."""
    path = tmp_path / "audit.log"
    config = _config(redis_url, simulator_url, {"path": str(path), "hmac_key": HMAC_KEY})
    config["callers"]["ops"]["admin"] = True
    async with _running(config) as client:
        verified = await client.post("/v1/accounts/fleet-eu/verify", headers=_auth(OPS_KEY, "v1"))
        rejected = await client.post("/v1/accounts/locked/verify", headers=_auth(OPS_KEY, "v2"))
        reset = await client.post("/v1/accounts/locked/reset", headers=_auth(OPS_KEY, "r1"))
        denied = await client.post("/v1/accounts/locked/reset", headers=_auth(BILLING_KEY, "d1"))
    assert [r.status_code for r in (verified, rejected, reset, denied)] == [200, 200, 200, 403]
    by_id = {line["request_id"]: line for line in _lines(path)}
    seen = {
        rid: (line["event"], line["outcome"], line["status"], line["account"], line["caller"])
        for rid, line in by_id.items()
        if rid in {"v1", "v2", "r1", "d1"}
    }
    assert seen == {
        "v1": ("account.verify", "verified", 200, "fleet-eu", "ops"),
        "v2": ("account.verify", "rejected", 200, "locked", "ops"),
        "r1": ("account.reset", "reset", 200, "locked", "ops"),
        "d1": ("account.reset", "denied", 403, "locked", "billing"),
    }
    assert by_id["d1"]["reason"] == "not_admin"
    assert by_id["d1"]["message"] == "operator action denied"
    assert by_id["d1"]["credential"] == _key_prefix(BILLING_KEY)
    text = path.read_text(encoding="utf-8")
    assert PASSWORD not in text
    assert LOCKED_PASSWORD not in text
