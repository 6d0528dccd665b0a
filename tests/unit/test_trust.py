"""Which app bundles a node runs: the policy's accept.apps, checked before a bundle is installed."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import flwr.supernode.runtime.run_clientapp as rc
from fedgov.deploy import clientapp
from fedgov.deploy.trust import build_bundle, bundle_hash, check_bundle, local_bundle_hash
from fedgov.errors import ConfigError
from fedgov.node.policy import default_policy_text, load_policy

ROOT = Path(__file__).resolve().parents[2]
OWN = "a" * 64
OTHER = "b" * 64


def test_default_policy_trusts_only_its_own_installation(tmp_path: Path, node_home) -> None:
    policy = node_home(approval="auto").policy()
    assert policy.accept.apps == ["fedgov"]
    assert check_bundle(policy, OWN, local_hash=OWN).trusted
    v = check_bundle(policy, OTHER, local_hash=OWN)
    assert not v.trusted
    assert v.reason.startswith("app-not-trusted") and OTHER in v.reason and "GM0363" in v.reason


def test_a_listed_hash_is_trusted_and_star_warns(tmp_path: Path, node_home) -> None:
    listed = node_home(tmp_path / "a" / "node", approval="auto", apps=(OTHER,)).policy()
    assert check_bundle(listed, OTHER, local_hash=OWN).trusted
    assert not check_bundle(listed, OWN, local_hash=OWN).trusted  # "fedgov" not listed: own bundle refused too
    star = node_home(tmp_path / "b" / "node", approval="auto", apps=("*",)).policy()
    v = check_bundle(star, OTHER, local_hash=OWN)
    assert v.trusted and v.warning and "without checking" in v.warning


def test_policy_rejects_malformed_app_entries(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    text = default_policy_text("GM0363", dataset="adult", contract="adult-income", version="1.0", path="t.csv", budget_epsilon=5.0)
    p.write_text(text.replace('apps = ["fedgov"]', 'apps = ["fedgov", "ABC", "sha256:123"]'), encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_policy(p)
    msg = str(exc.value) + " ".join(str(x) for x in exc.value.problems)
    assert "accept.apps" in msg and "'ABC'" in msg and "64" in msg


def test_bundle_build_is_deterministic_and_matches_flowers_hash() -> None:
    a, b = build_bundle(ROOT), build_bundle(ROOT)
    assert a == b and a[:2] == b"PK"
    assert bundle_hash(a) == hashlib.sha256(a).hexdigest() == local_bundle_hash()


def test_a_changed_app_gets_another_hash(tmp_path: Path) -> None:
    app = tmp_path / "app"
    rels = ["pyproject.toml"] + [str(p.relative_to(ROOT)) for d in ("server", "clients") for p in (ROOT / d).glob("*.py")]
    for rel in rels:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_bytes((ROOT / rel).read_bytes())
    h1 = bundle_hash(build_bundle(app))
    assert h1 == local_bundle_hash()
    with (app / "clients" / "app.py").open("a") as f:
        f.write("\n# one more line\n")
    assert bundle_hash(build_bundle(app)) != h1


def _fake_run(fab: bytes, node_dir: Path) -> tuple[Any, Any, Any, Any]:
    context = SimpleNamespace(node_config={"node-name": "GM0363", "node-dir": str(node_dir)})
    run = SimpleNamespace(run_id=7, fab_id="fedgov/fedgov", fab_version="0.1.0")
    return SimpleNamespace(), context, run, SimpleNamespace(content=fab, hash_str=hashlib.sha256(fab).hexdigest())


def test_untrusted_bundle_is_refused_before_install_and_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_home) -> None:
    home = node_home(approval="auto")  # trusts "fedgov" only
    installed: list[bytes] = []
    fab = b"PK-not-fedgov"
    monkeypatch.setattr(rc, "pull_task_input", lambda client: _fake_run(fab, home.path))
    monkeypatch.setattr(rc, "install_from_fab", lambda content, **kw: installed.append(content))
    monkeypatch.setattr(rc, "_fedgov_hooked", False, raising=False)
    monkeypatch.setenv("FEDGOV_APP_HASH", OWN)
    clientapp.install_hooks()

    message, context, run, fab_obj = rc.pull_task_input(None)
    with pytest.raises(clientapp.UntrustedApp, match="app-not-trusted"):
        rc.install_from_fab(fab_obj.content, skip_prompt=True)
    assert installed == []  # never unpacked
    entries = [e for e in home.audit.entries() if e.kind == "app-refused"]
    assert len(entries) == 1
    assert entries[0].payload["fab_hash"] == hashlib.sha256(fab).hexdigest() and entries[0].payload["run_id"] == 7
    assert home.audit.verify().ok


def test_trusted_bundle_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_home) -> None:
    fab = build_bundle()
    home = node_home(approval="auto")
    installed: list[bytes] = []
    monkeypatch.setattr(rc, "pull_task_input", lambda client: _fake_run(fab, home.path))
    monkeypatch.setattr(rc, "install_from_fab", lambda content, **kw: installed.append(content))
    monkeypatch.setattr(rc, "_fedgov_hooked", False, raising=False)
    monkeypatch.setenv("FEDGOV_APP_HASH", hashlib.sha256(fab).hexdigest())
    clientapp.install_hooks()
    rc.pull_task_input(None)
    rc.install_from_fab(fab, skip_prompt=True)
    assert installed == [fab]
    assert not [e for e in home.audit.entries() if e.kind == "app-refused"]


@pytest.mark.parametrize(
    ("fab_id", "fab_version", "why"),
    [
        ("fedgov/fedgov", "0.1.0/../../../../tmp/evil", "characters"),  # a path Flower would load from
        ("fedgov/fedgov", "0.1..0", "characters"),
        ("fedgov/../x", "0.1.0", "characters"),
        ("fedgov", "0.1.0", "characters"),
        ("other/fedgov", "0.1.0", "but the bundle is fedgov/fedgov 0.1.0"),
        ("fedgov/fedgov", "9.9.9", "but the bundle is fedgov/fedgov 0.1.0"),
    ],
)
def test_a_trusted_bundle_under_another_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, node_home, fab_id: str, fab_version: str, why: str
) -> None:
    """The bundle's hash is trusted, but Flower would load the app from a directory named by the
    run's claim: the claim must be the bundle's own name and version."""
    fab = build_bundle()
    home = node_home(approval="auto")
    monkeypatch.setenv("FEDGOV_APP_HASH", hashlib.sha256(fab).hexdigest())
    message, context, run, _ = _fake_run(fab, home.path)
    run.fab_id, run.fab_version = fab_id, fab_version
    with pytest.raises(clientapp.UntrustedApp, match="app-not-trusted") as refused:
        clientapp.check_pulled(message, context, run, fab)
    assert why in str(refused.value)
    assert [e.payload["reason"] for e in home.audit.entries() if e.kind == "app-refused"] == [str(refused.value)]
    run.fab_id, run.fab_version = "fedgov/fedgov", "0.1.0"
    clientapp.check_pulled(message, context, run, fab)  # the true name: accepted


def test_no_readable_policy_fails_closed(tmp_path: Path) -> None:
    ctx = SimpleNamespace(node_config={"node-dir": str(tmp_path / "nothing")})
    with pytest.raises(clientapp.UntrustedApp, match="policy could not be read"):
        clientapp.check_pulled(None, ctx, SimpleNamespace(run_id=1), b"PK")


def test_shim_runs_fedgovs_clientapp(tmp_path: Path) -> None:
    bindir = clientapp.write_shim(tmp_path / "bin")
    shim = bindir / "flwr-clientapp"
    assert shim.stat().st_mode & stat.S_IXUSR
    text = shim.read_text()
    # the relay to the warm worker (which runs check_pulled), falling back to fedgov's clientapp
    assert "fedgov/deploy/relay.py" in text and os.path.basename(__import__("sys").executable) in text
    from fedgov.deploy import relay

    assert '"-m", "fedgov.deploy.clientapp"' in Path(relay.__file__).read_text("utf-8")


def test_node_env_puts_the_checking_clientapp_first(tmp_path: Path, node_home) -> None:
    from fedgov.deploy.supernode import node_env

    home = node_home(approval="auto")
    env = node_env(home.path)
    first = env["PATH"].split(os.pathsep)[0]
    assert (Path(first) / "flwr-clientapp").is_file()
    assert env["FEDGOV_NODE_DIR"] == str(home.path)
    assert env["FEDGOV_APP_HASH"] == local_bundle_hash()
