"""The broker: cached tokens, one upstream call per need, refresh ahead of expiry."""

from service.broker.model import (
    AccountStatus,
    AccountView,
    BrokerError,
    CredentialsRejectedError,
    CredentialsStatus,
    InvalidRequestError,
    IssuedToken,
    Outcome,
    RenewalRateLimitedError,
    UpstreamUnavailableError,
)

__all__ = [
    "AccountStatus",
    "AccountView",
    "BrokerError",
    "CredentialsRejectedError",
    "CredentialsStatus",
    "InvalidRequestError",
    "IssuedToken",
    "Outcome",
    "RenewalRateLimitedError",
    "UpstreamUnavailableError",
]
