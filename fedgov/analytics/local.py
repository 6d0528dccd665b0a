"""A node's side of a statistics query: its local aggregates, with calibrated OpenDP noise.

:func:`local_release` runs on one municipality's data and returns a :class:`LocalRelease`:
per part of every measure, per public cell, a noisy value, the noise's standard deviation and
whether the cell is *small* (below the node's minimum cohort). It carries no true value and no
row-level data. The steps, in order:

1. the query's global ``where`` filters;
2. contribution bounding (:func:`bound_contributions`): the first ``max_rows_per_person`` rows
   per person, in file order; without a ``person_id`` every row is its own person;
3. per measure, its own ``where`` filters; rows with a missing value in the measure's column,
   or a ``by`` value outside the contract's categories, are left out of that measure (a
   missing ``by`` value of a nullable column has its own cell, ``(missing)``);
4. numeric values are clamped to the contract's ``[min, max]`` (integer columns to the integers
   inside it), histogram values then to the outer edges;
5. exact aggregates over the full public cell grid (a cell nobody falls in is 0, and noised
   like every other: the grid never depends on the data);
6. noise from OpenDP's samplers, never from numpy.

Sensitivities (add or remove one person, who has at most ``k = max_rows_per_person`` rows):
a count vector changes by at most ``k`` (a row counts 1 in exactly one cell), in L1 and in L2;
a sum vector by at most ``k * max(|min|, |max|)``. Float sums are added up exactly and rounded
once (``math.fsum``), so their rounding error is below ``2**-52`` of a sum of at most
``2**31`` rows; the float sensitivity is raised by ``2**-20`` of itself to cover it.

Mechanisms (``opendp.measurements``, feature ``contrib``):

============================  ==========================================================
part                          OpenDP constructor
============================  ==========================================================
counts, integer sums          ``make_laplace(vector_domain(atom_domain(T="i64")),
                              l1_distance(T="i64"), scale)``: the discrete Laplace
                              (geometric) mechanism; or ``make_gaussian(...,
                              l2_distance(T="i64"), scale)``: the discrete Gaussian
float sums                    the same constructors on ``atom_domain(T=float, nan=False)``:
                              OpenDP samples them exactly, on its finest lattice (the
                              default ``k``), so they behave as continuous noise
============================  ==========================================================

Calibration: Laplace ``scale = sensitivity / epsilon_part``, raised by ulps until OpenDP's own
privacy map gives at most ``epsilon_part``. Gaussian: the smallest scale (bisection, to 1e-6
relative, on the side that passes) at which ``make_fix_delta(make_zCDP_to_approxDP(gaussian),
delta_part)`` maps the sensitivity to at most ``(epsilon_part, delta_part)``. The noise
standard deviation follows from the scale: discrete Laplace ``sqrt(2 t) / (1 - t)`` with
``t = exp(-1 / scale)``; continuous-lattice Laplace ``sqrt(2) * scale``; Gaussian ``scale``
(the discrete Gaussian's exact variance is summed numerically for scales below 10).

Small cells: a cell is *small* when its noisy count is below ``min_cohort``. Count and
histogram cells use their own count; a quantiles measure flags all bins of a ``by`` cell when
the cell's noisy total is small; a mean uses its count part for both parts; a ratio is small
when its numerator or its denominator is; a sum uses a count measure (or a mean's count part)
of the same query with the same ``by`` and ``where`` when there is one, and is otherwise
*unknown* (None), which the coordinator treats as small for per-node figures. With
``small_cells="withhold"`` small cells are not sent (None); with ``"publish-suppressed"``
they are sent, flagged, and only ever used in sums over nodes. The flags are computed from
noisy values only, so they cost no privacy budget.

Nothing here logs a data value; log lines give counts of rows, parts and cells only.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from fedgov.analytics.query import (
    CellGrid,
    Filter,
    Measure,
    MeasureKind,
    PartName,
    Query,
    cell_grid,
    ensure_valid,
)
from fedgov.config.contract import Column, ColumnType, Contract
from fedgov.privacy.events import Mechanism

__all__ = [
    "SmallCells",
    "NoiseKind",
    "PartRelease",
    "LocalRelease",
    "Prepared",
    "bound_contributions",
    "prepare",
    "true_parts",
    "part_sensitivity",
    "local_release",
]

log = logging.getLogger(__name__)

SmallCells = Literal["publish-suppressed", "withhold"]
NoiseKind = Literal["discrete_laplace", "discrete_gaussian", "laplace", "gaussian"]

_MAX_ROWS = 2**31
_FLOAT_SUM_SLACK = 2.0**-20
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartRelease(_Model):
    """One noisy vector of a measure, over the measure's public cells.

    ``noise_sd`` is the standard deviation of the noise in every cell of the part (all cells
    get the same mechanism). ``values[i]`` is None when the cell was withheld; ``small[i]`` is
    True/False, or None when the node could not tell (a sum without a matching count).
    """

    measure: str
    kind: MeasureKind
    part: PartName
    mechanism: NoiseKind
    opendp: str
    epsilon: float
    delta: float
    sensitivity: float
    scale: float
    noise_sd: float
    cells: list[str]
    values: list[float | None]
    small: list[bool | None]


class LocalRelease(_Model):
    """What a node sends back for one query: noisy parts, flags, and what it spent.

    ``epsilon``/``delta`` are the sums over the parts (exactly the query's budget);
    ``mechanism`` is what the node's privacy ledger records for the query.
    """

    kind: Literal["query-release"] = "query-release"
    query: str
    contract: str
    epsilon: float
    delta: float
    mechanism: Mechanism
    max_rows_per_person: int
    min_cohort: int
    small_cells: SmallCells
    parts: list[PartRelease]

    def part(self, measure: str, part: str) -> PartRelease:
        for p in self.parts:
            if p.measure == measure and p.part == part:
                return p
        raise KeyError((measure, part))

    def withheld_cells(self) -> int:
        return sum(v is None for p in self.parts for v in p.values)


# --------------------------------------------------------------------------- typed columns


def _require(frame: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [n for n in dict.fromkeys(names) if n not in frame.columns]
    if missing:
        raise ValueError(f"the data lack column(s) the query needs: {', '.join(missing)}")


class _Columns:
    """Typed views of a frame's columns, computed once (typed frames or text frames alike)."""

    def __init__(self, frame: pd.DataFrame, contract: Contract) -> None:
        self.frame = frame
        self.contract = contract
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def _get(self, key: tuple[str, str], make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def missing(self, name: str) -> np.ndarray:
        def make() -> np.ndarray:
            s = self.frame[name]
            miss: np.ndarray = s.isna().to_numpy(dtype=bool, copy=True)
            if s.dtype == object or isinstance(s.dtype, pd.StringDtype):
                miss |= (s.astype(object) == "").to_numpy(dtype=bool)
            return miss

        return self._get((name, "missing"), make)

    def numeric(self, name: str) -> np.ndarray:
        """float64, NaN where missing or not a number."""

        def make() -> np.ndarray:
            s = self.frame[name]
            if pd.api.types.is_bool_dtype(s.dtype):
                s = s.astype(np.float64)
            x: np.ndarray = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            return x

        return self._get((name, "numeric"), make)

    def boolean(self, name: str) -> np.ndarray:
        """int64 codes: 1 true, 0 false, -1 missing or not a boolean."""

        def make() -> np.ndarray:
            s = self.frame[name]
            if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
                flags: np.ndarray = s.to_numpy(dtype=bool)
                return flags.astype(np.int64)
            if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
                x = s.to_numpy(dtype=np.float64, na_value=np.nan)
                return np.where(x == 1.0, 1, np.where(x == 0.0, 0, -1)).astype(np.int64)
            text = s.astype(object).map(lambda v: None if v is None or v is pd.NA or v != v else str(v).strip().lower())
            arr = text.to_numpy(dtype=object)
            out = np.full(len(arr), -1, dtype=np.int64)
            out[pd.Series(arr).isin(_TRUE).to_numpy()] = 1
            out[pd.Series(arr).isin(_FALSE).to_numpy()] = 0
            return out

        return self._get((name, "boolean"), make)

    def codes(self, name: str) -> np.ndarray:
        """Category index per row for a categorical column; -1 for missing or unknown."""

        def make() -> np.ndarray:
            col = self.contract.column(name)
            cats = list(col.categories or [])
            s = self.frame[name]
            codes: np.ndarray = pd.Categorical(s.astype(object), categories=cats).codes.astype(np.int64)
            retry = (codes < 0) & ~self.missing(name)
            if retry.any():  # values stored as numbers or with spaces: compare their text
                text = s[retry].astype(object).map(lambda v: str(v).strip())
                codes[retry] = pd.Categorical(text, categories=cats).codes.astype(np.int64)
            return codes

        return self._get((name, "codes"), make)

    def text(self, name: str) -> np.ndarray:
        return self._get((name, "text"), lambda: self.frame[name].astype(object).to_numpy(dtype=object))

    def levels(self, col: Column) -> tuple[np.ndarray, int]:
        """Cell index of a ``by`` column (-1: left out) and its number of levels."""
        if col.type == ColumnType.CATEGORICAL:
            codes = self.codes(col.name).copy()
            n = len(col.categories or [])
        else:
            codes = self.boolean(col.name).copy()
            n = 2
        if col.nullable:
            codes[self.missing(col.name) & (codes < 0)] = n
            n += 1
        return codes, n


def _filter_mask(cols: _Columns, filters: Sequence[Filter]) -> np.ndarray:
    """Rows for which every filter holds; a missing value never passes."""
    n = len(cols.frame)
    mask = np.ones(n, dtype=bool)
    for f in filters:
        col = cols.contract.column(f.column)
        values = f.values()
        if col.is_numeric:
            x = cols.numeric(f.column)
            ok = ~np.isnan(x)
            v = [float(val) for val in values]
            with np.errstate(invalid="ignore"):
                if f.op == "eq":
                    hit = x == v[0]
                elif f.op == "ne":
                    hit = x != v[0]
                elif f.op == "in":
                    hit = np.isin(x, v)
                elif f.op == "not_in":
                    hit = ~np.isin(x, v)
                elif f.op == "lt":
                    hit = x < v[0]
                elif f.op == "le":
                    hit = x <= v[0]
                elif f.op == "gt":
                    hit = x > v[0]
                elif f.op == "ge":
                    hit = x >= v[0]
                else:  # between
                    hit = (x >= v[0]) & (x <= v[1])
            mask &= ok & hit
            continue
        if col.type == ColumnType.BOOLEAN:
            b = cols.boolean(f.column)
            ok = b >= 0
            wanted = np.array([int(bool(val)) for val in values], dtype=np.int64)
            hit = np.isin(b, wanted)
        elif col.type == ColumnType.CATEGORICAL:
            c = cols.codes(f.column)
            cats = list(col.categories or [])
            ok = c >= 0
            hit = np.isin(c, np.array([cats.index(str(val)) for val in values], dtype=np.int64))
        else:
            t = cols.text(f.column)
            ok = ~cols.missing(f.column)
            hit = pd.Series(t).isin([str(val) for val in values]).to_numpy(dtype=bool)
        if f.op in ("ne", "not_in"):
            hit = ~hit
        mask &= ok & hit
    return mask


# --------------------------------------------------------------------------- bounding, aggregates


def bound_contributions(frame: pd.DataFrame, contract: Contract, max_rows_per_person: int) -> pd.DataFrame:
    """Keep the first ``max_rows_per_person`` rows of every person, in file order.

    Without a ``person_id`` in the contract every row is its own person and the frame comes
    back unchanged. Rows with a missing person id count as one person (the conservative
    choice: they might all be the same person).
    """
    if contract.person_id is None:
        return frame
    if max_rows_per_person < 1:
        raise ValueError("max_rows_per_person must be at least 1")
    _require(frame, [contract.person_id])
    ids = frame[contract.person_id]
    rank = ids.groupby(ids, sort=False, dropna=False).cumcount().to_numpy()
    keep = rank < max_rows_per_person
    return frame if keep.all() else frame[keep]


@dataclass(frozen=True)
class Prepared:
    """One measure's rows after filtering, bounding and clamping (on the node only).

    ``group`` is the ``by`` cell of every row kept, ``bin`` its bin (histogram, quantiles),
    ``values`` the clamped values (sum, mean, histogram, quantiles), ``hit`` whether the row
    meets a ratio's numerator.
    """

    measure: Measure
    grid: CellGrid
    group: np.ndarray
    bin: np.ndarray | None
    values: np.ndarray | None
    integer: bool
    hit: np.ndarray | None


def _columns_needed(query: Query, contract: Contract) -> list[str]:
    names = [f.column for f in query.where]
    if contract.person_id:
        names.append(contract.person_id)
    for m in query.measures:
        names += list(m.by) + [f.column for f in m.where] + [f.column for f in m.numerator or []]
        if m.column:
            names.append(m.column)
    return names


def _bounds(col: Column) -> tuple[float, float]:
    assert col.min is not None and col.max is not None  # the contract guarantees both
    if col.type == ColumnType.INTEGER:
        return float(math.ceil(col.min)), float(math.floor(col.max))
    return float(col.min), float(col.max)


def prepare(frame: pd.DataFrame, query: Query, contract: Contract) -> dict[str, Prepared]:
    """Filter, bound and clamp ``frame`` for every measure of ``query`` (no noise)."""
    _require(frame, _columns_needed(query, contract))
    if len(frame) >= _MAX_ROWS:
        raise ValueError(f"a node's data may hold at most {_MAX_ROWS - 1} rows")
    top = _Columns(frame, contract)
    sub = frame[_filter_mask(top, query.where)] if query.where else frame
    sub = bound_contributions(sub, contract, query.rows_per_person(contract))
    cols = _Columns(sub, contract)
    out: dict[str, Prepared] = {}
    for m in query.measures:
        grid = cell_grid(m, contract)
        keep = _filter_mask(cols, m.where) if m.where else np.ones(len(sub), dtype=bool)
        group = np.zeros(len(sub), dtype=np.int64)
        for name in m.by:
            codes, n = cols.levels(contract.column(name))
            keep &= codes >= 0
            group = group * n + np.where(codes >= 0, codes, 0)
        values: np.ndarray | None = None
        integer = False
        if m.column is not None:
            col = contract.column(m.column)
            integer = col.type == ColumnType.INTEGER
            x = cols.numeric(m.column)
            keep &= ~np.isnan(x)
            lo, hi = _bounds(col)
            x = np.where(np.isnan(x), lo, x)
            if integer:
                x = np.rint(x)
            values = np.clip(x, lo, hi)[keep]
        hit = _filter_mask(cols, m.numerator)[keep] if m.kind == "ratio" and m.numerator else None
        group = group[keep]
        bins: np.ndarray | None = None
        if m.kind in ("histogram", "quantiles"):
            assert values is not None and grid.edges is not None
            bins = _bin_index(m, grid, values, contract)
        out[m.name] = Prepared(m, grid, group, bins, values, integer, hit)
    return out


def _bin_index(m: Measure, grid: CellGrid, values: np.ndarray, contract: Contract) -> np.ndarray:
    assert grid.edges is not None
    n = grid.n_bins
    if m.kind == "histogram":
        edges = np.asarray(grid.edges, dtype=np.float64)
        x: np.ndarray = np.clip(values, edges[0], edges[-1])
        return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n - 1).astype(np.int64)
    assert m.column is not None
    col = contract.column(m.column)
    assert col.min is not None and col.max is not None
    lo, hi = float(col.min), float(col.max)
    if hi <= lo:
        return np.zeros(len(values), dtype=np.int64)
    return np.clip(np.floor((values - lo) / (hi - lo) * n), 0, n - 1).astype(np.int64)


def _fsum_by(group: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Exactly rounded sums of ``x`` per group (math.fsum)."""
    out = np.zeros(size, dtype=np.float64)
    if len(x) == 0:
        return out
    order = np.argsort(group, kind="stable")
    g, v = group[order], x[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    for s, e in zip(starts, ends, strict=True):
        out[g[s]] = math.fsum(v[s:e].tolist())
    return out


def _int_sum_by(group: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    np.add.at(out, group, x.astype(np.int64))
    return out


def true_parts(p: Prepared) -> dict[str, np.ndarray]:
    """The exact aggregates of every part of a prepared measure, over the full cell grid.

    Counts and integer sums are int64, float sums float64 (exactly rounded). Never leaves the
    node except through :func:`local_release`'s noise (or in a simulation's truth).
    """
    m, g = p.measure, p.grid
    n_groups = g.n_groups
    counts = np.bincount(p.group, minlength=n_groups).astype(np.int64)
    if m.kind in ("histogram", "quantiles"):
        assert p.bin is not None
        return {"counts": np.bincount(p.group * g.n_bins + p.bin, minlength=g.size).astype(np.int64)}
    if m.kind == "count":
        return {"counts": counts}
    if m.kind == "ratio":
        assert p.hit is not None
        return {"numerator": np.bincount(p.group[p.hit], minlength=n_groups).astype(np.int64), "denominator": counts}
    assert p.values is not None
    sums = _int_sum_by(p.group, p.values, n_groups) if p.integer else _fsum_by(p.group, p.values, n_groups)
    if m.kind == "sum":
        return {"sum": sums}
    return {"sum": sums, "count": counts}


def part_sensitivity(measure: Measure, part: str, contract: Contract, rows_per_person: int) -> tuple[int | float, bool]:
    """``(sensitivity, integer)`` of a part: L1 and L2 bound of one person's change."""
    if part != "sum":
        return rows_per_person, True
    assert measure.column is not None
    col = contract.column(measure.column)
    lo, hi = _bounds(col)
    bound = max(abs(lo), abs(hi), 1.0)
    if col.type == ColumnType.INTEGER:
        return rows_per_person * int(bound), True
    return rows_per_person * bound * (1.0 + _FLOAT_SUM_SLACK), False


# --------------------------------------------------------------------------- OpenDP noise


@functools.cache
def _dp() -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


@dataclass(frozen=True)
class _Noise:
    kind: NoiseKind
    opendp: str
    scale: float
    sd: float
    measurement: Any


def _discrete_laplace_sd(scale: float) -> float:
    if scale <= 0:
        return 0.0
    t = math.exp(-1.0 / scale)
    return math.sqrt(2.0 * t) / -math.expm1(-1.0 / scale)


def _discrete_gaussian_sd(scale: float) -> float:
    if scale <= 0:
        return 0.0
    if scale >= 10:
        return scale
    k = np.arange(-int(40 * scale) - 40, int(40 * scale) + 41, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * scale**2))
    return float(math.sqrt(float((k**2 * w).sum() / w.sum())))


@functools.lru_cache(maxsize=512)
def _noise(family: str, integer: bool, d_in: int | float, epsilon: float, delta: float) -> _Noise:
    """An OpenDP measurement over vectors, calibrated so that ``d_in`` maps within budget."""
    dp = _dp()
    if epsilon <= 0:
        raise ValueError("every part needs epsilon > 0")
    atom = dp.atom_domain(T="i64") if integer else dp.atom_domain(T=float, nan=False)
    domain = dp.vector_domain(atom)
    t = "i64" if integer else "f64"
    if family == "laplace":
        metric = dp.l1_distance(T="i64" if integer else float)
        scale = float(d_in) / epsilon
        meas = dp.m.make_laplace(domain, metric, scale=scale)
        for _ in range(64):
            if meas.map(d_in) <= epsilon:
                break
            scale = math.nextafter(scale, math.inf)
            meas = dp.m.make_laplace(domain, metric, scale=scale)
        else:  # pragma: no cover - OpenDP rounds by at most a few ulps
            raise RuntimeError("could not calibrate the Laplace mechanism")
        kind: NoiseKind = "discrete_laplace" if integer else "laplace"
        sd = _discrete_laplace_sd(scale) if integer else math.sqrt(2.0) * scale
        desc = f"make_laplace(vector_domain(atom_domain(T={t})), l1_distance(T={t}), scale={scale!r})"
        return _Noise(kind, desc, scale, sd, meas)
    if delta <= 0:
        raise ValueError("the Gaussian mechanism needs delta > 0")
    metric = dp.l2_distance(T="i64" if integer else float)

    def chain(s: float) -> Any:
        gauss = dp.m.make_gaussian(domain, metric, scale=s)
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(gauss), delta)

    def within(s: float) -> bool:
        try:
            eps_used, delta_used = chain(s).map(d_in)
        except Exception:  # OpenDP refuses or overflows far from the boundary: not within budget
            return False
        return bool(eps_used <= epsilon and delta_used <= delta)

    # bracket the smallest scale within budget, then bisect (geometrically) to 1e-6 relative
    hi = float(d_in) * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    while not within(hi):
        hi *= 2.0
    lo = hi / 2.0
    while within(lo):
        hi, lo = lo, lo / 2.0
    while hi - lo > 1e-6 * hi:
        mid = math.sqrt(lo * hi)
        if within(mid):
            hi = mid
        else:
            lo = mid
    scale = hi
    meas = dp.m.make_gaussian(domain, metric, scale=scale)
    kind = "discrete_gaussian" if integer else "gaussian"
    sd = _discrete_gaussian_sd(scale) if integer else scale
    desc = (
        f"make_fix_delta(make_zCDP_to_approxDP(make_gaussian(vector_domain(atom_domain(T={t})), "
        f"l2_distance(T={t}), scale={scale!r})), delta={delta!r})"
    )
    return _Noise(kind, desc, scale, sd, meas)


def _noisy(noise: _Noise, exact: np.ndarray, integer: bool) -> np.ndarray:
    if len(exact) == 0:
        return np.zeros(0, dtype=np.float64)
    data = [int(v) for v in exact.tolist()] if integer else [float(v) for v in exact.tolist()]
    return np.asarray(noise.measurement(data), dtype=np.float64)


# --------------------------------------------------------------------------- the release


def _matching_count(query: Query, m: Measure) -> tuple[str, str] | None:
    """A count over the same rows and cells as sum measure ``m``, if the query has one."""
    for other in query.measures:
        if other.by == m.by and other.where == m.where:
            if other.kind == "count":
                return other.name, "counts"
            if other.kind == "mean":
                return other.name, "count"
    return None


def local_release(
    frame: pd.DataFrame,
    query: Query,
    contract: Contract,
    *,
    min_cohort: int,
    small_cells: SmallCells = "publish-suppressed",
) -> LocalRelease:
    """Compute the node's noisy release of ``query`` on ``frame`` (see the module doc)."""
    ensure_valid(query, contract)
    if min_cohort < 0:
        raise ValueError("min_cohort must be >= 0")
    if small_cells not in ("publish-suppressed", "withhold"):
        raise ValueError(f"small_cells must be 'publish-suppressed' or 'withhold', not {small_cells!r}")
    prepared = prepare(frame, query, contract)
    k = query.rows_per_person(contract)
    family = query.privacy.mechanism

    noisy: dict[tuple[str, str], np.ndarray] = {}
    noise_of: dict[tuple[str, str], tuple[_Noise, int | float]] = {}
    for spec in query.parts():
        p = prepared[spec.measure]
        exact = true_parts(p)[spec.part]
        d_in, integer = part_sensitivity(p.measure, spec.part, contract, k)
        noise = _noise(family, integer, d_in, spec.epsilon, spec.delta)
        noisy[(spec.measure, spec.part)] = _noisy(noise, exact, integer)
        noise_of[(spec.measure, spec.part)] = (noise, d_in)
        del exact
    del prepared

    def below(v: np.ndarray) -> np.ndarray:
        return (v < min_cohort) if min_cohort > 0 else np.zeros(len(v), dtype=bool)

    small: dict[str, list[bool | None]] = {}
    for m in query.measures:
        if m.kind in ("count", "histogram"):
            flags = below(noisy[(m.name, "counts")])
        elif m.kind == "quantiles":
            g = cell_grid(m, contract)
            totals = noisy[(m.name, "counts")].reshape(g.n_groups, g.n_bins).sum(axis=1)
            flags = np.repeat(below(totals), g.n_bins)
        elif m.kind == "mean":
            flags = below(noisy[(m.name, "count")])
        elif m.kind == "ratio":
            flags = below(noisy[(m.name, "numerator")]) | below(noisy[(m.name, "denominator")])
        else:  # sum
            match = _matching_count(query, m)
            if match is None:
                n = len(noisy[(m.name, "sum")])
                small[m.name] = [None] * n if min_cohort > 0 else [False] * n
                continue
            flags = below(noisy[match])
        small[m.name] = [bool(f) for f in flags.tolist()]

    parts: list[PartRelease] = []
    withheld = 0
    for spec in query.parts():
        m = query.measure(spec.measure)
        noise, d_in = noise_of[(spec.measure, spec.part)]
        vals = noisy[(spec.measure, spec.part)]
        cell_flags = small[m.name]
        values: list[float | None] = [float(v) for v in vals.tolist()]
        if small_cells == "withhold":
            for i, f in enumerate(cell_flags):
                if f is True:
                    values[i] = None
                    withheld += 1
        parts.append(
            PartRelease(
                measure=m.name,
                kind=m.kind,
                part=spec.part,
                mechanism=noise.kind,
                opendp=noise.opendp,
                epsilon=spec.epsilon,
                delta=spec.delta,
                sensitivity=float(d_in),
                scale=noise.scale,
                noise_sd=noise.sd,
                cells=cell_grid(m, contract).keys(),
                values=values,
                small=list(cell_flags),
            )
        )
    eps = math.fsum(p.epsilon for p in parts)
    delta = math.fsum(p.delta for p in parts)
    log.info(
        "query %s: released %d part(s), %d cell(s), %d withheld; epsilon %g, delta %g",
        query.name, len(parts), sum(len(p.values) for p in parts), withheld, eps, delta,
    )
    return LocalRelease(
        query=query.name,
        contract=contract.ref,
        epsilon=eps,
        delta=delta,
        mechanism=Mechanism(kind=family, epsilon=eps, delta=delta),
        max_rows_per_person=k,
        min_cohort=min_cohort,
        small_cells=small_cells,
        parts=parts,
    )

