"""Caller API keys and the encryption key ring (format of the shared key file)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

KEY_BYTES = 32
KID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,32}")
DIGEST_PREFIX = "sha256:"
_API_KEY_PREFIX = "mgb_"  # lets secret scanners recognise a leaked caller key


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    """One AES-256 key and the id stored next to everything it encrypts."""

    kid: str
    key: bytes = field(repr=False)


def api_key_digest(key: str) -> str:
    """Return the lowercase hex SHA-256 of a caller key, as compared against the config."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """Return a new random caller key and its `sha256:<hex>` digest for the config."""
    key = _API_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, DIGEST_PREFIX + api_key_digest(key)


def new_encryption_key() -> str:
    """Return one `kid:base64key` line for the encryption key file."""
    # Date first so operators can see at a glance which key is the newest.
    kid = f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(2)}"
    return f"{kid}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"


def parse_encryption_keys(text: str) -> list[EncryptionKey]:
    """Parse `kid:base64(32 bytes)` entries, one per line or comma-separated.

    Blank lines and `#` comments are skipped. The first key encrypts, all decrypt.
    Raises ValueError naming every bad entry; messages never contain key material.
    """
    ring: list[EncryptionKey] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entries = [entry.strip() for entry in line.split("#", 1)[0].split(",")]
        entries = [entry for entry in entries if entry]
        for position, entry in enumerate(entries, start=1):
            where = f"line {number}" if len(entries) == 1 else f"line {number}, entry {position}"
            try:
                key = _parse_entry(entry)
            except ValueError as error:
                problems.append(f"{where}: {error}")
                continue
            if key.kid in seen:
                problems.append(f"{where}: duplicate key id '{key.kid}'")
            seen.add(key.kid)
            ring.append(key)
    if problems:
        raise ValueError("; ".join(problems))
    if not ring:
        raise ValueError("no keys (expected lines 'kid:base64key')")
    return ring


def _parse_entry(entry: str) -> EncryptionKey:
    kid, sep, encoded = entry.partition(":")
    if not sep:
        raise ValueError("expected 'kid:base64key'")
    if not KID_PATTERN.fullmatch(kid):
        raise ValueError("key id must be 1-32 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"key '{kid}' is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"key '{kid}' must be exactly {KEY_BYTES} bytes, got {len(key)}")
    return EncryptionKey(kid=kid, key=key)
