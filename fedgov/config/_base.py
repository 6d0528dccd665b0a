"""Shared pieces of fedgov's typed configuration: strict models, relative paths, TOML loading."""

from __future__ import annotations

import tomllib
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo

from fedgov.errors import ConfigError, Problem

__all__ = ["StrictModel", "ConfigPath", "load_toml", "parse_toml", "load_referenced", "validate_file", "problems_from_validation"]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the directory of the file it was written in."""
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        return (Path(base) / value).resolve()
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path in a configuration file; a relative one is taken from that file's directory."""


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def problems_from_validation(err: ValidationError, file: str) -> list[Problem]:
    """Turn a pydantic ValidationError into one Problem per error, with its location."""
    problems = []
    for e in err.errors(include_url=False):
        msg = e["msg"]
        # "secret": the value may hold a password (a database URL): the message never quotes it
        if e["type"] not in ("missing", "extra_forbidden", "secret") and "input" in e and not (e.get("ctx") or {}).get("input_shown"):
            shown = repr(e["input"])
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = f"{msg} (found {shown})"
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of the schema; check the spelling)"
        problems.append(Problem(file, _location(tuple(e["loc"])), msg))
    return problems


def load_referenced(loader: Callable[[Path], T], path: Path, *, by: Path | str, field: str) -> T:
    """Load a file that another configuration file names (a task's contract, say); when it
    cannot be loaded, the error also names the file and field that refer to it."""
    try:
        return loader(path)
    except ConfigError as exc:
        raise ConfigError(
            f"{by}: '{field}' names {path}, which cannot be used: {str(exc).splitlines()[0]}",
            [Problem(str(by), field, f"refers to {path}"), *exc.problems],
        ) from exc


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Configuration file not found: {p}", [Problem(str(p), "", "no such file")])
    return parse_toml(p.read_bytes(), p)


def parse_toml(raw: bytes, path: Path | str) -> dict[str, Any]:
    """The TOML text ``raw`` (read from ``path``), a syntax error as a ConfigError naming ``path``."""
    p = Path(path)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{p} is not valid TOML", [Problem(str(p), "", f"TOML syntax error: {exc}")]
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not UTF-8 text", [Problem(str(p), "", str(exc))]) from exc


def validate_file(model: type[M], path: Path | str, kind: str) -> M:
    """Load ``path`` as TOML and validate it as ``model``, listing every problem at once."""
    p = Path(path)
    data = load_toml(p)
    try:
        return model.model_validate(data, context={"base_dir": p.resolve().parent})
    except ValidationError as exc:
        problems = problems_from_validation(exc, str(p))
        raise ConfigError(f"Invalid {kind} file {p} ({len(problems)} problem(s)):", problems) from exc
