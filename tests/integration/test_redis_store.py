"""What only the Redis store does: encryption at rest, key layout, TTLs, and losing Redis.

The behaviour both stores share is in test_stores.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
import redis.asyncio
from pydantic import SecretStr
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.crypto import TokenCipher
from service.keys import EncryptionKey
from service.store import Change, FailureRecord, RedisStore, StoreUnavailableError, TokenRecord
from tests.support import eventually

if TYPE_CHECKING:
    from tests.conftest import RedisServer

KEY = EncryptionKey(kid="test-1", key=os.urandom(32))
CIPHER = TokenCipher([KEY])
PREFIX = "mgb-test"
ACCESS_TOKEN = "eyJ.access-token-in-plain-text"
REFRESH_TOKEN = "eyJ.refresh-token-in-plain-text"
CHANNEL = f"{PREFIX}:changes"


def record(version: int, *, lifetime: float = 60.0) -> TokenRecord:
    """A token record obtained just now, valid for `lifetime` seconds."""
    now = time.time()
    return TokenRecord(
        version=version,
        access_token=SecretStr(ACCESS_TOKEN),
        refresh_token=SecretStr(REFRESH_TOKEN),
        customer_id="cid_42",
        obtained_at=now,
        expires_at=now + lifetime,
    )


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the test's Redis, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A Redis store on the test's Redis."""
    store = RedisStore.from_url(redis_url, prefix=PREFIX, cipher=CIPHER)
    yield store
    await store.close()


async def subscribers(raw: redis.asyncio.Redis) -> int:
    """How many connections Redis counts on the change channel."""
    counts = await raw.pubsub_numsub(CHANNEL)
    return int(counts[0][1])


class Listener:
    """Consumes a store's `changes()` in a background task, as the broker does."""

    def __init__(self, store: RedisStore) -> None:
        self.received: list[Change] = []
        self.task = asyncio.create_task(self._consume(store))

    async def _consume(self, store: RedisStore) -> None:
        async for change in store.changes():
            self.received.append(change)

    async def subscribed(self, raw: redis.asyncio.Redis) -> None:
        """Return once Redis counts the subscription; raise what ended it, if it did."""

        async def counted() -> bool:
            if self.task.done():
                self.task.result()
            return await subscribers(raw) == 1

        await eventually(counted)

    async def stop(self) -> None:
        """Cancel the consumer, as the broker does on shutdown (an error that ended it has
        been checked by the test already)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreUnavailableError):
            await self.task


class FreezableProxy:
    """A TCP proxy to Redis that can stop forwarding, like a link that dies without a word."""

    def __init__(self, redis_port: int) -> None:
        self.frozen = False
        self._redis_port = redis_port
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Start listening; the proxied URL."""
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self._redis_port
        )
        self._writers += [writer, upstream_writer]
        self._pumps += [
            asyncio.create_task(self._pump(reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, writer)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not self.frozen:
                    writer.write(data)
                    await writer.drain()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


async def test_record_expires_with_its_token(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    """Redis drops a record when its token expires: its TTL is the token's remaining lifetime."""
    assert await store.save("fleet-eu", record(1, lifetime=100.0))
    ttl_ms = await raw.pttl(f"{PREFIX}:{{fleet-eu}}:token")
    assert 90_000 < ttl_ms <= 100_000
    await store.save_failure("fleet-eu", FailureRecord(detail="x", retry_at=time.time() + 50))
    assert 40_000 < await raw.pttl(f"{PREFIX}:{{fleet-eu}}:failure") <= 50_000


async def test_tokens_are_stored_encrypted_under_hash_tagged_keys(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """Every key starts with the prefix and is hash-tagged; no stored byte shows a token."""
    assert await store.save("fleet-eu", record(42))
    assert await store.acquire_lock("fleet-eu", 30.0) is not None
    await store.save_failure("fleet-eu", FailureRecord(detail="x", retry_at=time.time() + 60))
    assert await store.take_budget("https://api.example", 5, 60.0) == 0.0
    await store.cool_down("https://api.example", 1.0)

    assert set(await raw.keys("*")) == {
        b"mgb-test:{fleet-eu}:token",
        b"mgb-test:{fleet-eu}:lock",
        b"mgb-test:{fleet-eu}:failure",
        b"mgb-test:{budget:https://api.example}:log",
        b"mgb-test:{budget:https://api.example}:cooldown",
        b"mgb-test:{budget:https://api.example}:epoch",
    }
    stored = await raw.hgetall("mgb-test:{fleet-eu}:token")
    assert stored[b"v"] == b"42"
    assert set(stored) == {b"v", b"e"}
    for secret in (ACCESS_TOKEN, REFRESH_TOKEN):
        assert secret.encode() not in stored[b"e"]


async def test_record_moved_to_another_account_loads_as_none(
    store: RedisStore, raw: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A record copied under another account does not decrypt there: no record, a warning."""
    assert await store.save("fleet-eu", record(1))
    envelope = await raw.hget("mgb-test:{fleet-eu}:token", "e")
    assert envelope is not None
    await raw.hset("mgb-test:{fleet-us}:token", mapping={"v": 1, "e": envelope})

    with caplog.at_level(logging.WARNING, logger="service.store.redis"):
        assert await store.load("fleet-us") is None
    [warning] = caplog.records
    assert getattr(warning, "account", None) == "fleet-us"
    assert ACCESS_TOKEN not in caplog.text
    assert await store.load("fleet-eu") is not None, "the original still loads"


async def test_record_sealed_with_an_unknown_key_loads_as_none(
    store: RedisStore, redis_url: str
) -> None:
    """A replica whose key ring lacks the sealing key sees no record (and will get a new one)."""
    assert await store.save("fleet-eu", record(1))
    stranger = TokenCipher([EncryptionKey(kid="other", key=os.urandom(32))])
    other = RedisStore.from_url(redis_url, prefix=PREFIX, cipher=stranger)
    try:
        assert await other.load("fleet-eu") is None
    finally:
        await other.close()


async def test_garbage_record_loads_as_none(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    """A record that is not an envelope at all counts as no record."""
    await raw.hset("mgb-test:{fleet-eu}:token", mapping={"v": 1, "e": b"garbage"})
    assert await store.load("fleet-eu") is None
    assert await store.save("fleet-eu", record(2)), "a newer record replaces it"


async def test_rotated_key_ring_reads_records_sealed_with_the_old_key(
    store: RedisStore, redis_url: str
) -> None:
    """After adding a new first key, replicas still read records sealed with the old one."""
    saved = record(1)
    assert await store.save("fleet-eu", saved)
    rotated = TokenCipher([EncryptionKey(kid="test-2", key=os.urandom(32)), KEY])
    other = RedisStore.from_url(redis_url, prefix=PREFIX, cipher=rotated)
    try:
        assert await other.load("fleet-eu") == saved
    finally:
        await other.close()


async def test_malformed_change_notices_are_skipped(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """Garbage on the change channel is ignored; the next real change still arrives."""
    listener = Listener(store)
    try:
        await listener.subscribed(raw)
        for garbage in (b"", b"fleet-eu", b"fleet-eu x", b"fleet-eu -3", b"\xff\xfe 1"):
            await raw.publish(CHANNEL, garbage)
        assert await store.save("fleet-eu", record(9))

        async def arrived() -> bool:
            return bool(listener.received)

        await eventually(arrived)
        assert listener.received == [Change(account="fleet-eu", version=9)]
    finally:
        await listener.stop()


async def test_cancelled_subscription_leaves_redis(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """Cancelling the consumer of `changes()` closes its subscription in Redis."""
    listener = Listener(store)
    await listener.subscribed(raw)
    await listener.stop()

    async def left() -> bool:
        return await subscribers(raw) == 0

    await eventually(left)


async def test_store_unavailable_while_redis_is_down(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """With Redis stopped every operation raises StoreUnavailableError; after a restart the
    same store works again (its scripts are reloaded into the empty Redis)."""
    assert await store.save("fleet-eu", record(1))
    redis_server.stop()
    try:
        operations = [
            store.topology(),
            store.load("fleet-eu"),
            store.save("fleet-eu", record(2)),
            store.versions(["fleet-eu"]),
            store.acquire_lock("fleet-eu", 30.0),
            store.take_budget("scope", 5, 60.0),
            store.load_failure("fleet-eu"),
        ]
        for operation in operations:
            with pytest.raises(StoreUnavailableError):
                await operation
    finally:
        redis_server.start()
    await store.topology()
    assert await store.load("fleet-eu") is None, "the restarted Redis is empty"
    assert await store.save("fleet-eu", record(3))
    assert await store.take_budget("scope", 5, 60.0) == 0.0


async def test_subscription_raises_when_redis_dies(
    store: RedisStore, raw: redis.asyncio.Redis, redis_server: RedisServer
) -> None:
    """A crashed Redis ends `changes()` with StoreUnavailableError, so the caller resubscribes."""
    listener = Listener(store)
    try:
        await listener.subscribed(raw)
        redis_server.kill()
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(listener.task, timeout=10.0)
    finally:
        redis_server.start()
        await listener.stop()


async def test_subscription_that_goes_silent_is_declared_lost(
    redis_server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    """A subscription whose link stops answering raises StoreUnavailableError, not hangs."""
    proxy = FreezableProxy(redis_server.port)
    client = redis.asyncio.Redis.from_url(await proxy.start(), retry=Retry(NoBackoff(), 0))
    store = RedisStore(client, prefix=PREFIX, cipher=CIPHER, idle_ping_seconds=0.2)
    listener = Listener(store)
    try:
        await listener.subscribed(raw)
        proxy.frozen = True
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(listener.task, timeout=10.0)
    finally:
        await listener.stop()
        await store.close()
        await proxy.close()


async def test_errors_never_show_the_redis_password(caplog: pytest.LogCaptureFixture) -> None:
    """An unreachable Redis whose URL holds a password is reported without the password."""
    closed = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    store = RedisStore.from_url(
        f"redis://:hunter2@127.0.0.1:{port}/0", prefix=PREFIX, cipher=CIPHER
    )
    try:
        with pytest.raises(StoreUnavailableError) as failure:
            await store.topology()
    finally:
        await store.close()
    assert "hunter2" not in str(failure.value)
    assert "hunter2" not in str(failure.value.__cause__)
    assert "hunter2" not in caplog.text


async def test_a_failed_command_is_not_retried_by_the_client() -> None:
    """One failed command means one connection attempt: retries are the caller's decision."""
    attempts = 0

    def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", prefix=PREFIX, cipher=CIPHER)
    try:
        with pytest.raises(StoreUnavailableError):
            await store.topology()
    finally:
        await store.close()
        server.close()
        await server.wait_closed()
    assert attempts == 1


async def test_an_envelope_moved_under_another_version_does_not_open(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """The version is bound into the envelope: raising a record's version field (to make an
    old record win the compare-and-set) leaves no readable record."""
    assert await store.save("fleet-eu", record(1))
    await raw.hset("mgb-test:{fleet-eu}:token", "v", 7)
    assert await store.load("fleet-eu") is None


async def test_envelopes_sealed_before_versions_were_bound_still_open(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """A record an older broker sealed without its version opens while the version it holds
    matches the stored one, and not under any other."""
    old = record(3)
    envelope = CIPHER.seal("fleet-eu", old.to_bytes())
    await raw.hset("mgb-test:{fleet-eu}:token", mapping={"v": 3, "e": envelope})
    assert await store.load("fleet-eu") == old
    await raw.hset("mgb-test:{fleet-eu}:token", "v", 4)
    assert await store.load("fleet-eu") is None


async def test_failure_markers_are_encrypted_and_older_clear_ones_still_read(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """A rejection marker (with its credentials fingerprint) is not readable in Redis; one an
    older broker wrote in the clear is still honoured."""
    failure = FailureRecord(detail="rejected (401)", retry_at=time.time() + 60, credentials="ab12")
    await store.save_failure("fleet-eu", failure)
    stored = await raw.get("mgb-test:{fleet-eu}:failure")
    assert stored is not None
    assert b"ab12" not in stored
    assert b"rejected" not in stored
    assert await store.load_failure("fleet-eu") == failure

    clear = FailureRecord(detail="rejected (404)", retry_at=time.time() + 60)
    await raw.set("mgb-test:{fleet-us}:failure", clear.to_bytes())
    assert await store.load_failure("fleet-us") == clear


async def _until_answering(store: RedisStore) -> None:
    async def answers() -> bool:
        try:
            await store.topology()
        except StoreUnavailableError:
            return False
        return True

    await eventually(answers)


WINDOW = 1.5


async def test_a_restarted_store_holds_the_budget_back_for_a_window(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """Redis restarted empty forgets the budget log; a replica that took budget before holds
    every grant back for one window, so no second window's budget is spent."""
    for _ in range(3):
        assert await store.take_budget("scope", 3, WINDOW) == 0.0
    redis_server.kill()
    redis_server.start()
    await _until_answering(store)
    wait = await store.take_budget("scope", 3, WINDOW)
    assert 0.5 * WINDOW < wait <= WINDOW

    async def granted() -> bool:
        return await store.take_budget("scope", 3, WINDOW) == 0.0

    await eventually(granted)


async def test_a_poll_that_sees_a_new_epoch_holds_back_every_replica(
    store: RedisStore, redis_url: str, redis_server: RedisServer
) -> None:
    """The epoch check of the store sync holds the budget back at once, so even a replica that
    never saw the old store (just started) gets no unit during that window."""
    first_epoch = await store.epoch()
    assert await store.take_budget("scope", 3, WINDOW) == 0.0
    redis_server.kill()
    redis_server.start()
    await _until_answering(store)
    assert await store.epoch() != first_epoch
    newcomer = RedisStore.from_url(redis_url, prefix=PREFIX, cipher=CIPHER)
    try:
        assert await newcomer.take_budget("scope", 3, WINDOW) > 0.0
    finally:
        await newcomer.close()


async def test_a_first_start_holds_nothing_back(store: RedisStore) -> None:
    """A store that never recorded an epoch, asked by a replica that never saw one, grants at
    once: a new deployment does not wait a window for its first login."""
    assert await store.epoch()
    assert await store.take_budget("scope", 3, 60.0) == 0.0


async def save_snapshot(url: str) -> None:
    """SAVE through a new connection (the old ones died with the server)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.save()
    finally:
        await client.aclose()


async def test_a_store_restored_from_an_older_snapshot_holds_back_a_new_replica(
    store: RedisStore, raw: redis.asyncio.Redis, redis_url: str, redis_server: RedisServer
) -> None:
    """A snapshot carries the epoch of the server that wrote it: restored into a new server,
    it tells even a replica that never saw the old one that the budget log went back in time."""
    assert await store.take_budget("scope", 3, WINDOW) == 0.0
    await raw.save()
    try:
        for _ in range(2):
            assert await store.take_budget("scope", 3, WINDOW) == 0.0
        redis_server.kill()
        redis_server.start()  # loads the snapshot: one grant of three
        newcomer = RedisStore.from_url(redis_url, prefix=PREFIX, cipher=CIPHER)
        try:
            await _until_answering(newcomer)
            assert await newcomer.take_budget("scope", 3, WINDOW) > 0.0
        finally:
            await newcomer.close()
    finally:
        # Later restarts of the session's server must start empty again.
        redis_server.flush()
        await save_snapshot(redis_url)


async def test_a_cool_down_longer_than_any_allowed_is_cut_short(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    """A cool-down of 31 years (left by a broker that took `Retry-After: 1e9` at its word)
    holds grants back for at most the longest allowed Retry-After, 900 s."""
    await raw.set("mgb-test:{budget:scope}:cooldown", "1", px=10**12)
    wait = await store.take_budget("scope", 5, 60.0)
    assert 800 < wait <= 900
    assert await raw.pttl("mgb-test:{budget:scope}:cooldown") <= 900_000


async def test_a_replica_that_knew_the_old_store_holds_back_though_a_new_one_did_not(
    store: RedisStore, redis_url: str, redis_server: RedisServer
) -> None:
    """A replica started against the restarted store holds nothing back (a first start looks
    the same); one that knew the old store still holds back what is left of the window."""
    assert await store.take_budget("scope", 3, WINDOW) == 0.0
    redis_server.kill()
    redis_server.start()
    newcomer = RedisStore.from_url(redis_url, prefix=PREFIX, cipher=CIPHER)
    try:
        await _until_answering(newcomer)
        await newcomer.epoch()
        assert await newcomer.take_budget("scope", 3, WINDOW) == 0.0
        await _until_answering(store)
        wait = await store.take_budget("scope", 3, WINDOW)
        assert 0.0 < wait <= WINDOW
    finally:
        await newcomer.close()
