"""Kubernetes ServiceAccount tokens as caller credentials (docs/callers.md).

A token is verified once: its signature against the issuer's keys (RS256 or ES256 only), `iss`,
`aud` (one of the configured audiences), `exp`, `nbf` and `iat` with `LEEWAY_SECONDS` of clock
skew, and the `kubernetes.io` claims naming the namespace and ServiceAccount (consistent with
`sub`). The identity it proves is then cached by the SHA-256 of the token until the token's
`exp`, so later requests with the same token cost one dictionary lookup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from cachetools import TLRUCache

from service.config import KubernetesAuthSettings
from service.jwks import ALGORITHMS, KeySet

# Clock skew allowed between the API server that issued a token and this broker.
LEEWAY_SECONDS = 30
# Verified tokens held at once: a token per pod, renewed by the kubelet well before expiry.
CACHE_SIZE = 10_000
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
_JWT_PREFIX = "eyJ"  # base64url of '{"': every JWT header starts so, no caller key does
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidIssuerError, "issuer"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.InvalidAlgorithmError, "algorithm"),
    (jwt.MissingRequiredClaimError, "claims"),
    (jwt.InvalidIssuedAtError, "claims"),
)


class TokenRejectedError(Exception):
    """The token proves no identity; `reason` says why, in a word fit for a log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ServiceAccountIdentity:
    """What a verified token proves: its ServiceAccount (`namespace/name`), the pod it is
    bound to if any, and until when (Unix time)."""

    service_account: str
    pod: str | None
    expires_at: float


def looks_like_jwt(credential: str) -> bool:
    """Whether a bearer credential has the shape of a JWT (caller keys never do)."""
    return credential.startswith(_JWT_PREFIX) and credential.count(".") == 2


def _until_expiry(_digest: str, identity: ServiceAccountIdentity, _now: float) -> float:
    return identity.expires_at


class ServiceAccountVerifier:
    """Verifies ServiceAccount tokens of one cluster and remembers those it verified."""

    def __init__(self, settings: KubernetesAuthSettings) -> None:
        self.keys = KeySet(settings)
        self._issuer = settings.issuer
        self._audiences = list(settings.audiences)
        self._verified: TLRUCache[str, ServiceAccountIdentity] = TLRUCache(
            maxsize=CACHE_SIZE, ttu=_until_expiry, timer=time.time
        )

    async def verify(self, token: str, digest: str) -> ServiceAccountIdentity:
        """The identity `token` proves; `digest` is its SHA-256, the cache key. Raises
        TokenRejectedError."""
        identity = self._verified.get(digest)
        if identity is None:
            identity = await self._verify(token)
            self._verified[digest] = identity
        return identity

    async def _verify(self, token: str) -> ServiceAccountIdentity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejectedError("malformed") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRejectedError("algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenRejectedError("no_kid")
        key = self.keys.get(kid)
        if key is None:
            # Only a token that claims this issuer may make the broker fetch the keys again.
            if self._unverified_issuer(token) != self._issuer:
                raise TokenRejectedError("issuer")
            key = await self.keys.fetch_for(kid)
        if key is None:
            raise TokenRejectedError("unknown_kid" if self.keys.obtained else "keys_unavailable")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audiences,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as error:
            reason = next((word for kind, word in _REASONS if isinstance(error, kind)), "invalid")
            raise TokenRejectedError(reason) from None
        return _identity(claims)

    @staticmethod
    def _unverified_issuer(token: str) -> object:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        return claims.get("iss")


def _identity(claims: dict[str, Any]) -> ServiceAccountIdentity:
    """The ServiceAccount and pod named by the verified `claims` of a projected token."""
    kubernetes = claims.get("kubernetes.io")
    if not isinstance(kubernetes, dict):
        raise TokenRejectedError("claims")
    namespace = kubernetes.get("namespace")
    name = _name_of(kubernetes.get("serviceaccount"))
    if not isinstance(namespace, str) or not namespace or name is None:
        raise TokenRejectedError("claims")
    # The API server writes both; a token whose two say different things is not its own.
    if claims["sub"] != f"system:serviceaccount:{namespace}:{name}":
        raise TokenRejectedError("subject")
    return ServiceAccountIdentity(
        f"{namespace}/{name}", _name_of(kubernetes.get("pod")), float(claims["exp"])
    )


def _name_of(reference: object) -> str | None:
    """The `name` of an object reference (`{"name": ..., "uid": ...}`) in the claims."""
    if isinstance(reference, dict):
        name = reference.get("name")
        if isinstance(name, str) and name:
            return name
    return None
