"""Monogoto rejects one account's password while a hundred callers hammer the fleet."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

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

BACKOFF_SECONDS = 5.0
RUN_SECONDS = 8.0
WRONG_PASSWORD = "not-the-password-of-user02"
ACCOUNTS = {
    "rejected": account(2, "v1", password=WRONG_PASSWORD),
    "healthy-v1": account(3, "v1"),
    "healthy-legacy": account(4, "legacy"),
}


async def test_rejected_credentials_answer_503_and_cost_one_login_per_backoff(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """An account with a wrong password answers 503 credentials_rejected with Retry-After,
    the fleet tries its login at most once per back-off, and the other accounts keep
    getting tokens."""
    e2e_simulator.set(rate_limit=20, rate_period_seconds=5)
    key, digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        digest,
        ACCOUNTS,
        upstream={"auth_rate": {"limit": 20, "period_seconds": 5}},
        refresh={"rejected_backoff_seconds": BACKOFF_SECONDS},
    )
    started = time.monotonic()  # the first replica tries the logins as soon as it starts
    replicas = start_brokers(write_config(tmp_path / "broker.yaml", config), 3)
    callers = Callers(Rotation([r.url for r in replicas]), key, ACCOUNTS, concurrency=100)
    await callers.run(RUN_SECONDS)
    elapsed = time.monotonic() - started

    report = callers.report
    upstream = {
        name: UpstreamCounts.read(e2e_simulator, settings["username"])
        for name, settings in ACCOUNTS.items()
    }
    total = UpstreamCounts.read(e2e_simulator)
    allowed = math.floor(elapsed / BACKOFF_SECONDS) + 1
    reliability(
        ReliabilityRow(
            scenario="rejected credentials",
            injected=(
                f"wrong password for 1 of 3 accounts; 3 replicas, 100 callers for "
                f"{RUN_SECONDS:.0f} s, {BACKOFF_SECONDS:.0f} s back-off"
            ),
            callers_saw=report.summary(),
            upstream_calls=(
                f"{total.describe()}; logins of the rejected account "
                f"{upstream['rejected'].describe()} in {elapsed:.1f} s "
                f"(at most {allowed} allowed)"
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert report.problems == []
    rejected_answers = {
        (status, code) for name, status, code in report.answers if name == "rejected"
    }
    assert rejected_answers == {(503, "credentials_rejected")}
    rejected = sum(n for (name, _, _), n in report.answers.items() if name == "rejected")
    assert rejected > 0
    assert len(report.retry_after) == rejected, "a credentials_rejected without Retry-After"
    assert all(1 <= seconds <= BACKOFF_SECONDS for seconds in report.retry_after)
    assert 1 <= upstream["rejected"].calls <= allowed
    assert upstream["rejected"].outcomes.keys() == {"rejected"}
    for name in ("healthy-v1", "healthy-legacy"):
        assert report.served(name) > 100
        assert {status for n, status, _ in report.answers if n == name} == {200}
        assert upstream[name].calls == 1, f"{name}: one login for the whole run"
    assert total.rate_limited == 0
    logs = [replica.log() for replica in replicas]
    assert any("rejected the account's credentials" in log for log in logs)
    assert not any(WRONG_PASSWORD in log for log in logs)
    for replica in replicas:
        assert replica.stop() == 0
