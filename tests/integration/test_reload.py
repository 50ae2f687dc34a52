"""Live reload of the config (`service.reload`): the broker app on a real Redis and the
simulator, its config file and secret files rewritten while it serves."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client import REGISTRY
from redis import Redis

from service.api import create_app
from service.config import ConfigError, load_settings
from service.keys import new_api_key, new_encryption_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import metric, scrape
from tests.integration.conftest import ENCRYPTION_KEYS
from tests.service_account_issuer import IssuerServer, SigningKey, claims, sign
from tests.support import SecretVolume, ServeProcess, eventually, free_port, served

pytestmark = pytest.mark.usefixtures("simulator")

ACCOUNT = "fleet-eu"
USERNAME = "ops@example.com"
# A reload is noticed within one poll (2 s) and applied at once.
_RELOAD_SECONDS = 10.0


class Broker:
    """The broker app served on a free port from `config`, with a client of it."""

    def __init__(self, config: Path, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http

    async def token(self, key: str, account: str = ACCOUNT) -> httpx.Response:
        """Ask for a token of `account` with caller key `key`."""
        return await self.http.get(
            f"/v1/accounts/{account}/token", headers={"Authorization": f"Bearer {key}"}
        )

    async def answers(self, key: str, account: str, status: int) -> None:
        """Wait until a token request of `account` with `key` is answered `status`."""

        async def check() -> bool:
            return (await self.token(key, account)).status_code == status

        await eventually(check, within=_RELOAD_SECONDS)


@asynccontextmanager
async def serving(config: Path) -> AsyncIterator[Broker]:
    """The broker app for the config file `config`, reloading it live."""
    async with served(create_app(load_settings(config), config=config)) as http:
        yield Broker(config, http)


def config_of(redis_url: str, simulator_url: str, **changes: Any) -> dict[str, Any]:
    """A legacy account on the simulator and a caller `billing`, with `changes` on top."""
    return {
        "redis_url": redis_url,
        "key_prefix": f"reload-{os.getpid()}-{free_port()}",
        "encryption_keys": ENCRYPTION_KEYS,
        "upstream": {"base_url": simulator_url, "dialect": "legacy", "timeout_seconds": 5},
        "accounts": {ACCOUNT: {"username": USERNAME, "password": "s3cret"}},
        "callers": {},
        **changes,
    }


def write(path: Path, config: dict[str, Any]) -> Path:
    """Replace the file at `path` with `config` in one rename, as an editor or kubelet does."""
    staged = path.with_suffix(".new")
    staged.write_text(yaml.safe_dump(config), encoding="utf-8")
    staged.replace(path)
    return path


def reloads(result: str) -> float:
    """`config_reload_total{result}` of this process so far."""
    value = REGISTRY.get_sample_value("monogoto_broker_config_reload_total", {"result": result})
    return value or 0.0


@pytest.fixture
def sim(simulator: SimulatorControl) -> SimulatorControl:
    """The simulator with its rate limit out of the way."""
    simulator.set(rate_limit=1000)
    return simulator


def caller(digests: list[str], accounts: list[str] | None = None) -> dict[str, Any]:
    """A caller's config with these key digests."""
    return {"api_key_sha256": digests, "accounts": accounts or ["*"]}


async def test_accounts_added_and_removed_are_served_and_refused(
    sim: SimulatorControl, tmp_path: Path, redis_url: str
) -> None:
    """An account added to the config is served within one poll; a removed one gets 403 like
    an account that never existed and its gauges go; the reload is counted as applied."""
    key, digest = new_api_key()
    base = config_of(redis_url, sim.base_url, callers={"billing": caller([digest])})
    config = write(tmp_path / "config.yaml", base)
    applied = reloads("applied")
    async with serving(config) as broker:
        assert (await broker.token(key)).status_code == 200
        assert (await broker.token(key, "fleet-us")).status_code == 403
        accounts = {
            **base["accounts"],
            "fleet-us": {"username": "demo@monogoto.example", "password": "demo-password"},
        }
        write(config, {**base, "accounts": accounts})
        await broker.answers(key, "fleet-us", 200)
        write(config, {**base, "accounts": {"fleet-us": accounts["fleet-us"]}})
        await broker.answers(key, ACCOUNT, 403)
        assert (await broker.token(key, "fleet-us")).status_code == 200
        # Its token's expiry is no longer exposed, so it cannot set off the expiry alert.
        expiry = "monogoto_broker_token_expiry_timestamp_seconds"
        assert REGISTRY.get_sample_value(expiry, {"account": ACCOUNT}) is None
        assert REGISTRY.get_sample_value(expiry, {"account": "fleet-us"})
    assert reloads("applied") == applied + 2


async def test_caller_keys_added_and_removed(
    sim: SimulatorControl, tmp_path: Path, redis_url: str
) -> None:
    """A key added next to a caller's key works, the removed one then gets 401, and a caller
    added with its own key works; other callers are not affected."""
    old_key, old_digest = new_api_key()
    new_key, new_digest = new_api_key()
    other_key, other_digest = new_api_key()
    ops_key, ops_digest = new_api_key()
    base = config_of(redis_url, sim.base_url)
    callers = {"billing": caller([old_digest]), "other": caller([other_digest])}
    config = write(tmp_path / "config.yaml", {**base, "callers": callers})
    async with serving(config) as broker:
        assert (await broker.token(new_key)).status_code == 401
        callers["billing"] = caller([old_digest, new_digest])
        write(config, {**base, "callers": callers})
        await broker.answers(new_key, ACCOUNT, 200)
        assert (await broker.token(old_key)).status_code == 200
        callers["billing"] = caller([new_digest])
        callers["ops"] = caller([ops_digest])
        write(config, {**base, "callers": callers})
        await broker.answers(old_key, ACCOUNT, 401)
        assert (await broker.token(new_key)).status_code == 200
        assert (await broker.token(ops_key)).status_code == 200
        assert (await broker.token(other_key)).status_code == 200


async def test_a_password_swapped_in_a_secret_volume_is_used_and_clears_the_rejection(
    sim: SimulatorControl, tmp_path: Path, redis_url: str
) -> None:
    """A wrong password gets the account rejected; the right one, swapped in like a
    Kubernetes Secret update (a symlink), is read within one poll and tried at once instead
    of after the rejection's back-off."""
    key, digest = new_api_key()
    secrets = SecretVolume(tmp_path / "secrets")
    secrets.write({"password": "not-the-password"})
    account = {"username": USERNAME, "password_file": str(secrets.path("password"))}
    config = write(
        tmp_path / "config.yaml",
        config_of(
            redis_url,
            sim.base_url,
            accounts={ACCOUNT: account},
            callers={"billing": caller([digest])},
            refresh={"rejected_backoff_seconds": 600},
        ),
    )
    async with serving(config) as broker:
        refused = await broker.token(key)
        assert refused.status_code == 503
        assert refused.json()["code"] == "credentials_rejected"
        secrets.write({"password": "s3cret"})
        await broker.answers(key, ACCOUNT, 200)


async def test_a_rejection_of_the_old_password_during_a_reload_holds_nothing_back(
    sim: SimulatorControl, tmp_path: Path, redis_url: str
) -> None:
    """Monogoto refuses the old password of a login that was under way when the new password
    was reloaded: the request gets a plain 503, and the next one logs in with the new password
    at once instead of waiting out the rejection's back-off."""
    key, digest = new_api_key()
    base = config_of(
        redis_url,
        sim.base_url,
        accounts={ACCOUNT: {"username": USERNAME, "password": "not-the-password"}},
        callers={"billing": caller([digest])},
        refresh={"rejected_backoff_seconds": 600},
    )
    config = write(tmp_path / "config.yaml", base)
    # The first login, made as the broker starts, takes its time: long enough for the reload
    # to land while it is under way, even on a loaded machine (within api.max_wait_seconds).
    sim.set(latency_seconds=6)
    async with serving(config) as broker:
        request = asyncio.create_task(broker.token(key))

        async def refreshing() -> bool:
            response = await broker.http.get(
                "/v1/accounts", headers={"Authorization": f"Bearer {key}"}
            )
            return bool(response.json()["accounts"][0]["status"] == "refreshing")

        await eventually(refreshing)
        write(config, {**base, "accounts": {ACCOUNT: {"username": USERNAME, "password": "s3cret"}}})
        os.kill(os.getpid(), signal.SIGHUP)
        sim.set(latency_seconds=0)
        refused = await request
        assert refused.status_code == 503
        assert refused.json()["code"] == "upstream_unavailable"
        await broker.answers(key, ACCOUNT, 200)


async def test_a_new_key_ring_seals_new_records_and_opens_old_ones(
    sim: SimulatorControl, tmp_path: Path, redis_url: str
) -> None:
    """After a reload that puts a new key first in the ring, a record another replica sealed
    with the old key (still in the ring) is read, and the next record written is sealed with
    the new key."""
    key, digest = new_api_key()
    other_key, other_digest = new_api_key()
    old_ring, new_ring = new_encryption_key(), new_encryption_key()
    callers = {"billing": caller([digest]), "ops": caller([other_digest])}
    base = config_of(redis_url, sim.base_url, callers=callers, encryption_keys=old_ring)
    stored = f"{base['key_prefix']}:{{{ACCOUNT}}}:token"
    redis = Redis.from_url(redis_url)

    def sealed_with(ring: str) -> bool:
        envelope: bytes = redis.hget(stored, "e")  # type: ignore[assignment]
        return envelope.startswith(ring.partition(":")[0].encode() + b":")

    async def replace(broker: Broker, key: str, token: str) -> str:
        response = await broker.http.post(
            f"/v1/accounts/{ACCOUNT}/token/invalidate",
            json={"access_token": token},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    config = write(tmp_path / "config.yaml", base)
    try:
        async with serving(config) as broker, serving(write(tmp_path / "b.yaml", base)) as old:
            first = (await broker.token(key)).json()["access_token"]
            applied = reloads("applied")
            write(config, {**base, "encryption_keys": f"{new_ring}\n{old_ring}"})
            await eventually(lambda: reloads("applied") == applied + 1, within=_RELOAD_SECONDS)
            second = await replace(old, key, first)
            assert sealed_with(old_ring)

            async def serves_second() -> bool:
                return bool((await broker.token(key)).json()["access_token"] == second)

            await eventually(serves_second)
            await replace(broker, other_key, second)
            assert sealed_with(new_ring)
    finally:
        redis.close()


async def test_an_invalid_config_is_refused_and_the_old_one_serves(
    sim: SimulatorControl, tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken config is refused as a whole: one ERROR line per problem, the same as
    `check-config`'s, counted as invalid; the old config keeps serving and /readyz stays."""
    key, digest = new_api_key()
    new_key, new_digest = new_api_key()
    base = config_of(redis_url, sim.base_url, callers={"billing": caller([digest])})
    config = write(tmp_path / "config.yaml", base)
    invalid = reloads("invalid")
    async with serving(config) as broker:
        assert (await broker.token(key)).status_code == 200
        broken = {
            **base,
            "refresh": {"fraction": 2},
            "callers": {"billing": caller([new_digest], ["fleet-us"])},
        }
        with pytest.raises(ConfigError) as expected:
            load_settings(write(tmp_path / "expected.yaml", broken))
        caplog.set_level(logging.ERROR, logger="service.reload")
        write(config, broken)
        await eventually(lambda: reloads("invalid") == invalid + 1, within=_RELOAD_SECONDS)
        assert (await broker.token(key)).status_code == 200
        assert (await broker.token(new_key)).status_code == 401
        assert (await broker.http.get("/readyz")).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    report = [line.replace("expected.yaml", "config.yaml") for line in expected.value.report]
    assert lines == [f"config not reloaded: {line}" for line in report]
    assert len(lines) == 2


async def test_settings_that_need_a_restart_are_refused_by_name(
    sim: SimulatorControl, tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A config changing the key prefix (and a caller) is refused as a whole, naming the key
    prefix; the old config keeps serving; writing the old one back is no change."""
    key, digest = new_api_key()
    new_key, new_digest = new_api_key()
    base = config_of(redis_url, sim.base_url, callers={"billing": caller([digest])})
    config = write(tmp_path / "config.yaml", base)
    refused, unchanged = reloads("refused"), reloads("unchanged")
    async with serving(config) as broker:
        caplog.set_level(logging.ERROR, logger="service.reload")
        write(config, {**base, "key_prefix": "elsewhere", "callers": {"x": caller([new_digest])}})
        await eventually(lambda: reloads("refused") == refused + 1, within=_RELOAD_SECONDS)
        assert (await broker.token(key)).status_code == 200
        assert (await broker.token(new_key)).status_code == 401
        write(config, base)
        await eventually(lambda: reloads("unchanged") == unchanged + 1, within=_RELOAD_SECONDS)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines == ["config not reloaded: key_prefix: cannot change without a restart"]


async def test_service_account_callers_survive_a_reload_and_caller_auth_needs_a_restart(
    sim: SimulatorControl, tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload keeps ServiceAccount tokens working (the JWKS reader carries on) and applies a
    caller's new `service_accounts`; a change of `caller_auth` itself is refused by name."""
    issuer = IssuerServer([SigningKey.ec("reload-ec")]).start()
    try:
        [key] = issuer.keys
        kubernetes = {"issuer": issuer.url, "jwks_url": issuer.jwks_url, "audiences": ["broker"]}

        def token_of(name: str) -> str:
            payload = claims(issuer.url, "telemetry", name, audience="broker")
            return sign(key, payload)

        ingest = {"service_accounts": ["telemetry/ingest"], "accounts": ["*"]}
        base = config_of(
            redis_url,
            sim.base_url,
            callers={"ingest": ingest},
            caller_auth={"kubernetes": kubernetes},
        )
        config = write(tmp_path / "config.yaml", base)
        async with serving(config) as broker:
            await broker.answers(token_of("ingest"), ACCOUNT, 200)
            assert (await broker.token(token_of("canary"))).status_code == 401
            ingest["service_accounts"] = ["telemetry/ingest", "telemetry/canary"]
            write(config, base)
            await broker.answers(token_of("canary"), ACCOUNT, 200)
            assert (await broker.token(token_of("ingest"))).status_code == 200
            caplog.set_level(logging.ERROR, logger="service.reload")
            refused = reloads("refused")
            moved = {**kubernetes, "audiences": ["another"]}
            write(config, {**base, "caller_auth": {"kubernetes": moved}})
            await eventually(lambda: reloads("refused") == refused + 1, within=_RELOAD_SECONDS)
            assert (await broker.token(token_of("ingest"))).status_code == 200
    finally:
        issuer.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines == ["config not reloaded: caller_auth: cannot change without a restart"]


async def test_sighup_reloads_a_change_the_poll_cannot_see(
    sim: SimulatorControl, tmp_path: Path, redis_url: str
) -> None:
    """A file rewritten in place with its size and time kept looks unchanged to the poll;
    SIGHUP reloads it all the same."""
    old_key, old_digest = new_api_key()
    new_key, new_digest = new_api_key()
    base = config_of(redis_url, sim.base_url, callers={"billing": caller([old_digest])})
    config = write(tmp_path / "config.yaml", base)
    async with serving(config) as broker:
        assert (await broker.token(old_key)).status_code == 200
        rewrite_unseen(config, old_digest, new_digest)
        await asyncio.sleep(3)  # a poll or more: nothing happens without the signal
        assert (await broker.token(old_key)).status_code == 200
        os.kill(os.getpid(), signal.SIGHUP)
        await broker.answers(new_key, ACCOUNT, 200)
        assert (await broker.token(old_key)).status_code == 401


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds; fail after a reload's time."""
    deadline = time.monotonic() + _RELOAD_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "not reloaded in time"
        time.sleep(0.1)


def rewrite_unseen(path: Path, old: str, new: str) -> None:
    """Replace `old` by `new` (of the same length) in the file in place, keeping its inode,
    size and modification time: the poll sees no change."""
    stamp = path.stat()
    text = path.read_text(encoding="utf-8")
    with path.open("r+", encoding="utf-8") as file:
        file.write(text.replace(old, new))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_to_serve_reloads_every_worker_without_restarting_it(
    sim: SimulatorControl, tmp_path: Path, redis_url: str, workers: int
) -> None:
    """SIGHUP to `serve` makes each worker reload the config: a key added works on every
    worker, the processes are the same, and each logs the reload once."""
    old_key, old_digest = new_api_key()
    new_key, new_digest = new_api_key()
    base = config_of(redis_url, sim.base_url, callers={"billing": caller([old_digest])})
    config = write(tmp_path / "config.yaml", base)
    serve = ServeProcess(config, tmp_path / "serve", workers=workers)
    try:
        serve.wait_until_ok()
        # Every worker is up (a worker that starts later reads the new config anyway).
        wait_until(lambda: serve.log().count("Application startup complete.") == workers)
        before = {child.pid for child in psutil.Process(serve.process.pid).children()}
        rewrite_unseen(config, old_digest, new_digest)
        serve.process.send_signal(signal.SIGHUP)
        with httpx.Client(base_url=serve.url, timeout=10) as http:
            # New connections each time: the workers share the socket, each takes some.
            def answered(key: str, status: int) -> bool:
                headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
                return all(
                    http.get(f"/v1/accounts/{ACCOUNT}/token", headers=headers).status_code == status
                    for _ in range(10)
                )

            wait_until(lambda: answered(new_key, 200))
            assert answered(old_key, 401)
            samples = scrape(serve.url)
        assert serve.process.poll() is None
        after = {child.pid for child in psutil.Process(serve.process.pid).children()}
        assert after == before
        assert metric(samples, "monogoto_broker_config_reload_total", result="applied") == workers
        reloaded = [line for line in serve.log_lines() if '"config.reloaded"' in line]
        assert len(reloaded) == workers
    finally:
        serve.stop()
