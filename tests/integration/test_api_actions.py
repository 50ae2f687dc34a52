"""Operator actions over HTTP: verify an account's credentials, reset its back-off."""

from __future__ import annotations

from typing import Any

from service.keys import api_key_digest
from service.simulator.client import SimulatorControl
from tests.integration.test_api import BILLING, BILLING_KEY, ENCRYPTION_KEYS, _running

ADMIN_KEY = "mgb_admin-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _config(redis_url: str, simulator_url: str) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "encryption_keys": ENCRYPTION_KEYS,
        "upstream": {"base_url": simulator_url, "auth_rate": {"limit": 1000}},
        "accounts": {
            "fleet-eu": {"username": "ops@example.com", "password": "s3cret"},
            "locked": {"username": "ops@example.com", "password": "not-the-password"},
        },
        "callers": {
            "billing": {"api_key_sha256": api_key_digest(BILLING_KEY), "accounts": ["*"]},
            "ops": {"api_key_sha256": api_key_digest(ADMIN_KEY), "accounts": ["*"], "admin": True},
        },
    }


async def test_admin_verifies_and_resets_others_may_not(
    simulator: SimulatorControl, redis_url: str, simulator_url: str
) -> None:
    """An admin's verify logs in and reports the outcome, reset clears a rejection; a
    non-admin gets 403, an unknown account 404, no key 401."""
    simulator.set(rate_limit=1000)
    async with _running(_config(redis_url, simulator_url)) as client:
        ok = await client.post("/v1/accounts/fleet-eu/verify", headers=ADMIN)
        assert ok.status_code == 200, ok.text
        assert ok.json()["credentials"] == "verified"
        rejected = await client.post("/v1/accounts/locked/verify", headers=ADMIN)
        assert rejected.status_code == 200, rejected.text
        assert rejected.json()["credentials"] == "rejected"
        assert "not-the-password" not in rejected.text
        reset = await client.post("/v1/accounts/locked/reset", headers=ADMIN)
        assert reset.status_code == 200, reset.text
        assert reset.json()["status"] != "credentials_rejected"
        assert reset.json()["credentials"] == "unverified"
        denied = await client.post("/v1/accounts/fleet-eu/verify", headers=BILLING)
        assert (denied.status_code, denied.json()["code"]) == (403, "forbidden")
        unknown = await client.post("/v1/accounts/nope/reset", headers=ADMIN)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")
        anonymous = await client.post("/v1/accounts/fleet-eu/reset")
        assert anonymous.status_code == 401
