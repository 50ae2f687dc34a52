"""Field types and checks shared by the config models, and reading secrets from files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, TypeAlias
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, SecretStr, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

Loc: TypeAlias = tuple[str | int, ...]


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


Name = Annotated[str, AfterValidator(_check_name)]
BaseUrl = Annotated[str, AfterValidator(_check_base_url)]
KeyPrefix = Annotated[str, AfterValidator(_check_key_prefix)]


def raise_problems(problems: list[tuple[Loc, str]]) -> None:
    """Report several problems at once, each at its own location below the current model."""
    if problems:
        raise ValidationError.from_exception_data(
            "config",
            [
                InitErrorDetails(
                    type=PydanticCustomError("config", "{message}", {"message": text}),
                    loc=loc,
                    input=None,
                )
                for loc, text in problems
            ],
        )


def _read_file(path: Path) -> str:
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
    model: BaseModel, name: str, problems: list[tuple[Loc, str]], *, required: bool = True
) -> str | None:
    """Return the secret from field `name` or from the file its `<name>_file` twin names."""
    value: SecretStr | None = getattr(model, name)
    path: Path | None = getattr(model, f"{name}_file")
    where = name if path is None else f"{name}_file"
    try:
        if path is not None:
            if value is not None and name in model.model_fields_set:
                raise ValueError(f"set either {name} or {name}_file, not both")
            return _read_file(path)
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
