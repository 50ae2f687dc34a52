"""Monogoto rejects an account's password: while a hundred callers hammer the fleet, until
Monogoto accepts it again, and until a rollout corrects it."""

from __future__ import annotations

import asyncio
import copy
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    USERNAMES,
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    account_credentials,
    account_statuses,
    limited_config,
    scrape,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

#: Monogoto's limit, which is the replicas' auth budget: 20 calls per 5 s.
LIMIT = 20
PERIOD_SECONDS = 5
BACKOFF_SECONDS = 5.0
RUN_SECONDS = 8.0
WRONG_PASSWORD = "not-the-password-of-user02"
ROLLOUT_WRONG_PASSWORD = "not-the-password-of-user06"
ACCOUNTS = {
    "rejected": account(2, "v1", password=WRONG_PASSWORD),
    "healthy-v1": account(3, "v1"),
    "healthy-legacy": account(4, "legacy"),
}


def rejection_config(
    simulator: SimulatorControl,
    redis_url: str,
    accounts: dict[str, dict[str, str]],
    backoff: float,
    *,
    lifetime: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """Monogoto's limit as the budget and `backoff` after a rejection (Monogoto's tokens of
    `lifetime` seconds if given): the caller key and the config."""
    return limited_config(
        simulator,
        redis_url,
        accounts,
        LIMIT,
        PERIOD_SECONDS,
        lifetime=lifetime,
        refresh={"rejected_backoff_seconds": backoff},
    )


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
    key, config = rejection_config(e2e_simulator, redis_url, ACCOUNTS, BACKOFF_SECONDS)
    started = time.monotonic()  # the first replica tries the logins as soon as it starts
    replicas = start_brokers(write_config(tmp_path / "broker.yaml", config), 3)
    callers = Callers(Rotation([r.url for r in replicas]), key, ACCOUNTS, concurrency=100)
    await callers.run(RUN_SECONDS)
    elapsed = time.monotonic() - started

    report = callers.report
    upstream = UpstreamCounts.per_account(e2e_simulator, ACCOUNTS)
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


REJECTED_GAUGE = "monogoto_broker_credentials_rejected"
# How soon after one replica's login every replica must have let go of the rejection.
CLEARED_WITHIN_SECONDS = 5.0


def rejected_gauge(url: str, name: str) -> float | None:
    """A replica's `credentials_rejected` gauge for account `name`; None without a sample."""
    for labels, value in scrape(url).get(REJECTED_GAUGE, []):
        if labels.get("account") == name:
            return value
    return None


def fleet_view(urls: list[str], key: str, name: str) -> list[tuple[float | None, str]]:
    """Each replica's gauge and `/v1/accounts` status for account `name`."""
    return [(rejected_gauge(url, name), account_statuses(url, key)[name]) for url in urls]


async def eventually_served(
    urls: list[str], key: str, name: str, *, within: float
) -> list[httpx.Response]:
    """One token request for `name` at each replica, repeated until every one answers 200."""
    deadline = time.monotonic() + within
    while True:
        answers = await ask_each(urls, key, name)
        if all(r.status_code == 200 for r in answers) or time.monotonic() > deadline:
            return answers
        await asyncio.sleep(0.2)


async def ask_each(urls: list[str], key: str, name: str) -> list[httpx.Response]:
    """One token request for `name` at each replica."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        return list(
            await asyncio.gather(*(client.get(f"{url}/v1/accounts/{name}/token") for url in urls))
        )


async def test_a_rejection_ends_on_every_replica_once_any_replica_logs_in(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Monogoto refuses an account's logins (401) on three replicas, then takes them again:
    once one replica has logged in, every replica's credentials_rejected gauge is 0 and
    /v1/accounts says ok within seconds, and no other replica logs in again for that."""
    name = "recovers-v1"
    accounts = {name: account(5, "v1")}
    key, config = rejection_config(
        e2e_simulator, redis_url, accounts, BACKOFF_SECONDS, lifetime=600
    )
    # Monogoto refuses the password for now. The only v1 account: the rule meets only its logins.
    e2e_simulator.fault("status", endpoint="v1_token", status=401, count=1000)
    started = time.monotonic()
    urls = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    stop = asyncio.Event()
    callers = Callers(Rotation(urls), key, accounts, concurrency=5, pause=0.1)
    load = asyncio.create_task(callers.run(until=stop))
    try:
        rejected_everywhere = [(1.0, "credentials_rejected")] * len(urls)
        await eventually(lambda: fleet_view(urls, key, name) == rejected_everywhere)
        e2e_simulator.clear_faults()  # Monogoto takes the password again
        fixed_at = time.monotonic()
        await eventually(
            lambda: UpstreamCounts.read(e2e_simulator).outcomes["ok"] > 0,
            within=BACKOFF_SECONDS + 10,
        )
        logged_in_at = time.monotonic()
        await eventually(
            lambda: fleet_view(urls, key, name) == [(0.0, "ok")] * len(urls),
            within=CLEARED_WITHIN_SECONDS,
        )
        cleared_in = time.monotonic() - logged_in_at
        await asyncio.sleep(1.0)  # callers get the token from every replica
    finally:
        stop.set()
        await load
    elapsed = time.monotonic() - started

    report = callers.report
    total = UpstreamCounts.read(e2e_simulator)
    refused = total.outcomes["injected_status"]
    allowed = math.floor(elapsed / BACKOFF_SECONDS) + 1
    reliability(
        ReliabilityRow(
            scenario="rejected credentials accepted again",
            injected=(
                f"Monogoto answers 401 to the logins of 1 v1 account, then accepts them "
                f"(3 replicas, {BACKOFF_SECONDS:.0f} s back-off)"
            ),
            callers_saw=(
                f"{report.summary()}; the first login {logged_in_at - fixed_at:.1f} s after the "
                f"fix, every replica's gauge 0 and status ok {cleared_in:.1f} s after it"
            ),
            upstream_calls=f"{total.describe()}; {refused} refused logins in {elapsed:.1f} s",
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert report.problems == []
    assert set(report.codes()) <= {"200", "503 credentials_rejected"}, report.summary()
    assert report.codes()["503 credentials_rejected"] > 0
    assert report.served() > 0
    assert 1 <= refused <= allowed
    # One login ended the rejection for the whole fleet: the others took its token.
    assert total.outcomes["ok"] == 1
    assert total.rate_limited == 0


async def test_a_corrected_password_logs_in_at_once_despite_the_old_rejection(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Two replicas with a wrong password leave a rejection marker good for 300 s; a replica
    rolled out with the corrected password is not held back by it and logs in at once. The two
    old replicas serve its token within seconds, while still reporting that their own password
    is rejected (until they are rolled out too), without trying it again."""
    name = "rollout-v1"
    index = 6
    backoff = 300.0
    key, wrong = rejection_config(
        e2e_simulator,
        redis_url,
        {name: account(index, "v1", password=ROLLOUT_WRONG_PASSWORD)},
        backoff,
        lifetime=600,
    )
    old_replicas = start_brokers(write_config(tmp_path / "wrong.yaml", wrong), 2)
    old = [replica.url for replica in old_replicas]
    await eventually(
        lambda: fleet_view(old, key, name) == [(1.0, "credentials_rejected")] * len(old)
    )
    before = await ask_each(old, key, name)

    corrected = copy.deepcopy(wrong)  # the same encryption keys, Redis and account
    corrected["accounts"][name]["password"] = account(index)["password"]
    rollout_at = time.monotonic()
    [new] = start_brokers(write_config(tmp_path / "corrected.yaml", corrected), 1)
    user = USERNAMES[index]
    await eventually(lambda: UpstreamCounts.read(e2e_simulator, user).outcomes["ok"] > 0, within=15)
    logged_in_in = time.monotonic() - rollout_at
    logged_in_at = time.monotonic()
    after = await eventually_served([*old, new.url], key, name, within=CLEARED_WITHIN_SECONDS)
    cleared_in = time.monotonic() - logged_in_at
    credentials = [account_credentials(url, key)[name] for url in [*old, new.url]]

    total = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="corrected password rolled out",
            injected=(
                f"wrong password on 2 replicas ({backoff:.0f} s back-off), then a replica "
                "with the corrected password"
            ),
            callers_saw=(
                f"old replicas before: {sorted(r.status_code for r in before)} "
                f"(Retry-After {sorted(r.headers.get('Retry-After', '-') for r in before)}); "
                f"new replica logged in {logged_in_in:.1f} s after its start; old replicas "
                f"serving its token {cleared_in:.1f} s later; then "
                f"{sorted(r.status_code for r in after)} from all 3; credentials {credentials}"
            ),
            upstream_calls=total.describe(),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert [r.status_code for r in before] == [503] * len(old)
    assert {r.json()["code"] for r in before} == {"credentials_rejected"}
    # Not held back by a marker of other credentials: one rejected login, one good one.
    assert total.outcomes == {"rejected": 1, "ok": 1}
    assert logged_in_in < backoff / 10
    assert [r.status_code for r in after] == [200] * 3
    assert len({r.json()["access_token"] for r in after}) == 1
    assert rejected_gauge(new.url, name) in (None, 0.0)
    # The old replicas' password is still wrong, and they say so (the alert's gauge too).
    assert credentials == ["rejected", "rejected", "verified"]
    assert fleet_view(old, key, name) == [(1.0, "credentials_rejected")] * len(old)
    assert account_statuses(new.url, key)[name] == "ok"
    assert not any(ROLLOUT_WRONG_PASSWORD in r.log() for r in [*old_replicas, new])


async def test_a_wrong_password_is_found_out_at_start_while_valid_tokens_are_stored(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A replica started with a wrong password over a valid stored token (v1: renewed by
    refresh tokens, so the password would not be used for hours) verifies it with one login
    within one budget slot: `credentials: rejected` and the alert's gauge 1, while callers
    keep getting the stored token."""
    name = "verified-v1"
    index = 7
    key, right = rejection_config(
        e2e_simulator, redis_url, {name: account(index, "v1")}, 300.0, lifetime=3600
    )
    [first] = start_brokers(write_config(tmp_path / "right.yaml", right), 1)
    [token] = await eventually_served([first.url], key, name, within=15)
    assert account_credentials(first.url, key)[name] == "verified"

    wrong = copy.deepcopy(right)  # the same encryption keys, Redis and account
    wrong["accounts"][name]["password"] = "not-the-password-of-user07"
    started = time.monotonic()
    [second] = start_brokers(write_config(tmp_path / "wrong.yaml", wrong), 1)
    slot = PERIOD_SECONDS / LIMIT
    await eventually(lambda: account_credentials(second.url, key)[name] == "rejected", within=15)
    found_in = time.monotonic() - started
    gauge = rejected_gauge(second.url, name)
    [served] = await ask_each([second.url], key, name)
    await asyncio.sleep(1.0)  # no second attempt follows
    user = UpstreamCounts.read(e2e_simulator, USERNAMES[index])
    reliability(
        ReliabilityRow(
            scenario="wrong password at start over a valid token",
            injected="a replica started with a wrong password while a valid v1 token is stored",
            callers_saw=(
                f"rejected shown {found_in:.1f} s after the replica's start (budget slot "
                f"{slot:.2f} s), gauge {gauge}; token request {served.status_code}"
            ),
            upstream_calls=user.describe(),
            rate_limited=user.rate_limited,
            reused=user.reused,
        )
    )
    assert gauge == 1.0
    assert served.status_code == 200
    assert served.json()["access_token"] == token.json()["access_token"]
    assert user.outcomes == {"ok": 1, "rejected": 1}  # the first login, one verification
    assert account_credentials(first.url, key)[name] == "verified"
    assert "not-the-password-of-user07" not in second.log()
