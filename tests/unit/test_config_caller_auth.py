"""`caller_auth.kubernetes` and callers' `service_accounts`: what the config accepts and the
check-config lines for what it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.config import ConfigError, KubernetesAuthSettings, Settings, check_config
from tests.certificates import make_ca
from tests.config_files import load, write

DIGEST = "ab" * 32
ISSUER = "https://kubernetes.default.svc.cluster.local"


@pytest.fixture(autouse=True)
def _in_tmp_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run every test in `tmp_path`, so that problems name the file as `config.yaml`."""
    monkeypatch.chdir(tmp_path)


def config(kubernetes: dict[str, Any] | None = None, **callers: Any) -> dict[str, Any]:
    """A valid configuration with `caller_auth.kubernetes` (unless None) and `callers`."""
    data: dict[str, Any] = {
        "redis_url": "memory://",
        "accounts": {"fleet-eu": {"username": "ops@example.com", "password": "pw"}},
        "callers": callers,
    }
    if kubernetes is not None:
        data["caller_auth"] = {"kubernetes": kubernetes}
    return data


def kubernetes(**fields: Any) -> dict[str, Any]:
    """A `caller_auth.kubernetes` section with `fields` replacing the defaults."""
    return {"issuer": ISSUER, "audiences": ["monogoto-broker"], **fields}


def loaded_section(settings: Settings) -> KubernetesAuthSettings:
    """The `caller_auth.kubernetes` section of `settings`, which must have one."""
    assert settings.caller_auth.kubernetes is not None
    return settings.caller_auth.kubernetes


def report(tmp_path: Path, data: dict[str, Any]) -> list[str]:
    """The check-config lines for `data` written to config.yaml."""
    write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        check_config(Path("config.yaml"))
    return caught.value.report


def test_caller_may_have_service_accounts_instead_of_a_key(tmp_path: Path) -> None:
    """A caller known only by its ServiceAccounts needs no key digest."""
    data = config(
        kubernetes(),
        ingest={"service_accounts": ["telemetry/fleet-ingest"], "accounts": ["*"]},
        both={
            "api_key_sha256": DIGEST,
            "service_accounts": ["billing/api.v2"],
            "accounts": ["fleet-eu"],
        },
    )
    settings = load(tmp_path, data)
    assert settings.callers["ingest"].key_digests() == ()
    assert settings.callers["ingest"].service_accounts == ["telemetry/fleet-ingest"]
    assert settings.callers["both"].key_digests() == (DIGEST,)
    assert loaded_section(settings).issuer == ISSUER
    assert loaded_section(settings).jwks_url is None
    assert loaded_section(settings).discovery_url == ISSUER + "/.well-known/openid-configuration"


def test_files_and_loopback_http_jwks_url_are_accepted(tmp_path: Path) -> None:
    """A CA file with a certificate, a token file and an http JWKS URL on loopback are valid."""
    ca = make_ca(tmp_path, "ca")
    (tmp_path / "token").write_text("eyJ-reader-token\n", encoding="utf-8")
    section = kubernetes(
        issuer="kubernetes/serviceaccount",
        jwks_url="http://127.0.0.1:8443/openid/v1/jwks",
        jwks_ca_file=str(ca.cert_file),
        jwks_token_file=str(tmp_path / "token"),
    )
    settings = load(tmp_path, config(section))
    assert loaded_section(settings).jwks_url == "http://127.0.0.1:8443/openid/v1/jwks"
    assert loaded_section(settings).jwks_ca_file == ca.cert_file


def test_no_caller_auth_by_default(tmp_path: Path) -> None:
    """Without caller_auth, ServiceAccount tokens are not accepted at all."""
    settings = load(tmp_path, config(billing={"api_key_sha256": DIGEST, "accounts": ["*"]}))
    assert settings.caller_auth.kubernetes is None


@pytest.mark.parametrize(
    "name",
    ["telemetry", "Telemetry/fleet", "telemetry/", "/fleet", "a/b/c", "ns/-x", "ns/x_y", "ns/a..b"],
)
def test_bad_service_account_name_is_a_problem(tmp_path: Path, name: str) -> None:
    """A service account that is not `namespace/name` in Kubernetes' spelling is named."""
    data = config(kubernetes(), ingest={"service_accounts": [name], "accounts": ["*"]})
    assert report(tmp_path, data) == [
        "callers.ingest.service_accounts[0]: must be 'namespace/name' of a Kubernetes "
        "ServiceAccount (lowercase a-z, 0-9, '-'; the name may also hold '.') "
        "(from config.yaml line 9)"
    ]


def test_service_account_of_two_callers_is_a_problem(tmp_path: Path) -> None:
    """Two callers with one service account could not be told apart; so could not one twice."""
    data = config(
        kubernetes(),
        ingest={"service_accounts": ["telemetry/fleet-ingest"], "accounts": ["*"]},
        other={
            "service_accounts": ["telemetry/other", "telemetry/fleet-ingest", "telemetry/other"],
            "accounts": ["*"],
        },
    )
    assert report(tmp_path, data) == [
        "callers.other.service_accounts[2]: same service account as service_accounts[0] "
        "(from config.yaml line 16)",
    ]
    data["callers"]["other"]["service_accounts"].pop()
    assert report(tmp_path, data) == [
        "callers.other.service_accounts[1]: same service account as caller 'ingest' (each "
        "caller needs its own) (from config.yaml line 15)",
    ]


def test_service_accounts_need_caller_auth_kubernetes(tmp_path: Path) -> None:
    """Service accounts without the issuer to check their tokens against are refused."""
    data = config(None, ingest={"service_accounts": ["telemetry/fleet-ingest"], "accounts": ["*"]})
    assert report(tmp_path, data) == [
        "callers.ingest.service_accounts: needs caller_auth.kubernetes (the issuer and "
        "audiences that ServiceAccount tokens are checked against) (from config.yaml line 8)"
    ]


def test_empty_service_account_list_is_a_problem(tmp_path: Path) -> None:
    """An empty list is a mistake, not a caller without credentials."""
    data = config(kubernetes(), ingest={"service_accounts": [], "accounts": ["*"]})
    assert report(tmp_path, data) == [
        "callers.ingest.service_accounts: list at least one 'namespace/name', or leave "
        "service_accounts out (from config.yaml line 8)"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://kubernetes.default.svc/openid/v1/jwks",
        "http://10.0.0.1/openid/v1/jwks",
        "ftp://127.0.0.1/jwks",
        "https:///jwks",
        "not a url",
    ],
)
def test_jwks_url_must_be_https_unless_loopback(tmp_path: Path, url: str) -> None:
    """Keys fetched in the clear could be swapped on the way: http only to this machine."""
    data = config(kubernetes(jwks_url=url))
    assert report(tmp_path, data) == [
        "caller_auth.kubernetes.jwks_url: must be an https:// URL (http:// only for a loopback "
        "address such as 127.0.0.1) (from config.yaml line 12)"
    ]


def test_jwks_url_must_not_hold_a_password(tmp_path: Path) -> None:
    """The URL shows in logs and readiness: a credential belongs in jwks_token_file."""
    data = config(kubernetes(jwks_url="https://reader:s3cret@kubernetes.default.svc/jwks"))
    [problem] = report(tmp_path, data)
    assert problem == (
        "caller_auth.kubernetes.jwks_url: must not hold a user or password (use "
        "jwks_token_file) (from config.yaml line 12)"
    )


@pytest.mark.parametrize("url", ["http://localhost:8080/jwks", "http://[::1]:8080/jwks"])
def test_http_jwks_url_on_loopback_is_accepted(tmp_path: Path, url: str) -> None:
    """`localhost` and IPv6 loopback count as loopback."""
    assert loaded_section(load(tmp_path, config(kubernetes(jwks_url=url)))).jwks_url == url


@pytest.mark.parametrize("issuer", ["http://kubernetes.default.svc", "kubernetes/serviceaccount"])
def test_issuer_used_for_discovery_must_be_https(tmp_path: Path, issuer: str) -> None:
    """Without jwks_url the issuer's discovery document is fetched, so the same rule applies."""
    assert report(tmp_path, config(kubernetes(issuer=issuer))) == [
        "caller_auth.kubernetes.issuer: without jwks_url, the keys are found through the "
        "issuer's discovery document, so the issuer must be an https:// URL (http:// only for "
        "a loopback address such as 127.0.0.1) (from config.yaml line 9)"
    ]


def test_missing_and_unusable_files_are_problems(tmp_path: Path) -> None:
    """A CA file or token file that cannot be read, is empty or holds no certificate is named
    with its path, every problem in one run."""
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    (tmp_path / "not-pem").write_text("hello\n", encoding="utf-8")
    data = config(
        kubernetes(jwks_ca_file=str(tmp_path / "missing.crt"), jwks_token_file=str(tmp_path))
    )
    assert report(tmp_path, data) == [
        f"caller_auth.kubernetes.jwks_ca_file: cannot read {tmp_path / 'missing.crt'} (No such "
        "file or directory) (from config.yaml line 12)",
        f"caller_auth.kubernetes.jwks_token_file: cannot read {tmp_path} (Is a directory) "
        "(from config.yaml line 13)",
    ]
    data = config(
        kubernetes(jwks_ca_file=str(tmp_path / "not-pem"), jwks_token_file=str(tmp_path / "empty"))
    )
    assert report(tmp_path, data) == [
        f"caller_auth.kubernetes.jwks_ca_file: {tmp_path / 'not-pem'} holds no PEM certificate "
        "(from config.yaml line 12)",
        f"caller_auth.kubernetes.jwks_token_file: {tmp_path / 'empty'} is empty "
        "(from config.yaml line 13)",
    ]


def test_issuer_and_audiences_are_required(tmp_path: Path) -> None:
    """A kubernetes section must say which tokens it accepts."""
    assert report(tmp_path, config({"audiences": []})) == [
        "caller_auth.kubernetes.issuer: required (from config.yaml line 8)",
        "caller_auth.kubernetes.audiences: must not be empty (from config.yaml line 9)",
    ]


def test_environment_overrides_caller_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BROKER_CALLER_AUTH__KUBERNETES__* set or override the section, and a caller's service
    accounts are a JSON list."""
    monkeypatch.setenv("BROKER_CALLER_AUTH__KUBERNETES__ISSUER", "https://issuer.example")
    monkeypatch.setenv("BROKER_CALLER_AUTH__KUBERNETES__AUDIENCES", '["a", "b"]')
    monkeypatch.setenv("BROKER_CALLERS__INGEST__SERVICE_ACCOUNTS", '["telemetry/x"]')
    data = config(kubernetes(), ingest={"service_accounts": ["telemetry/y"], "accounts": ["*"]})
    settings = load(tmp_path, data)
    assert loaded_section(settings).issuer == "https://issuer.example"
    assert loaded_section(settings).audiences == ["a", "b"]
    assert settings.callers["ingest"].service_accounts == ["telemetry/x"]
