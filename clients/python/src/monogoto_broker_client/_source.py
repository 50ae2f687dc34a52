"""`TokenSource`: the tokens of one account from the broker, cached on a monotonic clock."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Union
from urllib.parse import quote, urlsplit

import httpx

from monogoto_broker_client._errors import (
    CREDENTIALS_UNREADABLE,
    INVALID_RESPONSE,
    UNREACHABLE,
    BrokerError,
    BrokerRefusedError,
    BrokerUnavailableError,
)

log = logging.getLogger("monogoto_broker_client")

#: A path given as a string or a path object.
StrPath = Union[str, "os.PathLike[str]"]

DEFAULT_MARGIN = 60.0
DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_WAIT = 30.0
#: The wait before asking again after a 503 without a usable `Retry-After`.
DEFAULT_RETRY_AFTER = 1.0
#: Waits after a transport error, a 502 or a 504 (without `Retry-After`): doubled each time.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0
#: Answers that are asked again, within `max_wait`: the broker is busy, or restarting behind a
#: proxy.
RETRIED_STATUSES = frozenset({502, 503, 504})
#: Answers that asking again unchanged will not fix.
REFUSED_STATUSES = frozenset({400, 401, 403, 404, 429})


def cache_seconds(expires_in: float, margin: float) -> float:
    """How long a token received with `expires_in` seconds left is handed out from the cache:
    `expires_in - margin`, or half of `expires_in` if the margin is not smaller than that."""
    if margin < expires_in:
        return expires_in - margin
    return expires_in / 2


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or
    unusable (negative, infinite, not a number or a date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return max(0.0, moment.timestamp() - time.time())
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def fingerprint(token: str) -> str:
    """The first 12 hex digits of the token's SHA-256, as the broker's logs show it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _usable_header_value(value: str) -> bool:
    # A key with a space or a control character would make the HTTP library raise an error
    # that quotes the header value; refuse it before it gets that far.
    return all(" " < character < "\x7f" for character in value)


class _Credential:
    """The caller key or service-account token sent to the broker, re-read from its file when
    the file changes (device, inode, size or modification time)."""

    def __init__(
        self,
        api_key: str | None,
        api_key_file: StrPath | None,
        service_account_token_file: StrPath | None,
    ) -> None:
        given = [
            (name, value)
            for name, value in (
                ("api_key", api_key),
                ("api_key_file", api_key_file),
                ("service_account_token_file", service_account_token_file),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of api_key, api_key_file and service_account_token_file"
            )
        self.kind, value = given[0]
        self.path: Path | None = None
        self._value = ""
        self._signature: tuple[int, int, int, int] | None = None
        self._lock = threading.Lock()
        if isinstance(value, str) and self.kind == "api_key":
            self._value = value.strip()
            if not self._value:
                raise ValueError("api_key is empty")
            if not _usable_header_value(self._value):
                raise ValueError("api_key contains spaces or control characters")
        elif self.kind == "api_key":
            raise TypeError("api_key must be a string")
        else:
            self.path = Path(value)

    def describe(self) -> str:
        """What the credential is, without its value."""
        if self.path is None:
            return "api_key=<hidden>"
        return f"{self.kind}={str(self.path)!r}"

    def current(self) -> str:
        """The value to send now; the file is read again if it changed since the last read."""
        if self.path is None:
            return self._value
        try:
            return self._read(self.path)
        except OSError as error:
            reason = error.strerror or type(error).__name__
        except UnicodeDecodeError:
            reason = "it is not UTF-8 text"
        except _Unusable as error:
            reason = str(error)
        raise BrokerError(
            f"cannot use the {self.kind} {str(self.path)!r}: {reason}",
            status=None,
            code=CREDENTIALS_UNREADABLE,
            detail=reason,
        )

    def _read(self, path: Path) -> str:
        status = os.stat(path)
        signature = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        with self._lock:
            if signature != self._signature:
                value = path.read_text(encoding="utf-8").strip()
                if not value:
                    raise _Unusable("it is empty")
                if not _usable_header_value(value):
                    raise _Unusable("it holds spaces or control characters")
                self._value, self._signature = value, signature
            return self._value


class _Unusable(Exception):
    """A credential file whose content cannot be sent."""


@dataclass(frozen=True)
class _Cached:
    token: str
    #: `time.monotonic()` until which the token is handed out.
    fresh_until: float


@dataclass(frozen=True)
class _Busy:
    """An answer worth asking again after a wait: a 503 (the broker has no token to give right
    now), a 502 or 504, or no answer at all (`status` None, `cause` the transport error)."""

    status: int | None
    code: str
    detail: str
    retry_after: float | None
    cause: BaseException | None = None


class TokenSource:
    """Access tokens of one Monogoto account, from the broker at `broker_url`.

    A token is handed out from the cache until `expires_in - margin` seconds after it was
    received (on `time.monotonic()`), or for half its `expires_in` if `margin` is not smaller.
    Concurrent callers share one request to the broker: threads calling `token()`, and tasks
    of one event loop calling `atoken()`.

    Exactly one credential: `api_key`, or `api_key_file` / `service_account_token_file`
    (read again whenever the file changes, e.g. a rotated Kubernetes Secret). It is sent as
    `Authorization: Bearer <value>`, stripped of surrounding whitespace.

    A 503 is asked again after its `Retry-After` (1 s if it has none), and so are a broker
    that cannot be reached (e.g. while it restarts), a 502 and a 504, after a growing wait
    (0.5 s, doubled each time up to 5 s), as long as the retry starts within `max_wait` seconds
    of the first request. `timeout` bounds each request.
    """

    def __init__(
        self,
        broker_url: str,
        account: str,
        *,
        api_key: str | None = None,
        api_key_file: StrPath | None = None,
        service_account_token_file: StrPath | None = None,
        margin: float = DEFAULT_MARGIN,
        timeout: float = DEFAULT_TIMEOUT,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        base = broker_url.rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"broker_url must be an http:// or https:// URL, got {broker_url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("broker_url must not hold a user name or password")
        if parts.query or parts.fragment:
            raise ValueError("broker_url must not have a query or a fragment")
        if not account:
            raise ValueError("account is empty")
        for name, value in (("margin", margin), ("max_wait", max_wait)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError("timeout must be a finite number of seconds > 0")
        self.broker_url = base
        self.account = account
        self.margin = float(margin)
        self.timeout = float(timeout)
        self.max_wait = float(max_wait)
        self._credential = _Credential(api_key, api_key_file, service_account_token_file)
        self._token_url = f"{base}/v1/accounts/{quote(account, safe='')}/token"
        self._invalidate_url = f"{self._token_url}/invalidate"
        self._cached: _Cached | None = None
        self._lock = threading.Lock()
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._async_locks_guard = threading.Lock()
        self._http: httpx.Client | None = None

    def __repr__(self) -> str:
        return (
            f"TokenSource(broker_url={self.broker_url!r}, account={self.account!r}, "
            f"{self._credential.describe()}, margin={self.margin:g}, "
            f"timeout={self.timeout:g}, max_wait={self.max_wait:g})"
        )

    # -- synchronous ---------------------------------------------------------------------

    def token(self) -> str:
        """A valid access token: the cached one, or a new one from the broker.

        Thread-safe; threads that find no usable token share one request. Raises
        BrokerRefusedError or BrokerUnavailableError (see their docs)."""
        cached = self._fresh()
        if cached is not None:
            return cached.token
        with self._lock:
            cached = self._fresh()
            if cached is not None:
                return cached.token
            return self._fetch(None)

    def invalidate(self, token: str) -> str:
        """Report `token`, which Monogoto rejected (401), and return its replacement.

        If the cache already holds another usable token (someone reported this one first), that
        one is returned without asking the broker. The replacement is cached."""
        with self._lock:
            replacement = self._before_invalidate(token)
            if replacement is not None:
                return replacement
            return self._fetch(token)

    def close(self) -> None:
        """Release the connections to the broker. The source stays usable."""
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self) -> TokenSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- asynchronous --------------------------------------------------------------------

    async def atoken(self) -> str:
        """`token()` for asyncio: tasks of one event loop that find no usable token share one
        request to the broker."""
        cached = self._fresh()
        if cached is not None:
            return cached.token
        async with self._async_lock():
            cached = self._fresh()
            if cached is not None:
                return cached.token
            return await self._afetch(None)

    async def ainvalidate(self, token: str) -> str:
        """`invalidate()` for asyncio."""
        async with self._async_lock():
            replacement = self._before_invalidate(token)
            if replacement is not None:
                return replacement
            return await self._afetch(token)

    async def aclose(self) -> None:
        """`close()` for asyncio (async requests hold no connections between fetches)."""
        self.close()

    async def __aenter__(self) -> TokenSource:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- shared --------------------------------------------------------------------------

    def _fresh(self) -> _Cached | None:
        cached = self._cached
        if cached is not None and time.monotonic() < cached.fresh_until:
            return cached
        return None

    def _before_invalidate(self, token: str) -> str | None:
        """The cached replacement if there is one; else forget `token` (so that nobody is handed
        it while the broker is asked) and return None."""
        cached = self._fresh()
        if cached is not None and cached.token != token:
            return cached.token
        if self._cached is not None and self._cached.token == token:
            self._cached = None
        return None

    def _async_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._async_locks_guard:
            lock = self._async_locks.get(loop)
            if lock is None:
                lock = asyncio.Lock()
                self._async_locks[loop] = lock
            return lock

    def _request_args(self, reported: str | None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._credential.current()}"}
        if reported is None:
            return {"method": "GET", "url": self._token_url, "headers": headers}
        return {
            "method": "POST",
            "url": self._invalidate_url,
            "headers": headers,
            "json": {"access_token": reported},
        }

    def _fetch(self, reported: str | None) -> str:
        started = time.monotonic()
        failures = 0
        while True:
            arguments = self._request_args(reported)
            if self._http is None:
                self._http = httpx.Client(timeout=self.timeout, follow_redirects=False)
            try:
                outcome = self._interpret(self._http.request(**arguments), reported)
            except httpx.TransportError as error:
                outcome = self._unreachable(error)
            if isinstance(outcome, _Cached):
                return outcome.token
            failures += 1
            time.sleep(self._wait(outcome, started, failures, reported))

    async def _afetch(self, reported: str | None) -> str:
        started = time.monotonic()
        failures = 0
        # A client per fetch: fetches are rare, and a client is bound to one event loop.
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
            while True:
                arguments = self._request_args(reported)
                try:
                    outcome = self._interpret(await http.request(**arguments), reported)
                except httpx.TransportError as error:
                    outcome = self._unreachable(error)
                if isinstance(outcome, _Cached):
                    return outcome.token
                failures += 1
                await asyncio.sleep(self._wait(outcome, started, failures, reported))

    def _interpret(self, response: httpx.Response, reported: str | None) -> _Cached | _Busy:
        """Cache and return the token of a 200; a 502, 503 or 504 to wait out; raise for anything
        else."""
        received = time.monotonic()
        status = response.status_code
        what = "an invalidate" if reported is not None else "a token request"
        if status == 200:
            cached = self._parse(response, received, what)
            self._cached = cached
            return cached
        code, detail = _problem(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status in RETRIED_STATUSES:
            return _Busy(status, code, detail, retry_after)
        answer = f"{status} {code}: {detail}"
        if retry_after is not None:
            answer += f"; retry after {retry_after:g} s"
        fields: dict[str, Any] = {
            "status": status,
            "code": code,
            "detail": detail,
            "retry_after": retry_after,
        }
        if status in REFUSED_STATUSES:
            raise BrokerRefusedError(f"{self._refusal(status)} ({answer})", **fields)
        message = f"the broker answered {what} for account {self.account!r} with {answer}"
        if status >= 500:
            raise BrokerUnavailableError(message, **fields)
        raise BrokerError(message, **fields)

    def _parse(self, response: httpx.Response, received: float, what: str) -> _Cached:
        try:
            body = response.json()
        except ValueError:
            body = None
        token = body.get("access_token") if isinstance(body, dict) else None
        expires_in = body.get("expires_in") if isinstance(body, dict) else None
        if (
            not isinstance(token, str)
            or not token
            or isinstance(expires_in, bool)
            or not isinstance(expires_in, (int, float))
            or not math.isfinite(expires_in)
            or expires_in < 0
        ):
            detail = "the answer has no access_token string and expires_in number"
            raise BrokerError(
                f"the broker answered {what} for account {self.account!r} with 200, but {detail}",
                status=200,
                code=INVALID_RESPONSE,
                detail=detail,
            )
        seconds = cache_seconds(float(expires_in), self.margin)
        log.debug(
            "token of account %s from the broker: fingerprint %s, expires in %s s, "
            "handed out for %.1f s",
            self.account,
            fingerprint(token),
            expires_in,
            seconds,
            extra={
                "account": self.account,
                "token_fingerprint": fingerprint(token),
                "expires_in": expires_in,
                "cache_seconds": seconds,
            },
        )
        return _Cached(token, received + seconds)

    def _wait(self, busy: _Busy, started: float, failures: int, reported: str | None) -> float:
        """How long to wait before asking again; raises BrokerUnavailableError if the next
        attempt would start more than `max_wait` seconds after the first."""
        if busy.retry_after is not None:
            wait = busy.retry_after
        elif busy.status == 503:
            wait = DEFAULT_RETRY_AFTER
        else:
            wait = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures - 1))
        elapsed = time.monotonic() - started
        if elapsed + wait > self.max_wait:
            given_up = f"gave up after {elapsed:.1f} s (max_wait {self.max_wait:g} s)"
            answer = f"{busy.status} {busy.code}: {busy.detail}"
            if busy.retry_after is not None:
                answer += f"; Retry-After {busy.retry_after:g} s"
            if busy.status is None:
                message = (
                    f"cannot reach the broker at {self.broker_url} for account "
                    f"{self.account!r} ({busy.detail}); {given_up}"
                )
            elif busy.status == 503:
                message = (
                    f"the broker has no token for account {self.account!r} now ({answer}); "
                    f"{given_up}"
                )
            else:
                what = "an invalidate" if reported is not None else "a token request"
                message = (
                    f"the broker answered {what} for account {self.account!r} with {answer}; "
                    f"{given_up}"
                )
            raise BrokerUnavailableError(
                message,
                status=busy.status,
                code=busy.code,
                detail=busy.detail,
                retry_after=busy.retry_after,
            ) from busy.cause
        log.info(
            "no token for account %s from the broker now (%s); asking again in %g s",
            self.account,
            busy.code if busy.status is None else f"{busy.status} {busy.code}",
            wait,
            extra={"account": self.account, "code": busy.code, "retry_after": wait},
        )
        return wait

    def _refusal(self, status: int) -> str:
        if status == 401:
            return (
                f"the broker refused the caller credential ({self._credential.describe()}): "
                "the caller key or service-account token is missing or unknown to the broker"
            )
        if status == 403:
            return (
                f"this caller may not use account {self.account!r}, "
                "or the broker has no such account"
            )
        if status == 404:
            return f"the broker has no such route: is broker_url {self.broker_url!r} right?"
        if status == 429:
            return (
                f"the broker refused to renew account {self.account!r} again so soon: "
                "this caller already forced a renewal within the last minute"
            )
        return f"the broker refused the request for account {self.account!r}"

    @staticmethod
    def _unreachable(error: httpx.TransportError) -> _Busy:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return _Busy(None, UNREACHABLE, detail, None, error)


def _problem(response: httpx.Response) -> tuple[str, str]:
    """The `code` and `detail` of a problem document; `http_<status>` and the reason phrase
    for any other body (which is never quoted: it could be anything)."""
    code, detail = f"http_{response.status_code}", response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        return code, detail
    if isinstance(body, dict):
        if isinstance(body.get("code"), str) and body["code"]:
            code = body["code"]
        if isinstance(body.get("detail"), str) and body["detail"]:
            detail = body["detail"]
    return code, detail
