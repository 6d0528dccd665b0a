"""Secure aggregation (fedgov.privacy.secagg) on the Message API: the coordinator learns only the sum.

The protocol alone (pure functions), then whole training runs through fedgov's coordinator and
ClientApp with its mods (in process, ``fedgov/testing.py``): the same model as plain FedAvg,
every message the coordinator received holds masked vectors only, dropouts up to the threshold
are tolerated, beyond it the round is discarded, no downgrade to plaintext, node policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedgov.protocol import task_id_of
from fedgov.config import load_task
from fedgov.errors import ConfigError
from fedgov.node.refusals import error_reason
from fedgov.node.policy import check_task, load_policy
from fedgov.privacy.secagg import (
    MODULUS,
    NodeSecAgg,
    SecAggError,
    SecAggParams,
    decode_sum,
    encode_update,
    prg,
    threshold_for,
    unmask_sum,
)

from fedgov.testing import InProcessGrid, prepare, tamper_update  # noqa: F401

P = SecAggParams()
SHAPES = [(3, 4), (4,)]


def _setup(ids: list[int], round: int = 1) -> tuple[dict[int, NodeSecAgg], dict[int, tuple[bytes, bytes]]]:
    states, pks = {}, {}
    for i in ids:
        st, c, s = NodeSecAgg.keys(i, round)
        states[i], pks[i] = st, (c, s)
    cts = {i: states[i].shares(pks, P) for i in ids}
    for i in ids:
        states[i].receive({src: cts[src][i] for src in ids if i in cts[src]})  # what the coordinator routes to i
    return states, pks


def _updates(ids: list[int], seed: int = 0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {i: [rng.normal(size=s) * 0.1 for s in SHAPES] for i in ids}


@pytest.mark.statistical
@pytest.mark.parametrize("dropped", [[], [42]])
def test_the_sum_of_the_survivors_and_nothing_else(dropped: list[int]) -> None:
    ids = [11, 5, 99, 42, 7]
    states, pks = _setup(ids)
    ups = _updates(ids)
    weights = {i: 0.2 + 0.15 * k for k, i in enumerate(ids)}
    masked = {i: states[i].mask(encode_update(ups[i], weights[i], P), sorted(ids)) for i in ids if i not in dropped}
    survivors = sorted(masked)
    revealed = {i: states[i].reveal(survivors, dropped) for i in survivors}
    total = unmask_sum(masked, revealed, pks=pks, dropped=dropped, threshold=threshold_for(len(ids)))
    sums, w = decode_sum(total, len(survivors), SHAPES, P)
    for k in range(len(SHAPES)):
        expected = sum(weights[i] * ups[i][k] for i in survivors)
        assert np.abs(sums[k] - expected).max() < 2e-5  # quantisation: 2 * clip / 2^22 per node
    assert w == pytest.approx(sum(weights[i] for i in survivors), abs=2e-5)


@pytest.mark.statistical
def test_more_than_a_third_dropped_reveals_nothing() -> None:
    """Five holders, threshold 4 (more than two thirds): with two dropped no survivor reveals."""
    ids = [11, 5, 99, 42, 7]
    assert threshold_for(5) == 4
    states, _ = _setup(ids)
    ups = _updates(ids)
    dropped = [42, 7]
    for i in ids:
        if i not in dropped:
            states[i].mask(encode_update(ups[i], 1.0, P), sorted(ids))
    survivors = sorted(i for i in ids if i not in dropped)
    for i in survivors:
        with pytest.raises(SecAggError, match="revealing needs 4"):
            states[i].reveal(survivors, dropped)


@pytest.mark.statistical
def test_secagg_plus_neighbourhoods_at_scale_sum_exactly_with_dropouts() -> None:
    """Above 40 nodes each node shares with its neighbours in a random k-regular graph only
    (SecAgg+); the sum over the survivors is still exact, and a dropped node's masks are removed
    from its neighbours' inputs."""
    from fedgov.privacy.secagg import neighbourhood_size, neighbours

    assert neighbourhood_size(12) == 11 and neighbourhood_size(342) == 34
    ids = list(range(100, 160))  # 60 nodes
    states, pks = _setup(ids)
    graph = neighbours(pks)
    k = neighbourhood_size(60)
    assert k == 2 * math.ceil(2 * math.log2(60)) and k < 59
    for v in ids:  # k-regular, symmetric, no self loops; each node holds its neighbours' shares only
        assert len(graph[v]) == k and v not in graph[v]
        assert all(v in graph[u] for u in graph[v])
        assert sorted(states[v].received) == sorted([v, *graph[v]])
    assert neighbours(dict(reversed(list(pks.items())))) == graph  # the same graph for everyone
    ups = _updates(ids, seed=3)
    dropped = [ids[3], ids[17], ids[40]]
    masked = {i: states[i].mask(encode_update(ups[i], 1.0, P), ids) for i in ids if i not in dropped}
    survivors = sorted(masked)
    revealed = {i: states[i].reveal(survivors, dropped) for i in survivors}
    assert all(set(r) <= {i, *graph[i]} for i, r in revealed.items())  # a node reveals for its group only
    total = unmask_sum(masked, revealed, pks=pks, dropped=dropped, threshold=threshold_for(k + 1))
    sums, w = decode_sum(total, len(survivors), SHAPES, P)
    for j in range(len(SHAPES)):
        assert np.abs(sums[j] - sum(ups[i][j] for i in survivors)).max() < 60 * 1e-5
    assert w == pytest.approx(len(survivors), abs=1e-3)
    # without the shares of a dropped node's group the sum cannot be had
    d = dropped[0]
    thin = {h: r for h, r in revealed.items() if h not in graph[d]}
    with pytest.raises(SecAggError, match=rf"shares of node \d+'s secret; {threshold_for(k + 1)} are needed"):
        unmask_sum(masked, thin, pks=pks, dropped=dropped)


@pytest.mark.statistical
def test_a_masked_vector_says_nothing_about_its_update() -> None:
    ids = [1, 2, 3]
    y = encode_update(_updates(ids)[1], 1.0, P)
    assert y.min() >= 0 and y.max() <= P.levels  # the plain vector lies in [0, 2^22]
    seen = []
    for round in range(1, 41):
        states, _ = _setup(ids, round)
        seen.append(states[1].mask(y, ids))
    # Spread over the whole modulus and uncorrelated with the update, pooled over 40 rounds
    # (680 values): the mean of uniform draws has sd 0.011 and the correlation sd 0.04, so the
    # bounds below are 9 and 12 standard deviations wide (a chance failure is below 1e-18; for the
    # mean without the normal approximation, Bernstein: 2 exp(-680 * 0.1^2 / (2/12 + 2 * 0.5 * 0.1 / 3))
    # = 3e-15). The maximum exceeds 100 levels unless all 680 values lie in the lowest 0.098 of the
    # modulus: 0.098^680.
    pooled = np.concatenate(seen).astype(float)
    assert pooled.max() > P.levels * 100 and abs(pooled.mean() / MODULUS - 0.5) < 0.1
    assert abs(np.corrcoef(pooled, np.tile(y.astype(float), len(seen)))[0, 1]) < 0.5
    assert not np.array_equal(seen[0], seen[1])  # fresh masks each round


@pytest.mark.statistical
def test_nodes_refuse_what_would_unmask_one_node() -> None:
    ids = [1, 2, 3, 4, 5]
    states, pks = _setup(ids)
    ups = _updates(ids)
    for i in ids:
        states[i].mask(encode_update(ups[i], 1.0, P), ids)
    # asked for both shares of node 3 (its self mask and its pairwise key): refuse
    with pytest.raises(SecAggError, match="both survived and dropped"):
        states[1].reveal([1, 2, 3], [3])
    # fewer survivors than the threshold (3 of 5): refuse
    with pytest.raises(SecAggError, match="only 2 of this node.s group survived"):
        states[1].reveal([1, 2], [3, 4, 5])
    # the coordinator cannot unmask with fewer shares than the threshold
    masked = {i: np.zeros(4, dtype=np.int64) for i in (1, 2)}
    with pytest.raises(SecAggError, match="unmasking needs 3"):
        unmask_sum(masked, {1: {}, 2: {}}, pks=pks, dropped=[], threshold=3)
    # a node masks once per round
    with pytest.raises(SecAggError, match="already sent"):
        states[1].mask(np.zeros(5, dtype=np.int64), ids)


@pytest.mark.statistical
def test_forged_or_misrouted_shares_stop_the_round() -> None:
    ids = [1, 2, 3]
    states, pks = {}, {}
    for i in ids:
        states[i], c, s = NodeSecAgg.keys(i, 1)
        pks[i] = (c, s)
    cts = {i: states[i].shares(pks, P) for i in ids}
    with pytest.raises(SecAggError, match="do not decrypt"):
        states[1].receive({2: cts[2][1][:-8] + b"AAAAAAAA"})
    with pytest.raises(SecAggError, match="do not decrypt"):
        states[1].receive({2: cts[3][1]})  # node 3's shares presented as node 2's
    with pytest.raises(SecAggError, match="same public key"):
        states[1].shares({1: pks[1], 2: pks[1]}, P)


def test_prg_is_uniform_over_the_modulus_and_seeded() -> None:
    a, b = prg(b"k" * 32, 100_000), prg(b"k" * 32, 100_000)
    assert np.array_equal(a, b) and not np.array_equal(a, prg(b"j" * 32, 100_000))
    assert a.min() >= 0 and a.max() < MODULUS
    assert abs(a.mean() / MODULUS - 0.5) < 0.01


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, three_city_task, run_task) -> dict:  # type: ignore[type-arg]
    """The same task, plain and secure, on the SAME node directories: a node releases its noisy
    row count once per data file, and both FedAvg (by count) and secure aggregation (by
    ``min(count, cap) / cap`` inside the sum) weigh by that one released count, so both runs
    weigh alike and give the same model up to quantisation."""
    tmp = tmp_path_factory.mktemp("secagg")
    fed, plain_task = three_city_task(tmp / "plain", rounds=2)
    _, secure_task = three_city_task(tmp / "secure", rounds=2, training={"secure_aggregation": True})
    out: dict = {}  # type: ignore[type-arg]
    for name, task, run_id in (("plain", plain_task, 31), ("secure", secure_task, 32)):
        _, _, nodes, manifest = prepare(tmp / name / "nodes", fed, task, state_dir=tmp / "state")
        grid = InProcessGrid(manifest, len(nodes), run_id=run_id)
        out[name] = (run_task(grid, task, tmp / name / "run", run_id=run_id, federation="resume-3"), grid, nodes)
    out["secure-task-id"] = task_id_of(*load_task(secure_task), 32)
    return out


def test_secure_run_gives_the_plain_fedavg_model(runs: dict) -> None:  # type: ignore[type-arg]
    plain, _, _ = runs["plain"]
    secure, _, nodes = runs["secure"]
    assert secure.status == "completed", secure.message
    from fedgov.node.rounds import ROWS_NOTE
    from fedgov.node.home import NodeHome

    for n in nodes:  # one row-count release per node, used by both runs
        ledger = NodeHome(n.train_path.parent).ledger.events()
        assert len([e for e in ledger if e.kind == "spend" and e.note.startswith(ROWS_NOTE)]) == 1
    assert secure.privacy["secure_aggregation"] is True
    for a, b in zip(plain.rounds, secure.rounds, strict=True):
        assert sorted(b.nodes_trained) == sorted(a.nodes_trained) and b.discarded is None
        assert b.accuracy == pytest.approx(a.accuracy, abs=2e-3)  # the same model up to quantisation
        assert b.loss == pytest.approx(a.loss, abs=2e-3)
    # left random: the released row counts (the DP noise is reproducible); 0.8121 to 0.8125 over 6 draws
    assert secure.final is not None and secure.final.accuracy > 0.80


def test_the_coordinator_received_only_masked_vectors(runs: dict) -> None:  # type: ignore[type-arg]
    _, grid, nodes = runs["secure"]
    train_replies = [m for m in grid.received if m.metadata.message_type.startswith("train")]
    assert len(train_replies) == 2 * len(nodes)
    for m in train_replies:
        assert not m.has_error()
        (rec,) = m.content.array_records.values()
        assert list(rec) == ["masked"]  # no model, no update: one masked vector
        v = rec["masked"].numpy()
        # 4 bytes a value, as a float32 model; spread beyond any sum of plain vectors
        assert v.dtype == np.uint32 and int(v.max()) > SecAggParams().levels * len(nodes)
        metrics = next(iter(m.content.metric_records.values()))
        assert metrics["num-examples"] == 1.0  # no row count with the update
    # what did reach the coordinator from the nodes in the other stages: keys and encrypted shares
    kinds = {str(m.content["secagg"].get("ct", "")) != "" for m in grid.received if "secagg" in m.content.config_records}
    assert kinds  # the stages ran through the coordinator
    for n in nodes:  # every node logged what it sent (its directory also holds the plain run)
        from fedgov.node.home import NodeHome

        sent = [e for e in NodeHome(n.train_path.parent).audit.entries()
                if e.kind == "sent" and e.payload.get("kind") == "train" and e.task_id == runs["secure-task-id"]]
        assert sent and all(list(e.payload["arrays"]) == ["masked"] for e in sent)


def test_a_dropout_is_tolerated_and_too_many_discard_the_round(tmp_path: Path, three_city_task, run_task, drop_train_in) -> None:
    fed, task = three_city_task(tmp_path, rounds=2, training={"secure_aggregation": True, "reply_timeout": 5})

    # four nodes, threshold 3 (more than two thirds): round 1: node 0 goes away after the shares
    # stage; round 2: nodes 0 and 1 do
    fed.write_text(fed.read_text() + '\n[[members]]\ncode = "GM0599"\n')
    _, _, nodes, manifest = prepare(tmp_path / "nodes4", fed, task)
    grid = InProcessGrid(manifest, len(nodes), run_id=41, faults={0: drop_train_in(1, 2), 1: drop_train_in(2)})
    report = run_task(grid, task, tmp_path / "run", run_id=41, federation="resume-3")
    assert report.status == "completed", report.message
    r1, r2 = report.rounds
    assert len(r1.nodes_trained) == 3 and r1.discarded is None and len(r1.nodes_failed) == 1
    assert "no reply" in next(iter(r1.nodes_failed.values()))
    # the three survivors' sum, unmasked (0.7638 in each of 5 draws of the released row counts)
    assert r1.accuracy is not None and r1.accuracy > 0.75
    assert r2.discarded is not None and "needs 3: round discarded" in r2.discarded
    assert r2.accuracy == r1.accuracy  # a discarded round does not move the model


def test_no_downgrade_to_plaintext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, three_city_task, run_task) -> None:
    """A coordinator that skips the protocol for a secure task gets no update at all."""
    import fedgov.coordinator.run as C

    fed, task = three_city_task(tmp_path, rounds=1, training={"secure_aggregation": True})
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task)
    real = C.build_strategy

    def plain(task, *a, **kw):  # type: ignore[no-untyped-def]
        return real(task.model_copy(update={"training": task.training.model_copy(update={"secure_aggregation": False})}), *a, **kw)

    monkeypatch.setattr(C, "build_strategy", plain)
    grid = InProcessGrid(manifest, len(nodes), run_id=51)
    run_task(grid, task, tmp_path / "run", run_id=51, federation="resume-3")
    train_replies = [m for m in grid.received if m.metadata.message_type.startswith("train")]
    # the coordinator gets the fixed refusal only, no update
    assert train_replies and all(m.has_error() for m in train_replies)
    assert {m.error.reason for m in train_replies} == {error_reason("secure-aggregation")}
    assert all(not m.has_content() for m in train_replies)
    # the reason stays in each node's audit log
    from fedgov.node.home import NodeHome

    for n in nodes:
        stopped = [e for e in NodeHome(n.train_path.parent).audit.entries() if e.kind == "secagg-stopped"]
        assert stopped and "carries no shares" in stopped[0].payload["reason"], n.code


def test_policy_can_require_secure_aggregation(tmp_path: Path, three_city_task) -> None:
    from fedgov.node.policy import default_policy_text

    text = default_policy_text("GM0363", dataset="adult", contract="adult-income", version="1.0", path="train.csv", budget_epsilon=10.0)
    (tmp_path / "policy.toml").write_text(text.replace("require_secure_aggregation = false", "require_secure_aggregation = true"))
    (tmp_path / "train.csv").write_text("x\n")
    policy = load_policy(tmp_path / "policy.toml")
    _, plain = three_city_task(tmp_path / "a", rounds=1)
    _, secure = three_city_task(tmp_path / "b", rounds=1, training={"secure_aggregation": True})
    t, c = load_task(plain)
    d = check_task(policy, task=t, contract=c, rows=None, noise_multiplier=None)
    assert not d.accepted and d.code is not None and d.code.value == "secure-aggregation-required"
    t, c = load_task(secure)
    assert check_task(policy, task=t, contract=c, rows=None, noise_multiplier=None).accepted


def test_secure_aggregation_excludes_rules_that_need_single_updates(tmp_path: Path, three_city_task) -> None:
    for extra, field in (({"secure_aggregation": True, "aggregation": "median"}, "aggregation"),
                         ({"secure_aggregation": True, "max_update_norm": 3.0}, "max_update_norm")):
        _, task = three_city_task(tmp_path / field, rounds=1, training=extra)
        with pytest.raises(ConfigError) as ei:
            load_task(task)
        assert field in str(ei.value) and "secure" in str(ei.value)


@pytest.mark.statistical
def test_statistics_query_under_secure_aggregation(tmp_path: Path, three_city_task, write_overview_query) -> None:
    """The same query with and without secure aggregation on the same three nodes: the
    coordinator gets national figures only, the totals agree within the noise, and every
    release it received carries no value (only its layout) beside a masked vector."""
    from fedgov.analytics import load_query
    from fedgov.coordinator.statistics import run_query

    fed, task = three_city_task(tmp_path, rounds=1)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task)
    reports = {}
    truth = {n.code: [n.train_path, n.test_path] for n in nodes}
    grids = {}
    for secure in (False, True):
        q, contract = load_query(write_overview_query(tmp_path / f"q-{secure}.toml", secure=secure))
        grids[secure] = grid = InProcessGrid(manifest, len(nodes), run_id=60 + secure)
        reports[secure] = run_query(
            grid, q, contract, run_dir=tmp_path / f"run-{secure}", query_file="q.toml", expected_nodes=len(nodes),
            truth_paths=truth, node_wait=5,
        )
    plain, secure = reports[False], reports[True]
    assert secure.status == "completed", secure.message
    assert secure.result is not None and plain.result is not None
    assert {f.scope for f in secure.result.figures} == {"national"}  # no node's figures, no region's
    assert {f.scope for f in plain.result.figures} >= {"national", "node"}
    assert sorted(secure.result.nodes) == sorted(n.code for n in nodes)
    for measure in ("people-by-sex-and-income", "mean-age", "share-above-50k"):
        a, b = plain.result.national(measure), secure.result.national(measure)
        assert set(a) == set(b)
        for cell in a:
            fa, fb = a[cell], b[cell]
            # the same noise; a ratio's standard error also depends on its (noisy) estimate
            assert fb.estimate is not None and fb.std_error == pytest.approx(fa.std_error, rel=0.01)
            # Two independent noisy draws: the difference is a sum of 6 (discrete) Laplace draws (3
            # nodes each) with sd sqrt(2) SE. Its tails are far heavier than a Gaussian's: exactly
            # (difference of Gamma(6) variables) P(> 4.24 sd, the old bound of 6 SE) = 2e-4 per
            # cell; 12 SE is 8.5 sd: P = 2e-9 per cell, 1.2e-8 for the 6 cells.
            assert abs(fb.estimate - fa.estimate) < 12 * (fa.std_error or 1.0)
    assert secure.errors is not None  # the simulation's truth: errors of the secure figures, too
    # what reached the coordinator: layouts without values, and masked vectors
    import json

    stats_replies = [m for m in grids[True].received if "stats" in m.content.config_records]
    assert len(stats_replies) == len(nodes)
    for m in stats_replies:
        release = json.loads(json.loads(str(m.content["stats"]["answer-json"]))["release_json"])
        assert all(v is None for p in release["parts"] for v in p["values"] + p["small"])
        assert list(m.content.array_records["arrays"]) == ["masked"]
