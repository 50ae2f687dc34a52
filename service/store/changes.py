"""The Redis store's change channel: subscriptions that notice when they are lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.asyncio.client import PubSub

from service.store.base import Change, StoreUnavailableError
from service.store.topology import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)

_CLOSE_WAIT_SECONDS = 1.0


def honour_lost_cancellation() -> None:
    """Raise CancelledError if the current task was cancelled but is still running."""
    # redis-py can swallow a cancellation that races its read timeout (the read returns as if
    # it timed out), which would leave a cancelled task looping for ever.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# The word a reset notice carries where a write's notice has its version.
RESET = "reset"


def notice(account: str, version: int) -> str:
    """The message published on the change channel for a write."""
    return f"{account} {version}"


def reset_notice(account: str) -> str:
    """The message published on the change channel when an operator resets an account."""
    return f"{account} {RESET}"


class ChangeFeed:
    """Subscriptions to one change channel; `close()` ends every one of them."""

    def __init__(
        self,
        client: RedisClient,
        channel: str,
        *,
        idle_ping_seconds: float,
        after_error: Callable[[BaseException], Awaitable[None]],
    ) -> None:
        self._client = client
        self._after_error = after_error
        self._channel = channel
        self._idle_ping_seconds = idle_ping_seconds
        self._pubsubs: set[PubSub] = set()
        self._unsubscribed = asyncio.Event()  # set while no subscription is open
        self._unsubscribed.set()
        self._closed = False

    async def changes(self) -> AsyncIterator[Change]:
        """Published writes; raises StoreUnavailableError when the subscription is lost."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsubs.add(pubsub)
        self._unsubscribed.clear()
        try:
            try:
                # A cluster client maps its slots first (its subscription goes to one node).
                await self._client.initialize()
                await pubsub.subscribe(self._channel)
            except Exception as error:
                await self._failed(error)
                return
            while (data := await self._receive(pubsub)) is not None:
                change = _parse_notice(data)
                if change is None:
                    log.warning("ignoring a malformed change notice")
                else:
                    yield change
        finally:
            self._pubsubs.discard(pubsub)
            await _close(pubsub)
            if not self._pubsubs:
                self._unsubscribed.set()

    async def close(self) -> None:
        """End every subscription."""
        self._closed = True
        for pubsub in list(self._pubsubs):
            await _close(pubsub)
        # Let each subscriber leave its loop and give its connection back before the client
        # closes: a cluster client would otherwise keep a connection returned after it closed.
        if self._pubsubs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unsubscribed.wait(), _CLOSE_WAIT_SECONDS)

    async def _receive(self, pubsub: PubSub) -> bytes | None:
        """The next published payload, or None once closed."""
        # A dropped link can stay silent, so a quiet subscription is pinged: any reply proves it
        # alive; none within another idle period means the messages sent meanwhile are lost.
        heard = time.monotonic()
        pinged = False
        while not self._closed:
            honour_lost_cancellation()
            try:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self._idle_ping_seconds
                )
                quiet = time.monotonic() - heard
                if message is not None:
                    if message["type"] == "message":
                        data: bytes = message["data"]
                        return data
                    heard, pinged = time.monotonic(), False
                elif quiet >= 2 * self._idle_ping_seconds:
                    raise StoreUnavailableError("the change subscription stopped answering")
                elif quiet >= self._idle_ping_seconds and not pinged:
                    await pubsub.ping()
                    pinged = True
            except Exception as error:
                await self._failed(error)
                return None
        return None

    async def _failed(self, error: Exception) -> None:
        """Return if close() tore the connection down under the subscription (any error is
        then expected), else raise what the error means for the subscriber (after the
        store's topology learnt from it: a cluster maps its slots again)."""
        if self._closed:
            return
        if isinstance(error, REDIS_FAILURES):
            await self._after_error(error)
            raise StoreUnavailableError(
                f"Redis change subscription lost ({type(error).__name__})"
            ) from error
        raise error


async def _close(pubsub: PubSub) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


def _parse_notice(data: object) -> Change | None:
    if not isinstance(data, bytes):
        return None
    try:
        account, _, version = data.decode().rpartition(" ")
    except UnicodeDecodeError:
        return None
    if account and version == RESET:
        return Change(account=account, version=0, reset=True)
    if not account or not version.isascii() or not version.isdigit():
        return None
    return Change(account=account, version=int(version))
