"""What differs between two valid configurations, for a reload: what can be applied to a
running broker and which settings would need a restart."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service.config.models import CallerSettings
from service.config.settings import Settings

# Settings a running broker cannot take: its store connection and key names, and what the
# server was started with (the listener's TLS, the metrics port). The TLS certificate files
# themselves are reloaded by `service.tls` when they change.
RESTART_SETTINGS = ("redis_url", "key_prefix", "metrics_port", "tls")
# An account's identity: the store holds its tokens under its name, so these belong to the
# login that obtained them (a new login of another user goes under a new account name).
ACCOUNT_IDENTITY = ("username", "dialect", "base_url")
# Sections applied as a whole, by name.
LIVE_SECTIONS = ("upstream", "refresh", "api")
# What `compare` looks at itself; any other setting (e.g. `caller_auth`, whose JWKS reader runs
# for the process's lifetime) needs a restart when it changes.
_COMPARED = {
    *RESTART_SETTINGS,
    *LIVE_SECTIONS,
    "redis_url_file",
    "encryption_keys",
    "encryption_keys_file",
    "accounts",
    "callers",
}


@dataclass(frozen=True)
class ConfigChange:
    """The difference between a running configuration and a new one, by name only (never a
    secret): `restart` lists the settings that cannot change live."""

    restart: list[str] = field(default_factory=list)
    accounts_added: list[str] = field(default_factory=list)
    accounts_removed: list[str] = field(default_factory=list)
    # Accounts whose password changed (their username cannot, see ACCOUNT_IDENTITY).
    passwords_changed: list[str] = field(default_factory=list)
    # Accounts whose other settings changed (a timeout).
    accounts_changed: list[str] = field(default_factory=list)
    callers_added: list[str] = field(default_factory=list)
    callers_removed: list[str] = field(default_factory=list)
    # Callers whose keys, client subjects, ServiceAccounts or accounts changed.
    callers_changed: list[str] = field(default_factory=list)
    # Whole settings that changed: `upstream`, `refresh`, `api`, `encryption_keys`.
    sections: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.summary().values()) or bool(self.restart)

    def summary(self) -> dict[str, list[str]]:
        """What changed, for the log: each non-empty list by its name."""
        parts = {
            "accounts_added": self.accounts_added,
            "accounts_removed": self.accounts_removed,
            "passwords_changed": self.passwords_changed,
            "accounts_changed": self.accounts_changed,
            "callers_added": self.callers_added,
            "callers_removed": self.callers_removed,
            "callers_changed": self.callers_changed,
            "sections": self.sections,
        }
        return {name: names for name, names in parts.items() if names}


def restart_settings() -> list[str]:
    """Every top-level setting a running broker cannot take: RESTART_SETTINGS, then any other
    that `compare` does not look at itself (an account's identity aside, ACCOUNT_IDENTITY)."""
    return [*RESTART_SETTINGS, *(name for name in Settings.model_fields if name not in _COMPARED)]


def compare(old: Settings, new: Settings) -> ConfigChange:
    """How `new` differs from `old`; both validated (their secrets read)."""
    restart = [name for name in restart_settings() if _value(old, name) != _value(new, name)]
    old_accounts, new_accounts = old.accounts_resolved(), new.accounts_resolved()
    kept = [name for name in new_accounts if name in old_accounts]
    for name in kept:
        restart += [
            f"accounts.{name}.{part}"
            for part in ACCOUNT_IDENTITY
            if getattr(old_accounts[name], part) != getattr(new_accounts[name], part)
        ]
    passwords = [
        name
        for name in kept
        if old_accounts[name].password.get_secret_value()
        != new_accounts[name].password.get_secret_value()
    ]
    accounts = [
        name
        for name in kept
        if old_accounts[name].timeout_seconds != new_accounts[name].timeout_seconds
    ]
    callers = [
        name
        for name in new.callers
        if name in old.callers and _caller(old.callers[name]) != _caller(new.callers[name])
    ]
    sections = [name for name in LIVE_SECTIONS if getattr(old, name) != getattr(new, name)]
    if _ring(old) != _ring(new):
        sections.append("encryption_keys")
    return ConfigChange(
        restart=restart,
        accounts_added=_added(old_accounts, new_accounts),
        accounts_removed=_added(new_accounts, old_accounts),
        passwords_changed=passwords,
        accounts_changed=accounts,
        callers_added=_added(old.callers, new.callers),
        callers_removed=_added(new.callers, old.callers),
        callers_changed=callers,
        sections=sections,
    )


def secret_files(settings: Settings) -> list[Path]:
    """Every file a setting names (`*_file`, at any level): what a reload must watch."""
    return list(_files(settings))


def _files(model: BaseModel) -> Iterator[Path]:
    for name, value in model:
        if name.endswith("_file") and isinstance(value, Path):
            yield value
        for item in value.values() if isinstance(value, Mapping) else [value]:
            if isinstance(item, BaseModel):
                yield from _files(item)


def _added(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [name for name in new if name not in old]


def _value(settings: Settings, name: str) -> Any:
    value = getattr(settings, name)
    return value.get_secret_value() if name == "redis_url" else value


def _caller(caller: CallerSettings) -> tuple[Any, ...]:
    return (
        caller.key_digests(),
        caller.client_subjects,
        caller.service_accounts,
        sorted(caller.accounts),
    )


def _ring(settings: Settings) -> list[tuple[str, bytes]]:
    return [(key.kid, key.key) for key in settings.encryption_key_ring()]
