"""The upstream step of obtaining a token, run while holding the account's lock."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from pydantic import SecretStr

from service.broker.budget import BudgetExhaustedError
from service.broker.model import CredentialsRejectedError, UpstreamUnavailableError
from service.broker.state import AccountState
from service.claims import fingerprint
from service.config import Account, RefreshSettings
from service.metrics import CREDENTIALS_REJECTED, STORE_ERRORS
from service.store import FailureRecord, StoreUnavailableError, TokenRecord, TokenStore
from service.upstream import MonogotoClient, TokenGrant, UpstreamError
from service.upstream import errors as upstream_errors

log = logging.getLogger(__name__)

# What a caller is told to wait when Monogoto failed without saying for how long.
UPSTREAM_RETRY_AFTER_SECONDS = 5.0


class Renewer:
    """Calls Monogoto for a new grant, then records the outcome for every replica."""

    def __init__(
        self,
        accounts: dict[str, Account],
        refresh: RefreshSettings,
        store: TokenStore,
        client: MonogotoClient,
        states: dict[str, AccountState],
    ) -> None:
        self._accounts = accounts
        self._refresh = refresh
        self._store = store
        self._client = client
        self._states = states

    async def renew(self, account: str, current: TokenRecord | None) -> TokenRecord:
        """A new record replacing `current`, written and published; raises BrokerError."""
        state = self._states[account]
        offered = current.grant() if current else None
        if current is not None and current.refresh_token is not None:
            current, offered = await self._spend_ahead(account, current)
        try:
            grant = await self._client.renew(self._accounts[account], offered)
        except UpstreamError as error:
            refresh_token = offered.refresh_token if offered else None
            if current is not None and refresh_token is not None and not error.refresh_token_spent:
                # The refresh certainly never reached Monogoto: its token is still good.
                await self._keep_refresh_token(account, current, refresh_token)
            raise await self._failed(account, error) from None
        local = state.token
        replaces = max(current.version if current else 0, local.record.version if local else 0)
        record = TokenRecord.from_grant(grant, replaces=replaces, now=time.time())
        try:
            if state.rejected_until:
                await self._store.clear_failure(account)
            if not await self._store.save(account, record):
                # Someone wrote a newer record while we worked (a lease outlived): prefer it.
                newer = await self._store.load(account)
                if newer is not None and newer.version > record.version:
                    record = newer
        except StoreUnavailableError:
            STORE_ERRORS.labels("save").inc()
            log.warning(
                "token obtained but not stored: store unavailable", extra={"account": account}
            )
        state.rejected_until = 0.0
        CREDENTIALS_REJECTED.labels(account).set(0)
        log.info(
            "token obtained",
            extra={
                "account": account,
                "token": fingerprint(record.access_token.get_secret_value()),
                "expires_in": round(record.expires_at - time.time()),
                "version": record.version,
            },
        )
        return record

    async def check_rejected(self, account: str) -> None:
        """Raise while the account's credentials are known to be rejected, here or elsewhere."""
        state = self._states[account]
        failure = await self._store.load_failure(account)
        if failure is not None:
            state.rejected(failure)
            CREDENTIALS_REJECTED.labels(account).set(1)
        self.raise_if_rejected(account)

    def raise_if_rejected(self, account: str) -> None:
        """Raise while this process knows the account's credentials to be rejected."""
        wait = self._states[account].rejected_until - time.time()
        if wait > 0:
            raise CredentialsRejectedError(
                "Monogoto rejected this account's credentials", retry_after=wait
            )

    async def _failed(self, account: str, error: UpstreamError) -> Exception:
        """Record a failed renewal; the BrokerError to raise."""
        state = self._states[account]
        if isinstance(error, upstream_errors.CredentialsRejectedError):
            return await self._reject(account, error)
        if isinstance(error, BudgetExhaustedError):
            state.failed("auth budget exhausted")
            return UpstreamUnavailableError(
                "the shared Monogoto auth budget is exhausted", retry_after=error.retry_after
            )
        state.failed(error.detail)
        log.warning(
            "could not obtain a token",
            extra={"account": account, "result": error.result, "reason": error.detail},
        )
        retry_after = getattr(error, "retry_after", None) or UPSTREAM_RETRY_AFTER_SECONDS
        return UpstreamUnavailableError("Monogoto did not issue a token", retry_after=retry_after)

    async def _reject(
        self, account: str, error: upstream_errors.CredentialsRejectedError
    ) -> CredentialsRejectedError:
        """Mark the account rejected, here and for every replica; the error to raise."""
        backoff = self._refresh.rejected_backoff_seconds
        failure = FailureRecord(detail=error.detail, retry_at=time.time() + backoff)
        self._states[account].rejected(failure)
        CREDENTIALS_REJECTED.labels(account).set(1)
        log.error(
            "Monogoto rejected the account's credentials; not retrying for a while",
            extra={"account": account, "backoff_seconds": backoff},
        )
        try:
            await self._store.save_failure(account, failure)
        except StoreUnavailableError:
            STORE_ERRORS.labels("save_failure").inc()
        return CredentialsRejectedError(
            "Monogoto rejected this account's credentials", retry_after=backoff
        )

    async def _spend_ahead(
        self, account: str, current: TokenRecord
    ) -> tuple[TokenRecord, TokenGrant]:
        """Store `current` without its refresh token before sending that token (DESIGN rule 7):
        should this process die mid-refresh, whoever renews next logs in instead of sending a
        token Monogoto may already have spent. The access token stays in use while valid.

        Returns the record now current and the grant to renew from; if the store did not take
        the note, that grant has no refresh token either (only a login is safe then)."""
        spent = replace(current, refresh_token=None, version=current.version + 1)
        try:
            saved = await self._store.save(account, spent)
        except StoreUnavailableError:
            STORE_ERRORS.labels("save").inc()
            saved = False
        if not saved:
            return current, spent.grant()
        self._states[account].adopt(account, spent)
        return spent, current.grant()

    async def _keep_refresh_token(
        self, account: str, spent: TokenRecord, refresh_token: SecretStr
    ) -> None:
        """Put back a refresh token that was noted as spent but certainly never sent."""
        kept = replace(spent, refresh_token=refresh_token, version=spent.version + 1)
        try:
            if not await self._store.save(account, kept):
                return  # someone wrote a newer record meanwhile
        except StoreUnavailableError:
            STORE_ERRORS.labels("save").inc()
            return  # the next renewal logs in instead
        self._states[account].adopt(account, kept)
