"""All 342 municipalities' synthetic iWmo data, each releasing its own noisy counts at epsilon 1
(OpenDP, one row per person): the national count of every Wmo product category is within 1%.

The nodes' releases and the coordinator's combination are the same functions a real query runs
(:func:`fedgov.node.statistics.answer_query` calls ``local_release``, :func:`fedgov.coordinator.statistics.run_query` calls
``combine``); only Flower's transport is left out here, to keep the test fast.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedgov.analytics import combine, load_query, local_release, true_result
from fedgov.data import iwmo
from fedgov.config.municipalities import all_municipalities
from fedgov.coordinator.statistics import regions_of

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "configs" / "contracts" / "iwmo-wmo.toml"


@pytest.fixture(scope="module")
def country() -> dict[str, pd.DataFrame]:
    frame = iwmo.generate(2026)
    frame = frame.astype({c: object for c in frame.columns if str(frame[c].dtype) == "category"})
    return {code: part.reset_index(drop=True) for code, part in frame.groupby("municipality", sort=False, observed=True)}


@pytest.mark.statistical
def test_national_count_per_category_within_one_percent_at_epsilon_one(
    tmp_path: Path, country: dict[str, pd.DataFrame], write_file
) -> None:
    assert len(country) == len(all_municipalities()) == 342
    qpath = write_file(
        tmp_path / "q.toml",
        f"""
        name = "national"
        contract = "{CONTRACT}"
        regions = ["province"]
        [privacy]
        epsilon = 1.0
        max_rows_per_person = 1
        [[measures]]
        name = "clients-by-category"
        kind = "count"
        by = ["product_category"]
        """,
    )
    query, contract = load_query(qpath)
    releases = {code: local_release(f, query, contract, min_cohort=10) for code, f in country.items()}
    assert all(r.epsilon == 1.0 for r in releases.values())
    regions = regions_of(country, ["province"])
    noisy = combine(releases, query, contract, regions=regions)
    truth = true_result(country, query, contract, regions=regions)
    nat, true_nat = noisy.national("clients-by-category"), truth.national("clients-by-category")
    assert len(nat) == 18
    worst = 0.0
    for cell, f in nat.items():
        t = true_nat[cell].estimate
        assert f.estimate is not None and t is not None and t > 0
        assert f.nodes == 342 and not f.incomplete
        worst = max(worst, abs(f.estimate - t) / t)
        # the stated error bar is the noise of 342 discrete Laplace draws at scale 1
        assert f.std_error == pytest.approx((342 * 2 * 1.0**2) ** 0.5, rel=0.05)
    # Each national count's noise is a sum of 342 discrete Laplace draws (sd 26.2, near Gaussian:
    # exact for 342 Laplace draws, P(> 5.5 sd) = 5e-9); the smallest true count (about 31,000)
    # makes 1% 11.9 sd: Chernoff's bound for 342 Laplace draws gives P < 2e-28 per cell.
    assert worst < 0.01, f"largest relative error {worst:.4%}"
    # provinces add up to the nation; a small municipality's own cells are small
    provinces = {f.scope_value for f in noisy.select("clients-by-category", "region")}
    assert len(provinces) == 12
    small = [f for f in noisy.select("clients-by-category", "node", "GM0088")]
    assert sum(f.suppressed for f in small) >= 9  # Schiermonnikoog's rare categories are not published
    assert all(f.estimate is None for f in small if f.suppressed)
