"""What every handler and mod of the node needs: the task of a message, the node's directory.

The one module of :mod:`fedgov.node` that reads Flower messages: the ClientApp's handlers and
mods (``clients/``) parse with it, and hand the parsed values to the rest of the package.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message

from fedgov import protocol as P
from fedgov.protocol import task_id_of
from fedgov.analytics import Query
from fedgov.config import Contract, Task
from fedgov.config.datasource import DataSource
from fedgov.errors import DataFileError
from fedgov.node.home import NodeHome

if TYPE_CHECKING:
    from fedgov.data import NodeData

__all__ = [
    "config_float",
    "config_int",
    "data_of",
    "kind_of",
    "node_of",
    "query_of",
    "task_id",
    "task_of",
]


@lru_cache(maxsize=16)
def _task(task_json: str, contract_json: str) -> tuple[Task, Contract]:
    return Task.model_validate_json(task_json), Contract.model_validate_json(contract_json)


def task_of(msg: Message) -> tuple[Task, Contract]:
    cfg = msg.content[P.CONFIG]
    return _task(str(cfg[P.TASK_JSON]), str(cfg[P.CONTRACT_JSON]))


def query_of(msg: Message) -> tuple[Query, Contract]:
    """The statistics query and its contract of a ``stats`` message."""
    cfg = msg.content[P.CONFIG]
    contract = Contract.model_validate_json(str(cfg[P.CONTRACT_JSON]))
    return Query.model_validate_json(str(cfg[P.QUERY_JSON])), contract


def task_id(msg: Message) -> str:
    """The ledger key of the task of ``msg``: its name, fingerprint and the Flower run it was
    admitted in (that of a resumed run's first part, when the coordinator resumes)."""
    task, contract = task_of(msg)
    cfg = msg.content[P.CONFIG]
    run = cfg.get(P.TASK_RUN) or msg.metadata.run_id
    if not str(run).isdigit():
        raise ValueError(f"{P.TASK_RUN} must be a Flower run id (digits), not {str(run)[:40]!r}")
    return task_id_of(task, contract, str(run))


def kind_of(msg: Message) -> str:
    """``hello``, ``baseline``, ``end`` (queries), ``train`` or ``evaluate``."""
    if msg.metadata.message_type.startswith("query"):
        if P.CONFIG not in msg.content:
            return P.HELLO
        return str(msg.content[P.CONFIG].get(P.KIND, P.HELLO))
    return msg.metadata.message_type.split(".")[0]


@lru_cache(maxsize=8)
def _manifest(path: str) -> list[NodeData]:
    from fedgov.data import read_manifest

    return read_manifest(Path(path))


def node_of(context: Context) -> tuple[str, NodeHome, bool]:
    """(node name, node directory, simulated?) for this SuperNode.

    Deployment: ``--node-config "node-name='GM0363' node-dir='/srv/fedgov/node'"``.
    Simulation: the run config's ``manifest-path`` lists the virtual nodes; ``partition-id``
    picks this one, whose directory is the one holding its data files.
    """
    nc = context.node_config
    if "node-dir" in nc:
        return str(nc.get("node-name", "node")), NodeHome(str(nc["node-dir"])), False
    manifest = str(context.run_config.get("manifest-path", "") or "")
    if not manifest:
        raise DataFileError("this node has no node directory: give --node-config node-dir=... (deployment)")
    entry = _manifest(manifest)[int(nc["partition-id"])]
    return entry.code, NodeHome(entry.train_path.parent), True


def data_of(home: NodeHome, contract: Contract) -> tuple[DataSource, DataSource | None]:
    """The node's data files (or SQL queries) for a contract, as its policy names them."""
    ds = home.policy().dataset_for(contract)
    if ds is None:
        raise DataFileError(f"the node's policy serves no data set under {contract.ref}")
    return ds.train_source, ds.test_source


def _number(cfg: ConfigRecord, key: str) -> int | float | str | bytes:
    value = cfg[key]
    if isinstance(value, list):
        raise TypeError(f"{key} holds a list, not a number")
    return value


def config_int(cfg: ConfigRecord, key: str) -> int:
    """``int(cfg[key])``: KeyError when it is missing, ValueError or TypeError when it is no number."""
    return int(_number(cfg, key))


def config_float(cfg: ConfigRecord, key: str) -> float:
    """``float(cfg[key])``: KeyError when it is missing, ValueError or TypeError when it is no number."""
    return float(_number(cfg, key))
