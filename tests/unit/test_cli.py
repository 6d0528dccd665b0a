"""The command line: clear errors with documented exit codes; node commands."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.errors import EXIT_HELP, ExitCode
from fedgov.node.home import NodeHome

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_every_exit_code_has_a_help_text() -> None:
    assert set(EXIT_HELP) == set(ExitCode)
    assert all(text.strip().endswith(".") and len(text) >= 8 for text in EXIT_HELP.values())
    out = runner.invoke(app, ["exit-codes"])
    assert out.exit_code == 0
    for code in ExitCode:
        assert code.name in out.output


def test_check_accepts_the_shipped_configs() -> None:
    files = sorted(str(p) for p in (ROOT / "configs").rglob("*.toml"))
    assert any("policies" in f for f in files)
    out = runner.invoke(app, ["check", *files])
    assert out.exit_code == 0, out.output
    assert out.output.count("ok ") == len(files)


def test_check_lists_problems_with_locations_and_exit_10(tmp_path: Path) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\ncontract = "../nowhere.toml"\n[training]\nrounds = -1\n', encoding="utf-8")
    out = runner.invoke(app, ["check", str(bad)])
    assert out.exit_code == int(ExitCode.CONFIG)
    assert "training.rounds" in out.output and str(bad) in out.output


def test_data_validate_lists_violations_and_exit_12(tmp_path: Path) -> None:
    src = (ROOT / "data" / "adult" / "adult_test.csv").read_text().splitlines()
    lines = src[:6]
    lines[3] = lines[3].replace(lines[3].split(",")[0], "two hundred", 1)
    f = tmp_path / "x.csv"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = runner.invoke(app, ["data", "validate", str(f), "--contract", str(ROOT / "configs/contracts/adult-income.toml")])
    assert out.exit_code == int(ExitCode.DATA_VALIDATION), out.output
    assert "row 3, column 'age'" in out.output and "two hundred" in out.output
    ok = runner.invoke(app, ["data", "validate", str(ROOT / "data/adult/adult_test.csv"), "-c", str(ROOT / "configs/contracts/adult-income.toml")])
    assert ok.exit_code == 0 and "16281 rows conform" in ok.output


def test_node_budget_json_and_pause(tmp_path: Path, node_home) -> None:
    home = node_home(budget=5.0)
    out = runner.invoke(app, ["node", "budget", "--node-dir", str(home.path), "--json"])
    assert out.exit_code == 0, out.output
    [status] = json.loads(out.output)
    assert status["dataset"] == "adult" and status["remaining"] == 5.0
    assert runner.invoke(app, ["node", "pause", "-n", str(home.path), "--reason", "backup"]).exit_code == 0
    assert home.state.paused() == (True, "backup")
    assert runner.invoke(app, ["node", "resume", "-n", str(home.path)]).exit_code == 0
    assert home.state.paused()[0] is False


def test_audit_verify_exit_30_names_the_entry(tmp_path: Path, node_home) -> None:
    home = node_home(budget=5.0)
    for i in range(3):
        home.audit.append("received", task_id="t", payload={"i": i})
    assert runner.invoke(app, ["node", "audit", "verify", "-n", str(home.path)]).exit_code == 0
    con = sqlite3.connect(home.path / NodeHome.AUDIT)
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        con.execute(f"DROP TRIGGER {name}")
    con.execute("UPDATE entries SET payload = ? WHERE seq = 2", (json.dumps({"i": 99}),))
    con.commit()
    con.close()
    out = runner.invoke(app, ["node", "audit", "verify", "-n", str(home.path)])
    assert out.exit_code == int(ExitCode.AUDIT_TAMPERED)
    assert "entry 2" in out.output


def test_node_command_outside_a_node_directory(tmp_path: Path) -> None:
    out = runner.invoke(app, ["node", "budget", "-n", str(tmp_path)])
    assert out.exit_code == int(ExitCode.USAGE)
    assert "not a node directory" in out.output


def test_node_init_creates_a_working_node_directory(tmp_path: Path) -> None:
    contract = str(ROOT / "configs/contracts/adult-income.toml")
    data = str(ROOT / "data/adult/adult_test.csv")
    d = tmp_path / "gm0363"
    out = runner.invoke(app, ["node", "init", str(d), "--name", "GM0363", "-c", contract, "--data", data, "--budget", "4"])
    assert out.exit_code == 0, out.output
    assert "16281 rows conform" in out.output
    key = d / "node-key"
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (d / "node-key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    home = NodeHome(d)
    policy = home.policy()
    assert policy.node == "GM0363" and policy.approval == "manual"
    assert policy.datasets[0].budget.epsilon == 4 and policy.datasets[0].path == Path(data)
    assert [e.kind for e in home.audit.entries()] == ["initialized", "check"] and home.audit.verify().ok
    pin = policy.datasets[0].contract_files["1.0"]  # the contract is held and pinned
    assert pin.path == d / "contracts" / "adult-income-1.0.toml"
    assert pin.path.read_bytes() == Path(contract).read_bytes()
    budget = runner.invoke(app, ["node", "budget", "-n", str(d), "--json"])
    assert json.loads(budget.output)[0]["remaining"] == 4
    # a node directory is never overwritten
    again = runner.invoke(app, ["node", "init", str(d), "--name", "GM0363", "-c", contract, "--data", data])
    assert again.exit_code == int(ExitCode.CONFIG) and "never overwrites" in again.output
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")


def test_node_init_refuses_data_that_breaks_the_contract(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("age,sex\n200,Male\n", encoding="utf-8")
    out = runner.invoke(
        app, ["node", "init", str(tmp_path / "n"), "--name", "GM0363", "-c", str(ROOT / "configs/contracts/adult-income.toml"), "--data", str(bad)]
    )
    assert out.exit_code == int(ExitCode.DATA_VALIDATION)
    assert not (tmp_path / "n").exists()


def test_check_names_the_field_of_a_bad_query(tmp_path: Path) -> None:
    bad = tmp_path / "q.toml"
    bad.write_text(
        f'name = "q"\ncontract = "{ROOT / "configs/contracts/iwmo-wmo.toml"}"\n[privacy]\nepsilon = 1.0\n'
        '[[measures]]\nname = "m"\nkind = "mean"\ncolumn = "product_category"\n',
        encoding="utf-8",
    )
    out = runner.invoke(app, ["check", str(bad)])
    assert out.exit_code == int(ExitCode.CONFIG), out.output
    assert "measures[0]" in out.output and "product_category" in out.output and str(bad) in out.output


def test_query_command_is_registered() -> None:
    out = runner.invoke(app, ["query", "--help"])
    assert out.exit_code == 0 and "--coordinator-dir" in out.output


def test_run_needs_a_task_or_resume_not_both(tmp_path: Path) -> None:
    out = runner.invoke(app, ["run"])
    assert out.exit_code == int(ExitCode.USAGE) and "--resume" in out.output
    out = runner.invoke(app, ["run", str(ROOT / "configs/tasks/adult-income.toml"), "--resume", str(tmp_path)])
    assert out.exit_code == int(ExitCode.USAGE)


def test_resume_without_or_with_a_damaged_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    out = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert out.exit_code == int(ExitCode.CONFIG) and "checkpoint" in out.output
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text('{"format": 1, "task": ', encoding="utf-8")  # truncated
    out = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert out.exit_code == int(ExitCode.CONFIG) and "damaged checkpoint" in out.output and "state.json" in out.output
    out = runner.invoke(app, ["task", "resume", str(tmp_path), "-C", str(tmp_path)])
    assert out.exit_code == int(ExitCode.CONFIG) and "damaged checkpoint" in out.output
