"""The upstream step of obtaining a token, run while holding the account's lock."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from pydantic import SecretStr

from service.broker.budget import BudgetExhaustedError, SupersededError
from service.broker.model import BrokerError, CredentialsRejectedError, UpstreamUnavailableError
from service.broker.state import AccountState
from service.claims import fingerprint
from service.config import Account, RefreshSettings
from service.metrics import STORE_ERRORS, UNREPLICATED_NOTES
from service.store import (
    FailureRecord,
    Saved,
    Spent,
    StoreUnavailableError,
    TokenRecord,
    TokenStore,
)
from service.upstream import MonogotoClient, TokenGrant, UpstreamError
from service.upstream import errors as upstream_errors

log = logging.getLogger(__name__)

# What a caller is told to wait when Monogoto failed without saying for how long.
UPSTREAM_RETRY_AFTER_SECONDS = 5.0
FAILED_DETAIL = "Monogoto did not issue a token"
# What a caller is told to wait when the credentials Monogoto refused were replaced meanwhile.
RELOADED_RETRY_AFTER_SECONDS = 1.0
# How long a spent refresh token is remembered when its own expiry is unknown.
SPENT_MEMORY_SECONDS = 7 * 86400.0


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
        # Per account: fingerprints of the refresh tokens this process sent (or was about to),
        # and until when to remember them. Kept here as well as in the store, because a store
        # that goes back in time forgets them along with the records that spent them.
        self._spent: dict[str, dict[str, float]] = {name: {} for name in accounts}

    def apply(self, accounts: dict[str, Account], refresh: RefreshSettings) -> None:
        """Take a reloaded configuration (`states` already has an entry per account, with the
        fingerprint of its configured credentials)."""
        self._spent = {name: self._spent.get(name, {}) for name in accounts}
        self._accounts, self._refresh = accounts, refresh

    def trusted(self, account: str, record: TokenRecord) -> TokenRecord:
        """`record` without its refresh token if this process knows that token to be spent."""
        return (
            record if self.spent(account, record) is None else replace(record, refresh_token=None)
        )

    def spent(self, account: str, record: TokenRecord) -> Spent | None:
        """What this process remembers of `record`'s refresh token as spent, if anything."""
        refresh = record.refresh_token
        spent = self._spent[account]
        if refresh is None or not spent:
            return None
        now = time.time()
        for key in [key for key, until in spent.items() if until <= now]:
            del spent[key]
        key = fingerprint(refresh.get_secret_value())
        return None if key not in spent else Spent(key, spent[key])

    async def reseed(self) -> None:
        """Write what this process knows back to a store that lost it: the refresh tokens it
        spent and the credential rejections in force (with their remaining time)."""
        now = time.time()
        for account, spent in self._spent.items():
            live = [Spent(key, until) for key, until in spent.items() if until > now]
            if live:
                await self._store.remember_spent(account, live)
            state = self._states[account]
            if state.rejected_until > now:
                failure = FailureRecord(
                    detail=state.last_error or "credentials rejected",
                    retry_at=state.rejected_until,
                    credentials=state.credentials,
                )
                await self._store.save_failure(account, failure)

    async def renew(
        self,
        account: str,
        current: TokenRecord | None,
        *,
        lock: str,
        revoke: bool = False,
        verify: bool = False,
    ) -> TokenRecord:
        """A new record replacing `current`, written and published; raises BrokerError.

        `lock` is the account's lock, held by the caller: the notes written before Monogoto is
        called are fenced with it. With `revoke`, `current`'s access token is revoked first.
        With `verify`, the renewal is a login whatever refresh token `current` holds: it proves
        the configured credentials, and its outcome is logged as such.
        """
        state = self._states[account]
        offered = current.grant() if current else None
        if current is not None and (revoke or (current.refresh_token is not None and not verify)):
            current, offered = await self._note(account, current, lock, revoke=revoke)
        if verify:
            offered = None  # the refresh token stays in the record, unsent
        # Taken before the call: a reload may change the credentials while it runs.
        credentials = state.credentials
        try:
            grant = await self._client.renew(self._accounts[account], offered)
        except UpstreamError as error:
            refresh_token = offered.refresh_token if offered else None
            if current is not None and refresh_token is not None and not error.refresh_token_spent:
                # The refresh certainly never reached Monogoto: its token is still good.
                await self._keep_refresh_token(account, current, refresh_token, lock)
            if isinstance(error, SupersededError):
                raise  # not a failure: the broker takes the record that made it unnecessary
            failure = await self._failed(account, error, credentials)
            if verify:
                self._log_verification(account, error)
            raise failure from None
        local = state.token
        replaces = max(current.version if current else 0, local.record.version if local else 0)
        # A refresh continues the line of the login that began it, and proves nothing new.
        obtained_with: str | None = credentials
        if not grant.by_login:
            obtained_with = None if current is None else current.credentials
        record = TokenRecord.from_grant(
            grant, replaces=replaces, now=time.time(), credentials=obtained_with
        )
        if verify:
            self._log_verification(account, None)
        try:
            if state.rejected_until or verify:
                # Also a marker left for credentials configured before: it is of no use now.
                await self._store.clear_failure(account)
            if not await self._store.save(account, record):
                # Someone wrote a newer record while we worked (a lease outlived): prefer it.
                newer = await self._store.load(account)
                if newer is not None and newer.version > record.version:
                    record = self.trusted(account, newer)
        except StoreUnavailableError:
            STORE_ERRORS.labels("save").inc()
            log.warning(
                "token obtained but not stored: store unavailable", extra={"account": account}
            )
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
        failure = await self._store.load_failure(account)
        if failure is not None and failure.applies_to(self._states[account].credentials):
            self._states[account].rejected(account, failure)
        self.raise_if_rejected(account)

    def raise_if_backing_off(self, account: str) -> None:
        """Raise while the last renewal failed for a transient reason less than its
        `Retry-After` ago: callers asking meanwhile cost Monogoto nothing."""
        wait = self._states[account].retry_at - time.monotonic()
        if wait > 0:
            raise UpstreamUnavailableError(FAILED_DETAIL, retry_after=wait)

    def raise_if_rejected(self, account: str) -> None:
        """Raise while this process knows the account's credentials to be rejected."""
        wait = self._states[account].rejected_until - time.time()
        if wait > 0:
            raise CredentialsRejectedError(
                "Monogoto rejected this account's credentials", retry_after=wait
            )

    @staticmethod
    def _log_verification(account: str, error: UpstreamError | None) -> None:
        """One line per login made to verify an account's credentials, with its outcome."""
        if error is None:
            log.info(
                "credentials verified: Monogoto accepted them",
                extra={"event": "credentials.verify", "account": account, "outcome": "verified"},
            )
        elif isinstance(error, upstream_errors.CredentialsRejectedError):
            log.warning(
                "credentials verification: Monogoto rejected them",
                extra={"event": "credentials.verify", "account": account, "outcome": "rejected"},
            )
        else:
            log.warning(
                "credentials verification could not be made; it will be retried",
                extra={
                    "event": "credentials.verify",
                    "account": account,
                    "outcome": "unavailable",
                    "reason": error.detail,
                },
            )

    async def _failed(self, account: str, error: UpstreamError, credentials: str) -> Exception:
        """Record a failed renewal made with `credentials` (their fingerprint); the BrokerError
        to raise."""
        state = self._states[account]
        if isinstance(error, upstream_errors.CredentialsRejectedError):
            return await self._reject(account, error, credentials)
        if isinstance(error, BudgetExhaustedError):
            state.failed("auth budget exhausted")
            return UpstreamUnavailableError(
                "the shared Monogoto auth budget is exhausted", retry_after=error.retry_after
            )
        log.warning(
            "could not obtain a token",
            extra={"account": account, "result": error.result, "reason": error.detail},
        )
        retry_after = getattr(error, "retry_after", None) or UPSTREAM_RETRY_AFTER_SECONDS
        state.failed(error.detail, retry_after)
        return UpstreamUnavailableError(FAILED_DETAIL, retry_after=retry_after)

    async def _reject(
        self, account: str, error: upstream_errors.CredentialsRejectedError, credentials: str
    ) -> BrokerError:
        """Mark the account's `credentials` rejected, here and for every replica that has
        them; the error to raise."""
        backoff = self._refresh.rejected_backoff_seconds
        failure = FailureRecord(
            detail=error.detail, retry_at=time.time() + backoff, credentials=credentials
        )
        reloaded = credentials != self._states[account].credentials
        if reloaded:
            # A config reload changed the credentials while Monogoto refused the old ones: the
            # marker holds back only replicas that still have those; these are tried next.
            log.warning(
                "Monogoto rejected the account's previous credentials; trying the reloaded ones",
                extra={"account": account},
            )
        else:
            self._states[account].rejected(account, failure)
            log.error(
                "Monogoto rejected the account's credentials; not retrying for a while",
                extra={"account": account, "backoff_seconds": backoff},
            )
        try:
            await self._store.save_failure(account, failure)
        except StoreUnavailableError:
            STORE_ERRORS.labels("save_failure").inc()
        if reloaded:
            return UpstreamUnavailableError(FAILED_DETAIL, retry_after=RELOADED_RETRY_AFTER_SECONDS)
        return CredentialsRejectedError(
            "Monogoto rejected this account's credentials", retry_after=backoff
        )

    async def _note(
        self, account: str, current: TokenRecord, lock: str, *, revoke: bool
    ) -> tuple[TokenRecord, TokenGrant]:
        """Store `current` without its refresh token (and, with `revoke`, with its access token
        revoked) before calling Monogoto. The refresh token is noted as spent first (broker.md
        rule 7): should this process die mid-refresh, whoever renews next logs in instead of
        sending a token Monogoto may already have spent. The access token stays in use while valid,
        unless revoked: then no replica serves it again, whether or not a new one comes.

        The note is fenced with the lock: a holder whose lease ran out writes nothing.
        Returns the record now current and the grant to renew from; if the store did not take
        the note, that grant has no refresh token (only a login is safe then)."""
        refresh = current.refresh_token
        noted = replace(
            current,
            refresh_token=None,
            revoked=current.revoked or revoke,
            version=current.version + 1,
        )
        spends = None
        if refresh is not None:
            until = current.refresh_expires_at or time.time() + SPENT_MEMORY_SECONDS
            spends = Spent(fingerprint(refresh.get_secret_value()), until)
        try:
            saved = await self._store.save(account, noted, lock=lock, spends=spends)
        except StoreUnavailableError:
            STORE_ERRORS.labels("save").inc()
            saved = Saved(written=False)
        if not saved:
            return current, noted.grant()
        if spends is not None:
            self._spent[account][spends.fingerprint] = spends.until
        self._states[account].adopt(account, noted)
        if not saved.replicated:
            # The note is on the master only: a failover now could bring the refresh token
            # back, and another replica would send it again. Log in instead; it stays unsent.
            UNREPLICATED_NOTES.inc()
            return noted, noted.grant()
        return noted, current.grant()

    async def _keep_refresh_token(
        self, account: str, spent: TokenRecord, refresh_token: SecretStr, lock: str
    ) -> None:
        """Put back a refresh token that was noted as spent but certainly never sent."""
        key = fingerprint(refresh_token.get_secret_value())
        kept = replace(spent, refresh_token=refresh_token, version=spent.version + 1)
        try:
            if not await self._store.save(account, kept, lock=lock, spends=Spent(key, 0.0)):
                return  # someone wrote a newer record meanwhile, or the lock was lost
        except StoreUnavailableError:
            STORE_ERRORS.labels("save").inc()
            return  # the next renewal logs in instead
        self._spent[account].pop(key, None)
        self._states[account].adopt(account, kept)
