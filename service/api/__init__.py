"""The broker's HTTP API (docs/api.md): caller authentication, tokens, accounts, operations."""

from service.api.app import create_app, create_app_from_env

__all__ = ["create_app", "create_app_from_env"]
