"""Distributed DP (fedgov.privacy.distributed): DP-FedAvg with discrete Gaussian noise shares,
summed under secure aggregation. The mechanism alone (sampler, rounding, noise level, dropouts,
the tau condition, the plan), then whole runs through fedgov's coordinator and ClientApp with
its mods (in process): the coordinator sees masked vectors only, every node's ledger holds one
Gaussian release per round, a round with more dropouts than allowed is discarded, node policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedgov.config import load_task
from fedgov.errors import ConfigError, PrivacyError
from fedgov.node.policy import check_task, default_policy_text, load_policy
from fedgov.privacy import epsilon_from_history
from fedgov.privacy.distributed import (
    MODULUS,
    clip_update,
    decode_mean,
    discrete_gaussian,
    encode_share,
    plan_distributed,
    tau,
)

from fedgov.testing import InProcessGrid, prepare


@pytest.mark.parametrize("sigma2", [0.8, 9.0, 2500.0])
def test_discrete_gaussian_has_its_law(sigma2: float) -> None:
    rng = np.random.default_rng(1)
    x = discrete_gaussian(sigma2, 200_000, rng)
    assert x.dtype == np.int64
    # For sigma >= 1 the discrete Gaussian's variance is sigma^2 to within 1e-8; below, smaller.
    sd_of_var = sigma2 * math.sqrt(2 / len(x))
    assert abs(x.mean()) < 5 * math.sqrt(sigma2 / len(x))
    if sigma2 >= 1:
        assert abs(x.var() - sigma2) < 5 * sd_of_var
    else:
        exact = sum(k * k * math.exp(-k * k / (2 * sigma2)) for k in range(-30, 31)) / sum(math.exp(-k * k / (2 * sigma2)) for k in range(-30, 31))
        assert abs(x.var() - exact) < 5 * exact * math.sqrt(2 / len(x)) + 1e-3
    # symmetric, and (where the counts can tell) the mode is 0
    assert abs(np.mean(x > 0) - np.mean(x < 0)) < 0.01
    if sigma2 <= 10:
        values, counts = np.unique(x, return_counts=True)
        assert values[counts.argmax()] == 0


def _plan(dimension: int = 64, rounds: int = 5, eps: float = 2.0, q: float = 1.0):  # type: ignore[no-untyped-def]
    return plan_distributed(dimension=dimension, clip=1.0, rounds=rounds, sample_rate=q, target_epsilon=eps, delta=1e-5, accountant="rdp")


def test_the_plan_meets_its_target_and_costs_what_the_accountant_says() -> None:
    p = _plan()
    assert p.planned_epsilon <= 2.0 and p.planned_epsilon > 0.9 * 2.0
    assert p.planned_epsilon == pytest.approx(epsilon_from_history(history=p.history_after(5), delta=1e-5, accountant="rdp"))
    assert p.sensitivity == pytest.approx(p.clip / p.scale + math.sqrt(64))
    assert p.clip / p.scale >= 100 * math.sqrt(64) * (1 - 1e-9)  # rounding adds at most 1% to the sensitivity
    # more rounds need more noise; sampling municipalities lets it be less
    assert _plan(rounds=20).noise_multiplier > p.noise_multiplier > _plan(q=0.5).noise_multiplier
    assert p.round_entry() == (p.noise_multiplier, 1.0, 1)


@pytest.mark.parametrize("n,min_contributors,contributing", [(20, 20, 20), (20, 18, 20), (20, 18, 18)])
def test_the_noise_in_the_sum_matches_its_target(n: int, min_contributors: int, contributing: int) -> None:
    """Zero updates: what is released is the noise alone. Its variance per coordinate is the
    target ``(z * sensitivity)^2`` scaled by contributing / min_contributors: exactly the target
    when only min_contributors contribute (the dropouts allowed), more when more do."""
    p = _plan(dimension=4000)
    rng = np.random.default_rng(7)
    total = np.zeros(p.dimension, dtype=np.int64)
    for _ in range(contributing):
        total = (total + encode_share(np.zeros(p.dimension), p, min_contributors=min_contributors, contributors=n, rng=rng)) % MODULUS
    signed = np.where(total >= MODULUS // 2, total - MODULUS, total).astype(np.float64)
    target = p.total_sigma**2 * contributing / min_contributors
    assert signed.var() == pytest.approx(target, rel=5 * math.sqrt(2 / p.dimension))
    assert abs(signed.mean()) < 5 * math.sqrt(target / p.dimension)
    if contributing >= min_contributors:
        assert signed.var() >= p.total_sigma**2 * (1 - 5 * math.sqrt(2 / p.dimension))
    # the released mean's noise in the update's units
    mean = decode_mean(total, contributing, p)
    assert mean.std() == pytest.approx(math.sqrt(target) * p.scale / contributing, rel=0.1)


def test_updates_are_clipped_and_rounded_without_bias() -> None:
    p = plan_distributed(dimension=20, clip=1.0, rounds=1, sample_rate=1.0, target_epsilon=80.0, delta=1e-5, accountant="rdp")
    rng = np.random.default_rng(3)
    u = rng.normal(size=20)
    u *= 3.0 / np.linalg.norm(u)  # three times the clip
    expected = clip_update(u, 1.0)
    assert np.linalg.norm(expected) == pytest.approx(1.0)
    draws = np.stack([decode_mean(encode_share(u, p, min_contributors=1, contributors=1, rng=rng), 1, p) for _ in range(3000)])
    noise_sd = p.total_sigma * p.scale
    np.testing.assert_allclose(draws.mean(axis=0), expected, atol=5 * noise_sd / math.sqrt(3000) + 1e-3)


def test_shapes_bounds_and_the_tau_condition_are_enforced() -> None:
    p = _plan(dimension=10)
    with pytest.raises(PrivacyError, match="10"):
        encode_share(np.zeros(11), p, min_contributors=1, contributors=1)
    with pytest.raises(PrivacyError, match="NaN"):
        encode_share(np.full(10, np.nan), p, min_contributors=1, contributors=1)
    with pytest.raises(PrivacyError, match="between 1 and"):
        encode_share(np.zeros(10), p, min_contributors=5, contributors=4)
    # a noise share too small for Kairouz et al.'s bound (tau * d) is refused
    tiny = plan_distributed(dimension=1, clip=1.0, rounds=1, sample_rate=1.0, target_epsilon=100.0, delta=1e-5, accountant="rdp")
    n = int(tiny.total_sigma**2 / 0.05) + 2  # each share's variance below 0.05
    assert tau(tiny.node_variance(n), n) > 1e-9
    with pytest.raises(PrivacyError, match="too small"):
        encode_share(np.zeros(1), tiny, min_contributors=n, contributors=n)
    assert tau(p.node_variance(342), 342) == 0.0  # realistic shapes: negligible


# --------------------------------------------------------------------------- whole runs

CITIES = ["GM0363", "GM0599", "GM0344", "GM0518", "GM0014", "GM0150"]


@pytest.fixture(scope="module")
def dd_task(write_federation, write_task, adult_test_csv):
    """``dd_task(folder, rounds=2, training={...})``: the federation ``dd-6`` (six cities) and a
    distributed-DP task on it (secure aggregation, 20% dropout tolerance)."""

    def make(tmp: Path, *, rounds: int = 2, training: dict[str, object] | None = None) -> tuple[Path, Path]:
        fed = write_federation(tmp / "fed.toml", name="dd-6", members=CITIES, seed=4, min_rows=300)
        task = write_task(
            tmp / "task.toml", name="distributed", federation=fed,
            training={"rounds": rounds, "local_epochs": 2, "batch_size": 64, "learning_rate": 0.5, "min_nodes": 2, "seed": 1,
                      "fraction_evaluate": 0.0, "secure_aggregation": True, "reply_timeout": 5, **(training or {})},
            privacy={"mode": "distributed", "target_epsilon": 8.0, "delta": 1e-5, "update_clip": 2.0, "dropout_tolerance": 0.2,
                     "accountant": "rdp"},
            evaluation={"centralized": adult_test_csv},
        )
        return fed, task

    return make


def test_a_distributed_run_releases_only_noisy_sums_and_every_ledger_holds_its_rounds(tmp_path: Path, dd_task, run_task, drop_train_in) -> None:
    """6 cities, 3 rounds; round 2: one node drops after the shares stage (allowed: 20% of 6 is
    1); round 3: two drop (beyond the tolerance): discarded, nothing released."""
    from fedgov.node.home import NodeHome

    fed, task_path = dd_task(tmp_path, rounds=3)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    faults = {0: drop_train_in(2, 3), 1: drop_train_in(3)}
    grid = InProcessGrid(manifest, len(nodes), run_id=61, faults=faults)
    report = run_task(grid, task_path, tmp_path / "run", run_id=61, federation="dd-6")
    assert report.status == "completed", report.message
    assert report.privacy["mode"] == "distributed" and "municipality" in str(report.privacy["unit"])
    z = float(report.privacy["noise_multiplier"])  # type: ignore[arg-type]
    r1, r2, r3 = report.rounds
    assert len(r1.nodes_trained) == 6 and r1.discarded is None
    assert len(r2.nodes_trained) == 5 and r2.discarded is None  # one dropout: within the tolerance
    assert r3.discarded is not None and "sized for at least 5" in r3.discarded and "nothing released" in r3.discarded
    assert r3.accuracy == r2.accuracy and r3.loss == r2.loss  # a discarded round does not move the model
    assert r2.loss != r1.loss  # a released round does (with 6 nodes the noise is large: no accuracy is asserted)
    # the coordinator received masked vectors only
    train_replies = [m for m in grid.received if m.metadata.message_type.startswith("train")]
    assert train_replies
    for m in train_replies:
        (rec,) = m.content.array_records.values()
        assert list(rec) == ["masked"] and rec["masked"].numpy().dtype == np.uint32
    # every node's ledger: one Gaussian release (z, q = 1, 1 step) per round it trained, and an
    # epsilon per municipality within the target (a node that trained in round 3 spent for it:
    # its share left the node; the coordinator then discarded the round)
    for i, n in enumerate(nodes):
        spends = [e for e in NodeHome(n.train_path.parent).ledger.events() if e.kind == "spend" and not e.task_id.startswith("rows-")]
        assert len(spends) == (3 if i >= 2 else (1 if i == 0 else 2))
        for e in spends:
            assert [tuple(h) for h in e.mechanism.history] == [(pytest.approx(z), 1.0, 1)]
        res = next(r for r in report.nodes if r.node == n.code)
        assert res.epsilon is not None and 0 < res.epsilon <= 8.0
        # its report line says what that epsilon means per citizen
        assert res.per_citizen.startswith(f"epsilon {res.epsilon:.2f}") and "every citizen" in res.per_citizen


def test_a_node_refuses_parameters_that_are_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, dd_task, run_task
) -> None:
    """A coordinator that sizes the shares for more contributors than the round has (round 1),
    or uses another noise multiplier (round 2), gets no update, and nothing is spent. The
    coordinator gets the fixed ``distributed-dp`` refusal; the details stay in the node's log."""
    import logging

    from fedgov.node.refusals import error_reason
    import fedgov.coordinator.secure as C
    from fedgov.node.home import NodeHome

    fed, task_path = dd_task(tmp_path, rounds=2)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    real = C.SecAggRound.record_for
    lies = {1: lambda extra: {**extra, "dd-min": 1000}, 2: lambda extra: {**extra, "dd-z": float(extra["dd-z"]) / 2}}
    state = {"round": 0}
    real_setup = C.secagg_setup

    def setup(grid, ids, server_round, *a, **kw):  # type: ignore[no-untyped-def]
        state["round"] = server_round
        return real_setup(grid, ids, server_round, *a, **kw)

    def lying(self, dst, extra=None):  # type: ignore[no-untyped-def]
        return real(self, dst, lies[state["round"]](dict(extra or {})))

    monkeypatch.setattr(C, "secagg_setup", setup)
    monkeypatch.setattr(C.SecAggRound, "record_for", lying)
    grid = InProcessGrid(manifest, len(nodes), run_id=62)
    with caplog.at_level(logging.WARNING, logger="fedgov.node"):
        report = run_task(grid, task_path, tmp_path / "run", run_id=62, federation="dd-6")
    assert all(r.discarded and not r.nodes_trained for r in report.rounds)
    train = [m for m in grid.received if m.metadata.message_type.startswith("train")]
    assert len(train) == 12 and all(m.has_error() for m in train)
    # what leaves is the fixed text only: no parameter values of either lie
    assert {m.error.reason for m in train} == {error_reason("distributed-dp")}
    # the node's own log has the detail of each lie, once per node
    logged = [r.getMessage() for r in caplog.records if r.name == "fedgov.node"]
    assert sum("min_contributors 1000" in r for r in logged) == 6
    assert sum("not this node's" in r for r in logged) == 6
    for n in nodes:  # refused before training: nothing spent (but the one row-count release at hello)
        spends = [e for e in NodeHome(n.train_path.parent).ledger.events() if e.kind == "spend"]
        assert [e.task_id.startswith("rows-") for e in spends] == [True]


def test_distributed_needs_secure_aggregation_and_policy_can_require_it(tmp_path: Path, dd_task) -> None:
    _, task_path = dd_task(tmp_path / "a")
    text = task_path.read_text().replace("secure_aggregation = true", "secure_aggregation = false")
    task_path.write_text(text)
    with pytest.raises(ConfigError, match="secure_aggregation"):
        load_task(task_path)
    policy_text = default_policy_text("GM0363", dataset="adult", contract="adult-income", version="1.0", path="train.csv", budget_epsilon=10.0)
    (tmp_path / "policy.toml").write_text(policy_text.replace("require_distributed = false", "require_distributed = true"))
    (tmp_path / "train.csv").write_text("x\n")
    policy = load_policy(tmp_path / "policy.toml")
    _, dist = dd_task(tmp_path / "b")
    _, local = dd_task(tmp_path / "c")
    dist.write_text(dist.read_text().replace("target_epsilon = 8.0", "target_epsilon = 2.0"))
    local.write_text(local.read_text().replace('mode = "distributed"', 'mode = "local"').replace("target_epsilon = 8.0", "target_epsilon = 2.0"))
    t, c = load_task(local)
    d = check_task(policy, task=t, contract=c, rows=None, noise_multiplier=None)
    assert not d.accepted and d.code is not None and d.code.value == "distributed-dp-required"
    t, c = load_task(dist)
    assert check_task(policy, task=t, contract=c, rows=None, noise_multiplier=5.0).accepted
    # a minimum noise multiplier bounds z, the sum's noise
    (tmp_path / "policy.toml").write_text(
        policy_text.replace("require_distributed = false", "require_distributed = true").replace("min_noise_multiplier = 0.3", "min_noise_multiplier = 6.0")
    )
    strict = load_policy(tmp_path / "policy.toml")
    d = check_task(strict, task=t, contract=c, rows=None, noise_multiplier=1.5)
    assert not d.accepted and d.code is not None and d.code.value == "noise-below-min"


def test_a_resumed_round_is_not_released_twice(tmp_path: Path, dd_task, run_task) -> None:
    """The coordinator dies after the nodes trained round 2 and before it saved the round; the
    resumed run asks for round 2 again. Under distributed DP the noise share is drawn per
    sending, so a node does not send a spent round twice: round 2 is discarded, round 3 runs,
    and every ledger holds exactly one release per round."""
    from fedgov.testing import CoordinatorCrash

    from fedgov.coordinator.run import run_training
    from fedgov.node.home import NodeHome

    fed, task_path = dd_task(tmp_path, rounds=3)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    task, contract = load_task(task_path)
    grid = InProcessGrid(manifest, len(nodes), run_id=71)
    grid.crash_after_train_round = 2
    with pytest.raises(CoordinatorCrash):
        run_task(grid, task_path, tmp_path / "run", run_id=71, federation="dd-6")
    report = run_training(
        InProcessGrid(manifest, len(nodes), run_id=72), task, contract, run_dir=tmp_path / "run", expected_nodes=len(nodes),
        task_file=str(task_path), federation="dd-6", local_baseline=False, flower_run_id=72, connect_timeout=5, resume=True,
    )
    assert report.status == "completed", report.message
    r1, r2, r3 = report.rounds
    assert r1.discarded is None and len(r1.nodes_trained) == 6  # from the checkpoint
    assert r2.discarded is not None and not r2.nodes_trained
    assert len(r2.nodes_failed) == 6
    assert all(why.startswith("round-spent") for why in r2.nodes_failed.values()), r2.nodes_failed
    assert r3.discarded is None and len(r3.nodes_trained) == 6
    for n in nodes:
        spends = [e for e in NodeHome(n.train_path.parent).ledger.events() if e.kind == "spend"]
        assert [e.round for e in spends if not e.task_id.startswith("rows-")] == [1, 2, 3]
        # the row count was released once (first hello), not again on the resumed run's hello
        assert len([e for e in spends if e.task_id.startswith("rows-")]) == 1


def test_sampled_municipalities_are_accounted_at_their_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dd_task, run_task) -> None:
    """``fraction_train = 0.8``: the coordinator asks every municipality every round, and each
    flips its own secret coin (rate 0.8) for whether its update goes into the masked sum; its
    noise share goes in either way. The coordinator cannot see who took part, so the plan's z is
    the amplified one and every release in a ledger is recorded at rate 0.8; every round of the
    task is in every ledger."""
    import clients.mods as mods
    from fedgov.node.home import NodeHome

    flips: list[bool] = []
    real_coin = mods._coin

    def counted(rate: float) -> bool:
        assert rate == 0.8
        flips.append(real_coin(rate))
        return flips[-1]

    monkeypatch.setattr(mods, "_coin", counted)
    fed, task_path = dd_task(tmp_path, rounds=2, training={"fraction_train": 0.8})
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = InProcessGrid(manifest, len(nodes), run_id=81)
    report = run_task(grid, task_path, tmp_path / "run", run_id=81, federation="dd-6")
    assert report.status == "completed", report.message
    z = float(report.privacy["noise_multiplier"])  # type: ignore[arg-type]
    assert report.privacy["sample_rate"] == 0.8
    assert z < plan_distributed(dimension=report.model_parameters or 0, clip=2.0, rounds=2, sample_rate=1.0,
                                target_epsilon=8.0, delta=1e-5, accountant="rdp").noise_multiplier
    for r in report.rounds:
        assert set(r.nodes_asked) == {n.code for n in nodes} and not r.nodes_absent
    assert len(flips) == 2 * len(nodes)  # one secret coin per node and round, at the node
    for n in nodes:
        spends = [e for e in NodeHome(n.train_path.parent).ledger.events() if e.kind == "spend" and not e.task_id.startswith("rows-")]
        assert len(spends) == 2
        for e in spends:
            assert [tuple(h) for h in e.mechanism.history] == [(pytest.approx(z), 0.8, 1)]


def test_a_coordinator_cannot_unmask_fewer_contributors_than_the_noise_was_sized_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dd_task, run_task
) -> None:
    """A coordinator that leaves honest nodes out of the survivor list (4 of 6: below the 5
    contributors the noise shares were sized for, and below the threshold of 5) and skips its
    own checks: every node refuses to sign or reveal, so the under-noised sum is never unmasked."""
    import dataclasses

    import fedgov.coordinator.secure as C
    from fedgov.node.home import NodeHome

    fed, task_path = dd_task(tmp_path, rounds=1)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    real_unmask = C.secagg_unmask

    def fewer(grid, rnd, masked, *a, **kw):  # type: ignore[no-untyped-def]
        kept = dict(sorted(masked.items())[:4])
        return real_unmask(grid, dataclasses.replace(rnd, threshold=1), kept, *a, **kw)  # its own check skipped

    monkeypatch.setattr(C, "secagg_unmask", fewer)
    grid = InProcessGrid(manifest, len(nodes), run_id=77)
    report = run_task(grid, task_path, tmp_path / "run", run_id=77, federation="dd-6")
    assert report.rounds[0].discarded is not None and "signed the survivor list" in report.rounds[0].discarded
    assert not [m for m in grid.received if not m.has_error() and "owner" in m.content.config_records.get("secagg", {})]
    stopped = [e.payload["reason"] for n in nodes[:4] for e in NodeHome(n.train_path.parent).audit.entries() if e.kind == "secagg-stopped"]
    assert len(stopped) == 4 and all("revealing needs 5" in r or "sized for at least 5" in r for r in stopped)


def test_a_tiny_municipality_takes_part_under_distributed_dp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dd_task, run_task) -> None:
    """A municipality with 4 training rows takes part under distributed DP with the default
    policy (no rows minimum in this mode), also when its released row count comes out at 0:
    its hello carries the public clamp (2), which its release gate lets pass. Under local
    DP-SGD the same node refuses with too-few-rows, naming limits.min_rows."""
    import pandas as pd

    import fedgov.node as N
    from fedgov.node.home import NodeHome
    from fedgov.node.rounds import ROWS_NOTE

    fed, task_path = dd_task(tmp_path, rounds=1)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    tiny = nodes[0].train_path
    pd.read_csv(tiny).head(4).to_csv(tiny, index=False)
    real = N.released_row_count
    # the node's own release with a count far below zero: it comes out at 0 unless the noise
    # (sd 20) exceeds 10 standard deviations
    monkeypatch.setattr(N, "released_row_count", lambda home, contract, path, n: real(home, contract, path, n - 200))
    grid = InProcessGrid(manifest, len(nodes), run_id=71)
    report = run_task(grid, task_path, tmp_path / "run", run_id=71, federation="dd-6")
    assert report.status == "completed", report.message
    assert [n.status for n in report.nodes] == ["accepted"] * 6
    assert len(report.rounds[0].nodes_trained) == 6
    home = NodeHome(tiny.parent)
    notes = [e.note for e in home.ledger.events() if e.kind == "spend" and e.note.startswith(ROWS_NOTE)]
    assert notes == [f"{ROWS_NOTE}0"]
    blocked = [e for e in home.audit.entries() if e.kind == "blocked"]
    assert blocked == []
    # the same node under local DP-SGD: refused before any release, naming the setting
    task, contract = load_task(task_path)
    local = task.model_copy(update={"privacy": task.privacy.model_copy(update={"mode": "local"}),
                                    "training": task.training.model_copy(update={"secure_aggregation": False})})
    answer, _ = N.hello(local, contract, node=nodes[0].code, node_name="x", train_path=tiny, test_path=None,
                        release_rows=lambda n: n, min_rows=home.policy().limits.min_rows)
    assert answer.code == "too-few-rows" and "limits.min_rows" in str(answer.reason)


def test_a_simulation_without_a_central_test_set_reports_the_final_model_on_the_pooled_test_splits(
    tmp_path: Path, write_federation, write_task
) -> None:
    """Under distributed DP the nodes release no evaluation; the simulation's coordinator reads the
    test splits it wrote and reports the final model on them, exact and labelled as a
    simulation's figure, and judges learning on it. A deployed run (no test splits) has none."""
    import torch

    from fedgov.coordinator.run import run_training
    from fedgov.data import Encoder, read_table, validate_frame
    from fedgov.models import build_model, evaluate, set_state
    from fedgov.reports import SIMULATED_POOLED_LABEL

    fed = write_federation(tmp_path / "fed.toml", name="dd-4", members=CITIES[:4], seed=4, min_rows=300)
    task_path = write_task(
        tmp_path / "task.toml", name="distributed-pooled", federation=fed,
        training={"rounds": 2, "local_epochs": 2, "batch_size": 64, "learning_rate": 0.5, "min_nodes": 2, "seed": 1,
                  "secure_aggregation": True, "reply_timeout": 5},
        privacy={"mode": "distributed", "target_epsilon": 8.0, "delta": 1e-5, "update_clip": 2.0, "accountant": "rdp"},
    )
    task, contract, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    assert task.evaluation.centralized is None
    common = dict(expected_nodes=len(nodes), task_file=str(task_path), federation="dd-4", local_baseline=False, connect_timeout=5)
    report = run_training(
        InProcessGrid(manifest, len(nodes), run_id=91), task, contract, run_dir=tmp_path / "run", flower_run_id=91,
        simulated_test={n.code: n.test_path for n in nodes}, **common,
    )
    assert report.status == "completed", report.message
    assert report.final is None and report.pooled is not None and report.learning is not None
    pl = report.pooled
    assert pl.label == SIMULATED_POOLED_LABEL and pl.sd == 0.0 and pl.nodes == len(nodes)
    # the same figure, computed here from the saved model and the nodes' test splits
    enc = Encoder.from_contract(contract, task.features)
    xs, ys = zip(*(enc.transform(validate_frame(read_table(n.test_path), contract, file=str(n.test_path))) for n in nodes), strict=True)
    X, y = np.concatenate(xs), np.concatenate(ys)
    model = build_model(task.model, n_features=enc.n_features, n_classes=enc.n_classes, seed=task.training.seed)
    set_state(model, {k: v.numpy() for k, v in torch.load(tmp_path / "run" / "model.pt", weights_only=True).items()})
    expected = evaluate(model, X, y)
    assert pl.total == len(y) and pl.accuracy == pytest.approx(expected.accuracy) and pl.auc == pytest.approx(expected.auc)
    assert report.learning.n == len(y)
    assert report.learning.learned or "pooled test splits (simulation, exact)" in report.learning.message
    # without the test splits (as deployed) there is no global figure and nothing is judged
    _, _, nodes2, manifest2 = prepare(tmp_path / "nodes2", fed, task_path)
    deployed = run_training(
        InProcessGrid(manifest2, len(nodes2), run_id=92), task, contract, run_dir=tmp_path / "run2", flower_run_id=92, **common,
    )
    assert deployed.status == "completed" and deployed.pooled is None and deployed.learning is None
