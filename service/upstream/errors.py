"""What can go wrong when asking Monogoto for a token (the client's error taxonomy)."""

from __future__ import annotations

from enum import StrEnum


class Operation(StrEnum):
    """An upstream authentication call."""

    LOGIN = "login"
    REFRESH = "refresh"


class UpstreamError(Exception):
    """A login or refresh failed.

    `refresh_token_spent` is set when the failure followed a refresh attempt whose outcome is
    unknown (or that Monogoto refused): that refresh token must never be sent again.
    """

    result = "error"  # the `result` label of upstream_requests_total
    # True only when Monogoto certainly did not act on the request, so resending it is harmless
    # even for a single-use refresh token.
    unprocessed = False

    def __init__(self, account: str, operation: Operation, detail: str) -> None:
        super().__init__(f"{operation} for account {account!r} failed: {detail}")
        self.account = account
        self.operation = operation
        self.detail = detail
        self.refresh_token_spent = False


class CredentialsRejectedError(UpstreamError):
    """Monogoto rejected the account's username or password: fatal, never retried."""

    result = "credentials_rejected"


class RefreshRejectedError(UpstreamError):
    """Monogoto refused the refresh token (used, expired or unknown): log in instead."""

    result = "credentials_rejected"


class RateLimitedError(UpstreamError):
    """Monogoto answered 429; `retry_after` is its Retry-After in seconds, if it sent one."""

    result = "rate_limited"
    unprocessed = True

    def __init__(
        self, account: str, operation: Operation, detail: str, retry_after: float | None
    ) -> None:
        super().__init__(account, operation, detail)
        self.retry_after = retry_after


class TransientError(UpstreamError):
    """Timeout, connection failure or 5xx: worth retrying.

    `sent` is False only when the request certainly never reached Monogoto (connection refused,
    connect timeout); otherwise its outcome is unknown.
    """

    def __init__(
        self, account: str, operation: Operation, detail: str, *, sent: bool, timeout: bool
    ) -> None:
        super().__init__(account, operation, detail)
        self.sent = sent
        self.unprocessed = not sent
        self.result = "timeout" if timeout else "error"


class MalformedResponseError(UpstreamError):
    """Monogoto answered with something unusable: not JSON, fields missing, a bad or expired
    token, or an unexpected status."""
