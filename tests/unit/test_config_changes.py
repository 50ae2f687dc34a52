"""`service.config.changes`: what a reload may apply live and what needs a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config import build_settings, compare, secret_files
from service.keys import new_api_key, new_encryption_key

_KEYS = new_encryption_key()
_DIGEST = new_api_key()[1]


def _config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "redis_url": "redis://127.0.0.1:6379/0",
        "encryption_keys": _KEYS,
        "accounts": {"fleet-eu": {"username": "ops@example.com", "password": "one"}},
        "callers": {"billing": {"api_key_sha256": _DIGEST, "accounts": ["fleet-eu"]}},
    }
    return config | changes


def test_the_same_config_is_no_change() -> None:
    """Two loads of one config differ in nothing."""
    assert not compare(build_settings(_config()), build_settings(_config()))


def test_settings_that_need_a_restart_are_named() -> None:
    """The Redis URL, key prefix and metrics port are named as needing a restart."""
    new = _config(redis_url="redis://other:6379/0", key_prefix="other", metrics_port=9090)
    change = compare(build_settings(_config()), build_settings(new))
    assert change.restart == ["redis_url", "key_prefix", "metrics_port"]


def test_an_accounts_login_needs_a_restart_but_its_password_does_not() -> None:
    """Another username or dialect of a kept account needs a restart; another password and
    timeout are live, and so are accounts added and removed."""
    old = build_settings(_config())
    accounts = {
        "fleet-eu": {"username": "ops@example.com", "password": "two", "timeout_seconds": 3},
        "fleet-us": {"username": "us@example.com", "password": "x"},
    }
    change = compare(old, build_settings(_config(accounts=accounts)))
    assert change.restart == []
    assert change.passwords_changed == ["fleet-eu"]
    assert change.accounts_changed == ["fleet-eu"]
    assert change.accounts_added == ["fleet-us"]
    moved = {"fleet-eu": {"username": "other@example.com", "password": "one", "dialect": "v1"}}
    change = compare(old, build_settings(_config(accounts=moved)))
    assert change.restart == [
        "accounts.fleet-eu.username",
        "accounts.fleet-eu.dialect",
        "accounts.fleet-eu.base_url",
    ]


def test_callers_sections_and_the_key_ring_are_live() -> None:
    """A rotated caller key, a new caller, other refresh settings and a new key ring are
    named as live changes."""
    new = _config(
        callers={
            "billing": {"api_key_sha256": [_DIGEST, new_api_key()[1]], "accounts": ["*"]},
            "ops": {"api_key_sha256": new_api_key()[1], "accounts": ["*"]},
        },
        refresh={"fraction": 0.5},
        encryption_keys=f"{new_encryption_key()},{_KEYS}",
    )
    change = compare(build_settings(_config()), build_settings(new))
    assert change.restart == []
    assert change.callers_changed == ["billing"]
    assert change.callers_added == ["ops"]
    assert change.sections == ["refresh", "encryption_keys"]
    assert change.summary() == {
        "callers_added": ["ops"],
        "callers_changed": ["billing"],
        "sections": ["refresh", "encryption_keys"],
    }


def test_every_file_a_config_names_is_watched(tmp_path: Path) -> None:
    """`secret_files` lists the `*_file` settings of every level."""
    files = {name: tmp_path / name for name in ("keys", "password", "digests")}
    files["keys"].write_text(_KEYS)
    files["password"].write_text("one")
    files["digests"].write_text(_DIGEST)
    config = _config(
        encryption_keys=None,
        encryption_keys_file=str(files["keys"]),
        accounts={"fleet-eu": {"username": "u", "password_file": str(files["password"])}},
        callers={"billing": {"api_key_sha256_file": str(files["digests"]), "accounts": ["*"]}},
    )
    del config["encryption_keys"]
    assert secret_files(build_settings(config)) == list(files.values())
