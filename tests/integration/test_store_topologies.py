"""The Redis store behind Sentinel and on a Redis Cluster, through real failovers.

The store's contract on every topology is in test_stores.py; this module covers what only a
topology with replicas and failovers has: finding the new master, the epoch that changes with it,
the wait for a replica after a note that spends a refresh token, and what `topology()` reports.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from pydantic import SecretStr

from service.claims import fingerprint
from service.crypto import TokenCipher
from service.keys import EncryptionKey
from service.store import RedisStore, Spent, StoreUnavailableError, TokenRecord
from tests.support import eventually
from tests.topologies import RedisClusterSet, RedisSentinelSet

CIPHER = TokenCipher([EncryptionKey(kid="test-1", key=os.urandom(32))])
PREFIX = "mgb-test"
REFRESH_TOKEN = "eyJ.refresh.token"

NewStore = Callable[[str], RedisStore]


@pytest.fixture
async def new_store() -> AsyncIterator[NewStore]:
    """Stores on a URL, as broker replicas hold them; all closed after the test."""
    created: list[RedisStore] = []

    def make(url: str) -> RedisStore:
        store = RedisStore.from_url(url, prefix=PREFIX, cipher=CIPHER)
        created.append(store)
        return store

    yield make
    for store in created:
        await store.close()


def record(version: int) -> TokenRecord:
    """A record obtained just now, valid for a minute, with a refresh token."""
    now = time.time()
    return TokenRecord(
        version=version,
        access_token=SecretStr(f"eyJ.access.{version}"),
        refresh_token=SecretStr(REFRESH_TOKEN),
        customer_id="cid_42",
        obtained_at=now,
        expires_at=now + 60,
        refresh_expires_at=now + 240,
    )


def note(version: int) -> tuple[TokenRecord, Spent]:
    """The note written before a refresh: the record without its refresh token, which is
    remembered as spent."""
    spent = Spent(fingerprint(REFRESH_TOKEN), time.time() + 240)
    return replace(record(version), refresh_token=None), spent


async def recovered(store: RedisStore, account: str, within: float = 30.0) -> float:
    """Seconds until `store` loads `account`'s record again (through a failover)."""
    started = time.monotonic()

    async def loads() -> bool:
        try:
            return await store.load(account) is not None
        except StoreUnavailableError:
            return False

    await eventually(loads, within=within)
    return time.monotonic() - started


def accounts_on_every_master(cluster: RedisClusterSet) -> list[str]:
    """Account names whose keys live on different masters, one per master."""
    found: dict[int, str] = {}
    for index in range(1000):
        name = f"acct-{index}"
        found.setdefault(cluster.port_for_key(f"{PREFIX}:{{{name}}}:token"), name)
        if len(found) == len(cluster.master_ports()):
            return list(found.values())
    raise AssertionError("no account names found for every master")


async def test_sentinel_store_reports_its_master_and_nodes(
    redis_sentinel: RedisSentinelSet, sentinel_url: str, new_store: NewStore
) -> None:
    """`topology()` names the master Sentinel names, and counts it, its replica and the three
    sentinels."""
    survey = await new_store(sentinel_url).topology()
    assert survey.kind == "sentinel"
    assert list(survey.masters) == [f"127.0.0.1:{redis_sentinel.master_port()}"]
    assert survey.nodes == 5
    assert [state.replicas for state in survey.masters.values()] == [1]


async def test_sentinel_store_follows_a_failover_and_keeps_what_was_replicated(
    redis_sentinel: RedisSentinelSet, sentinel_url: str, new_store: NewStore
) -> None:
    """The master killed: once Sentinel promotes the replica, the store finds it by itself,
    still holds the note that spent a refresh token (it waited for the replica), and its epoch
    has changed (the budget is held back)."""
    store = new_store(sentinel_url)
    before = await store.epoch()
    noted, spent = note(3)
    saved = await store.save("fleet-eu", noted, spends=spent)
    assert saved
    assert saved.replicated

    old = redis_sentinel.kill_master()
    await asyncio.to_thread(redis_sentinel.wait_for_promotion, old)
    await recovered(store, "fleet-eu")

    loaded = await store.load("fleet-eu")
    assert loaded is not None
    assert loaded.version == 3
    assert await store.epoch() != before
    assert list((await store.topology()).masters) == [f"127.0.0.1:{redis_sentinel.master_port()}"]
    # The spent refresh token did not come back with an older record either.
    assert await store.save("fleet-eu", replace(record(4), version=4))
    again = await store.load("fleet-eu")
    assert again is not None
    assert again.refresh_token is None


async def test_a_note_no_replica_acknowledges_is_reported_unreplicated(
    redis_sentinel: RedisSentinelSet, sentinel_url: str, new_store: NewStore
) -> None:
    """While the replica is frozen, a note that spends a refresh token is written but reported
    as unreplicated after the short wait; a record without one does not wait at all."""
    store = new_store(sentinel_url)
    await store.epoch()  # the survey: the master has a replica
    replica = redis_sentinel.replica()
    with replica.paused():
        started = time.monotonic()
        noted, spent = note(1)
        saved = await store.save("fleet-eu", noted, spends=spent)
        waited = time.monotonic() - started
        plain = await store.save("fleet-us", record(1))
    assert saved
    assert not saved.replicated
    assert 0.4 < waited < 2.0
    assert plain
    assert plain.replicated


async def test_cluster_store_spreads_accounts_over_every_master(
    redis_cluster: RedisClusterSet, cluster_url: str, new_store: NewStore
) -> None:
    """Accounts on all three masters: records, versions in one call and change notices work
    for each, and `topology()` lists every master."""
    names = accounts_on_every_master(redis_cluster)
    writer, reader = new_store(cluster_url), new_store(cluster_url)
    heard: list[str] = []

    async def listen() -> None:
        async for change in reader.changes():
            heard.append(change.account)

    listener = asyncio.create_task(listen())
    try:
        # Subscribed once a write is heard.
        async def subscribed() -> bool:
            await writer.save(names[0], record(int(time.monotonic() * 1000)))
            return bool(heard)

        await eventually(subscribed)
        heard.clear()
        for index, name in enumerate(names):
            assert await writer.save(name, record(10**13 + index))
        await eventually(lambda: set(heard) == set(names))
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    versions = await reader.versions([*names, "nobody"])
    assert versions == {**{name: 10**13 + i for i, name in enumerate(names)}, "nobody": 0}
    survey = await reader.topology()
    assert survey.kind == "cluster"
    assert sorted(survey.masters) == sorted(f"127.0.0.1:{p}" for p in redis_cluster.master_ports())
    assert survey.nodes == 3


async def test_cluster_store_follows_a_failover_of_one_master(
    redis_cluster_with_replicas: RedisClusterSet,
    replicated_cluster_url: str,
    new_store: NewStore,
) -> None:
    """A master of a 3+3 cluster killed: the store waits for a replica after each note, and
    once the replica is promoted the store reads and writes that master's accounts again,
    the others throughout; the epoch changed."""
    cluster = redis_cluster_with_replicas
    names = accounts_on_every_master(cluster)
    store = new_store(replicated_cluster_url)
    before = await store.epoch()
    for name in names:
        noted, spent = note(5)
        saved = await store.save(name, noted, spends=spent)
        assert saved
        assert saved.replicated, name

    victim = names[0]
    old = cluster.port_for_key(f"{PREFIX}:{{{victim}}}:token")
    cluster.kill_node(old)
    await asyncio.to_thread(cluster.wait_for_promotion, old)
    for name in names[1:]:
        await recovered(store, name, within=10)
    await recovered(store, victim)

    for name in names:
        loaded = await store.load(name)
        assert loaded is not None
        assert loaded.version == 5
        assert loaded.refresh_token is None
    assert await store.epoch() != before
    assert f"127.0.0.1:{old}" not in (await store.topology()).masters
