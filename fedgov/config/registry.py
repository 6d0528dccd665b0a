"""Organisation registries: which organisations a federation may name, and what they are called.

A federation's members are organisations, each named by a *code*. The default registry is
the 342 Dutch municipalities with their CBS codes (``GM0363`` Amsterdam; shipped as
``fedgov/resources/nl_gemeenten.csv``). Any other organisations (provinces, water boards,
safety regions, agencies abroad) come from a *registry file* that a federation names
(``registry = "orgs.csv"``): a CSV file with a header and the columns

==============  ========  ===================================================================
column          needed    meaning
==============  ========  ===================================================================
``code``        yes       the organisation's code (:data:`CODE_PATTERN`)
``name``        yes       its name, as reports, plots and the command line show it
``region``      no        a region it belongs to (a province, a country); empty: none
``population``  no        its population (a whole number); ``partition.kind = "population"``
                          splits a data set by it, so every member then needs one
==============  ========  ===================================================================

A code ends up in file and directory names (a simulated node's directory), node ids,
certificate and roster names, and keys of the node's ledger and state. So it is kept to a
safe syntax, :data:`CODE_PATTERN`: 1 to 64 ASCII letters, digits, ``_``, ``.`` and ``-``,
starting with a letter or digit (so never ``.``, ``..``, a path separator, a quote or white
space). Codes must be unique ignoring case, so that two organisations never share a
directory on a file system that ignores case.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from fedgov.errors import ConfigError, Problem

__all__ = [
    "CBS_CODE_PATTERN",
    "CODE_PATTERN",
    "COLUMNS",
    "Organisation",
    "Registry",
    "default_registry",
    "load_registry",
]

CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A safe organisation code: it is used in file names, node ids, certificate and ledger keys."""

CBS_CODE_PATTERN = r"^GM\d{4}$"
"""A CBS municipality code (the default registry's codes)."""

COLUMNS = ("code", "name", "region", "population")
"""The columns of a registry file; ``code`` and ``name`` are needed."""

_MAX_NAME = 200
_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Organisation:
    """One organisation of a registry."""

    code: str
    name: str
    region: str | None = None
    population: int | None = None


@dataclass(frozen=True)
class Registry:
    """The organisations a federation may name, by code, and where the list comes from."""

    path: Path
    organisations: Mapping[str, Organisation] = field(repr=False)
    default: bool = False

    def __contains__(self, code: object) -> bool:
        return code in self.organisations

    def __iter__(self) -> Iterator[Organisation]:
        return iter(self.organisations.values())

    def __len__(self) -> int:
        return len(self.organisations)

    def get(self, code: str) -> Organisation | None:
        return self.organisations.get(code)

    def name(self, code: str) -> str:
        """The organisation's name; the code itself for one the registry does not hold."""
        org = self.organisations.get(code)
        return org.name if org is not None else code

    def describe(self) -> str:
        """The registry as an error message names it: its kind and its full path."""
        if self.default:
            return f"the default registry of CBS municipalities ({self.path})"
        return f"the registry {self.path}"

    def unknown(self, code: str) -> str:
        """Why ``code`` cannot be a member: the registry does not hold it (names the file)."""
        hint = ""
        if self.default:
            hint = " (a CBS code GMdddd; for other organisations name a registry file: registry = \"orgs.csv\")"
        return f"'{code}' is not an organisation code in {self.describe()}{hint}"


def _default_path() -> Path:
    return Path(str(resources.files("fedgov.resources").joinpath("nl_gemeenten.csv")))


@cache
def default_registry() -> Registry:
    """The 342 CBS municipalities (``fedgov/resources/nl_gemeenten.csv``): region is the
    province, population the approximate number of inhabitants."""
    path = _default_path()
    text = resources.files("fedgov.resources").joinpath("nl_gemeenten.csv").read_text("utf-8")
    orgs: dict[str, Organisation] = {}
    for row in csv.DictReader(text.splitlines()):
        code = row["cbs_code"]
        orgs[code] = Organisation(code, row["name"], row["province"], int(row["approx_population"]))
    return Registry(path, orgs, default=True)


def _empty_is_none(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _clean_text(value: str, what: str) -> str:
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise ValueError(f"{what} must be plain text (no control characters)")
    return value


class _Row(BaseModel):
    """One row of a registry file."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    code: str = Field(
        pattern=CODE_PATTERN,
        description="1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
    )
    name: str = Field(min_length=1, max_length=_MAX_NAME)
    region: Annotated[str | None, BeforeValidator(_empty_is_none)] = Field(default=None, max_length=_MAX_NAME)
    population: Annotated[int | None, BeforeValidator(_empty_is_none)] = Field(default=None, ge=0, le=10**10)

    @field_validator("name", "region")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        return None if value is None else _clean_text(value, "the text")


_EXPECTED = {
    "code": "a code of 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit (no '/', no spaces)",
    "name": f"a name of 1 to {_MAX_NAME} characters",
    "region": f"a region of at most {_MAX_NAME} characters, or empty",
    "population": "a whole number of at least 0, or empty",
}


def _row_problems(err: ValidationError, file: str, line: int) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        col = str(e["loc"][0]) if e["loc"] else ""
        found = repr(e.get("input"))
        if len(found) > 60:
            found = found[:57] + "..."
        expected = _EXPECTED.get(col, e["msg"])
        detail = e["msg"] if e["type"] == "value_error" else f"expected {expected}"
        out.append(Problem(file, f"line {line}, column '{col}'", f"{detail} (found {found})"))
    return out


def load_registry(path: Path | str) -> Registry:
    """Read and validate a registry file (see the module docstring); every problem at once,
    each naming the file, its line and column, as a :class:`ConfigError`."""
    return _load_cached(*_key(Path(path)))


def _key(path: Path) -> tuple[Path, int, int]:
    p = path.resolve()
    if not p.is_file():
        raise ConfigError(
            f"Registry file not found: {p}", [Problem(str(p), "", "no such file (a CSV file with columns code,name[,region,population])")]
        )
    st = p.stat()
    return p, st.st_mtime_ns, st.st_size


@lru_cache(maxsize=16)
def _load_cached(path: Path, mtime_ns: int, size: int) -> Registry:
    file = str(path)
    if size > _MAX_BYTES:
        raise ConfigError(f"Registry file {file} is too large", [Problem(file, "", f"{size} bytes; at most {_MAX_BYTES}")])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Registry file {file} is not UTF-8 text", [Problem(file, "", str(exc))]) from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ConfigError(
            f"Registry file {file} is empty", [Problem(file, "line 1", "expected a header: code,name[,region,population]")]
        ) from None
    except csv.Error as exc:
        raise ConfigError(f"Registry file {file} is not valid CSV", [Problem(file, "line 1", str(exc))]) from exc
    problems: list[Problem] = []
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        problems.append(
            Problem(file, "line 1", f"unknown column(s) {', '.join(repr(u) for u in unknown)}; the columns are {', '.join(COLUMNS)}")
        )
    missing = [c for c in ("code", "name") if c not in header]
    if missing:
        problems.append(Problem(file, "line 1", f"missing column(s) {', '.join(missing)}; the header must name code and name"))
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        problems.append(Problem(file, "line 1", f"column(s) named twice: {', '.join(repeated)}"))
    if problems:
        raise ConfigError(f"Invalid registry file {file} ({len(problems)} problem(s)):", problems)

    orgs: dict[str, Organisation] = {}
    first_line: dict[str, int] = {}  # code folded to lower case -> the line it was first given on
    try:
        for values in reader:
            line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                problems.append(Problem(file, f"line {line}", f"{len(values)} field(s), the header has {len(header)}"))
                continue
            try:
                row = _Row.model_validate(dict(zip(header, values, strict=True)))
            except ValidationError as exc:
                problems.extend(_row_problems(exc, file, line))
                continue
            folded = row.code.lower()
            if folded in first_line:
                problems.append(
                    Problem(
                        file, f"line {line}, column 'code'",
                        f"code '{row.code}' is already given on line {first_line[folded]} (codes are unique, ignoring case)",
                    )
                )
                continue
            first_line[folded] = line
            orgs[row.code] = Organisation(row.code, row.name, row.region, row.population)
            if len(problems) >= 50:
                break
    except csv.Error as exc:
        problems.append(Problem(file, f"line {reader.line_num}", f"not valid CSV: {exc}"))
    if problems:
        raise ConfigError(f"Invalid registry file {file} ({len(problems)} problem(s)):", problems)
    if not orgs:
        raise ConfigError(f"Registry file {file} lists no organisation", [Problem(file, "line 2", "expected at least one row: code,name")])
    return Registry(path, orgs)
