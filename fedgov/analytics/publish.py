"""Making DP figures fit to publish: post-processing and one number format. Pure functions.

Post-processing (costs no privacy: it uses only released values and public facts). Noise can
push an estimate out of the range its statistic can take: a count of ``-74``, a share above 1.
What is published is made consistent with public knowledge:

* the estimate is clamped into the figure's **feasible range** (:func:`feasible_range`):
  ``[0, inf)`` for counts and histogram bins, ``[0, 1]`` for shares (ratios), the column's
  declared ``[min, max]`` for means and quantiles, ``[0, inf)`` (or ``(-inf, 0]``) for a sum
  of a column whose declared values are all non-negative (or all non-positive);
* both ends of the 95% interval are clamped into the same range, and the interval is widened,
  where needed, to hold its estimate (widening never lowers coverage).

Clamping into the feasible range keeps every feasible true value inside an interval that held
it, so the intervals' coverage is unchanged. The published estimate, though, is **biased**
where the statistic is near the edge of its range: a small count's clamped estimate
``max(raw, 0)`` is on average above the true count (for a true count of 0 by 0.35 to 0.4 noise
standard deviations, Laplace to normal), and a sum of small clamped cells is biased upward. Who adds figures up
or fits a model to them should use the raw, unbiased values: a report keeps them beside the
published ones (``raw_estimate``, ``raw_ci_low``, ``raw_ci_high`` of a figure).

Number format (:func:`format_number`), one rule for every cell of a table: thousands separators;
whole numbers from 1,000 up (``12,173``, never ``1.217e+04``); four significant digits below
1,000 (``26.14``, ``0.2175``), trailing zeros dropped (``26``, ``0.5``); scientific notation
only for magnitudes below 0.0001 or from 10^15 up.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = [
    "DIGITS",
    "POST_PROCESSING",
    "clamp_figure",
    "feasible_range",
    "format_interval",
    "format_number",
    "format_percent",
]

DIGITS: Final = 4
"""Significant digits of a number below 1,000 in a table."""

POST_PROCESSING: Final = (
    "estimate, ci_low and ci_high are the published values: clamped into each figure's feasible range "
    "(counts and bins at least 0, shares in [0, 1], means and quantiles within the column's declared bounds, "
    "sums of a non-negative column at least 0), the interval widened where needed to hold its estimate. "
    "raw_estimate, raw_ci_low and raw_ci_high are the unbiased values before this post-processing (it costs "
    "no privacy). Clamping biases estimates near the edge of their range (small counts upward): add up or "
    "model the raw values."
)
"""What a query result's ``post_processing`` note says: which values are published, which raw."""


def feasible_range(kind: str, column_min: float | None = None, column_max: float | None = None) -> tuple[float, float]:
    """The values a figure of measure ``kind`` can take, from public facts only.

    ``column_min``/``column_max`` are the measured column's declared bounds (means, sums,
    quantiles); without them a mean, sum or quantile is unbounded.
    """
    lo = -math.inf if column_min is None else float(column_min)
    hi = math.inf if column_max is None else float(column_max)
    if kind in ("count", "histogram"):
        return 0.0, math.inf
    if kind == "ratio":
        return 0.0, 1.0
    if kind in ("mean", "quantiles"):
        return lo, hi
    if kind == "sum":
        if lo >= 0:
            return 0.0, math.inf
        if hi <= 0:
            return -math.inf, 0.0
        return -math.inf, math.inf
    raise ValueError(f"unknown measure kind {kind!r}")


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def clamp_figure(
    estimate: float | None, ci_low: float | None, ci_high: float | None, lo: float, hi: float
) -> tuple[float | None, float | None, float | None]:
    """The published ``(estimate, ci_low, ci_high)`` of a figure whose feasible range is ``[lo, hi]``.

    The estimate and both interval ends are clamped into ``[lo, hi]``; the interval is then
    widened to hold the estimate (each end that there is). ``None`` (no value) stays ``None``.
    Idempotent: applied to its own output it returns it unchanged.
    """
    if not lo <= hi:
        raise ValueError(f"empty feasible range [{lo}, {hi}]")
    est = None if estimate is None else _clip(float(estimate), lo, hi)
    low = None if ci_low is None else _clip(float(ci_low), lo, hi)
    high = None if ci_high is None else _clip(float(ci_high), lo, hi)
    if low is not None and high is not None and low > high:  # a reversed interval: put in order
        low, high = high, low
    if est is not None:
        if low is not None:
            low = min(low, est)
        if high is not None:
            high = max(high, est)
    return est, low, high


def format_number(x: float | None, *, signed: bool = False, digits: int = DIGITS) -> str:
    """One number as a table shows it (the module's rule); ``""`` for no value or NaN."""
    if x is None or math.isnan(x):
        return ""
    sign = "+" if signed and x > 0 else ""
    if math.isinf(x):
        return ("-" if x < 0 else sign) + "inf"
    if x == 0:
        return "0"
    mantissa, exp_text = f"{x:.{digits - 1}e}".split("e")
    exp = int(exp_text)  # the exponent after rounding to `digits` significant digits
    if exp < -4 or exp >= 15:
        return f"{sign}{mantissa.rstrip('0').rstrip('.')}e{exp:+03d}"
    decimals = max(digits - 1 - exp, 0)
    text = f"{x:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return sign + ("0" if text in ("-0", "") else text)


def format_interval(low: float | None, high: float | None) -> str:
    """A 95% interval as a table shows it: ``"low .. high"``; ``""`` when an end is missing."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return ""
    return f"{format_number(low)} .. {format_number(high)}"


def format_percent(share: float | None, *, signed: bool = False) -> str:
    """A share (0.0123) as a percentage by the same rule (``"1.23%"``)."""
    if share is None or math.isnan(share):
        return ""
    return format_number(100.0 * share, signed=signed) + "%"
