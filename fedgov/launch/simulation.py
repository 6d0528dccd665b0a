"""``fedgov run``: a task on a simulated federation, on Flower's own simulation engine.

What happens, in order:

1. The task, its contract and the federation are loaded and checked (every problem at once).
2. Each municipality's data is written to its own node directory in the run directory
   (``nodes/<CBS code>/train.csv`` and ``test.csv``), as it would lie next to a real node.
3. A SuperLink in simulation mode is started on free loopback ports, with its own
   ``FLWR_HOME`` inside the run directory, telemetry, update checks and runtime dependency
   installation off; Flower's simulation engine (Ray) runs one virtual SuperNode per
   municipality. The run is submitted with ``flwr run`` (Message API ServerApp/ClientApp).
   With ``ray_address`` the engine joins that Ray cluster instead of starting a Ray of its
   own, after a check that every Ray node sees the run's files (:mod:`fedgov.launch.raycluster`).
4. Progress is followed in ``events.jsonl``; when the run ends, the SuperLink and every
   process it started are stopped, also on error or Ctrl-C.
5. The report (with each node's local-only baseline, trained at the node on request of
   the coordinator), the final model and a plot are written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fedgov.config import load_federation, load_task
from fedgov.errors import ConfigError, FederationError, Problem
from fedgov.coordinator.events import EventReader
from fedgov.reports import load_report, plot_report, write_json_atomic
from fedgov.node.home import NodeHome
from fedgov.node.policy import default_policy_text, secure_aggregation_text
from fedgov.launch.processes import ManagedProcess, flower_bin, flower_env, free_port, wait_healthy
from fedgov.launch.raycluster import CLIENT_NUM_CPUS, LOCAL_RAY, RAY_ADDRESS_ENV, check_cluster

__all__ = [
    "SimulationOptions",
    "app_dir",
    "follow_run",
    "new_run_dir",
    "pin_roster_text",
    "node_policy_settings",
    "prepare_nodes",
    "resume_simulation",
    "run_simulation",
    "simulate",
    "write_run_config",
]

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]
CONNECTION = "fedgov-sim"


@dataclass(frozen=True)
class SimulationOptions:
    runs_dir: Path = Path("runs")
    num_cpus: int | None = None
    timeout: float = 3600.0
    local_baseline: bool = True
    keep_flower_home: bool = False
    state_dir: Path | None = None
    node_budget: float | None = None
    """``--node-budget``: every new simulated node's total epsilon (None: the federation's
    ``[node_policy] budget_epsilon``, else 10)."""
    approval: Literal["auto", "manual", "deny"] | None = None
    """``--approval``: every new simulated node's approval mode (None: the federation's, else auto)."""
    node_policy: Mapping[str, Any] = field(default_factory=dict)
    """``--node-policy KEY=VALUE``: what every new simulated node's policy says, over the
    federation file (keys of :class:`fedgov.config.federation.NodePolicyDefaults`)."""
    ray_address: str | None = None
    """``HOST:PORT`` of an existing Ray cluster's head to run the simulation on
    (:mod:`fedgov.launch.raycluster`); None: a Ray of the run's own on this machine, with
    ``num_cpus`` CPUs. The run directory and ``state_dir`` must then lie on storage that every
    Ray node sees at the same path."""


def app_dir() -> Path:
    """The Flower app directory: the project root holding ``[tool.flwr.app]``.

    The app's glue packages (``server``, ``clients``) lie beside ``fedgov`` in that root, in a
    checkout as in an editable install, so the root is found from this package's own location,
    without importing the glue (the library never imports it).
    """
    root = Path(__file__).resolve().parents[2]  # <root>/fedgov/launch/simulation.py
    if not (root / "pyproject.toml").is_file():
        raise FederationError(
            f"Flower app not found: {root / 'pyproject.toml'} is missing. fedgov's simulation "
            "runs from a source checkout (pip install -e .)."
        )
    return root


def new_run_dir(runs_dir: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        d = runs_dir / (f"{stamp}-{name}" if i == 0 else f"{stamp}-{name}-{i}")
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise FederationError(f"cannot create a run directory under {runs_dir}")


def _run_cli(args: list[str], env: dict[str, str], log_path: Path, timeout: float = 60.0) -> None:
    with ManagedProcess(args, env=env, log_path=log_path) as proc:
        try:
            rc = proc.proc.wait(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - TimeoutExpired
            raise FederationError(f"{' '.join(args[:3])} did not finish within {timeout:.0f} s") from exc
        if rc != 0:
            raise FederationError(f"{' '.join(args[:3])} failed (exit {rc}):\n{proc.tail()}")


def follow_run(
    connection: str,
    run_config: Path,
    *,
    env: dict[str, str],
    run_dir: Path,
    emit: EventCallback,
    timeout: float,
    tick: Callable[[], None] | None = None,
    app: Path | None = None,
) -> None:
    """Submit the fedgov Flower app with ``flwr run`` and follow its ``events.jsonl`` until it ends.

    Shared by simulation and deployment: the ServerApp writes the events and the report into
    ``run_dir``; ``flwr run`` is stopped (with everything it started) on timeout or error.
    ``app``: another Flower app directory instead of fedgov's (the benchmarks' baseline).
    """
    run = ManagedProcess(
        [flower_bin("flwr"), "run", str(app or app_dir()), connection, "--stream", "--run-config", str(run_config)],
        env=env,
        log_path=run_dir / "logs" / "flower.log",
        name="flwr run",
    )
    reader = EventReader(run_dir / "events.jsonl")
    deadline = time.monotonic() + timeout
    try:
        while run.running():
            for ev in reader.read_new():
                emit(ev)
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                raise FederationError(f"the run did not finish within {timeout:.0f} s")
            time.sleep(0.25)
        for ev in reader.read_new():
            emit(ev)
    finally:
        run.stop()


def _toml_scalar(v: str | bool | int | float) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(float(v)) if isinstance(v, float) else str(v)
    return json.dumps(str(v))


def write_run_config(run_dir: Path, values: dict[str, str | bool | int | float]) -> Path:
    """The run config ``flwr run`` passes to the ServerApp, as a TOML file in the run directory."""
    path = run_dir / "run-config.toml"
    path.write_text(
        "".join(f"{k} = {_toml_scalar(v)}\n" for k, v in values.items()),
        encoding="utf-8",
    )
    return path


def simulate(
    run_dir: Path,
    *,
    n_nodes: int,
    run_config_values: dict[str, str | bool | int | float],
    options: SimulationOptions,
    emit: EventCallback,
    app: Path | None = None,
) -> None:
    """Start a simulation SuperLink for ``n_nodes`` virtual SuperNodes, submit fedgov's app (or
    the Flower app in ``app``) with ``run_config_values`` and follow it until it ends; stop
    everything it started.

    Shared by training (:func:`run_simulation`) and statistics queries
    (:func:`fedgov.launch.query.run_query_simulation`).
    """
    flwr_home = run_dir / ".flower"
    flwr_home.mkdir()
    port, control_port = free_port(), free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    run_config = write_run_config(run_dir, run_config_values)
    env = flower_env(flwr_home)
    logs = run_dir / "logs"
    if options.ray_address is None:
        # A Ray of the run's own: Flower's `ray.init()` reads RAY_ADDRESS (fedgov.launch.raycluster).
        env[RAY_ADDRESS_ENV] = LOCAL_RAY
        ray_args = ["--init-args-num-cpus", str(options.num_cpus or os.cpu_count() or 1)]
    else:
        if options.num_cpus is not None:
            raise ConfigError(
                "CPUs given for a Ray cluster",
                [Problem("--cpus", "", f"sets the CPUs of a Ray of the run's own; the Ray cluster at {options.ray_address} "
                                       "has the CPUs its nodes were started with ('ray start --num-cpus')")],
            )
        manifest = run_config_values.get("manifest-path")
        ray_nodes = check_cluster(
            options.ray_address, run_dir, manifest=Path(str(manifest)) if manifest else None, env=env,
        )
        emit({
            "event": "ray-cluster", "address": options.ray_address,
            "nodes": [{"address": n.address, "hostname": n.hostname, "node_id": n.node_id, "cpus": n.cpus,
                       "head": n.head, "checked": n.checked} for n in ray_nodes],
        })
        env[RAY_ADDRESS_ENV] = options.ray_address
        ray_args = []  # ray.init refuses num_cpus when it joins a cluster
    started = time.time()
    superlink = ManagedProcess(
        [
            flower_bin("flower-superlink"),
            "--simulation",
            # Simulation only: bound to loopback, no Fleet API, no node ever connects.
            "--insecure",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--control-api-address", f"127.0.0.1:{control_port}",
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        log_path=logs / "superlink.log",
        name="flower-superlink",
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", superlink)
        _run_cli(
            [
                flower_bin("flwr"), "federation", "simulation-config",
                "--num-supernodes", str(n_nodes),
                "--client-resources-num-cpus", str(CLIENT_NUM_CPUS),
                *ray_args,
                "--init-args-logging-level", "error",
                "--init-args-log-to-driver", "true",
            ],
            env,
            logs / "flwr-cli.log",
        )
        emit({"event": "flower-started", "seconds": time.time() - started})
        follow_run(
            CONNECTION, run_config, env=env, run_dir=run_dir, emit=emit, timeout=options.timeout,
            tick=superlink.remember_descendants, app=app,
        )
    finally:
        superlink.stop()
        if not options.keep_flower_home:
            shutil.rmtree(flwr_home / "apps", ignore_errors=True)


def pin_roster_text(policy_text: str, roster: Path | str, authority_key: str) -> str:
    """A policy text with its ``[secure_aggregation]`` section set to ``roster`` (appended when
    the policy has none; an existing section is left as its operator wrote it)."""
    if "\n[secure_aggregation]" in "\n" + policy_text:
        return policy_text
    return policy_text.rstrip("\n") + "\n" + secure_aggregation_text(roster, authority_key)


SIMULATED_POLICY: dict[str, Any] = {"approval": "auto", "budget_epsilon": 10.0}
"""What a simulated node's new policy says where neither the federation file nor the command
line says otherwise (the rest: :func:`fedgov.node.policy.default_policy_text`'s defaults)."""


def node_policy_settings(federation: Any, index: int, options: SimulationOptions) -> dict[str, Any]:
    """What member ``index``'s new simulated policy says: fedgov's simulation defaults, then the
    federation's ``[node_policy]``, the member's own ``node_policy``, and the command line
    (``--node-policy``, ``--node-budget``, ``--approval``), the last one given winning.

    A command-line key that is not a key of ``[node_policy]``, or a value of the wrong kind, is
    a :class:`ConfigError` naming it (:class:`fedgov.config.federation.NodePolicyDefaults`)."""
    from pydantic import ValidationError

    from fedgov.config._base import problems_from_validation
    from fedgov.config.federation import NodePolicyDefaults

    cli: dict[str, Any] = dict(options.node_policy)
    if options.node_budget is not None:
        cli["budget_epsilon"] = options.node_budget
    if options.approval is not None:
        cli["approval"] = options.approval
    try:
        given = NodePolicyDefaults.model_validate(cli).given()
    except ValidationError as exc:
        problems = [Problem("--node-policy", pr.location, pr.message) for pr in problems_from_validation(exc, "--node-policy")]
        raise ConfigError("Invalid simulated node policy on the command line", problems) from exc
    member = federation.members[index].node_policy
    return {
        **SIMULATED_POLICY,
        **federation.node_policy.given(),
        **(member.given() if member is not None else {}),
        **given,
    }


def _policy_text(n: Any, contract: Any, settings: dict[str, Any], *, name: str | None = None, max_epsilon: float,
                 kinds: tuple[str, ...], pinned: tuple[str, str], roster: Path, authority: str) -> str:
    """A simulated node's new policy (validated by the node's own loader as it is made)."""
    budget = float(settings["budget_epsilon"])
    limits: dict[str, Any] = {k: settings[k] for k in ("min_rows", "min_rows_distributed", "require_privacy") if k in settings}
    try:
        return _template(n, contract, settings, budget, limits, name=name, max_epsilon=max_epsilon, kinds=kinds,
                         pinned=pinned, roster=roster, authority=authority)
    except ConfigError as exc:  # the node's own loader refused what [node_policy] or --node-policy asked
        given = ", ".join(f"{k}={v}" for k, v in settings.items())
        raise ConfigError(
            f"the simulated policy of {n.code} ({given}; from [node_policy], the member's node_policy and "
            "--node-policy) is not a valid node policy",
            exc.problems,
        ) from exc


def _template(n: Any, contract: Any, settings: dict[str, Any], budget: float, limits: dict[str, Any], *, name: str | None,
              max_epsilon: float, kinds: tuple[str, ...], pinned: tuple[str, str], roster: Path, authority: str) -> str:
    return default_policy_text(
        n.code, name=name, dataset=contract.name, contract=contract.name, version=contract.version,
        path=n.train_path.name, test_path=n.test_path.name, budget_epsilon=budget,
        approval=settings["approval"],
        max_epsilon_per_task=settings.get("max_epsilon_per_task", min(budget, max(3.0, max_epsilon))),
        kinds=kinds, contract_files={contract.version: pinned},
        roster=roster, authority_key=authority, **limits,
    )


def _kept_differs(policy: Any, settings: dict[str, Any]) -> list[str]:
    """The settings a kept policy (``--state-dir``) does not have, as ``key=value``."""
    ds, lim = policy.datasets[0], policy.limits
    have = {
        "approval": policy.approval, "budget_epsilon": ds.budget.epsilon, "max_epsilon_per_task": lim.max_epsilon_per_task,
        "min_rows": lim.min_rows, "min_rows_distributed": lim.min_rows_distributed, "require_privacy": lim.require_privacy,
    }
    return [f"{k}={settings[k]}" for k in settings if k in have and have[k] != settings[k]]


def _data_invalid(federation: Any, contract: Any, emit: EventCallback, found: dict[str, dict[str, Any]]) -> Callable[[int, Any], None]:
    """What the simulation does with a member whose data does not conform: tell (no found value,
    no row), and let its node refuse."""
    from fedgov.data import problem_classes

    def on_invalid(i: int, exc: Any) -> None:
        m = federation.members[i]
        files = sorted({p.file for p in exc.problems if p.file}) or [str(m.data or federation.source)]
        classes = problem_classes(exc)
        found[m.code] = {"files": files, "problems": classes}
        emit({
            "event": "warning",
            "message": f"{m.code} ({m.name}): {', '.join(files)} does not conform to contract {contract.ref} "
            f"({'; '.join(classes[:3])}{'; ...' if len(classes) > 3 else ''}); its node will refuse (data-invalid), "
            "the others go on. Every cell: fedgov data validate FILE --contract CONTRACT_FILE",
        })

    return on_invalid


def _warn_small(nodes: list[Any], homes: dict[str, NodeHome], task: Any, invalid: set[str], emit: EventCallback) -> None:
    """One warning for the members whose training rows are under their node's minimum
    (:func:`fedgov.node.policy.min_rows_for`, the rule the nodes apply): they will refuse."""
    from fedgov.node.policy import MIN_ROWS_LOCAL, min_rows_for

    small: dict[tuple[int, str], list[str]] = {}
    for n in nodes:
        if n.code in invalid:
            continue
        limit, setting = min_rows_for(homes[n.code].policy(), task)
        if n.train_rows < limit:
            small.setdefault((limit, setting), []).append(f"{n.code} ({n.train_rows})")
    for (limit, setting), who in sorted(small.items()):
        floor = f" (under local DP-SGD never fewer than {MIN_ROWS_LOCAL})" if setting == "limits.min_rows" and limit == MIN_ROWS_LOCAL else ""
        key = setting.removeprefix("limits.")
        emit({
            "event": "warning",
            "message": f"{len(who)} of {len(nodes)} members have fewer training rows than their node policy's minimum, "
            f"{setting} = {limit}{floor}; they will refuse (too-few-rows): {', '.join(who[:8])}"
            f"{f' and {len(who) - 8} more' if len(who) > 8 else ''}. A simulation's nodes take their policy from "
            f"[node_policy] in the federation file or --node-policy {key}=N",
        })


def prepare_nodes(
    run_dir: Path,
    federation: Any,
    contract: Any,
    options: SimulationOptions,
    emit: EventCallback,
    *,
    max_epsilon: float,
    task: Any = None,
) -> tuple[list[Any], Path]:
    """Give each simulated municipality a node directory (its data, policy, ledger and audit
    log) and write the run's manifest; with ``options.state_dir`` the directories persist
    between runs (a policy is written once and then left to its operator).

    Each new policy says what :func:`node_policy_settings` gives (the federation's
    ``[node_policy]``, the command line) and is validated by the node's own policy loader. A
    member whose data does not conform to the contract does not stop the others: its node
    refuses (``data-invalid``), and ``data-check.json`` in the run directory says why (by file,
    column and kind, no value). ``task``: the training task (None: a statistics query), for
    the warning on members under their node's minimum of rows and ``training.min_nodes``.
    """
    from fedgov.data import materialize, write_manifest
    from fedgov.errors import DataValidationError

    emit({"event": "run-dir", "path": str(run_dir)})
    emit({"event": "partition", "nodes": len(federation.members)})
    state_dir = (options.state_dir or run_dir / "state").resolve()
    found: dict[str, dict[str, Any]] = {}
    errors: list[Problem] = []

    tell = _data_invalid(federation, contract, emit, found)

    def on_invalid(i: int, exc: Any) -> None:
        errors.extend(exc.problems)
        tell(i, exc)

    settings = [node_policy_settings(federation, i, options) for i in range(len(federation.members))]
    nodes = materialize(federation, contract, state_dir / "nodes", on_invalid=on_invalid)
    min_nodes = int(task.training.min_nodes) if task is not None else 1
    if found and len(nodes) - len(found) < min_nodes:
        raise DataValidationError(
            f"{len(found)} of {len(nodes)} members' data do not conform to contract {contract.ref}; "
            f"the {len(nodes) - len(found)} others are fewer than the {min_nodes} the task needs (training.min_nodes)",
            errors,
        )
    if found:
        write_json_atomic(run_dir / "data-check.json", json.dumps(found, indent=2))
    from fedgov.node.contracts import pin_new_contract
    from fedgov.privacy.roster import federation_roster

    # Secure aggregation needs a roster the nodes pin (fedgov.privacy.roster): the simulation is its
    # own roster authority, kept with the node directories.
    roster, authority = federation_roster(
        state_dir / "roster", str(getattr(federation, "name", "federation")), {n.code: n.train_path.parent for n in nodes}
    )
    homes: dict[str, NodeHome] = {}
    kept: dict[str, list[str]] = {}
    for n, wanted in zip(nodes, settings, strict=True):
        # Each node holds the task's contract itself, pinned in its policy (as 'fedgov node init').
        pinned = pin_new_contract(n.train_path.parent, contract)
        existed = (n.train_path.parent / "policy.toml").exists()
        home = NodeHome.create(
            n.train_path.parent,
            policy_text=_policy_text(
                n, contract, wanted, name=federation.policy_name(n.code), max_epsilon=max_epsilon, kinds=("training", "statistics"), pinned=pinned,
                roster=roster, authority=authority,
            ),
        )
        homes[n.code] = home
        text = home.policy_path.read_text("utf-8")
        if pin_roster_text(text, roster, authority) != text:  # a policy kept from before rosters: pin this one
            NodeHome.create(home.path, policy_text=pin_roster_text(text, roster, authority), overwrite=True)
        ds = next((d for d in home.policy().datasets if d.contract == contract.name), None)
        if ds is not None and contract.version not in ds.contract_files:  # a kept policy: pin this version too
            from fedgov.node.policy import pin_contract_text

            text = pin_contract_text(home.policy_path.read_text("utf-8"), dataset=ds.name, version=contract.version,
                                     path=pinned[0], sha256=pinned[1])
            NodeHome.create(home.path, policy_text=text, overwrite=True)
        if existed:
            differs = _kept_differs(home.policy(), wanted)
            if differs:
                kept[n.code] = differs
    if kept:
        shown = ", ".join(f"{code}: {' '.join(d)}" for code, d in list(kept.items())[:3])
        emit({
            "event": "warning",
            "message": f"{len(kept)} node(s) keep the policy they have in {state_dir} (--state-dir), which differs from "
            f"[node_policy] and the command line ({shown}"
            f"{' ...' if len(kept) > 3 else ''}): a kept policy is its operator's; edit it, or remove its node directory",
        })
    _warn_small(nodes, homes, task, set(found), emit)
    manifest = run_dir / "manifest.json"
    write_manifest(nodes, manifest)
    emit({"event": "partitioned", "nodes": [n.model_dump(mode="json") for n in nodes]})
    return nodes, manifest


def run_simulation(
    task_path: Path,
    federation_path: Path | None = None,
    options: SimulationOptions = SimulationOptions(),
    on_event: EventCallback | None = None,
) -> Path:
    """Run ``task_path`` on the simulated federation; return the run directory."""
    emit = on_event or (lambda e: None)
    task, contract = load_task(task_path)
    fed_path = federation_path or task.federation
    if fed_path is None:
        raise ConfigError(
            f"No federation for task {task_path}",
            [Problem(str(task_path), "federation", "name a federation in the task file or with --federation")],
        )
    federation = load_federation(fed_path)
    if len(federation.members) < task.training.min_nodes:
        raise ConfigError(
            "Federation too small for the task",
            [Problem(str(fed_path), "members", f"{len(federation.members)} members, the task needs at least {task.training.min_nodes} (training.min_nodes)")],
        )

    if not task.privacy.enabled:
        msg = (
            f"task {task.name}: privacy.enabled = false: nodes train WITHOUT differential privacy. "
            "Use this only for comparisons on data that is not personal."
        )
        log.warning(msg)
        emit({"event": "warning", "message": msg})
    if task.privacy.enabled and task.privacy.reproducible_noise:
        msg = (
            f"task {task.name}: privacy.reproducible_noise = true: each node's DP noise is derived from "
            "the task seed, so whoever knows the seed can remove it. For tests and simulations only."
        )
        log.warning(msg)
        emit({"event": "warning", "message": msg})
    run_dir = new_run_dir(options.runs_dir, task.name).resolve()
    nodes, manifest = prepare_nodes(run_dir, federation, contract, options, emit, max_epsilon=task.privacy.target_epsilon, task=task)

    values: dict[str, str | bool | int | float] = {
        "task-path": str(Path(task_path).resolve()),
        "federation-path": str(Path(fed_path).resolve()),
        "manifest-path": str(manifest),
        "run-dir": str(run_dir),
        "local-baseline": options.local_baseline,
    }
    return _finish(run_dir, len(nodes), values, options, emit)


def resume_simulation(run_dir: Path, options: SimulationOptions = SimulationOptions(), on_event: EventCallback | None = None) -> Path:
    """Continue the simulated training run in ``run_dir`` from its last checkpoint
    (``fedgov run --resume``): same node directories and ledgers, the remaining rounds."""
    from fedgov.coordinator.checkpoint import load_checkpoint
    from fedgov.data import read_manifest

    emit = on_event or (lambda e: None)
    run_dir = Path(run_dir).resolve()
    ckpt, _ = load_checkpoint(run_dir)
    manifest = run_dir / "manifest.json"
    if ckpt.mode != "simulation" or not manifest.is_file():
        raise ConfigError(
            f"{run_dir} is not a simulated run", [Problem(str(manifest), "", "the manifest of a run made by fedgov run (deployment: fedgov task resume)")]
        )
    if ckpt.round >= ckpt.rounds_planned:
        raise FederationError(f"the run in {run_dir} completed all {ckpt.rounds_planned} rounds; there is nothing to resume")
    load_task(Path(ckpt.task_file))  # a task file that no longer loads is reported here, with its location
    nodes = read_manifest(manifest)
    emit({"event": "run-dir", "path": str(run_dir)})
    shutil.rmtree(run_dir / ".flower", ignore_errors=True)
    values: dict[str, str | bool | int | float] = {
        "task-path": ckpt.task_file,
        "federation-path": ckpt.federation,
        "manifest-path": str(manifest),
        "run-dir": str(run_dir),
        "local-baseline": options.local_baseline,
        "resume": True,
    }
    return _finish(run_dir, len(nodes), values, options, emit)


def _add_data_check(run_dir: Path, report: Any) -> bool:
    """What the simulation's own check found in the data of members whose node refused it
    (``data-check.json``: file, column and kind, no value), into their report lines."""
    path = run_dir / "data-check.json"
    if not path.is_file():
        return False
    found = json.loads(path.read_text("utf-8"))
    changed = False
    for n in report.nodes:
        if n.node in found and n.status != "accepted":
            f = found[n.node]
            n.detail = f"simulation's check of {', '.join(f['files'])}: {'; '.join(f['problems'])}"
            changed = True
    return changed


def _finish(
    run_dir: Path, n_nodes: int, values: dict[str, str | bool | int | float], options: SimulationOptions, emit: EventCallback
) -> Path:
    """Run the simulation and check, complete and plot its report."""
    started = time.time()
    simulate(run_dir, n_nodes=n_nodes, run_config_values=values, options=options, emit=emit)
    logs = run_dir / "logs"

    report_path = run_dir / "report.json"
    if not report_path.is_file():
        hint = ""
        if (run_dir / "checkpoint" / "state.json").is_file():
            hint = f"\nThe rounds completed so far are saved: continue with  fedgov run --resume {run_dir}"
        err = FederationError(
            f"the run ended without a report; see {logs / 'flower.log'}:\n"
            + "\n".join((logs / "flower.log").read_text("utf-8", errors="replace").splitlines()[-25:])
            + hint
        )
        err.run_dir = run_dir
        raise err
    report = load_report(report_path)
    if _add_data_check(run_dir, report):
        write_json_atomic(report_path, report.model_dump_json(indent=2))
    if report.status != "completed":
        err = FederationError(f"the run failed: {report.message} (report: {report_path})")
        err.run_dir = run_dir
        raise err

    report.wall_seconds = time.time() - started
    plot = plot_report(report, run_dir / "accuracy.png")
    report.artifacts["plot"] = plot.name
    write_json_atomic(report_path, report.model_dump_json(indent=2))
    emit({"event": "done", "report": str(report_path)})
    return run_dir
