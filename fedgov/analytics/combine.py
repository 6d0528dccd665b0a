"""The coordinator's side of a statistics query: combining the nodes' noisy releases.

Everything here is post-processing of differentially private releases: it spends no privacy
budget, and may use numpy's random numbers (to re-simulate the known noise).

:func:`combine` adds the nodes' parts up per cell, for the whole country, per value of each
region column and per node, and derives every figure with an estimate, a standard error and a
95% interval:

* counts, sums, histogram bins: the sum of the noisy values; the variance is the sum of the
  nodes' noise variances (the noise of different nodes, and of different parts, is
  independent). The interval is ``estimate +- 1.96 se`` (normal approximation), except when
  a count or sum rests on one node of a Laplace query: then it is the exact Laplace interval,
  ``estimate +- 2.12 se`` (:data:`LAPLACE_Z`).
* means and ratios: ratio estimates ``S / C`` and ``N / D`` of noisy totals; their standard
  error by the delta method, ``sqrt(var S + m^2 var C) / C`` (``m`` the estimate clamped into
  its range). A denominator below 1 gives no estimate.
* quantiles: from the combined noisy histogram's cumulative counts, made monotone (the mean of
  the running maximum from the left and the running minimum from the right: a vectorised
  stand-in for isotonic regression), cut at 0, and inverted with linear interpolation within a
  bin. The standard error and a percentile 95% interval come from re-simulating the known
  noise ``draws`` times (normal noise with the summed variance; Laplace noise when a figure
  rests on one node of a Laplace query); the interval is then widened to the edges of the
  bins its ends fall in, so that it also covers the binning error (how the values lie within
  a bin is not released). The standard error is the noise's alone.

Every figure is then post-processed to be fit to publish (:mod:`fedgov.analytics.publish`,
no privacy cost): its estimate and interval are clamped into the range the statistic can take
(counts at least 0, shares in ``[0, 1]``, means within the column's bounds), the interval
widened to hold its estimate. ``estimate``, ``ci_low`` and ``ci_high`` are these published
values; ``raw_estimate``, ``raw_ci_low`` and ``raw_ci_high`` the unbiased ones before (which
national = sum of the regions = sum of the nodes holds for, for counts and sums).

The figures estimate the population statistic of the bounded, clamped data: the only random
error is the DP noise, so a standard error is the noise's, not a sampling error.

Completeness and suppression: a node may withhold small cells. A figure to which some nodes
sent nothing has ``withheld > 0`` and ``incomplete = True`` (a count is then a lower bound). A
per-node figure whose cell the node flagged small (or could not check: a sum without a count),
or withheld, is never published: its numbers are None and ``suppressed = True``. The same
holds for a national or regional figure that rests on a single node. Sums over two or more
nodes are published; differencing them against published per-node figures is bounded by
differential privacy, not by the cohort rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fedgov.analytics.local import LocalRelease, PartRelease, prepare, true_parts
from fedgov.analytics.publish import POST_PROCESSING, clamp_figure, feasible_range
from fedgov.analytics.query import CellGrid, Measure, MeasureKind, Query, cell_grid, ensure_valid
from fedgov.config.contract import Contract

__all__ = [
    "Scope",
    "Figure",
    "QueryResult",
    "FigureError",
    "MeasureError",
    "Comparison",
    "Z95",
    "LAPLACE_Z",
    "combine",
    "true_result",
    "compare",
]

Scope = Literal["national", "region", "node"]
Z95 = 1.959963984540054
LAPLACE_Z = math.log(20.0) / math.sqrt(2.0)
"""Half-width of a 95% interval of one Laplace variable, in standard deviations (2.118)."""

_NO_REGIONS: Mapping[str, Mapping[str, str]] = MappingProxyType({})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Figure(_Model):
    """One published number: a measure's cell in one scope.

    ``cell`` is ``"col=value;..."`` of the ``by`` cell, plus ``bin=[a, b)`` for a histogram
    bin or ``q=0.5`` for a quantile ("" for a measure without ``by``). ``nodes`` counts the
    nodes whose data are in the figure, ``withheld`` those in the scope that sent nothing for
    the cell.

    ``estimate``, ``ci_low`` and ``ci_high`` are the published values, post-processed into the
    figure's feasible range (:mod:`fedgov.analytics.publish`); ``raw_estimate``, ``raw_ci_low``
    and ``raw_ci_high`` are the unbiased values before post-processing (equal where nothing
    was clamped; None where the figure has no value).
    """

    measure: str
    kind: MeasureKind
    scope: Scope
    scope_value: str = ""
    cell: str = ""
    estimate: float | None
    std_error: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    nodes: int = 0
    withheld: int = 0
    incomplete: bool = False
    suppressed: bool = False
    raw_estimate: float | None = Field(default=None, description="the unbiased estimate before post-processing")
    raw_ci_low: float | None = Field(default=None, description="the 95% interval's lower end before post-processing")
    raw_ci_high: float | None = Field(default=None, description="the 95% interval's upper end before post-processing")

    @property
    def clamped(self) -> bool:
        """Whether post-processing changed the estimate or its interval (False for a figure of a
        report written before fedgov kept raw values: it has none)."""
        raw = (self.raw_estimate, self.raw_ci_low, self.raw_ci_high)
        return raw != (None, None, None) and (self.estimate, self.ci_low, self.ci_high) != raw

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.measure, self.scope, self.scope_value, self.cell)


class QueryResult(_Model):
    """All figures of a query, national, per region value and per node."""

    query: str
    contract: str
    noisy: bool = True
    epsilon: float
    delta: float
    mechanism: str
    max_rows_per_person: int
    nodes: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)
    regions: dict[str, list[str]] = Field(default_factory=dict)
    figures: list[Figure] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    post_processing: str = Field(default=POST_PROCESSING, description="which of a figure's values are published, which raw")

    def select(
        self, measure: str | None = None, scope: Scope | None = None, scope_value: str | None = None
    ) -> list[Figure]:
        return [
            f
            for f in self.figures
            if (measure is None or f.measure == measure)
            and (scope is None or f.scope == scope)
            and (scope_value is None or f.scope_value == scope_value)
        ]

    def figure(self, measure: str, cell: str = "", scope: Scope = "national", scope_value: str = "") -> Figure:
        for f in self.figures:
            if f.measure == measure and f.cell == cell and f.scope == scope and f.scope_value == scope_value:
                return f
        raise KeyError((measure, scope, scope_value, cell))

    def national(self, measure: str) -> dict[str, Figure]:
        """The national figures of ``measure`` by cell."""
        return {f.cell: f for f in self.select(measure, "national")}


class FigureError(_Model):
    """A noisy figure beside its true value."""

    measure: str
    scope: Scope
    scope_value: str
    cell: str
    estimate: float | None
    truth: float | None
    abs_error: float | None
    rel_error: float | None = Field(description="abs_error / |truth|; None when the truth is 0")
    covered: bool | None = Field(default=None, description="whether the 95% interval holds the truth")


class MeasureError(_Model):
    """Errors of one measure in one scope kind, over its figures with an estimate."""

    measure: str
    scope: Scope
    figures: int
    median_abs_error: float | None
    median_rel_error: float | None
    max_rel_error: float | None
    coverage: float | None


class Comparison(_Model):
    figures: list[FigureError] = Field(default_factory=list)
    summary: list[MeasureError] = Field(default_factory=list)

    def by_key(self) -> dict[tuple[str, str, str, str], FigureError]:
        return {(f.measure, f.scope, f.scope_value, f.cell): f for f in self.figures}


# --------------------------------------------------------------------------- scopes


def _scopes(
    nodes: Sequence[str], query: Query, regions: Mapping[str, Mapping[str, str]]
) -> tuple[list[tuple[Scope, str, np.ndarray]], dict[str, list[str]], list[str]]:
    """(scope, value, node indices) for national, every region value and every node."""
    out: list[tuple[Scope, str, np.ndarray]] = [("national", "", np.arange(len(nodes)))]
    seen: dict[str, list[str]] = {}
    notes: list[str] = []
    for col in query.regions:
        by_value: dict[str, list[int]] = {}
        unmapped = []
        for i, n in enumerate(nodes):
            v = (regions.get(n) or {}).get(col)
            if v is None:
                unmapped.append(n)
            else:
                by_value.setdefault(str(v), []).append(i)
        if unmapped:
            notes.append(f"{len(unmapped)} node(s) have no '{col}' and are in no '{col}' region: {', '.join(unmapped[:10])}")
        seen[col] = sorted(by_value)
        for v in sorted(by_value):
            out.append(("region", f"{col}={v}", np.array(by_value[v], dtype=np.int64)))
    for i, n in enumerate(nodes):
        out.append(("node", n, np.array([i], dtype=np.int64)))
    return out, seen, notes


# --------------------------------------------------------------------------- quantiles


def _quantiles(counts: np.ndarray, edges: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles from (noisy) bin counts ``(..., B)``: monotone CDF, linear within bins.

    Returns ``(..., Q)``; NaN where the total is not positive.
    """
    cum = np.cumsum(counts, axis=-1, dtype=np.float64)
    up = np.maximum.accumulate(cum, axis=-1)
    down = np.flip(np.minimum.accumulate(np.flip(cum, axis=-1), axis=-1), axis=-1)
    cdf = np.maximum((up + down) / 2.0, 0.0)
    total = cdf[..., -1]
    f0 = np.concatenate([np.zeros(cdf.shape[:-1] + (1,)), cdf], axis=-1)
    n_bins = counts.shape[-1]
    out = np.empty(counts.shape[:-1] + (len(qs),), dtype=np.float64)
    for i, q in enumerate(qs):
        t = q * total
        j = np.argmax(f0 >= t[..., None], axis=-1)
        j = np.clip(j, 1, n_bins)
        lo = np.take_along_axis(f0, (j - 1)[..., None], axis=-1)[..., 0]
        hi = np.take_along_axis(f0, j[..., None], axis=-1)[..., 0]
        width = hi - lo
        frac = np.divide(t - lo, width, out=np.zeros_like(t), where=width > 0)
        x = edges[j - 1] + np.clip(frac, 0.0, 1.0) * (edges[j] - edges[j - 1])
        out[..., i] = np.where(total > 0, x, np.nan)
    return out


def _empirical_quantiles(values: np.ndarray, qs: Sequence[float]) -> list[float | None]:
    if len(values) == 0:
        return [None] * len(qs)
    return [float(v) for v in np.quantile(values, list(qs))]


# --------------------------------------------------------------------------- figures


def _fmt_q(q: float) -> str:
    return f"q={q:g}"


def _join(a: str, b: str) -> str:
    return f"{a};{b}" if a else b


def _opt(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Builder:
    """Turns per-scope totals into figures for one measure."""

    def __init__(self, m: Measure, grid: CellGrid, contract: Contract) -> None:
        self.m = m
        self.grid = grid
        self.keys = grid.keys()
        self.group_keys = grid.group_keys()
        self.lo, self.hi = -math.inf, math.inf
        if m.column is not None:
            col = contract.column(m.column)
            assert col.min is not None and col.max is not None
            self.lo, self.hi = float(col.min), float(col.max)
        self.feasible = feasible_range(m.kind, self.lo, self.hi)

    def _fig(
        self, scope: Scope, value: str, cell: str, *, estimate: float | None, std_error: float | None = None,
        ci_low: float | None = None, ci_high: float | None = None, nodes: int = 0, withheld: int = 0,
        incomplete: bool = False, suppressed: bool = False,
    ) -> Figure:
        """A figure from its raw (unbiased) values, published post-processed into its feasible range."""
        est, lo, hi = clamp_figure(estimate, ci_low, ci_high, *self.feasible)
        return Figure(
            measure=self.m.name, kind=self.m.kind, scope=scope, scope_value=value, cell=cell, estimate=est,
            std_error=std_error, ci_low=lo, ci_high=hi, nodes=nodes, withheld=withheld,
            incomplete=incomplete, suppressed=suppressed, raw_estimate=estimate, raw_ci_low=ci_low, raw_ci_high=ci_high,
        )

    def suppressed(self, scope: Scope, value: str, cell: str, nodes: int, withheld: int) -> Figure:
        return self._fig(scope, value, cell, estimate=None, nodes=nodes, withheld=withheld, incomplete=withheld > 0, suppressed=True)

    def simple(
        self, scope: Scope, value: str, est: np.ndarray, var: np.ndarray, sent: np.ndarray, n_scope: int,
        suppress: np.ndarray, laplace_single: bool,
    ) -> list[Figure]:
        """count, sum, histogram: one figure per cell."""
        out = []
        for i, cell in enumerate(self.keys):
            n, w = int(sent[i]), n_scope - int(sent[i])
            if suppress[i]:
                out.append(self.suppressed(scope, value, cell, n, w))
                continue
            if n == 0:
                out.append(self._fig(scope, value, cell, estimate=None, nodes=0, withheld=w, incomplete=w > 0))
                continue
            se = math.sqrt(max(float(var[i]), 0.0))
            z = LAPLACE_Z if (laplace_single and n == 1) else Z95
            e = float(est[i])
            lo, hi = e - z * se, e + z * se
            out.append(self._fig(scope, value, cell, estimate=e, std_error=se, ci_low=lo, ci_high=hi, nodes=n, withheld=w, incomplete=w > 0))
        return out

    def ratio(
        self, scope: Scope, value: str, num: np.ndarray, var_num: np.ndarray, den: np.ndarray, var_den: np.ndarray,
        sent: np.ndarray, n_scope: int, suppress: np.ndarray,
    ) -> list[Figure]:
        """mean (S / C) and ratio (N / D): delta-method standard errors."""
        lo_b, hi_b = self.feasible  # the column's bounds for a mean, [0, 1] for a ratio
        out = []
        for i, cell in enumerate(self.keys):
            n, w = int(sent[i]), n_scope - int(sent[i])
            if suppress[i]:
                out.append(self.suppressed(scope, value, cell, n, w))
                continue
            d = float(den[i])
            if n == 0 or not d >= 1.0:
                out.append(self._fig(scope, value, cell, estimate=None, nodes=n, withheld=w, incomplete=w > 0))
                continue
            raw = float(num[i]) / d
            r = min(max(raw, lo_b), hi_b)  # the delta method's ratio: within its range
            se = math.sqrt(max(float(var_num[i]) + r * r * float(var_den[i]), 0.0)) / d
            lo, hi = raw - Z95 * se, raw + Z95 * se
            out.append(self._fig(scope, value, cell, estimate=raw, std_error=se, ci_low=lo, ci_high=hi, nodes=n, withheld=w, incomplete=w > 0))
        return out

    def quantiles(
        self, scope: Scope, value: str, counts: np.ndarray, var: np.ndarray, sent: np.ndarray, n_scope: int,
        suppress: np.ndarray, laplace_single: bool, rng: np.random.Generator | None, draws: int,
    ) -> list[Figure]:
        """Quantile figures per ``by`` cell; ``counts``/``var``/``sent``/``suppress`` are per bin."""
        g = self.grid
        assert g.edges is not None and self.m.quantiles is not None
        qs = list(self.m.quantiles)
        edges = np.asarray(g.edges, dtype=np.float64)
        c = counts.reshape(g.n_groups, g.n_bins)
        v = var.reshape(g.n_groups, g.n_bins)
        sent_g = sent.reshape(g.n_groups, g.n_bins).min(axis=1)
        supp_g = np.any(np.asarray(suppress).reshape(g.n_groups, g.n_bins), axis=1)
        est = _quantiles(c, edges, qs)
        out = []
        for gi, gkey in enumerate(self.group_keys):
            n, w = int(sent_g[gi]), n_scope - int(sent_g[gi])
            if supp_g[gi]:
                out += [self.suppressed(scope, value, _join(gkey, _fmt_q(q)), n, w) for q in qs]
                continue
            if n == 0 or not np.isfinite(est[gi]).all():
                out += [
                    self._fig(scope, value, _join(gkey, _fmt_q(q)), estimate=None, nodes=n, withheld=w, incomplete=w > 0)
                    for q in qs
                ]
                continue
            se_q = np.full(len(qs), np.nan)
            lo_q = np.full(len(qs), np.nan)
            hi_q = np.full(len(qs), np.nan)
            if rng is not None and draws > 1:
                sd = np.sqrt(np.maximum(v[gi], 0.0))
                if laplace_single and n == 1:
                    noise = rng.laplace(0.0, 1.0, size=(draws, g.n_bins)) * (sd / math.sqrt(2.0))
                else:
                    noise = rng.standard_normal(size=(draws, g.n_bins)) * sd
                sim = _quantiles(c[gi][None, :] + noise, edges, qs)  # (draws, Q)
                ok = np.isfinite(sim).all(axis=1)
                if ok.sum() >= 2:
                    sim = sim[ok]
                    se_q = sim.std(axis=0, ddof=1)
                    lo_q, hi_q = np.percentile(sim, [2.5, 97.5], axis=0)
                    # widen to the edges of the bins the ends fall in: within a bin the data's
                    # distribution is unknown, so the interval covers the binning error too
                    lo_q = edges[np.clip(np.searchsorted(edges, lo_q, side="right") - 1, 0, g.n_bins - 1)]
                    hi_q = edges[np.clip(np.searchsorted(edges, hi_q, side="left"), 1, g.n_bins)]
            for qi, q in enumerate(qs):
                out.append(
                    self._fig(
                        scope, value, _join(gkey, _fmt_q(q)),
                        estimate=float(est[gi, qi]), std_error=_opt(float(se_q[qi])),
                        ci_low=_opt(float(lo_q[qi])), ci_high=_opt(float(hi_q[qi])),
                        nodes=n, withheld=w, incomplete=w > 0,
                    )
                )
        return out


# --------------------------------------------------------------------------- combine


def _check_release(release: object, query: Query, contract: Contract, expected: Mapping[tuple[str, str], list[str]]) -> str | None:
    if not isinstance(release, LocalRelease):
        return "not a LocalRelease"
    if release.query != query.name:
        return f"release is for query '{release.query}', not '{query.name}'"
    if release.contract != contract.ref:
        return f"release is for contract {release.contract}, not {contract.ref}"
    got: dict[tuple[str, str], PartRelease] = {(p.measure, p.part): p for p in release.parts}
    if set(got) != set(expected):
        return "release parts do not match the query's measures"
    for key, cells in expected.items():
        p = got[key]
        if p.cells != cells or len(p.values) != len(cells) or len(p.small) != len(cells):
            return f"part {key[0]}/{key[1]}: cells do not match the query's public cell grid"
        if not (math.isfinite(p.noise_sd) and p.noise_sd >= 0):
            return f"part {key[0]}/{key[1]}: invalid noise_sd"
        if any(v is not None and not math.isfinite(v) for v in p.values):
            return f"part {key[0]}/{key[1]}: a value is not finite"
    return None


def combine(
    releases: Mapping[str, LocalRelease],
    query: Query,
    contract: Contract,
    *,
    regions: Mapping[str, Mapping[str, str]] = _NO_REGIONS,
    draws: int = 200,
    seed: int | None = 0,
) -> QueryResult:
    """Combine the nodes' :class:`~fedgov.analytics.local.LocalRelease` objects into figures.

    ``releases`` maps node code to release; ``regions`` maps node code to ``{region column:
    value}`` for the query's ``regions``. A release that does not fit the query (another
    query, other cells) is left out and listed in ``QueryResult.rejected``. ``draws`` and
    ``seed`` drive the re-simulation of quantile errors (post-processing; ``seed=None`` for
    fresh randomness).
    """
    ensure_valid(query, contract)
    grids = {m.name: cell_grid(m, contract) for m in query.measures}
    expected: dict[tuple[str, str], list[str]] = {(m.name, p): grids[m.name].keys() for m in query.measures for p in m.part_names}
    good: dict[str, LocalRelease] = {}
    rejected: dict[str, str] = {}
    for node in sorted(releases):
        rel = releases[node]
        reason = _check_release(rel, query, contract, expected)
        if reason is None:
            good[node] = rel
        else:
            rejected[node] = reason
    nodes = list(good)
    scopes, seen, notes = _scopes(nodes, query, regions)
    if rejected:
        notes.append(f"{len(rejected)} release(s) rejected")
    laplace = query.privacy.mechanism == "laplace"
    rng = np.random.default_rng(seed) if draws > 1 else None

    figures: list[Figure] = []
    n_nodes = len(nodes)
    for m in query.measures:
        grid = grids[m.name]
        size = grid.size
        vals: dict[str, np.ndarray] = {}
        var_node: dict[str, np.ndarray] = {}
        present = np.ones((n_nodes, size), dtype=bool)
        unsafe = np.zeros((n_nodes, size), dtype=bool)  # small or unknown: never per node
        for p in m.part_names:
            v = np.full((n_nodes, size), np.nan)
            sd2 = np.zeros(n_nodes)
            for i, node in enumerate(nodes):
                part = good[node].part(m.name, p)
                v[i] = np.array([np.nan if x is None else x for x in part.values], dtype=np.float64)
                sd2[i] = part.noise_sd**2
                unsafe[i] |= np.array([s is not False for s in part.small], dtype=bool)
            present &= ~np.isnan(v)
            vals[p] = v
            var_node[p] = sd2
        b = _Builder(m, grid, contract)
        for scope, value, idx in scopes:
            pres = present[idx]
            sent = pres.sum(axis=0)
            tot = {p: np.where(pres, vals[p][idx], 0.0).sum(axis=0) for p in m.part_names}
            var = {p: (pres * var_node[p][idx][:, None]).sum(axis=0) for p in m.part_names}
            # a figure that rests on one node follows that node's suppression
            single = sent == 1
            lone_unsafe = (unsafe[idx] & pres).any(axis=0)
            suppress = (single & lone_unsafe) if scope != "node" else (unsafe[idx[0]] | ~pres[0])
            n_scope = len(idx)
            if m.kind in ("count", "sum", "histogram"):
                part_name = m.part_names[0]
                figures += b.simple(scope, value, tot[part_name], var[part_name], sent, n_scope, suppress, laplace)
            elif m.kind == "mean":
                figures += b.ratio(scope, value, tot["sum"], var["sum"], tot["count"], var["count"], sent, n_scope, suppress)
            elif m.kind == "ratio":
                figures += b.ratio(
                    scope, value, tot["numerator"], var["numerator"], tot["denominator"], var["denominator"], sent, n_scope, suppress
                )
            else:
                figures += b.quantiles(scope, value, tot["counts"], var["counts"], sent, n_scope, suppress, laplace, rng, draws)
    return QueryResult(
        query=query.name,
        contract=contract.ref,
        noisy=True,
        epsilon=query.privacy.epsilon,
        delta=query.privacy.delta,
        mechanism=query.privacy.mechanism,
        max_rows_per_person=query.rows_per_person(contract),
        nodes=nodes,
        rejected=rejected,
        regions=seen,
        figures=figures,
        notes=notes,
    )


# --------------------------------------------------------------------------- truth


def true_result(
    frames: Mapping[str, pd.DataFrame],
    query: Query,
    contract: Contract,
    regions: Mapping[str, Mapping[str, str]] = _NO_REGIONS,
) -> QueryResult:
    """The query's figures without noise, with the same filtering, bounding and clamping.

    For simulations only (it needs every node's data). Quantiles are the exact empirical
    quantiles (numpy's linear interpolation) of the bounded, clamped values, so that a
    comparison shows the binning error as well as the noise.
    """
    ensure_valid(query, contract)
    nodes = sorted(frames)
    prepared = {n: prepare(frames[n], query, contract) for n in nodes}
    scopes, seen, notes = _scopes(nodes, query, regions)
    figures: list[Figure] = []
    for m in query.measures:
        grid = cell_grid(m, contract)
        b = _Builder(m, grid, contract)
        if m.kind == "quantiles":
            assert m.quantiles is not None
            qs = list(m.quantiles)
            for scope, value, idx in scopes:
                ps = [prepared[nodes[i]][m.name] for i in idx]
                group = np.concatenate([p.group for p in ps]) if ps else np.zeros(0, dtype=np.int64)
                x = np.concatenate([p.values for p in ps if p.values is not None]) if ps else np.zeros(0)
                order = np.lexsort((x, group))
                group, x = group[order], x[order]
                bounds = np.searchsorted(group, np.arange(grid.n_groups + 1))
                for gi, gkey in enumerate(grid.group_keys()):
                    qv = _empirical_quantiles(x[bounds[gi] : bounds[gi + 1]], qs)
                    for q, e in zip(qs, qv, strict=True):
                        figures.append(b._fig(scope, value, _join(gkey, _fmt_q(q)), estimate=e, std_error=0.0 if e is not None else None,
                                              ci_low=e, ci_high=e, nodes=len(idx)))
            continue
        exact = {n: true_parts(prepared[n][m.name]) for n in nodes}
        for scope, value, idx in scopes:
            tot = {
                p: np.sum([exact[nodes[i]][p].astype(np.float64) for i in idx], axis=0) if len(idx) else np.zeros(grid.size)
                for p in m.part_names
            }
            for i, cell in enumerate(grid.keys()):
                if m.kind in ("count", "sum", "histogram"):
                    est: float | None = float(tot[m.part_names[0]][i])
                else:
                    num, den = (tot["sum"][i], tot["count"][i]) if m.kind == "mean" else (tot["numerator"][i], tot["denominator"][i])
                    est = float(num / den) if den > 0 else None
                figures.append(
                    b._fig(scope, value, cell, estimate=est, std_error=0.0 if est is not None else None, ci_low=est, ci_high=est, nodes=len(idx))
                )
    return QueryResult(
        query=query.name,
        contract=contract.ref,
        noisy=False,
        epsilon=0.0,
        delta=0.0,
        mechanism="none",
        max_rows_per_person=query.rows_per_person(contract),
        nodes=nodes,
        regions=seen,
        figures=figures,
        notes=notes,
    )


def compare(noisy: QueryResult, truth: QueryResult) -> Comparison:
    """Absolute and relative error of every noisy figure against the true one."""
    true_by = {f.key: f for f in truth.figures}
    rows: list[FigureError] = []
    for f in noisy.figures:
        t = true_by.get(f.key)
        tv = t.estimate if t is not None else None
        if f.estimate is None or tv is None:
            rows.append(FigureError(measure=f.measure, scope=f.scope, scope_value=f.scope_value, cell=f.cell,
                                    estimate=f.estimate, truth=tv, abs_error=None, rel_error=None))
            continue
        err = abs(f.estimate - tv)
        covered = None
        if f.ci_low is not None and f.ci_high is not None:
            covered = f.ci_low <= tv <= f.ci_high
        rows.append(
            FigureError(
                measure=f.measure, scope=f.scope, scope_value=f.scope_value, cell=f.cell, estimate=f.estimate, truth=tv,
                abs_error=err, rel_error=err / abs(tv) if tv != 0 else None, covered=covered,
            )
        )
    summary: list[MeasureError] = []
    groups: dict[tuple[str, Scope], list[FigureError]] = {}
    for r in rows:
        groups.setdefault((r.measure, r.scope), []).append(r)
    for (measure, scope), rs in groups.items():
        errs = [r.abs_error for r in rs if r.abs_error is not None]
        rels = [r.rel_error for r in rs if r.rel_error is not None]
        cov = [r.covered for r in rs if r.covered is not None]
        summary.append(
            MeasureError(
                measure=measure, scope=scope, figures=len(errs),
                median_abs_error=float(np.median(errs)) if errs else None,
                median_rel_error=float(np.median(rels)) if rels else None,
                max_rel_error=float(max(rels)) if rels else None,
                coverage=float(np.mean(cov)) if cov else None,
            )
        )
    return Comparison(figures=rows, summary=summary)
