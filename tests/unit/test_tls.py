"""Certificate reloading and the client certificate of a connection (`service.tls`), with
handshakes in memory between a server and a client context."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from service.tls import CertificateReloader, canonical_subject, tls_extension
from service.watch import FileWatch
from tests.certificates import Issued, SecretVolume, make_ca, make_client_cert, make_server_cert

_ROUNDS = 10


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Issued:
    """A CA of the server's and the clients' certificates."""
    return make_ca(tmp_path_factory.mktemp("ca"), "tests-ca")


def server_context(volume: SecretVolume, ca: Issued | None = None) -> ssl.SSLContext:
    """A server context as uvicorn builds it from the volume's files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(volume.cert_file, volume.key_file)
    if ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(ca.cert_file)
    return context


def handshake(
    server: ssl.SSLContext, ca: Issued, client_cert: Issued | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Complete a handshake in memory; the client's and the server's side."""
    client = ssl.create_default_context(cafile=ca.cert_file)
    if client_cert is not None:
        client.load_cert_chain(client_cert.cert_file, client_cert.key_file)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname="localhost")
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(from_client, from_server, server_side=True)
    for _ in range(_ROUNDS):
        finished = 0
        for side in (client_side, server_side):
            try:
                side.do_handshake()
                finished += 1
            except ssl.SSLWantReadError:
                pass
        from_client.write(to_server.read())
        to_client.write(from_server.read())
        if finished == 2:
            return client_side, server_side
    raise AssertionError("the handshake did not complete")


def served_serial(server: ssl.SSLContext, ca: Issued) -> int:
    """The serial number of the certificate a new connection gets."""
    der = handshake(server, ca)[0].getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_new_handshakes_get_a_certificate_swapped_into_the_volume(
    tmp_path: Path, ca: Issued
) -> None:
    """After the volume's symlink swap, the same context serves the new certificate."""
    volume = SecretVolume(tmp_path / "tls")
    first = make_server_cert(ca, tmp_path / "first")
    volume.publish(first)
    context = server_context(volume)
    reloader = CertificateReloader(context, volume.cert_file, volume.key_file)
    assert not reloader.reload_if_changed()

    second = make_server_cert(ca, tmp_path / "second")
    volume.publish(second)

    assert reloader.reload_if_changed()
    assert served_serial(context, ca) == second.certificate.serial_number
    assert not reloader.reload_if_changed()


def test_a_rotation_while_the_server_loads_its_certificate_is_not_missed(
    tmp_path: Path, ca: Issued
) -> None:
    """The files are swapped after the watch began but before the server read them (a worker
    starting during a rotation): the first check reloads, so the new certificate is served."""
    volume = SecretVolume(tmp_path / "tls")
    volume.publish(make_server_cert(ca, tmp_path / "first"))
    files = FileWatch((volume.cert_file, volume.key_file), wait_for_all=True)
    second = make_server_cert(ca, tmp_path / "second")
    volume.publish(second)
    context = server_context(volume)
    reloader = CertificateReloader(context, volume.cert_file, volume.key_file, files=files)

    assert reloader.reload_if_changed()
    assert served_serial(context, ca) == second.certificate.serial_number


def test_a_pair_that_does_not_match_keeps_the_previous_certificate(
    tmp_path: Path, ca: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate published with another certificate's key is not loaded: the previous
    certificate is still served, and the failure is logged."""
    volume = SecretVolume(tmp_path / "tls")
    first = make_server_cert(ca, tmp_path / "first")
    volume.publish(first)
    context = server_context(volume)
    reloader = CertificateReloader(context, volume.cert_file, volume.key_file)
    second = make_server_cert(ca, tmp_path / "second")
    mismatched = Issued(second.certificate, first.key, second.cert_file, first.key_file)

    with caplog.at_level(logging.WARNING, logger="service.tls"):
        volume.publish(mismatched)
        assert not reloader.reload_if_changed()

    assert served_serial(context, ca) == first.certificate.serial_number
    assert [record.message for record in caplog.records] == [
        "TLS certificate not reloaded; the previous one stays in use"
    ]
    volume.publish(second)
    assert reloader.reload_if_changed()
    assert served_serial(context, ca) == second.certificate.serial_number


def test_the_tls_extension_names_a_verified_client_certificate(tmp_path: Path, ca: Issued) -> None:
    """With a client CA, the server side knows the client certificate's RFC 4514 subject; a
    client without a certificate still completes the handshake, with no name."""
    volume = SecretVolume(tmp_path / "tls")
    volume.publish(make_server_cert(ca, tmp_path / "server"))
    context = server_context(volume, ca)
    client_cert = make_client_cert(ca, tmp_path / "client", "fleet-ingest")

    with_certificate = tls_extension(handshake(context, ca, client_cert)[1])
    without = tls_extension(handshake(context, ca)[1])

    assert with_certificate["client_cert_name"] == "CN=fleet-ingest,O=telemetry"
    assert with_certificate["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")
    assert with_certificate["tls_version"] in (0x0303, 0x0304)
    assert without["client_cert_name"] is None
    assert without["client_cert_chain"] == []


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("CN=fleet-ingest,O=telemetry", "CN=fleet-ingest,O=telemetry"),
        ("cn=fleet-ingest, o=telemetry", "CN=fleet-ingest,O=telemetry"),
        ("CN=a\\, b,O=x", "CN=a\\, b,O=x"),
    ],
)
def test_subjects_are_compared_in_one_spelling(written: str, canonical: str) -> None:
    """Attribute names in any case and spaces after commas give the certificate's spelling."""
    assert canonical_subject(written) == canonical


@pytest.mark.parametrize("written", ["", "fleet-ingest", "CN=x,,O=y"])
def test_text_that_is_no_distinguished_name_is_refused(written: str) -> None:
    """A subject must be a distinguished name."""
    with pytest.raises(ValueError, match="RFC 4514"):
        canonical_subject(written)
