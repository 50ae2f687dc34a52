"""Callers authenticating with their Kubernetes ServiceAccount token (docs/callers.md): the broker
under uvicorn on a real Redis with the simulator, the issuer's JWKS served over HTTP by the test
(tests/service_account_issuer.py), real RSA and EC keys."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api import create_app
from service.api.security import AuthMethod, Caller, CallerDirectory, UnauthenticatedError
from service.config import build_settings
from service.keys import api_key_digest, new_encryption_key
from service.simulator.client import SimulatorControl
from tests.service_account_issuer import (
    IssuerServer,
    SigningKey,
    certificate_authority,
    claims,
    hs256_with_public_key,
    sign,
    unsigned,
)
from tests.support import eventually, free_port, served

Client = httpx.AsyncClient

ENCRYPTION_KEYS = new_encryption_key()
BILLING_KEY = "mgb_billing-sa-test-key"
NAMESPACE, NAME = "telemetry", "fleet-ingest"
POD = "fleet-ingest-7d9f8-x2kqp"
TOKEN_PATH = "/v1/accounts/fleet-eu/token"
# Made once: RSA key generation takes a while.
RSA_KEY = SigningKey.rsa("rsa-2026-11")
EC_KEY = SigningKey.ec("ec-2026-11")
NEXT_KEY = SigningKey.rsa("rsa-2027-01")  # published later: a key rotation
FOREIGN_KEY = SigningKey.rsa("rsa-2026-11")  # another cluster's key, with the same key id


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _config(redis_url: str, simulator_url: str, kubernetes: dict[str, Any]) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "encryption_keys": ENCRYPTION_KEYS,
        "upstream": {"base_url": simulator_url, "auth_rate": {"limit": 1000}},
        "accounts": {
            "fleet-eu": {"username": "ops@example.com", "password": "s3cret"},
            "fleet-us": {"username": "ops@example.com", "password": "s3cret"},
        },
        "callers": {
            "billing": {"api_key_sha256": api_key_digest(BILLING_KEY), "accounts": ["fleet-eu"]},
            "fleet-ingest": {
                "service_accounts": [f"{NAMESPACE}/{NAME}", "telemetry/fleet-ingest-canary"],
                "accounts": ["fleet-eu"],
            },
        },
        "caller_auth": {"kubernetes": {"audiences": ["other", "monogoto-broker"], **kubernetes}},
    }


@asynccontextmanager
async def _broker(config: dict[str, Any], *, ready: bool = True) -> AsyncIterator[Client]:
    """The broker app served by uvicorn on a free port, and an HTTP client of it; with `ready`,
    once it has the issuer's keys (a request before then would fetch them itself)."""
    async with served(create_app(build_settings(config))) as client:
        if ready:

            async def keys_obtained() -> bool:
                return (await _keys_check(client))["ok"] is True

            await eventually(keys_obtained)
        yield client


async def _keys_check(client: Client) -> dict[str, Any]:
    checks = (await client.get("/readyz")).json()["checks"]
    [check] = [check for check in checks if check["name"] == "service_account_keys"]
    return dict(check)


async def _metric(client: Client, name: str, **labels: str) -> float:
    """The value of one sample in `/metrics`, 0 if it has not been written yet."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture
def issuer() -> Iterator[IssuerServer]:
    """The cluster's issuer, publishing the RSA and the EC key."""
    server = IssuerServer([RSA_KEY, EC_KEY]).start()
    yield server
    server.stop()


@pytest.fixture
async def broker(
    simulator: SimulatorControl, redis_url: str, simulator_url: str, issuer: IssuerServer
) -> AsyncIterator[Client]:
    """A broker accepting the issuer's tokens for caller fleet-ingest, keys obtained."""
    simulator.set(rate_limit=1000)
    config = _config(redis_url, simulator_url, {"issuer": issuer.url, "jwks_url": issuer.jwks_url})
    async with _broker(config) as client:
        yield client


@contextmanager
def _started(*keys: SigningKey) -> Iterator[IssuerServer]:
    """Another issuer, serving `keys`."""
    server = IssuerServer(list(keys)).start()
    try:
        yield server
    finally:
        server.stop()


def _token(issuer: IssuerServer, key: SigningKey = RSA_KEY, **overrides: Any) -> str:
    return sign(key, claims(issuer.url, NAMESPACE, NAME, pod=POD, **overrides))


async def test_valid_rsa_and_ec_tokens_get_a_token(broker: Client, issuer: IssuerServer) -> None:
    """A projected token signed with either of the issuer's keys authenticates its caller."""
    for key in (RSA_KEY, EC_KEY):
        response = await broker.get(TOKEN_PATH, headers=_bearer(_token(issuer, key)))
        assert response.status_code == 200, response.text
        assert response.json()["account"] == "fleet-eu"
    canary = sign(EC_KEY, claims(issuer.url, NAMESPACE, "fleet-ingest-canary", pod=None))
    assert (await broker.get(TOKEN_PATH, headers=_bearer(canary))).status_code == 200
    listed = await broker.get("/v1/accounts", headers=_bearer(canary))
    assert [account["name"] for account in listed.json()["accounts"]] == ["fleet-eu"]
    # API-key callers are unaffected.
    assert (await broker.get(TOKEN_PATH, headers=_bearer(BILLING_KEY))).status_code == 200


async def test_repeated_token_stays_accepted(broker: Client, issuer: IssuerServer) -> None:
    """The same token works for request after request (verified once, then from the cache)."""
    headers = _bearer(_token(issuer))
    for _ in range(5):
        assert (await broker.get(TOKEN_PATH, headers=headers)).status_code == 200
    assert issuer.fetches() == 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong audience", "audience"),
        ("wrong issuer", "issuer"),
        ("expired", "expired"),
        ("not yet valid", "not_yet_valid"),
        ("issued in the future", "not_yet_valid"),
        ("alg none", "algorithm"),
        ("HS256 with the public key", "algorithm"),
        ("signed by another cluster's key", "signature"),
        ("subject of another service account", "subject"),
        ("no kubernetes.io claim", "claims"),
    ],
)
async def test_invalid_tokens_are_401(
    broker: Client,
    issuer: IssuerServer,
    caplog: pytest.LogCaptureFixture,
    case: str,
    reason: str,
) -> None:
    """Each way a token can be wrong is refused like an unknown key, logged with its reason and
    never with the token."""
    now = time.time()
    valid = claims(issuer.url, NAMESPACE, NAME, pod=POD)
    tokens = {
        "wrong audience": _token(issuer, audience="kubernetes"),
        "wrong issuer": _token(issuer, iss="https://kubernetes.default.svc"),
        "expired": _token(issuer, issued=now - 3700),
        "not yet valid": _token(issuer, nbf=int(now) + 120),
        "issued in the future": _token(issuer, issued=now + 120),
        "alg none": unsigned(valid, RSA_KEY.kid),
        "HS256 with the public key": hs256_with_public_key(RSA_KEY, valid),
        "signed by another cluster's key": sign(FOREIGN_KEY, valid),
        "subject of another service account": _token(
            issuer, sub="system:serviceaccount:telemetry:other"
        ),
        "no kubernetes.io claim": sign(
            RSA_KEY, {key: value for key, value in valid.items() if key != "kubernetes.io"}
        ),
    }
    token = tokens[case]
    before = await _metric(
        broker, "monogoto_broker_caller_auth_failures_total", reason="invalid_token"
    )
    with caplog.at_level(logging.WARNING, logger="service"):
        response = await broker.get(TOKEN_PATH, headers=_bearer(token))
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert token not in response.text
    after = await _metric(
        broker, "monogoto_broker_caller_auth_failures_total", reason="invalid_token"
    )
    assert after == before + 1
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "caller.refused"]
    assert (record.reason, record.detail) == ("invalid_token", reason)  # type: ignore[attr-defined]
    assert token not in caplog.text
    for part in token.split("."):
        assert not part or part not in str(record.__dict__)


async def test_small_clock_skew_is_tolerated(broker: Client, issuer: IssuerServer) -> None:
    """A token issued a few seconds ahead of the broker's clock, or just expired, still works
    (LEEWAY_SECONDS, 30 s)."""
    now = time.time()
    for token in (_token(issuer, issued=now + 10), _token(issuer, issued=now - 3610)):
        assert (await broker.get(TOKEN_PATH, headers=_bearer(token))).status_code == 200


async def test_forged_kubernetes_claims_from_another_issuer_are_refused(
    broker: Client, issuer: IssuerServer
) -> None:
    """Someone with a signing key of their own cannot claim a configured ServiceAccount: not
    with their own issuer (and JWKS), not with the cluster's issuer name."""
    with _started(FOREIGN_KEY) as other:
        forged = sign(FOREIGN_KEY, claims(other.url, NAMESPACE, NAME, pod=POD))
        assert (await broker.get(TOKEN_PATH, headers=_bearer(forged))).status_code == 401
        posing = sign(FOREIGN_KEY, claims(issuer.url, NAMESPACE, NAME, pod=POD))
        assert (await broker.get(TOKEN_PATH, headers=_bearer(posing))).status_code == 401
        unknown_kid = sign(
            FOREIGN_KEY, claims(issuer.url, NAMESPACE, NAME, pod=POD), kid="rsa-forged"
        )
        assert (await broker.get(TOKEN_PATH, headers=_bearer(unknown_kid))).status_code == 401
        assert other.fetches() == 0


async def test_configured_service_account_asking_for_another_account_is_403(
    broker: Client, issuer: IssuerServer
) -> None:
    """A known caller is refused an account it may not use, as with a key."""
    response = await broker.get("/v1/accounts/fleet-us/token", headers=_bearer(_token(issuer)))
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    missing = await broker.get("/v1/accounts/nope/token", headers=_bearer(_token(issuer)))
    assert missing.status_code == 403


async def test_unknown_service_account_is_401_like_an_unknown_key(
    broker: Client, issuer: IssuerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A genuine token of a ServiceAccount no caller has counts as an unknown credential; the
    log names its namespace and ServiceAccount."""
    token = sign(RSA_KEY, claims(issuer.url, "telemetry", "other", pod="other-1"))
    before = await _metric(broker, "monogoto_broker_caller_auth_failures_total", reason="unknown")
    with caplog.at_level(logging.WARNING, logger="service"):
        response = await broker.get(TOKEN_PATH, headers=_bearer(token))
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    after = await _metric(broker, "monogoto_broker_caller_auth_failures_total", reason="unknown")
    assert after == before + 1
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "caller.refused"]
    fields = record.__dict__
    assert (fields["reason"], fields["namespace"], fields["serviceaccount"]) == (
        "unknown",
        "telemetry",
        "other",
    )
    assert token not in caplog.text


async def test_rotated_key_is_fetched_once_and_a_flood_of_unknown_kids_is_not(
    broker: Client, issuer: IssuerServer
) -> None:
    """A token signed with a key the issuer published after the broker fetched the JWKS is
    accepted after one fetch; a flood of tokens with made-up key ids right after causes no
    further fetch (on-demand fetches are rate-limited), and each is refused."""
    assert issuer.fetches() == 1
    issuer.keys.append(NEXT_KEY)
    rotated = _token(issuer, NEXT_KEY)
    assert (await broker.get(TOKEN_PATH, headers=_bearer(rotated))).status_code == 200
    assert issuer.fetches() == 2
    flood = [
        sign(RSA_KEY, claims(issuer.url, NAMESPACE, NAME), kid=f"made-up-{index}")
        for index in range(50)
    ]
    answers = await asyncio.gather(
        *(broker.get(TOKEN_PATH, headers=_bearer(token)) for token in flood)
    )
    assert [answer.status_code for answer in answers] == [401] * 50
    assert issuer.fetches() == 2
    # The keys the broker holds keep working meanwhile.
    assert (
        await broker.get(TOKEN_PATH, headers=_bearer(_token(issuer, EC_KEY)))
    ).status_code == 200


async def test_jwks_unreachable_at_start_fails_closed(
    simulator: SimulatorControl, redis_url: str, simulator_url: str
) -> None:
    """Without ever having obtained the keys, the broker refuses every ServiceAccount token and
    is not ready, saying why; API-key callers are served all the same."""
    simulator.set(rate_limit=1000)
    nowhere = f"http://127.0.0.1:{free_port()}"
    config = _config(
        redis_url, simulator_url, {"issuer": nowhere, "jwks_url": nowhere + "/openid/v1/jwks"}
    )
    token = sign(RSA_KEY, claims(nowhere, NAMESPACE, NAME, pod=POD))
    async with _broker(config, ready=False) as broker:
        before = await _metric(
            broker, "monogoto_broker_caller_auth_failures_total", reason="keys_unavailable"
        )
        response = await broker.get(TOKEN_PATH, headers=_bearer(token))
        assert response.status_code == 401
        after = await _metric(
            broker, "monogoto_broker_caller_auth_failures_total", reason="keys_unavailable"
        )
        assert after == before + 1
        ready = await broker.get("/readyz")
        assert ready.status_code == 503
        check = await _keys_check(broker)
        assert check["ok"] is False
        assert check["detail"].startswith("no JWKS obtained yet (")
        assert "unreachable" in check["detail"]
        assert (await broker.get(TOKEN_PATH, headers=_bearer(BILLING_KEY))).status_code == 200


async def test_jwks_unreachable_later_keeps_the_keys(broker: Client, issuer: IssuerServer) -> None:
    """Once the keys are held, an issuer that goes away costs nothing: new tokens signed with
    known keys are accepted, and readiness stays true, noting the failed fetch."""
    assert (await broker.get(TOKEN_PATH, headers=_bearer(_token(issuer)))).status_code == 200
    issuer.stop()
    # An unknown key id makes the broker try (and fail) to fetch the keys again.
    stranger = sign(RSA_KEY, claims(issuer.url, NAMESPACE, NAME), kid="rsa-unknown")
    assert (await broker.get(TOKEN_PATH, headers=_bearer(stranger))).status_code == 401
    check = await _keys_check(broker)
    assert check["ok"] is True
    assert "the last fetch failed" in check["detail"]
    assert (await broker.get("/readyz")).status_code == 200
    for key in (RSA_KEY, EC_KEY):
        fresh = _token(issuer, key)  # not seen before: verified with the held keys
        assert (await broker.get(TOKEN_PATH, headers=_bearer(fresh))).status_code == 200


async def test_discovery_and_bearer_token_file(
    simulator: SimulatorControl,
    redis_url: str,
    simulator_url: str,
    issuer: IssuerServer,
    tmp_path: Path,
) -> None:
    """Without jwks_url the JWKS is found through the issuer's discovery document; the bearer
    token file is sent with both requests and read again for every fetch (it is rotated)."""
    simulator.set(rate_limit=1000)
    token_file = tmp_path / "jwks-reader"
    token_file.write_text("reader-token-1\n", encoding="utf-8")
    config = _config(
        redis_url, simulator_url, {"issuer": issuer.url, "jwks_token_file": str(token_file)}
    )
    async with _broker(config) as broker:
        assert issuer.requests["/.well-known/openid-configuration"] == 1
        assert (await broker.get(TOKEN_PATH, headers=_bearer(_token(issuer)))).status_code == 200
        assert issuer.authorizations == ["Bearer reader-token-1", "Bearer reader-token-1"]
        token_file.write_text("reader-token-2\n", encoding="utf-8")
        issuer.keys.append(NEXT_KEY)
        rotated = _token(issuer, NEXT_KEY)
        assert (await broker.get(TOKEN_PATH, headers=_bearer(rotated))).status_code == 200
        assert issuer.authorizations[2:] == ["Bearer reader-token-2", "Bearer reader-token-2"]


async def test_jwks_over_https_trusts_the_ca_file(
    simulator: SimulatorControl, redis_url: str, simulator_url: str, tmp_path: Path
) -> None:
    """Over https the JWKS server's certificate must chain to jwks_ca_file: while the file
    holds another CA the broker trusts no answer and fails closed; once the file holds the CA
    that signed the certificate (read again for every fetch), the keys are obtained."""
    simulator.set(rate_limit=1000)
    cluster_ca, tls = certificate_authority(tmp_path, "cluster-ca")
    other_ca, _ = certificate_authority(tmp_path, "other-ca")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(other_ca.read_bytes())
    with _started_tls(tls, RSA_KEY) as issuer:
        assert issuer.url.startswith("https://")
        kubernetes = {
            "issuer": issuer.url,
            "jwks_url": issuer.jwks_url,
            "jwks_ca_file": str(ca_file),
        }
        token = _token(issuer)
        async with _broker(_config(redis_url, simulator_url, kubernetes), ready=False) as broker:
            assert (await broker.get(TOKEN_PATH, headers=_bearer(token))).status_code == 401
            check = await _keys_check(broker)
            assert check["ok"] is False
            assert "unreachable" in check["detail"]
            assert issuer.fetches() == 0  # the untrusted server was never asked a thing

            ca_file.write_bytes(cluster_ca.read_bytes())

            async def keys_obtained() -> bool:
                return (await _keys_check(broker))["ok"] is True

            # The broker tries again every RETRY_SECONDS (10 s, jittered by 10 %).
            await eventually(keys_obtained, within=20)
            assert (await broker.get(TOKEN_PATH, headers=_bearer(token))).status_code == 200


@contextmanager
def _started_tls(tls: Any, *keys: SigningKey) -> Iterator[IssuerServer]:
    server = IssuerServer(list(keys), tls=tls).start()
    try:
        yield server
    finally:
        server.stop()


async def test_caller_records_service_account_and_pod(issuer: IssuerServer) -> None:
    """The authenticated caller says it came by ServiceAccount, which one, and its pod."""
    settings = build_settings(
        _config(
            "memory://", "http://127.0.0.1:1", {"issuer": issuer.url, "jwks_url": issuer.jwks_url}
        )
    )
    directory = CallerDirectory(
        settings.callers, frozenset(settings.accounts), settings.caller_auth.kubernetes
    )
    directory.start()
    try:
        assert directory.service_accounts is not None
        keys = directory.service_accounts.keys
        await eventually(lambda: keys.obtained)
        caller = await directory.authenticate(f"Bearer {_token(issuer)}")
        assert caller == Caller(
            name="fleet-ingest",
            accounts=frozenset({"fleet-eu"}),
            credential=f"{NAMESPACE}/{NAME}",
            method=AuthMethod.SERVICE_ACCOUNT,
            pod=POD,
        )
        unbound = sign(EC_KEY, claims(issuer.url, NAMESPACE, NAME, pod=None))
        assert (await directory.authenticate(f"Bearer {unbound}")).pod is None
        by_key = await directory.authenticate(f"Bearer {BILLING_KEY}")
        assert (by_key.method, by_key.pod) == (AuthMethod.API_KEY, None)
        with pytest.raises(UnauthenticatedError):
            await directory.authenticate("Bearer eyJ.not-a.jwt")
    finally:
        await directory.stop()
