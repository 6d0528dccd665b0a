"""The shared packages' public names, and what importing the library pulls in.

Each package re-exports its public names through ``__all__``; ``fedgov.privacy``,
``fedgov.deploy`` and ``fedgov.launch`` load a name's module on first use, so that the
entry points start without torch or the rest of their package. The library never imports the
Flower glue (``server``, ``clients``): ``fedgov.testing`` drives the real ClientApp only when it
is given none.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedgov.launch.simulation import app_dir, pin_roster_text
from fedgov.testing import CoordinatorCrash, InProcessGrid

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["fedgov.analytics", "fedgov.config", "fedgov.data", "fedgov.deploy", "fedgov.launch", "fedgov.privacy"]
LAZY = ["fedgov.coordinator", "fedgov.deploy", "fedgov.launch", "fedgov.privacy"]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_resolves(name: str) -> None:
    pkg = importlib.import_module(name)
    assert len(pkg.__all__) == len(set(pkg.__all__))
    missing = [public for public in pkg.__all__ if not hasattr(pkg, public)]
    assert missing == []


@pytest.mark.parametrize("name", LAZY)
def test_a_lazy_package_lists_each_name_once_with_its_module(name: str) -> None:
    pkg = importlib.import_module(name)
    origin = {public: module for module, names in pkg._EXPORTS.items() for public in names}
    assert set(origin) == set(pkg.__all__)
    for public, module in origin.items():
        assert getattr(pkg, public) is getattr(importlib.import_module(f"{name}.{module}"), public)
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018 - the attribute access is the test


def test_importing_the_lazy_packages_imports_none_of_their_modules() -> None:
    out = _python(
        "import json, sys; import fedgov.deploy, fedgov.launch, fedgov.privacy; "
        "print(json.dumps([m for m in sys.modules if m.startswith(('fedgov.deploy.', 'fedgov.launch.', 'fedgov.privacy.', 'torch'))]))"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_the_roster_and_the_accountant_do_not_import_torch() -> None:
    out = _python(
        "import sys; from fedgov.privacy import Roster, epsilon_from_history, combine_shares; "
        "print('torch' in sys.modules)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_library_never_imports_the_flower_glue() -> None:
    modules = ["fedgov.testing", "fedgov.models", "fedgov.transport", "fedgov.protocol", *PACKAGES]
    for pkg in PACKAGES:
        modules += [f"{pkg}.{p.stem}" for p in sorted((ROOT / pkg.replace(".", "/")).glob("[!_]*.py"))]
    out = _python(
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from fedgov.launch.simulation import app_dir\n"
        "app_dir()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'clients')))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["fedgov.deploy.gateway", "fedgov.deploy.clientapp"])
def test_the_deploy_entry_points_start(module: str) -> None:
    """``python -m`` runs them without the package having imported them first (runpy warns
    a RuntimeWarning then, which ``-W error::RuntimeWarning`` turns into a failure)."""
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_the_app_directory_is_the_root_holding_the_flower_app() -> None:
    root = app_dir()
    assert root == ROOT
    assert "[tool.flwr.app]" in (root / "pyproject.toml").read_text("utf-8")
    assert (root / "server" / "app.py").is_file() and (root / "clients" / "app.py").is_file()


def test_pin_roster_text_appends_the_section_once() -> None:
    policy = 'node = "GM0363"\n'
    pinned = pin_roster_text(policy, "roster.json", "ab" * 32)
    assert pinned.startswith(policy) and "\n[secure_aggregation]\n" in pinned and 'roster = "roster.json"' in pinned
    assert pin_roster_text(pinned, "other.json", "cd" * 32) == pinned  # an operator's section is kept


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records["config"]
        config["server-round"] = -1  # the node's copy only
        return Message(RecordDict({"seen": ConfigRecord({"node": context.node_id})}), reply_to=msg)

    return app


def _train_messages(grid: InProcessGrid, server_round: int) -> list[Message]:
    return [
        grid.create_message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), "train", nid, str(server_round))
        for nid in grid.get_node_ids()
    ]


def test_the_in_process_grid_drives_the_client_app_it_is_given(tmp_path: Path) -> None:
    grid = InProcessGrid(tmp_path / "manifest.json", 3, app=_echo_app())
    messages = _train_messages(grid, 1)
    replies = list(grid.send_and_receive(messages))
    assert sorted(int(r.content.config_records["seen"]["node"]) for r in replies) == [1000, 1001, 1002]
    assert all(m.content.config_records["config"]["server-round"] == 1 for m in messages)  # nodes got copies
    assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in messages]


def test_the_in_process_coordinator_dies_after_the_round_it_is_told(tmp_path: Path) -> None:
    grid = InProcessGrid(tmp_path / "manifest.json", 2, app=_echo_app())
    grid.crash_after_train_round = 2
    assert len(list(grid.send_and_receive(_train_messages(grid, 1)))) == 2
    with pytest.raises(CoordinatorCrash):
        grid.send_and_receive(_train_messages(grid, 2))
    assert len(grid.received) == 4  # the nodes answered round 2 before the coordinator died
    with pytest.raises(CoordinatorCrash):
        grid.send_and_receive(_train_messages(grid, 3))
