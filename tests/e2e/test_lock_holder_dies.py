"""The replica holding accounts' locks dies in the middle of its upstream calls, with the
default timeout and retry settings."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    account_statuses,
    limited_config,
    ok_on_every_replica,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

# The product's default timeout (the harness sets 5 s); the retry settings are not touched
# (4 attempts, 30 s), so a live holder may take up to 2 x (30 + 10) s for one renewal.
TIMEOUT_SECONDS = 10.0
# Defaults the broker runs with: the lock lease and the longest a caller is held.
LEASE_SECONDS = 9.0
MAX_WAIT_SECONDS = 10.0
# What the issue allows: a survivor serves a new token within 15 s of the holder's death, and
# a caller is answered within max_wait plus a little for the HTTP round trip on a busy host.
TAKEOVER_BOUND_SECONDS = 15.0
WAIT_MARGIN_SECONDS = 2.0
# Monogoto holds the doomed replica's calls longer than its timeout: they never finish.
HELD_SECONDS = 40.0
LIFETIME_SECONDS = 600
# Unmeetable by a token more than 5 s old: a forced renewal (the token stays valid meanwhile),
# which a token just obtained still meets (so a repeated request is not forced again).
FORCING_MIN_TTL = LIFETIME_SECONDS - 5
COLD, RENEWED = "cold", "dies-v1"
# The cold account's first login is held (legacy: a login); the v1 account's forced renewal is
# a refresh (a single-use token).
ACCOUNTS = {COLD: account(0, "legacy"), RENEWED: account(1, "v1")}
COLD_CALLERS = 4
# The cold account's callers have waited this long when the holder dies: the first ones reach
# api.max_wait_seconds before a survivor can take over.
ASKING_BEFORE_KILL_SECONDS = 4.0
GIVE_UP_SECONDS = 45.0


class TimedCallers(Callers):
    """Callers that also note the longest any one request took."""

    def __init__(self, rotation: Rotation, key: str, accounts: list[str], **options: int) -> None:
        super().__init__(rotation, key, accounts, **options)
        self.longest = 0.0

    async def call(self, client: httpx.AsyncClient, name: str) -> None:
        """One timed token request."""
        started = time.monotonic()
        await super().call(client, name)
        self.longest = max(self.longest, time.monotonic() - started)


@dataclass
class ColdAsks:
    """What the callers of the cold account saw: each request's wait, answers by code, when
    tokens were served (monotonic clock) and 503s without Retry-After."""

    waits: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    served_at: list[float] = field(default_factory=list)
    retry_after: list[int] = field(default_factory=list)
    missing_retry_after: int = 0


async def ask_cold(
    client: httpx.AsyncClient, url: str, seen: ColdAsks, stop: asyncio.Event
) -> None:
    """Ask `url` for the cold account's token until `stop`; after a 503, ask again soon (more
    often than Retry-After says, to time the takeover closely)."""
    while not stop.is_set():
        started = time.monotonic()
        response = await client.get(f"{url}/v1/accounts/{COLD}/token")
        seen.waits.append(time.monotonic() - started)
        if response.status_code == 200:
            seen.answers["200"] += 1
            seen.served_at.append(time.monotonic())
        else:
            seen.answers[f"{response.status_code} {response.json().get('code', '-')}"] += 1
            if "Retry-After" in response.headers:
                seen.retry_after.append(int(response.headers["Retry-After"]))
            else:
                seen.missing_retry_after += 1
        await asyncio.sleep(0.25)


async def test_a_survivor_takes_over_when_the_lock_holder_dies_mid_call(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """With the default timeout and retries, a replica killed in the middle of a cold
    account's first login and of a v1 refresh holds nobody up for long: every caller request
    is answered within api.max_wait_seconds (200, or 503 with Retry-After), a survivor serves
    the cold account within 15 s of the kill, callers of the account with a valid token are
    served throughout, and the spent refresh token is never sent again."""
    key, config = limited_config(
        e2e_simulator,
        redis_url,
        ACCOUNTS,
        limit=50,
        period_seconds=10,
        upstream={"timeout_seconds": TIMEOUT_SECONDS},
        lifetime=LIFETIME_SECONDS,
    )
    other_key, other_digest = new_api_key()
    # A second caller, whose forced renewal at a survivor is not refused as a repeat of the
    # first caller's.
    config["callers"]["other"] = {"api_key_sha256": other_digest, "accounts": [RENEWED]}
    path = write_config(tmp_path / "broker.yaml", config)
    cold_user, renewed_user = (ACCOUNTS[name]["username"] for name in (COLD, RENEWED))

    # The doomed replica starts alone: it takes the cold account's lock for its first login,
    # which Monogoto holds (every retry too) until the replica dies.
    e2e_simulator.fault("delay", endpoint="legacy_auth", seconds=HELD_SECONDS, count=5)
    (doomed,) = start_brokers(path, 1)
    await eventually(lambda: e2e_simulator.calls("legacy_auth", user=cold_user) >= 1)
    await eventually(lambda: account_statuses(doomed.url, key)[RENEWED] == "ok")
    survivors = start_brokers(path, 2)
    await ok_on_every_replica([s.url for s in survivors], key, RENEWED)
    rotation = Rotation([s.url for s in survivors])
    headers = {"Authorization": f"Bearer {key}"}
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        # Callers of the account with a valid token, and of the cold account, on the survivors.
        callers = TimedCallers(rotation, key, [RENEWED], concurrency=10)
        load = asyncio.create_task(callers.run(until=stop))
        cold = ColdAsks()
        asking = [
            asyncio.create_task(ask_cold(client, survivors[i % 2].url, cold, stop))
            for i in range(COLD_CALLERS)
        ]
        # A caller forces a renewal of the v1 account at the doomed replica: it notes the
        # refresh token as spent and sends it; Monogoto holds the answer.
        current = (await client.get(f"{doomed.url}/v1/accounts/{RENEWED}/token")).json()
        token_old_enough = current["expires_in"] - FORCING_MIN_TTL + 1.0
        await asyncio.sleep(max(ASKING_BEFORE_KILL_SECONDS, token_old_enough))
        e2e_simulator.fault("delay", endpoint="v1_refresh", seconds=HELD_SECONDS)
        forcing = asyncio.create_task(
            client.get(
                f"{doomed.url}/v1/accounts/{RENEWED}/token", params={"min_ttl": FORCING_MIN_TTL}
            )
        )
        await eventually(lambda: e2e_simulator.calls("v1_refresh", user=renewed_user) >= 1)
        doomed.kill()
        killed_at = time.monotonic()
        e2e_simulator.clear_faults()  # the survivors' calls are answered at once
        died = await asyncio.gather(forcing, return_exceptions=True)

        # Another caller forces the same renewal at a survivor (always the same one, so that
        # a repeat joins the renewal under way instead of forcing one more).
        other = {"Authorization": f"Bearer {other_key}"}
        old_token = (await client.get(f"{survivors[0].url}/v1/accounts/{RENEWED}/token")).json()

        renew_waits: list[float] = []

        async def renew_elsewhere() -> tuple[float, Counter[str]]:
            answers: Counter[str] = Counter()
            while True:
                started = time.monotonic()
                response = await client.get(
                    f"{survivors[0].url}/v1/accounts/{RENEWED}/token",
                    params={"min_ttl": FORCING_MIN_TTL},
                    headers=other,
                )
                renew_waits.append(time.monotonic() - started)
                answers[str(response.status_code)] += 1
                if response.status_code == 200:
                    assert response.json()["access_token"] != old_token["access_token"]
                    return time.monotonic() - killed_at, answers
                assert response.status_code == 503, response.text
                await asyncio.sleep(0.25)

        async with asyncio.timeout(GIVE_UP_SECONDS):
            renewed_after, renew_answers = await renew_elsewhere()
            await eventually(
                lambda: any(at > killed_at for at in cold.served_at), within=GIVE_UP_SECONDS
            )
        stop.set()
        await asyncio.gather(load, *asking)

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    refreshes = e2e_simulator.calls("v1_refresh", user=renewed_user)
    per_account = {
        name: counts.describe()
        for name, counts in UpstreamCounts.per_account(e2e_simulator, ACCOUNTS).items()
    }
    takeover = min(at for at in cold.served_at if at > killed_at) - killed_at
    longest = max(callers.longest, *cold.waits, *renew_waits)
    reliability(
        ReliabilityRow(
            scenario="lock holder dies",
            injected=(
                f"replica SIGKILLed mid-call (a cold account's first login and a v1 refresh, "
                f"held by Monogoto past the timeout); default timeout {TIMEOUT_SECONDS:.0f} s "
                f"and retries, lease {LEASE_SECONDS:.0f} s, max wait {MAX_WAIT_SECONDS:.0f} s"
            ),
            callers_saw=(
                f"valid-token account: {report.summary()}; cold account: "
                f"{', '.join(f'{n} x {c}' for c, n in sorted(cold.answers.items()))} "
                f"(Retry-After {sorted(set(cold.retry_after))}); "
                f"longest wait {longest:.2f} s; cold account served {takeover:.1f} s after "
                f"the kill; forced renewal at a survivor {renewed_after:.1f} s after it"
            ),
            upstream_calls=f"{total.describe()}; per account {per_account}",
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert all(isinstance(outcome, httpx.TransportError) for outcome in died), (
        "the holder answered before it was killed; the scenario did not happen"
    )
    assert all(at > killed_at for at in cold.served_at), "cold account served before the kill"
    # No caller waits longer than api.max_wait_seconds; a 503 tells it when to come back.
    assert longest <= MAX_WAIT_SECONDS + WAIT_MARGIN_SECONDS
    assert set(cold.answers) <= {"200", "503 upstream_unavailable"}, cold.answers
    assert cold.missing_retry_after == 0
    assert all(1 <= seconds <= MAX_WAIT_SECONDS for seconds in cold.retry_after)
    assert set(renew_answers) <= {"200", "503"}
    assert takeover <= TAKEOVER_BOUND_SECONDS
    assert renewed_after <= TAKEOVER_BOUND_SECONDS
    # The account with a valid token: served every time, though its holder died mid-refresh.
    assert report.failed() == 0, report.summary()
    assert report.problems == []
    assert total.rate_limited == 0
    assert total.reused == 0
    # The survivor logged in: the refresh token the doomed replica sent was not sent again.
    assert refreshes == 1
