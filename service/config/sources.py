"""Where the configuration's values come from: the YAML file, and the `BROKER_*` environment
variables merged over it (docs/configuration.md, "Environment overrides").

`Origins` remembers the source of every place of the merged configuration (`config.yaml line
12`, `BROKER_UPSTREAM__TIMEOUT`) so that a problem can say where its value was given.
`read_environment` turns the variables into `Override`s: names lowercased, `__` between levels,
JSON where a list or mapping is expected, and an account or caller named as in the file when
the variable spells the file's `-` as `_` (a variable name cannot hold `-` in a shell).
`merge` applies them to the file's values: nested mappings are merged, and a secret set by a
variable replaces its `*_file` twin from the file (or the twin, the secret).
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from service.config.fields import Loc
from service.config.settings import ENV_PREFIX, Settings

CONFIG_ENV = "BROKER_CONFIG"
#: The mappings of named entries, with what one entry is called in a message.
ENTRY_SECTIONS = {"accounts": "account", "callers": "caller"}
_FILE_SUFFIX = "_file"

# A place in the configuration, each part as text: ("callers", "billing", "accounts", "1").
Place = tuple[str, ...]


class Origins:
    """The source of each place of the configuration: the file's line that gives it, or the
    environment variable that sets it (or that created the mapping it is in)."""

    def __init__(self) -> None:
        self._sources: dict[Place, str] = {}

    def set(self, place: Place, source: str) -> None:
        """`place` comes from `source`."""
        self._sources[place] = source

    def forget(self, place: Place) -> None:
        """`place` and everything below it are gone or replaced."""
        for known in [known for known in self._sources if known[: len(place)] == place]:
            del self._sources[known]

    def of(self, loc: Loc) -> str | None:
        """The source of the value at `loc` (a problem's location), or of the nearest mapping
        or list holding it; None if nothing there was given."""
        place = tuple(str(part) for part in loc if part != "[key]")
        for end in range(len(place), 0, -1):
            source = self._sources.get(place[:end])
            if source is not None:
                return source
        return None


def file_origins(node: yaml.Node | None, name: str) -> Origins:
    """The line (1-based) of every key and list item of the YAML document `node`, as
    `<name> line <n>`."""
    origins = Origins()

    def walk(node: yaml.Node, place: Place, depth: int) -> None:
        if depth > 32:  # an alias may refer to a mapping holding it
            return
        if isinstance(node, yaml.MappingNode):
            items = [(key.value, key, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            items = [(str(index), item, item) for index, item in enumerate(node.value)]
        else:
            return
        for part, marked, value in items:
            here = (*place, str(part))
            origins.set(here, f"{name} line {marked.start_mark.line + 1}")
            walk(value, here, depth + 1)

    if node is not None:
        walk(node, (), 0)
    return origins


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """One problem per `BROKER_*` variable naming no setting: a typo must not go unnoticed."""
    problems = []
    for name in environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper != CONFIG_ENV:
            setting = upper.removeprefix(ENV_PREFIX).split("__", 1)[0].lower()
            if setting not in Settings.model_fields:
                problems.append(f"{name}: unknown setting {setting!r} (environment variable)")
    return sorted(problems)


@dataclass(frozen=True)
class Override:
    """One environment variable: where it goes in the configuration and its value."""

    name: str
    place: Place
    value: Any


@dataclass
class Environment:
    """The overrides of the `BROKER_*` variables, and what was wrong with the others."""

    overrides: list[Override] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_environment(
    environ: Mapping[str, str], data: Mapping[Any, Any], file: str | None
) -> Environment:
    """The `BROKER_*` variables of `environ` as overrides of the file's values `data` (the
    file named `file`, if any): variables naming no setting are left to `unknown_settings`."""
    found = Environment()
    created: dict[Place, list[str]] = {}
    for name, text in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        place: Place = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        if place[0] not in Settings.model_fields:
            continue
        if "" in place:
            found.problems.append(f"{name}: an empty name between two '__'")
            continue
        place, problem = _entry_of(name, place, data, file)
        if problem:
            found.problems.append(problem)
            continue
        try:
            value = _decode(place, text)
        except ValueError as error:
            found.problems.append(f"{name}: {error}")
            continue
        clash = next((other for other in found.overrides if other.place == place), None)
        if clash is not None:
            found.problems.append(
                f"{'.'.join(place)}: set by both {clash.name} and {name}; keep one"
            )
            continue
        found.overrides.append(Override(name, place, value))
        for entry in _new_entries(place, value, data):
            created.setdefault(entry, []).append(name)
    found.overrides.sort(key=lambda override: len(override.place))
    found.warnings = [
        _created(section, entry, names, file) for (section, entry), names in created.items()
    ]
    return found


def _entry_of(
    name: str, place: Place, data: Mapping[Any, Any], file: str | None
) -> tuple[Place, str | None]:
    """`place` naming the file's account or caller that its entry name matches once `-` is
    read as `_`, with a problem if several match."""
    if place[0] not in ENTRY_SECTIONS or len(place) < 2:
        return place, None
    section, entry = place[0], place[1]
    names = _names(data, section)
    if entry in names:
        return place, None
    same = sorted(known for known in names if known.replace("-", "_") == entry.replace("-", "_"))
    if len(same) == 1:
        return (section, same[0], *place[2:]), None
    if same:
        kind = ENTRY_SECTIONS[section]
        return place, (
            f"{name}: matches both {kind}s {' and '.join(same)} of {file or 'the file'} once "
            "'-' is read as '_'; spell the name exactly (with its '-') or rename one"
        )
    return place, None


def _names(data: Mapping[Any, Any], section: str) -> list[str]:
    entries = data.get(section)
    if not isinstance(entries, Mapping):
        return []
    return [name for name in entries if isinstance(name, str)]


def _new_entries(place: Place, value: Any, data: Mapping[Any, Any]) -> Iterator[Place]:
    """The accounts or callers that the override of `place` with `value` adds to the file's."""
    if place[0] not in ENTRY_SECTIONS:
        return
    names = _names(data, place[0])
    if len(place) > 1:
        entries = [place[1]]
    else:
        entries = [str(name) for name in value] if isinstance(value, Mapping) else []
    for entry in entries:
        if entry not in names:
            yield place[0], entry


def _created(section: str, entry: str, names: list[str], file: str | None) -> str:
    text = f"{section}.{entry}: created by {', '.join(names)}, not in {file or 'the file'}"
    if "_" in entry:
        text += (
            f" (environment variables cannot spell '-': {section} named with '-' must be in "
            "the file, and then '_' in a variable stands for their '-')"
        )
    return text


def _decode(place: Place, text: str) -> Any:
    """The value of a variable for `place`: JSON where a list or mapping is expected (or may
    be given instead of text), else the text itself."""
    shapes = _shapes(_annotation_at(place))
    if True not in shapes:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        if False in shapes:  # text is also accepted: a single digest
            return text
        raise ValueError(
            "a list or mapping given in an environment variable must be JSON, "
            """e.g. '["fleet-eu"]'"""
        ) from None
    if False in shapes and not isinstance(value, list | dict):
        return text
    return value


def _annotation_at(place: Place) -> Any:
    """The type of the setting at `place`, None if there is none."""
    annotation: Any = Settings
    for part in place:
        annotation = _plain(annotation)
        members = [_plain(member) for member in _members(annotation)]
        models = [member for member in members if _is_model(member)]
        mappings = [member for member in members if get_origin(member) is dict]
        if models and part in models[0].model_fields:
            annotation = models[0].model_fields[part].annotation
        elif mappings:
            annotation = get_args(mappings[0])[1]
        else:
            return None
    return annotation


def _shapes(annotation: Any) -> set[bool]:
    """For each kind of value `annotation` accepts, whether it is a list or mapping."""
    return {
        _is_model(member) or get_origin(member) in (list, dict)
        for member in map(_plain, _members(annotation))
        if member is not type(None)
    }


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,) if annotation is not None else ()


def _plain(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def merge(data: dict[Any, Any], environment: Environment, origins: Origins) -> None:
    """Apply the overrides of `environment` to the file's values `data` (in place), noting
    their sources in `origins`."""
    _Merge(origins).apply(data, environment.overrides)


@dataclass
class _Merge:
    origins: Origins
    set_by_env: set[Place] = field(default_factory=set)

    def apply(self, data: dict[Any, Any], overrides: list[Override]) -> None:
        for override in overrides:
            node = data
            for depth, part in enumerate(override.place[:-1]):
                child = node.get(part)
                if not isinstance(child, dict):  # created (or replaced) by the variable
                    here = override.place[: depth + 1]
                    child = node[part] = {}
                    self.origins.forget(here)
                    self.origins.set(here, override.name)
                node = child
            self.put(node, override.place, override.value, override.name)

    def put(self, node: dict[Any, Any], place: Place, value: Any, name: str) -> None:
        key = place[-1]
        current = node.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            for inner_key, inner in value.items():
                self.put(current, (*place, str(inner_key)), inner, name)
            return
        node[key] = value
        self.origins.forget(place)
        self.note(place, value, name)
        self.set_by_env.add(place)
        # The environment wins over the file for a secret however the file gave it.
        twin = key.removesuffix(_FILE_SUFFIX) if key.endswith(_FILE_SUFFIX) else key + _FILE_SUFFIX
        twin_place = (*place[:-1], twin)
        if twin in node and not any(
            twin_place[:end] in self.set_by_env for end in range(1, len(place) + 1)
        ):
            del node[twin]
            self.origins.forget(twin_place)

    def note(self, place: Place, value: Any, name: str) -> None:
        self.origins.set(place, name)
        if isinstance(value, dict):
            for key, inner in value.items():
                self.note((*place, str(key)), inner, name)
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                self.note((*place, str(index)), inner, name)
