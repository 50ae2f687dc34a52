"""The shared store on Redis: encrypted token records, locks, the auth budget, failure markers."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from redis.exceptions import NoScriptError

from service.claims import fingerprint
from service.config.models import MAX_RETRY_AFTER_SECONDS
from service.crypto import EnvelopeError, TokenCipher
from service.store.base import (
    QUEUE_POLL_SECONDS,
    QUEUE_STALE_SECONDS,
    Change,
    Saved,
    Spent,
    StoreUnavailableError,
)
from service.store.changes import ChangeFeed, honour_lost_cancellation, notice, reset_notice
from service.store.records import FailureRecord, TokenRecord
from service.store.scripts import (
    COOL_DOWN,
    EXTEND_LOCK,
    RELEASE_LOCK,
    REMEMBER_SPENT,
    SAVE_RECORD,
    TAKE_BUDGET,
    TAKE_FORCED,
)
from service.store.topology import REDIS_FAILURES, RedisClient, Survey, Topology

log = logging.getLogger(__name__)

#: How long a write that spends a refresh token waits for a replica to acknowledge it.
REPLICA_WAIT_SECONDS = 0.5


def _milliseconds_until(deadline: float) -> int:
    """Whole milliseconds from now until the wall-clock `deadline`, 0 if it has passed."""
    remaining = deadline - time.time()
    return max(1, int(remaining * 1000)) if remaining > 0 else 0


def _epoch_ms(moment: float) -> int:
    return int(moment * 1000)


def _score(priority: float) -> str:
    """A queue priority as Redis reads a score (every digit of an integral one kept)."""
    return format(priority, ".17g")


def _version_context(version: int) -> bytes:
    # A record's envelope is bound to its version: an envelope moved under another version
    # (a stale one written back, the version field edited) does not open.
    return b"v%d" % version


_FAILURE_CONTEXT = b"failure"
# No cool-down lasts longer than the largest `upstream.max_retry_after_seconds` allowed.
_LONGEST_COOL_DOWN_MS = int(MAX_RETRY_AFTER_SECONDS * 1000)


class RedisStore:
    """`TokenStore` on Redis, shared by every replica; token records are stored encrypted."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        cipher: TokenCipher,
        idle_ping_seconds: float = 5.0,
        topology: Topology | None = None,
    ) -> None:
        self._client = client
        self._topology = topology or Topology(client)
        self._prefix = prefix
        self._cipher = cipher
        self._channel = f"{prefix}:changes"
        self._save = client.register_script(SAVE_RECORD)
        self._release = client.register_script(RELEASE_LOCK)
        self._take_budget = client.register_script(TAKE_BUDGET)
        self._cool_down = client.register_script(COOL_DOWN)
        self._extend = client.register_script(EXTEND_LOCK)
        self._remember_spent = client.register_script(REMEMBER_SPENT)
        self._take_forced = client.register_script(TAKE_FORCED)
        self._feed = ChangeFeed(
            client,
            self._channel,
            idle_ping_seconds=idle_ping_seconds,
            after_error=self._topology.after_error,
        )
        # Per budget scope, the epoch (its master's run id) as the budget scripts last
        # confirmed it; before that, the run id of its master when this process first looked
        # (`_first_run_ids`, by master: '' where there is only one). See scripts._EPOCH_CHECK.
        self._budget_epoch: dict[str, str] = {}
        self._first_run_ids: dict[str, str] = {}
        # The store's nodes as `epoch()` last saw them, and the epoch it saw then.
        self._survey: Survey | None = None
        self._seen_epoch = ""
        # Per budget scope: its window (ms), and until when (monotonic) this process knows a
        # cool-down to be in force; both are held again when the store's epoch changes.
        self._windows: dict[str, int] = {}
        self._cool_until: dict[str, float] = {}

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, cipher: TokenCipher, timeout_seconds: float = 2.0
    ) -> RedisStore:
        """A store on a new client for `url` (one server, Sentinel or Cluster), whose commands
        time out and never retry (retries belong to the caller's tenacity policy)."""
        topology = Topology.connect(url, timeout_seconds=timeout_seconds)
        return cls(topology.client, prefix=prefix, cipher=cipher, topology=topology)

    @contextlib.asynccontextmanager
    async def _reaching(self, action: str) -> AsyncIterator[None]:
        """Around every command: the client made ready first (a cluster client maps its slots
        before concurrent commands use it); any Redis failure, once the topology has learnt
        from it, turned into StoreUnavailableError whose message names only the action."""
        try:
            await self._topology.ready()
            yield
        except REDIS_FAILURES as error:
            await self._topology.after_error(error)
            honour_lost_cancellation()
            raise StoreUnavailableError(
                f"Redis unavailable {action} ({type(error).__name__})"
            ) from error

    def _key(self, account: str, kind: str) -> str:
        # The hash tag keeps all keys of one account in one Redis Cluster slot.
        return f"{self._prefix}:{{{account}}}:{kind}"

    def _budget_key(self, scope: str, kind: str) -> str:
        return f"{self._prefix}:{{budget:{scope}}}:{kind}"

    async def load(self, account: str) -> TokenRecord | None:
        """The account's current record, or None if there is none or it does not decrypt; a
        refresh token remembered as spent is left out of it."""
        return (await self.load_many([account]))[account]

    async def load_many(self, accounts: Sequence[str]) -> dict[str, TokenRecord | None]:
        """Each account's record as `load` gives it, all read in one pipeline (one round trip;
        on a Redis Cluster, one per master holding some of them)."""
        pipeline = self._client.pipeline(transaction=False)
        now_ms = _epoch_ms(time.time())
        for account in accounts:
            pipeline.hmget(self._key(account, "token"), ["v", "e"])
            pipeline.zrangebyscore(self._key(account, "spent"), now_ms, "+inf")
        async with self._reaching("while loading token records"):
            replies: list[Any] = await pipeline.execute()
        return {
            account: self._loaded(account, *replies[2 * index : 2 * index + 2])
            for index, account in enumerate(accounts)
        }

    def _loaded(self, account: str, fields: list[Any], spent: list[bytes]) -> TokenRecord | None:
        """The record of one account's HMGET v e and its spent refresh tokens."""
        version, envelope = fields
        if not isinstance(envelope, bytes):
            return None
        try:
            record = self._open_record(account, _as_version(version), envelope)
        except (EnvelopeError, ValueError) as error:
            # Unreadable (rotated-out key, tampering): the broker will obtain a new token.
            log.warning(
                "ignoring a stored token record that cannot be read",
                extra={"account": account, "reason": str(error)},
            )
            return None
        refresh = record.refresh_token
        if refresh is not None and fingerprint(refresh.get_secret_value()).encode() in spent:
            return replace(record, refresh_token=None)
        return record

    def _open_record(self, account: str, version: int, envelope: bytes) -> TokenRecord:
        try:
            return TokenRecord.from_bytes(
                self._cipher.open(account, envelope, _version_context(version))
            )
        except EnvelopeError:
            # Sealed before envelopes were bound to versions: the sealed version must match.
            record = TokenRecord.from_bytes(self._cipher.open(account, envelope))
            if record.version != version:
                raise EnvelopeError("envelope is stored under another version") from None
            return record

    async def save(
        self,
        account: str,
        record: TokenRecord,
        *,
        lock: str | None = None,
        spends: Spent | None = None,
    ) -> Saved:
        """Write `record` unless a record of equal or higher version is stored, or `lock` is
        given and no longer held with it; publish it. `spends` is remembered with it; when it
        notes a refresh token as spent and the master has replicas, the write waits (at most
        REPLICA_WAIT_SECONDS) for one to acknowledge it, and says whether one did."""
        lifetime_ms = _milliseconds_until(record.expires_at)
        if not lifetime_ms:
            return Saved(written=False)
        envelope = self._cipher.seal(account, record.to_bytes(), _version_context(record.version))
        change = notice(account, record.version)
        args: list[bytes | str | int] = [
            record.version,
            envelope,
            lifetime_ms,
            self._channel,
            change,
            lock or "",
            spends.fingerprint if spends else "",
            _epoch_ms(spends.until) if spends else 0,  # 0 with a fingerprint: forget it
            _epoch_ms(time.time()),
        ]
        keys = [
            self._key(account, "token"),
            self._key(account, "spent"),
            self._key(account, "lock"),
        ]
        async with self._reaching("while saving a token record"):
            if spends is None or not spends.until or not await self._has_replicas(keys[0]):
                written = await self._save(keys=keys, args=args)
                return Saved(written=int(written) == 1)
            return await self._save_replicated(keys, args)

    async def _has_replicas(self, key: str) -> bool:
        """Whether the master holding `key` had replicas when the store was last surveyed."""
        if self._survey is None:
            await self._take_survey()
        assert self._survey is not None  # noqa: S101  # taken just above
        node = self._topology.master_of(key)
        if node is None:
            return any(state.replicas for state in self._survey.masters.values())
        state = self._survey.masters.get(node.name)
        return state is not None and state.replicas > 0

    async def _save_replicated(self, keys: list[str], args: list[bytes | str | int]) -> Saved:
        """SAVE_RECORD, then WAIT for one replica on the same connection (a pipeline to the
        key's master), so the acknowledgement covers this very write."""
        wait_ms = int(REPLICA_WAIT_SECONDS * 1000)
        node = self._topology.master_of(keys[0])
        for attempt in (1, 2):
            pipeline = self._client.pipeline(transaction=False)
            # As a raw command: redis-py's cluster pipeline refuses its `evalsha` method.
            pipeline.execute_command("EVALSHA", self._save.sha, len(keys), *keys, *args)
            if node is None:
                pipeline.wait(1, wait_ms)
            else:
                pipeline.execute_command("WAIT", 1, wait_ms, target_nodes=node)
            written, acknowledged = await pipeline.execute(raise_on_error=False)
            if isinstance(written, NoScriptError) and attempt == 1:
                await self._client.script_load(SAVE_RECORD)
                continue
            if isinstance(written, Exception):
                raise written
            replicated = isinstance(acknowledged, int) and acknowledged >= 1
            if int(written) == 1 and not replicated:
                log.warning(
                    "no replica of the token store acknowledged a spent refresh token in time",
                    extra={"wait_ms": wait_ms},
                )
            return Saved(written=int(written) == 1, replicated=replicated)
        raise AssertionError("unreachable")  # pragma: no cover

    async def remember_spent(self, account: str, spent: Sequence[Spent]) -> None:
        """Remember refresh tokens as spent, each until its `until`."""
        live = [item for item in spent if item.until > time.time()]
        if not live:
            return
        args: list[str | int] = [_epoch_ms(time.time())]
        for item in live:
            args += [_epoch_ms(item.until), item.fingerprint]
        async with self._reaching("while remembering spent refresh tokens"):
            await self._remember_spent(keys=[self._key(account, "spent")], args=args)

    async def versions(self, accounts: Sequence[str]) -> dict[str, int]:
        """The stored version per account, 0 where there is none (one round trip)."""
        pipeline = self._client.pipeline(transaction=False)
        for account in accounts:
            pipeline.hget(self._key(account, "token"), "v")
        async with self._reaching("while reading versions"):
            replies: list[Any] = await pipeline.execute()
        return {
            account: _as_version(reply) for account, reply in zip(accounts, replies, strict=True)
        }

    def changes(self) -> AsyncIterator[Change]:
        """Writes published by any replica; raises StoreUnavailableError when the link is lost."""
        return self._feed.changes()

    async def acquire_lock(self, account: str, lease_seconds: float) -> str | None:
        """Take the account's lock for `lease_seconds`; its release token, or None if held."""
        token = secrets.token_hex(16)
        lease_ms = max(1, int(lease_seconds * 1000))
        async with self._reaching("while taking a lock"):
            taken = await self._client.set(self._key(account, "lock"), token, nx=True, px=lease_ms)
        return token if taken else None

    async def release_lock(self, account: str, token: str) -> None:
        """Release the lock if `token` still holds it."""
        async with self._reaching("while releasing a lock"):
            await self._release(keys=[self._key(account, "lock")], args=[token])

    async def extend_lock(self, account: str, token: str, lease_seconds: float) -> bool:
        """Renew the lease of the lock `token` holds; False if it is no longer held with it."""
        lease_ms = max(1, int(lease_seconds * 1000))
        async with self._reaching("while extending a lock"):
            extended = await self._extend(keys=[self._key(account, "lock")], args=[token, lease_ms])
        return bool(extended)

    def _budget_keys(self, scope: str) -> list[str]:
        return [
            self._budget_key(scope, "log"),
            self._budget_key(scope, "cooldown"),
            self._budget_key(scope, "epoch"),
            self._budget_key(scope, "queue"),
            self._budget_key(scope, "seen"),
        ]

    def _hold_ms(self, scope: str) -> int:
        """How long to hold `scope`'s grants back when the store's epoch changes: a window,
        or longer if this process knows of a longer cool-down."""
        cooling = self._cool_until.get(scope, 0.0) - time.monotonic()
        return max(self._windows.get(scope, 1), int(cooling * 1000))

    async def take_budget(
        self,
        scope: str,
        limit: int,
        period_seconds: float,
        *,
        reserve: int = 0,
        account: str = "",
        priority: float = 0.0,
        enqueue: bool = True,
        pace: float = 0.0,
    ) -> float:
        """0.0 if a unit of `scope`'s budget was granted, else the seconds to wait."""
        self._windows[scope] = max(1, int(period_seconds * 1000))
        args: list[str | int] = [
            limit,
            self._windows[scope],
            secrets.token_hex(8),
            reserve,
            self._known_epoch(scope),
            self._hold_ms(scope),
            _LONGEST_COOL_DOWN_MS,
            account,
            _score(priority),
            int(QUEUE_STALE_SECONDS * 1000),
            1 if enqueue else 0,
            int(QUEUE_POLL_SECONDS * 1000),
            int(pace * 1000),
        ]
        async with self._reaching("while taking auth budget"):
            wait_ms, epoch = await self._take_budget(keys=self._budget_keys(scope), args=args)
        self._budget_epoch[scope] = epoch.decode()
        return int(wait_ms) / 1000

    async def hasten(self, scope: str, account: str, priority: float) -> None:
        """Lower `account`'s queued claim in `scope` to `priority`, if it is queued."""
        queue = self._budget_key(scope, "queue")
        async with self._reaching("while hastening a renewal"):
            await self._client.zadd(queue, {account: _score(priority)}, xx=True, lt=True)

    async def cool_down(self, scope: str, seconds: float) -> None:
        """Grant no budget of `scope` for `seconds`, unless a longer cool-down is in force."""
        cool_ms = int(seconds * 1000)
        if cool_ms <= 0:
            return
        until = time.monotonic() + seconds
        self._cool_until[scope] = max(self._cool_until.get(scope, 0.0), until)
        await self._run_cool_down(scope, cool_ms)

    async def _run_cool_down(self, scope: str, cool_ms: int) -> None:
        args: list[str | int] = [cool_ms, self._known_epoch(scope), self._hold_ms(scope)]
        async with self._reaching("while setting a cool-down"):
            epoch = await self._cool_down(keys=self._budget_keys(scope), args=args)
        self._budget_epoch[scope] = epoch.decode()

    def _known_epoch(self, scope: str) -> str:
        """The epoch of `scope`'s master as this process last knew it ('' if never)."""
        known = self._budget_epoch.get(scope)
        if known is not None:
            return known
        node = self._topology.master_of(self._budget_key(scope, "log"))
        return self._first_run_ids.get(node.name if node else "", "")

    async def _take_survey(self) -> Survey:
        survey = await self._topology.survey()
        for name, state in survey.masters.items():
            self._first_run_ids.setdefault(name if survey.kind == "cluster" else "", state.run_id)
        self._survey = survey
        return survey

    async def epoch(self) -> str:
        """The store's epoch: the run ids of its masters, new after any master restarts or is
        replaced by a replica (a failover).

        When it differs from the one seen last, the budget of every scope this process has
        used is held back at once (see scripts._EPOCH_CHECK), not only at the next grant.
        """
        async with self._reaching("while reading the store's epoch"):
            epoch = (await self._take_survey()).epoch
        if self._seen_epoch and epoch != self._seen_epoch:
            await self._topology.drop_idle()
            for scope in list(self._windows):
                cooling = self._cool_until.get(scope, 0.0) - time.monotonic()
                await self._run_cool_down(scope, max(0, int(cooling * 1000)))
        self._seen_epoch = epoch
        return epoch

    async def take_forced(
        self, account: str, caller: str, interval_seconds: float, *, report: str = ""
    ) -> float:
        """0.0 if `caller` may force a renewal of `account` now (and it is counted), else the
        seconds until it may; reports of the same token (`report`) count once."""
        interval_ms = max(1, int(interval_seconds * 1000))
        key = self._key(account, f"forced:{caller}")
        async with self._reaching("while counting a forced renewal"):
            wait_ms = await self._take_forced(keys=[key], args=[interval_ms, report])
        return int(wait_ms) / 1000

    async def load_failure(self, account: str) -> FailureRecord | None:
        """The account's credentials-rejected marker, if one is in force."""
        async with self._reaching("while loading a failure marker"):
            data = await self._client.get(self._key(account, "failure"))
        if not isinstance(data, bytes):
            return None
        try:
            # A marker written in the clear (by an older broker) is read as it is.
            with contextlib.suppress(EnvelopeError):
                data = self._cipher.open(account, data, _FAILURE_CONTEXT)
            return FailureRecord.from_bytes(data)
        except ValueError as error:
            log.warning(
                "ignoring a stored failure marker that cannot be read",
                extra={"account": account, "reason": str(error)},
            )
            return None

    async def save_failure(self, account: str, failure: FailureRecord) -> None:
        """Record rejected credentials until `failure.retry_at` (nothing if that has passed)."""
        until_ms = _milliseconds_until(failure.retry_at)
        if not until_ms:
            return
        sealed = self._cipher.seal(account, failure.to_bytes(), _FAILURE_CONTEXT)
        async with self._reaching("while saving a failure marker"):
            await self._client.set(self._key(account, "failure"), sealed, px=until_ms)

    async def clear_failure(self, account: str) -> None:
        """Forget the account's credentials-rejected marker."""
        async with self._reaching("while clearing a failure marker"):
            await self._client.delete(self._key(account, "failure"))

    def use_cipher(self, cipher: TokenCipher) -> None:
        """Seal new writes with `cipher` (a reloaded key ring) and open records with it; a
        record sealed with a key the new ring lacks no longer opens."""
        self._cipher = cipher

    async def reset(self, account: str) -> None:
        """Delete the account's marker, then publish a reset notice to every replica."""
        async with self._reaching("while resetting an account"):
            await self._client.delete(self._key(account, "failure"))
            # Plain PUBLISH: a Redis Cluster broadcasts it to every node, like write notices.
            await self._client.publish(self._channel, reset_notice(account))

    @property
    def address(self) -> str:
        """Where the store is (hosts, ports, database or service name; never a password)."""
        return self._topology.address

    async def topology(self) -> Survey:
        """The nodes the store stands on now: masters, their replicas, how many nodes."""
        async with self._reaching("while surveying the store's nodes"):
            return await self._take_survey()

    async def close(self) -> None:
        """End every change subscription and close the client's connections."""
        await self._feed.close()
        await self._topology.aclose()


def _as_version(reply: object) -> int:
    return int(reply) if isinstance(reply, bytes) and reply.isdigit() else 0
