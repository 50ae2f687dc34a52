"""Fixtures of every unit test."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate every test from BROKER_* variables of the surrounding shell."""
    for name in list(os.environ):
        if name.upper().startswith("BROKER_"):
            monkeypatch.delenv(name)
