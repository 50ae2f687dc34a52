"""The audit log (docs/operations.md, "The audit log"): who obtained which account's token,
when, on which replica; one JSON line per token request, never a secret in it."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.audit._line import LOGGER_NAME, AuditLine, AuditOutcome
from service.audit._log import AuditLog, AuditUnavailableError
from service.audit._sink import FileSink, Sink, StdoutSink
from service.config import Settings

__all__ = [
    "LOGGER_NAME",
    "AuditLine",
    "AuditLog",
    "AuditOutcome",
    "AuditUnavailableError",
    "FileSink",
    "Sink",
    "StdoutSink",
    "audit_key",
    "open_audit_log",
]

_KEY_BYTES = 32
# Binds the derived key to this one use: the encryption key it comes from stays unrelated to it.
_DERIVATION_INFO = b"monogoto-broker audit fingerprints"


def audit_key(settings: Settings) -> bytes | None:
    """The key of the audit log's token fingerprints: `audit.hmac_key` (or its file) as UTF-8;
    without one, derived (HKDF-SHA256) from the first encryption key, so that every replica
    sharing the key ring fingerprints a token alike; None when neither is configured."""
    configured = settings.audit.hmac_key
    if configured is not None:
        return configured.get_secret_value().encode()
    ring = settings.encryption_key_ring()
    if not ring:
        return None
    derivation = HKDF(
        algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_DERIVATION_INFO
    )
    return derivation.derive(ring[0].key)


def open_audit_log(settings: Settings) -> AuditLog:
    """The audit log `settings.audit` describes, its destination opened (a failure to open it
    is reported as a failed write). Without `audit_key` (an in-process store and no key ring)
    the key is random: fingerprints then hold for this process only."""
    configured = settings.audit
    sink: Sink = StdoutSink() if configured.to_stdout else FileSink(Path(configured.path))
    key = audit_key(settings) or os.urandom(_KEY_BYTES)
    audit = AuditLog(sink, key, fail_closed=configured.fail_closed)
    audit.start()
    return audit
