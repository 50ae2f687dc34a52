"""Loading and validating the broker configuration (file plus environment overrides)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from service.config import (
    ConfigError,
    Dialect,
    Settings,
    build_settings,
    config_path_from_env,
    load_settings,
    loading,
)
from service.keys import new_api_key, new_encryption_key
from tests.config_files import load, problems, write

PASSWORD = "pw-Secret-0451"
OTHER_PASSWORD = "pw-Secret-9876"
REDIS_PASSWORD = "redis-Secret-1234"
DIGEST = "ab" * 32
NEW_DIGEST = "cd" * 32  # the second key of a caller whose key is being rotated
KEY_LINE = "k1:" + base64.b64encode(bytes(range(32))).decode()


def config(**overrides: Any) -> dict[str, Any]:
    """A minimal valid configuration, with top-level keys replaced by `overrides`."""
    data: dict[str, Any] = {
        "redis_url": "memory://",
        "accounts": {"fleet-eu": {"username": "ops@example.com", "password": PASSWORD}},
    }
    data.update(overrides)
    return data


def secret_file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


# --- defaults and resolution -------------------------------------------------------------


def test_defaults_match_the_contract(tmp_path: Path) -> None:
    """Unset fields take the documented defaults."""
    data = config(encryption_keys=KEY_LINE)
    del data["redis_url"]
    settings = load(tmp_path, data)
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert not settings.uses_memory_store
    assert settings.key_prefix == "mgb"
    assert settings.upstream.dialect is Dialect.LEGACY
    assert settings.upstream.base_url is None
    assert settings.upstream.timeout_seconds == 10
    assert (settings.upstream.auth_rate.limit, settings.upstream.auth_rate.period_seconds) == (
        5,
        60,
    )
    assert settings.refresh.fraction == 0.75
    assert settings.refresh.min_remaining_seconds == 60
    assert settings.refresh.default_lifetime_seconds == 3600
    assert settings.callers == {}
    assert all(
        isinstance(value, float)
        for value in (settings.upstream.timeout_seconds, *settings.refresh.model_dump().values())
    )


def test_account_inherits_upstream_defaults(tmp_path: Path) -> None:
    """An account without overrides uses the legacy dialect, its default base URL and timeout."""
    account = load(tmp_path, config()).account("fleet-eu")
    assert account.name == "fleet-eu"
    assert account.username == "ops@example.com"
    assert account.password.get_secret_value() == PASSWORD
    assert account.dialect is Dialect.LEGACY
    assert account.base_url == "https://console.monogoto.io"
    assert account.timeout_seconds == 10


def test_default_base_url_follows_the_accounts_dialect(tmp_path: Path) -> None:
    """An account switched to v1 talks to the v1 API host unless a base URL is configured."""
    data = config()
    data["accounts"]["fleet-eu"]["dialect"] = "v1"
    data["accounts"]["fleet-us"] = {"username": "u", "password": PASSWORD, "timeout_seconds": 2.5}
    accounts = load(tmp_path, data).accounts_resolved()
    assert accounts["fleet-eu"].dialect is Dialect.V1
    assert accounts["fleet-eu"].base_url == "https://api.monogoto.io"
    assert accounts["fleet-us"].base_url == "https://console.monogoto.io"
    assert accounts["fleet-us"].timeout_seconds == 2.5


def test_base_urls_override_defaults_and_lose_trailing_slash(tmp_path: Path) -> None:
    """upstream.base_url applies to every account; a per-account base_url wins over it."""
    data = config(upstream={"dialect": "v1", "base_url": "http://127.0.0.1:8090/"})
    data["accounts"]["fleet-us"] = {
        "username": "u",
        "password": PASSWORD,
        "base_url": "https://mock.example/mono/",
    }
    accounts = load(tmp_path, data).accounts_resolved()
    assert accounts["fleet-eu"].base_url == "http://127.0.0.1:8090"
    assert accounts["fleet-us"].base_url == "https://mock.example/mono"


# --- environment overrides ----------------------------------------------------------------


def test_env_overrides_file_and_merges_nested_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKER_UPSTREAM__TIMEOUT_SECONDS wins over the file but keeps the file's upstream.dialect."""
    monkeypatch.setenv("BROKER_UPSTREAM__TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("BROKER_KEY_PREFIX", "env")
    settings = load(tmp_path, config(key_prefix="file", upstream={"dialect": "v1"}))
    assert settings.upstream.timeout_seconds == 3
    assert settings.upstream.dialect is Dialect.V1
    assert settings.key_prefix == "env"


def test_env_sets_account_password_by_dashed_name_case_insensitively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account named fleet-eu is reachable as BROKER_ACCOUNTS__FLEET-EU__* in any case."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET-EU__PASSWORD", OTHER_PASSWORD)
    monkeypatch.setenv("broker_accounts__Fleet-Eu__Timeout_Seconds", "4")
    account = load(tmp_path, config()).account("fleet-eu")
    assert account.password.get_secret_value() == OTHER_PASSWORD
    assert account.username == "ops@example.com"
    assert account.timeout_seconds == 4


def test_env_can_add_an_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An account may be defined entirely through environment variables."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET-US__USERNAME", "us@example.com")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET-US__PASSWORD", OTHER_PASSWORD)
    assert set(load(tmp_path, config()).accounts) == {"fleet-eu", "fleet-us"}


def test_env_lists_are_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's account list can be overridden with a JSON list."""
    data = config(callers={"billing": {"api_key_sha256": DIGEST, "accounts": ["fleet-eu"]}})
    monkeypatch.setenv("BROKER_CALLERS__BILLING__ACCOUNTS", '["*"]')
    assert load(tmp_path, data).callers["billing"].accounts == ["*"]


def test_env_list_that_is_not_json_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain word where a list is expected is reported with how to write it instead."""
    data = config(callers={"billing": {"api_key_sha256": DIGEST, "accounts": ["fleet-eu"]}})
    monkeypatch.setenv("BROKER_CALLERS__BILLING__ACCOUNTS", "fleet-eu")
    [problem] = problems(tmp_path, data)
    assert problem.startswith("BROKER_CALLERS")
    assert "must be JSON" in problem


def test_env_sets_caller_digests_as_a_json_list_or_one_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKER_CALLERS__<NAME>__API_KEY_SHA256 replaces the file's digests: a JSON list for
    several (a key being rotated), a plain string for one."""
    data = config(callers={"billing": {"api_key_sha256": DIGEST, "accounts": ["fleet-eu"]}})
    monkeypatch.setenv(
        "BROKER_CALLERS__BILLING__API_KEY_SHA256", f'["{DIGEST}", "sha256:{NEW_DIGEST}"]'
    )
    assert load(tmp_path, data).callers["billing"].key_digests() == (DIGEST, NEW_DIGEST)
    data["callers"]["billing"]["api_key_sha256"] = [DIGEST, NEW_DIGEST]
    monkeypatch.setenv("BROKER_CALLERS__BILLING__API_KEY_SHA256", f"sha256:{NEW_DIGEST}")
    assert load(tmp_path, data).callers["billing"].key_digests() == (NEW_DIGEST,)
    monkeypatch.setenv("BROKER_CALLERS__BILLING__API_KEY_SHA256", f'["{NEW_DIGEST}", "x"]')
    assert problems(tmp_path, data) == [
        "callers.billing.api_key_sha256[1]: must be 'sha256:' and 64 hex digits (see new-api-key)"
    ]


def test_env_value_is_validated_like_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad environment override is reported at the setting's path."""
    monkeypatch.setenv("BROKER_REFRESH__FRACTION", "1.5")
    assert problems(tmp_path, config()) == ["refresh.fraction: must be less than 1"]


@pytest.mark.parametrize(
    "name", ["BROKER_UPSTRAEM__DIALECT", "BROKER_REDIS", "broker_acounts__x__password"]
)
def test_env_typo_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A BROKER_ variable naming no setting is reported instead of silently ignored."""
    monkeypatch.setenv(name, "x")
    [problem] = problems(tmp_path, config())
    assert problem.startswith(f"{name}: unknown setting")


def test_env_unknown_nested_key_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo below a known section is reported like an unknown key in the file."""
    monkeypatch.setenv("BROKER_UPSTREAM__TIMEOUT", "3")
    assert problems(tmp_path, config()) == ["upstream.timeout: unknown key"]


def test_broker_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKER_CONFIG gives the config path and is not mistaken for a setting."""
    assert config_path_from_env() is None
    path = write(tmp_path, config())
    monkeypatch.setenv("BROKER_CONFIG", str(path))
    assert config_path_from_env() == path
    assert load_settings(path).accounts["fleet-eu"].username == "ops@example.com"


# --- *_file twins -------------------------------------------------------------------------


def test_password_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    """password_file (a Kubernetes Secret volume) supplies the password, minus the newline."""
    data = config()
    data["accounts"]["fleet-eu"] = {
        "username": "u",
        "password_file": secret_file(tmp_path, "pw", PASSWORD + "\n"),
    }
    account = load(tmp_path, data).account("fleet-eu")
    assert account.password.get_secret_value() == PASSWORD


def test_secret_files_supply_redis_url_digest_and_keys(tmp_path: Path) -> None:
    """Every secret can come from a file: Redis URL, caller digest and encryption keys."""
    data = config(
        redis_url_file=secret_file(tmp_path, "url", f"redis://:{REDIS_PASSWORD}@db:6379/1\n"),
        encryption_keys_file=secret_file(tmp_path, "keys", f"# keys\n{KEY_LINE}\n"),
        callers={
            "billing": {
                "api_key_sha256_file": secret_file(tmp_path, "digest", f"sha256:{DIGEST}\n"),
                "accounts": ["*"],
            }
        },
    )
    del data["redis_url"]
    settings = load(tmp_path, data)
    assert settings.redis_url.get_secret_value() == f"redis://:{REDIS_PASSWORD}@db:6379/1"
    assert [key.kid for key in settings.encryption_key_ring()] == ["k1"]
    assert settings.callers["billing"].key_digests() == (DIGEST,)


def test_digest_file_may_hold_one_digest_per_line(tmp_path: Path) -> None:
    """During a rotation the caller's Secret holds both digests, one per line; blank lines
    and surrounding whitespace (a CRLF editor, a trailing newline) do not count."""
    content = f"\n  sha256:{DIGEST}  \r\n\n{NEW_DIGEST.upper()}\n\n"
    data = config(
        callers={
            "billing": {
                "api_key_sha256_file": secret_file(tmp_path, "digests", content),
                "accounts": ["*"],
            }
        }
    )
    assert load(tmp_path, data).callers["billing"].key_digests() == (DIGEST, NEW_DIGEST)


def test_bad_or_repeated_digest_in_a_file_names_its_line(tmp_path: Path) -> None:
    """In a file of several digests a problem names the line, never the digest."""
    content = f"{DIGEST}\n\nsha256:{NEW_DIGEST[:-1]}\nsha256:{DIGEST}\n"
    data = config(
        callers={
            "billing": {
                "api_key_sha256_file": secret_file(tmp_path, "digests", content),
                "accounts": ["*"],
            }
        }
    )
    assert problems(tmp_path, data) == [
        "callers.billing.api_key_sha256_file: line 3: must be 'sha256:' and 64 hex digits "
        "(see new-api-key)",
        "callers.billing.api_key_sha256_file: line 4: same digest as line 1",
    ]


def test_secret_and_its_file_together_is_a_problem(tmp_path: Path) -> None:
    """Setting both a secret and its *_file twin is ambiguous and refused."""
    data = config()
    data["accounts"]["fleet-eu"]["password_file"] = secret_file(tmp_path, "pw", PASSWORD)
    assert problems(tmp_path, data) == [
        "accounts.fleet-eu.password_file: set either password or password_file, not both"
    ]
    data = config(
        redis_url_file=secret_file(tmp_path, "url", "redis://db"),
        encryption_keys=KEY_LINE,
        encryption_keys_file=secret_file(tmp_path, "keys", KEY_LINE),
    )
    assert problems(tmp_path, data) == [
        "redis_url_file: set either redis_url or redis_url_file, not both",
        "encryption_keys_file: set either encryption_keys or encryption_keys_file, not both",
    ]


def test_unreadable_and_empty_secret_files_are_problems(tmp_path: Path) -> None:
    """A missing or empty secret file is named, with the reason."""
    data = config()
    data["accounts"] = {
        "fleet-eu": {"username": "u", "password_file": "/no/such/file"},
        "fleet-us": {"username": "u", "password_file": secret_file(tmp_path, "empty", "\n")},
        "fleet-ap": {"username": "u", "password_file": str(tmp_path)},
    }
    assert problems(tmp_path, data) == [
        "accounts.fleet-eu.password_file: cannot read /no/such/file (No such file or directory)",
        f"accounts.fleet-us.password_file: {tmp_path / 'empty'} is empty",
        f"accounts.fleet-ap.password_file: cannot read {tmp_path} (Is a directory)",
    ]


def test_missing_password_is_a_problem(tmp_path: Path) -> None:
    """An account needs a password or a password file."""
    data = config()
    data["accounts"]["fleet-eu"] = {"username": "u"}
    assert problems(tmp_path, data) == [
        "accounts.fleet-eu.password: required (set password or password_file)"
    ]


# --- validation rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("upstream", "timeout_seconds", 0, "must be greater than 0"),
        ("upstream", "timeout_seconds", float("inf"), "must be a finite number"),
        ("upstream", "timeout_seconds", "soon", "must be a number"),
        ("upstream", "dialect", "v2", "must be 'legacy' or 'v1'"),
        ("upstream", "base_url", "ftp://example.com", "must be an http:// or https:// URL"),
        ("upstream", "base_url", "https://x.example/?a=1", "must not have a query or fragment"),
        ("refresh", "fraction", 0, "must be greater than 0"),
        ("refresh", "fraction", 1, "must be less than 1"),
        ("refresh", "min_remaining_seconds", -1, "must be at least 0"),
        ("refresh", "default_lifetime_seconds", 0, "must be greater than 0"),
    ],
)
def test_section_values_are_checked(
    tmp_path: Path, section: str, field: str, value: Any, message: str
) -> None:
    """Out-of-range or malformed values are reported at their dotted path."""
    assert problems(tmp_path, config(**{section: {field: value}})) == [
        f"{section}.{field}: {message}"
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("limit", 0, "must be at least 1"), ("period_seconds", 0, "must be greater than 0")],
)
def test_auth_rate_is_checked(tmp_path: Path, field: str, value: int, message: str) -> None:
    """The shared auth budget must allow at least one call in a positive window."""
    data = config(upstream={"auth_rate": {field: value}})
    assert problems(tmp_path, data) == [f"upstream.auth_rate.{field}: {message}"]


@pytest.mark.parametrize("prefix", ["", "m g b", "mgb{x}", "}"])
def test_key_prefix_is_checked(tmp_path: Path, prefix: str) -> None:
    """The Redis key prefix must be non-empty and unable to break hash tags."""
    [problem] = problems(tmp_path, config(key_prefix=prefix))
    assert problem.startswith("key_prefix: must be non-empty")


@pytest.mark.parametrize("url", ["http://db:6379", "localhost:6379", "", "redis+proxy://db"])
def test_redis_url_scheme_is_checked(tmp_path: Path, url: str) -> None:
    """Only the documented schemes are accepted."""
    [problem] = problems(tmp_path, config(redis_url=url))
    assert problem == (
        "redis_url: must be a redis://, rediss://, unix://, memory://, redis+sentinel:// or "
        "redis+cluster:// URL (rediss+sentinel:// and rediss+cluster:// for TLS)"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:s3cret@/mymaster", "names no sentinel"),
        ("redis+cluster://:s3cret@", "names no cluster node"),
        ("redis+sentinel://:s3cret@h1:26379,h2:x/mymaster", "bad port for host 'h2'"),
        ("redis+cluster://:s3cret@h1:70000", "bad port for host 'h1': must be a number 1-65535"),
        ("redis+sentinel://:s3cret@h1,h2", "missing the service name"),
        ("redis+sentinel://:s3cret@h1/mymaster/zero", "database 'zero' must be a number"),
        ("redis+cluster://:s3cret@h1/3", "a cluster has only database 0"),
        ("redis+cluster://:s3cret@h1?db=2", "unknown query parameter 'db'"),
        ("redis+cluster://:s3cret@h1?ssl_ca_certs=/ca.pem", "unknown query parameter"),
        ("redis+sentinel://:s3cret@h1/m?socket_timeout=0", "socket_timeout must be a number"),
        ("rediss+cluster://:s3cret@h1?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
    ],
)
def test_sentinel_and_cluster_urls_are_checked(tmp_path: Path, url: str, message: str) -> None:
    """A Sentinel or Cluster URL that cannot work is one clear line, without the password."""
    [problem] = problems(tmp_path, config(redis_url=url, encryption_keys=KEY_LINE))
    assert problem.startswith("redis_url: ")
    assert message in problem
    assert "s3cret" not in problem


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:pw@redis-a:26379,redis-b,[::1]:26380/mymaster/2",
        "rediss+sentinel://u:pw@redis/mymaster?sentinel_password=x&ssl_ca_certs=/ca.pem",
        "redis+cluster://u:pw@node-1:7000,node-2:7001",
        "rediss+cluster://u:pw@clustercfg.example:6379/?ssl_cert_reqs=none&socket_timeout=0.5",
    ],
)
def test_sentinel_and_cluster_urls_are_accepted(tmp_path: Path, url: str) -> None:
    """Every documented form loads (nothing connects before the broker starts)."""
    settings = load(tmp_path, config(redis_url=url, encryption_keys=KEY_LINE))
    assert settings.redis_url.get_secret_value() == url
    assert not settings.uses_memory_store


@pytest.mark.parametrize("url", ["rediss://db:6380/0", "unix:///run/redis.sock", "redis://db"])
def test_real_redis_requires_shared_encryption_keys(tmp_path: Path, url: str) -> None:
    """With a real Redis the operator is told to create a shared key file, and how."""
    [problem] = problems(tmp_path, config(redis_url=url))
    assert problem.startswith("encryption_keys_file: required when redis_url is a real Redis")
    assert "monogoto-broker new-encryption-key" in problem
    assert load(tmp_path, config(redis_url=url, encryption_keys=KEY_LINE)).encryption_key_ring()


def test_memory_store_needs_no_keys(tmp_path: Path) -> None:
    """With memory:// no key file is needed and the configured key ring is empty."""
    settings = load(tmp_path, config())
    assert settings.uses_memory_store
    assert settings.encryption_key_ring() == []


def test_inline_keys_may_be_comma_separated_first_encrypts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKER_ENCRYPTION_KEYS takes comma-separated keys; their order is kept."""
    second = new_encryption_key()
    monkeypatch.setenv("BROKER_ENCRYPTION_KEYS", f"{KEY_LINE},{second}")
    ring = load(tmp_path, config(redis_url="redis://db")).encryption_key_ring()
    assert [key.kid for key in ring] == ["k1", second.split(":")[0]]


def test_bad_key_file_is_a_problem_without_key_material(tmp_path: Path) -> None:
    """A malformed key file is reported at encryption_keys_file, never echoing a key."""
    short = base64.b64encode(b"s" * 16).decode()
    path = secret_file(tmp_path, "keys", f"{KEY_LINE}\nk2:{short}\n")
    [problem] = problems(tmp_path, config(encryption_keys_file=path))
    assert problem == "encryption_keys_file: line 2: key 'k2' must be exactly 32 bytes, got 16"


@pytest.mark.parametrize("name", ["Fleet", "-eu", "fleet eu", "a" * 64, "fleet.eu", "flöte"])
def test_account_and_caller_names_are_checked(tmp_path: Path, name: str) -> None:
    """Names go into Redis hash tags and metric labels, so only a tame alphabet is allowed."""
    data = config(callers={name: {"api_key_sha256": DIGEST, "accounts": ["*"]}})
    data["accounts"][name] = {"username": "u", "password": PASSWORD}
    found = problems(tmp_path, data)
    assert [problem.split(":")[0] for problem in found] == [f"accounts.{name}", f"callers.{name}"]
    assert all("invalid name" in problem for problem in found)


@pytest.mark.parametrize("accounts", [{}, None])
def test_at_least_one_account_is_required(tmp_path: Path, accounts: Any) -> None:
    """A broker without accounts is useless and refused."""
    data = config(accounts=accounts) if accounts is not None else {"redis_url": "memory://"}
    assert problems(tmp_path, data) == ["accounts: at least one account is required"]


def test_username_must_not_be_empty(tmp_path: Path) -> None:
    """An empty username is refused."""
    data = config()
    data["accounts"]["fleet-eu"]["username"] = ""
    assert problems(tmp_path, data) == ["accounts.fleet-eu.username: must not be empty"]


@pytest.mark.parametrize(
    "digest",
    [DIGEST, DIGEST.upper(), f"sha256:{DIGEST}", f"SHA256:{DIGEST.upper()}", f" {DIGEST} "],
)
def test_caller_digest_is_normalised(tmp_path: Path, digest: str) -> None:
    """Digests with or without the sha256: prefix, in any case, compare equal."""
    data = config(callers={"billing": {"api_key_sha256": digest, "accounts": ["fleet-eu"]}})
    assert load(tmp_path, data).callers["billing"].key_digests() == (DIGEST,)


def test_generated_caller_key_digest_is_accepted(tmp_path: Path) -> None:
    """The second line of new-api-key can be pasted into the config as is."""
    _, digest = new_api_key()
    data = config(callers={"billing": {"api_key_sha256": digest, "accounts": ["*"]}})
    digests = load(tmp_path, data).callers["billing"].key_digests()
    assert digests == (digest.removeprefix("sha256:"),)


@pytest.mark.parametrize("digest", ["sha256:abc", "g" * 64, "md5:" + DIGEST, DIGEST + "00"])
def test_malformed_caller_digest_is_a_problem(tmp_path: Path, digest: str) -> None:
    """A digest that is not 64 hex digits is refused without echoing it."""
    data = config(callers={"billing": {"api_key_sha256": digest, "accounts": ["*"]}})
    [problem] = problems(tmp_path, data)
    assert problem.startswith("callers.billing.api_key_sha256: must be 'sha256:' and 64 hex")
    assert digest not in problem


def test_caller_needs_a_digest_and_accounts(tmp_path: Path) -> None:
    """A caller without a key digest or with an empty account list is refused, both problems
    of one caller in the same run."""
    data = config(callers={"billing": {"accounts": []}, "ops": {"api_key_sha256": DIGEST}})
    assert problems(tmp_path, data) == [
        "callers.billing.accounts: list at least one account name, or '*' for all",
        "callers.billing.api_key_sha256: required (set api_key_sha256, api_key_sha256_file, "
        "client_subjects or service_accounts)",
        "callers.ops.accounts: required",
    ]


def test_caller_with_unknown_account_points_at_the_list_item(tmp_path: Path) -> None:
    """A caller granted an account that is not configured names the offending list item."""
    data = config(
        callers={"billing": {"api_key_sha256": DIGEST, "accounts": ["fleet-eu", "fleet-us"]}}
    )
    assert problems(tmp_path, data) == ["callers.billing.accounts[1]: unknown account 'fleet-us'"]


def test_two_callers_with_one_key_is_a_problem(tmp_path: Path) -> None:
    """Two callers sharing a key digest could not be told apart, so it is refused."""
    data = config(
        callers={
            "billing": {"api_key_sha256": DIGEST, "accounts": ["*"]},
            "ops": {"api_key_sha256": f"sha256:{DIGEST.upper()}", "accounts": ["*"]},
        }
    )
    assert problems(tmp_path, data) == [
        "callers.ops.api_key_sha256: same key as caller 'billing' (each caller needs its own)"
    ]


def test_caller_may_have_several_digests(tmp_path: Path) -> None:
    """A list of digests (old and new key while rotating) is normalised like a single one and
    kept in order; repr shows none of them."""
    digests = [f"sha256:{DIGEST}", NEW_DIGEST.upper()]
    data = config(callers={"billing": {"api_key_sha256": digests, "accounts": ["fleet-eu"]}})
    caller = load(tmp_path, data).callers["billing"]
    assert caller.key_digests() == (DIGEST, NEW_DIGEST)
    assert DIGEST[:12] not in repr(caller)
    assert NEW_DIGEST[:12] not in repr(caller)


def test_bad_digest_in_a_list_names_its_index(tmp_path: Path) -> None:
    """Each digest of a list is checked; a problem names its index, never the value."""
    bad = ["sha256:abc", "g" * 64]
    digests = [DIGEST, bad[0], NEW_DIGEST, bad[1]]
    data = config(callers={"billing": {"api_key_sha256": digests, "accounts": ["*"]}})
    found = problems(tmp_path, data)
    assert found == [
        f"callers.billing.api_key_sha256[{index}]: must be 'sha256:' and 64 hex digits "
        "(see new-api-key)"
        for index in (1, 3)
    ]
    assert not [value for value in bad for problem in found if value in problem]


def test_repeated_digest_within_a_caller_is_a_problem(tmp_path: Path) -> None:
    """The same digest twice in one caller (however written) is a mistake, named by index."""
    digests = [DIGEST, NEW_DIGEST, f"SHA256:{DIGEST.upper()}"]
    data = config(callers={"billing": {"api_key_sha256": digests, "accounts": ["*"]}})
    assert problems(tmp_path, data) == [
        "callers.billing.api_key_sha256[2]: same digest as api_key_sha256[0]"
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([], "api_key_sha256: list at least one digest (several only while rotating a key)"),
        ([DIGEST, 7], "api_key_sha256[1]: must be a string"),
        ({"sha256": DIGEST}, "api_key_sha256: must be a digest or a list of digests"),
        ([""], "api_key_sha256[0]: must be 'sha256:' and 64 hex digits (see new-api-key)"),
    ],
    ids=["empty-list", "not-a-string", "mapping", "empty-string"],
)
def test_empty_or_mistyped_digest_list_is_a_problem(
    tmp_path: Path, value: Any, problem: str
) -> None:
    """An empty list configures no key at all, so it is refused like a missing digest."""
    data = config(callers={"billing": {"api_key_sha256": value, "accounts": ["*"]}})
    assert problems(tmp_path, data) == [f"callers.billing.{problem}"]


def test_digest_list_and_file_together_is_a_problem(tmp_path: Path) -> None:
    """A list inline and a file of digests are as ambiguous as one digest and a file."""
    digests = secret_file(tmp_path, "digests", f"{DIGEST}\n{NEW_DIGEST}\n")
    data = config(
        callers={
            "billing": {
                "api_key_sha256": [DIGEST, NEW_DIGEST],
                "api_key_sha256_file": digests,
                "accounts": ["*"],
            }
        }
    )
    assert problems(tmp_path, data) == [
        "callers.billing.api_key_sha256_file: set either api_key_sha256 or "
        "api_key_sha256_file, not both"
    ]


def test_digest_shared_by_two_callers_is_one_problem_per_digest(tmp_path: Path) -> None:
    """A digest in two callers' lists is refused once for each digest shared, at its index
    (or line) in the later caller; the caller's other digests are fine."""
    third = "ef" * 32
    fourth = "01" * 32
    shared_file = secret_file(tmp_path, "ops", f"{fourth}\n{third}\n")
    data = config(
        callers={
            "billing": {"api_key_sha256": [DIGEST, NEW_DIGEST, third], "accounts": ["*"]},
            "ops": {"api_key_sha256": [f"sha256:{NEW_DIGEST}", fourth, DIGEST], "accounts": ["*"]},
            "audit": {"api_key_sha256_file": shared_file, "accounts": ["*"]},
        }
    )
    assert problems(tmp_path, data) == [
        "callers.ops.api_key_sha256[0]: same key as caller 'billing' (each caller needs its own)",
        "callers.ops.api_key_sha256[2]: same key as caller 'billing' (each caller needs its own)",
        "callers.audit.api_key_sha256_file: line 1: same key as caller 'ops' "
        "(each caller needs its own)",
        "callers.audit.api_key_sha256_file: line 2: same key as caller 'billing' "
        "(each caller needs its own)",
    ]


def test_caller_permissions(tmp_path: Path) -> None:
    """A caller may use exactly the listed accounts, or every account with '*'."""
    data = config(
        callers={
            "billing": {"api_key_sha256": DIGEST, "accounts": ["fleet-eu"]},
            "ops": {"api_key_sha256": "cd" * 32, "accounts": ["*"]},
        }
    )
    callers = load(tmp_path, data).callers
    assert callers["billing"].allows("fleet-eu")
    assert not callers["billing"].allows("fleet-us")
    assert callers["ops"].allows("fleet-us")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (config(redis_urll="memory://"), "redis_urll: unknown key"),
        (config(refresh={"fractoin": 0.5}), "refresh.fractoin: unknown key"),
        (config(upstream={"auth_rate": {"burst": 2}}), "upstream.auth_rate.burst: unknown key"),
        (config(_env_prefix="X_"), "_env_prefix: unknown key"),
        (config(upstream="v1"), "upstream: must be a mapping"),
    ],
)
def test_unknown_keys_are_problems(tmp_path: Path, data: dict[str, Any], problem: str) -> None:
    """Misspelt keys are errors at every level, not silently ignored."""
    assert problems(tmp_path, data) == [problem]


def test_unknown_key_in_an_account_is_a_problem(tmp_path: Path) -> None:
    """A misspelt account field is named with the account."""
    data = config()
    data["accounts"]["fleet-eu"]["pasword"] = PASSWORD
    assert problems(tmp_path, data) == ["accounts.fleet-eu.pasword: unknown key"]


def test_three_mistakes_give_three_problem_lines(tmp_path: Path) -> None:
    """Every mistake is reported in one run, one line each, naming its path."""
    data = config(upstream={"timeout_seconds": 0}, refresh={"fractoin": 0.5})
    data["accounts"]["fleet-eu"] = {"username": "u", "password_file": "/no/such/file"}
    assert problems(tmp_path, data) == [
        "upstream.timeout_seconds: must be greater than 0",
        "refresh.fractoin: unknown key",
        "accounts.fleet-eu.password_file: cannot read /no/such/file (No such file or directory)",
    ]


# --- secrets stay secret ----------------------------------------------------------------------


def test_problems_and_repr_never_show_secrets(tmp_path: Path) -> None:
    """Neither problem lines nor repr(settings) reveal passwords, Redis URLs or digests."""
    secrets = [PASSWORD, OTHER_PASSWORD, REDIS_PASSWORD, DIGEST, KEY_LINE.split(":")[1]]
    good = config(redis_url=f"redis://:{REDIS_PASSWORD}@db:6379/0", encryption_keys=KEY_LINE)
    good["accounts"]["fleet-us"] = {"username": "u", "password": OTHER_PASSWORD}
    good["callers"] = {"billing": {"api_key_sha256": DIGEST, "accounts": ["*"]}}
    settings = load(tmp_path, good)
    shown = [repr(settings), str(settings), repr(settings.accounts_resolved())]
    shown.append(repr(settings.encryption_key_ring()))

    bad = config(
        redis_url=f"http://:{REDIS_PASSWORD}@db",
        encryption_keys=KEY_LINE + "x",
        callers={"billing": {"api_key_sha256": DIGEST[:-1], "accounts": ["*"]}},
    )
    bad["accounts"]["fleet-eu"]["password"] = [PASSWORD]
    bad["accounts"]["fleet-us"] = {"username": "u", "password": {OTHER_PASSWORD: 1}}
    shown += problems(tmp_path, bad)
    shown += problems(tmp_path, config(encryption_keys=KEY_LINE[:-2]))
    assert len(shown) > 4
    assert not [secret for secret in secrets for text in shown if secret[:12] in text]


def test_raw_validation_error_hides_input() -> None:
    """Code that builds Settings directly and logs the error still never logs a password."""
    fields: dict[str, Any] = {"accounts": {"fleet-eu": {"username": "u", "password": [PASSWORD]}}}
    with pytest.raises(ValidationError) as caught:
        Settings(**fields)
    assert "accounts.fleet-eu.password" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_yaml_error_does_not_quote_the_offending_line(tmp_path: Path) -> None:
    """A YAML syntax error gives file, line and column but not the line's (secret) text."""
    path = tmp_path / "config.yaml"
    path.write_text(f"accounts:\n  fleet-eu:\n    password: {PASSWORD}: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: line 3, column ")
    assert PASSWORD not in problem


# --- the file itself --------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    """Unbalanced brackets are reported with their position in the file."""
    path = tmp_path / "config.yaml"
    path.write_text("redis_url: memory://\naccounts: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [
        f"{path}: line 3, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 2, column 11)"
    ]


def test_duplicate_yaml_key_is_a_problem(tmp_path: Path) -> None:
    """A key given twice is refused instead of the last one silently winning."""
    path = tmp_path / "config.yaml"
    path.write_text("accounts:\n  a: {}\n  a: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: line 3, column 3: duplicate key 'a'"]


def test_libyaml_and_python_parsers_read_a_config_alike() -> None:
    """The config is parsed by libyaml when PyYAML has it: the same data and the same line for
    every key as PyYAML's own parser (anchors, flow and block styles, quoting, comments)."""
    text = (
        "# comment\n"
        "redis_url: 'memory://'\n"
        'defaults: {dialect: v1, password: &password "p: w#1"}\n'
        "accounts:\n"
        "  fleet-eu:\n"
        "    password: *password\n"
        "    username: eu@example.com  # trailing\n"
        "  fleet-us: {username: us, password: x, timeout_seconds: 2.5}\n"
        "callers:\n"
        "  ops:\n"
        "    accounts:\n"
        "      - fleet-eu\n"
        "      - '*'\n"
        "    note: |\n"
        "      two\n"
        "      lines\n"
        "empty: ~\n"
        "flags: [yes, no, on, 0x10, 1_000, 2001-12-14]\n"
    )
    fast, fast_node = loading._parse_yaml(text)
    slow, slow_node = loading._parse_with(loading._UniqueKeyLoader, text)
    assert loading._FastLoader is not loading._UniqueKeyLoader  # PyYAML built with libyaml
    assert fast == slow

    def marks(node: yaml.Node) -> list[tuple[str, int, int]]:
        found = [(node.tag, node.start_mark.line, node.start_mark.column)]
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                found += marks(key) + marks(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                found += marks(item)
        return found

    assert fast_node is not None
    assert slow_node is not None
    assert marks(fast_node) == marks(slow_node)


@pytest.mark.parametrize(("content", "kind"), [(["a"], "list"), ("text", "scalar")])
def test_top_level_must_be_a_mapping(tmp_path: Path, content: Any, kind: str) -> None:
    """A file whose top level is a list or a scalar is refused."""
    path = write(tmp_path, content, name=f"{kind}.yaml")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: the top level must be a mapping of settings"]


def test_missing_config_file_is_a_problem(tmp_path: Path) -> None:
    """A config path that does not exist gives one clear line, not a traceback."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: cannot read (No such file or directory)"]


def test_empty_file_relies_on_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty file is an empty mapping: everything may come from the environment."""
    path = tmp_path / "config.yaml"
    path.write_text("# all from env\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [
        "accounts: at least one account is required",
        "encryption_keys_file: required when redis_url is a real Redis (replicas must share "
        "keys); create one with `monogoto-broker new-encryption-key > FILE`",
    ]
    monkeypatch.setenv("BROKER_REDIS_URL", "memory://")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET-EU__USERNAME", "u")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET-EU__PASSWORD", PASSWORD)
    assert load_settings(path).account("fleet-eu").password.get_secret_value() == PASSWORD


def test_build_settings_validates_a_mapping() -> None:
    """Programmatic configs (e.g. the dev command) get the same checks and problem lines."""
    assert build_settings(config()).account("fleet-eu").username == "ops@example.com"
    with pytest.raises(ConfigError) as caught:
        build_settings({**config(), 3: "x"})
    assert caught.value.problems == ["3: unknown key"]


def test_a_caller_may_be_an_admin_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`admin` is off unless set; `true` in YAML or BROKER_CALLERS__<NAME>__ADMIN turns it on,
    and a value that is not a flag is a problem."""
    callers = {
        "billing": {"api_key_sha256": DIGEST, "accounts": ["fleet-eu"]},
        "ops": {"api_key_sha256": DIGEST.replace("a", "b"), "accounts": ["*"], "admin": True},
    }
    settings = load(tmp_path, config(callers=callers))
    assert (settings.callers["billing"].admin, settings.callers["ops"].admin) == (False, True)
    monkeypatch.setenv("BROKER_CALLERS__BILLING__ADMIN", "true")
    assert load(tmp_path, config(callers=callers)).callers["billing"].admin is True
    monkeypatch.setenv("BROKER_CALLERS__BILLING__ADMIN", "sometimes")
    [problem] = problems(tmp_path, config(callers=callers))
    assert "admin" in problem
