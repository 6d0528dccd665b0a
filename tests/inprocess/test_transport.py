"""How updates travel (fedgov.transport): float16 differences to the global model, decoded by
the coordinator before screening; and the traffic the report records per round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgov import protocol as P
from fedgov.coordinator import decode_updates, message_bytes, screen_updates
from fedgov.transport import UPDATE, encode_update, is_encoded, local_model, pack, unpack

from fedgov.testing import InProcessGrid, prepare


def _models(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    glob = {"1.weight": rng.normal(size=(4, 8)).astype(np.float32), "0.bias": rng.normal(size=4).astype(np.float32)}
    local = {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for k, v in glob.items()}
    return glob, local


def test_float16_update_is_within_float16_rounding_and_half_the_size() -> None:
    glob, local = _models()
    arr = encode_update(local, glob)
    rec = ArrayRecord({UPDATE: arr})
    assert is_encoded(rec) and arr.dtype == "float16" and len(arr.data) == 2 * 36
    back = local_model(rec, glob)
    assert list(back) == sorted(glob) and all(back[k].dtype == np.float32 and back[k].shape == glob[k].shape for k in glob)
    for k in glob:
        delta = local[k] - glob[k]
        err = np.abs((back[k] - glob[k]) - delta)
        assert np.all(err <= np.abs(delta) * 2.0**-11 + 1e-6)  # float16: 11 significant bits
        assert not np.array_equal(back[k], glob[k])  # the update arrived
    exact = local_model(ArrayRecord({UPDATE: encode_update(local, glob, encoding="float32-delta")}), glob)
    for k in glob:
        np.testing.assert_allclose(exact[k], local[k], rtol=0, atol=1e-6)
    # the order is by name, whatever the dicts' order
    reordered = dict(reversed(list(glob.items())))
    assert encode_update(local, reordered).data == arr.data


def test_updates_that_do_not_fit_are_errors_and_overflow_is_infinite() -> None:
    glob, local = _models()
    with pytest.raises(ValueError, match="lacks parameters"):
        encode_update({"0.bias": local["0.bias"]}, glob)
    with pytest.raises(ValueError, match="encoding"):
        encode_update(local, glob, encoding="int8")
    short = ArrayRecord({UPDATE: Array(dtype="float16", shape=(3,), stype="fedgov/float16-delta", data=np.zeros(3, np.float16).tobytes())})
    with pytest.raises(ValueError, match="3 numbers, the global model 36"):
        local_model(short, glob)
    odd = ArrayRecord({UPDATE: Array(dtype="float16", shape=(1,), stype="fedgov/float16-delta", data=b"\x00\x01\x02")})
    with pytest.raises(ValueError, match="whole number"):
        local_model(odd, glob)
    huge = {k: v + 1e6 for k, v in local.items()}  # beyond float16's 65504
    back = local_model(ArrayRecord({UPDATE: encode_update(huge, glob)}), glob)
    assert all(np.isinf(v).all() for v in back.values())
    # whole float32 models still pass as they are
    plain = ArrayRecord({k: Array(v) for k, v in local.items()})
    assert not is_encoded(plain) and all(np.array_equal(local_model(plain, glob)[k], local[k]) for k in local)
    # unpack/pack keep an encoded record as it was (the node's copy of a sent update)
    rec = ArrayRecord({UPDATE: encode_update(local, glob)})
    again = pack(unpack(rec))
    assert is_encoded(again) and again[UPDATE].data == rec[UPDATE].data and again[UPDATE].stype == rec[UPDATE].stype


def _reply(content: RecordDict, node: int) -> Message:
    TaskIdentity.node_id = 0
    ins = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    return Message(content, reply_to=ins)


@pytest.mark.usefixtures("task_identity")
def test_the_coordinator_decodes_before_screening_and_names_what_does_not_fit() -> None:
    glob, local = _models()
    good = _reply(RecordDict({P.ARRAYS: ArrayRecord({UPDATE: encode_update(local, glob)}), P.METRICS: MetricRecord({"num-examples": 10})}), 1)
    wrong = _reply(RecordDict({P.ARRAYS: ArrayRecord({UPDATE: Array(dtype="float16", shape=(2,), stype="fedgov/float16-delta",
                                                                     data=np.zeros(2, np.float16).tobytes())})}), 2)
    huge = {k: v + 1e6 for k, v in local.items()}
    overflow = _reply(RecordDict({P.ARRAYS: ArrayRecord({UPDATE: encode_update(huge, glob)})}), 3)
    name = {1: "A", 2: "B", 3: "C"}
    decoded, bad = decode_updates([good, wrong, overflow], glob, name=lambda m: name[m.metadata.src_node_id])
    assert list(bad) == ["B"] and "2 numbers, the global model 36" in bad["B"]
    assert len(decoded) == 2
    arrays = decoded[0].content.array_records[P.ARRAYS]
    assert sorted(arrays) == sorted(glob) and np.allclose(arrays["1.weight"].numpy(), local["1.weight"], atol=1e-3)
    kept, rejected = screen_updates(decoded, glob, max_norm=None, name=lambda m: name[m.metadata.src_node_id])
    assert [name[m.metadata.src_node_id] for m in kept] == ["A"] and "C" in rejected and "finite" in rejected["C"]
    # on the wire: the float16 reply is smaller than the same reply with whole float32 arrays
    whole = _reply(RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in local.items()}), P.METRICS: MetricRecord({"num-examples": 10})}), 1)
    fresh = _reply(RecordDict({P.ARRAYS: ArrayRecord({UPDATE: encode_update(local, glob)}), P.METRICS: MetricRecord({"num-examples": 10})}), 1)
    assert message_bytes(fresh) < message_bytes(whole) - 36 * 2  # 2 bytes a number and the .npy headers saved


def test_a_federation_records_its_traffic_and_float16_learns_as_float32(tmp_path: Path, three_city_task, run_task) -> None:
    """The same federation (reproducible noise) with each encoding: the traffic the report
    records, and the same accuracy within 0.01."""
    accuracy = {encoding: _traffic_run(tmp_path / encoding, encoding, three_city_task, run_task) for encoding in ("float16-delta", "float32-delta")}
    # left random: each run's nodes release fresh noisy row counts (FedAvg's weights). Over 6 pairs
    # of runs the accuracies lay within 0.8106 and 0.8114 and a pair differed by 0.0005 at most
    assert abs(accuracy["float16-delta"] - accuracy["float32-delta"]) <= 0.01


def _traffic_run(tmp_path: Path, encoding: str, three_city_task, run_task) -> float:
    tmp_path.mkdir()
    # the 3-municipality federation and task, with an MLP and the encoding under test
    fed, task_path = three_city_task(
        tmp_path, rounds=2, model={"name": "mlp", "hidden": [32]}, training={"fraction_evaluate": 0.0, "update_encoding": encoding}
    )
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    report = run_task(InProcessGrid(manifest, len(nodes), run_id=7), task_path, tmp_path / "run", run_id=7, federation="resume-3")
    assert report.status == "completed", report.message
    assert report.model_parameters == 108 * 32 + 32 + 32 * 2 + 2
    float32_size = 4 * report.model_parameters
    for r in report.rounds[1:]:
        assert len(r.nodes_trained) == 3 and r.bytes_from_nodes and r.bytes_to_nodes
        per_node = r.bytes_from_nodes / 3
        if encoding == "float16-delta":
            assert 0.5 * float32_size < per_node < 0.6 * float32_size
        else:
            assert float32_size < per_node < 1.1 * float32_size
        assert r.bytes_to_nodes / 3 > float32_size  # the global model goes down in float32, with the task
    assert report.final is not None and report.final.accuracy > 0.75
    return report.final.accuracy
