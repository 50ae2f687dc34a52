"""The Monogoto client against the simulator over real HTTP: every outcome simulator.md lists."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from service.config import Account, Dialect
from service.simulator.client import SimulatorControl
from service.upstream import (
    CredentialsRejectedError,
    MalformedResponseError,
    MonogotoClient,
    Operation,
    RateLimitedError,
    RefreshRejectedError,
    RetryPolicy,
    TokenGrant,
    TransientError,
)
from tests.support import free_port

USERNAME = "ops@example.com"
PASSWORD = "s3cret"
DEFAULT_LIFETIME = 1800.0
# Fast retries keep the suite quick; the bounds are what is under test, not their size.
FAST = RetryPolicy(
    max_attempts=3, max_elapsed_seconds=5, initial_backoff_seconds=0.05, max_backoff_seconds=0.2
)


class Attempts:
    """Counts every attempt the client makes, as the broker's auth budget will."""

    def __init__(self) -> None:
        self.by_operation: Counter[Operation] = Counter()

    async def __call__(self, _account: Account, operation: Operation) -> None:
        self.by_operation[operation] += 1


@pytest.fixture
def sim(simulator: SimulatorControl) -> SimulatorControl:
    """The simulator with a rate limit out of the way of tests that are not about it."""
    simulator.set(rate_limit=1000)
    return simulator


@pytest.fixture
def attempts() -> Attempts:
    """A fresh attempt counter."""
    return Attempts()


@pytest.fixture
async def client(attempts: Attempts) -> AsyncIterator[MonogotoClient]:
    """A client with fast retries that counts its attempts."""
    async with httpx.AsyncClient() as http:
        yield MonogotoClient(
            http, default_lifetime=DEFAULT_LIFETIME, retry=FAST, before_attempt=attempts
        )


def _account(
    base_url: str,
    dialect: Dialect,
    *,
    password: str = PASSWORD,
    timeout: float = 2.0,
) -> Account:
    return Account(
        name="fleet-eu",
        username=USERNAME,
        password=SecretStr(password),
        dialect=dialect,
        base_url=base_url,
        timeout_seconds=timeout,
    )


async def test_legacy_login_returns_token_customer_id_and_lifetime_from_claims(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """A legacy login yields the token, CustomerId and the lifetime the token itself states."""
    sim.set(token_lifetime_seconds=120)
    before = time.time()

    grant = await client.login(_account(sim.base_url, Dialect.LEGACY))

    assert grant.lifetime == pytest.approx(120, abs=1)
    assert before <= grant.requested_at <= time.time()
    assert grant.customer_id is not None
    assert grant.customer_id.startswith("cid_")
    assert grant.refresh_token is None
    assert sim.calls("legacy_auth", "ok", USERNAME) == 1


async def test_v1_login_returns_a_pair_without_customer_id(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """A v1 login yields access and refresh tokens, their lifetimes, and no customer id."""
    sim.set(token_lifetime_seconds=300, refresh_lifetime_seconds=900)

    grant = await client.login(_account(sim.base_url, Dialect.V1))

    assert grant.lifetime == pytest.approx(300, abs=1)
    assert grant.refresh_lifetime == pytest.approx(900, abs=1)
    assert grant.refresh_token is not None
    assert grant.customer_id is None
    assert sim.calls("v1_token", "ok", USERNAME) == 1


@pytest.mark.parametrize(
    ("dialect", "endpoint"), [(Dialect.LEGACY, "legacy_auth"), (Dialect.V1, "v1_token")]
)
async def test_rejected_credentials_are_never_retried(
    sim: SimulatorControl,
    client: MonogotoClient,
    attempts: Attempts,
    dialect: Dialect,
    endpoint: str,
) -> None:
    """Wrong credentials fail at once after one call: retrying could lock the account."""
    with pytest.raises(CredentialsRejectedError):
        await client.login(_account(sim.base_url, dialect, password="wrong"))

    assert attempts.by_operation[Operation.LOGIN] == 1
    assert sim.calls(endpoint) == sim.calls(endpoint, "rejected") == 1


async def test_refresh_rotates_and_a_reused_refresh_token_is_refused(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """A refresh token works once; sending it again is refused and marks it spent."""
    account = _account(sim.base_url, Dialect.V1)
    first = await client.login(account)
    assert first.refresh_token is not None

    second = await client.refresh(account, first.refresh_token)
    with pytest.raises(RefreshRejectedError) as refused:
        await client.refresh(account, first.refresh_token)

    assert second.refresh_token is not None
    assert second.refresh_token.get_secret_value() != first.refresh_token.get_secret_value()
    assert refused.value.refresh_token_spent
    assert sim.calls("v1_refresh", "ok") == 1
    assert sim.calls("v1_refresh", "refresh_reused") == 1


async def test_renew_with_a_consumed_refresh_token_falls_back_to_login(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """When Monogoto refuses the refresh token, renew logs in and returns a working pair."""
    account = _account(sim.base_url, Dialect.V1)
    stale = await client.login(account)
    assert stale.refresh_token is not None
    await client.refresh(account, stale.refresh_token)

    renewed = await client.renew(account, stale)

    assert renewed.refresh_token is not None
    assert sim.calls("v1_refresh", "refresh_reused") == 1
    assert sim.calls("v1_token", "ok") == 2
    await client.refresh(account, renewed.refresh_token)  # the new pair works
    assert sim.calls("v1_refresh", "ok") == 2


async def test_renew_refreshes_a_v1_grant_and_logs_in_for_legacy(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """renew uses the refresh endpoint where the dialect has one, a login otherwise."""
    v1 = _account(sim.base_url, Dialect.V1)
    legacy = _account(sim.base_url, Dialect.LEGACY)

    await client.renew(v1, await client.login(v1))
    await client.renew(legacy, await client.login(legacy))

    assert sim.calls("v1_token") == 1
    assert sim.calls("v1_refresh", "ok") == 1
    assert sim.calls("legacy_auth", "ok") == 2


async def test_429_retry_after_is_honoured(
    simulator: SimulatorControl, client: MonogotoClient
) -> None:
    """After a 429 the client waits out Retry-After: its retry is admitted, not refused again."""
    simulator.set(rate_limit=1, rate_period_seconds=1.5)
    account = _account(simulator.base_url, Dialect.LEGACY)
    await client.login(account)

    await client.login(account)  # over the limit: 429, then a retry after Retry-After

    assert simulator.calls("legacy_auth", "rate_limited") == 1
    assert simulator.calls("legacy_auth", "ok") == 2


async def test_429_with_retry_after_past_the_retry_bound_ends_the_call(
    sim: SimulatorControl, client: MonogotoClient, attempts: Attempts
) -> None:
    """A Retry-After longer than the client will wait is passed on, not slept through."""
    sim.fault("status", endpoint="v1_token", status=429, retry_after=60)

    with pytest.raises(RateLimitedError) as limited:
        await client.login(_account(sim.base_url, Dialect.V1))

    assert limited.value.retry_after == 60
    assert attempts.by_operation[Operation.LOGIN] == 1


async def test_429_with_retry_after_inf_counts_as_no_retry_after(
    sim: SimulatorControl, client: MonogotoClient, attempts: Attempts
) -> None:
    """`Retry-After: inf` is ignored: the 429s are retried with backoff, then surface as
    RateLimitedError without a retry_after (not an OverflowError, not an endless wait)."""
    sim.fault("status", endpoint="v1_token", status=429, retry_after="inf", count=10)

    with pytest.raises(RateLimitedError) as limited:
        await client.login(_account(sim.base_url, Dialect.V1))

    assert limited.value.retry_after is None
    assert attempts.by_operation[Operation.LOGIN] == FAST.max_attempts


async def test_429_with_an_absurd_retry_after_is_capped(
    sim: SimulatorControl, client: MonogotoClient, attempts: Attempts
) -> None:
    """`Retry-After: 1e9` (31 years) is cut to the default cap of 300 s, past the retry bound."""
    sim.fault("status", endpoint="v1_token", status=429, retry_after="1e9")

    with pytest.raises(RateLimitedError) as limited:
        await client.login(_account(sim.base_url, Dialect.V1))

    assert limited.value.retry_after == 300
    assert attempts.by_operation[Operation.LOGIN] == 1


async def test_the_configured_cap_reaches_the_rate_limit_hook(sim: SimulatorControl) -> None:
    """With max_retry_after set, on_rate_limited (the shared cool-down) sees the capped value."""
    told: list[float | None] = []

    async def on_rate_limited(_account: Account, retry_after: float | None) -> None:
        told.append(retry_after)

    sim.fault("status", endpoint="legacy_auth", status=429, retry_after="1e9")
    async with httpx.AsyncClient() as http:
        client = MonogotoClient(
            http,
            default_lifetime=DEFAULT_LIFETIME,
            retry=FAST,
            on_rate_limited=on_rate_limited,
            max_retry_after=60,
        )
        with pytest.raises(RateLimitedError) as limited:
            await client.login(_account(sim.base_url, Dialect.LEGACY))

    assert limited.value.retry_after == 60
    assert told == [60]


async def test_5xx_runs_are_retried_until_success(
    sim: SimulatorControl, client: MonogotoClient, attempts: Attempts
) -> None:
    """Two 503s in a row cost two retries, then the login succeeds."""
    sim.fault("status", endpoint="legacy_auth", status=503, count=2)

    await client.login(_account(sim.base_url, Dialect.LEGACY))

    assert attempts.by_operation[Operation.LOGIN] == 3
    assert sim.calls("legacy_auth", "injected_status") == 2
    assert sim.calls("legacy_auth", "ok") == 1


async def test_retries_are_bounded_by_attempts(
    sim: SimulatorControl, client: MonogotoClient, attempts: Attempts
) -> None:
    """A persistently failing Monogoto sees at most max_attempts calls, then the error surfaces."""
    sim.fault("status", endpoint="v1_token", status=500, count=50)

    with pytest.raises(TransientError) as failed:
        await client.login(_account(sim.base_url, Dialect.V1))

    assert failed.value.result == "error"
    assert attempts.by_operation[Operation.LOGIN] == FAST.max_attempts
    assert sim.calls("v1_token") == FAST.max_attempts


async def test_timeouts_and_dropped_connections_are_retried(
    sim: SimulatorControl, client: MonogotoClient, attempts: Attempts
) -> None:
    """A slow answer past the timeout and a connection closed mid-response are both retried."""
    sim.fault("delay", endpoint="legacy_auth", seconds=3)
    sim.fault("drop", endpoint="legacy_auth")

    grant = await client.login(_account(sim.base_url, Dialect.LEGACY, timeout=0.5))

    assert grant.lifetime > 0
    assert attempts.by_operation[Operation.LOGIN] == 3
    assert sim.calls("legacy_auth", "dropped") == 1
    assert sim.calls("legacy_auth", "ok") == 2  # the delayed call was answered, too late


async def test_persistent_timeouts_surface_as_timeout(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """When every attempt times out, the error says timeout (the metric result label)."""
    sim.fault("delay", endpoint="v1_token", seconds=2, count=FAST.max_attempts)

    with pytest.raises(TransientError) as failed:
        await client.login(_account(sim.base_url, Dialect.V1, timeout=0.3))

    assert failed.value.result == "timeout"
    assert failed.value.sent


async def test_unreachable_monogoto_is_retried_as_not_sent(
    client: MonogotoClient, attempts: Attempts
) -> None:
    """A refused connection is transient, certainly unsent, and retried up to the bound."""
    with pytest.raises(TransientError) as failed:
        await client.login(_account(f"http://127.0.0.1:{free_port()}", Dialect.LEGACY))

    assert not failed.value.sent
    assert attempts.by_operation[Operation.LOGIN] == FAST.max_attempts


async def test_ambiguous_refresh_is_never_repeated_and_renew_logs_in(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """A refresh that timed out may have consumed the token: renew logs in, never resends it."""
    account = _account(sim.base_url, Dialect.V1, timeout=0.5)
    grant = await client.login(account)
    sim.fault("delay", endpoint="v1_refresh", seconds=2)

    renewed = await client.renew(account, grant)

    assert renewed.refresh_token is not None
    assert sim.calls("v1_refresh") == 1
    assert sim.calls("v1_token", "ok") == 2


async def test_dropped_refresh_marks_the_token_spent(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """A connection dropped during refresh is ambiguous: one call, token marked spent."""
    account = _account(sim.base_url, Dialect.V1)
    grant = await client.login(account)
    assert grant.refresh_token is not None
    sim.fault("drop", endpoint="v1_refresh")

    with pytest.raises(TransientError) as failed:
        await client.refresh(account, grant.refresh_token)

    assert failed.value.refresh_token_spent
    assert sim.calls("v1_refresh") == 1


async def test_rate_limited_refresh_is_retried_with_the_same_token(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """A 429 proves the refresh token was not consumed, so it is safely sent again."""
    account = _account(sim.base_url, Dialect.V1)
    grant = await client.login(account)
    assert grant.refresh_token is not None
    sim.fault("status", endpoint="v1_refresh", status=429, retry_after=1)

    await client.refresh(account, grant.refresh_token)

    assert sim.calls("v1_refresh", "injected_status") == 1
    assert sim.calls("v1_refresh", "ok") == 1
    assert sim.calls("v1_refresh", "refresh_reused") == 0


async def test_failed_fallback_login_after_spent_refresh_says_so(
    sim: SimulatorControl, client: MonogotoClient
) -> None:
    """If the login after an ambiguous refresh fails, the error still flags the refresh token."""
    account = _account(sim.base_url, Dialect.V1)
    grant = await client.login(account)
    sim.fault("drop", endpoint="v1_refresh")
    sim.fault("status", endpoint="v1_token", status=503, count=FAST.max_attempts)

    with pytest.raises(TransientError) as failed:
        await client.renew(account, grant)

    assert failed.value.operation is Operation.LOGIN
    assert failed.value.refresh_token_spent


@pytest.mark.parametrize("body", ["not_json", "missing_fields", "expired_token", "bad_claims"])
@pytest.mark.parametrize(
    ("dialect", "endpoint"), [(Dialect.LEGACY, "legacy_auth"), (Dialect.V1, "v1_token")]
)
async def test_garbage_responses_are_malformed_and_not_retried(
    sim: SimulatorControl,
    client: MonogotoClient,
    attempts: Attempts,
    dialect: Dialect,
    endpoint: str,
    body: str,
) -> None:
    """Unusable answers raise MalformedResponseError after a single call."""
    sim.fault("garbage", endpoint=endpoint, body=body)

    with pytest.raises(MalformedResponseError):
        await client.login(_account(sim.base_url, dialect))

    assert attempts.by_operation[Operation.LOGIN] == 1


async def test_opaque_token_gets_default_lifetime_with_a_warning(
    sim: SimulatorControl, client: MonogotoClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A token that is not a JWT is still usable, for the configured default lifetime."""
    sim.fault("garbage", endpoint="legacy_auth", body="opaque_token")

    with caplog.at_level(logging.WARNING, logger="service.upstream"):
        grant = await client.login(_account(sim.base_url, Dialect.LEGACY))

    assert grant.lifetime == DEFAULT_LIFETIME
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert grant.access_token.get_secret_value() not in _logged(caplog)


async def test_no_secret_in_errors_or_logs(
    sim: SimulatorControl, client: MonogotoClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Failures are reported without the password or any token."""
    account = _account(sim.base_url, Dialect.V1)
    grant = await client.login(account)
    sim.fault("status", endpoint="v1_token", status=502, count=FAST.max_attempts)
    sim.fault("drop", endpoint="v1_refresh")
    secrets = [PASSWORD, *_tokens(grant)]

    with caplog.at_level(logging.DEBUG), pytest.raises(TransientError) as failed:
        await client.renew(account, grant)

    texts = [_logged(caplog), str(failed.value), repr(failed.value.args), repr(grant)]
    assert [s for s in secrets for text in texts if s in text] == []


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the log records carry, structured extras included."""
    return "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)


def _tokens(grant: TokenGrant) -> list[str]:
    tokens = [grant.access_token.get_secret_value()]
    if grant.refresh_token is not None:
        tokens.append(grant.refresh_token.get_secret_value())
    return tokens
