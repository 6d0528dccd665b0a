"""Federated statistics with differential privacy: counts, sums, means, ratios, histograms and
quantiles over the municipalities' data.

A query file (:mod:`fedgov.analytics.query`) says what to compute and with which budget; each
node computes its local aggregates and adds OpenDP noise (:mod:`fedgov.analytics.local`); the
coordinator adds the noisy parts up nationally, per region and per node and derives means,
ratios and quantiles with their errors (:mod:`fedgov.analytics.combine`), post-processed to be
fit to publish, in one number format (:mod:`fedgov.analytics.publish`); the report and its
files are in :mod:`fedgov.analytics.report`. Under secure aggregation a node's release travels
as one masked integer vector, and only national figures come back
(:mod:`fedgov.analytics.secure`).
"""

from fedgov.analytics.combine import (
    LAPLACE_Z,
    Z95,
    Comparison,
    Figure,
    FigureError,
    MeasureError,
    QueryResult,
    Scope,
    combine,
    compare,
    true_result,
)
from fedgov.analytics.local import (
    LocalRelease,
    NoiseKind,
    PartRelease,
    Prepared,
    SmallCells,
    bound_contributions,
    local_release,
    part_sensitivity,
    prepare,
    true_parts,
)
from fedgov.analytics.query import (
    DEFAULT_QUANTILE_BINS,
    MAX_CELLS,
    MISSING_LEVEL,
    CellGrid,
    Filter,
    FilterOp,
    Measure,
    MeasureKind,
    PartName,
    PartSpec,
    Query,
    QueryPrivacy,
    cell_grid,
    check_query,
    ensure_valid,
    load_query,
)
from fedgov.analytics.publish import (
    POST_PROCESSING,
    clamp_figure,
    feasible_range,
    format_interval,
    format_number,
    format_percent,
)
from fedgov.analytics.report import (
    CSV_COLUMNS,
    QueryNode,
    QueryReport,
    load_query_report,
    plot_query,
    write_csv,
    write_outputs,
)
from fedgov.analytics.secure import combine_secure, resolution, secure_vector, skeleton_of

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_QUANTILE_BINS",
    "LAPLACE_Z",
    "MAX_CELLS",
    "MISSING_LEVEL",
    "POST_PROCESSING",
    "Z95",
    "CellGrid",
    "Comparison",
    "Figure",
    "FigureError",
    "Filter",
    "FilterOp",
    "LocalRelease",
    "Measure",
    "MeasureError",
    "MeasureKind",
    "NoiseKind",
    "PartName",
    "PartRelease",
    "PartSpec",
    "Prepared",
    "Query",
    "QueryNode",
    "QueryPrivacy",
    "QueryReport",
    "QueryResult",
    "Scope",
    "SmallCells",
    "bound_contributions",
    "cell_grid",
    "check_query",
    "clamp_figure",
    "combine",
    "combine_secure",
    "compare",
    "ensure_valid",
    "feasible_range",
    "format_interval",
    "format_number",
    "format_percent",
    "load_query",
    "load_query_report",
    "local_release",
    "part_sensitivity",
    "plot_query",
    "prepare",
    "resolution",
    "secure_vector",
    "skeleton_of",
    "true_parts",
    "true_result",
    "write_csv",
    "write_outputs",
]
