"""`monogoto-broker token ACCOUNT`: print a token for scripts and cron jobs.

The raw token goes to standard output and nothing else does, so that
`curl -H "Authorization: Bearer $(monogoto-broker token fleet-eu)" ...` works. Problems go to
standard error as one line each, never with a token or a key in them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from service.upstream.client import retry_after_seconds

BROKER_URL_ENV = "MONOGOTO_BROKER_URL"
API_KEY_ENV = "MONOGOTO_BROKER_API_KEY"
DEFAULT_BROKER_URL = "http://127.0.0.1:8080"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNAVAILABLE = 4

# The broker answers these when the request itself cannot succeed as sent: asking again
# unchanged will not help.
_REFUSED = frozenset({400, 401, 403, 404, 429})


class UsageError(Exception):
    """The command was given something it cannot use."""


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What `token` asks the broker for."""

    broker_url: str
    account: str
    credential: str
    min_ttl: int
    max_wait: float
    timeout: float

    @property
    def url(self) -> str:
        """The token route of the account."""
        return f"{self.broker_url}/v1/accounts/{quote(self.account, safe='')}/token"


def read_credential(key_file: Path | None, service_account_token_file: Path | None) -> str:
    """The caller key or service-account token to send: from the file given, else from
    $MONOGOTO_BROKER_API_KEY; UsageError if there is none."""
    path = key_file or service_account_token_file
    if path is not None:
        try:
            credential = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read {path}: {type(error).__name__}") from None
        if not credential:
            raise UsageError(f"{path} is empty")
        return credential
    credential = os.environ.get(API_KEY_ENV, "").strip()
    if not credential:
        raise UsageError(
            f"no credential: give --key-file or --service-account-token-file, or set {API_KEY_ENV}"
        )
    return credential


def broker_url(given: str | None) -> str:
    """The broker's base URL: `given`, else $MONOGOTO_BROKER_URL, else the local default."""
    url = (given or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise UsageError(f"--broker must be an http(s):// URL without a query, got {url!r}")
    return url


def fetch(request: TokenRequest) -> tuple[int, str]:
    """Ask the broker; (exit code, the token or the problem line). A 503 is asked again after
    its `Retry-After` while that stays within `max_wait`."""
    headers = {"Authorization": f"Bearer {request.credential}"}
    params = {"min_ttl": str(request.min_ttl)} if request.min_ttl else {}
    deadline = time.monotonic() + request.max_wait
    with httpx.Client(timeout=request.timeout, follow_redirects=False) as client:
        while True:
            try:
                response = client.get(request.url, headers=headers, params=params)
            except httpx.HTTPError as error:
                return EXIT_UNAVAILABLE, f"broker unreachable ({type(error).__name__})"
            if response.status_code == 200:
                return _token(response)
            wait = retry_after_seconds(response, cap=math.inf)
            if response.status_code == 503 and wait is not None and wait <= _left(deadline):
                time.sleep(wait)
                continue
            code = EXIT_REFUSED if response.status_code in _REFUSED else EXIT_UNAVAILABLE
            return code, _problem(response, wait)


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _token(response: httpx.Response) -> tuple[int, str]:
    try:
        token = response.json()["access_token"]
    except (ValueError, KeyError, TypeError):
        token = None
    if not isinstance(token, str) or not token:
        return EXIT_UNAVAILABLE, "the broker's answer holds no access_token"
    return EXIT_OK, token


def _problem(response: httpx.Response, retry_after: float | None) -> str:
    """One line: the status, the broker's problem code and detail (its own texts, no secret)."""
    code, detail = "-", response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = str(body.get("code", code))
        detail = str(body.get("detail", detail))
    line = f"{response.status_code} {code}: {detail}"
    if retry_after is not None:
        line += f" (retry after {retry_after:g} s)"
    return line


def run_token(
    account: str,
    *,
    broker: str | None,
    key_file: Path | None,
    service_account_token_file: Path | None,
    min_ttl: int,
    max_wait: float,
    timeout: float,
) -> int:
    """Print a token of `account` and return the exit code (see docs/callers.md)."""
    try:
        request = TokenRequest(
            broker_url=broker_url(broker),
            account=account,
            credential=read_credential(key_file, service_account_token_file),
            min_ttl=min_ttl,
            max_wait=max_wait,
            timeout=timeout,
        )
    except UsageError as error:
        print(f"token: {error}", file=sys.stderr)
        return EXIT_USAGE
    code, output = fetch(request)
    if code == EXIT_OK:
        print(output)
    else:
        print(f"token: {output}", file=sys.stderr)
    return code
