"""``flwr-clientapp`` for a fedgov node: Flower's own, with the app-bundle check in front.

A SuperNode (subprocess isolation) starts ``flower-superexec``, which starts one
``flwr-clientapp`` process per message, by name from ``PATH``. ``fedgov node start`` puts a
``flwr-clientapp`` of its own first on the SuperNode's ``PATH`` (:func:`write_shim`): a relay that
hands the task to the node's warm worker (:mod:`fedgov.deploy.worker`, which runs the same check
through :func:`check_pulled`). Without a worker it runs :func:`main`, which is Flower's
``flwr-clientapp`` except that, after the message and the
bundle are pulled and before the bundle is installed or imported, the bundle's hash is checked
against the node's policy (:func:`fedgov.deploy.trust.check_bundle`). An untrusted bundle is
never unpacked: the node writes ``app-refused`` to its audit log, and Flower's error path
sends the coordinator an error reply whose reason starts with ``app-not-trusted``.

The hook points (``pull_task_input`` and ``install_from_fab`` in
``flwr.supernode.runtime.run_clientapp``) are those of Flower 1.42, which fedgov pins;
:func:`install_hooks` fails loudly if they are missing rather than run unchecked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["SHIM_NAME", "UntrustedApp", "check_pulled", "identity_problem", "install_hooks", "main", "write_shim"]

SHIM_NAME = "flwr-clientapp"
log = logging.getLogger("fedgov.node")


class UntrustedApp(RuntimeError):
    """The coordinator sent an app bundle that this node's policy does not list."""


def _node_dir(context: Any) -> Path | None:
    nc = getattr(context, "node_config", {}) or {}
    if "node-dir" in nc:
        return Path(str(nc["node-dir"]))
    env = os.environ.get("FEDGOV_NODE_DIR")
    return Path(env) if env else None


def _task_id(message: Any) -> str | None:
    try:  # fedgov's own (installed) copy, imported only to label the refusal
        from fedgov.node.context import task_id

        return task_id(message)
    except Exception:  # noqa: BLE001 - a hello without a task, or a foreign bundle's message
        return None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def identity_problem(run: Any, fab_content: bytes) -> str | None:
    """Why the run's claimed bundle name and version do not match the bundle, or ``None``.

    Flower loads a ClientApp from ``<FLWR_HOME>/apps/<publisher>.<name>.<version>.<hash8>``
    with the publisher, name and version *the run claims* (``run.fab_id``, ``run.fab_version``,
    set by the coordinator), not those inside the bundle whose hash the policy checked. A
    coordinator could otherwise name a trusted bundle with a version such as ``1/../../x`` and
    have Flower import code from a directory of its choosing. So the claim must equal the
    bundle's own ``pyproject.toml``, and each part must be a plain name (no ``/``, no ``..``)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as z:
            cfg = tomllib.loads(z.read("pyproject.toml").decode("utf-8"))
        publisher = str(cfg["tool"]["flwr"]["app"]["publisher"])
        name, version = str(cfg["project"]["name"]), str(cfg["project"]["version"])
    except Exception:  # noqa: BLE001 - not a readable bundle: refuse, naming no content
        return "app-not-trusted: the app bundle has no readable pyproject.toml with a publisher, name and version"
    claimed_id, claimed_version = str(getattr(run, "fab_id", "")), str(getattr(run, "fab_version", ""))
    parts = [*claimed_id.split("/", 1), claimed_version] if claimed_id.count("/") == 1 else []
    if not parts or not all(_NAME.match(p) and ".." not in p for p in parts):
        return "app-not-trusted: the run names its app bundle with characters a bundle name or version cannot hold"
    if (claimed_id, claimed_version) != (f"{publisher}/{name}", version):
        return (
            f"app-not-trusted: the run names its app bundle {claimed_id[:80]} {claimed_version[:40]}, "
            f"but the bundle is {publisher}/{name} {version}"
        )
    return None


def check_pulled(message: Any, context: Any, run: Any, fab_content: bytes) -> None:
    """Refuse (audit and raise :class:`UntrustedApp`) unless the node's policy trusts the bundle
    and the run names it as it is (:func:`identity_problem`)."""
    from fedgov.deploy.trust import check_bundle
    from fedgov.node.home import NodeHome

    fab_hash = hashlib.sha256(fab_content).hexdigest()
    node_dir = _node_dir(context)
    if node_dir is None:
        raise UntrustedApp("app-not-trusted: this SuperNode has no fedgov node directory (node-dir), so no policy trusts any bundle")
    home = NodeHome(node_dir)
    try:
        policy = home.policy()
    except Exception as exc:  # noqa: BLE001 - fail closed: no readable policy, no code runs
        raise UntrustedApp(f"app-not-trusted: the node's policy could not be read ({type(exc).__name__}); no bundle is trusted") from None
    # fedgov node start computed its own bundle's hash once and handed it down (FEDGOV_APP_HASH).
    verdict = check_bundle(policy, fab_hash, local_hash=os.environ.get("FEDGOV_APP_HASH") or None)
    run_info = {
        "run_id": int(getattr(run, "run_id", 0) or 0),
        "fab_id": str(getattr(run, "fab_id", "")),
        "fab_version": str(getattr(run, "fab_version", "")),
        "fab_hash": fab_hash,
    }
    reason = verdict.reason if not verdict.trusted else identity_problem(run, fab_content)
    if reason:
        home.audit.append("app-refused", task_id=_task_id(message), payload={**run_info, "reason": reason})
        log.error("%s", reason)
        raise UntrustedApp(reason)
    if verdict.warning:
        home.audit.append("app-unchecked", task_id=_task_id(message), payload={**run_info, "warning": verdict.warning})
        log.warning("%s", verdict.warning)
        print(f"WARNING: {verdict.warning}", file=sys.stderr, flush=True)


def install_hooks() -> None:
    """Wrap Flower's ClientApp runner so that every bundle is checked before it is installed."""
    import flwr.supernode.runtime.run_clientapp as rc

    for name in ("pull_task_input", "install_from_fab", "run_clientapp"):
        if not callable(getattr(rc, name, None)):
            raise RuntimeError(
                f"flwr.supernode.runtime.run_clientapp.{name} is missing: this Flower is not the 1.42 that "
                "fedgov's bundle check is built on; refusing to run ClientApps unchecked"
            )
    # The hooks replace names in the namespace of Flower's module, where run_clientapp looks
    # them up at call time; install_from_fab is only imported there, not re-exported.
    namespace = vars(rc)
    if namespace.get("_fedgov_hooked", False):
        return
    pull, install = namespace["pull_task_input"], namespace["install_from_fab"]
    pulled: dict[str, Any] = {}

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        pulled.update(message=message, context=context, run=run)
        return message, context, run, fab

    def install_from_fab(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        check_pulled(pulled.get("message"), pulled.get("context"), pulled.get("run"), fab_content)
        return install(fab_content, *args, **kwargs)

    namespace["pull_task_input"] = pull_task_input
    namespace["install_from_fab"] = install_from_fab
    namespace["_fedgov_hooked"] = True


def write_shim(bindir: Path) -> Path:
    """Write ``bindir/flwr-clientapp``, the node's relay to its warm worker
    (:mod:`fedgov.deploy.relay`; it falls back to :func:`main` when no worker answers); return ``bindir``."""
    from fedgov.deploy import relay

    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / SHIM_NAME
    text = (
        "#!/bin/sh\n# fedgov: hand this ClientApp task to the node's warm worker (fedgov.deploy.relay);\n"
        "# without one, Flower's flwr-clientapp with the node's app-bundle check (fedgov.deploy.clientapp)\n"
        f'exec "{sys.executable}" -I -S "{Path(relay.__file__).resolve()}" "$@"\n'
    )
    tmp = shim.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)
    tmp.replace(shim)
    return bindir


def main() -> None:
    install_hooks()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


if __name__ == "__main__":
    main()
