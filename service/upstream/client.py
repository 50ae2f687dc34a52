"""The Monogoto authentication client: one interface over the legacy and v1 dialects."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import SecretStr

from service.claims import LifetimeSource, UnusableTokenError, fingerprint, token_lifetime
from service.config import Account, Dialect
from service.metrics import UPSTREAM_DURATION, UPSTREAM_REQUESTS
from service.upstream.errors import (
    CredentialsRejectedError,
    MalformedResponseError,
    Operation,
    RateLimitedError,
    RefreshRejectedError,
    TransientError,
    UpstreamError,
)
from service.upstream.retry import RetryPolicy, retrying

log = logging.getLogger(__name__)

BeforeAttempt = Callable[[Account, Operation], Awaitable[None]]
OnRateLimited = Callable[[Account, float | None], Awaitable[None]]

# The longest Retry-After taken from Monogoto by default (config: upstream.max_retry_after_seconds).
DEFAULT_MAX_RETRY_AFTER_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """Tokens obtained by one login or refresh; times are wall-clock seconds."""

    access_token: SecretStr
    refresh_token: SecretStr | None
    customer_id: str | None
    requested_at: float
    lifetime: float
    refresh_lifetime: float | None = None
    # False for a refresh: it proves nothing about the account's username and password.
    by_login: bool = True

    @property
    def expires_at(self) -> float:
        """When the access token expires, on the local clock."""
        return self.requested_at + self.lifetime

    @property
    def refresh_expires_at(self) -> float | None:
        """When the refresh token expires, if it is known."""
        if self.refresh_lifetime is None:
            return None
        return self.requested_at + self.refresh_lifetime


async def _no_gate(_account: Account, _operation: Operation) -> None:
    return None


async def _ignore_rate_limit(_account: Account, _retry_after: float | None) -> None:
    return None


class MonogotoClient:
    """Logs in to Monogoto and refreshes tokens, with bounded, jittered retries.

    `before_attempt` runs before every single HTTP attempt, retries included; the broker uses it
    to take a unit of the shared auth budget (it may raise to stop the attempt).
    `on_rate_limited` runs whenever Monogoto answers 429, before any retry, so that other
    replicas can hold back too.
    `max_retry_after` caps every Retry-After taken from Monogoto, so an absurd value cannot stall
    the shared budget or be passed on to callers.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        default_lifetime: float,
        retry: RetryPolicy | None = None,
        before_attempt: BeforeAttempt = _no_gate,
        on_rate_limited: OnRateLimited = _ignore_rate_limit,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
    ) -> None:
        self._http = http
        self._before_attempt = before_attempt
        self._on_rate_limited = on_rate_limited
        self.configure(
            default_lifetime=default_lifetime, retry=retry, max_retry_after=max_retry_after
        )

    def configure(
        self,
        *,
        default_lifetime: float,
        retry: RetryPolicy | None = None,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
    ) -> None:
        """Take new settings (a config reload); attempts already retrying keep their policy."""
        if not 0 < max_retry_after < math.inf:
            raise ValueError(f"max_retry_after must be finite and > 0, not {max_retry_after!r}")
        self._max_retry_after = max_retry_after
        self._default_lifetime = default_lifetime
        self._retry = retry or RetryPolicy()

    async def login(self, account: Account) -> TokenGrant:
        """Log in with the account's username and password, retrying transient failures."""
        async for attempt in retrying(self._retry, account, Operation.LOGIN, resend_safe=True):
            with attempt:
                return await self._login_once(account)
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def refresh(self, account: Account, refresh_token: SecretStr) -> TokenGrant:
        """Trade a v1 refresh token for a new pair.

        Only failures that certainly left the token unused are retried with it: a 429, or a
        request that never reached Monogoto. Any other failure marks it spent (broker.md rule 7).
        """
        if account.dialect is not Dialect.V1:
            raise ValueError(f"account {account.name!r} uses the {account.dialect} dialect")
        try:
            async for attempt in retrying(
                self._retry, account, Operation.REFRESH, resend_safe=False
            ):
                with attempt:
                    return await self._refresh_once(account, refresh_token)
        except UpstreamError as error:
            error.refresh_token_spent = not error.unprocessed
            raise
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def renew(self, account: Account, current: TokenGrant | None) -> TokenGrant:
        """Obtain a fresh grant: a v1 refresh where a usable refresh token exists, else a login.

        A refresh that Monogoto refused, or whose outcome is unknown, falls back to a login; if
        that login fails too, its error carries `refresh_token_spent`.
        """
        refresh_token = self._usable_refresh_token(account, current)
        if refresh_token is None:
            return await self.login(account)
        try:
            return await self.refresh(account, refresh_token)
        except UpstreamError as error:
            if not error.refresh_token_spent:
                raise
            log.info(
                "refresh failed, logging in instead",
                extra={"account": account.name, "reason": error.detail},
            )
        try:
            return await self.login(account)
        except UpstreamError as error:
            error.refresh_token_spent = True
            raise

    @staticmethod
    def _usable_refresh_token(account: Account, current: TokenGrant | None) -> SecretStr | None:
        if account.dialect is not Dialect.V1 or current is None or current.refresh_token is None:
            return None
        expires_at = current.refresh_expires_at
        if expires_at is not None and expires_at <= time.time():
            return None
        return current.refresh_token

    async def _attempt(
        self, account: Account, operation: Operation, send: Callable[[], Awaitable[TokenGrant]]
    ) -> TokenGrant:
        """One counted attempt, after the `before_attempt` gate let it through."""
        await self._before_attempt(account, operation)
        started = time.perf_counter()
        result = "error"
        try:
            grant = await send()
            result = "ok"
        except UpstreamError as error:
            result = error.result
            if isinstance(error, RateLimitedError):
                await self._on_rate_limited(account, error.retry_after)
            raise
        finally:
            UPSTREAM_REQUESTS.labels(account.name, operation, result).inc()
            UPSTREAM_DURATION.labels(operation).observe(time.perf_counter() - started)
        return grant

    async def _login_once(self, account: Account) -> TokenGrant:
        return await self._attempt(account, Operation.LOGIN, lambda: self._send_login(account))

    async def _refresh_once(self, account: Account, refresh_token: SecretStr) -> TokenGrant:
        return await self._attempt(
            account, Operation.REFRESH, lambda: self._send_refresh(account, refresh_token)
        )

    async def _send_login(self, account: Account) -> TokenGrant:
        if account.dialect is Dialect.LEGACY:
            body = {"UserName": account.username, "Password": account.password.get_secret_value()}
            requested_at, payload = await self._post(account, Operation.LOGIN, "/Auth", body)
            return self._legacy_grant(account, payload, requested_at)
        body = {"username": account.username, "password": account.password.get_secret_value()}
        requested_at, payload = await self._post(account, Operation.LOGIN, "/v1/auth/token", body)
        return self._v1_grant(account, Operation.LOGIN, payload, requested_at)

    async def _send_refresh(self, account: Account, refresh_token: SecretStr) -> TokenGrant:
        body = {"refresh_token": refresh_token.get_secret_value()}
        requested_at, payload = await self._post(
            account, Operation.REFRESH, "/v1/auth/refresh", body
        )
        return self._v1_grant(account, Operation.REFRESH, payload, requested_at)

    async def _post(
        self, account: Account, operation: Operation, path: str, body: dict[str, str]
    ) -> tuple[float, dict[str, Any]]:
        """One HTTP request; returns when it was sent and the JSON object Monogoto answered."""
        requested_at = time.time()
        try:
            # httpx times each phase; this bounds the whole attempt, however slowly bytes trickle.
            async with asyncio.timeout(account.timeout_seconds):
                response = await self._http.post(
                    account.base_url + path, json=body, timeout=account.timeout_seconds
                )
        except TimeoutError:
            detail = f"no complete answer within {account.timeout_seconds:g} s"
            raise TransientError(account.name, operation, detail, sent=True, timeout=True) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            timeout = isinstance(error, httpx.TimeoutException)
            raise TransientError(
                account.name, operation, _describe(error), sent=False, timeout=timeout
            ) from None
        except httpx.TransportError as error:
            timeout = isinstance(error, httpx.TimeoutException)
            raise TransientError(
                account.name, operation, _describe(error), sent=True, timeout=timeout
            ) from None
        _raise_for_status(account, operation, response, self._max_retry_after)
        try:
            payload = response.json()
        except ValueError:
            raise MalformedResponseError(account.name, operation, "body is not JSON") from None
        if not isinstance(payload, dict):
            raise MalformedResponseError(account.name, operation, "body is not a JSON object")
        return requested_at, payload

    def _legacy_grant(
        self, account: Account, payload: dict[str, Any], requested_at: float
    ) -> TokenGrant:
        access = _string_field(account, Operation.LOGIN, payload, "token")
        customer_id = payload.get("CustomerId")
        lifetime = self._lifetime(account, Operation.LOGIN, access, requested_at)
        return TokenGrant(
            access_token=SecretStr(access),
            # The legacy API documents no refresh endpoint, so its refreshToken is of no use.
            refresh_token=None,
            customer_id=None if customer_id is None else str(customer_id),
            requested_at=requested_at,
            lifetime=lifetime,
        )

    def _v1_grant(
        self, account: Account, operation: Operation, payload: dict[str, Any], requested_at: float
    ) -> TokenGrant:
        token_type = payload.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise MalformedResponseError(account.name, operation, "token_type is not Bearer")
        access = _string_field(account, operation, payload, "access_token")
        refresh = _string_field(account, operation, payload, "refresh_token")
        lifetime = self._lifetime(account, operation, access, requested_at)
        try:
            refresh_life = token_lifetime(refresh, now=requested_at, default_seconds=0.0)
        except UnusableTokenError as error:
            raise MalformedResponseError(
                account.name, operation, f"refresh token: {error}"
            ) from None
        return TokenGrant(
            access_token=SecretStr(access),
            refresh_token=SecretStr(refresh),
            customer_id=None,
            requested_at=requested_at,
            lifetime=lifetime,
            refresh_lifetime=(
                None if refresh_life.source is LifetimeSource.DEFAULT else refresh_life.seconds
            ),
            by_login=operation is Operation.LOGIN,
        )

    def _lifetime(
        self, account: Account, operation: Operation, token: str, requested_at: float
    ) -> float:
        try:
            lifetime = token_lifetime(
                token, now=requested_at, default_seconds=self._default_lifetime
            )
        except UnusableTokenError as error:
            raise MalformedResponseError(
                account.name, operation, f"access token: {error}"
            ) from None
        if lifetime.source is LifetimeSource.DEFAULT:
            log.warning(
                "access token carries no readable exp claim; assuming the default lifetime",
                extra={
                    "account": account.name,
                    "token": fingerprint(token),
                    "lifetime_seconds": lifetime.seconds,
                },
            )
        return lifetime.seconds


def _describe(error: httpx.TransportError) -> str:
    # httpx messages can quote the URL, never a body: safe to log, but keep them short.
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _string_field(
    account: Account, operation: Operation, payload: dict[str, Any], name: str
) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedResponseError(account.name, operation, f"field {name!r} missing or empty")
    return value


def retry_after_seconds(response: httpx.Response, cap: float) -> float | None:
    """Monogoto's Retry-After in seconds, between 0 and `cap`; None if absent or unusable.

    Seconds or an HTTP date (converted to seconds from now). A value that is neither, or is not
    finite (`inf`, `nan`), counts as absent; a negative one or a past date as 0.
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value)
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(cap, max(0.0, seconds))


def _seconds_until(http_date: str) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, with no claim about the local zone (RFC 5322)
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - time.time()


def _raise_for_status(
    account: Account, operation: Operation, response: httpx.Response, max_retry_after: float
) -> None:
    status = response.status_code
    if status == 200:
        return
    if status == 429:
        retry_after = retry_after_seconds(response, max_retry_after)
        raise RateLimitedError(account.name, operation, "rate limited (429)", retry_after)
    if status >= 500:
        raise TransientError(account.name, operation, f"status {status}", sent=True, timeout=False)
    rejected = (
        status == 404 and "access denied" in response.text.lower()
        if account.dialect is Dialect.LEGACY
        else status in (401, 403)
    )
    if rejected and operation is Operation.LOGIN:
        raise CredentialsRejectedError(account.name, operation, f"credentials rejected ({status})")
    if rejected:
        raise RefreshRejectedError(account.name, operation, f"refresh token rejected ({status})")
    raise MalformedResponseError(account.name, operation, f"unexpected status {status}")
