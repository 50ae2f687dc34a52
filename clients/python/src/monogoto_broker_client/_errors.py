"""The errors a `TokenSource` raises. None of their messages holds a token or a caller key."""

from __future__ import annotations

#: `code` of a transport error: the broker could not be reached, or did not answer in time.
UNREACHABLE = "unreachable"
#: `code` of a 200 answer without a usable token in it.
INVALID_RESPONSE = "invalid_response"
#: `code` when the key file or service-account token file cannot be read or is empty.
CREDENTIALS_UNREADABLE = "credentials_unreadable"


class BrokerError(Exception):
    """The broker did not hand out a token.

    Attributes:
        status: the HTTP status of the broker's answer, or None if there was none.
        code: the broker's problem `code` (`unauthenticated`, `forbidden`,
            `upstream_unavailable`, ...); `"unreachable"` for a transport error;
            `"http_<status>"` for an answer without a problem document;
            `"credentials_unreadable"` for a key or token file that cannot be used;
            `"invalid_response"` for a 200 without a token.
        detail: the broker's problem `detail`, or a description of the failure.
        retry_after: the answer's `Retry-After` in seconds, if it had one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        code: str,
        detail: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


class BrokerRefusedError(BrokerError):
    """The broker refused the request (400, 401, 403, 404, 429): asking again unchanged will
    not help. Raised at once, without retrying."""


class BrokerUnavailableError(BrokerError):
    """The broker has no token to give now (503), could not be reached (`code`
    `"unreachable"`, `status` None), or answered with another server error. A 503, a 502, a
    504 and an unreachable broker are asked again first, as long as `max_wait` allows."""
