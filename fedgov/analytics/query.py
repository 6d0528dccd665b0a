"""Query files: the statistics a policy advisor asks of the federation, and their privacy budget.

A query (``configs/queries/*.toml``) names a data contract, optional global filters, the
regions to report per, a privacy budget per node, and a list of *measures*::

    name = "wmo-monitor"
    contract = "../contracts/iwmo-wmo.toml"
    where = [{ column = "start_year", op = "ge", value = 2020 }]
    regions = ["province"]

    [privacy]
    epsilon = 1.0              # the whole query, per node (per municipality)
    delta = 0.0                # 0: pure DP (laplace); > 0 only with mechanism = "gaussian"
    mechanism = "laplace"
    max_rows_per_person = 1

    [[measures]]
    name = "clients-by-category"
    kind = "count"             # count | sum | mean | histogram | quantiles | ratio
    by = ["product_category", "age_group"]
    weight = 2.0

Every measure is released as one or two noisy vectors (*parts*) over a public cell grid that
comes from the contract (category lists, histogram edges, quantile bins), never from the data:

============  =====================================  =========================================
kind          parts                                  cells
============  =====================================  =========================================
count         ``counts``                             the ``by`` cells
sum           ``sum``                                the ``by`` cells
mean          ``sum``, ``count`` (epsilon halved)    the ``by`` cells
ratio         ``numerator``, ``denominator``         the ``by`` cells
histogram     ``counts``                             ``by`` cells x the bins between ``edges``
quantiles     ``counts``                             ``by`` cells x ``bins`` equal-width bins
============  =====================================  =========================================

Privacy accounting: basic composition within the query. Measure *i* gets
``epsilon * weight_i / sum(weights)`` (likewise delta); a two-part measure gives each part half.
The parts are apportioned in whole units of ``ulp(epsilon)`` (largest remainders), so that they
add up to exactly ``privacy.epsilon`` in floating point, in any order; the node's privacy
ledger records one mechanism per query, ``Mechanism(kind=mechanism, epsilon=privacy.epsilon,
delta=privacy.delta)`` (:meth:`Query.mechanism`).

Contribution bounding: each person contributes at most ``max_rows_per_person`` rows (the first
ones, in file order, among the rows that pass the global filters). When the contract names no
``person_id`` column every row is taken to be its own person (``max_rows_per_person`` is then
ignored and the bound is 1 row): use that only for data with one row per person.

Filters (``where``, a measure's ``where`` and a ratio's ``numerator``) are lists of
``{column, op, value}``, all of which must hold; ``op`` is one of eq, ne, in, not_in (a list),
lt, le, gt, ge, between (a list ``[low, high]``, both ends included). Categorical, boolean and
string columns take eq/ne/in/not_in only. A missing value never passes a filter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator, Field, ValidationInfo, field_validator

from fedgov.config import ColumnType, ConfigPath, Contract, StrictModel, load_contract, load_referenced, validate_file
from fedgov.errors import ConfigError, Problem

if TYPE_CHECKING:
    from fedgov.privacy.events import Mechanism

__all__ = [
    "FilterOp",
    "Filter",
    "MeasureKind",
    "PartName",
    "Measure",
    "QueryPrivacy",
    "Query",
    "PartSpec",
    "CellGrid",
    "MISSING_LEVEL",
    "DEFAULT_QUANTILE_BINS",
    "MAX_CELLS",
    "cell_grid",
    "check_query",
    "ensure_valid",
    "load_query",
]

FilterOp = Literal["eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "between"]
MeasureKind = Literal["count", "sum", "mean", "histogram", "quantiles", "ratio"]
PartName = Literal["counts", "sum", "count", "numerator", "denominator"]
Scalar = bool | int | float | str

MISSING_LEVEL = "(missing)"
"""The cell of a missing value in a ``by`` column that the contract declares nullable."""
DEFAULT_QUANTILE_BINS = 100
MAX_CELLS = 1_000_000
"""The most cells one measure may have (by cells times bins)."""

_NEEDS_COLUMN = ("sum", "mean", "histogram", "quantiles")
_ORDERED_OPS = ("lt", "le", "gt", "ge", "between")
_PARTS: dict[str, tuple[PartName, ...]] = {
    "count": ("counts",),
    "histogram": ("counts",),
    "quantiles": ("counts",),
    "sum": ("sum",),
    "mean": ("sum", "count"),
    "ratio": ("numerator", "denominator"),
}


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Filter(StrictModel):
    """One condition on a column: ``{column, op, value}``."""

    column: str = Field(min_length=1)
    op: FilterOp
    value: Scalar | list[Scalar]

    @field_validator("value")
    @classmethod
    def _value_shape(cls, v: Scalar | list[Scalar], info: ValidationInfo) -> Scalar | list[Scalar]:
        op = info.data.get("op")
        if op is None:
            return v
        if op in ("in", "not_in"):
            if not isinstance(v, list) or not v:
                raise ValueError(f"op '{op}' needs a non-empty list of values")
        elif op == "between":
            if not isinstance(v, list) or len(v) != 2 or not all(_is_number(x) for x in v):
                raise ValueError("op 'between' needs a list of two numbers [low, high]")
            if not all(math.isfinite(float(x)) for x in v) or float(v[0]) > float(v[1]):
                raise ValueError("op 'between' needs finite [low, high] with low <= high")
        else:
            if isinstance(v, list):
                raise ValueError(f"op '{op}' needs a single value, not a list")
            if op in _ORDERED_OPS and not (_is_number(v) and math.isfinite(float(v))):
                raise ValueError(f"op '{op}' needs a finite number")
        return v

    def values(self) -> list[Scalar]:
        """The filter's value(s) as a list."""
        return list(self.value) if isinstance(self.value, list) else [self.value]


class Measure(StrictModel):
    """One statistic of a query. Which fields apply depends on ``kind`` (see the module doc)."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: MeasureKind
    description: str = ""
    by: list[str] = Field(default_factory=list)
    where: list[Filter] = Field(default_factory=list)
    weight: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False)
    column: str | None = Field(default=None, validate_default=True)
    numerator: list[Filter] | None = Field(default=None, validate_default=True)
    quantiles: list[float] | None = Field(default=None, validate_default=True)
    bins: int | None = Field(default=None, validate_default=True)
    edges: list[float] | None = Field(default=None, validate_default=True)

    @field_validator("column")
    @classmethod
    def _column(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind in _NEEDS_COLUMN and not v:
            raise ValueError(f"kind '{kind}' needs a numeric 'column'")
        if kind in ("count", "ratio") and v is not None:
            raise ValueError(f"kind '{kind}' takes no 'column' (it counts rows)")
        return v

    @field_validator("numerator")
    @classmethod
    def _numerator(cls, v: list[Filter] | None, info: ValidationInfo) -> list[Filter] | None:
        kind = info.data.get("kind")
        if kind == "ratio" and not v:
            raise ValueError("kind 'ratio' needs a non-empty 'numerator' list of filters")
        if kind is not None and kind != "ratio" and v is not None:
            raise ValueError("'numerator' is only for kind 'ratio'")
        return v

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        kind = info.data.get("kind")
        if kind == "quantiles":
            if not v:
                raise ValueError("kind 'quantiles' needs a non-empty 'quantiles' list, e.g. [0.25, 0.5, 0.75]")
            bad = [q for q in v if not (math.isfinite(q) and 0 < q < 1)]
            if bad:
                raise ValueError(f"every quantile must lie strictly between 0 and 1; found {bad}")
            if len(set(v)) != len(v):
                raise ValueError("'quantiles' holds a value twice")
        elif kind is not None and v is not None:
            raise ValueError("'quantiles' is only for kind 'quantiles'")
        return v

    @field_validator("bins")
    @classmethod
    def _bins(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if kind is not None and kind != "quantiles" and v is not None:
            raise ValueError("'bins' is only for kind 'quantiles' (a histogram takes 'edges')")
        if v is not None and not 2 <= v <= 10_000:
            raise ValueError("'bins' must be between 2 and 10000")
        return v

    @field_validator("edges")
    @classmethod
    def _edges(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        kind = info.data.get("kind")
        if kind == "histogram":
            if v is None or len(v) < 2:
                raise ValueError("kind 'histogram' needs 'edges': at least two increasing numbers")
            if not all(math.isfinite(e) for e in v):
                raise ValueError("'edges' must be finite numbers")
            if any(b <= a for a, b in itertools.pairwise(v)):
                raise ValueError("'edges' must be strictly increasing")
        elif kind is not None and v is not None:
            raise ValueError("'edges' is only for kind 'histogram'")
        return v

    @property
    def part_names(self) -> tuple[PartName, ...]:
        """The noisy releases of this measure, in order."""
        return _PARTS[self.kind]

    @property
    def n_bins(self) -> int:
        """Bins per ``by`` cell: histogram bins, quantile bins, or 1."""
        if self.kind == "histogram":
            assert self.edges is not None
            return len(self.edges) - 1
        if self.kind == "quantiles":
            return self.bins or DEFAULT_QUANTILE_BINS
        return 1


class QueryPrivacy(StrictModel):
    """The query's guarantee per node, and the contribution bound."""

    epsilon: float = Field(gt=0, le=100, allow_inf_nan=False, description="for the whole query, per node")
    mechanism: Literal["laplace", "gaussian"] = "laplace"
    delta: float = Field(default=0.0, ge=0, lt=1, validate_default=True)
    max_rows_per_person: int = Field(
        default=1, le=10_000, description="rows per person kept: the first k in file order (needs person_id in the contract)"
    )

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float, info: ValidationInfo) -> float:
        mech = info.data.get("mechanism")
        if mech == "laplace" and v > 0:
            raise ValueError("mechanism 'laplace' is pure DP: delta must be 0 (use mechanism = 'gaussian' for delta > 0)")
        if mech == "gaussian" and v == 0:
            raise ValueError("mechanism 'gaussian' needs delta > 0 (e.g. 1e-7); use 'laplace' for pure DP")
        return v


@dataclass(frozen=True)
class PartSpec:
    """One noisy release of a measure and its share of the query's budget."""

    measure: str
    part: PartName
    epsilon: float
    delta: float


class Query(StrictModel):
    """A statistics query: global filters, regions, a privacy budget and the measures."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    contract: ConfigPath
    federation: ConfigPath | None = None
    where: list[Filter] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    privacy: QueryPrivacy
    measures: list[Measure] = Field(min_length=1)
    secure_aggregation: bool = Field(
        default=False,
        description=(
            "sum the nodes' noisy releases under secure aggregation: the coordinator learns the national totals "
            "only, never one node's figures; no regions"
        ),
    )

    @model_validator(mode="after")
    def _secure_national(self) -> Query:
        if self.secure_aggregation and self.regions:
            raise ValueError(
                "regions need each node's release; under secure_aggregation the coordinator sees only the national sum"
            )
        return self

    def measure(self, name: str) -> Measure:
        for m in self.measures:
            if m.name == name:
                return m
        raise KeyError(name)

    def parts(self) -> list[PartSpec]:
        """Every noisy release of the query, in measure order, with its epsilon and delta.

        The epsilons add up to exactly ``privacy.epsilon`` and the deltas to exactly
        ``privacy.delta`` (each is a whole multiple of the total's ulp, apportioned by largest
        remainders), so the query spends exactly what the ledger records.
        """
        names = [(m.name, p) for m in self.measures for p in m.part_names]
        shares = [Fraction(m.weight) / len(m.part_names) for m in self.measures for _ in m.part_names]
        eps = _apportion(self.privacy.epsilon, shares)
        deltas = _apportion(self.privacy.delta, shares)
        return [PartSpec(m, p, e, d) for (m, p), e, d in zip(names, eps, deltas, strict=True)]

    def epsilon_split(self) -> dict[str, float]:
        """Epsilon per measure (the sum of its parts); the values add up to ``privacy.epsilon``."""
        out: dict[str, float] = {}
        for part in self.parts():
            out[part.measure] = out.get(part.measure, 0.0) + part.epsilon
        return out

    def delta_split(self) -> dict[str, float]:
        """Delta per measure (the sum of its parts)."""
        out: dict[str, float] = {}
        for part in self.parts():
            out[part.measure] = out.get(part.measure, 0.0) + part.delta
        return out

    def rows_per_person(self, contract: Contract) -> int:
        """The contribution bound in effect: ``max_rows_per_person``, or 1 without a person_id."""
        return self.privacy.max_rows_per_person if contract.person_id else 1

    def mechanism(self) -> Mechanism:
        """What the node's privacy ledger records for this query: one mechanism, the whole budget."""
        from fedgov.privacy.events import Mechanism

        return Mechanism(kind=self.privacy.mechanism, epsilon=self.privacy.epsilon, delta=self.privacy.delta)


def _apportion(total: float, shares: Sequence[Fraction]) -> list[float]:
    """Split ``total`` in proportion to ``shares`` into floats that add up to exactly ``total``.

    Every piece is a whole number of units ``u = ulp(total)`` (largest remainders), and all
    partial sums stay below ``2**53 u``, so adding them in any order is exact.
    """
    if total == 0:
        return [0.0] * len(shares)
    unit = Fraction(math.ulp(total))
    whole = Fraction(total) / unit
    assert whole.denominator == 1
    n_units = whole.numerator
    s = sum(shares, Fraction(0))
    exact = [n_units * w / s for w in shares]
    floors = [math.floor(x) for x in exact]
    left = n_units - sum(floors)
    order = sorted(range(len(shares)), key=lambda i: (exact[i] - floors[i], -i), reverse=True)
    for i in order[:left]:
        floors[i] += 1
    return [float(f * unit) for f in floors]


# --------------------------------------------------------------------------- the cell grid


@dataclass(frozen=True)
class CellGrid:
    """The public cells of a measure: ``by`` cells (C order) times bins.

    ``levels`` holds, per ``by`` column, its cell values: the contract's categories (or
    ``false``/``true`` for a boolean), plus :data:`MISSING_LEVEL` when the column is nullable.
    ``edges`` are the bin edges (histogram edges, or the equal-width quantile bins over the
    contract's ``[min, max]``); None for measures without bins.
    """

    by: tuple[str, ...]
    levels: tuple[tuple[str, ...], ...]
    edges: tuple[float, ...] | None

    @property
    def n_groups(self) -> int:
        return math.prod(len(lv) for lv in self.levels)

    @property
    def n_bins(self) -> int:
        return 1 if self.edges is None else len(self.edges) - 1

    @property
    def size(self) -> int:
        return self.n_groups * self.n_bins

    def group_keys(self) -> list[str]:
        """``"col=value;col=value"`` per ``by`` cell ("" for a measure without ``by``)."""
        if not self.by:
            return [""]
        return [";".join(f"{c}={v}" for c, v in zip(self.by, combo, strict=True)) for combo in itertools.product(*self.levels)]

    def bin_labels(self) -> list[str]:
        if self.edges is None:
            return []
        e = self.edges
        n = len(e) - 1
        return [f"[{_fmt(e[i])}, {_fmt(e[i + 1])}{']' if i == n - 1 else ')'}" for i in range(n)]

    def keys(self) -> list[str]:
        """The key of every cell of a part, in release order."""
        groups = self.group_keys()
        if self.edges is None:
            return groups
        return [_join(g, f"bin={b}") for g in groups for b in self.bin_labels()]


def _join(a: str, b: str) -> str:
    return f"{a};{b}" if a else b


def _fmt(x: float) -> str:
    return f"{x:g}"


def cell_grid(measure: Measure, contract: Contract) -> CellGrid:
    """The public cell grid of ``measure``: from the contract and the query only."""
    levels: list[tuple[str, ...]] = []
    for name in measure.by:
        col = contract.column(name)
        lv: list[str] = list(col.categories or []) if col.type == ColumnType.CATEGORICAL else ["false", "true"]
        if col.nullable:
            lv.append(MISSING_LEVEL)
        levels.append(tuple(lv))
    edges: tuple[float, ...] | None = None
    if measure.kind == "histogram":
        assert measure.edges is not None
        edges = tuple(float(e) for e in measure.edges)
    elif measure.kind == "quantiles":
        assert measure.column is not None
        col = contract.column(measure.column)
        assert col.min is not None and col.max is not None
        lo, hi = float(col.min), float(col.max)
        n = measure.n_bins
        edges = tuple(lo + (hi - lo) * i / n for i in range(n)) + (hi,)
    return CellGrid(by=tuple(measure.by), levels=tuple(levels), edges=edges)


# --------------------------------------------------------------------------- validation


def _check_filter(f: Filter, contract: Contract, file: str, where: str) -> list[Problem]:
    names = contract.names()
    if f.column not in names:
        return [Problem(file, f"{where}.column", f"'{f.column}' is not a column of {contract.ref}")]
    col = contract.column(f.column)
    values = f.values()
    if col.is_numeric:
        bad = [v for v in values if not _is_number(v)]
        if bad:
            return [Problem(file, f"{where}.value", f"column '{f.column}' is {col.type.value}; found non-numeric value(s) {bad}")]
        return []
    if f.op in _ORDERED_OPS:
        return [Problem(file, f"{where}.op", f"op '{f.op}' needs a numeric column; '{f.column}' is {col.type.value}")]
    if col.type == ColumnType.BOOLEAN:
        bad = [v for v in values if not isinstance(v, bool)]
        if bad:
            return [Problem(file, f"{where}.value", f"column '{f.column}' is boolean; use true or false, found {bad}")]
        return []
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        return [Problem(file, f"{where}.value", f"column '{f.column}' is {col.type.value}; values must be strings, found {bad}")]
    if col.type == ColumnType.CATEGORICAL:
        cats = col.categories or []
        unknown = [v for v in values if v not in cats]
        if unknown:
            shown = ", ".join(repr(c) for c in cats[:8]) + (", ..." if len(cats) > 8 else "")
            return [
                Problem(file, f"{where}.value", f"{unknown} not among the categories of '{f.column}' ({shown})")
            ]
    return []


def check_query(query: Query, contract: Contract, file: str = "<query>") -> list[Problem]:
    """Check a query against its contract; every problem with its location in the file."""
    problems: list[Problem] = []
    names = contract.names()
    for i, f in enumerate(query.where):
        problems += _check_filter(f, contract, file, f"where[{i}]")
    for i, r in enumerate(query.regions):
        if r not in names:
            problems.append(Problem(file, f"regions[{i}]", f"'{r}' is not a column of {contract.ref}"))
        elif contract.column(r).type not in (ColumnType.CATEGORICAL, ColumnType.STRING):
            problems.append(Problem(file, f"regions[{i}]", f"region column '{r}' must be categorical or string"))
    if len(set(query.regions)) != len(query.regions):
        problems.append(Problem(file, "regions", "a region column is listed twice"))
    if contract.person_id is not None and query.privacy.max_rows_per_person < 1:
        problems.append(
            Problem(file, "privacy.max_rows_per_person", f"must be at least 1 (contract {contract.ref} has person_id '{contract.person_id}')")
        )
    seen: dict[str, int] = {}
    for i, m in enumerate(query.measures):
        loc = f"measures[{i}]"
        if m.name in seen:
            problems.append(Problem(file, f"{loc}.name", f"measure name '{m.name}' is already used by measures[{seen[m.name]}]"))
        else:
            seen[m.name] = i
        by_ok = True
        for j, b in enumerate(m.by):
            if b not in names:
                problems.append(Problem(file, f"{loc}.by[{j}]", f"'{b}' is not a column of {contract.ref}"))
                by_ok = False
            elif contract.column(b).type not in (ColumnType.CATEGORICAL, ColumnType.BOOLEAN):
                problems.append(
                    Problem(file, f"{loc}.by[{j}]", f"'{b}' is {contract.column(b).type.value}; 'by' takes categorical or boolean columns")
                )
                by_ok = False
        if len(set(m.by)) != len(m.by):
            problems.append(Problem(file, f"{loc}.by", "a column is listed twice"))
            by_ok = False
        col_ok = True
        if m.column is not None:
            if m.column not in names:
                problems.append(Problem(file, f"{loc}.column", f"'{m.column}' is not a column of {contract.ref}"))
                col_ok = False
            elif not contract.column(m.column).is_numeric:
                problems.append(
                    Problem(file, f"{loc}.column", f"kind '{m.kind}' needs a numeric column; '{m.column}' is {contract.column(m.column).type.value}")
                )
                col_ok = False
        for j, f in enumerate(m.where):
            problems += _check_filter(f, contract, file, f"{loc}.where[{j}]")
        for j, f in enumerate(m.numerator or []):
            problems += _check_filter(f, contract, file, f"{loc}.numerator[{j}]")
        if by_ok and col_ok:
            size = cell_grid(m, contract).size
            if size > MAX_CELLS:
                problems.append(Problem(file, loc, f"{size} cells (by cells x bins); at most {MAX_CELLS}"))
    return problems


def ensure_valid(query: Query, contract: Contract, file: str = "<query>") -> None:
    """Raise :class:`ConfigError` when ``query`` does not fit ``contract``."""
    problems = check_query(query, contract, file)
    if problems:
        raise ConfigError(f"Query {query.name} does not fit contract {contract.ref} ({len(problems)} problem(s)):", problems)


def load_query(path: Path | str) -> tuple[Query, Contract]:
    """Load a query file and the contract it names; every problem is listed with file and field.

    Raises :class:`ConfigError` (exit code 10).
    """
    p = Path(path)
    query = validate_file(Query, p, "query")
    contract = load_referenced(load_contract, query.contract, by=p, field="contract")
    ensure_valid(query, contract, str(p))
    return query, contract
