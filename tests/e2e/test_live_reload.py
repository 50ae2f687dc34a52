"""The config changes under load, the way Kubernetes changes mounted files (a `..data`
symlink swapped to a new directory): a password rotated at Monogoto and in the Secret at the
same moment, caller keys added and removed, a broken config. Two `serve` replicas reload
themselves; callers see no failure and no replica restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    USERNAMES,
    USERS,
    BackgroundLoad,
    Callers,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    limited_config,
    readiness,
)
from tests.support import SecretVolume, ServeProcess, eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIMIT = 20
PERIOD_SECONDS = 60
# Short legacy tokens: every renewal is a login with the password, one every 5 s.
LIFETIME_SECONDS = 10
# A swapped file is seen within one poll (2 s); this leaves room for a busy machine.
RELOAD_WITHIN_SECONDS = 10.0
RELOADS = "monogoto_broker_config_reload_total"
CONFIG = "broker.yaml"


async def reloads(urls: list[str], result: str) -> list[float]:
    """Each replica's `config_reload_total{result}`."""
    async with httpx.AsyncClient(timeout=10) as client:
        texts = await asyncio.gather(*(client.get(f"{url}/metrics") for url in urls))
    counts = []
    for response in texts:
        prefix = f'{RELOADS}{{result="{result}"}} '
        found = [line for line in response.text.splitlines() if line.startswith(prefix)]
        counts.append(float(found[0].removeprefix(prefix)) if found else 0.0)
    return counts


async def seconds_until(urls: list[str], check: Callable[[str], Any], since: float) -> list[float]:
    """For each replica, the seconds from `since` (monotonic) until the async `check(url)`
    holds, all replicas watched together."""

    async def one(url: str) -> float:
        await eventually(lambda: check(url), within=RELOAD_WITHIN_SECONDS)
        return time.monotonic() - since

    return list(await asyncio.gather(*(one(url) for url in urls)))


async def counted(urls: list[str], result: str, before: list[float], since: float) -> list[float]:
    """Seconds from `since` until each replica counted one more reload of `result`."""

    async def check(url: str) -> bool:
        index = urls.index(url)
        return (await reloads([url], result))[0] > before[index]

    return await seconds_until(urls, check, since)


async def answered(url: str, key: str, status: int) -> bool:
    """Whether a token request with caller key `key` at `url` is answered `status`."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{url}/v1/accounts/fleet/token", headers={"Authorization": f"Bearer {key}"}
        )
    return response.status_code == status


def mounted_config(root: Path, config: dict[str, Any]) -> tuple[SecretVolume, Path]:
    """`config` as the one file of a ConfigMap-like volume under `root`; the volume and the
    file's path."""
    volume = SecretVolume(root)
    volume.write({CONFIG: yaml.safe_dump(config)})
    return volume, volume.path(CONFIG)


def pids(replicas: list[ServeProcess]) -> list[int | None]:
    """Each replica's process id, None once it exited."""
    return [None if r.process.poll() is not None else r.process.pid for r in replicas]


def seconds(values: list[float]) -> str:
    """`[1.2, 0.8] s`."""
    return "[" + ", ".join(f"{value:.1f}" for value in values) + "] s"


async def test_a_password_rotated_at_monogoto_and_in_the_secret_at_once(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Monogoto takes only the new password from the moment the Secret's `..data` is swapped
    to it: each replica reloads within seconds, the next login uses the new password, callers
    see no failure, and the replicas are the same processes."""
    user = USERNAMES[10]
    new_password = "rotated-password-of-user10"
    secret = SecretVolume(tmp_path / "secret")
    secret.write({"password": USERS[user]})
    key, config = limited_config(
        e2e_simulator,
        redis_url,
        {"fleet": account(10, "legacy")},
        LIMIT,
        PERIOD_SECONDS,
        lifetime=LIFETIME_SECONDS,
    )
    config["accounts"]["fleet"] = {
        "username": user,
        "password_file": str(secret.path("password")),
        "dialect": "legacy",
    }
    _, path = mounted_config(tmp_path / "config", config)
    replicas = start_brokers(path, 2)
    urls = [replica.url for replica in replicas]
    started = pids(replicas)
    load = BackgroundLoad(Callers(Rotation(urls), key, ["fleet"], concurrency=10, pause=0.02))
    await asyncio.sleep(3)  # callers get tokens first
    applied = await reloads(urls, "applied")
    logins = UpstreamCounts.read(e2e_simulator, user).outcomes["ok"]

    e2e_simulator.set_password(user, new_password)
    secret.write({"password": new_password})
    swapped = time.monotonic()
    reloaded_in = await counted(urls, "applied", applied, swapped)
    await eventually(
        lambda: UpstreamCounts.read(e2e_simulator, user).outcomes["ok"] > logins,
        within=LIFETIME_SECONDS + RELOAD_WITHIN_SECONDS,
    )
    logged_in_after = time.monotonic() - swapped
    tokens_at_login = len(load.callers.report.tokens["fleet"])
    # Another login or two with the new password, while callers go on.
    await eventually(
        lambda: UpstreamCounts.read(e2e_simulator, user).outcomes["ok"] > logins + 2,
        within=2 * LIFETIME_SECONDS + RELOAD_WITHIN_SECONDS,
    )
    report = await load.end()

    upstream = UpstreamCounts.read(e2e_simulator, user)
    reliability(
        ReliabilityRow(
            scenario="password rotated live",
            injected=(
                "Monogoto's password and the Secret's `..data` changed at once; 2 replicas, "
                f"10 callers, {LIFETIME_SECONDS} s legacy tokens"
            ),
            callers_saw=(
                f"{report.summary()}; reloaded {seconds(reloaded_in)} after the swap, "
                f"first login with the new password after {logged_in_after:.1f} s"
            ),
            upstream_calls=upstream.describe(),
            rate_limited=upstream.rate_limited,
            reused=upstream.reused,
        )
    )
    assert report.problems == []
    assert report.failed() == 0
    assert len(report.tokens["fleet"]) > tokens_at_login, "no token of the new login served"
    assert pids(replicas) == started
    for replica in replicas:
        log = replica.log()
        assert "config reloaded (passwords changed: fleet)" in log
        assert new_password not in log
        assert USERS[user] not in log


async def test_caller_keys_added_and_removed_and_a_broken_config_under_load(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A caller's new key works on every replica within seconds and its old one then gets
    401 once removed, while the other callers see nothing; a broken config is refused by each
    replica (counted as invalid), which keeps serving the one it had, ready."""
    key, config = limited_config(
        e2e_simulator, redis_url, {"fleet": account(11, "v1")}, LIMIT, PERIOD_SECONDS
    )
    old_key, old_digest = new_api_key()
    new_key, new_digest = new_api_key()
    config["callers"]["billing"] = {"api_key_sha256": [old_digest], "accounts": ["fleet"]}
    volume, path = mounted_config(tmp_path / "config", config)
    replicas = start_brokers(path, 2)
    urls = [replica.url for replica in replicas]
    started = pids(replicas)
    load = BackgroundLoad(Callers(Rotation(urls), key, ["fleet"], concurrency=10, pause=0.02))

    config["callers"]["billing"]["api_key_sha256"] = [old_digest, new_digest]
    volume.write({CONFIG: yaml.safe_dump(config)})
    added_in = await seconds_until(urls, lambda url: answered(url, new_key, 200), time.monotonic())
    assert all([await answered(url, old_key, 200) for url in urls])

    config["callers"]["billing"]["api_key_sha256"] = [new_digest]
    volume.write({CONFIG: yaml.safe_dump(config)})
    removed_in = await seconds_until(
        urls, lambda url: answered(url, old_key, 401), time.monotonic()
    )
    assert all([await answered(url, new_key, 200) for url in urls])

    invalid = await reloads(urls, "invalid")
    broken = {**config, "refresh": {**config["refresh"], "fraction": 2}}
    volume.write({CONFIG: yaml.safe_dump(broken)})
    refused_in = await counted(urls, "invalid", invalid, time.monotonic())
    assert all([await answered(url, new_key, 200) for url in urls])
    assert [readiness(url).status for url in urls] == [200, 200]
    report = await load.end()

    upstream = UpstreamCounts.read(e2e_simulator)
    reliability(
        ReliabilityRow(
            scenario="caller keys and a broken config live",
            injected=(
                "a key added to a caller, then its old key removed, then `refresh.fraction: 2`, "
                "each by a `..data` swap; 2 replicas, 10 callers"
            ),
            callers_saw=(
                f"{report.summary()}; new key working after {seconds(added_in)}, old key "
                f"401 after {seconds(removed_in)}, broken config refused after "
                f"{seconds(refused_in)}"
            ),
            upstream_calls=upstream.describe(),
            rate_limited=upstream.rate_limited,
            reused=upstream.reused,
        )
    )
    assert report.problems == []
    assert report.failed() == 0
    assert pids(replicas) == started
    for replica in replicas:
        lines = replica.log_lines()
        assert sum('"config.reloaded"' in line for line in lines) == 2
        refusals = [line for line in lines if '"config.invalid"' in line]
        assert len(refusals) == 1
        assert "refresh.fraction: must be less than 1" in refusals[0]
