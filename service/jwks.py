"""The service-account issuer's signing keys (its JWKS), as the broker holds them.

Fetched with httpx from `jwks_url`, or from the `jwks_uri` of the issuer's discovery document;
the CA file and the bearer token file are read again for every fetch, so rotated files are
used without a restart. The keys are refreshed in the background, and fetched again when a
token names a key id the set does not hold (a key rotation), but such on-demand fetches start
at most once per `MIN_REFETCH_SECONDS`, so that a flood of tokens with made-up key ids cannot
hammer the API server. All fetches are single-flight: who asks while one runs waits for it.

Only RS256 (RSA) and ES256 (EC P-256) signing keys with a key id are kept; keys of other types
are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from service.config.caller_auth import KubernetesAuthSettings, ca_context, check_fetch_url
from service.config.fields import read_file
from service.metrics import JWKS_FETCHES

log = logging.getLogger(__name__)

# While keys are held: the issuer rotates them rarely, and an unknown key id fetches at once.
REFRESH_SECONDS = 300.0
# While the broker has no keys, or the last fetch failed.
RETRY_SECONDS = 10.0
MIN_REFETCH_SECONDS = 10.0
FETCH_TIMEOUT_SECONDS = 5.0
# A JWKS is a few kilobytes; anything far larger is not one.
MAX_DOCUMENT_BYTES = 1 << 20
# (kty, crv) -> the one algorithm a key of that type may verify.
_ALGORITHMS: dict[tuple[object, object], str] = {("RSA", None): "RS256", ("EC", "P-256"): "ES256"}
ALGORITHMS = frozenset(_ALGORITHMS.values())


class JwksError(Exception):
    """A fetch of the keys failed; the message says why (never a token)."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A public key of the issuer and the algorithm its signatures use."""

    key: Any
    algorithm: str


def parse_jwks(document: object) -> dict[str, SigningKey]:
    """The RS256 and ES256 signing keys of a JWKS document, by key id; JwksError if none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS (no 'keys' list)")
    keys: dict[str, SigningKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        algorithm = _ALGORITHMS.get((entry.get("kty"), entry.get("crv")))
        kid = entry.get("kid")
        if (
            algorithm is None
            or not isinstance(kid, str)
            or entry.get("use", "sig") != "sig"
            or entry.get("alg", algorithm) != algorithm
        ):
            continue
        try:
            keys[kid] = SigningKey(jwt.PyJWK(entry, algorithm).key, algorithm)
        except jwt.PyJWTError:
            continue
    if not keys:
        raise JwksError("the JWKS holds no RS256 or ES256 signing key with a key id")
    return keys


class KeySet:
    """The issuer's signing keys: empty until the first fetch succeeds, then the last set
    obtained (kept while later fetches fail)."""

    def __init__(self, settings: KubernetesAuthSettings) -> None:
        self._settings = settings
        self._keys: dict[str, SigningKey] = {}
        self.obtained_at: float | None = None  # wall clock of the last successful fetch
        self.last_error: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_ca: str | None = None
        self._fetching: asyncio.Task[None] | None = None
        self._last_on_demand = -MIN_REFETCH_SECONDS
        self._refresher: asyncio.Task[None] | None = None

    @property
    def obtained(self) -> bool:
        """Whether a JWKS was ever obtained (the broker fails closed until then)."""
        return self.obtained_at is not None

    def get(self, kid: str) -> SigningKey | None:
        """The key `kid`, if the set holds it."""
        return self._keys.get(kid)

    async def fetch_for(self, kid: str) -> SigningKey | None:
        """The key `kid`, fetching the set first if it lacks it, unless an on-demand fetch
        started less than MIN_REFETCH_SECONDS ago (then the set as it is)."""
        now = time.monotonic()
        if self._fetching is None and now - self._last_on_demand >= MIN_REFETCH_SECONDS:
            self._last_on_demand = now
            self._start_fetch()
        if self._fetching is not None:
            await asyncio.shield(self._fetching)
        return self._keys.get(kid)

    def start(self) -> None:
        """Fetch the keys now and keep them fresh in the background."""
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        """Stop the background refresh and close the HTTP client."""
        for task in (self._refresher, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._client is not None:
            await self._client.aclose()

    def status(self) -> tuple[bool, str]:
        """Readiness: whether tokens can be verified, and why (not)."""
        if self.obtained_at is None:
            return False, f"no JWKS obtained yet ({self.last_error or 'fetching'})"
        age = f"{len(self._keys)} keys, fetched {time.time() - self.obtained_at:.0f} s ago"
        if self.last_error is not None:
            return True, f"{age}; the last fetch failed ({self.last_error})"
        return True, age

    async def _refresh_forever(self) -> None:
        while True:
            self._start_fetch()
            if self._fetching is not None:
                await asyncio.shield(self._fetching)
            delay = RETRY_SECONDS if self.last_error is not None else REFRESH_SECONDS
            # S311: jitter only spreads replicas apart; it needs no cryptographic randomness.
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))  # noqa: S311

    def _start_fetch(self) -> None:
        if self._fetching is None:
            self._fetching = asyncio.create_task(self._fetch())
            self._fetching.add_done_callback(self._fetched)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        self._fetching = None

    async def _fetch(self) -> None:
        try:
            keys = parse_jwks(await self._get_json(await self._jwks_url()))
        except JwksError as error:
            self.last_error = str(error)
            JWKS_FETCHES.labels("error").inc()
            log.warning(
                "JWKS fetch failed",
                extra={"event": "jwks.failed", "reason": self.last_error, "keys": len(self._keys)},
            )
            return
        changed = keys.keys() != self._keys.keys()
        self._keys = keys
        self.obtained_at = time.time()
        self.last_error = None
        JWKS_FETCHES.labels("ok").inc()
        if changed:
            log.info("JWKS obtained", extra={"event": "jwks.obtained", "kids": sorted(keys)})

    async def _jwks_url(self) -> str:
        if self._settings.jwks_url is not None:
            return self._settings.jwks_url
        document = await self._get_json(self._settings.discovery_url)
        if not isinstance(document, dict) or document.get("issuer") != self._settings.issuer:
            raise JwksError("the discovery document names another issuer")
        url = document.get("jwks_uri")
        if not isinstance(url, str):
            raise JwksError("the discovery document has no jwks_uri")
        try:
            return check_fetch_url(url)
        except ValueError as error:
            raise JwksError(f"the discovery document's jwks_uri {error}") from None

    async def _get_json(self, url: str) -> object:
        headers = {"Accept": "application/json"}
        token = self._bearer_token(url)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            client = await self._http()
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != httpx.codes.OK:
                    raise JwksError(f"{url} answered {response.status_code}")
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise JwksError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
        except httpx.HTTPError as error:
            raise JwksError(f"{url} unreachable ({type(error).__name__})") from None
        try:
            return json.loads(body)
        except ValueError:
            raise JwksError(f"{url} did not answer JSON") from None

    def _bearer_token(self, url: str) -> str | None:
        """The token for the request to `url`, read now (it is rotated): sent to the issuer's
        own host and to the configured jwks_url, never to a host a discovery document named."""
        path = self._settings.jwks_token_file
        if path is None:
            return None
        target = urlsplit(url)
        trusted = {urlsplit(self._settings.issuer).netloc}
        if self._settings.jwks_url is not None:
            trusted.add(urlsplit(self._settings.jwks_url).netloc)
        if target.netloc not in trusted:
            return None
        try:
            return read_file(path)
        except ValueError as error:
            raise JwksError(f"jwks_token_file: {error}") from None

    async def _http(self) -> httpx.AsyncClient:
        """The HTTP client, made again when the CA file changed (it is read for every fetch)."""
        path = self._settings.jwks_ca_file
        try:
            ca = None if path is None else read_file(path)
            if self._client is not None and ca == self._client_ca:
                return self._client
            verify: Any = True if path is None or ca is None else ca_context(ca, path)
        except ValueError as error:
            raise JwksError(f"jwks_ca_file: {error}") from None
        if self._client is not None:
            await self._client.aclose()
        self._client = httpx.AsyncClient(
            verify=verify, timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False
        )
        self._client_ca = ca
        return self._client
