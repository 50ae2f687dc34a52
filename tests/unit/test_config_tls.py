"""The `tls`, `metrics_port` and `callers.<name>.client_subjects` settings and their checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.config import ConfigError, check_config
from tests.certificates import Issued, make_ca, make_client_cert, make_server_cert
from tests.config_files import load, problems, write

PASSWORD = "pw-Secret-0451"
DIGEST = "ab" * 32
SUBJECT = "CN=fleet-ingest,O=telemetry"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Issued:
    """A CA of client certificates (and of the server's)."""
    return make_ca(tmp_path_factory.mktemp("ca"), "tests-ca")


@pytest.fixture(scope="module")
def server(ca: Issued, tmp_path_factory: pytest.TempPathFactory) -> Issued:
    """A server certificate and its key."""
    return make_server_cert(ca, tmp_path_factory.mktemp("server"))


def config(server: Issued, ca: Issued | None = None, **overrides: Any) -> dict[str, Any]:
    """A minimal valid configuration with TLS, top-level keys replaced by `overrides`."""
    tls: dict[str, Any] = {"cert_file": str(server.cert_file), "key_file": str(server.key_file)}
    if ca is not None:
        tls["client_ca_file"] = str(ca.cert_file)
    data: dict[str, Any] = {
        "redis_url": "memory://",
        "accounts": {"fleet-eu": {"username": "ops@example.com", "password": PASSWORD}},
        "tls": tls,
    }
    data.update(overrides)
    return data


def test_tls_with_client_subjects_loads(tmp_path: Path, server: Issued, ca: Issued) -> None:
    """TLS files that load, and a caller known only by its certificate subject (spelt in any
    RFC 4514 way), with no key at all."""
    callers = {
        "fleet-ingest": {"client_subjects": ["cn=fleet-ingest, o=telemetry"], "accounts": ["*"]}
    }
    settings = load(tmp_path, config(server, ca, callers=callers, metrics_port=9090))
    assert settings.tls is not None
    assert settings.tls.client_ca_file == ca.cert_file
    assert settings.metrics_port == 9090
    caller = settings.callers["fleet-ingest"]
    assert caller.client_subjects == [SUBJECT]
    assert caller.key_digests() == ()


def test_tls_is_off_and_metrics_share_the_port_by_default(tmp_path: Path, server: Issued) -> None:
    """Without the settings there is no TLS and no separate metrics port."""
    data = config(server)
    del data["tls"]
    settings = load(tmp_path, data)
    assert settings.tls is None
    assert settings.metrics_port is None


def test_certificate_without_key_is_a_problem(tmp_path: Path, server: Issued) -> None:
    """tls needs both the certificate and its key."""
    data = config(server, tls={"cert_file": str(server.cert_file)})
    assert problems(tmp_path, data) == ["tls.key_file: required"]


def test_unreadable_tls_files_are_problems(tmp_path: Path, server: Issued) -> None:
    """Files that cannot be read are named, each at its setting, in one run."""
    missing = tmp_path / "missing"
    tls = {"cert_file": str(missing / "tls.crt"), "key_file": str(server.key_file)}
    tls["client_ca_file"] = str(missing / "ca.crt")
    assert problems(tmp_path, config(server, tls=tls)) == [
        f"tls.cert_file: cannot read {missing}/tls.crt (No such file or directory)",
        f"tls.client_ca_file: cannot read {missing}/ca.crt (No such file or directory)",
    ]


def test_files_without_pem_content_are_problems(tmp_path: Path, server: Issued) -> None:
    """A certificate file holding no certificate, or a key file holding no key, is refused."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")
    as_cert = {"cert_file": str(junk), "key_file": str(server.key_file)}
    assert problems(tmp_path, config(server, tls=as_cert)) == [
        f"tls.cert_file: {junk} holds no PEM certificate"
    ]
    as_key = {"cert_file": str(server.cert_file), "key_file": str(junk)}
    assert problems(tmp_path, config(server, tls=as_key)) == [
        f"tls.key_file: {junk} holds no PEM private key"
    ]
    as_ca = {**as_key, "key_file": str(server.key_file), "client_ca_file": str(junk)}
    assert problems(tmp_path, config(server, tls=as_ca)) == [
        f"tls.client_ca_file: {junk} holds no PEM certificate"
    ]


def test_key_of_another_certificate_is_a_problem(
    tmp_path: Path, server: Issued, ca: Issued
) -> None:
    """A key that does not belong to the certificate is refused, with its source."""
    other = make_client_cert(ca, tmp_path / "other", "other")
    data = config(server, tls={"cert_file": str(server.cert_file), "key_file": str(other.key_file)})
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        check_config(path)
    assert caught.value.report == [
        f"tls.key_file: {other.key_file} is not the key of the certificate {server.cert_file} "
        f"(from {path} line 8)"
    ]


def test_client_subjects_need_a_client_ca(tmp_path: Path, server: Issued) -> None:
    """Subjects are useless without a CA to verify client certificates against."""
    callers = {"fleet-ingest": {"client_subjects": [SUBJECT], "accounts": ["*"]}}
    assert problems(tmp_path, config(server, callers=callers)) == [
        "callers.fleet-ingest.client_subjects: needs tls.client_ca_file "
        "(the CA that client certificates must chain to)"
    ]


def test_one_subject_on_two_callers_is_a_problem(
    tmp_path: Path, server: Issued, ca: Issued
) -> None:
    """A subject identifies one caller; listing it twice in a caller is a problem too."""
    callers = {
        "fleet-ingest": {"client_subjects": [SUBJECT], "accounts": ["*"]},
        "billing": {
            "client_subjects": ["CN=billing,O=telemetry", "CN=fleet-ingest, O=telemetry"],
            "api_key_sha256": DIGEST,
            "accounts": ["*"],
        },
        "ops": {"client_subjects": ["CN=ops", "cn=ops"], "accounts": ["*"]},
    }
    assert problems(tmp_path, config(server, ca, callers=callers)) == [
        "callers.billing.client_subjects[1]: same subject as caller 'fleet-ingest' "
        "(each caller needs its own)",
        "callers.ops.client_subjects[1]: same subject as client_subjects[0]",
    ]


def test_malformed_or_empty_subjects_are_problems(
    tmp_path: Path, server: Issued, ca: Issued
) -> None:
    """A subject must be an RFC 4514 distinguished name; the list must not be empty."""
    callers = {
        "fleet-ingest": {"client_subjects": ["fleet-ingest"], "accounts": ["*"]},
        "billing": {"client_subjects": [], "api_key_sha256": DIGEST, "accounts": ["*"]},
    }
    assert problems(tmp_path, config(server, ca, callers=callers)) == [
        "callers.fleet-ingest.client_subjects[0]: must be a distinguished name as in RFC 4514, "
        "e.g. 'CN=fleet-ingest,O=telemetry'",
        "callers.billing.client_subjects: list at least one subject, or leave client_subjects out",
    ]


@pytest.mark.parametrize(
    ("port", "problem"),
    [
        (0, "metrics_port: must be at least 1"),
        (65536, "metrics_port: must be at most 65535"),
        (True, "metrics_port: must not be true or false"),
    ],
)
def test_metrics_port_must_be_a_port(
    tmp_path: Path, server: Issued, port: object, problem: str
) -> None:
    """metrics_port is a TCP port number."""
    assert problems(tmp_path, config(server, metrics_port=port)) == [problem]
