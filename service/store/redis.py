"""The shared store on Redis: encrypted token records, locks, the auth budget, failure markers."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.crypto import EnvelopeError, TokenCipher
from service.store.base import Change, StoreUnavailableError
from service.store.changes import ChangeFeed, honour_lost_cancellation, notice
from service.store.records import FailureRecord, TokenRecord
from service.store.scripts import COOL_DOWN, RELEASE_LOCK, SAVE_RECORD, TAKE_BUDGET

log = logging.getLogger(__name__)

# Ping before reusing a pooled connection idle this long, so a dead one fails before a command.
_HEALTH_CHECK_SECONDS = 30


@contextmanager
def _unavailable_on_error(action: str) -> Iterator[None]:
    """Turn any Redis failure into StoreUnavailableError; the message names only the action."""
    try:
        yield
    except (RedisError, OSError) as error:  # OSError covers socket errors and TimeoutError
        honour_lost_cancellation()
        raise StoreUnavailableError(
            f"Redis unavailable {action} ({type(error).__name__})"
        ) from error


def _milliseconds_until(deadline: float) -> int:
    """Whole milliseconds from now until the wall-clock `deadline`, 0 if it has passed."""
    remaining = deadline - time.time()
    return max(1, int(remaining * 1000)) if remaining > 0 else 0


class RedisStore:
    """`TokenStore` on Redis, shared by every replica; token records are stored encrypted."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        cipher: TokenCipher,
        idle_ping_seconds: float = 5.0,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._cipher = cipher
        self._channel = f"{prefix}:changes"
        self._save = client.register_script(SAVE_RECORD)
        self._release = client.register_script(RELEASE_LOCK)
        self._take_budget = client.register_script(TAKE_BUDGET)
        self._cool_down = client.register_script(COOL_DOWN)
        self._feed = ChangeFeed(client, self._channel, idle_ping_seconds=idle_ping_seconds)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, cipher: TokenCipher, timeout_seconds: float = 2.0
    ) -> RedisStore:
        """A store on a new client for `url`, whose commands time out and never retry
        (retries belong to the caller's tenacity policy)."""
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=_HEALTH_CHECK_SECONDS,
            decode_responses=False,
        )
        return cls(client, prefix=prefix, cipher=cipher)

    def _key(self, account: str, kind: str) -> str:
        # The hash tag keeps all keys of one account in one Redis Cluster slot.
        return f"{self._prefix}:{{{account}}}:{kind}"

    def _budget_key(self, scope: str, kind: str) -> str:
        return f"{self._prefix}:{{budget:{scope}}}:{kind}"

    async def load(self, account: str) -> TokenRecord | None:
        """The account's current record, or None if there is none or it does not decrypt."""
        with _unavailable_on_error("while loading a token record"):
            envelope = await self._client.hget(self._key(account, "token"), "e")
        if not isinstance(envelope, bytes):
            return None
        try:
            return TokenRecord.from_bytes(self._cipher.open(account, envelope))
        except (EnvelopeError, ValueError) as error:
            # Unreadable (rotated-out key, tampering): the broker will obtain a new token.
            log.warning(
                "ignoring a stored token record that cannot be read",
                extra={"account": account, "reason": str(error)},
            )
            return None

    async def save(self, account: str, record: TokenRecord) -> bool:
        """Write `record` unless a record of equal or higher version is stored; publish it."""
        lifetime_ms = _milliseconds_until(record.expires_at)
        if not lifetime_ms:
            return False
        envelope = self._cipher.seal(account, record.to_bytes())
        change = notice(account, record.version)
        args: list[bytes | str | int] = [
            record.version,
            envelope,
            lifetime_ms,
            self._channel,
            change,
        ]
        with _unavailable_on_error("while saving a token record"):
            written = await self._save(keys=[self._key(account, "token")], args=args)
        return bool(written)

    async def versions(self, accounts: Sequence[str]) -> dict[str, int]:
        """The stored version per account, 0 where there is none (one round trip)."""
        pipeline = self._client.pipeline(transaction=False)
        for account in accounts:
            pipeline.hget(self._key(account, "token"), "v")
        with _unavailable_on_error("while reading versions"):
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
        with _unavailable_on_error("while taking a lock"):
            taken = await self._client.set(self._key(account, "lock"), token, nx=True, px=lease_ms)
        return token if taken else None

    async def release_lock(self, account: str, token: str) -> None:
        """Release the lock if `token` still holds it."""
        with _unavailable_on_error("while releasing a lock"):
            await self._release(keys=[self._key(account, "lock")], args=[token])

    async def take_budget(self, scope: str, limit: int, period_seconds: float) -> float:
        """0.0 if a unit of `scope`'s budget was granted, else the seconds to wait."""
        keys = [self._budget_key(scope, "log"), self._budget_key(scope, "cooldown")]
        period_ms = max(1, int(period_seconds * 1000))
        with _unavailable_on_error("while taking auth budget"):
            wait_ms = await self._take_budget(
                keys=keys, args=[limit, period_ms, secrets.token_hex(8)]
            )
        return int(wait_ms) / 1000

    async def cool_down(self, scope: str, seconds: float) -> None:
        """Grant no budget of `scope` for `seconds`, unless a longer cool-down is in force."""
        cool_ms = int(seconds * 1000)
        if cool_ms <= 0:
            return
        with _unavailable_on_error("while setting a cool-down"):
            await self._cool_down(keys=[self._budget_key(scope, "cooldown")], args=[cool_ms])

    async def load_failure(self, account: str) -> FailureRecord | None:
        """The account's credentials-rejected marker, if one is in force."""
        with _unavailable_on_error("while loading a failure marker"):
            data = await self._client.get(self._key(account, "failure"))
        if not isinstance(data, bytes):
            return None
        try:
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
        with _unavailable_on_error("while saving a failure marker"):
            await self._client.set(self._key(account, "failure"), failure.to_bytes(), px=until_ms)

    async def clear_failure(self, account: str) -> None:
        """Forget the account's credentials-rejected marker."""
        with _unavailable_on_error("while clearing a failure marker"):
            await self._client.delete(self._key(account, "failure"))

    async def ping(self) -> None:
        """Return if Redis answers; raise StoreUnavailableError otherwise."""
        with _unavailable_on_error("while pinging"):
            await self._client.ping()

    async def close(self) -> None:
        """End every change subscription and close the client's connections."""
        await self._feed.close()
        await self._client.aclose()


def _as_version(reply: object) -> int:
    return int(reply) if isinstance(reply, bytes) and reply.isdigit() else 0
