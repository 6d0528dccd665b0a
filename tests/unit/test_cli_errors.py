"""Every command goes through one handler: a FedgovError ends in its message on stderr and its
documented exit code, Ctrl-C in 130, anything else in a one-line internal error (exit 1),
never a traceback unless FEDGOV_DEBUG asks for one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import typer
import typer.main
from click.testing import Result
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.cli.console import DEBUG_ENV, GuardedGroup, new_typer
from fedgov.errors import ConfigError, ExitCode, NodeStateError, Problem
from fedgov.node.home import NodeHome
from fedgov.node.state import NodeState

runner = CliRunner()


NodeFactory = Callable[..., NodeHome]  # the node_home fixture of tests/conftest.py


def _handled(out: Result) -> None:
    """The command ended through the handler (SystemExit), not with an exception escaping."""
    assert isinstance(out.exception, SystemExit) or out.exception is None, out.exception
    assert "Traceback" not in out.output


# --- the handler, on a small app of its own -----------------------------------------------

def _toy(raise_: BaseException) -> typer.Typer:
    toy = new_typer("a toy")

    @toy.command()
    def boom() -> None:
        raise raise_

    @toy.command()
    def fine() -> None:
        print("fine")

    return toy


def test_a_fedgov_error_prints_its_message_and_problems_on_stderr_and_exits_with_its_code() -> None:
    err = ConfigError("the task is malformed", [Problem("t.toml", "training.rounds", "must be > 0"), Problem("t.toml", "[model]", "x")])
    out = runner.invoke(_toy(err), ["boom"])
    _handled(out)
    assert out.exit_code == int(ExitCode.CONFIG)
    assert out.stdout == ""
    assert "error: the task is malformed" in out.stderr
    assert "t.toml: training.rounds: must be > 0" in out.stderr
    assert "t.toml: [model]: x" in out.stderr  # brackets in a message are text, not rich markup


def test_ctrl_c_exits_130() -> None:
    out = runner.invoke(_toy(KeyboardInterrupt()), ["boom"])
    _handled(out)
    assert out.exit_code == int(ExitCode.INTERRUPTED) == 130
    assert "interrupted" in out.stderr


def test_an_unexpected_error_is_one_line_that_says_internal_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    out = runner.invoke(_toy(RuntimeError("boom\nsecond line")), ["boom"])
    _handled(out)
    assert out.exit_code == int(ExitCode.INTERNAL) == 1
    [line] = out.stderr.strip().splitlines()
    assert "internal error" in line and "RuntimeError" in line and "boom" in line and DEBUG_ENV in line
    assert "second line" not in line


def test_debug_env_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")
    out = runner.invoke(_toy(RuntimeError("boom")), ["boom"])
    assert out.exit_code == 1 and isinstance(out.exception, RuntimeError)


def test_clicks_own_exits_and_usage_errors_pass_through() -> None:
    toy = _toy(typer.Exit(7))
    assert runner.invoke(toy, ["boom"]).exit_code == 7
    assert runner.invoke(toy, ["fine"]).output == "fine\n"
    out = runner.invoke(toy, ["fine", "--no-such-option"])
    assert out.exit_code == int(ExitCode.USAGE) and "No such option" in out.output
    assert runner.invoke(_toy(typer.BadParameter("bad", param_hint="--x")), ["boom"]).exit_code == int(ExitCode.USAGE)


# --- the real app ----------------------------------------------------------------------------

def test_every_command_runs_under_the_handler() -> None:
    """Click runs every subcommand inside the root group's invoke: guarding it guards them all."""
    root = typer.main.get_command(app)
    assert isinstance(root, GuardedGroup)


def test_an_unexpected_error_in_a_real_command_is_internal(node_home: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = node_home()

    def broken(self: NodeState, reason: str = "") -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(NodeState, "pause", broken)
    out = runner.invoke(app, ["node", "pause", "-n", str(home.path)])
    _handled(out)
    assert out.exit_code == 1 and "internal error" in out.stderr and "ZeroDivisionError" in out.stderr


def test_ctrl_c_in_a_real_command_exits_130(node_home: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = node_home()

    def interrupted(self: NodeState, reason: str = "") -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(NodeState, "pause", interrupted)
    out = runner.invoke(app, ["node", "pause", "-n", str(home.path)])
    _handled(out)
    assert out.exit_code == 130


# --- the node state file: corrupted is 31, a wrong request is 2 ---------------------------

@pytest.mark.parametrize(
    "command",
    [["pause"], ["resume"], ["pending"], ["approve", "t-1"], ["reject", "t-1", "--reason", "no"]],
    ids=lambda c: c[0],
)
def test_a_corrupted_node_state_file_exits_31(node_home: NodeFactory, command: list[str]) -> None:
    home = node_home()
    home.state.pause("backup")  # the file exists and is fedgov's
    state_file = home.path / NodeHome.STATE
    for leftover in state_file.parent.glob(NodeHome.STATE + "-*"):  # WAL and shared memory
        leftover.unlink()
    state_file.write_bytes(b"this is not an SQLite database, it is garbage" * 200)
    out = runner.invoke(app, ["node", *command, "-n", str(home.path)])
    _handled(out)
    assert out.exit_code == int(ExitCode.STATE_CORRUPTED) == 31, out.output
    assert str(state_file) in out.stderr.replace("\n", "")
    assert state_file.read_bytes().startswith(b"this is not an SQLite database")  # nothing was changed


def test_a_node_state_file_of_another_application_exits_31(node_home: NodeFactory) -> None:
    import sqlite3

    home = node_home()
    con = sqlite3.connect(home.path / NodeHome.STATE)
    con.execute("CREATE TABLE photos (id INTEGER)")
    con.commit()
    con.close()
    out = runner.invoke(app, ["node", "pending", "-n", str(home.path)])
    _handled(out)
    assert out.exit_code == 31 and "another application" in out.stderr


@pytest.mark.parametrize("verb", ["approve", "reject"])
def test_approving_or_rejecting_a_task_that_is_not_queued_exits_2(node_home: NodeFactory, verb: str) -> None:
    home = node_home()
    out = runner.invoke(app, ["node", verb, "no-such-task", "-n", str(home.path)])
    _handled(out)
    assert out.exit_code == int(ExitCode.USAGE) == 2
    assert "no-such-task" in out.stderr and "not in the approval queue" in out.stderr


def test_request_errors_exit_2_and_state_errors_31() -> None:
    from fedgov.errors import NodeStateRequestError, RevealConflict, TaskChanged, UnknownTask

    assert NodeStateError("x").exit_code == ExitCode.STATE_CORRUPTED
    for cls in (NodeStateRequestError, UnknownTask, TaskChanged):
        assert cls("x").exit_code == ExitCode.USAGE
    assert RevealConflict("x").exit_code == ExitCode.INTERNAL


def test_a_garbage_roster_is_a_config_error(tmp_path: Path) -> None:
    roster = tmp_path / "roster.json"
    roster.write_text("{not json", encoding="utf-8")
    out = runner.invoke(app, ["roster", "show", str(roster)])
    _handled(out)
    assert out.exit_code == int(ExitCode.CONFIG) and str(roster) in out.stderr
