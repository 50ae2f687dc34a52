"""Reading the YAML file, merging `BROKER_*` overrides and turning failures into `ConfigError`."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from service.config.settings import Settings
from service.config.sources import (
    CONFIG_ENV,
    Origins,
    file_origins,
    merge,
    read_environment,
    unknown_settings,
)

__all__ = [
    "CONFIG_ENV",
    "ConfigCheck",
    "ConfigError",
    "Problem",
    "build_settings",
    "check_config",
    "config_path_from_env",
    "load_settings",
]


@dataclass(frozen=True)
class Problem:
    """One mistake, `path.to.field: what is wrong`, and where the value came from if that is
    known: `config.yaml line 12` or the environment variable `BROKER_UPSTREAM__TIMEOUT`."""

    text: str
    source: str | None = None

    def __str__(self) -> str:
        return self.text if self.source is None else f"{self.text} (from {self.source})"


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per mistake, `report` the same
    lines saying where each value came from, `warnings` what is suspicious though valid."""

    def __init__(self, problems: Sequence[str | Problem], warnings: Sequence[str] = ()) -> None:
        # One line each, whatever a YAML or OS message contained.
        self.details = [
            Problem(_one_line(problem.text), problem.source and _one_line(problem.source))
            if isinstance(problem, Problem)
            else Problem(_one_line(problem))
            for problem in problems
        ]
        self.problems = [problem.text for problem in self.details]
        self.report = [str(problem) for problem in self.details]
        self.warnings = [_one_line(warning) for warning in warnings]
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ConfigCheck:
    """A valid configuration and the warnings about it (`check-config` prints them)."""

    settings: Settings
    warnings: list[str]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def config_path_from_env() -> Path | None:
    """The config file named by `BROKER_CONFIG`, if set."""
    value = os.environ.get(CONFIG_ENV, "")
    return Path(value) if value else None


def load_settings(path: Path) -> Settings:
    """Read the YAML file at `path`, apply `BROKER_*` overrides and validate; raises ConfigError."""
    return check_config(path).settings


def check_config(path: Path) -> ConfigCheck:
    """`load_settings` with what `check-config` prints besides: the warnings, and (in the
    ConfigError's `report`) the file line or environment variable behind each problem."""
    data, node = _read_document(path)
    return _build(data, file_origins(node, str(path)), str(path))


def build_settings(data: Mapping[Any, Any]) -> Settings:
    """Validate a config file's top-level mapping plus `BROKER_*` overrides; raises ConfigError."""
    return _build(data, Origins(), None).settings


def _build(data: Mapping[Any, Any], origins: Origins, file: str | None) -> ConfigCheck:
    problems = [Problem(problem) for problem in unknown_settings(os.environ)]
    fields: dict[str, Any] = {}
    for key, value in data.items():
        # Underscore keys would reach BaseSettings' own options (`_env_prefix`, ...).
        if isinstance(key, str) and not key.startswith("_"):
            fields[key] = copy.deepcopy(value)
        else:
            problems.append(Problem(f"{key}: unknown key", origins.of((str(key),))))
    environment = read_environment(os.environ, fields, file)
    problems += [Problem(problem) for problem in environment.problems]
    merge(fields, environment, origins)
    try:
        settings = Settings(**fields)
    except ValidationError as error:
        problems += [_describe(detail, origins) for detail in error.errors(include_input=False)]
    if problems:
        raise ConfigError(problems, environment.warnings)
    return ConfigCheck(settings, environment.warnings)


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """SafeConstructor that rejects duplicate keys instead of silently keeping the last one."""

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


class _UniqueKeyLoader(yaml.SafeLoader, _UniqueKeys):
    """SafeLoader (PyYAML's own parser, in Python) with `_UniqueKeys`."""


class _CUniqueKeyLoader(yaml.CSafeLoader, _UniqueKeys):
    """CSafeLoader (libyaml's parser) with `_UniqueKeys`: several times faster than
    `_UniqueKeyLoader` on a config of many accounts, and without the garbage of the parser in
    Python, which stays in the process's memory once freed."""


# PyYAML built without libyaml has no CSafeLoader that works.
_FastLoader: type[Any] = _CUniqueKeyLoader if yaml.__with_libyaml__ else _UniqueKeyLoader


def _read_yaml(path: Path) -> Mapping[Any, Any]:
    return _read_document(path)[0]


def _read_document(path: Path) -> tuple[Mapping[Any, Any], yaml.Node | None]:
    """The file's top-level mapping and its YAML node (which knows the line of every key)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read ({error.strerror or 'unreadable'})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data, node = _parse_yaml(text)
    except yaml.MarkedYAMLError as error:
        raise ConfigError([f"{path}: {_yaml_problem(error)}"]) from None
    except yaml.reader.ReaderError as error:
        raise ConfigError([f"{path}: position {error.position}: {error.reason}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{path}: not valid YAML"]) from None
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of settings"])
    return data, node


def _parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    try:
        return _parse_with(_FastLoader, text)
    except yaml.YAMLError:
        if _FastLoader is _UniqueKeyLoader:
            raise
    # A document libyaml refuses is parsed again by PyYAML's own parser, whose verdict and
    # messages (file positions, never the text) are the ones documented.
    return _parse_with(_UniqueKeyLoader, text)


def _parse_with(loader_class: type[Any], text: str) -> tuple[Any, yaml.Node | None]:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
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
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
}


def _describe(detail: ErrorDetails, origins: Origins) -> Problem:
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
    return Problem(f"{path or 'config'}: {text}", origins.of(detail["loc"]))
