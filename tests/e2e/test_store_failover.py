"""The store fails over under load (issue 13): a Redis Sentinel master dies with the last
writes on it only, a Redis Cluster master dies, and a storm of reports of the current token
hits a cluster.

The failovers run three replicas under 40 concurrent callers for the whole scenario and
measure what the fleet saw: how long until every replica's `/readyz` named the new master
(the failover as the broker saw it), how long until renewals resumed, and the upstream calls
during and after. Callers must see no error, Monogoto no 429 and no spent refresh token.

A failover stops renewals for a while: no master for ≈ 3-4 s with Sentinel (a master is
down after 2 s without answers, then the sentinels elect a leader and promote the replica)
and ≈ 2.5 s with Cluster, then the new store epoch holds the auth budget back for one window
(2 s here), and a renewal that failed meanwhile waits out its back-off. A token due for
renewal just before the kill must still be good, with `min_remaining_seconds` to spare, when
renewals resume, or callers would get 503s that no broker could avoid. So tokens live 16 s
and are renewed at a quarter of that (every 4 s, plus up to 0.8 s of jitter): a token at its
refresh point has 11 s left to be served.

With Sentinel, the replica is frozen (SIGSTOP) from just before a renewal is due and the
master is killed inside that window: the renewal's note that spends the refresh token is
acknowledged by no replica, so the broker logs in instead of refreshing (the refresh token
stays unsent), and its new record is on the dying master only. Freezing alone loses nothing
on one machine, though: the master's writes wait in the kernel's socket buffers, and the
replica reads them when it continues, even after the master died. So the test also writes a
32 MiB value (no broker key) to the master as the freeze begins, as a burst of writes would
leave a replica lagging: the buffers fill up, the writes after it wait in the master's own
memory and die with it. The promoted replica then holds older records, whose refresh tokens
were never sent; the replicas, which hold the newer records, write them back.

With Cluster (three masters with a replica each, an account on every master), the master
killed holds one account's record and the auth budget, so no account can be renewed until
its replica takes over; it dies right after that account's renewal.

The storm: 50 concurrent reports of the current token per account, on a cluster of three
masters with an account on each, spread over three replicas: each account is renewed once,
and every report is answered with its one new token.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import redis

from service.claims import read_claims
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    BackgroundLoad,
    Callers,
    LoadReport,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    limited_config,
    metric,
    ok_on_every_replica,
    scrape,
    write_config,
)
from tests.topologies import RedisClusterSet, RedisSentinelSet

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 16.0
#: Renewed every 4 s: the time from a refresh point to the last moment a token may be served
#: (11 s) covers a failover (≈ 4 s) and the budget's hold-back (2 s) with room to spare.
FRACTION = 0.25
MIN_REMAINING_SECONDS = 1.0
#: The broker waits this long after the refresh point, at most (5 % of the lifetime).
JITTER_SECONDS = 0.05 * LIFETIME_SECONDS
CYCLE_SECONDS = FRACTION * LIFETIME_SECONDS
#: Monogoto allows 10 auth calls per second; the broker's budget is that same limit, counted
#: in a window of 1 s plus 1 s of margin, which a new store epoch holds back.
LIMIT = 10
PERIOD_SECONDS = 1.0
CALLERS = 40
#: The replica is frozen from this long before a renewal is due ...
FREEZE_LEAD_SECONDS = 0.3
#: ... for this long (less than the sentinels' 2 s, so they never fail the replica) ...
FREEZE_SECONDS = 1.5
#: ... and the master killed this long into it: a renewal that woke in the first ≈ 0.7 s of
#: the freeze has waited 0.5 s for a replica in vain, logged in and written its record.
KILL_AFTER_SECONDS = 1.3
#: Written to the master as the freeze begins, more than the socket buffers between it and
#: its replica hold (a few MiB), so that the writes after it stay in the master's memory.
FILLER_KEY = "replication-filler"
FILLER_BYTES = 32 * 1024 * 1024
#: The replica has read what reached it this long after it continues; it is promoted after
#: the sentinels' 2 s at the earliest.
CATCH_UP_SECONDS = 0.3
#: Every replica must name the new master, and renew, within these after the promotion.
SEEN_WITHIN_SECONDS = 10.0
RESUMED_WITHIN_SECONDS = 15.0
#: The cluster's master is killed this long after a renewal of its account was counted.
WRITE_SECONDS = 0.1
#: Reports of one token at once, spread over the replicas, per account.
STORM_CALLS = 50
#: Tokens that no renewal touches while the storm runs.
STORM_LIFETIME_SECONDS = 120.0

SENTINEL_ACCOUNTS = {
    "sentinel-a": account(8, "v1"),
    "sentinel-b": account(9, "v1"),
    "sentinel-c": account(10, "v1"),
}
#: Simulator users of the accounts placed on the cluster's masters (one account per master).
STORM_USERS = (2, 3, 4)
CLUSTER_USERS = (5, 6, 11)
#: The broker's default key prefix.
PREFIX = "mgb"

Accounts = dict[str, dict[str, str]]


def record_key(name: str) -> str:
    """The Redis key of account `name`'s token record."""
    return f"{PREFIX}:{{{name}}}:token"


def names_on_every_master(cluster: RedisClusterSet, stem: str) -> dict[int, str]:
    """Account names whose records live on different masters of `cluster`, by master port."""
    found: dict[int, str] = {}
    masters = cluster.master_ports()
    for index in range(1000):
        name = f"{stem}-{index}"
        found.setdefault(cluster.port_for_key(record_key(name)), name)
        if len(found) == len(masters):
            return found
    raise AssertionError(f"no {stem} names found for every master {masters}")


def stored_versions(port: int, names: Sequence[str]) -> dict[str, int]:
    """Each account's record version on the Redis server on `port` (0 if it has none)."""
    with redis.Redis(port=port, socket_timeout=2.0) as client:
        return {name: int(client.hget(record_key(name), "v") or 0) for name in names}


def fill_replication_stream(port: int) -> None:
    """Write FILLER_BYTES to the Redis server on `port`: a frozen replica's stream from it
    backs up into its own memory."""
    with redis.Redis(port=port, socket_timeout=10.0) as client:
        client.set(FILLER_KEY, b"\0" * FILLER_BYTES)


async def holds_again(port: int, versions: Mapping[str, int]) -> float | None:
    """Wait until the Redis server on `port` holds each account's record in `versions`, or a
    newer one: when it did (monotonic), or None after 20 s."""

    async def holds() -> bool:
        stored = await asyncio.to_thread(stored_versions, port, list(versions))
        return all(stored[name] >= version for name, version in versions.items())

    return await first_moment(holds, within=20)


def budget_master(cluster: RedisClusterSet) -> int:
    """The port of the master holding the auth budget's keys."""
    for port in cluster.master_ports():
        with redis.Redis(port=port, socket_timeout=2.0) as client:
            if any(True for _ in client.scan_iter(match=f"{PREFIX}:{{budget:*}}:*")):
                return port
    raise AssertionError("no master holds the auth budget")


@dataclass(frozen=True)
class Tally:
    """The simulator's counts of the auth calls of a scenario's accounts so far."""

    #: Successful logins and refreshes, per account.
    logins: dict[str, int]
    refreshes: dict[str, int]
    #: Every call of these accounts' users, by outcome.
    upstream: UpstreamCounts

    @classmethod
    def read(cls, simulator: SimulatorControl, accounts: Mapping[str, Mapping[str, str]]) -> Tally:
        """The counts since the simulator's reset."""
        owners = {settings["username"]: name for name, settings in accounts.items()}
        logins, refreshes = dict.fromkeys(accounts, 0), dict.fromkeys(accounts, 0)
        outcomes: Counter[str] = Counter()
        for row in simulator.stats()["calls"]:
            name = owners.get(row["user"])
            if name is None:
                continue
            outcomes[row["outcome"]] += row["count"]
            if row["outcome"] == "ok" and row["endpoint"] == "v1_token":
                logins[name] += row["count"]
            if row["outcome"] == "ok" and row["endpoint"] == "v1_refresh":
                refreshes[name] += row["count"]
        return cls(logins, refreshes, UpstreamCounts(outcomes))

    def renewals(self, name: str) -> int:
        """Successful logins and refreshes of account `name`."""
        return self.logins[name] + self.refreshes[name]

    @property
    def renewed(self) -> int:
        """Successful logins and refreshes of every account."""
        return sum(self.renewals(name) for name in self.logins)

    def since(self, earlier: Tally) -> str:
        """The successful calls made after `earlier`, e.g. `logins 1 (a), refreshes 3`."""
        logins = {name: count - earlier.logins[name] for name, count in self.logins.items()}
        who = ", ".join(name for name, count in logins.items() if count)
        refreshes = sum(self.refreshes.values()) - sum(earlier.refreshes.values())
        return f"logins {sum(logins.values())}{f' ({who})' if who else ''}, refreshes {refreshes}"


async def start_fleet(
    tmp_path: Path,
    redis_url: str,
    simulator: SimulatorControl,
    start_brokers: StartBrokers,
    accounts: Accounts,
    *,
    lifetime: float = LIFETIME_SECONDS,
) -> tuple[str, list[str]]:
    """Tokens of `lifetime` and Monogoto's limit on the simulator, three replicas on
    `redis_url` (v1 accounts renewed at FRACTION of their lifetime, Monogoto's limit as the
    budget), each with every account's token: the caller key and the replicas' URLs."""
    key, config = limited_config(
        simulator,
        redis_url,
        accounts,
        LIMIT,
        PERIOD_SECONDS,
        refresh={"fraction": FRACTION, "min_remaining_seconds": MIN_REMAINING_SECONDS},
        lifetime=lifetime,
    )
    path = write_config(tmp_path / "broker.yaml", config)
    urls = [broker.url for broker in await asyncio.to_thread(start_brokers, path, 3)]
    for name in accounts:
        await ok_on_every_replica(urls, key, name)
    return key, urls


async def first_moment(
    check: Callable[[], bool | Awaitable[bool]], *, within: float
) -> float | None:
    """Poll `check` (plain or async) until it holds: the monotonic time it first did, or None
    after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return time.monotonic()
        await asyncio.sleep(0.05)
    return None


async def renewed_once(
    simulator: SimulatorControl, accounts: Accounts, names: Sequence[str] | None = None
) -> float:
    """Wait until each account of `names` (all if None) was renewed once more: when the first
    of these renewals was counted (monotonic)."""
    names = list(accounts) if names is None else names
    before = Tally.read(simulator, accounts)
    first: list[float] = []

    def renewed() -> bool:
        now = Tally.read(simulator, accounts)
        done = [now.renewals(name) > before.renewals(name) for name in names]
        if any(done) and not first:
            first.append(time.monotonic())
        return all(done)

    within = CYCLE_SECONDS + JITTER_SECONDS + 5
    assert await first_moment(renewed, within=within), f"{names} not renewed in {within} s"
    return first[0]


async def store_masters(client: httpx.AsyncClient, url: str) -> list[str]:
    """The masters a replica's `/readyz` names (none before its first survey)."""
    response = await client.get(f"{url}/readyz")
    store = response.json().get("store") or {}
    return list(store.get("masters", []))


@dataclass(frozen=True)
class Failover:
    """A failover as the fleet lived it, in seconds from the kill (None: not within bounds)."""

    #: When the master was killed (monotonic).
    killed_at: float
    #: Until the store had a new master (Sentinel named it, or the cluster served every slot).
    promoted_in: float
    #: When that was (epoch seconds).
    promoted_at: float
    #: Until every replica's `/readyz` named the new master(s).
    seen_in: float | None
    #: Until the first login or refresh of the scenario's accounts after the kill.
    resumed_in: float | None
    #: The simulator's counts at the kill, and once every replica named the new master(s).
    at_kill: Tally
    at_seen: Tally

    def describe(self) -> str:
        """For the reliability row."""
        seen = "never" if self.seen_in is None else f"{self.seen_in:.1f} s"
        resumed = "never" if self.resumed_in is None else f"{self.resumed_in:.1f} s"
        return (
            f"new master promoted {self.promoted_in:.1f} s after the kill, named by every "
            f"replica's /readyz after {seen}, renewals resumed after {resumed}"
        )

    def check(self) -> None:
        """Every replica found the new master, and renewals resumed, in good time."""
        assert self.seen_in is not None, "a replica never named the new master"
        assert self.seen_in - self.promoted_in <= SEEN_WITHIN_SECONDS, self.describe()
        assert self.resumed_in is not None, "renewals never resumed"
        assert self.resumed_in - self.promoted_in <= RESUMED_WITHIN_SECONDS, self.describe()


async def follow_failover(
    killed_at: float,
    promotion: Callable[[], object],
    urls: Sequence[str],
    named: Callable[[list[str]], bool],
    simulator: SimulatorControl,
    accounts: Accounts,
) -> Failover:
    """From a kill at `killed_at` (monotonic), all at once: wait for the promotion
    (`promotion`, blocking), for every replica's `/readyz` to name masters that `named`
    accepts, and for the first renewal after the kill."""
    at_kill = Tally.read(simulator, accounts)
    bound = 30.0

    async def promoted() -> tuple[float, float]:
        await asyncio.to_thread(promotion)
        return time.monotonic() - killed_at, time.time()

    async def seen_by(client: httpx.AsyncClient, url: str) -> bool:
        async def names_it() -> bool:
            try:
                return named(await store_masters(client, url))
            except httpx.HTTPError:
                return False

        return await first_moment(names_it, within=killed_at + bound - time.monotonic()) is not None

    async def seen() -> tuple[float | None, Tally]:
        async with httpx.AsyncClient(timeout=5) as client:
            every = all(await asyncio.gather(*(seen_by(client, url) for url in urls)))
        return (time.monotonic() - killed_at if every else None), Tally.read(simulator, accounts)

    async def resumed() -> float | None:
        moment = await first_moment(
            lambda: Tally.read(simulator, accounts).renewed > at_kill.renewed, within=bound
        )
        return None if moment is None else moment - killed_at

    (promoted_in, promoted_at), (seen_in, at_seen), resumed_in = await asyncio.gather(
        promoted(), seen(), resumed()
    )
    return Failover(killed_at, promoted_in, promoted_at, seen_in, resumed_in, at_kill, at_seen)


def every_account_renewed(simulator: SimulatorControl, accounts: Accounts, since: Tally) -> bool:
    """Whether every account was renewed after `since`."""
    now = Tally.read(simulator, accounts)
    return all(now.renewals(name) > since.renewals(name) for name in accounts)


async def last_cycle(
    load: BackgroundLoad, simulator: SimulatorControl, accounts: Accounts, failover: Failover
) -> tuple[LoadReport, Tally, bool]:
    """The load goes on until every account was renewed after the kill, and for one more
    refresh cycle after renewals resumed: what the callers saw, the simulator's counts, and
    whether every account was renewed."""
    renewed = await first_moment(
        lambda: every_account_renewed(simulator, accounts, failover.at_kill),
        within=3 * CYCLE_SECONDS,
    )
    one_more_cycle = failover.killed_at + (failover.resumed_in or 0.0) + CYCLE_SECONDS
    await asyncio.sleep(max(0.0, one_more_cycle + JITTER_SECONDS - time.monotonic()))
    report = await load.end()
    return report, Tally.read(simulator, accounts), renewed is not None


def issued_after(report: LoadReport, name: str, moment: float) -> int:
    """Distinct tokens of `name` callers were served that Monogoto issued after `moment`
    (epoch seconds; `iat` is whole seconds, so this counts only those issued a second later)."""
    return sum(1 for token in report.tokens[name] if read_claims(token)["iat"] > moment)


def failovers_counted(urls: Sequence[str]) -> list[float]:
    """`monogoto_broker_store_failovers_total` of each replica."""
    return [metric(scrape(url), "monogoto_broker_store_failovers_total") for url in urls]


def unreplicated_notes(urls: Sequence[str]) -> int:
    """Notes no replica of the store acknowledged, over every replica."""
    return int(
        sum(metric(scrape(url), "monogoto_broker_store_unreplicated_notes_total") for url in urls)
    )


def check_served_through(
    *,
    report: LoadReport,
    after: Tally,
    accounts: Accounts,
    failover: Failover,
    renewed: bool,
    failovers: list[float],
) -> None:
    """What both failovers must show: every caller served a valid token, no 429, no spent or
    unknown refresh token sent, every replica found the new master and counted the failover,
    renewals resumed soon, and every account was renewed and its new token served."""
    assert report.problems == []
    assert report.failed() == 0, report.summary()
    assert after.upstream.rate_limited == 0
    assert after.upstream.reused == 0
    assert set(after.upstream.outcomes) == {"ok"}, after.upstream.describe()
    failover.check()
    assert all(count >= 1 for count in failovers), f"failovers counted: {failovers}"
    assert renewed, "not every account was renewed after the failover"
    for name in accounts:
        assert report.served(name) > 0
        assert issued_after(report, name, failover.promoted_at) >= 1, (
            f"{name}: no token issued after the promotion was served"
        )


async def test_a_sentinel_failover_that_loses_the_last_writes_under_load(
    tmp_path: Path,
    redis_sentinel: RedisSentinelSet,
    sentinel_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """The replica frozen from just before a renewal, the master killed inside that window
    (the renewal's note unacknowledged, its record on the master only), the replica promoted:
    callers are served throughout, no 429, no refresh token sent twice, every replica names
    the new master and counts the failover, and renewals resume."""
    accounts = SENTINEL_ACCOUNTS
    names = list(accounts)
    key, urls = await start_fleet(tmp_path, sentinel_url, e2e_simulator, start_brokers, accounts)
    load = BackgroundLoad(Callers(Rotation(urls), key, accounts, concurrency=CALLERS))
    cycle_began = await renewed_once(e2e_simulator, accounts)
    master_port = await asyncio.to_thread(redis_sentinel.master_port)
    replica = await asyncio.to_thread(redis_sentinel.replica)
    new_master = f"127.0.0.1:{replica.port}"
    await asyncio.sleep(cycle_began + CYCLE_SECONDS - FREEZE_LEAD_SECONDS - time.monotonic())
    frozen = Tally.read(e2e_simulator, accounts)
    with replica.paused():
        frozen_at = time.monotonic()
        await asyncio.to_thread(fill_replication_stream, master_port)
        await asyncio.sleep(frozen_at + KILL_AFTER_SECONDS - time.monotonic())
        master_held = await asyncio.to_thread(stored_versions, master_port, names)
        killed_port = await asyncio.to_thread(redis_sentinel.kill_master)
        failing_over = asyncio.create_task(
            follow_failover(
                time.monotonic(),
                lambda: redis_sentinel.wait_for_promotion(killed_port),
                urls,
                lambda masters: masters == [new_master],
                e2e_simulator,
                accounts,
            )
        )
        healing = asyncio.create_task(holds_again(replica.port, master_held))
        await asyncio.sleep(frozen_at + FREEZE_SECONDS - time.monotonic())
    # What the replica took from its stream, read while it still is a replica (read-only).
    await asyncio.sleep(CATCH_UP_SECONDS)
    replica_held = await asyncio.to_thread(stored_versions, replica.port, names)
    failover = await failing_over
    lost = [name for name in names if replica_held[name] < master_held[name]]
    written_back = await healing
    report, after, renewed = await last_cycle(load, e2e_simulator, accounts, failover)
    failovers = await asyncio.to_thread(failovers_counted, urls)
    unreplicated = await asyncio.to_thread(unreplicated_notes, urls)
    restored = (
        "never"
        if written_back is None
        else f"{written_back - failover.killed_at - failover.promoted_in:.1f} s after the promotion"
    )
    reliability(
        ReliabilityRow(
            scenario="Sentinel failover lost writes",
            injected=(
                f"replica frozen (SIGSTOP) {FREEZE_SECONDS:.1f} s from just before a renewal, "
                f"{FILLER_BYTES >> 20} MiB written to the master, master SIGKILLed "
                f"{KILL_AFTER_SECONDS:.1f} s into the freeze: the promoted replica missed the "
                f"last record of {lost or 'no account'}; 3 replicas, {CALLERS} callers, "
                f"{len(accounts)} accounts of {LIFETIME_SECONDS:.0f} s v1 tokens renewed every "
                f"{CYCLE_SECONDS:.0f} s"
            ),
            callers_saw=(
                f"{report.summary()}; {failover.describe()}; newer records written back "
                f"{restored}; failovers counted per replica {[int(n) for n in failovers]}"
            ),
            upstream_calls=(
                f"{after.upstream.describe()}; frozen until the kill: "
                f"{failover.at_kill.since(frozen)} ({unreplicated} notes no replica "
                f"acknowledged); from the kill until every replica named the new master: "
                f"{failover.at_seen.since(failover.at_kill)}; "
                f"after: {after.since(failover.at_seen)}"
            ),
            rate_limited=after.upstream.rate_limited,
            reused=after.upstream.reused,
        )
    )
    assert killed_port == master_port
    assert lost, "the promoted replica held every account's last record: nothing was lost"
    check_served_through(
        report=report,
        after=after,
        accounts=accounts,
        failover=failover,
        renewed=renewed,
        failovers=failovers,
    )


async def test_cluster_failover_under_load(
    tmp_path: Path,
    redis_cluster_with_replicas: RedisClusterSet,
    replicated_cluster_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A cluster of three masters with a replica each, an account on every master: the master
    that holds one account and the auth budget is killed right after that account's renewal
    and its replica promoted: callers are served throughout, no 429, no refresh token sent
    twice, every replica names the new masters and counts the failover, and renewals resume."""
    cluster = redis_cluster_with_replicas
    placed = await asyncio.to_thread(names_on_every_master, cluster, "cluster")
    accounts = {
        name: account(user, "v1") for name, user in zip(placed.values(), CLUSTER_USERS, strict=True)
    }
    key, urls = await start_fleet(
        tmp_path, replicated_cluster_url, e2e_simulator, start_brokers, accounts
    )
    load = BackgroundLoad(Callers(Rotation(urls), key, accounts, concurrency=CALLERS))
    await renewed_once(e2e_simulator, accounts)
    old_port = await asyncio.to_thread(budget_master, cluster)
    victim = placed[old_port]
    old_master = f"127.0.0.1:{old_port}"

    await renewed_once(e2e_simulator, accounts, [victim])
    await asyncio.sleep(WRITE_SECONDS)
    await asyncio.to_thread(cluster.kill_node, old_port)
    failover = await follow_failover(
        time.monotonic(),
        lambda: cluster.wait_for_promotion(old_port),
        urls,
        lambda masters: len(masters) == len(placed) and old_master not in masters,
        e2e_simulator,
        accounts,
    )
    report, after, renewed = await last_cycle(load, e2e_simulator, accounts, failover)
    failovers = await asyncio.to_thread(failovers_counted, urls)
    reliability(
        ReliabilityRow(
            scenario="Cluster failover",
            injected=(
                f"the master of {victim} and of the auth budget SIGKILLed {WRITE_SECONDS:.1f} s "
                f"after {victim}'s renewal, its replica promoted; 3 masters + 3 replicas, "
                f"3 broker replicas, {CALLERS} callers, an account on every master, "
                f"{LIFETIME_SECONDS:.0f} s v1 tokens renewed every {CYCLE_SECONDS:.0f} s"
            ),
            callers_saw=(
                f"{report.summary()}; {failover.describe()}; failovers counted per replica "
                f"{[int(count) for count in failovers]}"
            ),
            upstream_calls=(
                f"{after.upstream.describe()}; from the kill until every replica named the new "
                f"masters: {failover.at_seen.since(failover.at_kill)}; after: "
                f"{after.since(failover.at_seen)}"
            ),
            rate_limited=after.upstream.rate_limited,
            reused=after.upstream.reused,
        )
    )
    check_served_through(
        report=report,
        after=after,
        accounts=accounts,
        failover=failover,
        renewed=renewed,
        failovers=failovers,
    )


@dataclass(frozen=True)
class Report:
    """One `invalidate` of a storm: its answer (`200`, `503 upstream_unavailable`, or the
    transport error), the token it returned, how long it took."""

    answer: str
    token: str | None
    seconds: float


def answer_of(response: httpx.Response) -> str:
    """`200`, or the status and problem code, e.g. `503 upstream_unavailable`."""
    if response.status_code == 200:
        return "200"
    return f"{response.status_code} {response.json().get('code', '-')}"


@dataclass
class Served:
    """What the replicas serve: each account's tokens (one, if they agree), and the answers
    that brought none."""

    tokens: dict[str, set[str]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    async def ask(self, urls: Sequence[str], key: str, names: Sequence[str]) -> None:
        """Ask every replica for every account's token, replacing what was seen before."""
        self.tokens = {name: set() for name in names}
        self.refused = []
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=30, headers=headers) as client:
            for name in names:
                for url in urls:
                    response = await client.get(f"{url}/v1/accounts/{name}/token")
                    answer = answer_of(response)
                    if answer == "200":
                        self.tokens[name].add(response.json()["access_token"])
                    else:
                        self.refused.append(f"{name} at {url}: {answer}")


async def storm(
    urls: Sequence[str], key: str, reported: Mapping[str, str]
) -> dict[str, list[Report]]:
    """STORM_CALLS concurrent invalidates of each account's `reported` token, spread over the
    replicas: the answers, by account."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=STORM_CALLS * len(reported))

    async def report(client: httpx.AsyncClient, url: str, name: str) -> Report:
        started = time.monotonic()
        try:
            response = await client.post(
                f"{url}/v1/accounts/{name}/token/invalidate", json={"access_token": reported[name]}
            )
        except httpx.TransportError as error:
            return Report(type(error).__name__, None, time.monotonic() - started)
        answer = answer_of(response)
        token = response.json()["access_token"] if answer == "200" else None
        return Report(answer, token, time.monotonic() - started)

    async with httpx.AsyncClient(timeout=30, headers=headers, limits=limits) as client:
        answers = await asyncio.gather(
            *(
                report(client, urls[index % len(urls)], name)
                for index in range(STORM_CALLS)
                for name in reported
            )
        )
    by_account: dict[str, list[Report]] = {name: [] for name in reported}
    for index, answer in enumerate(answers):
        by_account[list(reported)[index % len(reported)]].append(answer)
    return by_account


async def test_an_invalidate_storm_on_a_cluster_renews_once(
    tmp_path: Path,
    redis_cluster: RedisClusterSet,
    cluster_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """50 concurrent reports of each account's current token (an account on every master of a
    cluster), spread over three replicas: one upstream call per account, every report answered
    200 with the same new token, which every replica then serves."""
    placed = await asyncio.to_thread(names_on_every_master, redis_cluster, "storm")
    accounts = {
        name: account(user, "v1") for name, user in zip(placed.values(), STORM_USERS, strict=True)
    }
    names = list(accounts)
    key, urls = await start_fleet(
        tmp_path,
        cluster_url,
        e2e_simulator,
        start_brokers,
        accounts,
        lifetime=STORM_LIFETIME_SECONDS,
    )
    served = Served()

    async def serve_one_token_each() -> bool:
        await served.ask(urls, key, names)
        return not served.refused and all(len(tokens) == 1 for tokens in served.tokens.values())

    assert await first_moment(serve_one_token_each, within=5), f"the replicas serve {served}"
    reported = {name: next(iter(tokens)) for name, tokens in served.tokens.items()}
    before = Tally.read(e2e_simulator, accounts)
    answers = await storm(urls, key, reported)
    after = Tally.read(e2e_simulator, accounts)
    replacements = {name: {r.token for r in answers[name]} for name in names}
    statuses = {name: Counter(r.answer for r in answers[name]) for name in names}
    slowest = max(r.seconds for reports in answers.values() for r in reports)
    calls = {name: after.renewals(name) - before.renewals(name) for name in names}

    async def serve_the_replacements() -> bool:
        await served.ask(urls, key, names)
        return not served.refused and all(
            served.tokens[name] == replacements[name] for name in names
        )

    agreed = await first_moment(serve_the_replacements, within=5)
    reliability(
        ReliabilityRow(
            scenario="invalidate storm (Cluster)",
            injected=(
                f"{STORM_CALLS} concurrent invalidates of the current token per account, "
                f"spread over 3 replicas; 3 masters, an account on each"
            ),
            callers_saw=(
                f"{sum(sum(s.values()) for s in statuses.values())} answers: "
                f"{dict(sum(statuses.values(), Counter()))}; distinct new tokens per account "
                f"{ {name: len(tokens) for name, tokens in replacements.items()} }; slowest "
                f"{slowest * 1000:.0f} ms; every replica served the new token "
                f"{'' if agreed else 'not '}within 5 s"
            ),
            upstream_calls=(
                f"{after.upstream.describe()}; for the storm: {after.since(before)}, "
                f"per account {calls}"
            ),
            rate_limited=after.upstream.rate_limited,
            reused=after.upstream.reused,
        )
    )
    for name in names:
        assert statuses[name] == Counter({"200": STORM_CALLS}), f"{name}: {statuses[name]}"
        assert len(replacements[name]) == 1, f"{name}: {len(replacements[name])} new tokens"
        assert reported[name] not in replacements[name], f"{name}: the reported token again"
        assert calls[name] == 1, f"{name}: {calls[name]} upstream calls"
    assert agreed, f"the replicas serve {served}, not the new tokens"
    assert after.upstream.rate_limited == 0
    assert after.upstream.reused == 0
    assert set(after.upstream.outcomes) == {"ok"}, after.upstream.describe()
