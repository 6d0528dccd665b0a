"""Updates the coordinator leaves out, and robust aggregation, on real Flower messages (no processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgov.coordinator.aggregation import check_update, screen_updates, update_norm
from fedgov.config import load_task
from fedgov.coordinator.recording import Recorder, build_strategy
from fedgov.coordinator.events import EventWriter

ROOT = Path(__file__).resolve().parents[2]
GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps the messages these tests build


def _reply(node_id: int, arrays: dict[str, np.ndarray], n: int = 100) -> Message:
    TaskIdentity.node_id = 0
    ins = Message(RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node_id
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "epsilon": 1.0})})
    return Message(content, reply_to=ins)


def test_check_update_names_what_is_wrong() -> None:
    ok = {"w": np.ones((2, 3)), "b": np.ones(2)}
    assert check_update(ok, GLOBAL) is None
    assert "NaN" in (check_update({**ok, "w": np.full((2, 3), np.nan)}, GLOBAL) or "")
    assert "infinite" in (check_update({**ok, "b": np.array([1.0, np.inf])}, GLOBAL) or "")
    assert "missing b" in (check_update({"w": ok["w"]}, GLOBAL) or "")
    assert "unexpected x" in (check_update({**ok, "x": np.ones(1)}, GLOBAL) or "")
    assert "shape (3, 2)" in (check_update({**ok, "w": np.ones((3, 2))}, GLOBAL) or "")
    assert update_norm(ok, GLOBAL) == pytest.approx(np.sqrt(8))
    assert "above the task's bound" in (check_update(ok, GLOBAL, max_norm=2.0) or "")
    assert check_update(ok, GLOBAL, max_norm=3.0) is None


def test_screen_leaves_out_bad_updates_and_names_the_node() -> None:
    rng = np.random.default_rng(0)
    good = [_reply(i, {k: v + rng.normal(0, 0.1, v.shape) for k, v in GLOBAL.items()}) for i in (1, 2, 3)]
    nan = _reply(4, {"w": np.full((2, 3), np.nan), "b": np.zeros(2)})
    scaled = _reply(5, {k: v + 100.0 for k, v in GLOBAL.items()})
    names = {1: "GM0363", 2: "GM0344", 3: "GM0150", 4: "GM0599", 5: "GM0014"}
    kept, rejected = screen_updates(good + [nan, scaled], GLOBAL, max_norm=5.0, name=lambda m: names[m.metadata.src_node_id])
    assert [m.metadata.src_node_id for m in kept] == [1, 2, 3]
    assert set(rejected) == {"GM0599", "GM0014"}
    assert "NaN" in rejected["GM0599"] and "bound" in rejected["GM0014"]


def _aggregate(aggregation: str, replies: list[Message], tmp: Path) -> dict[str, np.ndarray]:
    task, _ = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    task = task.model_copy(update={"training": task.training.model_copy(update={"aggregation": aggregation})})
    recorder = Recorder({}, EventWriter(tmp / f"{aggregation}.jsonl"))
    strategy = build_strategy(task, len(replies), recorder)
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("attack", ["scaled-by-100", "flipped-sign"])
def test_robust_aggregation_resists_one_bad_node_of_twelve(tmp_path: Path, attack: str) -> None:
    rng = np.random.default_rng(1)
    target = {"w": np.full((2, 3), 0.5), "b": np.full(2, -0.3)}
    honest = [{k: v + rng.normal(0, 0.05, v.shape) for k, v in target.items()} for _ in range(11)]
    bad = {k: v * 100 for k, v in target.items()} if attack == "scaled-by-100" else {k: -v for k, v in target.items()}
    updates = [*honest, bad]
    # Fresh messages for each strategy: Flower's FedMedian takes the arrays out of the replies.
    dist = {
        a: update_norm(_aggregate(a, [_reply(i + 1, u) for i, u in enumerate(updates)], tmp_path), target)
        for a in ("mean", "median", "trimmed-mean", "krum")
    }
    for robust in ("median", "trimmed-mean", "krum"):
        assert dist[robust] < 0.1, dist
    assert dist["mean"] > 3 * max(dist["median"], dist["trimmed-mean"], dist["krum"]), dist


def test_strategy_follows_the_task(tmp_path: Path) -> None:
    task, _ = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    names = {}
    for agg in ("mean", "median", "trimmed-mean", "krum"):
        t = task.model_copy(update={"training": task.training.model_copy(update={"aggregation": agg})})
        names[agg] = type(build_strategy(t, 12, Recorder({}, EventWriter(tmp_path / "e.jsonl"))).strategy).__name__
    assert names == {"mean": "FedAvg", "median": "FedMedian", "trimmed-mean": "FedTrimmedAvg", "krum": "Krum"}


def test_server_momentum_is_fedavgm_and_carries_the_last_step(tmp_path: Path) -> None:
    task, _ = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    task = task.model_copy(update={"training": task.training.model_copy(update={"server_momentum": 0.9})})
    wrapped = build_strategy(task, 2, Recorder({}, EventWriter(tmp_path / "m.jsonl")))
    assert type(wrapped.strategy).__name__ == "FedAvgM"
    start = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    step = {k: np.full_like(v, 0.1) for k, v in GLOBAL.items()}
    wrapped.strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})  # type: ignore[attr-defined]  # set by configure_train in a run
    first, _ = wrapped.strategy.aggregate_train(1, [_reply(i, {k: start[k] + step[k] for k in start}) for i in (1, 2)])
    assert first is not None
    after_1 = {k: v.numpy() for k, v in first.items()}
    np.testing.assert_allclose(after_1["w"], 0.1, rtol=1e-6)  # round 1: the nodes' average
    second, _ = wrapped.strategy.aggregate_train(2, [_reply(i, {k: after_1[k] + step[k] for k in start}) for i in (1, 2)])
    assert second is not None
    np.testing.assert_allclose(second["w"].numpy(), 0.1 + 0.1 + 0.9 * 0.1, rtol=1e-6)  # plus 0.9 of the last move


def test_server_momentum_needs_plain_fedavg() -> None:
    from fedgov.config import TrainingSpec

    for bad in ({"aggregation": "median"}, {"strategy": "fedprox", "proximal_mu": 0.1}):
        with pytest.raises(ValueError, match="server_momentum applies to FedAvg's mean"):
            TrainingSpec(server_momentum=0.9, **bad)  # type: ignore[arg-type]
    assert TrainingSpec(server_momentum=0.9, secure_aggregation=True).server_momentum == 0.9


def test_secure_fedavg_momentum_moves_by_the_velocity() -> None:
    """Under secure aggregation the coordinator applies FedAvgM to the decoded mean update itself."""
    from fedgov.coordinator.secure import SecureFedAvg
    from fedgov.privacy.secagg import SecAggParams

    strategy = SecureFedAvg(stage_config={}, params=SecAggParams(clip=8.0), stage_timeout=1.0, server_momentum=0.5)
    strategy._global = {"w": np.zeros(3, dtype=np.float32)}
    first = strategy._with_momentum({"w": np.full(3, 0.2, dtype=np.float32)})
    np.testing.assert_allclose(first["w"], 0.2, rtol=1e-6)  # round 1: the mean update
    strategy._global = first
    second = strategy._with_momentum({"w": first["w"] + np.float32(0.1)})
    np.testing.assert_allclose(second["w"], 0.2 + 0.1 + 0.5 * 0.2, rtol=1e-6)  # plus half of the last move
    assert second["w"].dtype == np.float32
    plain = SecureFedAvg(stage_config={}, params=SecAggParams(clip=8.0), stage_timeout=1.0)
    plain._global = {"w": np.zeros(3, dtype=np.float32)}
    same = {"w": np.full(3, 0.2, dtype=np.float32)}
    assert plain._with_momentum(same) is same


def test_server_momentum_is_automatic_under_distributed_dp_only() -> None:
    from fedgov.config.task import AUTO_SERVER_MOMENTUM_DISTRIBUTED

    distributed, _ = load_task(ROOT / "configs" / "tasks" / "guprenat.toml")
    local, _ = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    assert distributed.training.server_momentum is None and distributed.server_momentum == AUTO_SERVER_MOMENTUM_DISTRIBUTED
    assert local.server_momentum == 0.0
    off = distributed.model_copy(update={"training": distributed.training.model_copy(update={"server_momentum": 0.0})})
    assert off.server_momentum == 0.0


def test_the_momentum_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """SecureFedAvg's velocity and FedAvgM's momentum vector are saved beside the model and given
    back to a resumed run's strategy; the model file alone is what load_checkpoint returns."""
    from flwr.serverapp.strategy import FedAvgM

    from fedgov.coordinator.checkpoint import Checkpoint, load_checkpoint, load_momentum, save_checkpoint
    from fedgov.coordinator.recording import momentum_state, restore_momentum
    from fedgov.coordinator.secure import SecureFedAvg
    from fedgov.privacy.secagg import SecAggParams

    keys = ["w", "b"]
    model = {"w": np.ones((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    secure = SecureFedAvg(stage_config={}, params=SecAggParams(clip=8.0), stage_timeout=1.0, server_momentum=0.9)
    assert momentum_state(secure, keys) is None  # no round yet
    secure._velocity = {"w": np.full((2, 3), 0.25), "b": np.array([0.5, -0.5])}
    state = Checkpoint(task="t", task_file="t.toml", task_fingerprint="f", federation="x", mode="simulation", task_run="1",
                       round=2, rounds_planned=4, strategy="SecureFedAvg", nodes_admitted=[], nodes=[], rounds=[],
                       model_file="", model_sha256="")
    save_checkpoint(tmp_path, state, model, momentum_state(secure, keys))
    _, arrays = load_checkpoint(tmp_path)
    assert sorted(arrays) == ["b", "w"]
    saved = load_momentum(tmp_path)
    assert saved is not None
    fresh = SecureFedAvg(stage_config={}, params=SecAggParams(clip=8.0), stage_timeout=1.0, server_momentum=0.9)
    restore_momentum(fresh, saved, keys)
    assert fresh._velocity is not None
    np.testing.assert_array_equal(fresh._velocity["b"], [0.5, -0.5])
    flower = FedAvgM(server_momentum=0.9)
    flower.momentum_vector = [np.full((2, 3), -0.1), np.array([0.2, 0.3])]
    got = momentum_state(flower, keys)
    assert got is not None
    save_checkpoint(tmp_path, state, model, got)
    again = FedAvgM(server_momentum=0.9)
    restore_momentum(again, load_momentum(tmp_path) or {}, keys)
    assert again.momentum_vector is not None
    np.testing.assert_array_equal(again.momentum_vector[1], [0.2, 0.3])
    save_checkpoint(tmp_path, state, model)  # no momentum: none is found
    assert load_momentum(tmp_path) is None
