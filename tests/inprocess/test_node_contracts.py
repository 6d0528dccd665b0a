"""Contracts are the node's: pinned in its policy, checked before anything is read; its data
checked at registration; no record value in any log, audit entry or reply (issue 14)."""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from typer.testing import CliRunner

from fedgov.testing import InProcessGrid, prepare

from fedgov import protocol as P
from fedgov.cli import app as cli
from fedgov.config import Contract, load_contract, load_task
from fedgov.errors import ConfigError
from fedgov.node.contracts import check_dataset, check_received
from fedgov.node.refusals import error_reason, refusal_text
from fedgov.node.home import NodeHome, init_node
from fedgov.node.policy import file_sha256

ROOT = Path(__file__).resolve().parents[2]
ADULT_TEST = ROOT / "data" / "adult" / "adult_test.csv"
CONTRACT = ROOT / "configs" / "contracts" / "adult-income.toml"
runner = CliRunner()
CODES = ["GM0363", "GM0344", "GM0150"]
AGE, CATEGORY = "987654", "ZQXJVIOLATION"


@pytest.fixture
def configs(tmp_path: Path, write_federation, write_task, write_file) -> tuple[Path, Path, Path]:
    """The federation ``c-3``, a one-round training task and a Laplace statistics query on it."""
    fed = write_federation(tmp_path / "fed.toml", name="c-3", members=CODES, seed=5, min_rows=300)
    task = write_task(
        tmp_path / "task.toml", name="contracts", federation=fed,
        training={"rounds": 1, "local_epochs": 1, "batch_size": 128, "learning_rate": 0.5, "min_nodes": 2, "seed": 1,
                  "fraction_evaluate": 0.0, "reply_timeout": 5},
        privacy={"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
    )
    query = write_file(
        tmp_path / "query.toml",
        f"""
        name = "leak-overview"
        contract = "{CONTRACT}"
        federation = "{fed}"
        [privacy]
        epsilon = 0.5
        delta = 0.0
        mechanism = "laplace"
        max_rows_per_person = 1
        [[measures]]
        name = "people-by-sex"
        kind = "count"
        by = ["sex"]
        [[measures]]
        name = "mean-age"
        kind = "mean"
        column = "age"
        """,
    )
    return fed, task, query


def _altered(contract: Contract, how: str) -> Contract:
    d = contract.model_dump(mode="json")
    if how == "age-max":
        next(c for c in d["columns"] if c["name"] == "age")["max"] = 70
    elif how == "extra-category":
        next(c for c in d["columns"] if c["name"] == "workclass")["categories"].append("Unknown")
    elif how == "version":
        d["version"] = "1.1"
    return Contract.model_validate(d)


def _message(kind: str, task: Any, contract: Contract, *, query: Any = None) -> Message:
    cfg: dict[str, Any] = {P.CONTRACT_JSON: contract.model_dump_json(), "server-round": 1}
    if kind == P.STATS:
        cfg.update({P.KIND: P.STATS, P.QUERY_JSON: query.model_dump_json()})
        return Message(RecordDict({P.CONFIG: ConfigRecord(cfg)}), dst_node_id=1000, message_type=MessageType.QUERY)
    cfg[P.TASK_JSON] = task.model_dump_json()
    if kind == P.HELLO:
        cfg[P.KIND] = P.HELLO
        return Message(RecordDict({P.CONFIG: ConfigRecord(cfg)}), dst_node_id=1000, message_type=MessageType.QUERY)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    mtype = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    return Message(RecordDict({P.CONFIG: ConfigRecord(cfg), P.ARRAYS: arrays}), dst_node_id=1000, message_type=mtype)


# --- (i) an altered contract: contract-mismatch and nothing else --------------------------------


@pytest.mark.parametrize("how", ["age-max", "extra-category", "version"])
def test_an_altered_contract_is_refused_before_any_data_is_read(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, configs
) -> None:
    from fedgov.analytics import load_query

    fed, task_path, query_path = configs
    task, contract, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    query, _ = load_query(query_path)
    grid = InProcessGrid(manifest, 1, run_id=31)
    home = NodeHome(nodes[0].train_path.parent)
    ledger_before = home.ledger.events()

    def no_reading(*a: Any, **k: Any) -> Any:
        raise AssertionError("the node read its data for a contract it does not hold")

    import fedgov.data

    monkeypatch.setattr(fedgov.data, "read_table", no_reading)
    bad = _altered(contract, how)
    expected = refusal_text("contract-mismatch", contract=bad.ref)
    for kind in (P.HELLO, "train", "evaluate", P.STATS):
        [reply] = grid.send_and_receive([_message(kind, task, bad, query=query)])
        if kind == P.HELLO:
            hello = P.NodeHello.model_validate_json(str(reply.content[P.HELLO][P.NODE_JSON]))
            assert not hello.accepted and hello.code == "contract-mismatch" and hello.reason == expected
        else:
            assert reply.has_error() and reply.error.reason == error_reason("contract-mismatch", contract=bad.ref), kind
    assert home.ledger.events() == ledger_before  # no budget reserved or spent
    refused = [e for e in home.audit.entries() if e.kind == "refused"]
    assert len(refused) == 4 and all(e.payload["code"] == "contract-mismatch" for e in refused)
    assert not (home.path / "reports").exists()  # no data check ran either
    # the node's own contract goes through to the policy check and the handler
    monkeypatch.undo()
    [ok] = grid.send_and_receive([_message(P.HELLO, task, contract)])
    assert P.NodeHello.model_validate_json(str(ok.content[P.HELLO][P.NODE_JSON])).accepted


def test_a_dropped_person_id_does_not_match_the_pinned_contract(tmp_path: Path) -> None:
    wmo = ROOT / "configs" / "contracts" / "iwmo-wmo.toml"
    c = load_contract(wmo)
    assert c.person_id
    home = init_node(tmp_path / "n", node="GM0363", contract=c, data=tmp_path / "wmo.csv", contract_path=wmo)
    policy = home.policy()
    assert check_received(policy, c.model_dump_json()).outcome == "ok"
    dropped = Contract.model_validate({**c.model_dump(mode="json"), "person_id": None})
    assert check_received(policy, dropped.model_dump_json()).outcome == "mismatch"
    # the same contract, but not its canonical JSON byte for byte: refused too
    assert check_received(policy, json.dumps(json.loads(c.model_dump_json()), indent=1)).outcome == "mismatch"
    other = Contract.model_validate({**c.model_dump(mode="json"), "name": "elsewhere"})
    assert check_received(policy, other.model_dump_json()).outcome == "not-served"


# --- (ii) a pinned hash that does not match ------------------------------------------------------


def test_a_changed_contract_file_is_a_config_error_naming_file_field_and_hashes(tmp_path: Path) -> None:
    home = init_node(tmp_path / "n", node="GM0363", contract=load_contract(CONTRACT), data=ADULT_TEST, contract_path=CONTRACT)
    pinned = home.policy().datasets[0].contract_files["1.0"]
    assert pinned.sha256 == file_sha256(CONTRACT)
    pinned.path.write_text(pinned.path.read_text().replace("max = 90", "max = 70"))
    actual = file_sha256(pinned.path)
    with pytest.raises(ConfigError) as exc:
        home.policy()
    text = str(exc.value) + "\n".join(str(p) for p in exc.value.problems)
    assert str(pinned.path) in text and 'contract_files."1.0".sha256' in text
    assert pinned.sha256 in text and actual in text


# --- (iii) the operator's commands ---------------------------------------------------------------


def _small_data(path: Path, rows: int = 120) -> Path:
    lines = ADULT_TEST.read_text().splitlines()[: rows + 1]
    path.write_text("\n".join(lines) + "\n")
    return path


def _violate(path: Path, ages: tuple[int, ...] = (2, 5, 9), categories: tuple[int, ...] = (3, 7)) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    for r in ages:
        rows[r][header.index("age")] = AGE
    for r in categories:
        rows[r][header.index("workclass")] = CATEGORY
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_contract_add_and_data_check_commands(tmp_path: Path) -> None:
    data = _small_data(tmp_path / "train.csv")
    d = tmp_path / "node"
    out = runner.invoke(cli, ["node", "init", str(d), "--name", "GM0363", "-c", str(CONTRACT), "--data", str(data), "--approval", "auto"])
    assert out.exit_code == 0, out.output
    v11 = tmp_path / "adult-income-1.1.toml"
    v11.write_text(CONTRACT.read_text().replace('version = "1.0"', 'version = "1.1"'))
    out = runner.invoke(cli, ["node", "contract", "add", str(v11), "--node-dir", str(d)])
    assert out.exit_code == 0, out.output
    ds = NodeHome(d).policy().datasets[0]
    assert ds.versions == ["1.0", "1.1"] and ds.contract_files["1.1"].sha256 == file_sha256(v11)
    assert ds.contract_files["1.1"].path.read_bytes() == v11.read_bytes()

    _violate(data)
    out = runner.invoke(cli, ["node", "data", "check", "--node-dir", str(d)])
    assert out.exit_code == 12, out.output
    assert "age" in out.output and "workclass" in out.output and "no" in out.output
    report = d / "reports" / "data-check-adult-income.txt"
    assert stat.S_IMODE(report.stat().st_mode) == 0o600 and stat.S_IMODE(report.parent.stat().st_mode) == 0o700
    details = report.read_text()
    assert AGE in details and CATEGORY in details and "row 2, column 'age'" in details and "adult-income@1.1" in details
    records = NodeHome(d).state.data_checks()
    assert records and not records[-1].conforms
    checks = [e for e in NodeHome(d).audit.entries() if e.kind == "check"]
    assert checks and all(AGE not in json.dumps(e.payload) and "problems" not in e.payload for e in checks)

    # at task time the coordinator gets the fixed text only
    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    grid = InProcessGrid(tmp_path / "none.json", 0, run_id=41)
    grid.contexts[1000] = Context(run_id=41, node_id=1000, node_config={"node-dir": str(d), "node-name": "GM0363"},
                                  state=RecordDict(), run_config={})
    [reply] = grid.send_and_receive([_message(P.HELLO, task, contract)])
    hello = P.NodeHello.model_validate_json(str(reply.content[P.HELLO][P.NODE_JSON]))
    assert hello.code == "data-invalid" and hello.reason == refusal_text("data-invalid", contract="adult-income@1.0")


def test_node_start_refuses_a_broken_policy_and_warns_on_bad_data(tmp_path: Path) -> None:
    from fedgov.deploy.supernode import check_before_start

    data = _small_data(tmp_path / "train.csv")
    home = init_node(tmp_path / "n", node="GM0363", contract=load_contract(CONTRACT), data=data, contract_path=CONTRACT)
    assert check_before_start(home) == []
    _violate(data)
    [warning] = check_before_start(home)
    assert "data-check-adult-income.txt" in warning and AGE not in warning
    pin = home.policy().datasets[0].contract_files["1.0"].path
    pin.write_text(pin.read_text() + "\n# edited\n")
    with pytest.raises(ConfigError):
        check_before_start(home)


# --- (iv) the leak test ---------------------------------------------------------------------------


def _text(m: Message) -> str:
    if m.has_error():
        return f"error {m.error.code}: {m.error.reason}"
    parts = [json.dumps({k: str(v) for k, v in rec.items()}) for rec in m.content.config_records.values()]
    parts += [json.dumps({k: str(v) for k, v in rec.items()}) for rec in m.content.metric_records.values()]
    return "\n".join(parts)


def test_no_record_value_leaves_the_node_or_reaches_a_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], configs
) -> None:
    from fedgov.analytics import load_query
    from fedgov.coordinator.run import run_training
    from fedgov.coordinator.statistics import run_query

    caplog.set_level(logging.DEBUG)
    fed, task_path, query_path = configs
    task, contract, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    bad = nodes[0]
    _violate(bad.train_path)
    n_problems = check_dataset(NodeHome(bad.train_path.parent).policy().datasets[0], contract).n_problems
    assert n_problems == 5

    grid = InProcessGrid(manifest, len(nodes), run_id=51)
    report = run_training(
        grid, task, contract, run_dir=tmp_path / "run", expected_nodes=len(nodes), task_file=str(task_path),
        federation="c-3", local_baseline=False, flower_run_id=51, connect_timeout=5,
    )
    assert report.status == "completed"
    query, qcontract = load_query(query_path)
    qgrid = InProcessGrid(manifest, len(nodes), run_id=52)
    qreport = run_query(qgrid, query, qcontract, run_dir=tmp_path / "query", query_file=str(query_path), expected_nodes=len(nodes))
    assert qreport.status == "completed"

    refused = [n for n in qreport.nodes if not n.accepted]
    assert [(n.code, n.reason) for n in refused] == [("data-invalid", refusal_text("data-invalid", contract=contract.ref))]
    hellos = [P.NodeHello.model_validate_json(str(m.content[P.HELLO][P.NODE_JSON]))
              for m in grid.received if not m.has_error() and P.HELLO in m.content.config_records]
    assert sorted(h.accepted for h in hellos) == [False, True, True]
    assert [h.reason for h in hellos if not h.accepted] == [refusal_text("data-invalid", contract=contract.ref)]

    out, err = capfd.readouterr()
    texts = {"log": caplog.text, "stdout": out, "stderr": err}
    for n in nodes:
        home = NodeHome(n.train_path.parent)
        texts[f"audit {n.code}"] = "\n".join(json.dumps(e.model_dump(mode="json")) for e in home.audit.entries())
    texts["messages"] = "\n".join(_text(m) for g in (grid, qgrid) for m in [*g.sent, *g.received])
    texts["reports"] = (tmp_path / "run").joinpath("report.json").read_text() if (tmp_path / "run" / "report.json").is_file() else ""
    for where, text in texts.items():
        assert AGE not in text and CATEGORY not in text, where
        for needle in (f"{n_problems} problem", f"{n_problems} violation", f"{n_problems} cell"):
            assert needle not in text, (where, needle)
    local = (bad.train_path.parent / "reports" / "data-check-adult-income.txt")
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    details = local.read_text()
    assert AGE in details and CATEGORY in details


def test_a_failing_handler_sends_the_fixed_text_and_keeps_the_details_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configs
) -> None:
    import fedgov.node as N

    fed, task_path, _ = configs
    task, contract, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = InProcessGrid(manifest, 1, run_id=61)

    def boom(*a: Any, **k: Any) -> Any:
        raise ValueError(f"cell value {AGE} in row 3")

    monkeypatch.setattr(N, "hello", boom)
    [reply] = grid.send_and_receive([_message(P.HELLO, task, contract)])
    assert reply.has_error() and reply.error.reason == error_reason("internal-error")
    log_file = nodes[0].train_path.parent / "reports" / "errors.log"
    assert AGE in log_file.read_text() and stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert os.access(log_file, os.R_OK)
