"""Reading the YAML file, merging `BROKER_*` overrides and turning failures into `ConfigError`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from service.config.settings import ENV_PREFIX, Settings

CONFIG_ENV = "BROKER_CONFIG"


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        # One line each, whatever a YAML or OS message contained.
        self.problems = [" ".join(problem.split()) for problem in problems]
        super().__init__("\n".join(self.problems))


def config_path_from_env() -> Path | None:
    """The config file named by `BROKER_CONFIG`, if set."""
    value = os.environ.get(CONFIG_ENV, "")
    return Path(value) if value else None


def load_settings(path: Path) -> Settings:
    """Read the YAML file at `path`, apply `BROKER_*` overrides and validate; raises ConfigError."""
    return build_settings(_read_yaml(path))


def build_settings(data: Mapping[Any, Any]) -> Settings:
    """Validate a config file's top-level mapping plus `BROKER_*` overrides; raises ConfigError."""
    problems = _unknown_env_overrides()
    fields: dict[str, Any] = {}
    for key, value in data.items():
        # Underscore keys would reach BaseSettings' own options (`_env_prefix`, ...).
        if isinstance(key, str) and not key.startswith("_"):
            fields[key] = value
        else:
            problems.append(f"{key}: unknown key")
    try:
        settings = Settings(**fields)
    except ValidationError as error:
        problems += [_describe(detail) for detail in error.errors(include_input=False)]
    except SettingsError as error:
        match = re.search(r'field "([^"]+)"', str(error))
        name = match.group(1) if match else "?"
        problems.append(
            f"{ENV_PREFIX}{name.upper()}*: a list or mapping given in an environment variable "
            """must be JSON, e.g. '["fleet-eu"]'"""
        )
    if problems:
        raise ConfigError(problems)
    return settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Mapping[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read ({error.strerror or 'unreadable'})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = _parse_yaml(text)
    except yaml.MarkedYAMLError as error:
        raise ConfigError([f"{path}: {_yaml_problem(error)}"]) from None
    except yaml.reader.ReaderError as error:
        raise ConfigError([f"{path}: position {error.position}: {error.reason}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{path}: not valid YAML"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of settings"])
    return data


def _parse_yaml(text: str) -> Any:
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    # Only messages and positions: str(error) quotes the line, which may hold a secret.
    def at(mark: yaml.Mark | None) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"

    if error.problem is None:
        return f"{at(error.context_mark)}: {error.context}"
    text = f"{at(error.problem_mark)}: {error.problem}"
    if error.context and error.context_mark:
        text += f" ({error.context} at {at(error.context_mark)})"
    return text


def _unknown_env_overrides() -> list[str]:
    # pydantic-settings ignores variables that match no field; a typo must not go unnoticed.
    problems = []
    for name in os.environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper != CONFIG_ENV:
            field = upper.removeprefix(ENV_PREFIX).split("__", 1)[0].lower()
            if field not in Settings.model_fields:
                problems.append(f"{name}: unknown setting {field!r} (environment variable)")
    return sorted(problems)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "greater_than": "must be greater than {gt:g}",
    "greater_than_equal": "must be at least {ge:g}",
    "less_than": "must be less than {lt:g}",
    "less_than_equal": "must be at most {le:g}",
    "finite_number": "must be a finite number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "string_type": "must be a string",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "enum": "must be {expected}",
    "path_type": "must be a file path",
}


def _describe(detail: ErrorDetails) -> str:
    """One problem line; built from the error type, never from the (possibly secret) input."""
    path = ""
    for part in detail["loc"]:
        if part == "[key]":  # the dict key itself is wrong; its path already names it
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    kind, ctx = detail["type"], detail.get("ctx", {})
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        text = str(ctx["error"])
    else:
        try:
            text = _MESSAGES[kind].format_map(ctx)
        except KeyError:
            text = detail["msg"]
    return f"{path or 'config'}: {text}"
