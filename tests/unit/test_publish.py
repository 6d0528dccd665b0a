"""Statistics fit to publish: post-processing (counts never negative, estimates inside their
intervals, intervals within the feasible range, raw values kept) and one number format."""

from __future__ import annotations

import math
import re
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.analytics import (
    POST_PROCESSING,
    Figure,
    LocalRelease,
    Query,
    clamp_figure,
    combine,
    feasible_range,
    format_interval,
    format_number,
    format_percent,
    local_release,
)
from fedgov.config.contract import Contract

# --------------------------------------------------------------------------- clamp_figure

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
maybe = st.one_of(st.none(), finite)


@st.composite
def ranges(draw: st.DrawFn) -> tuple[float, float]:
    """Feasible ranges as the kinds have them: [0, inf), [0, 1], [a, b], (-inf, 0], (-inf, inf)."""
    kind = draw(st.sampled_from(["count", "ratio", "bounded", "nonpositive", "free"]))
    if kind == "count":
        return 0.0, math.inf
    if kind == "ratio":
        return 0.0, 1.0
    if kind == "nonpositive":
        return -math.inf, 0.0
    if kind == "free":
        return -math.inf, math.inf
    a, b = draw(finite), draw(finite)
    return min(a, b), max(a, b)


@st.composite
def raw_figures(draw: st.DrawFn) -> tuple[float | None, float | None, float | None]:
    """(estimate, ci_low, ci_high): mostly an interval around its estimate, sometimes not
    (a quantile's re-simulated interval need not hold the estimate), or values missing."""
    est = draw(maybe)
    if est is not None and draw(st.booleans()):
        half = draw(st.floats(min_value=0, max_value=1e11))
        return est, est - half, est + half
    lo, hi = draw(maybe), draw(maybe)
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return est, lo, hi


@given(raw_figures(), ranges())
def test_published_values_lie_in_the_feasible_range_and_the_estimate_in_its_interval(
    raw: tuple[float | None, float | None, float | None], bounds: tuple[float, float]
) -> None:
    est, lo, hi = clamp_figure(*raw, *bounds)
    for v in (est, lo, hi):
        assert v is None or bounds[0] <= v <= bounds[1]
    assert (est is None) == (raw[0] is None) and (lo is None) == (raw[1] is None) and (hi is None) == (raw[2] is None)
    if lo is not None and hi is not None:
        assert lo <= hi
        if est is not None:
            assert lo <= est <= hi


@given(raw_figures(), ranges())
def test_post_processing_is_idempotent(raw: tuple[float | None, float | None, float | None], bounds: tuple[float, float]) -> None:
    once = clamp_figure(*raw, *bounds)
    assert clamp_figure(*once, *bounds) == once


@given(raw_figures(), st.floats(min_value=0, max_value=1e12))
def test_counts_are_never_negative(raw: tuple[float | None, float | None, float | None], truth: float) -> None:
    est, lo, hi = clamp_figure(*raw, *feasible_range("count"))
    assert all(v is None or v >= 0 for v in (est, lo, hi))
    # post-processing keeps every feasible value that the raw interval held: coverage is unchanged
    if raw[1] is not None and raw[2] is not None and raw[1] <= truth <= raw[2]:
        assert lo is not None and hi is not None and lo <= truth <= hi


@given(raw_figures(), ranges())
def test_what_was_feasible_is_left_alone(raw: tuple[float | None, float | None, float | None], bounds: tuple[float, float]) -> None:
    est, lo, hi = raw
    inside = all(v is None or bounds[0] <= v <= bounds[1] for v in raw)
    holds = est is None or ((lo is None or lo <= est) and (hi is None or est <= hi))
    if inside and holds:
        assert clamp_figure(*raw, *bounds) == raw


def test_the_issues_count() -> None:
    # a count of -74 with the interval 0 .. 26.14 (the raw interval cut at 0 alone): now 0 in 0 .. 26.14
    se = 26.14 / 1.96 + 74 / 1.96
    assert clamp_figure(-74.0, -74.0 - 1.96 * se, -74.0 + 1.96 * se, *feasible_range("count")) == (0.0, 0.0, pytest.approx(26.14))
    # a share above 1, a mean below the column's minimum
    assert clamp_figure(1.08, 0.9, 1.26, *feasible_range("ratio")) == (1.0, 0.9, 1.0)
    assert clamp_figure(-3.0, -9.0, 3.0, *feasible_range("mean", 1, 100)) == (1.0, 1.0, 3.0)
    # an interval that misses its estimate is widened to hold it
    assert clamp_figure(5.0, 6.0, 9.0, *feasible_range("quantiles", 0, 10)) == (5.0, 5.0, 9.0)
    with pytest.raises(ValueError, match="empty feasible range"):
        clamp_figure(1.0, 0.0, 2.0, 3.0, 2.0)


@pytest.mark.parametrize(
    ("kind", "col_min", "col_max", "expected"),
    [
        ("count", None, None, (0.0, math.inf)),
        ("histogram", 1, 100, (0.0, math.inf)),
        ("ratio", None, None, (0.0, 1.0)),
        ("mean", 1, 100, (1.0, 100.0)),
        ("quantiles", 0, 10, (0.0, 10.0)),
        ("sum", 0, 10, (0.0, math.inf)),
        ("sum", -5, 0, (-math.inf, 0.0)),
        ("sum", -5, 5, (-math.inf, math.inf)),
        ("mean", None, None, (-math.inf, math.inf)),
    ],
)
def test_feasible_ranges(kind: str, col_min: float | None, col_max: float | None, expected: tuple[float, float]) -> None:
    assert feasible_range(kind, col_min, col_max) == expected


def test_an_unknown_kind_has_no_range() -> None:
    with pytest.raises(ValueError, match="unknown measure kind"):
        feasible_range("median")


# --------------------------------------------------------------------------- in combine

CONTRACT = Contract.model_validate(
    {
        "name": "pub",
        "version": "1.0",
        "columns": [
            {"name": "cat", "type": "categorical", "categories": ["a", "b"]},
            {"name": "early", "type": "categorical", "categories": ["0", "1"]},
            {"name": "dur", "type": "integer", "min": 1, "max": 100},
        ],
    }
)
QUERY = Query.model_validate(
    {
        "name": "pub",
        "contract": "c.toml",
        "privacy": {"epsilon": 1.0, "max_rows_per_person": 1},
        "measures": [
            {"name": "n", "kind": "count", "by": ["cat"]},
            {"name": "m", "kind": "mean", "column": "dur"},
            {"name": "r", "kind": "ratio", "numerator": [{"column": "early", "op": "eq", "value": "1"}]},
        ],
    }
)
FRAME = pd.DataFrame({"cat": ["a", "b"] * 20, "early": ["0", "1", "1", "0"] * 10, "dur": list(range(1, 41))})


def _release(values: dict[tuple[str, str], list[float]]) -> LocalRelease:
    """A node's release with the given noisy values (the shapes of a real one)."""
    rel = local_release(FRAME, QUERY, CONTRACT, min_cohort=0)
    parts = [p.model_copy(update={"values": values.get((p.measure, p.part), p.values)}) for p in rel.parts]
    return rel.model_copy(update={"parts": parts})


def test_combine_publishes_clamped_figures_and_keeps_the_raw_ones() -> None:
    # noise pushed the national count of cat=a to -74, the share to 1.2 and the mean below 1
    a: dict[tuple[str, str], list[float]] = {
        ("n", "counts"): [-80.0, 30.0], ("m", "sum"): [-50.0], ("m", "count"): [40.0],
        ("r", "numerator"): [30.0], ("r", "denominator"): [25.0],
    }
    b: dict[tuple[str, str], list[float]] = {
        ("n", "counts"): [6.0, 12.0], ("m", "sum"): [10.0], ("m", "count"): [20.0],
        ("r", "numerator"): [6.0], ("r", "denominator"): [5.0],
    }
    res = combine({"GM0001": _release(a), "GM0002": _release(b)}, QUERY, CONTRACT, draws=0)
    assert res.post_processing == POST_PROCESSING
    n = res.figure("n", "cat=a")
    assert n.raw_estimate == -74.0 and n.estimate == 0.0 and n.clamped
    assert n.raw_ci_low is not None and n.raw_ci_high is not None and n.std_error is not None
    assert n.raw_ci_high == pytest.approx(-74.0 + 1.959963984540054 * n.std_error)
    assert n.ci_low == 0.0 and n.ci_high == pytest.approx(max(n.raw_ci_high, 0.0))
    ok = res.figure("n", "cat=b")
    assert ok.estimate == ok.raw_estimate == 42.0 and not ok.clamped
    r = res.figure("r")
    assert r.raw_estimate == pytest.approx(1.2) and r.estimate == 1.0 and r.ci_high == 1.0
    m = res.figure("m")
    assert m.raw_estimate == pytest.approx(-40.0 / 60.0) and m.estimate == 1.0
    for f in res.figures:
        assert (f.estimate is None) == (f.raw_estimate is None)
        if f.estimate is not None:
            assert f.ci_low is not None and f.ci_high is not None and f.ci_low <= f.estimate <= f.ci_high
        if f.kind == "count":
            assert all(v is None or v >= 0 for v in (f.estimate, f.ci_low, f.ci_high))
    # per node: GM0001's own count of cat=a is -80, published as 0
    node = res.figure("n", "cat=a", "node", "GM0001")
    assert node.raw_estimate == -80.0 and node.estimate == 0.0


values = st.floats(min_value=-500, max_value=500, allow_nan=False)


@settings(max_examples=30, deadline=None)
@given(st.lists(values, min_size=10, max_size=10), st.lists(values, min_size=10, max_size=10))
def test_every_combined_figure_is_fit_to_publish(x: list[float], y: list[float]) -> None:
    """Whatever the noise did to two nodes' releases: counts never negative, every estimate in
    its interval and its feasible range, post-processing idempotent, the raw figures additive."""
    def values_of(v: list[float]) -> dict[tuple[str, str], list[float]]:
        return {("n", "counts"): v[0:2], ("m", "sum"): v[2:3], ("m", "count"): [abs(v[3]) + 1],
                ("r", "numerator"): v[4:5], ("r", "denominator"): [abs(v[5]) + 1]}

    res = combine({"GM0001": _release(values_of(x)), "GM0002": _release(values_of(y))}, QUERY, CONTRACT, draws=0)
    bounds = {"n": feasible_range("count"), "m": feasible_range("mean", 1, 100), "r": feasible_range("ratio")}
    for f in res.figures:
        assert f.estimate is not None and f.ci_low is not None and f.ci_high is not None
        lo, hi = bounds[f.measure]
        assert lo <= f.ci_low <= f.estimate <= f.ci_high <= hi
        assert clamp_figure(f.estimate, f.ci_low, f.ci_high, lo, hi) == (f.estimate, f.ci_low, f.ci_high)
        assert clamp_figure(f.raw_estimate, f.raw_ci_low, f.raw_ci_high, lo, hi) == (f.estimate, f.ci_low, f.ci_high)
    for i, cell in enumerate(("cat=a", "cat=b")):
        assert res.figure("n", cell).raw_estimate == pytest.approx(x[i] + y[i])


def test_a_figure_without_raw_values_was_not_clamped() -> None:
    # a query.json written before fedgov kept raw values still reads, and claims no clamping
    old = Figure(measure="n", kind="count", scope="national", estimate=-3.0, ci_low=0.0, ci_high=4.0)
    assert not old.clamped


# --------------------------------------------------------------------------- number format


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (12173.0, "12,173"),
        (12170.4, "12,170"),
        (7279.0, "7,279"),
        (1234567.8, "1,234,568"),
        (999.96, "1,000"),
        (26.14, "26.14"),
        (26.0, "26"),
        (0.21754, "0.2175"),
        (0.5, "0.5"),
        (0.0001234, "0.0001234"),
        (0.0, "0"),
        (-74.0, "-74"),
        (-0.012345, "-0.01235"),
        (1.5e-7, "1.5e-07"),
        (2.5e16, "2.5e+16"),
        (math.inf, "inf"),
        (None, ""),
        (math.nan, ""),
    ],
)
def test_format_number(x: float | None, text: str) -> None:
    assert format_number(x) == text


def test_signed_intervals_and_percentages() -> None:
    assert format_number(3.0, signed=True) == "+3" and format_number(-3.0, signed=True) == "-3"
    assert format_number(0.0, signed=True) == "0"
    assert format_interval(0.0, 26.14) == "0 .. 26.14" and format_interval(None, 1.0) == ""
    assert format_interval(5_000.0, 12_173.2) == "5,000 .. 12,173"
    assert format_percent(0.012346, signed=True) == "+1.235%" and format_percent(None) == ""


@given(st.floats(min_value=1e-4, max_value=1e15 * 0.999, allow_nan=False))
def test_ordinary_magnitudes_are_never_scientific_and_read_back(x: float) -> None:
    for v in (x, -x):
        text = format_number(v)
        assert "e" not in text and re.fullmatch(r"-?\d{1,3}(,\d{3})*(\.\d+)?", text), text
        back = float(text.replace(",", ""))
        if abs(v) >= 999.5:  # whole numbers from 1,000 up
            assert back == pytest.approx(round(v), abs=0.5 + 1e-9 * abs(v))
        else:  # four significant digits below
            assert back == pytest.approx(v, rel=5e-4 + 1e-12)
