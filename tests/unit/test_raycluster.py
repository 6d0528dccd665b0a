"""``fedgov run --ray-address``: the address, the check each Ray node runs, the refusal that names
the Ray node and the path, and how the launcher hands the address to Flower (no Ray here: the
real cluster is in tests/e2e/test_ray_cluster_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.errors import ConfigError, ExitCode, FederationError
from fedgov.launch import raycluster
from fedgov.launch.raycluster import (
    check_cluster,
    cluster_verdict,
    inspect_paths,
    parse_ray_address,
    resolve_ray_address,
    software_versions,
)

runner = CliRunner()


# --- the address ----------------------------------------------------------------------------


def test_the_option_wins_over_ray_address_and_empty_or_local_means_a_ray_of_its_own() -> None:
    env = {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert resolve_ray_address(None, env) == "10.0.0.1:6379"
    assert resolve_ray_address("10.0.0.2:6379", env) == "10.0.0.2:6379"
    assert resolve_ray_address("", env) is None  # an explicit empty value: local Ray
    assert resolve_ray_address("local", env) is None
    assert resolve_ray_address(None, {}) is None
    assert resolve_ray_address(None, {"RAY_ADDRESS": ""}) is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.1:6379", ("10.0.0.1", 6379)), ("head.example.nl:6380", ("head.example.nl", 6380)), ("[::1]:6379", ("::1", 6379))],
)
def test_a_head_address_is_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_ray_address(address) == expected


@pytest.mark.parametrize("address", ["head", "head:gcs", "head:0", "head:70000", ":6379", "ray://head:10001", "auto"])
def test_anything_else_is_a_config_error_that_says_what_is_expected(address: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_ray_address(address)
    assert "HOST:PORT" in str(ei.value) and "--ray-address" in str(ei.value)


def test_an_address_nobody_listens_on_is_refused_in_seconds_without_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago, nobody listens now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(FederationError) as ei:
        check_cluster(f"127.0.0.1:{port}", run_dir, manifest=None, env=dict(os.environ))
    text = str(ei.value)
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in text and f"ray start --head --port {port}" in text
    assert not (run_dir / "logs").exists()  # no check process was started


def test_why_ray_init_failed_is_read_from_the_error_it_wraps() -> None:
    try:
        try:
            raise RuntimeError("No node info found matching attributes: '' when trying to resolve node to connect to.")
        except RuntimeError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from inner
    except ConnectionError as exc:
        text = raycluster._chain(exc)
    assert text == ("ConnectionError: Failed to connect to Ray cluster at 10.0.0.1:6379; because RuntimeError: "
                    "No node info found matching attributes: '' when trying to resolve node to connect to.")


# --- what each Ray node checks ----------------------------------------------------------------


def _run_files(tmp_path: Path, n: int = 2) -> tuple[Path, dict[str, Any]]:
    nodes = tmp_path / "run" / "state" / "nodes"
    entries = []
    for i in range(n):
        d = nodes / f"GM000{i}"
        d.mkdir(parents=True)
        (d / "train.csv").write_text("a\n1\n")
        (d / "test.csv").write_text("a\n2\n")
        entries.append({"code": f"GM000{i}", "name": f"n{i}", "train_path": str(d / "train.csv"), "test_path": str(d / "test.csv"),
                        "train_rows": 1, "test_rows": 1})
    manifest = tmp_path / "run" / "manifest.json"
    manifest.write_text(json.dumps(entries))
    request = raycluster._request("127.0.0.1:6379", tmp_path / "run", manifest)
    return manifest, request


def test_a_node_that_sees_the_run_passes_and_leaves_no_probe_file(tmp_path: Path) -> None:
    manifest, request = _run_files(tmp_path)
    assert request["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert len(request["node_dirs"]) == 2 and len(request["data_files"]) == 4
    seen = inspect_paths(request)
    assert seen["problems"] == []
    assert seen["versions"] == software_versions()
    assert not [p for p in manifest.parent.rglob(".fedgov-ray-check-*")]


def test_a_node_without_the_shared_storage_is_told_which_path_is_missing(tmp_path: Path) -> None:
    _, request = _run_files(tmp_path)
    request = {**request, "shared_file": str(tmp_path / "elsewhere" / "manifest.json"),
               "node_dirs": [str(tmp_path / "elsewhere" / "GM0000")], "data_files": [str(tmp_path / "elsewhere" / "GM0000" / "train.csv")]}
    problems = inspect_paths(request)["problems"]
    assert problems == [
        f"{tmp_path / 'elsewhere' / 'manifest.json'}: not found (expected: the file this machine wrote, at the same path)",
        f"{tmp_path / 'elsewhere' / 'GM0000'}: no such directory (expected: the node directory, writable)",
    ]  # the data files of a missing node directory are not listed again


def test_other_storage_at_the_same_path_is_found_by_the_manifest_hash(tmp_path: Path) -> None:
    manifest, request = _run_files(tmp_path)
    manifest.write_text("[]")  # what another machine's disk would hold at this path
    (problem,) = inspect_paths(request)["problems"]
    assert problem.startswith(f"{manifest}: another file (SHA-256 ") and "other storage at this path" in problem


def test_a_node_directory_that_cannot_be_written_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, request = _run_files(tmp_path)
    real_open = os.open
    read_only = request["node_dirs"][1]

    def fake_open(path: Any, flags: int, mode: int = 0o777) -> int:  # root ignores chmod: a read-only mount, faked
        if str(path).startswith(read_only + os.sep):
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, mode)

    monkeypatch.setattr(raycluster.os, "open", fake_open)
    assert inspect_paths(request)["problems"] == [
        f"{read_only}: not writable (Read-only file system; expected: the node writes its ledger and audit log here)"
    ]


# --- the verdict over the cluster -----------------------------------------------------------------


def _entry(node_id: str, *, head: bool = False, problems: list[str] | None = None, cpus: float = 1.0, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"node_id": node_id, "address": "10.0.0.9" if not head else "10.0.0.1", "hostname": "gpu9" if not head else "head",
                         "cpus": cpus, "head": head, **kw}
    if "error" not in kw and "skipped" not in kw:
        e["result"] = {"problems": problems or [], "versions": kw.pop("versions", software_versions())}
    return e


def test_the_refusal_names_the_ray_node_the_path_and_what_is_expected() -> None:
    result = {"done": True, "nodes": [
        _entry("a" * 56, head=True),
        _entry("b" * 56, problems=["/shared/runs/r/manifest.json: not found (expected: the file this machine wrote, at the same path)"]),
    ]}
    with pytest.raises(FederationError) as ei:
        cluster_verdict("10.0.0.1:6379", result, software_versions())
    text = str(ei.value)
    assert "the Ray cluster at 10.0.0.1:6379 cannot run this simulation: 1 of 2 Ray node(s)" in text
    assert f"Ray node 10.0.0.9 (host gpu9, node id {'b' * 12})" in text
    assert "/shared/runs/r/manifest.json: not found (expected: the file this machine wrote, at the same path)" in text
    assert "shared storage" in text and "same absolute path" in text
    assert "a" * 12 not in text  # the head sees the run: it is not named


def test_other_versions_a_failed_check_and_long_lists_are_reported_per_node() -> None:
    mine = software_versions()
    result = {"done": True, "nodes": [
        _entry("c" * 56, versions={**mine, "fedgov": "0.0.9"}),
        _entry("d" * 56, error="the check could not run there: ModuleNotFoundError: No module named 'fedgov'"),
        _entry("e" * 56, problems=[f"/p/{i}: not found" for i in range(8)]),
    ]}
    with pytest.raises(FederationError) as ei:
        cluster_verdict("h:1", result, mine)
    text = str(ei.value)
    assert f"fedgov 0.0.9 (expected {mine['fedgov']}, as on this machine)" in text
    assert "No module named 'fedgov'" in text
    assert "/p/4: not found" in text and "/p/5" not in text and "... and 3 more" in text
    assert "3 of 3 Ray node(s)" in text


def test_a_node_without_cpus_is_not_checked_and_a_cluster_without_any_is_refused() -> None:
    nodes = cluster_verdict("h:1", {"done": True, "nodes": [
        _entry("f" * 56, head=True, cpus=0, skipped="no CPU"), _entry("g" * 56),
    ]}, software_versions())
    assert [(n.head, n.checked) for n in nodes] == [(True, False), (False, True)]
    with pytest.raises(FederationError, match="no alive node with a CPU for a ClientApp"):
        cluster_verdict("h:1", {"done": True, "nodes": [_entry("f" * 56, head=True, cpus=0, skipped="no CPU")]}, software_versions())


# --- how the launcher hands the address to Flower ------------------------------------------------


class _Stop(Exception):
    pass


def _capture_simulate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **options: Any) -> dict[str, Any]:
    """Run ``simulate`` with Flower's processes faked: what it would start, and with what."""
    from fedgov.launch import simulation

    seen: dict[str, Any] = {"checked": []}

    class FakeProcess:
        def __init__(self, args: list[str], *, env: dict[str, str], **kw: Any) -> None:
            seen["superlink_env"] = env

        def stop(self) -> None:
            pass

        def remember_descendants(self) -> None:
            pass

    def fake_run_cli(args: list[str], env: dict[str, str], log_path: Path, timeout: float = 60.0) -> None:
        seen["config_args"] = args
        raise _Stop()

    def fake_check(address: str, run_dir: Path, *, manifest: Path | None, env: dict[str, str]) -> list[Any]:
        seen["checked"].append((address, manifest))
        return []

    monkeypatch.setattr(simulation, "ManagedProcess", FakeProcess)
    monkeypatch.setattr(simulation, "wait_healthy", lambda *a, **k: None)
    monkeypatch.setattr(simulation, "_run_cli", fake_run_cli)
    monkeypatch.setattr(simulation, "check_cluster", fake_check)
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # a shell's variable does not reach a library call
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(_Stop):
        simulation.simulate(
            run_dir, n_nodes=3, run_config_values={"manifest-path": str(run_dir / "manifest.json")},
            options=simulation.SimulationOptions(runs_dir=tmp_path, **options), emit=lambda e: None,
        )
    return seen


def test_a_local_run_keeps_its_own_ray_with_its_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = _capture_simulate(monkeypatch, tmp_path, num_cpus=2)
    assert seen["superlink_env"]["RAY_ADDRESS"] == "local"
    args = seen["config_args"]
    assert args[args.index("--init-args-num-cpus") + 1] == "2" and seen["checked"] == []


def test_a_cluster_run_is_checked_first_and_passes_no_cpus_to_ray_init(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = _capture_simulate(monkeypatch, tmp_path, ray_address="10.0.0.1:6379")
    assert seen["checked"] == [("10.0.0.1:6379", tmp_path / "run" / "manifest.json")]
    assert seen["superlink_env"]["RAY_ADDRESS"] == "10.0.0.1:6379"
    args = seen["config_args"]
    assert "--init-args-num-cpus" not in args and args[args.index("--client-resources-num-cpus") + 1] == "1"


def test_cpus_for_a_cluster_are_refused_by_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ray start --num-cpus"):
        _capture_simulate(monkeypatch, tmp_path, ray_address="10.0.0.1:6379", num_cpus=4)


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The SimulationOptions ``fedgov run`` would run with (the run itself is replaced)."""
    from fedgov.launch import simulation

    got: list[Any] = []

    def fake_run(task: Path, federation: Path | None, options: Any, on_event: Any = None) -> Path:
        got.append(options)
        raise FederationError("stopped by the test")

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return got


def test_fedgov_run_takes_the_address_from_the_option_or_ray_address(captured: list[Any], tmp_path: Path) -> None:
    task = str(tmp_path / "task.toml")
    runner.invoke(app, ["run", task, "--ray-address", "10.0.0.1:6379"])
    runner.invoke(app, ["run", task], env={"RAY_ADDRESS": "10.0.0.2:6379"})
    runner.invoke(app, ["run", task, "--ray-address", "", "--cpus", "2"], env={"RAY_ADDRESS": "10.0.0.2:6379"})
    runner.invoke(app, ["run", task])
    assert [(o.ray_address, o.num_cpus) for o in captured] == [("10.0.0.1:6379", None), ("10.0.0.2:6379", None), (None, 2), (None, None)]


def test_cpus_with_a_cluster_or_a_bad_address_stop_before_anything_runs(captured: list[Any], tmp_path: Path) -> None:
    task = str(tmp_path / "task.toml")
    out = runner.invoke(app, ["run", task, "--cpus", "2", "--ray-address", "10.0.0.1:6379"])
    assert out.exit_code == int(ExitCode.USAGE) and "--cpus sets the CPUs of a Ray of the run's own" in out.stderr
    assert "(--ray-address)" in out.stderr
    out = runner.invoke(app, ["run", task, "--cpus", "2"], env={"RAY_ADDRESS": "10.0.0.1:6379"})
    assert out.exit_code == int(ExitCode.USAGE) and "(RAY_ADDRESS)" in out.stderr and "--ray-address ''" in out.stderr
    out = runner.invoke(app, ["run", task, "--ray-address", "ray://head:10001"])
    assert out.exit_code == int(ExitCode.CONFIG) and "Ray Client addresses (ray://) are not supported" in out.stderr
    assert "Traceback" not in out.output
    assert captured == []


def test_fedgov_query_takes_the_address_and_refuses_it_for_real_nodes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fedgov.launch import query

    got: list[Any] = []

    def fake_query(path: Path, federation: Path | None, options: Any, on_event: Any = None) -> Path:
        got.append(options)
        raise FederationError("stopped by the test")

    monkeypatch.setattr(query, "run_query_simulation", fake_query)
    q = str(tmp_path / "q.toml")
    out = runner.invoke(app, ["query", q, "--ray-address", "10.0.0.1:6379"])
    assert out.exit_code == int(ExitCode.FEDERATION) and got[0].ray_address == "10.0.0.1:6379"
    out = runner.invoke(app, ["query", q, "-C", str(tmp_path), "--ray-address", "10.0.0.1:6379"])
    assert out.exit_code == int(ExitCode.USAGE) and "--coordinator-dir" in out.stderr
