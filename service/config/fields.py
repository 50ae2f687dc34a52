"""Field types and checks shared by the config models, and reading secrets from files."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ModelWrapValidatorHandler,
    SecretStr,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Kubernetes names: a namespace is a DNS label, a ServiceAccount a DNS subdomain (labels
# joined by dots, 253 characters at most).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_MAX_DNS_SUBDOMAIN = 253

Loc: TypeAlias = tuple[str | int, ...]
Problems: TypeAlias = list[tuple[Loc, str]]
Model = TypeVar("Model", bound=BaseModel)


def _check_name(name: str) -> str:
    # Names end up in Redis hash tags and metric labels, so keep them tame.
    if not _NAME.fullmatch(name):
        raise ValueError(
            "invalid name: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return name


def _check_key_prefix(prefix: str) -> str:
    if not prefix or any(c.isspace() or c in "{}" for c in prefix):
        raise ValueError("must be non-empty, without whitespace, '{' or '}'")
    return prefix


def _check_base_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return url.rstrip("/")


def _check_service_account(name: str) -> str:
    namespace, _, account = name.partition("/")
    if not (
        _DNS_LABEL.fullmatch(namespace)
        and len(account) <= _MAX_DNS_SUBDOMAIN
        and all(_DNS_LABEL.fullmatch(label) for label in account.split("."))
    ):
        raise ValueError(
            "must be 'namespace/name' of a Kubernetes ServiceAccount (lowercase a-z, 0-9, '-'; "
            "the name may also hold '.')"
        )
    return name


Name = Annotated[str, AfterValidator(_check_name)]
ServiceAccountName = Annotated[str, AfterValidator(_check_service_account)]
BaseUrl = Annotated[str, AfterValidator(_check_base_url)]
KeyPrefix = Annotated[str, AfterValidator(_check_key_prefix)]


def raise_problems(problems: Problems, errors: Sequence[ErrorDetails] = ()) -> None:
    """Report several problems at once, each at its own location below the current model,
    after `errors` (problems pydantic found in the fields, kept as they are)."""
    if problems or errors:
        raise ValidationError.from_exception_data(
            "config",
            [
                *(
                    InitErrorDetails(
                        type=PydanticCustomError(error["type"], error["msg"], error.get("ctx")),
                        loc=error["loc"],
                        input=None,
                    )
                    for error in errors
                ),
                *(
                    InitErrorDetails(
                        type=PydanticCustomError("config", "{message}", {"message": text}),
                        loc=loc,
                        input=None,
                    )
                    for loc, text in problems
                ),
            ],
            hide_input=True,
        )


def errors_below(errors: Sequence[ErrorDetails], *loc: str | int) -> list[ErrorDetails]:
    """The errors at or below `loc`, with their locations relative to it."""
    return [
        {**error, "loc": error["loc"][len(loc) :]}
        for error in errors
        if error["loc"][: len(loc)] == loc
    ]


@cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    annotation: Any = model.model_fields[name].annotation
    return TypeAdapter(annotation)


def valid_part(
    model: type[Model], data: object, errors: Sequence[ErrorDetails], names: Collection[str]
) -> Model | None:
    """An incomplete `model` holding only its fields `names`, taken from the raw `data`, for a
    check that combines them while other fields are invalid; None if one of them is invalid
    (`errors` already names it) or `data` is not a mapping."""
    if not isinstance(data, Mapping) or any(
        error["loc"][:1] and error["loc"][0] in names for error in errors
    ):
        return None
    values: dict[str, Any] = {}
    for name in names:
        if name in data:
            try:
                values[name] = _field_adapter(model, name).validate_python(data[name])
            except ValidationError:
                return None
    return model.model_construct(_fields_set=set(values), **values)


def check_fields(
    model: type[Model],
    data: object,
    handler: ModelWrapValidatorHandler[Model],
    checks: Mapping[tuple[str, ...], Callable[[Model], Problems]],
) -> Model:
    """Validate `data` (the body of a wrap model validator), then run `checks`, each a check
    combining the fields it is keyed by; report every problem at once. A check also runs when
    other fields are invalid, on its own fields as long as those are valid, so that one run
    lists both field problems and the problems found by combining fields."""
    if isinstance(data, model):
        return handler(data)
    try:
        validated = handler(data)
    except ValidationError as error:
        if not isinstance(data, Mapping):
            raise
        errors = error.errors()
        problems: Problems = []
        for names, check in checks.items():
            part = valid_part(model, data, errors, names)
            if part is not None:
                problems += check(part)
        raise_problems(problems, errors)
        raise  # not reached: there are errors
    problems = [problem for check in checks.values() for problem in check(validated)]
    raise_problems(problems)
    return validated


def read_file(path: Path) -> str:
    """The text of `path` without its trailing newline; ValueError naming the path if it cannot
    be read, is not UTF-8 or is empty."""
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error.strerror or 'unreadable'})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def read_secret(
    model: BaseModel, name: str, problems: Problems, *, required: bool = True
) -> str | None:
    """Return the secret from field `name` or from the file its `<name>_file` twin names."""
    value: SecretStr | None = getattr(model, name)
    path: Path | None = getattr(model, f"{name}_file")
    where = name if path is None else f"{name}_file"
    try:
        if path is not None:
            if value is not None and name in model.model_fields_set:
                raise ValueError(f"set either {name} or {name}_file, not both")
            return read_file(path)
        if value is None:
            if required:
                raise ValueError(f"required (set {name} or {name}_file)")
            return None
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value.get_secret_value()
    except ValueError as error:
        problems.append(((where,), str(error)))
        return None
