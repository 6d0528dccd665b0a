"""Deployment: a coordinator (SuperLink) and nodes (SuperNodes) as real processes, with TLS
and SuperNode authentication.

* :mod:`~fedgov.deploy.superlink`: a coordinator directory, its SuperLink and gateway;
* :mod:`~fedgov.deploy.gateway`: the TLS proxy that serves only the Fleet API
  (``python -m fedgov.deploy.gateway``);
* :mod:`~fedgov.deploy.supernode`: a node's SuperNode;
* :mod:`~fedgov.deploy.clientapp`: Flower's ``flwr-clientapp`` with the node's app-bundle check
  (``python -m fedgov.deploy.clientapp``); :mod:`~fedgov.deploy.trust`: that check;
* :mod:`~fedgov.deploy.submit` and :mod:`~fedgov.deploy.tasks`: runs at a coordinator;
* :mod:`~fedgov.deploy.pki`: a development PKI; :mod:`~fedgov.deploy.local`: a whole federation
  on this machine.

A name is imported from its module when first used (PEP 562): the two entry points above start
without importing the rest of the package (``flwr-clientapp`` starts once per message). Their
``main`` functions are reached through their modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedgov._lazy import lazy_exports

if TYPE_CHECKING:
    from fedgov.deploy.clientapp import (
        SHIM_NAME,
        UntrustedApp,
        check_pulled,
        install_hooks,
        write_shim,
    )
    from fedgov.deploy.gateway import (
        ALLOWED_EXACT,
        ALLOWED_PREFIXES,
        is_allowed_path,
        make_app,
        serve,
    )
    from fedgov.deploy.local import (
        STATE_FILE,
        local_federation_down,
        local_federation_up,
        read_state,
        restart_coordinator,
        start_local_node,
        stop_local_node,
    )
    from fedgov.deploy.pki import (
        Pki,
        create_dev_pki,
    )
    from fedgov.deploy.submit import (
        resume_task,
        run_at_coordinator,
        submit_query,
        submit_task,
    )
    from fedgov.deploy.superlink import (
        CONFIG_FILE,
        CONNECTION,
        Coordinator,
        CoordinatorConfig,
        admit,
        flwr_bin,
        gateway_args,
        init_coordinator,
        load_coordinator,
        nodes,
        run_flwr,
        start_coordinator,
        superlink_args,
        wait_healthy,
    )
    from fedgov.deploy.supernode import (
        check_before_start,
        node_args,
        node_env,
        start_node,
    )
    from fedgov.deploy.tasks import (
        RunInfo,
        list_runs,
        run_dirs,
        run_status,
        stop_run,
    )
    from fedgov.deploy.trust import (
        BundleVerdict,
        build_bundle,
        bundle_hash,
        check_bundle,
        local_bundle_hash,
    )

_EXPORTS: dict[str, tuple[str, ...]] = {
    "clientapp": (
        "SHIM_NAME", "UntrustedApp", "check_pulled", "install_hooks", "write_shim",
    ),
    "gateway": (
        "ALLOWED_EXACT", "ALLOWED_PREFIXES", "is_allowed_path", "make_app", "serve",
    ),
    "local": (
        "STATE_FILE", "local_federation_down", "local_federation_up", "read_state", "restart_coordinator",
        "start_local_node", "stop_local_node",
    ),
    "pki": (
        "Pki", "create_dev_pki",
    ),
    "submit": (
        "resume_task", "run_at_coordinator", "submit_query", "submit_task",
    ),
    "superlink": (
        "CONFIG_FILE", "CONNECTION", "Coordinator", "CoordinatorConfig", "admit", "flwr_bin", "gateway_args",
        "init_coordinator", "load_coordinator", "nodes", "run_flwr", "start_coordinator", "superlink_args",
        "wait_healthy",
    ),
    "supernode": (
        "check_before_start", "node_args", "node_env", "start_node",
    ),
    "tasks": (
        "RunInfo", "list_runs", "run_dirs", "run_status", "stop_run",
    ),
    "trust": (
        "BundleVerdict", "build_bundle", "bundle_hash", "check_bundle", "local_bundle_hash",
    ),
}
"""Each public name, by the module that defines it (read by :func:`__getattr__`)."""

__all__ = [
    "ALLOWED_EXACT",
    "ALLOWED_PREFIXES",
    "BundleVerdict",
    "CONFIG_FILE",
    "CONNECTION",
    "Coordinator",
    "CoordinatorConfig",
    "Pki",
    "RunInfo",
    "SHIM_NAME",
    "STATE_FILE",
    "UntrustedApp",
    "admit",
    "build_bundle",
    "bundle_hash",
    "check_before_start",
    "check_bundle",
    "check_pulled",
    "create_dev_pki",
    "flwr_bin",
    "gateway_args",
    "init_coordinator",
    "install_hooks",
    "is_allowed_path",
    "list_runs",
    "load_coordinator",
    "local_bundle_hash",
    "local_federation_down",
    "local_federation_up",
    "make_app",
    "node_args",
    "node_env",
    "nodes",
    "read_state",
    "restart_coordinator",
    "resume_task",
    "run_at_coordinator",
    "run_dirs",
    "run_flwr",
    "run_status",
    "serve",
    "start_coordinator",
    "start_local_node",
    "start_node",
    "stop_local_node",
    "stop_run",
    "submit_query",
    "submit_task",
    "superlink_args",
    "wait_healthy",
    "write_shim",
]

if not TYPE_CHECKING:  # type checkers read the imports above; a __getattr__ would hide typos from them
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
