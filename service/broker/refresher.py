"""Renews every account ahead of expiry, in every replica (broker.md rule 5).

Each account has a task that sleeps until the cached token's refresh point (`fraction` of its
lifetime, plus random jitter so replicas and accounts do not align) and then asks the broker
to renew it. The broker's lock and re-check make sure only the first replica to wake calls
Monogoto; the others find the new record and go back to sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from service.broker.core import TokenBroker
from service.broker.model import BrokerError, CredentialsRejectedError
from service.config import RefreshSettings

log = logging.getLogger(__name__)

# Jitter spreads wake-ups over this share of the lifetime (never past the need for a new token).
JITTER_FRACTION = 0.05
RETRY_MIN_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


class Refresher:
    """One background task per account."""

    def __init__(self, broker: TokenBroker, refresh: RefreshSettings) -> None:
        self._broker = broker
        self.refresh = refresh

    def next_refresh_in(self, account: str) -> float:
        """Seconds until this replica should try to renew `account`'s cached token."""
        token = self._broker.state(account).token
        if token is None or self._broker.needs_verification(account):
            return 0.0
        record = token.record
        refresh_at = self._broker.refresh_point(record)
        # Jitter only delays, and by at most half the time still left before expiry.
        spread = min(
            JITTER_FRACTION * record.lifetime, max(0.0, record.expires_at - refresh_at) / 2
        )
        # S311: jitter spreads replicas apart; it needs no cryptographic randomness.
        wake_at = refresh_at + random.uniform(0, spread)  # noqa: S311
        return max(0.0, wake_at - time.time())

    async def run(self, account: str) -> None:
        """Keep `account` renewed until cancelled."""
        failures = 0
        while True:
            state = self._broker.state(account)
            changed = state.changed
            delay = self.next_refresh_in(account)
            if delay > 0:
                # Wake early when the token changes: its refresh point moved.
                try:
                    async with asyncio.timeout(delay):
                        await changed.wait()
                    continue
                except TimeoutError:
                    pass
            try:
                await self._broker.refresh(account)
                failures = 0
                continue
            except CredentialsRejectedError as error:
                pause = error.retry_after or self.refresh.rejected_backoff_seconds
            except BrokerError as error:
                failures += 1
                pause = self._retry_delay(failures, error.retry_after)
            except Exception:
                failures += 1
                log.exception("refresh failed unexpectedly", extra={"account": account})
                pause = self._retry_delay(failures, None)
            # A change since the attempt began ends the pause early: a new token elsewhere,
            # reloaded credentials, or an operator's reset of the back-off.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await changed.wait()

    @staticmethod
    def _retry_delay(failures: int, retry_after: float | None) -> float:
        backoff = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (failures - 1))
        # S311: as above, jitter only.
        jittered = random.uniform(backoff / 2, backoff)  # noqa: S311
        return max(jittered, retry_after or 0.0)
