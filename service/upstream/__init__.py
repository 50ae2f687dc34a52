"""Talking to Monogoto's authentication API."""

from service.upstream.client import MonogotoClient, TokenGrant
from service.upstream.errors import (
    CredentialsRejectedError,
    MalformedResponseError,
    Operation,
    RateLimitedError,
    RefreshRejectedError,
    TransientError,
    UpstreamError,
)
from service.upstream.retry import RetryPolicy

__all__ = [
    "CredentialsRejectedError",
    "MalformedResponseError",
    "MonogotoClient",
    "Operation",
    "RateLimitedError",
    "RefreshRejectedError",
    "RetryPolicy",
    "TokenGrant",
    "TransientError",
    "UpstreamError",
]
