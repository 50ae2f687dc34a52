"""Authentication of requests to Monogoto with the broker's tokens: httpx and requests."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from monogoto_broker_client._errors import BrokerError, BrokerRefusedError
from monogoto_broker_client._source import TokenSource, fingerprint

log = logging.getLogger("monogoto_broker_client")

_BEARER = "Bearer "
_RENEWAL_RATE_LIMITED = 429


def _rejected(source: TokenSource, token: str) -> None:
    log.info(
        "Monogoto rejected the token of account %s (fingerprint %s); reporting it to the broker",
        source.account,
        fingerprint(token),
        extra={"account": source.account, "token_fingerprint": fingerprint(token)},
    )


def _renewal_refused(source: TokenSource, error: BrokerRefusedError) -> bool:
    """Whether the broker refused to renew a token it renewed moments ago: then the 401 is the
    answer (Monogoto rejects the new token too), not a broker error."""
    if error.status != _RENEWAL_RATE_LIMITED:
        return False
    log.warning(
        "Monogoto rejected the token of account %s, and the broker renewed it less than a "
        "minute ago: returning the 401",
        source.account,
        extra={"account": source.account, "code": error.code},
    )
    return True


class MonogotoAuth(httpx.Auth):
    """`httpx.Auth` for requests to Monogoto (sync and async clients).

    Adds `Authorization: Bearer <token>` with a token of `source`. When Monogoto answers 401,
    reports the token (`invalidate`) and sends the request once more with the replacement; a
    second 401 is returned as it is. Broker errors propagate from the request, except a 429
    to the report (the broker renewed the token less than a minute ago and Monogoto rejects
    that one too): then the 401 is returned.
    """

    # The request may be sent twice: read a streamed body first.
    requires_request_body = True

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"MonogotoAuth({self.source!r})"

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.source.token()
        request.headers["Authorization"] = _BEARER + token
        response = yield request
        if response.status_code != 401:
            return
        _rejected(self.source, token)
        try:
            replacement = self.source.invalidate(token)
        except BrokerRefusedError as error:
            if _renewal_refused(self.source, error):
                return
            raise
        request.headers["Authorization"] = _BEARER + replacement
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.source.atoken()
        request.headers["Authorization"] = _BEARER + token
        response = yield request
        if response.status_code != 401:
            return
        _rejected(self.source, token)
        try:
            replacement = await self.source.ainvalidate(token)
        except BrokerRefusedError as error:
            if _renewal_refused(self.source, error):
                return
            raise
        request.headers["Authorization"] = _BEARER + replacement
        yield request


class MonogotoRequestsAuth:
    """The same for `requests` (`session.auth = MonogotoRequestsAuth(source)`).

    Duck-typed: it imports nothing from requests. A 401 is retried once with the replacement
    token, unless the request body is a stream that cannot be rewound.
    """

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"MonogotoRequestsAuth({self.source!r})"

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = _BEARER + self.source.token()
        body: Any = getattr(request, "body", None)
        position: int | None = None
        if hasattr(body, "seek") and hasattr(body, "tell"):
            try:
                position = body.tell()
            except OSError:
                position = None
        request.__dict__["_monogoto_body_position"] = position
        request.register_hook("response", self._handle_401)
        return request

    def _handle_401(self, response: Any, **kwargs: Any) -> Any:
        request = response.request
        if response.status_code != 401 or request.__dict__.get("_monogoto_retried"):
            return response
        body = getattr(request, "body", None)
        position = request.__dict__.get("_monogoto_body_position")
        if body is not None and not isinstance(body, (bytes, str)):
            if position is None:
                return response  # a stream already sent: nothing to send again
            body.seek(position)
        token = request.headers.get("Authorization", "")[len(_BEARER) :]
        _rejected(self.source, token)
        try:
            replacement = self.source.invalidate(token)
        except BrokerError as error:
            if isinstance(error, BrokerRefusedError) and _renewal_refused(self.source, error):
                return response
            response.close()
            raise
        response.content  # noqa: B018  (read the body, so the connection can be reused)
        response.close()
        retry = request.copy()
        retry.__dict__["_monogoto_retried"] = True
        retry.headers["Authorization"] = _BEARER + replacement
        answer = response.connection.send(retry, **kwargs)
        answer.history.append(response)
        answer.request = retry
        return answer
