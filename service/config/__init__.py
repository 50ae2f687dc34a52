"""Broker configuration: one YAML file overridden by `BROKER_*` environment variables.

`load_settings` is the entry point; every failure becomes a `ConfigError` holding one line per
problem (`path.to.field: what is wrong`) for an operator, never a secret nor a stack trace.
"""

from service.config.fields import BaseUrl, Name
from service.config.loading import (
    CONFIG_ENV,
    ConfigError,
    build_settings,
    config_path_from_env,
    load_settings,
)
from service.config.models import (
    ALL_ACCOUNTS,
    DEFAULT_BASE_URLS,
    Account,
    AccountSettings,
    AuthRate,
    CallerSettings,
    Dialect,
    RefreshSettings,
    RetrySettings,
    UpstreamSettings,
)
from service.config.settings import ENV_PREFIX, Settings

__all__ = [
    "ALL_ACCOUNTS",
    "CONFIG_ENV",
    "DEFAULT_BASE_URLS",
    "ENV_PREFIX",
    "Account",
    "AccountSettings",
    "AuthRate",
    "BaseUrl",
    "CallerSettings",
    "ConfigError",
    "Dialect",
    "Name",
    "RefreshSettings",
    "RetrySettings",
    "Settings",
    "UpstreamSettings",
    "build_settings",
    "config_path_from_env",
    "load_settings",
]
