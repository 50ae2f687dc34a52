"""Certificates made by the tests: CAs, server certificates for 127.0.0.1 and localhost, and
client certificates, written as PEM files (importable as `tests.certificates`)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and as PEM files."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path
    key_file: Path


def _name(common_name: str, organization: str) -> x509.Name:
    # Organization first, as `openssl -subj /O=.../CN=...`: RFC 4514 then reads CN=...,O=...
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(
    directory: Path, stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / f"{stem}.crt"
    key_file = directory / f"{stem}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(certificate, key, cert_file, key_file)


def make_ca(directory: Path, common_name: str) -> Issued:
    """A self-signed CA, written as `<common_name>.crt` and `.key` in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name, "tests")
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _VALID)
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, common_name, certificate, key)


def _issue(
    ca: Issued,
    directory: Path,
    stem: str,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    alternative_names: list[x509.GeneralName],
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _VALID)
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
    return _write(directory, stem, builder.sign(ca.key, hashes.SHA256()), key)


def make_server_cert(ca: Issued, directory: Path, stem: str = "tls") -> Issued:
    """A server certificate for 127.0.0.1 and localhost signed by `ca`: `stem`.crt and .key."""
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    subject = _name("localhost", "tests")
    return _issue(ca, directory, stem, subject, ExtendedKeyUsageOID.SERVER_AUTH, names)


def make_client_cert(
    ca: Issued, directory: Path, common_name: str, organization: str = "telemetry"
) -> Issued:
    """A client certificate with subject `CN=<common_name>,O=<organization>` signed by `ca`."""
    subject = _name(common_name, organization)
    return _issue(ca, directory, common_name, subject, ExtendedKeyUsageOID.CLIENT_AUTH, [])


class SecretVolume:
    """A directory laid out like a Kubernetes Secret volume: `tls.crt` and `tls.key` are
    symlinks through `..data`, a symlink to the current version's directory, which an update
    replaces in one rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._versions = 0
        directory.mkdir(parents=True)
        for name in ("tls.crt", "tls.key"):
            (directory / name).symlink_to(Path("..data") / name)

    @property
    def cert_file(self) -> Path:
        """The certificate's path, as the broker is configured with it."""
        return self.directory / "tls.crt"

    @property
    def key_file(self) -> Path:
        """The key's path, as the broker is configured with it."""
        return self.directory / "tls.key"

    def publish(self, issued: Issued) -> None:
        """Make `issued` the volume's certificate and key, atomically."""
        self._versions += 1
        version = self.directory / f"..version-{self._versions}"
        version.mkdir()
        (version / "tls.crt").write_bytes(issued.cert_file.read_bytes())
        (version / "tls.key").write_bytes(issued.key_file.read_bytes())
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.directory / "..data")
