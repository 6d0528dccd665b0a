"""Statistics under secure aggregation: a node's noisy release as one integer vector to be
summed under masks (:mod:`fedgov.privacy.secagg`), and the national figures from the sum.

Under secure aggregation the coordinator learns the national totals only: no node's figures,
no region's (a query with ``secure_aggregation`` may not ask for regions), and no node's
small-cell flags. A cell that rests on a single node is therefore always suppressed.

Encoding (the same at every node, fixed by the query and the contract): each part's noisy
values in query order, as integers in units of ``res`` (1 for the discrete mechanisms, whose
values are integers already; a hundredth of the part's noise standard deviation otherwise,
which adds a rounding error of ``res / sqrt(12)`` per node, 0.3% of the noise's), two's
complement modulo ``2^32``; then, per measure, a 0/1 per cell: did the node send the cell
(a node whose policy withholds small cells sends 0 for them).
"""

from __future__ import annotations

import numpy as np

from fedgov.analytics.combine import Figure, QueryResult, _Builder
from fedgov.analytics.local import LocalRelease, PartRelease
from fedgov.analytics.query import Query, cell_grid, ensure_valid
from fedgov.config.contract import Contract
from fedgov.privacy.secagg import MODULUS
from fedgov.errors import SecureLayoutError

__all__ = ["resolution", "secure_vector", "skeleton_of", "combine_secure", "SecureLayoutError"]


def resolution(part: PartRelease) -> float:
    return 1.0 if part.mechanism.startswith("discrete") else part.noise_sd / 100.0


def skeleton_of(release: LocalRelease) -> LocalRelease:
    """The release without its values and flags: what may travel in plaintext beside the masked vector."""
    parts = [p.model_copy(update={"values": [None] * len(p.values), "small": [None] * len(p.small)}) for p in release.parts]
    return release.model_copy(update={"parts": parts})


def secure_vector(release: LocalRelease, query: Query) -> np.ndarray:
    """The integer vector (in ``[0, 2^32)``) a node masks for ``query``."""
    chunks: list[np.ndarray] = []
    for p in release.parts:
        v = np.array([0.0 if x is None else x for x in p.values], dtype=np.float64) / resolution(p)
        ints = np.rint(v).astype(np.int64)
        if np.abs(ints).max(initial=0) >= MODULUS // 2:
            raise SecureLayoutError(f"part {p.measure}/{p.part}: a value does not fit 32 bits at resolution {resolution(p):g}")
        chunks.append(ints % MODULUS)
    for m in query.measures:
        mine = [p for p in release.parts if p.measure == m.name]
        sent = np.ones(len(mine[0].values), dtype=np.int64)
        for p in mine:
            sent &= np.array([x is not None for x in p.values], dtype=np.int64)
        chunks.append(sent)
    return np.concatenate(chunks)


def _signed(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64) % MODULUS
    return np.where(x >= MODULUS // 2, x - MODULUS, x)


def combine_secure(
    skeleton: LocalRelease, total: np.ndarray, nodes: list[str], query: Query, contract: Contract, *, draws: int = 200,
    seed: int | None = 0,
) -> QueryResult:
    """National figures from the secure sum of the vectors (:func:`secure_vector`) of ``nodes``."""
    ensure_valid(query, contract)
    n_nodes = len(nodes)
    rng = np.random.default_rng(seed) if draws > 1 else None
    laplace = query.privacy.mechanism == "laplace"
    i = 0
    totals: dict[tuple[str, str], np.ndarray] = {}
    sds: dict[tuple[str, str], float] = {}
    for p in skeleton.parts:
        n = len(p.values)
        totals[(p.measure, p.part)] = _signed(total[i : i + n]).astype(np.float64) * resolution(p)
        sds[(p.measure, p.part)] = p.noise_sd
        i += n
    figures: list[Figure] = []
    for m in query.measures:
        grid = cell_grid(m, contract)
        size = grid.size
        sent = _signed(total[i : i + size]).astype(np.int64)
        i += size
        if sent.min(initial=0) < 0 or sent.max(initial=0) > n_nodes:
            raise SecureLayoutError(f"measure {m.name}: the count of nodes per cell is out of range; the sum is not valid")
        tot = {p: totals[(m.name, p)] for p in m.part_names}
        var = {p: sent * sds[(m.name, p)] ** 2 for p in m.part_names}
        suppress = sent == 1  # one node's noisy value: never published alone
        b = _Builder(m, grid, contract)
        if m.kind in ("count", "sum", "histogram"):
            figures += b.simple("national", "", tot[m.part_names[0]], var[m.part_names[0]], sent, n_nodes, suppress, laplace)
        elif m.kind == "mean":
            figures += b.ratio("national", "", tot["sum"], var["sum"], tot["count"], var["count"], sent, n_nodes, suppress)
        elif m.kind == "ratio":
            figures += b.ratio(
                "national", "", tot["numerator"], var["numerator"], tot["denominator"], var["denominator"], sent, n_nodes, suppress
            )
        else:
            figures += b.quantiles("national", "", tot["counts"], var["counts"], sent, n_nodes, suppress, laplace, rng, draws)
    if i != len(total):
        raise SecureLayoutError(f"the secure sum has {len(total)} values, the query's layout {i}")
    return QueryResult(
        query=query.name, contract=contract.ref, noisy=True, epsilon=query.privacy.epsilon, delta=query.privacy.delta,
        mechanism=query.privacy.mechanism, max_rows_per_person=query.rows_per_person(contract),
        nodes=sorted(nodes), rejected={}, regions={}, figures=figures,
        notes=[f"secure aggregation: national totals of {n_nodes} nodes only; no node's or region's figures were seen"],
    )
