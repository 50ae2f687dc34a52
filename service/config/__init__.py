"""Broker configuration: one YAML file overridden by `BROKER_*` environment variables.

`load_settings` is the entry point; every failure becomes a `ConfigError` holding one line per
problem (`path.to.field: what is wrong`) for an operator, never a secret nor a stack trace.
`check_config` is what `check-config` runs: the same, plus warnings and the source of each
problem (the file's line or the environment variable).
"""

from service.config.caller_auth import CallerAuthSettings, KubernetesAuthSettings
from service.config.changes import RESTART_SETTINGS, ConfigChange, compare, secret_files
from service.config.fields import BaseUrl, Name
from service.config.loading import (
    CONFIG_ENV,
    ConfigCheck,
    ConfigError,
    Problem,
    build_settings,
    check_config,
    config_path_from_env,
    load_settings,
)
from service.config.models import (
    ALL_ACCOUNTS,
    DEFAULT_BASE_URLS,
    Account,
    AccountSettings,
    AuditSettings,
    AuthRate,
    CallerSettings,
    Dialect,
    RefreshSettings,
    RetrySettings,
    TlsSettings,
    UpstreamSettings,
)
from service.config.settings import ENV_PREFIX, Settings

__all__ = [
    "ALL_ACCOUNTS",
    "CONFIG_ENV",
    "DEFAULT_BASE_URLS",
    "ENV_PREFIX",
    "RESTART_SETTINGS",
    "Account",
    "AccountSettings",
    "AuditSettings",
    "AuthRate",
    "BaseUrl",
    "CallerAuthSettings",
    "CallerSettings",
    "ConfigChange",
    "ConfigCheck",
    "ConfigError",
    "Dialect",
    "KubernetesAuthSettings",
    "Name",
    "Problem",
    "RefreshSettings",
    "RetrySettings",
    "Settings",
    "TlsSettings",
    "UpstreamSettings",
    "build_settings",
    "check_config",
    "compare",
    "config_path_from_env",
    "load_settings",
    "secret_files",
]
