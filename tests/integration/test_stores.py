"""The shared store's behaviour, the same for the Redis store and the in-process store.

Each test runs against the in-process store and the Redis store on one server, behind Sentinel
and on a three-master Redis Cluster. `new_replica()` returns another store object on the same
backend, as another broker replica would hold: a new RedisStore on the same Redis, or the one
MemoryStore (the in-process store serves one replica only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from pydantic import SecretStr

from service.claims import fingerprint
from service.crypto import TokenCipher
from service.keys import EncryptionKey
from service.store import (
    QUEUE_POLL_SECONDS,
    QUEUE_STALE_SECONDS,
    Change,
    FailureRecord,
    MemoryStore,
    RedisStore,
    Spent,
    TokenRecord,
    TokenStore,
)
from tests.support import eventually

CIPHER = TokenCipher([EncryptionKey(kid="test-1", key=os.urandom(32))])
PREFIX = "mgb-test"
ACCESS_TOKEN = "eyJ.access.token"

NewReplica = Callable[[], TokenStore]


#: The fixture giving the URL of each Redis deployment.
URL_FIXTURES = {"redis": "redis_url", "sentinel": "sentinel_url", "cluster": "cluster_url"}


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def new_replica(request: pytest.FixtureRequest) -> AsyncIterator[NewReplica]:
    """A factory of store objects sharing one backend; all are closed after the test."""
    created: list[TokenStore] = []
    if request.param == "memory":
        shared = MemoryStore()
        created.append(shared)

        def make() -> TokenStore:
            return shared

    else:
        url: str = request.getfixturevalue(URL_FIXTURES[request.param])

        def make() -> TokenStore:
            store = RedisStore.from_url(url, prefix=PREFIX, cipher=CIPHER)
            created.append(store)
            return store

    yield make
    for store in created:
        await store.close()


@pytest.fixture
def store(new_replica: NewReplica) -> TokenStore:
    """One store object."""
    return new_replica()


def record(version: int, *, lifetime: float = 60.0, token: str = ACCESS_TOKEN) -> TokenRecord:
    """A token record obtained just now, valid for `lifetime` seconds."""
    now = time.time()
    return TokenRecord(
        version=version,
        access_token=SecretStr(token),
        refresh_token=SecretStr("eyJ.refresh.token"),
        customer_id="cid_42",
        obtained_at=now,
        expires_at=now + lifetime,
        refresh_expires_at=now + 4 * lifetime,
    )


class Subscriber:
    """Consumes a store's `changes()` in a background task, as the broker does."""

    def __init__(self, store: TokenStore) -> None:
        self.received: asyncio.Queue[Change] = asyncio.Queue()
        self.task = asyncio.create_task(self._consume(store))

    async def _consume(self, store: TokenStore) -> None:
        async for change in store.changes():
            self.received.put_nowait(change)

    async def next(self, within: float = 10.0) -> Change | None:
        """The next change, or None after `within` seconds; raises what ended the subscription."""
        getting = asyncio.ensure_future(self.received.get())
        done, _ = await asyncio.wait(
            {getting, self.task}, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
        if getting in done:
            return getting.result()
        getting.cancel()
        if self.task in done:
            self.task.result()
            pytest.fail("the change subscription ended")
        return None

    async def await_subscribed(self, writer: TokenStore, account: str) -> int:
        """Write to `account` until the latest write arrives (subscribing happens in the
        background); return its version. Nothing older is in flight afterwards."""
        deadline = time.monotonic() + 10.0
        version = 1
        while time.monotonic() < deadline:
            version += 1
            assert await writer.save(account, record(version))
            while (change := await self.next(within=0.05)) is not None:
                if change == Change(account=account, version=version):
                    return version
        pytest.fail("the subscription never received a write")

    async def stop(self) -> None:
        """Cancel the consumer, as the broker does on shutdown."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_saved_record_loads_back_unchanged(store: TokenStore) -> None:
    """A saved record loads back with every field, secrets included."""
    saved = record(7)
    assert await store.save("fleet-eu", saved)
    assert await store.load("fleet-eu") == saved
    assert await store.load("fleet-us") is None


async def test_save_refuses_equal_or_older_versions(new_replica: NewReplica) -> None:
    """A replica cannot overwrite a record with one of equal or lower version, only a newer."""
    first, second = new_replica(), new_replica()
    assert await first.save("fleet-eu", record(10, token="eyJ.ten"))
    assert not await second.save("fleet-eu", record(10, token="eyJ.other-ten"))
    assert not await second.save("fleet-eu", record(9, token="eyJ.nine"))
    assert await first.load("fleet-eu") == await second.load("fleet-eu")
    loaded = await second.load("fleet-eu")
    assert loaded is not None
    assert loaded.access_token.get_secret_value() == "eyJ.ten"

    assert await second.save("fleet-eu", record(11, token="eyJ.eleven"))
    loaded = await first.load("fleet-eu")
    assert loaded is not None
    assert loaded.access_token.get_secret_value() == "eyJ.eleven"


async def test_record_vanishes_when_its_token_expires(store: TokenStore) -> None:
    """Once the access token expires, the record is gone: load gives None, the version is 0."""
    assert await store.save("fleet-eu", record(3, lifetime=0.3))

    async def gone() -> bool:
        return await store.load("fleet-eu") is None

    await eventually(gone)
    assert await store.versions(["fleet-eu"]) == {"fleet-eu": 0}
    assert await store.save("fleet-eu", record(2)), "an expired record blocks no write"


async def test_expired_record_is_not_saved(store: TokenStore) -> None:
    """A record whose token has already expired is refused and not stored."""
    assert not await store.save("fleet-eu", record(5, lifetime=-1.0))
    assert await store.load("fleet-eu") is None


async def test_versions_of_many_accounts(store: TokenStore) -> None:
    """`versions` reports each account's stored version, 0 where there is none."""
    await store.save("fleet-eu", record(5))
    await store.save("fleet-us", record(7))
    assert await store.versions(["fleet-eu", "fleet-us", "fleet-ap"]) == {
        "fleet-eu": 5,
        "fleet-us": 7,
        "fleet-ap": 0,
    }
    assert await store.versions([]) == {}


async def test_records_of_many_accounts_load_at_once(new_replica: NewReplica) -> None:
    """`load_many` gives each account's record as `load` does (None where there is none, a
    spent refresh token left out), whatever hash slots their keys are in."""
    first, second = new_replica(), new_replica()
    names = [f"fleet-{index}" for index in range(20)]
    for version, name in enumerate(names[:15], start=1):
        assert await first.save(name, record(version, token=f"{ACCESS_TOKEN}.{name}"))
    spent_record = await first.load(names[0])
    assert spent_record is not None
    assert spent_record.refresh_token is not None
    spent = Spent(fingerprint(spent_record.refresh_token.get_secret_value()), time.time() + 60)
    assert await first.save(names[0], replace(spent_record, version=100), spends=spent)
    loaded = await second.load_many(names)
    assert list(loaded) == names
    assert loaded == {name: await second.load(name) for name in names}
    assert [found is None for found in loaded.values()] == [False] * 15 + [True] * 5
    first_loaded = loaded[names[0]]
    assert first_loaded is not None
    assert first_loaded.refresh_token is None
    assert loaded[names[1]] == await first.load(names[1])
    assert await second.load_many([]) == {}


async def test_changes_deliver_writes_of_another_replica(new_replica: NewReplica) -> None:
    """Once subscribed, a replica hears of every write by another replica, each account's in
    order (a cluster delivers notices of accounts on different masters in either order)."""
    listener, writer = new_replica(), new_replica()
    subscriber = Subscriber(listener)
    try:
        version = await subscriber.await_subscribed(writer, "fleet-eu")
        assert await writer.save("fleet-eu", record(version + 1))
        assert not await writer.save("fleet-eu", record(version)), "refused writes are silent"
        assert await writer.save("fleet-us", record(version + 2))
        heard = {await subscriber.next(), await subscriber.next()}
        assert heard == {
            Change(account="fleet-eu", version=version + 1),
            Change(account="fleet-us", version=version + 2),
        }
    finally:
        await subscriber.stop()


async def test_closing_the_store_ends_its_change_iterators(new_replica: NewReplica) -> None:
    """Closing a store ends the change iterators on it instead of leaving them hanging."""
    listener, writer = new_replica(), new_replica()
    subscriber = Subscriber(listener)
    await subscriber.await_subscribed(writer, "fleet-eu")
    await listener.close()
    await asyncio.wait_for(subscriber.task, timeout=10.0)


async def test_lock_is_exclusive_and_released_only_by_its_holder(new_replica: NewReplica) -> None:
    """One replica holds an account's lock at a time; a stale token cannot release it."""
    first, second = new_replica(), new_replica()
    token = await first.acquire_lock("fleet-eu", 30.0)
    assert token is not None
    assert await second.acquire_lock("fleet-eu", 30.0) is None
    assert await second.acquire_lock("fleet-us", 30.0) is not None, "locks are per account"

    await second.release_lock("fleet-eu", "not-the-holders-token")
    assert await second.acquire_lock("fleet-eu", 30.0) is None

    await first.release_lock("fleet-eu", token)
    assert await second.acquire_lock("fleet-eu", 30.0) is not None


async def test_lock_lease_expiry_lets_another_replica_take_it(new_replica: NewReplica) -> None:
    """A lock whose holder vanished frees itself when its lease ends."""
    first, second = new_replica(), new_replica()
    stale = await first.acquire_lock("fleet-eu", 0.2)
    assert stale is not None

    async def taken() -> bool:
        return await second.acquire_lock("fleet-eu", 30.0) is not None

    await eventually(taken)
    await first.release_lock("fleet-eu", stale)
    assert await first.acquire_lock("fleet-eu", 30.0) is None, "a stale holder releases nothing"


async def test_budget_grants_exactly_limit_then_names_the_wait(store: TokenStore) -> None:
    """`limit` takes are granted; the next is refused with a wait of at most one period."""
    grants = [await store.take_budget("https://api.example", 3, 30.0) for _ in range(3)]
    assert grants == [0.0, 0.0, 0.0]
    wait = await store.take_budget("https://api.example", 3, 30.0)
    assert 0.0 < wait <= 30.0
    assert await store.take_budget("https://other.example", 3, 30.0) == 0.0, "scopes are apart"


async def test_budget_grants_again_after_the_window(store: TokenStore) -> None:
    """Once the oldest grant is a period old, the budget grants again."""
    for _ in range(2):
        assert await store.take_budget("scope", 2, 0.5) == 0.0
    assert await store.take_budget("scope", 2, 0.5) > 0.0

    async def granted() -> bool:
        return await store.take_budget("scope", 2, 0.5) == 0.0

    await eventually(granted)


async def test_budget_never_exceeds_limit_in_any_window(store: TokenStore) -> None:
    """Taking as fast as allowed, no span of one period ever holds more than `limit` grants."""
    limit, period = 3, 0.4
    spans: list[tuple[float, float]] = []  # when each granted take was sent and answered
    while len(spans) < 3 * limit:
        sent = time.monotonic()
        wait = await store.take_budget("scope", limit, period)
        if wait == 0.0:
            spans.append((sent, time.monotonic()))
        else:
            await asyncio.sleep(wait)
    # Grant j happened before it was answered, grant j - limit after it was sent.
    for j in range(limit, len(spans)):
        assert spans[j][1] - spans[j - limit][0] >= period


async def test_budget_is_exact_under_concurrent_replicas(new_replica: NewReplica) -> None:
    """50 simultaneous takes from 3 replicas, limit 5: exactly 5 are granted."""
    replicas = [new_replica() for _ in range(3)]
    takes = [replicas[i % 3].take_budget("scope", 5, 60.0) for i in range(50)]
    waits = await asyncio.gather(*takes)
    assert sum(wait == 0.0 for wait in waits) == 5
    assert all(0.0 < wait <= 60.0 for wait in waits if wait)


async def test_cool_down_blocks_grants_and_is_never_shortened(new_replica: NewReplica) -> None:
    """During a cool-down nothing is granted, and a shorter cool-down does not cut it short."""
    first, second = new_replica(), new_replica()
    await first.cool_down("scope", 30.0)
    await second.cool_down("scope", 0.01)
    wait = await second.take_budget("scope", 5, 60.0)
    assert 20.0 < wait <= 30.0
    assert await second.take_budget("other", 5, 60.0) == 0.0


async def test_cool_down_ends(store: TokenStore) -> None:
    """When the cool-down is over, the budget grants again."""
    await store.cool_down("scope", 0.3)
    assert await store.take_budget("scope", 5, 60.0) > 0.0

    async def granted() -> bool:
        return await store.take_budget("scope", 5, 60.0) == 0.0

    await eventually(granted)


async def test_failure_marker_is_shared_until_cleared(new_replica: NewReplica) -> None:
    """A credentials-rejected marker set by one replica is seen by another until cleared."""
    first, second = new_replica(), new_replica()
    failure = FailureRecord(detail="Monogoto rejected the credentials", retry_at=time.time() + 60)
    await first.save_failure("fleet-eu", failure)
    assert await second.load_failure("fleet-eu") == failure
    assert await second.load_failure("fleet-us") is None
    await second.clear_failure("fleet-eu")
    assert await first.load_failure("fleet-eu") is None


async def test_failure_marker_expires_at_its_retry_time(store: TokenStore) -> None:
    """A marker ends at `retry_at`; one whose time has already passed is not kept at all."""
    await store.save_failure("fleet-us", FailureRecord(detail="old", retry_at=time.time() - 1))
    assert await store.load_failure("fleet-us") is None

    await store.save_failure("fleet-eu", FailureRecord(detail="x", retry_at=time.time() + 0.3))
    assert await store.load_failure("fleet-eu") is not None

    async def gone() -> bool:
        return await store.load_failure("fleet-eu") is None

    await eventually(gone)


async def test_a_reachable_store_reports_its_nodes(store: TokenStore) -> None:
    """A reachable store answers with the nodes it stands on."""
    survey = await store.topology()
    assert survey.masters
    assert survey.nodes >= len(survey.masters)


async def test_a_spent_refresh_token_is_left_out_of_every_load(new_replica: NewReplica) -> None:
    """Once a write notes a refresh token as spent, no replica loads a record carrying it, even
    one written back later (a store gone back in time), until the token is taken back."""
    first, second = new_replica(), new_replica()
    stale = record(1)
    assert stale.refresh_token is not None
    spent = Spent(fingerprint(stale.refresh_token.get_secret_value()), time.time() + 60)
    noted = replace(stale, version=2, refresh_token=None)
    assert await first.save("fleet-eu", noted, spends=spent)
    # The older record comes back with the spent token (a restored snapshot, say).
    assert await second.save("fleet-eu", replace(stale, version=3))
    loaded = await second.load("fleet-eu")
    assert loaded is not None
    assert loaded.version == 3
    assert loaded.refresh_token is None
    # Taken back: it was never sent after all.
    assert await first.save("fleet-eu", replace(stale, version=4), spends=replace(spent, until=0))
    again = await second.load("fleet-eu")
    assert again is not None
    assert again.refresh_token == stale.refresh_token


async def test_remembered_spent_tokens_outlive_nothing_but_their_expiry(store: TokenStore) -> None:
    """Spent fingerprints re-seeded into a store apply to loads until each one's `until`."""
    stale = record(1)
    assert stale.refresh_token is not None
    key = fingerprint(stale.refresh_token.get_secret_value())
    await store.remember_spent("fleet-eu", [Spent(key, time.time() + 0.4)])
    assert await store.save("fleet-eu", stale)
    loaded = await store.load("fleet-eu")
    assert loaded is not None
    assert loaded.refresh_token is None

    async def usable_again() -> bool:
        found = await store.load("fleet-eu")
        return found is not None and found.refresh_token is not None

    await eventually(usable_again)


async def test_a_fenced_write_needs_the_lock_still_held(new_replica: NewReplica) -> None:
    """A write fenced with a lock is refused once that lock expired or went to someone else."""
    first, second = new_replica(), new_replica()
    lock = await first.acquire_lock("fleet-eu", 0.3)
    assert lock is not None
    assert await first.save("fleet-eu", record(1), lock=lock)

    async def taken_over() -> bool:
        return await second.acquire_lock("fleet-eu", 30.0) is not None

    await eventually(taken_over)
    assert not await first.save("fleet-eu", record(2), lock=lock)
    assert not await first.extend_lock("fleet-eu", lock, 30.0)
    loaded = await second.load("fleet-eu")
    assert loaded is not None
    assert loaded.version == 1


async def test_the_holder_keeps_its_lock_by_extending_the_lease(new_replica: NewReplica) -> None:
    """A lease renewed before it ends keeps others out; once renewals stop, it ends."""
    holder, other = new_replica(), new_replica()
    lock = await holder.acquire_lock("fleet-eu", 0.3)
    assert lock is not None
    for _ in range(4):
        await asyncio.sleep(0.15)
        assert await holder.extend_lock("fleet-eu", lock, 0.3)
        assert await other.acquire_lock("fleet-eu", 30.0) is None

    async def free() -> bool:
        return await other.acquire_lock("fleet-eu", 30.0) is not None

    await eventually(free)


async def test_a_reserve_keeps_units_back(store: TokenStore) -> None:
    """With a reserve of 2 out of 5, only 3 units are granted; the reserve goes to others."""
    granted = [await store.take_budget("scope", 5, 60.0, reserve=2) for _ in range(4)]
    assert [wait == 0.0 for wait in granted] == [True, True, True, False]
    assert 0.0 < granted[-1] <= 60.0
    assert await store.take_budget("scope", 5, 60.0) == 0.0
    assert await store.take_budget("scope", 5, 60.0) == 0.0
    assert await store.take_budget("scope", 5, 60.0) > 0.0


async def fill(store: TokenStore, limit: int, period: float) -> None:
    """Take every unit of `scope`'s budget (unqueued, as an older broker would)."""
    for _ in range(limit):
        assert await store.take_budget("scope", limit, period) == 0.0


async def queue(store: TokenStore, account: str, priority: float, limit: int = 2) -> float:
    """Queue `account` at `priority` on a full budget of `limit` units per `QUEUE_PERIOD`."""
    wait = await store.take_budget("scope", limit, QUEUE_PERIOD, account=account, priority=priority)
    assert wait >= QUEUE_POLL_SECONDS, f"{account} must wait while the budget is full"
    return wait


async def ask(store: TokenStore, account: str, priority: float, limit: int = 2) -> bool:
    """Whether `account`, queued at `priority`, is granted a unit now."""
    wait = await store.take_budget("scope", limit, QUEUE_PERIOD, account=account, priority=priority)
    return wait == 0.0


#: A window short enough that the queue tests wait it out, long enough for their steps.
QUEUE_PERIOD = 0.6


async def test_units_go_to_the_most_urgent_queued_claims(new_replica: NewReplica) -> None:
    """Under contention the free units go to the lowest priorities, whoever asks first."""
    first, second = new_replica(), new_replica()
    await fill(first, 2, QUEUE_PERIOD)
    await queue(first, "c", 30)
    await queue(second, "a", 10)
    await queue(first, "b", 20)
    await asyncio.sleep(QUEUE_PERIOD + 0.1)  # two units free
    assert not await ask(first, "c", 30), "c ranks third of three, with two units free"
    assert await ask(second, "b", 20)
    assert await ask(first, "a", 10)
    assert not await ask(second, "c", 30), "every unit is taken again"


async def test_the_most_urgent_claim_for_an_account_stands(new_replica: NewReplica) -> None:
    """Two replicas queue one account: the lower priority counts, and a higher one later does
    not push it back; `hasten` lowers a queued claim only."""
    first, second = new_replica(), new_replica()
    await fill(first, 1, QUEUE_PERIOD)
    await queue(first, "a", 50, limit=1)
    await queue(second, "a", 5, limit=1)
    await queue(first, "b", 10, limit=1)
    await queue(first, "a", 50, limit=1)
    await second.hasten("scope", "c", 1)  # not queued: no claim comes of it
    await second.hasten("scope", "b", 7)
    await asyncio.sleep(QUEUE_PERIOD + 0.1)
    assert not await ask(first, "b", 10, limit=1), "a's claim of 5 ranks first"
    assert await ask(first, "a", 50, limit=1)


async def test_a_grant_takes_the_account_out_of_the_queue(store: TokenStore) -> None:
    """A granted account no longer holds a place ahead of the others."""
    await fill(store, 2, QUEUE_PERIOD)
    await queue(store, "a", 1)
    await asyncio.sleep(QUEUE_PERIOD + 0.1)
    assert await ask(store, "a", 1)
    assert await ask(store, "b", 2), "a left the queue with its grant"


async def test_a_claim_not_renewed_leaves_the_queue(store: TokenStore) -> None:
    """An entry its replica stopped asking for (gone, or gave up) stops holding units back."""
    await fill(store, 1, QUEUE_PERIOD)
    await queue(store, "a", 1, limit=1)
    await asyncio.sleep(QUEUE_PERIOD + 0.1)
    assert not await ask(store, "b", 2, limit=1), "a still waits"
    await asyncio.sleep(QUEUE_STALE_SECONDS)
    assert await ask(store, "b", 2, limit=1), "a's claim went stale"


async def test_a_caller_that_will_not_wait_ranks_after_queued_claims(store: TokenStore) -> None:
    """Without `enqueue` an account is not queued, and gets a unit only if one is left over
    after every more urgent claim."""
    await fill(store, 2, QUEUE_PERIOD)
    await queue(store, "a", 1)
    await asyncio.sleep(QUEUE_PERIOD + 0.1)
    wait = await store.take_budget(
        "scope", 1, QUEUE_PERIOD, account="f", priority=100, enqueue=False
    )
    assert wait > 0.0, "one unit free, one more urgent claim"
    assert (
        await store.take_budget("scope", 2, QUEUE_PERIOD, account="f", priority=100, enqueue=False)
        == 0.0
    ), "two units free, one more urgent claim"
    assert await ask(store, "a", 1)


async def test_forced_renewals_are_counted_per_caller_and_account(
    new_replica: NewReplica,
) -> None:
    """One forced renewal per caller, account and interval, across replicas."""
    first, second = new_replica(), new_replica()
    assert await first.take_forced("fleet-eu", "greedy", 60.0) == 0.0
    wait = await second.take_forced("fleet-eu", "greedy", 60.0)
    assert 50.0 < wait <= 60.0
    assert await second.take_forced("fleet-us", "greedy", 60.0) == 0.0, "another account"
    assert await second.take_forced("fleet-eu", "polite", 60.0) == 0.0, "another caller"


async def test_the_epoch_stays_while_the_store_lives(store: TokenStore) -> None:
    """Asking twice gives the same epoch: nothing was lost in between."""
    assert await store.epoch() == await store.epoch()


#: Long enough that no pause of a loaded machine lets a grant leave the window mid-test.
PACED_PERIOD = 2.0
PACE = PACED_PERIOD / 4


async def test_paced_claims_are_spread_over_the_window(new_replica: NewReplica) -> None:
    """With four units per window, paced claims get one unit a quarter-window apart, on any
    replica, and are told the time left until then; an unpaced claim may take the rest at
    once."""
    first, second = new_replica(), new_replica()
    assert await paced(first, "a") == 0.0
    wait = await paced(second, "b")
    assert 0.0 < wait <= PACE, "the last grant is less than a pace old"
    await asyncio.sleep(wait + 0.02)
    assert await paced(second, "b") == 0.0
    # Unpaced (a caller waiting for a token): the two units left, at once.
    for account in ("c", "d"):
        assert await store_take(first, account) == 0.0
    assert await store_take(first, "e") > 0.0, "the window's four units are taken"


async def test_a_paced_claim_a_caller_hastened_is_not_paced(new_replica: NewReplica) -> None:
    """A background renewal waits for its paced unit on one replica while a caller on another
    waits for the same account (`hasten`): the renewal now carries the caller's claim, and
    takes the next free unit at once instead of a paced one."""
    first, second = new_replica(), new_replica()
    assert await paced(first, "a") == 0.0
    assert await paced(first, "b") > 0.0, "paced: the last grant is less than a pace old"
    await second.hasten("scope", "b", 0)
    assert await paced(first, "b") == 0.0, "hastened: not paced"
    assert await paced(first, "c") > 0.0, "the others still are"


async def paced(store: TokenStore, account: str) -> float:
    """A paced, queued claim on the paced tests' budget (four units per window)."""
    return await store.take_budget("scope", 4, PACED_PERIOD, account=account, priority=1, pace=PACE)


async def store_take(store: TokenStore, account: str) -> float:
    """An unpaced, queued claim on the paced test's budget."""
    return await store.take_budget("scope", 4, PACED_PERIOD, account=account, priority=0)
