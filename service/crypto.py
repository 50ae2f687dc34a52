"""AES-GCM envelopes for tokens at rest: key id inside; the account, and what the envelope is
for (e.g. a record's version), bound as associated data."""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.keys import EncryptionKey

_NONCE_BYTES = 12
_TAG_BYTES = 16
_SEPARATOR = b":"  # never part of a key id (see keys.KID_PATTERN)


class EnvelopeError(ValueError):
    """An envelope cannot be opened: unknown key id, wrong account, or tampered with."""


class TokenCipher:
    """Seals with the first key of the ring, opens with whichever key the envelope names."""

    def __init__(self, ring: Sequence[EncryptionKey]) -> None:
        if not ring:
            raise ValueError("at least one encryption key is required")
        self._sealing_kid = ring[0].kid.encode()
        self._keys = {key.kid.encode(): AESGCM(key.key) for key in ring}

    def seal(self, account: str, plaintext: bytes, context: bytes = b"") -> bytes:
        """Encrypt `plaintext` for `account` (and `context`): `kid:nonce+ciphertext+tag`."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self._sealing_kid].encrypt(
            nonce, plaintext, _associated(account, context)
        )
        return self._sealing_kid + _SEPARATOR + nonce + sealed

    def open(self, account: str, envelope: bytes, context: bytes = b"") -> bytes:
        """Decrypt an envelope sealed for `account` and `context`; EnvelopeError if that is
        impossible (another account or context, an unknown key, tampering)."""
        kid, separator, body = envelope.partition(_SEPARATOR)
        aead = self._keys.get(kid)
        if not separator or aead is None:
            raise EnvelopeError("envelope names no configured key")
        if len(body) < _NONCE_BYTES + _TAG_BYTES:
            raise EnvelopeError("envelope is truncated")
        try:
            return aead.decrypt(
                body[:_NONCE_BYTES], body[_NONCE_BYTES:], _associated(account, context)
            )
        except InvalidTag:
            raise EnvelopeError("envelope does not open for this account and key") from None


def _associated(account: str, context: bytes) -> bytes:
    # Without a context the associated data is the account alone, as in envelopes sealed
    # before contexts existed. Account names never hold a NUL, so the two parts cannot blur.
    return account.encode() + (b"\0" + context if context else b"")
