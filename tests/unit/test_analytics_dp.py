"""Federated DP statistics: the node's noisy release (OpenDP noise, bounding, clamping, small
cells), the coordinator's combination (national, regions, nodes; suppression), the writers,
and a 342-node scale test."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgov.analytics import (
    CSV_COLUMNS,
    LocalRelease,
    Query,
    QueryNode,
    QueryReport,
    bound_contributions,
    combine,
    compare,
    load_query_report,
    local_release,
    prepare,
    true_parts,
    true_result,
    write_outputs,
)
from fedgov.config.contract import Contract
from fedgov.node.ledger import Mechanism

CONTRACT = Contract.model_validate(
    {
        "name": "mini-wmo",
        "version": "1.0",
        "person_id": "pid",
        "columns": [
            {"name": "pid", "type": "string"},
            {"name": "prov", "type": "string", "description": "region: from the node's registry, not read from the data"},
            {"name": "cat", "type": "categorical", "categories": ["a", "b", "c"]},
            {"name": "grp", "type": "categorical", "categories": ["x", "y"], "nullable": True},
            {"name": "early", "type": "categorical", "categories": ["0", "1"]},
            {"name": "ongoing", "type": "boolean"},
            {"name": "dur", "type": "integer", "min": 1, "max": 100},
            {"name": "vol", "type": "float", "min": 0, "max": 10},
        ],
    }
)
NO_PID = CONTRACT.model_copy(update={"person_id": None})


def _query(measures: list[dict[str, Any]], epsilon: float = 1.0, **privacy: Any) -> Query:
    return Query.model_validate(
        {"name": "t", "contract": "c.toml", "regions": ["prov"], "privacy": {"epsilon": epsilon, **privacy}, "measures": measures}
    )


def _frame(rng: np.random.Generator, n: int, *, persons: int | None = None, prefix: str = "p") -> pd.DataFrame:
    pid = rng.integers(0, persons, n) if persons else np.arange(n)
    return pd.DataFrame(
        {
            "pid": [f"{prefix}{i}" for i in pid],
            "cat": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2]),
            "grp": rng.choice(np.array(["x", "y", None], dtype=object), n),
            "early": rng.choice(["0", "1"], n, p=[0.7, 0.3]),
            "ongoing": rng.random(n) < 0.4,
            "dur": rng.integers(-20, 130, n),  # partly outside [1, 100]: clamped
            "vol": rng.random(n) * 12.0,  # partly outside [0, 10]: clamped
        }
    )


ALL_KINDS: list[dict[str, Any]] = [
    {"name": "n", "kind": "count", "by": ["cat", "grp"], "weight": 2},
    {"name": "s", "kind": "sum", "column": "vol", "by": ["cat"]},
    {"name": "m", "kind": "mean", "column": "dur", "by": ["cat"]},
    {"name": "r", "kind": "ratio", "numerator": [{"column": "early", "op": "eq", "value": "1"}], "by": ["cat"]},
    {"name": "h", "kind": "histogram", "column": "dur", "edges": [0, 10, 50, 100]},
    {"name": "q", "kind": "quantiles", "column": "vol", "quantiles": [0.25, 0.5, 0.75], "bins": 40},
]


# --------------------------------------------------------------------------- the node's release


def test_release_shape_budget_and_no_data() -> None:
    rng = np.random.default_rng(1)
    frame = _frame(rng, 800, persons=500)
    q = _query(ALL_KINDS, epsilon=1.5, max_rows_per_person=2)
    rel = local_release(frame, q, CONTRACT, min_cohort=5)
    assert rel.epsilon == 1.5 and rel.delta == 0.0
    assert rel.mechanism == Mechanism(kind="laplace", epsilon=1.5, delta=0.0) == q.mechanism()
    assert sum(p.epsilon for p in rel.parts) == 1.5
    assert rel.max_rows_per_person == 2 and rel.min_cohort == 5
    assert [(p.measure, p.part) for p in rel.parts] == [(s.measure, s.part) for s in q.parts()]
    for p in rel.parts:
        assert len(p.cells) == len(p.values) == len(p.small)
        assert p.noise_sd > 0 and p.scale > 0
        assert p.mechanism == ("laplace" if p.part == "sum" and p.measure == "s" else "discrete_laplace")
    assert len(rel.part("q", "counts").values) == 40
    assert len(rel.part("n", "counts").values) == 9
    # counts and integer sums stay integers; nothing row-level travels
    assert all(float(v).is_integer() for v in rel.part("n", "counts").values if v is not None)
    text = rel.model_dump_json()
    assert "p1" not in text.replace("part", "")
    assert LocalRelease.model_validate_json(text) == rel


def test_noise_comes_from_opendp_not_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("numpy randomness used for DP noise")

    for name in ("default_rng", "laplace", "normal", "random", "randint", "RandomState", "Generator"):
        monkeypatch.setattr(np.random, name, forbidden)
    frame = _rng_free_frame()
    rel = local_release(frame, _query(ALL_KINDS), CONTRACT, min_cohort=0)
    assert rel.parts


def _rng_free_frame() -> pd.DataFrame:
    n = 300
    i = np.arange(n)
    return pd.DataFrame(
        {
            "pid": [f"p{k}" for k in i],
            "cat": np.array(["a", "b", "c"])[i % 3],
            "grp": np.array(["x", "y"], dtype=object)[i % 2],
            "early": np.array(["0", "1"])[(i // 3) % 2],
            "ongoing": i % 5 == 0,
            "dur": (i * 7) % 100 + 1,
            "vol": (i % 40) / 4.0,
        }
    )


def test_opendp_calibration_meets_each_parts_budget() -> None:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    frame = _rng_free_frame()
    for privacy in ({"mechanism": "laplace"}, {"mechanism": "gaussian", "delta": 1e-6}):
        q = _query(ALL_KINDS, epsilon=0.7, max_rows_per_person=3, **privacy)
        rel = local_release(frame, q, CONTRACT, min_cohort=0)
        assert rel.epsilon == 0.7 and rel.delta == q.privacy.delta
        assert rel.mechanism == q.mechanism()
        for p in rel.parts:
            integer = p.mechanism.startswith("discrete")
            atom = dp.atom_domain(T="i64") if integer else dp.atom_domain(T=float, nan=False)
            dom = dp.vector_domain(atom)
            d_in = int(p.sensitivity) if integer else p.sensitivity
            if privacy["mechanism"] == "laplace":
                meas = dp.m.make_laplace(dom, dp.l1_distance(T="i64" if integer else float), scale=p.scale)
                assert meas.map(d_in) <= p.epsilon
            else:
                g = dp.m.make_gaussian(dom, dp.l2_distance(T="i64" if integer else float), scale=p.scale)
                eps, delta = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(g), p.delta).map(d_in)
                assert eps <= p.epsilon and delta <= p.delta
            # the count sensitivity is k rows; a sum's is k * max(|min|, |max|)
            if p.part == "sum":
                bound = 100 if p.measure == "m" else 10
                assert p.sensitivity == pytest.approx(3 * bound, rel=1e-5) and p.sensitivity >= 3 * bound
            else:
                assert p.sensitivity == 3


@pytest.mark.statistical
@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noise_is_unbiased_and_its_spread_matches_the_stated_sd(mechanism: str) -> None:
    rng = np.random.default_rng(7)
    frame = _frame(rng, 400, persons=400)
    privacy = {"mechanism": mechanism, "delta": 1e-5} if mechanism == "gaussian" else {}
    q = _query(
        [
            {"name": "n", "kind": "count", "by": ["cat"]},
            {"name": "s", "kind": "sum", "column": "vol", "by": ["cat"]},
            {"name": "m", "kind": "mean", "column": "dur", "by": ["cat"]},
        ],
        epsilon=2.0,
        **privacy,
    )
    truth = {k: v.astype(float) for name, p in prepare(frame, q, CONTRACT).items() for k, v in _named(name, true_parts(p)).items()}
    reps = 700
    draws: dict[tuple[str, str], list[list[float]]] = {k: [] for k in truth}
    sds: dict[tuple[str, str], float] = {}
    for _ in range(reps):
        rel = local_release(frame, q, CONTRACT, min_cohort=0)
        for p in rel.parts:
            draws[(p.measure, p.part)].append([float(v) for v in p.values if v is not None])
            sds[(p.measure, p.part)] = p.noise_sd
    for key, exact in truth.items():
        x = np.array(draws[key])  # (reps, cells)
        sd = sds[key]
        # unbiased: the mean over releases is within 6 standard errors of the truth, per cell.
        # The mean of 700 (discrete) Laplace draws is Gaussian to within 30% this far out: exactly
        # (characteristic function, scale 1.5 and 3) P(|mean| > 6 SE) = 2.5e-9 (Gaussian: 2.0e-9),
        # so the 12 cells fail together with probability below 3e-8 (at 5 SE it was 8e-6).
        assert np.all(np.abs(x.mean(axis=0) - exact) <= 6 * sd / math.sqrt(reps)), key
        # the spread matches the stated sd (pooled over the cells, which share one mechanism):
        # 2,100 draws, kurtosis at most 6.23 (discrete Laplace, scale 1.5), so the sample variance
        # has relative sd sqrt(5.23 / 2100) = 0.050; rel=0.15 on the sd is -27.75% / +32.25% on the
        # variance, 5.6 and 6.5 sd: P = 1.4e-8 per part, below 6e-8 for the 4 parts (Gaussian: 9 sd).
        observed = (x - exact).std()
        assert observed == pytest.approx(sd, rel=0.15), key


def _named(measure: str, parts: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    return {(measure, part): v for part, v in parts.items()}


_VALUES = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), _VALUES, st.integers(-10**6, 10**6)), min_size=0, max_size=30),
    extra=st.tuples(st.sampled_from(["a", "b", "c"]), _VALUES, st.integers(-10**6, 10**6)),
)
def test_clamping_bounds_what_one_row_can_move(base: list[tuple[str, float, int]], extra: tuple[str, float, int]) -> None:
    q = _query(
        [
            {"name": "s", "kind": "sum", "column": "vol", "by": ["cat"]},
            {"name": "d", "kind": "sum", "column": "dur"},
            {"name": "h", "kind": "histogram", "column": "vol", "edges": [2, 4, 6]},
        ]
    )

    def frame(rows: list[tuple[str, float, int]]) -> pd.DataFrame:
        n = len(rows)
        return pd.DataFrame(
            {
                "pid": [f"p{i}" for i in range(n)],
                "cat": [r[0] for r in rows],
                "grp": ["x"] * n,
                "early": ["0"] * n,
                "ongoing": [True] * n,
                "vol": [r[1] for r in rows],
                "dur": [r[2] for r in rows],
            }
        )

    def sums(rows: list[tuple[str, float, int]]) -> dict[str, np.ndarray]:
        prep = prepare(frame(rows), q, CONTRACT)
        out = {name: true_parts(p)[p.measure.part_names[0]].astype(float) for name, p in prep.items()}
        vs, vd = prep["s"].values, prep["d"].values
        assert vs is not None and vd is not None
        assert np.all(vs >= 0) and np.all(vs <= 10) and np.all(vd >= 1) and np.all(vd <= 100)
        return out

    before, after = sums(base), sums(base + [extra])
    n = len(base)
    assert np.all(before["s"] >= 0) and before["s"].sum() <= 10 * n + 1e-9
    assert 1 * n <= before["d"].sum() <= 100 * n
    assert np.abs(after["s"] - before["s"]).sum() <= 10 + 1e-9
    assert np.abs(after["d"] - before["d"]).sum() <= 100
    assert np.abs(after["h"] - before["h"]).sum() == 1  # clamped to the outer edges: always in a bin
    if base:  # changing one row's value to anything moves the sum by at most the clamp range
        changed = [(base[0][0], extra[1], extra[2])] + base[1:]
        moved = sums(changed)
        assert np.abs(moved["s"] - before["s"]).sum() <= 10 + 1e-9
        assert np.abs(moved["d"] - before["d"]).sum() <= 99


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    n_base=st.integers(0, 60),
    where=st.sampled_from([[], [{"column": "ongoing", "op": "eq", "value": True}]]),
)
def test_one_person_with_50_rows_moves_any_count_by_at_most_k(k: int, seed: int, n_base: int, where: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(seed)
    base = _frame(rng, n_base, persons=max(n_base // 2, 1))
    heavy = _frame(rng, 50, persons=1, prefix="heavy")
    # the heavy person's rows land anywhere; the others keep their order (the same data set plus one person)
    keys = np.concatenate([np.sort(rng.random(n_base)), rng.random(50)])
    merged = pd.concat([base, heavy]).iloc[np.argsort(keys, kind="stable")].reset_index(drop=True)
    q = _query([dict(m, where=where) if m["kind"] != "ratio" else m for m in ALL_KINDS], max_rows_per_person=k)
    a = prepare(base, q, CONTRACT)
    b = prepare(merged, q, CONTRACT)
    for name in a:
        ta, tb = true_parts(a[name]), true_parts(b[name])
        for part in ta:
            diff = np.abs(tb[part].astype(float) - ta[part].astype(float)).sum()  # L1 over all cells
            bound = k * (10 if name == "s" else 100) if part == "sum" else k
            assert diff <= bound + 1e-9, (name, part, diff)


def test_bound_contributions_keeps_the_first_rows_in_file_order() -> None:
    frame = pd.DataFrame({"pid": ["a", "b", "a", "a", "c", "b", "a"], "v": range(7)})
    kept = bound_contributions(frame, CONTRACT, 2)
    assert kept["v"].tolist() == [0, 1, 2, 4, 5]
    assert bound_contributions(frame, CONTRACT, 1)["v"].tolist() == [0, 1, 4]
    assert bound_contributions(frame, NO_PID, 1) is frame


def test_without_person_id_a_row_has_sensitivity_one() -> None:
    q = _query([{"name": "n", "kind": "count"}], max_rows_per_person=5)
    rel = local_release(_rng_free_frame(), q, NO_PID, min_cohort=0)
    assert rel.max_rows_per_person == 1 and rel.parts[0].sensitivity == 1


def test_filters_typed_and_text_frames_agree() -> None:
    """A frame of strings (as read from CSV) and a typed frame give the same aggregates."""
    frame = _rng_free_frame()
    text = frame.astype(str).replace({"None": ""})
    text["ongoing"] = frame["ongoing"].map({True: "true", False: "false"})
    q = _query(
        [
            {"name": "n", "kind": "count", "by": ["cat", "ongoing"], "where": [{"column": "dur", "op": "between", "value": [10, 60]}]},
            {"name": "r", "kind": "ratio", "numerator": [{"column": "ongoing", "op": "eq", "value": True}],
             "where": [{"column": "cat", "op": "in", "value": ["a", "b"]}]},
            {"name": "m", "kind": "mean", "column": "vol", "where": [{"column": "grp", "op": "ne", "value": "x"}]},
        ]
    )
    a, b = prepare(frame, q, CONTRACT), prepare(text, q, CONTRACT)
    for name in a:
        for part, v in true_parts(a[name]).items():
            np.testing.assert_allclose(true_parts(b[name])[part], v)
    n = true_parts(a["n"])["counts"]
    expected = frame[(frame.dur >= 10) & (frame.dur <= 60)].groupby(["cat", "ongoing"]).size()
    assert n.sum() == expected.sum() and n[1] == expected[("a", True)]


# --------------------------------------------------------------------------- small cells


def _cohort_frame(n_a: int, n_b: int, prefix: str) -> pd.DataFrame:
    n = n_a + n_b
    return pd.DataFrame(
        {
            "pid": [f"{prefix}{i}" for i in range(n)],
            "cat": ["a"] * n_a + ["b"] * n_b,
            "grp": ["x"] * n,
            "early": ["1", "0"] * (n // 2) + ["0"] * (n % 2),
            "ongoing": [False] * n,
            "dur": [10] * n,
            "vol": [2.0] * n,
        }
    )


COHORT_QUERY: list[dict[str, Any]] = [
    {"name": "n", "kind": "count", "by": ["cat"]},
    {"name": "m", "kind": "mean", "column": "dur", "by": ["cat"]},
    {"name": "s", "kind": "sum", "column": "vol", "by": ["cat"]},
    {"name": "s2", "kind": "sum", "column": "vol", "by": ["grp"]},
]


@pytest.mark.statistical
def test_min_cohort_flags_and_withholds() -> None:
    frame = _cohort_frame(400, 3, "n")
    q = _query(COHORT_QUERY, epsilon=40.0)
    pub = local_release(frame, q, CONTRACT, min_cohort=10)
    for name, part in (("n", "counts"), ("m", "sum"), ("m", "count"), ("s", "sum")):
        p = pub.part(name, part)
        assert p.small == [False, True, True], (name, part)  # a: 400, b: 3, c: 0
        assert all(v is not None for v in p.values)
    # a sum without a count of the same cells: the node cannot tell
    assert pub.part("s2", "sum").small == [None, None, None]
    wh = local_release(frame, q, CONTRACT, min_cohort=10, small_cells="withhold")
    assert wh.part("n", "counts").values[1:] == [None, None]
    assert wh.part("m", "sum").values[1:] == [None, None] and wh.part("m", "count").values[1:] == [None, None]
    # counts at epsilon 10: discrete Laplace of scale 0.1, P(|noise| >= 4) = 2 e^-40 / (1 + e^-10) < 1e-17
    assert wh.part("n", "counts").values[0] == pytest.approx(400, abs=3)
    assert wh.withheld_cells() == 8
    none = local_release(frame, q, CONTRACT, min_cohort=0)
    assert not any(f for p in none.parts for f in p.small)


@pytest.mark.statistical
def test_combine_never_publishes_small_cells_per_node() -> None:
    q = _query(COHORT_QUERY, epsilon=40.0)
    frames = {"GM0001": _cohort_frame(400, 3, "a"), "GM0002": _cohort_frame(300, 200, "b"), "GM0003": _cohort_frame(50, 4, "c")}
    regions = {"GM0001": {"prov": "North"}, "GM0002": {"prov": "South"}, "GM0003": {"prov": "North"}}
    for mode in ("publish-suppressed", "withhold"):
        rels = {k: local_release(f, q, CONTRACT, min_cohort=10, small_cells=mode) for k, f in frames.items()}  # type: ignore[arg-type]
        res = combine(rels, q, CONTRACT, regions=regions)
        for f in res.select(scope="node"):
            rel = rels[f.scope_value]
            m = q.measure(f.measure)
            i = rel.part(m.name, m.part_names[0]).cells.index(f.cell)
            flagged = any(rel.part(m.name, p).small[i] is not False for p in m.part_names)
            if flagged:
                assert f.suppressed and f.estimate is None and f.std_error is None and f.ci_low is None
            else:
                assert not f.suppressed and f.estimate is not None
        b = res.figure("n", "cat=b")
        if mode == "withhold":
            # only GM0002 sent cell b: the national figure rests on it, is incomplete (a lower bound)
            assert b.nodes == 1 and b.withheld == 2 and b.incomplete and not b.suppressed
            assert b.estimate == pytest.approx(200, abs=3)  # one count of scale 0.1: P(|noise| >= 4) < 1e-17
            c = res.figure("n", "cat=c")
            assert c.estimate is None and c.nodes == 0 and c.withheld == 3 and c.incomplete
            north = res.figure("n", "cat=b", "region", "prov=North")
            assert north.estimate is None and north.withheld == 2
        else:
            # three counts of scale 0.1: P(|sum| >= 7) <= 3 P(|noise| >= 3) < 1e-12
            assert b.nodes == 3 and not b.incomplete and b.estimate == pytest.approx(207, abs=6)
        # a region figure resting on one node follows that node's flags (or has nothing to show)
        south_c = res.figure("n", "cat=c", "region", "prov=South")
        assert south_c.estimate is None and (south_c.suppressed if mode == "publish-suppressed" else south_c.withheld == 1)
        # the sum without a matching count is never shown per node
        assert all(f.suppressed for f in res.select("s2", "node"))
        assert res.figure("s2", "grp=x").estimate is not None
        # 4000 (noisy sum, discrete Laplace of scale 20) / 400 (noisy count, scale 0.2): off by 1
        # needs |sum noise| >= ~400, P = 2 e^-20 / (1 + e^-0.05) = 2.1e-9 per mode (abs=0.5 failed
        # with P = 4.6e-5: |noise| >= 200)
        assert res.figure("m", "cat=a", "node", "GM0001").estimate == pytest.approx(10, abs=1.0)


# --------------------------------------------------------------------------- combine


def _nodes(seed: int, sizes: list[int]) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return {f"GM{i:04d}": _frame(rng, n, prefix=f"n{i}-") for i, n in enumerate(sizes)}


def test_combine_national_is_the_sum_of_nodes_and_regions() -> None:
    frames = _nodes(3, [300, 500, 800, 200])
    regions = {k: {"prov": "P1" if i < 2 else "P2"} for i, k in enumerate(frames)}
    q = _query(ALL_KINDS, epsilon=1.0)
    rels = {k: local_release(f, q, CONTRACT, min_cohort=0) for k, f in frames.items()}
    res = combine(rels, q, CONTRACT, regions=regions)
    assert res.nodes == sorted(frames) and res.regions == {"prov": ["P1", "P2"]} and not res.rejected
    for name, part in (("n", "counts"), ("s", "sum"), ("h", "counts")):
        cells = rels["GM0000"].part(name, part).cells
        for i, cell in enumerate(cells):
            values: dict[str, float] = {}
            for k, r in rels.items():
                v = r.part(name, part).values[i]
                assert v is not None
                values[k] = v
            sds = [r.part(name, part).noise_sd for r in rels.values()]
            nat = res.figure(name, cell)
            # the raw (unbiased) figures add up; the published ones are clamped at 0 (counts, bins,
            # the sum of a column declared non-negative)
            assert nat.raw_estimate == pytest.approx(sum(values.values()))
            assert nat.estimate == pytest.approx(max(sum(values.values()), 0.0))
            assert nat.std_error == pytest.approx(math.sqrt(sum(s * s for s in sds)))
            assert nat.nodes == 4 and nat.withheld == 0 and not nat.incomplete
            assert nat.estimate is not None and nat.ci_low is not None and nat.ci_high is not None
            assert nat.ci_low <= nat.estimate <= nat.ci_high
            for prov, members in (("P1", ["GM0000", "GM0001"]), ("P2", ["GM0002", "GM0003"])):
                reg = res.figure(name, cell, "region", f"prov={prov}")
                assert reg.raw_estimate == pytest.approx(sum(values[m] for m in members)) and reg.nodes == 2
            for k in frames:
                per_node = res.figure(name, cell, "node", k)
                assert per_node.raw_estimate == pytest.approx(values[k]) and per_node.estimate == pytest.approx(max(values[k], 0.0))
    # the mean is the ratio of the noisy sum and count, clamped into the contract's bounds
    for cell in ("cat=a", "cat=b", "cat=c"):
        f = res.figure("m", cell)
        i = ["cat=a", "cat=b", "cat=c"].index(cell)
        s = sum(r.part("m", "sum").values[i] for r in rels.values())  # type: ignore[misc]
        c = sum(r.part("m", "count").values[i] for r in rels.values())  # type: ignore[misc]
        assert f.estimate == pytest.approx(min(max(s / c, 1), 100))
    assert len(res.select("q", "national")) == 3
    # a release for another query is rejected, not combined
    bad = dict(rels)
    bad["GM9999"] = rels["GM0000"].model_copy(update={"query": "other"})
    assert "GM9999" in combine(bad, q, CONTRACT).rejected


@pytest.mark.statistical
def test_means_ratios_and_quantiles_are_near_the_truth() -> None:
    """12 nodes of 2,000 rows at epsilon 16. A figure's noise is a sum of 12 (discrete) Laplace
    draws, whose tails are heavier than a Gaussian's: P(|error| > 7 SE) = 1.1e-8 (exact, difference
    of Gamma(12) variables; at 5 SE it is 1.1e-5), so the 6 checks of 7 SE fail with P < 7e-8.
    The absolute bounds are wider still: 1.0 is 9.9 SE of the noisiest mean (cat=c), 0.01 is 11.2
    SE of the noisiest ratio. A quantile interval (widened to bin edges) misses the truth only when
    the estimate's error exceeds the truth's distance to the next edge plus 1.96 SE: 7.6 SE for
    q=0.5 (0.0146 from the edge 6.0, SE 0.0026), noise of ~240 Laplace draws: P < 1e-13. (At
    epsilon 8 these were 4.9 SE, 5.4 SE and 4.4 SE: a failure about once in 10^5 runs.)"""
    frames = _nodes(11, [2000] * 12)
    q = _query(ALL_KINDS, epsilon=16.0)
    rels = {k: local_release(f, q, CONTRACT, min_cohort=10) for k, f in frames.items()}
    res = combine(rels, q, CONTRACT, draws=100)
    truth = true_result(frames, q, CONTRACT)
    cmp = compare(res, truth)
    errs = cmp.by_key()
    for cell in ("cat=a", "cat=b", "cat=c"):
        m, t = res.figure("m", cell), truth.figure("m", cell)
        assert m.estimate is not None and t.estimate is not None and m.std_error is not None
        assert abs(m.estimate - t.estimate) <= 7 * m.std_error + 1e-9
        assert abs(m.estimate - t.estimate) < 1.0
        r, tr = res.figure("r", cell), truth.figure("r", cell)
        assert r.estimate is not None and tr.estimate is not None and r.std_error is not None
        assert abs(r.estimate - tr.estimate) <= 7 * r.std_error + 1e-9 and abs(r.estimate - tr.estimate) < 0.01
        assert 0 <= r.estimate <= 1
    width = 10 / 40
    for qq in ("q=0.25", "q=0.5", "q=0.75"):
        f, t = res.figure("q", qq), truth.figure("q", qq)
        assert f.estimate is not None and t.estimate is not None
        assert abs(f.estimate - t.estimate) < 2 * width
        assert f.ci_low is not None and f.ci_high is not None and f.ci_low <= f.estimate <= f.ci_high
        assert f.ci_low <= t.estimate <= f.ci_high  # the interval covers the binning error too
        assert errs[f.key].abs_error == pytest.approx(abs(f.estimate - t.estimate))
    # the truth's counts are the exact bounded counts
    n_true = truth.figure("n", "cat=a;grp=x").estimate
    assert n_true == sum(((f.cat == "a") & (f.grp == "x")).sum() for f in frames.values())
    summary = {(s.measure, s.scope): s for s in cmp.summary}
    assert summary[("n", "national")].median_rel_error is not None and summary[("n", "national")].median_rel_error < 0.01


def test_empty_data_and_no_nodes() -> None:
    q = _query(ALL_KINDS)
    empty = _rng_free_frame().iloc[0:0]
    rel = local_release(empty, q, CONTRACT, min_cohort=10**6, small_cells="withhold")
    assert rel.epsilon == 1.0 and all(v is None for p in rel.parts for v in p.values)
    res = combine({"GM0001": rel}, q, CONTRACT)
    assert all(f.estimate is None for f in res.figures)
    assert all(f.incomplete for f in res.select(scope="national"))
    nothing = combine({}, q, CONTRACT)
    assert nothing.nodes == [] and all(f.estimate is None and f.nodes == 0 for f in nothing.figures)
    truth = true_result({"GM0001": empty}, q, CONTRACT)
    assert truth.figure("n", "cat=a;grp=x").estimate == 0 and truth.figure("m", "cat=a").estimate is None


def test_monotone_quantiles_survive_negative_noise() -> None:
    from fedgov.analytics.combine import _quantiles

    counts = np.array([[5.0, -3.0, 0.0, 10.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    edges = np.array([0.0, 1, 2, 3, 4, 5])
    out = _quantiles(counts, edges, [0.1, 0.5, 0.9])
    assert np.all(np.diff(out[0]) >= 0) and np.all((out[0] >= 0) & (out[0] <= 5))
    assert np.isnan(out[1]).all()


# --------------------------------------------------------------------------- writers


def test_writers_produce_json_csv_png(tmp_path: Path) -> None:
    frames = _nodes(5, [300, 400])
    q = _query(ALL_KINDS)
    rels = {k: local_release(f, q, CONTRACT, min_cohort=10) for k, f in frames.items()}
    res = combine(rels, q, CONTRACT, draws=20)
    truth = true_result(frames, q, CONTRACT)
    report = QueryReport(
        query=q.name, query_file="q.toml", contract=CONTRACT.ref, mode="simulation", status="completed",
        started=datetime.now(UTC), finished=datetime.now(UTC), wall_seconds=1.0, epsilon=1.0,
        nodes=[QueryNode(node="GM0000", accepted=True), QueryNode(node="GM0001", accepted=True),
               QueryNode(node="GM0002", accepted=False, code="budget-exhausted", reason="no budget left")],
        result=res, truth=truth, errors=compare(res, truth),
    )
    out = write_outputs(report, tmp_path / "run")
    assert set(out) == {"json", "csv", "png"}
    back = load_query_report(out["json"])
    assert back.result is not None and len(back.result.figures) == len(res.figures)
    assert back.artifacts["csv"] == out["csv"] and [n.node for n in back.refused()] == ["GM0002"]
    rows = pd.read_csv(out["csv"], dtype=str, keep_default_na=False)
    assert list(rows.columns) == CSV_COLUMNS and len(rows) == len(res.figures)
    assert set(rows.scope) == {"national", "node"}
    assert (rows[rows.suppressed == "true"].estimate == "").all()
    assert (rows[(rows.scope == "national") & (rows.measure == "n")].true_value != "").all()
    assert Path(out["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.loads(Path(out["json"]).read_text("utf-8"))
    # a failed run without a result still writes its files
    failed = QueryReport(query="t", query_file="q.toml", contract=CONTRACT.ref, status="failed", message="x",
                         started=datetime.now(UTC), epsilon=1.0)
    out2 = write_outputs(failed, tmp_path / "failed")
    assert Path(out2["png"]).stat().st_size > 0 and len(pd.read_csv(out2["csv"])) == 0


def test_release_logs_no_data_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fedgov")
    frame = _cohort_frame(123, 7, "secret-")
    local_release(frame, _query(COHORT_QUERY), CONTRACT, min_cohort=10)
    text = caplog.text
    assert "secret-" not in text and "123" not in text and "query t" in text


# --------------------------------------------------------------------------- scale


@pytest.mark.statistical
def test_342_municipalities_national_counts_within_one_percent() -> None:
    rng = np.random.default_rng(2026)
    sizes = np.clip(np.exp(rng.normal(7.6, 1.05, 342)), 60, 60_000).astype(np.int64)
    shares = np.array([20, 14, 12, 9, 8, 7, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1, 0.8, 0.5, 0.2])
    shares = shares / shares.sum()
    cats = [f"{i:02d}" for i in range(1, 19)]
    contract = Contract.model_validate(
        {
            "name": "scale",
            "version": "1.0",
            "person_id": "pid",
            "columns": [{"name": "pid", "type": "integer", "min": 0, "max": 10**9},
                        {"name": "product_category", "type": "categorical", "categories": cats}],
        }
    )
    q = Query.model_validate(
        {"name": "scale", "contract": "c.toml", "privacy": {"epsilon": 1.0, "max_rows_per_person": 1},
         "measures": [{"name": "clients-by-category", "kind": "count", "by": ["product_category"]}]}
    )
    cum = np.cumsum(shares)
    true = np.zeros(18, dtype=np.int64)
    frames = {}
    for i, n in enumerate(sizes):
        codes = np.minimum(np.searchsorted(cum, rng.random(n)), 17)
        true += np.bincount(codes, minlength=18)
        frames[f"GM{i:04d}"] = pd.DataFrame(
            {"pid": np.arange(n), "product_category": pd.Categorical.from_codes(codes, categories=cats)}
        )
    total = int(sizes.sum())
    assert 700_000 < total < 1_600_000
    t0 = time.perf_counter()
    rels = {k: local_release(f, q, contract, min_cohort=10) for k, f in frames.items()}
    res = combine(rels, q, contract)
    seconds = time.perf_counter() - t0
    assert len(res.nodes) == 342
    nat = res.national("clients-by-category")
    checked = 0
    for j, c in enumerate(cats):
        f = nat[f"product_category={c}"]
        assert f.estimate is not None and f.nodes == 342
        if true[j] >= 0.015 * total:
            checked += 1
            # a national count's noise is a sum of 342 discrete Laplace draws of scale 1 (sd
            # sqrt(342 * 2) = 26.2); the smallest checked count (20,158 for this seed) gives 1% =
            # 7.7 sd: Chernoff's bound for 342 Laplace draws gives P < 9e-13, for 14 cells < 2e-11
            assert abs(f.estimate - true[j]) / true[j] < 0.01, (c, f.estimate, true[j])
    assert checked >= 13
    # per node: cells below the cohort are never shown
    small_nodes = [f for f in res.select(scope="node") if f.suppressed]
    assert small_nodes and all(f.estimate is None for f in small_nodes)
    assert seconds < 30, seconds
