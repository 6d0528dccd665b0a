"""End to end: ``fedgov run --ray-address`` on a Ray cluster of two nodes, a head and a worker,
each started with ``ray start`` as a process of its own on this machine (1 CPU each, so that
Flower's two ClientApp actors must go one to each node).

The cluster gets a private ``--temp-dir`` and a Ray Client port of its own, so that it never
meets another Ray on the machine (a local ``fedgov run`` sets ``RAY_ADDRESS=local``), and it is
stopped by killing its two ``ray start --block`` processes with everything under them (never
``ray stop``, which stops every Ray of the machine). Every process it starts carries a marker in
its environment; the module ends by checking that none is left.

Where the worker can get a mount namespace of its own (root, ``unshare``, ``nsenter``), a
tmpfs over the runs directory inside that namespace makes a Ray node that cannot see the run
directory, as a node without the shared storage would be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedgov.launch.processes import free_port, kill_tree
from fedgov.reports import load_report

pytestmark = pytest.mark.slow

MARKER = "FEDGOV_TEST_RAY_CLUSTER"
BIN = Path(sys.executable).parent
MEMBERS = ["GM0363", "GM0344", "GM0150", "GM0599"]

# What a short-lived driver reads from the cluster's GCS (no dashboard needed): its nodes and actors.
_STATE = """
import json, logging, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
actors = state.actors()
actors = actors.values() if isinstance(actors, dict) else actors
out = {
    "nodes": [{"id": n["NodeID"], "alive": n["Alive"], "head": "node:__internal_head__" in (n.get("Resources") or {}),
               "cpus": (n.get("Resources") or {}).get("CPU", 0)} for n in ray.nodes()],
    "actors": [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"], "job": a["JobID"]} for a in actors],
}
ray.shutdown()
print("STATE " + json.dumps(out))
"""


def _marked(value: str) -> list[int]:
    """Processes whose environment carries ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat[stat.rfind(")") + 2 :].split()[0] != "Z":
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _own_mount_namespace_possible() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        return False
    ok = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False, timeout=30)
    return ok.returncode == 0


@dataclass
class RayCluster:
    address: str
    temp: Path
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_in_own_namespace: bool = False

    def start(self, name: str, args: list[str], *, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        log = self.temp / f"{name}.log"
        proc = subprocess.Popen(  # noqa: S603 - our arguments
            [*(prefix or []), str(BIN / "ray"), "start", *args, "--temp-dir", str(self.temp / name), "--block",
             "--disable-usage-stats"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes.append(proc)
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, f"ray start ({name}) failed:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(0.2)
        return proc

    def state(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", _STATE, self.address], env=self.env, capture_output=True, text=True, timeout=120, check=False,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("STATE ")), None)
        assert line is not None, out.stdout[-2000:] + out.stderr[-3000:]
        result: dict[str, Any] = json.loads(line[len("STATE ") :])
        return result

    def stop(self) -> None:
        for proc in reversed(self.processes):
            kill_tree(proc.pid, grace=10.0)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - after SIGKILL
                pass
        for pid in _marked(str(self.temp)):  # anything that left the tree (Ray re-parents nothing, but be sure)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    # A short private temp dir: Ray's socket paths under it must stay within the Unix limit.
    temp = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({MARKER: str(temp), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    port = free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp=temp, env=env)
    try:
        cluster.start("head", ["--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard=false",
                               "--ray-client-server-port", str(free_port())])
        own_ns = _own_mount_namespace_possible()
        cluster.start("worker", ["--address", cluster.address, "--num-cpus", "1"],
                      prefix=["unshare", "-m", "--propagation", "private"] if own_ns else None)
        cluster.worker_in_own_namespace = own_ns
        deadline = time.monotonic() + 60
        while sum(n["alive"] for n in cluster.state()["nodes"]) < 2:
            assert time.monotonic() < deadline, "the worker did not join the head"
            time.sleep(1)
        yield cluster
    finally:
        cluster.stop()
        left = _marked(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert left == [], f"Ray processes left running: {left}"


@pytest.fixture
def small_task(tmp_path: Path, write_federation: Callable[..., Path], write_task: Callable[..., Path], adult_test_csv: Path) -> Path:
    """Four municipalities, one round, logistic regression with DP-SGD."""
    fed = write_federation(tmp_path / "fed.toml", name="ray-4", members=MEMBERS, seed=5, min_rows=200)
    return write_task(
        tmp_path / "task.toml", name="ray-e2e", federation=fed,
        training={"rounds": 1, "batch_size": 256, "min_nodes": 2, "seed": 1},
        privacy={"target_epsilon": 2.0, "delta": 1e-5},
        evaluation={"centralized": adult_test_csv},
    )


def _fedgov(args: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it; no RAY_ADDRESS from the test's environment."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    return subprocess.run([str(BIN / "fedgov"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_a_run_on_a_two_node_ray_cluster_places_clientapps_on_both_nodes(
    ray_cluster: RayCluster, small_task: Path, tmp_path: Path, flower_processes: Callable[[Path], list[str]]
) -> None:
    runs = tmp_path / "runs"
    out = _fedgov(["run", str(small_task), "--no-baseline", "--runs-dir", str(runs), "--ray-address", ray_cluster.address])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = list(runs.iterdir())
    report = load_report(run_dir / "report.json")
    assert report.status == "completed" and [r.round for r in report.rounds] == [1]
    assert sorted(n.node for n in report.nodes if n.status == "accepted" and n.rounds_trained == 1) == sorted(MEMBERS)

    nodes = {n["id"]: n for n in ray_cluster.state()["nodes"] if n["alive"]}
    assert len(nodes) == 2 and sum(n["head"] for n in nodes.values()) == 1
    # fedgov checked both Ray nodes before it submitted the run, and both saw the run's files
    check = json.loads((run_dir / "logs" / "ray-check.json").read_text())
    assert {e["node_id"] for e in check["nodes"] if "result" in e} == set(nodes)
    assert all(e["result"]["problems"] == [] for e in check["nodes"])
    # Flower's ClientApp actors ran on both Ray nodes (the GCS keeps finished actors in its table)
    actors = [a for a in ray_cluster.state()["actors"] if a["class"] == "ClientAppActor"]
    assert {a["node"] for a in actors} == set(nodes), actors
    # the run left nothing running (the cluster itself stays up for the next test)
    assert flower_processes(tmp_path) == []


def test_a_ray_node_that_cannot_see_the_run_directory_is_refused_by_name(
    ray_cluster: RayCluster, small_task: Path, tmp_path: Path, flower_processes: Callable[[Path], list[str]]
) -> None:
    if not ray_cluster.worker_in_own_namespace:
        pytest.skip("needs root, unshare and nsenter to hide the run directory from one Ray node "
                    "(tests/unit/test_raycluster.py checks the refusal without them)")
    runs = tmp_path / "runs"
    runs.mkdir()
    worker = next(n["id"] for n in ray_cluster.state()["nodes"] if n["alive"] and not n["head"])
    head = next(n["id"] for n in ray_cluster.state()["nodes"] if n["alive"] and n["head"])
    ns = ["nsenter", "-t", str(ray_cluster.processes[1].pid), "-m"]
    # In the worker's mount namespace only: an empty file system where the runs directory is.
    subprocess.run([*ns, "mount", "-t", "tmpfs", "fedgov-test", str(runs)], check=True, timeout=30)
    try:
        out = _fedgov(["run", str(small_task), "--no-baseline", "--runs-dir", str(runs), "--ray-address", ray_cluster.address])
    finally:
        subprocess.run([*ns, "umount", str(runs)], check=True, timeout=30)
    assert out.returncode == 20, out.stdout[-3000:] + out.stderr[-3000:]
    err = " ".join(out.stderr.split())  # rich wraps long lines
    (run_dir,) = list(runs.iterdir())
    assert f"the Ray cluster at {ray_cluster.address} cannot run this simulation: 1 of 2 Ray node(s)" in err
    assert f"node id {worker[:12]})" in err and f"node id {head[:12]}" not in err
    assert f"{run_dir / 'manifest.json'}: not found (expected: the file this machine wrote, at the same path)" in err
    assert "shared storage" in err and "Traceback" not in out.stderr
    assert not (run_dir / "logs" / "superlink.log").exists()  # refused before Flower started
    assert flower_processes(tmp_path) == []


def test_an_address_without_a_ray_cluster_is_a_clear_error(small_task: Path, tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    started = time.monotonic()
    out = _fedgov(["run", str(small_task), "--no-baseline", "--runs-dir", str(tmp_path / "runs"), "--ray-address", f"127.0.0.1:{port}"])
    assert out.returncode == 20, out.stderr
    err = " ".join(out.stderr.split())
    assert f"error: cannot reach the Ray cluster at 127.0.0.1:{port}" in err and "Traceback" not in out.stderr
    assert time.monotonic() - started < 60
