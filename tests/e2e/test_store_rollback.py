"""Redis goes back in time under running replicas (issue 12, item 1): restarted from an older
`SAVE` snapshot, and a real failover to a replica that missed the last writes.

Both scenarios roll the store back to a record whose refresh token Monogoto has already spent
(two refreshes ago) and which is due for renewal. A replica that took its refresh token would
send it again (the simulator counts that as `refresh_reused`).

A record's key expires with its access token, so a store rolled back by two refreshes of
tokens of one lifetime has no record left at all (that is the "restarted empty" case). To
roll back to a record that is still alive, the record of the snapshot is a long-lived one
(24 s) and the tokens after it are short (8 s, renewed every 4 s): Monogoto's token lifetime
is changed between the two.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from service.claims import read_claims
from service.simulator.client import SimulatorControl
from tests.conftest import RedisServer
from tests.e2e.harness import (
    BackgroundLoad,
    Callers,
    LoadReport,
    ReliabilityRow,
    Rotation,
    UpstreamCounts,
    account,
    limited_config,
    write_config,
)
from tests.support import eventually

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

#: Short tokens, so that several refreshes (every 4 s) happen within a scenario.
LIFETIME_SECONDS = 8.0
#: The lifetime of the record the store goes back to: still alive two 4 s refreshes after its
#: own refresh point (12 s), when the store is rolled back to it.
SNAPSHOT_LIFETIME_SECONDS = 24.0
FRACTION = 0.5
MIN_REMAINING_SECONDS = 1.0
#: Monogoto allows 10 auth calls per second. The broker counts in a window of 1 s plus 1 s of
#: margin, and holds renewals back for that window on a new store epoch: 2 s, less than the
#: 3 s between a token's refresh point and the last moment it may be served.
LIMIT = 10
PERIOD_SECONDS = 1.0
#: Refreshes between the snapshot (or the replica's detachment) and the rollback.
REFRESHES_LOST = 2
#: The restarted store refuses the replicas until the test has read what it holds.
PASSWORD = "rolled-back"
SNAPSHOT_ACCOUNTS = {"snapshot-a": account(4, "v1"), "snapshot-b": account(5, "v1")}
FAILOVER_ACCOUNTS = {"failover-a": account(6, "v1"), "failover-b": account(7, "v1")}


class RedisNode(RedisServer):
    """A `redis-server` of this module's own: extra arguments per start (a password,
    `--replicaof`), on a given port or a free one, and ready once it takes commands, even
    while it requires a password."""

    ready_replies: tuple[bytes, ...] = (b"+PONG", b"-NOAUTH")

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        assert executable is not None, "redis-server is not on PATH"
        directory.mkdir(parents=True)
        super().__init__(executable, directory)
        if port is not None:
            self.port = port
        self.password: str | None = None

    def start(self, timeout: float = 15.0, args: Sequence[str] = ()) -> None:
        """Start the server with `args` (it loads `dump.rdb` of its directory if there is
        one); return once it answers."""
        # A replica is sent the data at once (Redis 7 waits 5 s for other replicas).
        super().start(timeout, ("--repl-diskless-sync-delay", "0", *args))

    def client(self) -> redis.Redis:
        """A client of this server (with its password while it requires one)."""
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5.0)

    def command(self, *args: str) -> Any:
        """Run one command."""
        with self.client() as client:
            return client.execute_command(*args)

    def synced(self) -> bool:
        """Whether this replica's link to its master is up and its first sync done."""
        with self.client() as client:
            info = client.info("replication")
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")


@pytest.fixture
def redis_nodes(tmp_path: Path) -> Iterator[Callable[..., RedisNode]]:
    """Make Redis nodes of this test's own (each in its own directory); all stopped after."""
    nodes: list[RedisNode] = []

    def make(name: str, *, port: int | None = None) -> RedisNode:
        node = RedisNode(tmp_path / name, port=port)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def stored_versions(node: RedisNode, accounts: Sequence[str]) -> dict[str, int]:
    """Each account's record version on `node` (0 if it has none)."""
    with node.client() as client:
        return {name: int(client.hget(f"mgb:{{{name}}}:token", "v") or 0) for name in accounts}


def record_ttls(node: RedisNode, accounts: Sequence[str]) -> dict[str, float]:
    """Seconds each account's record has left on `node` (negative if there is none)."""
    with node.client() as client:
        return {name: client.pttl(f"mgb:{{{name}}}:token") / 1000 for name in accounts}


def refreshes(simulator: SimulatorControl, accounts: dict[str, dict[str, str]]) -> dict[str, int]:
    """Successful v1 refreshes per account so far."""
    return {
        name: simulator.calls("v1_refresh", outcome="ok", user=settings["username"])
        for name, settings in accounts.items()
    }


def logins(simulator: SimulatorControl, accounts: dict[str, dict[str, str]]) -> int:
    """v1 logins of these accounts so far."""
    return sum(simulator.calls("v1_token", user=s["username"]) for s in accounts.values())


async def long_lived_records(
    node: RedisNode, simulator: SimulatorControl, accounts: dict[str, dict[str, str]]
) -> None:
    """Wait for the first logins (8 s tokens), then for one refresh giving every account a
    record of SNAPSHOT_LIFETIME_SECONDS on `node` (the record the store will go back to)."""
    await eventually(lambda: all(stored_versions(node, list(accounts)).values()), within=20)
    simulator.set(token_lifetime_seconds=SNAPSHOT_LIFETIME_SECONDS)
    await eventually(
        lambda: min(record_ttls(node, list(accounts)).values()) > LIFETIME_SECONDS, within=20
    )


async def start_fleet(
    tmp_path: Path,
    node: RedisNode,
    simulator: SimulatorControl,
    start_brokers: StartBrokers,
    accounts: dict[str, dict[str, str]],
) -> tuple[str, Path, Rotation]:
    """Short tokens and Monogoto's limit on the simulator, three replicas on `node` (v1
    accounts renewed at half their lifetime, Monogoto's limit as the budget), and every
    account's record a long-lived one: the caller key, the config file and the rotation."""
    key, config = limited_config(
        simulator,
        node.url,
        accounts,
        LIMIT,
        PERIOD_SECONDS,
        refresh={"fraction": FRACTION, "min_remaining_seconds": MIN_REMAINING_SECONDS},
        lifetime=LIFETIME_SECONDS,
    )
    path = write_config(tmp_path / "broker.yaml", config)
    rotation = Rotation([broker.url for broker in start_brokers(path, 3)])
    await long_lived_records(node, simulator, accounts)
    return key, path, rotation


async def refreshed_since(
    simulator: SimulatorControl,
    accounts: dict[str, dict[str, str]],
    counts: dict[str, int],
    times: int,
    *,
    within: float,
) -> None:
    """Wait until every account was refreshed `times` more than `counts`."""
    await eventually(
        lambda: all(
            done >= counts[name] + times for name, done in refreshes(simulator, accounts).items()
        ),
        within=within,
    )


async def renewed_and_stored(
    node: RedisNode,
    simulator: SimulatorControl,
    accounts: dict[str, dict[str, str]],
    counts: dict[str, int],
    times: int,
) -> None:
    """Wait until every account was refreshed `times` more than `counts` and the new record
    is stored (more than half a lifetime left: not the note written before the refresh), so
    that no renewal is in flight and every replica has the stored record."""
    await refreshed_since(simulator, accounts, counts, times, within=30)
    await eventually(
        lambda: min(record_ttls(node, list(accounts)).values()) > LIFETIME_SECONDS * FRACTION + 0.5
    )


async def load_past(
    node: RedisNode,
    simulator: SimulatorControl,
    rotation: Rotation,
    key: str,
    accounts: dict[str, dict[str, str]],
    counts: dict[str, int],
) -> tuple[BackgroundLoad, dict[str, int]]:
    """Short tokens again and callers on `rotation`, until REFRESHES_LOST refreshes more than
    `counts` are stored on `node`: the load, and the versions `node` holds (which the store is
    about to lose)."""
    simulator.set(token_lifetime_seconds=LIFETIME_SECONDS)
    load = BackgroundLoad(Callers(rotation, key, accounts, concurrency=8, pause=0.05))
    await renewed_and_stored(node, simulator, accounts, counts, REFRESHES_LOST)
    return load, stored_versions(node, list(accounts))


async def written_back(
    node: RedisNode, before: dict[str, int], since: float
) -> tuple[float, dict[str, int]]:
    """Wait until `node` holds every account's record of version `before` (or newer) again,
    as the replicas write theirs back: the seconds from `since` (monotonic) until it did, and
    the versions it held."""
    names = list(before)
    healed_in = 0.0
    versions: dict[str, int] = {}

    def healed() -> bool:
        nonlocal healed_in
        healed_in = time.monotonic() - since
        versions.update(stored_versions(node, names))
        return all(versions[name] >= before[name] for name in names)

    await eventually(healed, within=10)
    return healed_in, versions


async def last_cycle(
    load: BackgroundLoad,
    simulator: SimulatorControl,
    accounts: dict[str, dict[str, str]],
    counts: dict[str, int],
) -> tuple[LoadReport, UpstreamCounts, dict[str, int]]:
    """One more refresh cycle under load, then the load's end: what the callers saw, the
    simulator's counts, and each account's refreshes since `counts`."""
    await asyncio.sleep(LIFETIME_SECONDS * FRACTION + 1)
    report = await load.end()
    total = UpstreamCounts.read(simulator)
    after = {name: count - counts[name] for name, count in refreshes(simulator, accounts).items()}
    return report, total, after


@dataclass(frozen=True)
class Replacement:
    """An `invalidate` of the token currently served: what was reported and what came back
    (after one wait of the `Retry-After` a first 503 gave, as the client library would)."""

    reported: str
    status: int
    replacement: str | None
    seconds: float
    # The first answer's 503 problem (its `detail` and `Retry-After`), if there was one.
    first_refusal: str = ""

    def describe(self) -> str:
        """For the reliability row."""
        refused = f" (first {self.first_refusal})" if self.first_refusal else ""
        if self.replacement is None:
            return f"invalidate of the current token: {self.status}{refused}"
        same = "the same token!" if self.replacement == self.reported else "a new token"
        took = f"{self.seconds * 1000:.0f} ms"
        return f"invalidate of the current token: {self.status} with {same} in {took}{refused}"


async def serves_every_account(url: str, key: str, names: Sequence[str]) -> dict[str, int]:
    """Ask `url` once for each account's token; the status of each answer."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        answers = [await client.get(f"{url}/v1/accounts/{name}/token") for name in names]
    return {name: answer.status_code for name, answer in zip(names, answers, strict=True)}


async def replace_current(url: str, key: str, name: str) -> Replacement:
    """Report the token `url` serves for `name` as rejected, as a caller would: a 503 (the
    budget held back after the store's epoch changed, say) is asked once more after its
    `Retry-After`, as the client library does."""
    headers = {"Authorization": f"Bearer {key}"}
    first_refusal = ""
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        token = await client.get(f"{url}/v1/accounts/{name}/token")
        token.raise_for_status()
        reported = token.json()["access_token"]
        started = time.monotonic()
        report = {"access_token": reported}
        invalidate = f"{url}/v1/accounts/{name}/token/invalidate"
        response = await client.post(invalidate, json=report)
        if response.status_code == 503:
            wait = float(response.headers["Retry-After"])
            first_refusal = f"503 {response.json()['detail']!r}, Retry-After {wait:.0f} s"
            await asyncio.sleep(wait)
            response = await client.post(invalidate, json=report)
    seconds = time.monotonic() - started
    replacement = response.json()["access_token"] if response.status_code == 200 else None
    return Replacement(reported, response.status_code, replacement, seconds, first_refusal)


def issued_after(report: LoadReport, name: str, moment: float) -> int:
    """Distinct tokens of `name` callers were served that Monogoto issued after `moment`
    (epoch seconds; `iat` is whole seconds, so this counts only those issued a second later)."""
    return sum(1 for token in report.tokens[name] if read_claims(token)["iat"] > moment)


def check_outcome(
    *,
    report: LoadReport,
    total: UpstreamCounts,
    accounts: dict[str, dict[str, str]],
    before: dict[str, int],
    rolled_back: dict[str, int],
    healed: dict[str, int],
    replaced: Replacement,
    rolled_back_at: float,
) -> None:
    """What both scenarios must show: the store really went back, the replicas wrote their
    newer records back, no refresh token was sent twice and no 429 came, callers were served
    throughout, tokens were renewed after the rollback, and an `invalidate` was answered with
    a new token (at once, or after the one `Retry-After` a first 503 asked for)."""
    for name in accounts:
        assert rolled_back[name] < before[name], f"{name}: the store did not go back in time"
        # Written back by a replica: a refresh would have stored a newer version than this.
        assert healed[name] == before[name], f"{name}: not healed with the replicas' record"
    assert total.reused == 0
    assert total.rate_limited == 0
    # Every call a success: no refresh with a spent or unknown token, no other failure.
    assert set(total.outcomes) == {"ok"}, total.describe()
    assert report.problems == []
    assert report.failed() == 0, report.summary()
    for name in accounts:
        assert report.served(name) > 0
        assert issued_after(report, name, rolled_back_at) >= 1, f"{name}: not renewed after"
    assert replaced.status == 200, replaced.describe()
    assert replaced.replacement != replaced.reported


async def test_a_store_restarted_from_an_older_snapshot_gets_the_newer_records_back(
    tmp_path: Path,
    redis_nodes: Callable[..., RedisNode],
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """Redis restarted from a snapshot taken two refreshes ago, under load on three replicas:
    the replicas write their newer records back, nobody sends a spent refresh token, callers
    are served throughout, a replica that joins afterwards serves the current token, and an
    `invalidate` of the current token gets a new one."""
    accounts = SNAPSHOT_ACCOUNTS
    names = list(accounts)
    store = redis_nodes("redis")
    store.start()
    key, config, rotation = await start_fleet(
        tmp_path, store, e2e_simulator, start_brokers, accounts
    )
    store.command("SAVE")
    snapshot = stored_versions(store, names)
    snapshot_refreshes = refreshes(e2e_simulator, accounts)

    load, before = await load_past(
        store, e2e_simulator, rotation, key, accounts, snapshot_refreshes
    )
    store.kill()
    store.password = PASSWORD
    await asyncio.to_thread(store.start, args=("--requirepass", PASSWORD))
    rolled_back = stored_versions(store, names)
    ttls = record_ttls(store, names)
    store.command("CONFIG", "SET", "requirepass", "")  # the replicas see the old data now
    store.password = None
    rolled_back_at, restarted_at = time.time(), time.monotonic()
    restart_refreshes = refreshes(e2e_simulator, accounts)

    joining = asyncio.create_task(asyncio.to_thread(start_brokers, config, 1))
    healed_in, healed_versions = await written_back(store, before, restarted_at)
    (joiner,) = await joining
    joined_in = time.monotonic() - restarted_at
    rotation.urls.append(joiner.url)
    joiner_served = await serves_every_account(joiner.url, key, names)
    # Renewed after the rollback (the budget was held back for a window meanwhile) ...
    await refreshed_since(e2e_simulator, accounts, restart_refreshes, 1, within=15)
    # ... and a caller reporting the current token, at the replica that joined, gets another.
    replaced = await replace_current(joiner.url, key, names[0])
    report, total, after = await last_cycle(load, e2e_simulator, accounts, restart_refreshes)
    reliability(
        ReliabilityRow(
            scenario="store rolled back (snapshot)",
            injected=(
                f"Redis SIGKILLed under load (3 replicas, {LIFETIME_SECONDS:.0f} s v1 tokens) and "
                f"restarted from a SAVE snapshot {REFRESHES_LOST} refreshes old (its records "
                f"due, their refresh tokens spent, {min(ttls.values()):.0f} s left); "
                f"a 4th replica joined {joined_in:.1f} s after"
            ),
            callers_saw=(
                f"{report.summary()}; the replicas' records written back "
                f"{healed_in:.1f} s after the restart; {replaced.describe()}"
            ),
            upstream_calls=(
                f"{total.describe()}; {logins(e2e_simulator, accounts)} logins for "
                f"{len(accounts)} accounts; refreshes after the rollback {after}"
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert rolled_back == snapshot, "the restarted store did not hold the snapshot"
    assert joiner_served == dict.fromkeys(names, 200), joiner_served
    check_outcome(
        report=report,
        total=total,
        accounts=accounts,
        before=before,
        rolled_back=rolled_back,
        healed=healed_versions,
        replaced=replaced,
        rolled_back_at=rolled_back_at,
    )


async def test_a_failover_that_lost_writes_gets_the_newer_records_back(
    tmp_path: Path,
    redis_nodes: Callable[..., RedisNode],
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A real failover losing the last writes: the replicas' Redis address is a master whose
    replica stopped replicating two refreshes ago; the master dies and a new server at its
    address syncs from that replica and is promoted. The replicas write their newer records
    back, nobody sends a spent refresh token, no 429, callers are served throughout and
    tokens keep being renewed."""
    accounts = FAILOVER_ACCOUNTS
    names = list(accounts)
    master = redis_nodes("master")
    master.start()
    standby = redis_nodes("standby")
    standby.start(args=("--replicaof", "127.0.0.1", str(master.port)))
    await eventually(standby.synced, within=15)
    key, _, rotation = await start_fleet(tmp_path, master, e2e_simulator, start_brokers, accounts)
    await eventually(lambda: stored_versions(standby, names) == stored_versions(master, names))
    standby.command("REPLICAOF", "NO", "ONE")  # from now on it misses every write
    detached = stored_versions(standby, names)
    detached_refreshes = refreshes(e2e_simulator, accounts)

    load, before = await load_past(
        master, e2e_simulator, rotation, key, accounts, detached_refreshes
    )
    master.kill()
    killed_at = time.monotonic()
    successor = redis_nodes("successor", port=master.port)
    await asyncio.to_thread(successor.start, args=("--replicaof", "127.0.0.1", str(standby.port)))
    await eventually(successor.synced, within=15)
    # Read-only until promoted: the replicas can read the old data but not write it back yet.
    rolled_back = stored_versions(successor, names)
    ttls = record_ttls(successor, names)
    successor.command("REPLICAOF", "NO", "ONE")
    rolled_back_at, promoted_at = time.time(), time.monotonic()
    unavailable_for = promoted_at - killed_at
    promote_refreshes = refreshes(e2e_simulator, accounts)
    healed_in, healed_versions = await written_back(successor, before, promoted_at)
    await refreshed_since(e2e_simulator, accounts, promote_refreshes, 1, within=15)
    replaced = await replace_current(rotation.urls[0], key, names[0])
    report, total, after = await last_cycle(load, e2e_simulator, accounts, promote_refreshes)
    reliability(
        ReliabilityRow(
            scenario="store failover lost writes",
            injected=(
                f"replica detached (REPLICAOF NO ONE), {REFRESHES_LOST} refreshes written to "
                f"the master only, master SIGKILLed, a new server at its address synced from "
                f"the replica and promoted {unavailable_for:.1f} s later (records due, refresh "
                f"tokens spent, {min(ttls.values()):.0f} s left; 3 replicas, "
                f"{LIFETIME_SECONDS:.0f} s v1 tokens)"
            ),
            callers_saw=(
                f"{report.summary()}; the replicas' records written back {healed_in:.1f} s "
                f"after the promotion; {replaced.describe()}"
            ),
            upstream_calls=(
                f"{total.describe()}; {logins(e2e_simulator, accounts)} logins for "
                f"{len(accounts)} accounts; refreshes after the failover {after}"
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    assert rolled_back == detached, "the promoted server did not hold the replica's old data"
    check_outcome(
        report=report,
        total=total,
        accounts=accounts,
        before=before,
        rolled_back=rolled_back,
        healed=healed_versions,
        replaced=replaced,
        rolled_back_at=rolled_back_at,
    )
