"""The audit log of real `serve` processes: several workers and replicas append to one file,
a graceful stop loses no line, and with `fail_closed` an unwritable file stops every token."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import ReliabilityRow, UpstreamCounts, account, broker_config, write_config
from tests.support import ServeProcess

if TYPE_CHECKING:
    from tests.e2e.conftest import Record

ACCOUNTS = {"audited-v1": account(0, "v1"), "audited-legacy": account(1, "legacy")}
CALLERS = 12
REQUESTS_PER_CALLER = 40
STOP_SECONDS = 60


def _lines(path: Path) -> list[dict[str, Any]]:
    # json.loads fails on a line two processes wrote into each other.
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()]


async def _load(urls: list[str], key: str) -> dict[str, int]:
    """Concurrent callers, each request with an id of its own, every tenth with a wrong key;
    the status each request id was answered with."""
    answered: dict[str, int] = {}

    async def caller(number: int, client: httpx.AsyncClient) -> None:
        for index in range(REQUESTS_PER_CALLER):
            rid = f"c{number}-{index}"
            name = list(ACCOUNTS)[index % len(ACCOUNTS)]
            wrong = index % 10 == 9
            response = await client.get(
                f"{urls[(number + index) % len(urls)]}/v1/accounts/{name}/token",
                headers={
                    "Authorization": f"Bearer {'mgb_wrong' if wrong else key}",
                    "X-Request-ID": rid,
                },
            )
            answered[rid] = response.status_code

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(caller(number, client) for number in range(CALLERS)))
    return answered


async def test_a_graceful_stop_loses_no_audit_line(
    tmp_path: Path, redis_url: str, e2e_simulator: SimulatorControl, reliability: Record
) -> None:
    """Two replicas of two workers each append to one audit file under load and are stopped
    with SIGTERM right after the last answer, while lines still wait in their batches: the
    file then has exactly one whole line per request answered, denials included."""
    e2e_simulator.set(token_lifetime_seconds=600)
    key, digest = new_api_key()
    audit = tmp_path / "audit.log"
    config = write_config(
        tmp_path / "broker.yaml",
        broker_config(
            redis_url, e2e_simulator.base_url, digest, ACCOUNTS, audit={"path": str(audit)}
        ),
    )
    replicas = [ServeProcess(config, tmp_path / f"broker-{index}", workers=2) for index in range(2)]
    try:
        for replica in replicas:
            await asyncio.to_thread(replica.wait_until_ok)
        answered = await _load([replica.url for replica in replicas], key)
        for replica in replicas:
            replica.process.send_signal(signal.SIGTERM)
        for replica in replicas:
            assert await asyncio.to_thread(replica.process.wait, STOP_SECONDS) == 0, replica.log()
            assert "Traceback" not in replica.log()
    finally:
        for replica in replicas:
            replica.kill()

    lines = _lines(audit)
    seen = Counter(line["request_id"] for line in lines)
    assert set(seen) == set(answered)
    assert set(seen.values()) == {1}
    outcomes = Counter((line["status"], line["outcome"]) for line in lines)
    statuses = Counter(answered.values())
    assert outcomes == {(200, "issued"): statuses[200], (401, "denied"): statuses[401]}
    assert len({line["pid"] for line in lines}) >= 2
    assert key not in audit.read_text(encoding="utf-8")
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="audit log on graceful stop",
            injected=(
                f"SIGTERM to 2 replicas of 2 workers right after {len(answered)} requests, "
                "all appending to one audit file"
            ),
            callers_saw=", ".join(
                f"{count} x {status}" for status, count in sorted(statuses.items())
            )
            + f"; {len(lines)} audit lines, one per request, none lost or interleaved",
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )


async def test_fail_closed_with_an_unwritable_file_serves_no_token(
    tmp_path: Path, redis_url: str, e2e_simulator: SimulatorControl, reliability: Record
) -> None:
    """With `fail_closed` and an audit path that cannot be created, `serve` starts but is not
    ready, saying why, and answers every token request 503 `audit_unavailable` with
    Retry-After; no token leaves the broker."""
    key, digest = new_api_key()
    blocker = tmp_path / "audit"
    blocker.write_text("a file where the log directory should be", encoding="utf-8")
    config = write_config(
        tmp_path / "broker.yaml",
        broker_config(
            redis_url,
            e2e_simulator.base_url,
            digest,
            ACCOUNTS,
            audit={"path": str(blocker / "audit.log"), "fail_closed": True},
        ),
    )
    replica = ServeProcess(config, tmp_path / "broker", workers=2)
    try:
        await asyncio.to_thread(replica.wait_until_ok, "/healthz")
        async with httpx.AsyncClient(base_url=replica.url, timeout=30) as client:
            ready = await client.get("/readyz")
            answers = [
                await client.get(
                    f"/v1/accounts/{name}/token", headers={"Authorization": f"Bearer {key}"}
                )
                for name in ACCOUNTS
                for _ in range(3)
            ]
        assert replica.stop() == 0, replica.log()
    finally:
        replica.kill()

    assert ready.status_code == 503
    [check] = [check for check in ready.json()["checks"] if check["name"] == "audit"]
    assert check["ok"] is False
    assert "Not a directory" in check["detail"]
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["code"] == "audit_unavailable"
        assert int(answer.headers["Retry-After"]) >= 1
        assert "access_token" not in answer.text
    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="audit log unwritable, fail_closed",
            injected="audit.path below a regular file; fail_closed true; 2 workers",
            callers_saw=(
                f"/readyz 503 (audit: Not a directory); {len(answers)} x 503 audit_unavailable"
            ),
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
