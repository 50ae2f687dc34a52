"""Configuration files written by the tests, and what `load_settings` makes of them
(importable as `tests.config_files`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ConfigError, Settings, load_settings


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    """`data` as YAML (keys in the order given) in `tmp_path`/`name`."""
    return write_text(tmp_path, yaml.safe_dump(data, sort_keys=False), name)


def write_text(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """`text` as it is in `tmp_path`/`name`."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, data: Any) -> Settings:
    """The settings of `data` written to config.yaml."""
    return load_settings(write(tmp_path, data))


def problems(tmp_path: Path, data: Any) -> list[str]:
    """The problems `load_settings` refuses `data` written to config.yaml with."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data)
    return caught.value.problems
