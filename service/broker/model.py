"""What the broker hands to the HTTP layer: issued tokens, account views and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from service.config import Dialect

# The longest `min_ttl` a caller may ask for (7 days): no token lives this long, so a larger one
# is a caller's mistake worth a 400 (the API's bound, and the token command's).
MAX_MIN_TTL_SECONDS = 7 * 24 * 3600


class Outcome(StrEnum):
    """Where a token came from (the `outcome` label of token_requests_total)."""

    LOCAL = "local"  # this process's cache
    SHARED = "shared"  # the shared store, written by another replica or earlier
    FETCHED = "fetched"  # obtained from Monogoto for this request


class AccountStatus(StrEnum):
    """An account's state as `/v1/accounts` reports it."""

    OK = "ok"
    REFRESHING = "refreshing"
    FAILING = "failing"
    CREDENTIALS_REJECTED = "credentials_rejected"
    NO_TOKEN = "no_token"  # noqa: S105 (a status name, not a secret)


class CredentialsStatus(StrEnum):
    """Whether Monogoto accepts the account's configured username and password, as far as
    the broker knows (`credentials` in `/v1/accounts`)."""

    VERIFIED = "verified"  # the current token came from a login with them
    REJECTED = "rejected"  # Monogoto refused them, and nothing has shown them good since
    UNVERIFIED = "unverified"  # not known yet


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token handed to a caller. Times are wall-clock seconds."""

    account: str
    access_token: str = field(repr=False)
    expires_at: float
    customer_id: str | None
    outcome: Outcome
    # Obtained from Monogoto by a renewal that only the caller's `min_ttl` called for.
    forced: bool = False


@dataclass(frozen=True, slots=True)
class AccountView:
    """One account's state, without any secret."""

    name: str
    dialect: Dialect
    status: AccountStatus
    expires_at: float | None
    last_refresh_at: float | None
    last_error: str | None
    credentials: CredentialsStatus = CredentialsStatus.UNVERIFIED


class BrokerError(Exception):
    """A token request the broker cannot satisfy; `code` is the problem+json code."""

    code = "upstream_unavailable"
    status = 503

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class UpstreamUnavailableError(BrokerError):
    """No valid token, and Monogoto (or the shared budget or store) cannot give one now."""


class CredentialsRejectedError(BrokerError):
    """Monogoto rejects this account's credentials; nobody retries before `retry_after`."""

    code = "credentials_rejected"


class NoSuchAccountError(BrokerError):
    """No account of that name is configured (operator actions only: callers are told 403)."""

    code = "not_found"
    status = 404


class InvalidRequestError(BrokerError):
    """The request asks for something no token can satisfy (e.g. `min_ttl` beyond a lifetime)."""

    code = "invalid_request"
    status = 400


class RenewalRateLimitedError(BrokerError):
    """The caller already forced a renewal of this account within the interval: the current
    token is still good by the broker's own rules, and renewing it again now would spend the
    shared auth budget for one caller's sake."""

    code = "renewal_rate_limited"
    status = 429


class UnknownAccountError(BrokerError):
    """The account is not configured (any more): a config reload removed it while the request
    was on its way. Answered like an account a caller may not use."""

    code = "forbidden"
    status = 403

    def __init__(self) -> None:
        super().__init__("This caller may not use this account.")
