"""`serve` over TLS as a real process: HTTPS, a certificate rotated on disk, client
certificates as caller identities (mTLS), and the metrics on their own port."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from service.keys import api_key_digest, new_api_key, new_encryption_key
from service.serving import EXIT_STARTUP_FAILURE, EXIT_USAGE, run_serve
from service.simulator.client import SimulatorControl
from tests.certificates import (
    Issued,
    SecretVolume,
    make_ca,
    make_client_cert,
    make_server_cert,
)
from tests.support import ServeProcess, free_port

_START_SECONDS = 90
_ROTATION_SECONDS = 60  # the workers look at the files every few seconds
_POLL_SECONDS = 0.2
ACCOUNT = "fleet"
SUBJECT = "CN=fleet-ingest,O=telemetry"
TOKEN_PATH = f"/v1/accounts/{ACCOUNT}/token"


@dataclass(frozen=True)
class Pki:
    """The certificates of these tests."""

    ca: Issued
    server: Issued
    fleet_ingest: Issued  # CN=fleet-ingest,O=telemetry, signed by `ca`
    stranger: Issued  # signed by `ca`, a subject no caller lists
    impostor: Issued  # CN=fleet-ingest,O=telemetry, signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, and client certificates."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "tests-ca")
    other_ca = make_ca(directory / "other", "other-ca")
    return Pki(
        ca=ca,
        server=make_server_cert(ca, directory),
        fleet_ingest=make_client_cert(ca, directory, "fleet-ingest"),
        stranger=make_client_cert(ca, directory, "stranger"),
        impostor=make_client_cert(other_ca, directory / "other", "fleet-ingest"),
    )


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    """The serve processes a test starts; killed at the end if still running."""
    processes: list[ServeProcess] = []
    yield processes
    for process in processes:
        process.kill()


def write_config(
    path: Path,
    simulator: SimulatorControl,
    password: str,
    callers: dict[str, Any] | None = None,
    **extra: Any,
) -> str:
    """A one-account config on the simulator with a caller `tests` holding the returned key,
    and `callers` besides."""
    key, digest = new_api_key()
    config = {
        "redis_url": "memory://",
        "upstream": {"base_url": simulator.base_url, "dialect": "legacy"},
        "accounts": {ACCOUNT: {"username": "ops@example.com", "password": password}},
        "callers": {"tests": {"api_key_sha256": digest, "accounts": ["*"]}, **(callers or {})},
        **extra,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return key


def start(
    started: list[ServeProcess], config: Path, directory: Path, ca: Path, *, workers: int
) -> ServeProcess:
    """Start `serve` over TLS and wait until /healthz answers over HTTPS."""
    process = ServeProcess(config, directory, workers=workers, tls_ca=ca)
    started.append(process)
    process.wait_until_ok("/healthz", _START_SECONDS)
    return process


def client(serve: ServeProcess, ca: Issued, certificate: Issued | None = None) -> httpx.Client:
    """An HTTPS client of `serve` trusting `ca`, presenting `certificate` if given; a new one
    for each request, so that requests reach every worker."""
    context = ssl.create_default_context(cafile=ca.cert_file)
    if certificate is not None:
        context.load_cert_chain(certificate.cert_file, certificate.key_file)
    return httpx.Client(base_url=serve.url, verify=context, timeout=30.0)


def served_serial(serve: ServeProcess, ca: Issued) -> int:
    """The serial number of the certificate `serve` presents to a new connection."""
    context = ssl.create_default_context(cafile=ca.cert_file)
    with (
        socket.create_connection(("127.0.0.1", serve.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_serve_over_tls_picks_up_a_rotated_certificate(
    tmp_path: Path,
    started: list[ServeProcess],
    pki: Pki,
    simulator: SimulatorControl,
    simulator_users: dict[str, str],
    redis_url: str,
) -> None:
    """Two workers serve HTTPS; a new certificate swapped into a Secret-like volume is what
    every new connection gets a few seconds later, without a restart."""
    volume = SecretVolume(tmp_path / "tls")
    volume.publish(pki.server)
    tls = {"cert_file": str(volume.cert_file), "key_file": str(volume.key_file)}
    extra: dict[str, Any] = {
        "redis_url": redis_url,
        "encryption_keys": new_encryption_key(),
        "tls": tls,
    }
    config = tmp_path / "broker.yaml"
    key = write_config(config, simulator, simulator_users["ops@example.com"], **extra)
    serve = start(started, config, tmp_path / "serve", pki.ca.cert_file, workers=2)

    with client(serve, pki.ca) as http:
        assert http.get(TOKEN_PATH, headers=auth(key)).status_code == 200
    assert served_serial(serve, pki.ca) == pki.server.certificate.serial_number

    renewed = make_server_cert(pki.ca, tmp_path / "renewed")
    volume.publish(renewed)
    wanted = renewed.certificate.serial_number
    deadline = time.monotonic() + _ROTATION_SECONDS
    # Every worker reloads on its own: several new connections in a row must all see it.
    while [served_serial(serve, pki.ca) for _ in range(8)] != [wanted] * 8:
        assert time.monotonic() < deadline, serve.log()
        time.sleep(_POLL_SECONDS)

    with client(serve, pki.ca) as http:
        assert http.get(TOKEN_PATH, headers=auth(key)).status_code == 200
    assert serve.process.poll() is None
    assert "TLS certificate reloaded" in serve.log()
    assert serve.stop() == 0, serve.log()


def test_client_certificates_identify_callers_and_metrics_have_their_own_port(
    tmp_path: Path,
    started: list[ServeProcess],
    pki: Pki,
    simulator: SimulatorControl,
    simulator_users: dict[str, str],
    redis_url: str,
) -> None:
    """mTLS: a listed subject gets a token without a key, an unlisted one is 401, a certificate
    of another CA fails the handshake, no certificate still reaches the probes, and a key
    still wins over a certificate. The metrics of both workers are on metrics_port only."""
    metrics_port = free_port()
    tls = {
        "cert_file": str(pki.server.cert_file),
        "key_file": str(pki.server.key_file),
        "client_ca_file": str(pki.ca.cert_file),
    }
    extra: dict[str, Any] = {
        "redis_url": redis_url,
        "encryption_keys": new_encryption_key(),
        "tls": tls,
        "metrics_port": metrics_port,
    }
    callers = {"fleet-ingest": {"client_subjects": [SUBJECT], "accounts": [ACCOUNT]}}
    config = tmp_path / "broker.yaml"
    password = simulator_users["ops@example.com"]
    key = write_config(config, simulator, password, callers, **extra)
    serve = start(started, config, tmp_path / "serve", pki.ca.cert_file, workers=2)

    with client(serve, pki.ca, pki.fleet_ingest) as http:
        by_certificate = http.get(TOKEN_PATH)
    with client(serve, pki.ca, pki.stranger) as http:
        unknown = http.get(TOKEN_PATH)
    with client(serve, pki.ca, pki.impostor) as http, pytest.raises(httpx.TransportError):
        http.get("/healthz")
    with client(serve, pki.ca) as http:
        probes = [http.get(path).status_code for path in ("/healthz", "/readyz")]
        anonymous = http.get(TOKEN_PATH)
        main_port_metrics = http.get("/metrics")
    with client(serve, pki.ca, pki.fleet_ingest) as http:
        by_key = http.get(TOKEN_PATH, headers=auth(key))
    with httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=30.0) as http:
        metrics = http.get("/metrics")

    assert by_certificate.status_code == 200, by_certificate.text
    assert by_certificate.json()["access_token"]
    assert unknown.status_code == 401
    assert probes == [200, 200]
    assert anonymous.status_code == 401
    assert by_key.status_code == 200, by_key.text
    assert main_port_metrics.status_code == 404
    assert metrics.status_code == 200
    assert token_requests_by_caller(metrics.text) == {"fleet-ingest": 1, "tests": 1}
    # Callers appear by name only, never by the credential they presented.
    assert api_key_digest(key) not in metrics.text
    assert SUBJECT not in metrics.text
    assert serve.stop() == 0, serve.log()


def test_serve_refuses_metrics_port_equal_to_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], simulator: SimulatorControl
) -> None:
    """metrics_port must differ from the port serve listens on: a usage error, before
    anything starts."""
    port = free_port()
    config = tmp_path / "broker.yaml"
    write_config(config, simulator, "unused", metrics_port=port)

    assert run_serve(config, host="127.0.0.1", port=port, workers=1) == EXIT_USAGE
    assert f"metrics_port {port} is the port serve listens on" in capsys.readouterr().err


def test_serve_fails_to_start_when_its_metrics_port_is_taken(
    tmp_path: Path, simulator: SimulatorControl
) -> None:
    """A metrics port another process listens on stops `serve` with the startup-failure code
    and a line saying why, instead of a traceback."""
    config = tmp_path / "broker.yaml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(config, simulator, "unused", metrics_port=port)
        serve = ServeProcess(config, tmp_path / "serve")
        try:
            exit_code = serve.process.wait(_START_SECONDS)
        finally:
            serve.kill()

    assert exit_code == EXIT_STARTUP_FAILURE, serve.log()
    assert f"cannot serve the metrics on port {port}" in serve.log()


def auth(key: str) -> dict[str, str]:
    """The header that authenticates a caller by its key."""
    return {"Authorization": f"Bearer {key}"}


def token_requests_by_caller(exposition: str) -> dict[str, float]:
    """`monogoto_broker_token_requests_total`, summed by caller."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "monogoto_broker_token_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                caller = sample.labels["caller"]
                totals[caller] = totals.get(caller, 0) + sample.value
    return totals
