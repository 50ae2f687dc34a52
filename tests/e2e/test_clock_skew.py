"""Monogoto's clock ten minutes off the broker's, with token lifetimes of seconds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from service.claims import read_claims
from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Cadence,
    Callers,
    ReliabilityRow,
    Rotation,
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

    def judge(self, name: str, body: dict[str, Any], asked: float, answered: float) -> list[str]:
        """A token the issuer considers expired, or whose `expires_in` promises more than the
        issuer's clock allows, is a problem."""
        claims = read_claims(body["access_token"])
        left = claims["exp"] - (answered + self.skew)  # by the issuer's clock
        problems = []
        if left < 1:
            problems.append(f"{name}: token served with {left:.1f} s left")
        # `iat` is whole seconds, so `exp - iat` may be up to 1 s more than the time the token
        # had left when issued; the answer may have taken its time to come back.
        if body["expires_in"] > left + 1 + (answered - asked):
            problems.append(f"{name}: expires_in {body['expires_in']} s, but {left:.1f} s left")
        return problems


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
    cadence = Cadence.read(
        e2e_simulator,
        ACCOUNTS,
        elapsed=elapsed,
        fraction=FRACTION,
        lifetime=LIFETIME_SECONDS,
    )
    reliability(
        ReliabilityRow(
            scenario=f"clock skew {skew:+.0f} s",
            injected=(
                f"Monogoto's clock {skew:+.0f} s off; 2 replicas, 30 callers for "
                f"{RUN_SECONDS:.0f} s, {LIFETIME_SECONDS:.0f} s token lifetime, 2 accounts"
            ),
            callers_saw=report.summary(),
            upstream_calls=cadence.describe(),
            rate_limited=cadence.total.rate_limited,
            reused=cadence.total.reused,
        )
    )
    cadence.check(report, RUN_SECONDS)
    for name in ACCOUNTS:
        assert report.served(name) > 100
    assert cadence.total.outcomes.keys() == {"ok"}
