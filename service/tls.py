"""TLS of the broker's listener: checking the certificate files, reloading them when they
change, and the client certificate of a connection as the ASGI "tls" extension describes it.

Kept free of the web server: `check-config` uses the checks, `serve` the rest.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from service.watch import FileWatch

log = logging.getLogger(__name__)

# How often every worker looks at the certificate files (a stat of two files).
RELOAD_CHECK_SECONDS = 5
# The ASGI "tls" extension names TLS versions by their protocol numbers.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# An attribute type with the separator before it and the spaces around it: RFC 4514 names are
# case-insensitive, and people write subjects the way `openssl x509 -subject` prints them.
_ATTRIBUTE = re.compile(r"(^|(?<!\\),)\s*([A-Za-z][A-Za-z0-9-]*)\s*=")
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; `field` names its setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def canonical_subject(text: str) -> str:
    """A distinguished name written as in RFC 4514 (`CN=fleet-ingest,O=telemetry`), spelt the
    way a client certificate's subject is compared: attribute types upper-case, no spaces
    around `,` and `=`; ValueError if it is not one."""
    spelt = _ATTRIBUTE.sub(lambda match: f"{match[1]}{match[2].upper()}=", text.strip())
    try:
        name = x509.Name.from_rfc4514_string(spelt)
    except ValueError:
        name = None
    if name is None or not len(name):
        raise ValueError(
            "must be a distinguished name as in RFC 4514, e.g. 'CN=fleet-ingest,O=telemetry'"
        )
    return name.rfc4514_string()


def check_key_pair(cert_file: Path, key_file: Path) -> None:
    """Raise TlsFileError unless the files hold a PEM certificate (chain) and the unencrypted
    private key of its first certificate, loadable into an SSLContext."""
    [leaf, *_] = _certificates("cert_file", cert_file)
    data = _read("key_file", key_file)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(
            "key_file", f"{key_file} holds an encrypted key; give it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError("key_file", f"{key_file} holds no PEM private key") from None
    if leaf.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise TlsFileError("key_file", f"{key_file} is not the key of the certificate {cert_file}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        raise TlsFileError("cert_file", f"{cert_file} does not load ({_reason(error)})") from None


def check_client_ca(ca_file: Path) -> None:
    """Raise TlsFileError unless the file holds PEM CA certificates an SSLContext accepts."""
    _certificates("client_ca_file", ca_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(ca_file)
    except (ssl.SSLError, OSError) as error:
        raise TlsFileError(
            "client_ca_file", f"{ca_file} does not load ({_reason(error)})"
        ) from None


def _read(field: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsFileError(
            field, f"cannot read {path} ({error.strerror or 'unreadable'})"
        ) from None
    if not data.strip():
        raise TlsFileError(field, f"{path} is empty")
    return data


def _certificates(field: str, path: Path) -> Sequence[x509.Certificate]:
    data = _read(field, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(field, f"{path} holds no PEM certificate") from None


def _reason(error: Exception) -> str:
    return str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)


class CertificateReloader:
    """Loads the certificate and key into a live server SSLContext again when their files
    change; new handshakes then use the new certificate, open connections keep theirs.

    Files are compared by the stat of their targets (`service.watch`): a Kubernetes Secret
    volume (which cert-manager's Secrets usually are) updates by pointing a symlink at a new
    directory, so the inode changes even where sizes and times would not. A file missing in
    the middle of a swap is looked at again next time.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        cert_file: Path,
        key_file: Path,
        *,
        files: FileWatch | None = None,
    ) -> None:
        self._context = context
        self._cert_file = cert_file
        self._key_file = key_file
        # `files`: a watch begun before `context` read the files (see serving.py).
        self._files = files or FileWatch((cert_file, key_file), wait_for_all=True)

    def reload_if_changed(self) -> bool:
        """Reload if the files changed since last seen; whether a new certificate is in use.
        A pair that does not load is logged and skipped: the previous one stays in use."""
        if not self._files.changed():
            return False
        try:
            # Checked on its own first: a live context whose new certificate was loaded but
            # whose key then failed would be left without a usable key.
            check_key_pair(self._cert_file, self._key_file)
            self._context.load_cert_chain(self._cert_file, self._key_file)
        except (TlsFileError, ssl.SSLError, OSError) as error:
            log.warning(
                "TLS certificate not reloaded; the previous one stays in use",
                extra={"event": "tls.reload_failed", "reason": str(error)},
            )
            return False
        [leaf, *_] = _certificates("cert_file", self._cert_file)
        log.info(
            "TLS certificate reloaded",
            extra={
                "event": "tls.reloaded",
                "serial": format(leaf.serial_number, "x"),
                "not_after": leaf.not_valid_after_utc.isoformat(),
            },
        )
        return True


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI "tls" scope extension of a connection whose handshake is complete.

    With a client CA the handshake verified any certificate the client presented (and failed
    otherwise), so a `client_cert_name` here belongs to a certificate that chains to that CA.
    """
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name = None
    if der:
        certificate = x509.load_der_x509_certificate(der)
        name = certificate.subject.rfc4514_string()
        chain.append(certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }
