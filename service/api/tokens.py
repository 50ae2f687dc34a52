"""`/v1/accounts/{account}/token`: hand out a valid token, and replace one Monogoto rejected."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Annotated

from litestar import Controller, get, post
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter, RequestBody

from service.api.problems import problem_responses
from service.api.schemas import MAX_MIN_TTL_SECONDS, InvalidateBody, TokenBody
from service.api.security import Caller, requires_account_access
from service.broker import BrokerError, IssuedToken
from service.broker.core import TokenBroker
from service.claims import fingerprint
from service.metrics import TOKEN_REQUESTS

log = logging.getLogger(__name__)

ERROR = "error"  # the outcome label of token_requests_total when the broker cannot serve


async def _serve(
    issuing: Awaitable[IssuedToken],
    account: str,
    caller: Caller,
    event: str,
    **context: str,
) -> TokenBody:
    """Await the broker, then count and log the request: one metric and one log line each."""
    fields = {"event": event, "account": account, "caller": caller.name, **context}
    try:
        token = await issuing
    except BrokerError as error:
        TOKEN_REQUESTS.labels(account, caller.name, ERROR).inc()
        log.warning("token request failed", extra=fields | {"outcome": ERROR, "code": error.code})
        raise
    body = TokenBody.of(token, now=time.time())
    TOKEN_REQUESTS.labels(account, caller.name, token.outcome).inc()
    log.info(
        "token issued",
        extra=fields
        | {
            "outcome": str(token.outcome),
            "token_fingerprint": fingerprint(token.access_token),
            "expires_in": body.expires_in,
        },
    )
    return body


class TokenController(Controller):
    """An account's current access token."""

    path = "/accounts/{account:str}/token"
    tags = ("tokens",)
    guards = (requires_account_access,)
    cache_control = CacheControlHeader(no_store=True)

    @get(
        operation_id="getToken",
        summary="Get a valid access token",
        responses=problem_responses(400, 401, 403, 503),
    )
    async def get_token(
        self,
        account: FromPath[str],
        caller: NamedDependency[Caller],
        broker: NamedDependency[TokenBroker],
        min_ttl: Annotated[
            int,
            QueryParameter(
                ge=0,
                le=MAX_MIN_TTL_SECONDS,
                description="Seconds the token must still be valid for, at least "
                "`refresh.min_remaining_seconds`; the broker renews it first if needed.",
            ),
        ] = 0,
    ) -> TokenBody:
        """A token of `account` with at least `max(min_ttl, refresh.min_remaining_seconds)`
        seconds left. Use it as `Authorization: Bearer <access_token>` against Monogoto."""
        return await _serve(broker.get(account, min_ttl=min_ttl), account, caller, "token.get")

    @post(
        "/invalidate",
        operation_id="invalidateToken",
        summary="Report a token Monogoto rejected",
        status_code=200,
        responses=problem_responses(400, 401, 403, 503),
    )
    async def invalidate_token(
        self,
        account: FromPath[str],
        caller: NamedDependency[Caller],
        broker: NamedDependency[TokenBroker],
        data: RequestBody[InvalidateBody],
    ) -> TokenBody:
        """If the reported token is still the current one, the broker obtains a new one;
        if it was already replaced, the current one comes back without calling Monogoto."""
        return await _serve(
            broker.invalidate(account, data.access_token),
            account,
            caller,
            "token.invalidate",
            reported_fingerprint=fingerprint(data.access_token),
        )
