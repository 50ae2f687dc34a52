"""Three broker processes on one Redis, many concurrent callers, several token lifetimes."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from service.claims import read_claims
from service.keys import new_api_key, new_encryption_key
from service.simulator import DEMO_PASSWORD, DEMO_USERNAME
from service.simulator.client import SimulatorControl

if TYPE_CHECKING:
    from tests.e2e.conftest import StartBrokers

LIFETIME_SECONDS = 6.0
FRACTION = 0.5
RUN_SECONDS = 20.0
CALLERS = 40
ACCOUNTS = {"fleet-v1": "v1", "fleet-legacy": "legacy"}


def write_config(path: Path, redis_url: str, simulator_url: str, key_digest: str) -> Path:
    """A config for every replica: both dialects, one caller allowed everything."""
    config = {
        "redis_url": redis_url,
        "encryption_keys": new_encryption_key(),
        "upstream": {
            "base_url": simulator_url,
            "timeout_seconds": 5,
            "auth_rate": {"limit": 10, "period_seconds": 5},
        },
        "refresh": {"fraction": FRACTION, "min_remaining_seconds": 1},
        "accounts": {
            name: {"username": DEMO_USERNAME, "password": DEMO_PASSWORD, "dialect": dialect}
            for name, dialect in ACCOUNTS.items()
        },
        "callers": {"fleet": {"api_key_sha256": key_digest, "accounts": ["*"]}},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def hammer(urls: list[str], key: str, until: float) -> tuple[Counter[str], list[str]]:
    """Concurrent callers asking random replicas for random accounts until `until`; the
    distinct tokens served per account, and every problem seen."""
    tokens: dict[str, set[str]] = {name: set() for name in ACCOUNTS}
    served: Counter[str] = Counter()
    problems: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}

    async def caller(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            # S311: picking replicas and accounts at random needs no cryptographic randomness.
            url, account = random.choice(urls), random.choice(list(ACCOUNTS))  # noqa: S311
            response = await client.get(f"{url}/v1/accounts/{account}/token", headers=headers)
            if response.status_code != 200:
                problems.append(f"{account}: {response.status_code} {response.text[:200]}")
                continue
            body = response.json()
            now = time.time()
            if read_claims(body["access_token"])["exp"] <= now or body["expires_in"] < 1:
                problems.append(f"{account}: token served with {body['expires_in']} s left")
            tokens[account].add(body["access_token"])
            served[account] += 1
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(caller(client) for _ in range(CALLERS)))
    served.update({f"{name} distinct": len(found) for name, found in tokens.items()})
    return served, problems


async def test_three_replicas_serve_every_caller_with_one_upstream_call_per_cycle(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
) -> None:
    """Every caller gets a valid token; upstream calls track refresh cycles, with no 429 and
    no reused refresh token, across three replicas and several token lifetimes."""
    e2e_simulator.set(token_lifetime_seconds=LIFETIME_SECONDS, rate_limit=10, rate_period_seconds=5)
    key, digest = new_api_key()
    config = write_config(tmp_path / "broker.yaml", redis_url, e2e_simulator.base_url, digest)
    started = time.monotonic()  # the first replica logs in as soon as it starts
    replicas = start_brokers(config, 3)
    served, problems = await hammer([r.url for r in replicas], key, time.monotonic() + RUN_SECONDS)
    elapsed = time.monotonic() - started

    stats = e2e_simulator.stats()
    cycles = elapsed / (FRACTION * LIFETIME_SECONDS)
    upstream = {
        "fleet-v1": e2e_simulator.calls("v1_token", "ok") + e2e_simulator.calls("v1_refresh", "ok"),
        "fleet-legacy": e2e_simulator.calls("legacy_auth", "ok"),
    }
    print(  # the figures this test measured (pytest -s shows them)
        f"\n{sum(served[name] for name in ACCOUNTS)} tokens served by 3 replicas to {CALLERS} "
        f"callers in {RUN_SECONDS:.0f} s, distinct tokens seen "
        f"{ {name: served[name + ' distinct'] for name in ACCOUNTS} }; upstream calls "
        f"{upstream}; refresh cycles since the first replica started: at most {cycles:.1f}; "
        f"429s and reused refresh tokens: see the simulator's counts {stats['totals']}"
    )
    assert problems == []
    for name in ACCOUNTS:
        assert served[name] > 100
        # One call per cycle, plus the first login; jitter only makes cycles longer.
        assert upstream[name] <= cycles + 1, f"{name}: more upstream calls than cycles"
        # Callers saw the tokens change cycle after cycle while they called (jitter <= 10 %).
        assert served[f"{name} distinct"] >= RUN_SECONDS / (FRACTION * LIFETIME_SECONDS * 1.1) - 1
    assert e2e_simulator.calls("v1_token", "rate_limited") == 0
    assert e2e_simulator.calls("v1_refresh", "rate_limited") == 0
    assert e2e_simulator.calls("legacy_auth", "rate_limited") == 0
    assert e2e_simulator.calls("v1_refresh", "refresh_reused") == 0
    for replica in replicas:
        assert replica.stop() == 0
