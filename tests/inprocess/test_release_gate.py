"""The node's release gate (fedgov.node.gate), tested as an attacker would: fedgov's real
ClientApp with all its mods, in process, against a coordinator that deviates (asks for a second
evaluation of a round, for an evaluation it was not granted, reads every field of every reply).
What leaves a node is only what the gate declares: updates whose spend is in the ledger, noisy
evaluation counts whose spend is in the ledger, public fields; and the threat model's table is
the gate's own declaration."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedgov import protocol as P
from fedgov.config import load_task
from fedgov.node.gate import DECLARATION, GateContext, check_reply, table_markdown
from fedgov.node.refusals import TEMPLATES, error_reason, is_allowed, parse_error_reason
from fedgov.testing import CoordinatorCrash, InProcessGrid, prepare

CITIES = ["GM0363", "GM0599", "GM0344"]


@pytest.fixture(scope="module")
def gate_task(write_federation, write_task, adult_test_csv):
    """``gate_task(folder, rounds=2, at_nodes="every-round")``: the federation ``gate-3`` and a
    task on it with DP-SGD and evaluation at the nodes (noisy counts, epsilon 0.3)."""

    def make(tmp: Path, *, rounds: int = 2, at_nodes: str = "every-round") -> tuple[Path, Path]:
        fed = write_federation(tmp / "fed.toml", name="gate-3", members=CITIES, seed=4, min_rows=300)
        task = write_task(
            tmp / "task.toml", name="gated", federation=fed,
            training={"rounds": rounds, "local_epochs": 1, "batch_size": 128, "learning_rate": 0.5, "min_nodes": 2, "seed": 3,
                      "reply_timeout": 5},
            privacy={"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
            evaluation={"centralized": adult_test_csv, "epsilon": 0.3, "at_nodes": at_nodes},
        )
        return fed, task

    return make


class _Recording(InProcessGrid):
    """The grid, keeping a copy of every reply as it left the node (the coordinator decodes
    updates in place afterwards)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.left: list[tuple[Message, Message]] = []

    def _deliver(self, msg: Message) -> Message | None:
        reply = super()._deliver(msg)
        if reply is not None:
            self.left.append((msg, Message(content=copy.deepcopy(reply.content), metadata=copy.deepcopy(reply.metadata))
                              if not reply.has_error() else reply))
        return reply


def test_the_threat_model_table_is_the_gates_declaration(root: Path) -> None:
    doc = (root / "docs" / "threat-model.md").read_text(encoding="utf-8")
    assert table_markdown() in doc, "regenerate it: python scripts/gate_table.py"


def test_the_gate_refuses_what_it_does_not_declare() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as a ServerApp process sets them

    def err(reason: str) -> Message:
        ins = Message(RecordDict(), dst_node_id=1, message_type="train")
        ins.metadata.__dict__["_message_id"] = "m1"
        return Message(Error(code=403, reason=reason), reply_to=ins)

    def train_reply(metrics: dict[str, float]) -> Message:
        return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), dst_node_id=1, message_type="train")

    spent = GateContext(kind="train", server_round=1, round_spent=lambda r: r == 1)
    assert check_reply(train_reply({"num-examples": 1.0}), spent) == []
    # a loss, an exact row count or an epsilon derived from rows: not declared, or not the constant
    assert check_reply(train_reply({"num-examples": 1.0, "train-loss": 0.4}), spent)
    assert check_reply(train_reply({"num-examples": 412.0}), spent)
    # an update whose spend is not in the ledger does not leave
    upd = Message(RecordDict({P.ARRAYS: ArrayRecord(), P.METRICS: MetricRecord({"num-examples": 1.0})}), dst_node_id=1, message_type="train")
    assert check_reply(upd, spent) == []
    # an evaluation whose spend is not in the ledger does not leave
    ev = Message(RecordDict({P.METRICS: MetricRecord({"num-examples": 1.0, "correct": 80.2, "total": 101.7})}), dst_node_id=1, message_type="evaluate")
    assert check_reply(ev, GateContext(kind="evaluate", server_round=2, round_evaluated=lambda r: r == 2)) == []
    assert check_reply(ev, GateContext(kind="evaluate", server_round=3, round_evaluated=lambda r: r == 2))
    # error texts: only the templates, with no number in a place for one
    assert check_reply(err(error_reason("data-invalid", contract="adult-income@1.0")), GateContext(kind="train")) == []
    assert check_reply(err("data-invalid: 17 problem(s) in column(s) age"), GateContext(kind="train"))
    # no template has a place a data-derived count could go
    for code, text in TEMPLATES.items():
        assert "rows}" not in text and "count}" not in text, code


def test_every_reply_of_every_kind_passes_the_gate_and_evaluations_are_charged_once(tmp_path: Path, gate_task, run_task) -> None:
    """A whole run with evaluation at the nodes after every round. The coordinator also asks
    node 0 to evaluate round 1 a second time: refused, and charged once. Every reply that reached
    the coordinator carries only declared fields; hello carries no row count; train replies
    carry the update and the constant weight only."""
    from clients.mods import gate_kind
    from fedgov.node.admission import released_counts
    from fedgov.node.admission import EVALUATION_NOTE
    from fedgov.node.home import NodeHome

    fed, task_path = gate_task(tmp_path)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = _Recording(manifest, len(nodes), run_id=91)
    second: list[Message] = []

    def again(msg: Message):  # type: ignore[no-untyped-def]
        if not msg.metadata.message_type.startswith("evaluate") or int(msg.content["config"]["server-round"]) != 1:  # type: ignore[arg-type]
            return None

        def ask_twice(ins: Message, reply: Message) -> Message:
            twice = Message(content=copy.deepcopy(ins.content), metadata=copy.deepcopy(ins.metadata))
            second.append(grid.app(twice, grid.contexts[1000]))
            return reply

        return ask_twice

    grid.faults[0] = again
    report = run_task(grid, task_path, tmp_path / "run", run_id=91, federation="gate-3")
    assert report.status == "completed", report.message
    assert [r.federated_accuracy is not None for r in report.rounds] == [True, True]
    # fresh DP-SGD and evaluation noise: over 12 runs of this task the round-2 accuracy was 0.759
    # with sd 0.0095 (0.744 to 0.771), so 0.6 lies 16 sd below it
    assert 0.6 < (report.rounds[-1].federated_accuracy or 0) <= 1.0
    # each node's accuracy comes with the standard deviation of its DP noise (public: its plan's z)
    for n in report.nodes:
        assert n.evaluation_noise is not None and n.evaluation_noise > 1
        assert n.federated_accuracy_sd is not None and 0 < n.federated_accuracy_sd < 0.5

    # the second evaluation of round 1 was refused, and the ledger holds one per round
    assert len(second) == 1 and second[0].has_error()
    assert parse_error_reason(second[0].error.reason)[0] == "evaluation-repeated"
    for n in nodes:
        evs = [e for e in NodeHome(n.train_path.parent).ledger.events() if e.kind == "spend" and e.note == EVALUATION_NOTE]
        assert sorted(e.round for e in evs) == [1, 2]

    # every reply the coordinator received: only declared fields, of its own kind
    kinds = set()
    for ins, reply in grid.left:
        kind = gate_kind(ins)
        kinds.add(kind)
        if reply.has_error():
            code, text = parse_error_reason(reply.error.reason or "")
            assert is_allowed(code, text), reply.error.reason
            continue
        declared = {(r.record, r.field) for r in DECLARATION[kind]}
        for rname, rec in reply.content.items():
            for fname in rec.keys():
                assert (rname, fname) in declared, (kind, rname, fname)
        node_home = NodeHome(nodes[ins.metadata.dst_node_id - 1000].train_path.parent)
        released = released_counts(node_home, load_task(task_path)[1])
        if kind == P.HELLO:
            hello = json.loads(str(reply.content[P.HELLO][P.NODE_JSON]))
            # the released (noisy) row count, never the test split's
            assert hello["train_rows"] in released and hello["test_rows"] == 0
            assert hello["planned_epsilon"] == 2.0
        if kind == "train":
            m = dict(reply.content[P.METRICS])
            assert list(m) == ["num-examples"] and int(m["num-examples"]) in released
    assert {P.HELLO, "train", "evaluate", P.END} <= kinds


def test_an_evaluation_the_node_did_not_plan_is_refused(tmp_path: Path, gate_task, run_task) -> None:
    """Evaluation after the final round only: a coordinator asking for round 1 is refused,
    nothing is spent for it."""
    from fedgov.node.admission import EVALUATION_NOTE
    from fedgov.node.home import NodeHome

    fed, task_path = gate_task(tmp_path, at_nodes="final")
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = InProcessGrid(manifest, len(nodes), run_id=92)
    early: list[Message] = []

    def ask_early(msg: Message):  # type: ignore[no-untyped-def]
        if not msg.metadata.message_type.startswith("train") or int(msg.content["config"]["server-round"]) != 2:  # type: ignore[arg-type]
            return None

        def deviate(ins: Message, reply: Message) -> Message:
            ev = Message(content=copy.deepcopy(ins.content), metadata=copy.deepcopy(ins.metadata))
            ev.metadata.__dict__["_message_type"] = "evaluate"
            ev.content["config"]["server-round"] = 1
            early.append(grid.app(ev, grid.contexts[1000]))
            return reply

        return deviate

    grid.faults[0] = ask_early
    report = run_task(grid, task_path, tmp_path / "run", run_id=92, federation="gate-3")
    assert report.status == "completed", report.message
    assert report.rounds[0].federated_accuracy is None and report.rounds[1].federated_accuracy is not None
    assert len(early) == 1 and early[0].has_error()
    assert parse_error_reason(early[0].error.reason)[0] == "evaluation-repeated"
    evs = [e for e in NodeHome(nodes[0].train_path.parent).ledger.events() if e.kind == "spend" and e.note == EVALUATION_NOTE]
    assert [e.round for e in evs] == [2]


def test_a_reply_with_an_undeclared_field_is_blocked_and_stops_the_task(tmp_path: Path, gate_task, run_task) -> None:
    """Whatever a handler puts in a reply, the gate lets out only what it declares: a train
    reply with a loss is not sent, the audit log names the field, and the task is over at that
    node (its reservation closed, every later message of it refused)."""
    from clients.mods import gate_mod
    from fedgov.node.home import NodeHome

    fed, task_path = gate_task(tmp_path)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = InProcessGrid(manifest, len(nodes), run_id=93)
    grid.crash_after_train_round = 1
    with pytest.raises(CoordinatorCrash):
        run_task(grid, task_path, tmp_path / "run", run_id=93, federation="gate-3")
    train1 = next(m for m in grid.sent if m.metadata.message_type.startswith("train") and m.metadata.dst_node_id == 1000)
    home = NodeHome(nodes[0].train_path.parent)
    ctx = grid.contexts[1000]

    def leaky_handler(msg: Message, context: object) -> Message:
        return Message(RecordDict({P.METRICS: MetricRecord({"num-examples": 1.0, "train-loss": 0.52})}), reply_to=msg)

    msg = Message(content=copy.deepcopy(train1.content), metadata=copy.deepcopy(train1.metadata))
    out = gate_mod(msg, ctx, leaky_handler)
    assert out.has_error() and parse_error_reason(out.error.reason)[0] == "release-blocked"
    blocked = [e for e in home.audit.entries() if e.kind == "blocked"]
    assert len(blocked) == 1 and "train-loss" in json.dumps(blocked[0].payload) and "0.52" not in json.dumps(blocked[0].payload)
    assert home.ledger.task_state([e for e in home.ledger.events() if e.kind == "reserve"][0].task_id) == "closed"
    # the real ClientApp now refuses the task at this node
    again = grid.app(Message(content=copy.deepcopy(train1.content), metadata=copy.deepcopy(train1.metadata)), ctx)
    assert again.has_error() and parse_error_reason(again.error.reason)[0] == "not-admitted"


def test_the_row_count_is_released_once_with_noise_and_every_decision_uses_it(tmp_path: Path, gate_task, run_task) -> None:
    """The only size that leaves a node is its training row count with Gaussian noise, released
    once per version of the data file through the ledger: a second hello (another task, other
    parameters) reads the same value back, so hellos cannot average the noise away or probe the
    true count through accept/refuse."""
    from fedgov.node.admission import released_counts
    from fedgov.node.rounds import ROW_COUNT_NOISE, ROWS_NOTE
    from fedgov.node.home import NodeHome

    fed, task_path = gate_task(tmp_path, rounds=1)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    task, contract = load_task(task_path)
    grid = InProcessGrid(manifest, len(nodes), run_id=94)
    for run in (94, 95):  # two runs of the task: two admissions, one release
        grid.run_id = run
        assert run_task(grid, task_path, tmp_path / f"run{run}", run_id=run, federation="gate-3").status == "completed"
    for n in nodes:
        home = NodeHome(n.train_path.parent)
        releases = [e for e in home.ledger.events() if e.kind == "spend" and e.note.startswith(ROWS_NOTE)]
        assert len(releases) == 1
        assert [tuple(h) for h in releases[0].mechanism.history] == [(ROW_COUNT_NOISE, 1.0, 1)]
        assert released_counts(home, contract) == {int(releases[0].note[len(ROWS_NOTE):])}


def test_too_few_rows_meets_the_true_count_at_a_fixed_threshold_and_spends_nothing(tmp_path: Path, gate_task) -> None:
    """The true row count meets only thresholds the coordinator cannot move (at least 10 and the
    policy's min_rows): a node under them refuses before any release; above them, the task's own
    parameters meet only the released count."""
    from fedgov.node import rounds as N

    fed, task_path = gate_task(tmp_path, rounds=1)
    _, _, nodes, _ = prepare(tmp_path / "nodes", fed, task_path)
    task, contract = load_task(task_path)
    released: list[int] = []

    def release(n: int) -> int:
        released.append(n)
        return n + 37  # a released count unlike the true one

    path = nodes[0].train_path
    refused, _ = N.hello(task, contract, node="GM0363", node_name="x", train_path=path, test_path=None,
                         release_rows=release, min_rows=10**9)
    assert refused.code == "too-few-rows" and released == []  # nothing released, nothing spent
    accepted, dp = N.hello(task, contract, node="GM0363", node_name="x", train_path=path, test_path=None,
                           release_rows=release, min_rows=10)
    assert accepted.accepted and len(released) == 1
    assert accepted.train_rows == released[0] + 37 == dp.rows
    assert dp.fixed_plan(task).rows == released[0] + 37  # the plan is the released count's
