"""Monogoto's clock ten minutes off the broker's, with token lifetimes of seconds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from service.claims import read_claims
from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    broker_config,
    write_config,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 6.0
FRACTION = 0.5
RUN_SECONDS = 9.0
ACCOUNTS = {"skewed-v1": account(7, "v1"), "skewed-legacy": account(8, "legacy")}


class SkewedCallers(Callers):
    """Callers that judge each token by the issuer's clock, `skew` seconds off ours."""

    def __init__(self, rotation: Rotation, key: str, skew: float) -> None:
        super().__init__(rotation, key, ACCOUNTS, concurrency=30)
        self.skew = skew
        self.headers = {"Authorization": f"Bearer {key}"}

    async def call(self, client: httpx.AsyncClient, name: str) -> None:
        """One token request; a token the issuer considers expired, or whose `expires_in`
        promises more than the issuer's clock allows, is a problem."""
        url = f"{self.rotation.pick()}/v1/accounts/{name}/token"
        asked = time.time()
        try:
            response = await client.get(url, headers=self.headers)
        except httpx.TransportError as error:
            self.report.problems.append(f"{name}: {type(error).__name__}")
            return
        code = "-"
        if response.status_code == 200:
            body = response.json()
            claims = read_claims(body["access_token"])
            answered = time.time()
            left = claims["exp"] - (answered + self.skew)  # by the issuer's clock
            if left < 1:
                self.report.problems.append(f"{name}: token served with {left:.1f} s left")
            # `iat` is whole seconds, so `exp - iat` may be up to 1 s more than the time the
            # token had left when issued; the answer may have taken its time to come back.
            if body["expires_in"] > left + 1 + (answered - asked):
                self.report.problems.append(
                    f"{name}: expires_in {body['expires_in']} s, but {left:.1f} s left"
                )
            self.report.tokens[name].add(body["access_token"])
        else:
            code = response.json().get("code", "-")
        self.report.answers[name, response.status_code, code] += 1


@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["monogoto-ahead", "monogoto-behind"])
async def test_clock_skew_does_not_move_refreshes(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
    skew: float,
) -> None:
    """With Monogoto's clock ten minutes ahead or behind, callers still always get a token
    Monogoto considers valid, renewed once per cycle, with no login storm."""
    e2e_simulator.set(
        token_lifetime_seconds=LIFETIME_SECONDS,
        clock_skew_seconds=skew,
        rate_limit=10,
        rate_period_seconds=5,
    )
    key, digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        digest,
        ACCOUNTS,
        upstream={"auth_rate": {"limit": 10, "period_seconds": 5}},
        refresh={"fraction": FRACTION, "min_remaining_seconds": 1},
    )
    started = time.monotonic()
    replicas = start_brokers(write_config(tmp_path / "broker.yaml", config), 2)
    callers = SkewedCallers(Rotation([r.url for r in replicas]), key, skew)
    await callers.run(RUN_SECONDS)
    elapsed = time.monotonic() - started

    report = callers.report
    cycles = elapsed / (FRACTION * LIFETIME_SECONDS)
    upstream = {
        name: UpstreamCounts.read(e2e_simulator, settings["username"])
        for name, settings in ACCOUNTS.items()
    }
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario=f"clock skew {skew:+.0f} s",
            injected=(
                f"Monogoto's clock {skew:+.0f} s off; 2 replicas, 30 callers for "
                f"{RUN_SECONDS:.0f} s, {LIFETIME_SECONDS:.0f} s token lifetime, 2 accounts"
            ),
            callers_saw=report.summary(),
            upstream_calls=(
                f"{total.describe()}; per account "
                f"{ {name: counts.calls for name, counts in upstream.items()} } "
                f"in at most {cycles:.1f} refresh cycles"
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert report.problems == []
    assert report.failed() == 0
    for name in ACCOUNTS:
        assert report.served(name) > 100
        assert upstream[name].calls <= cycles + 1, f"{name}: more upstream calls than cycles"
        # Renewed cycle after cycle, not just once (jitter makes a cycle up to 10 % longer).
        assert len(report.tokens[name]) >= RUN_SECONDS / (FRACTION * LIFETIME_SECONDS * 1.1) - 1
    assert total.rate_limited == 0
    assert total.reused == 0
    assert total.outcomes.keys() == {"ok"}
