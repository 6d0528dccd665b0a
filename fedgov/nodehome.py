"""A node directory: everything a municipality's node keeps, in one place it owns.

::

    <node-dir>/
      policy.toml        what the node takes part in, its limits and budgets (the operator edits it)
      ledger.sqlite      the privacy-budget ledger (immutable events)
      audit.sqlite       the hash-chained audit log (+ audit.sqlite.head, the anchor)
      nodestate.sqlite   the pause switch and the manual-approval queue

The same layout serves a simulated node (under ``--state-dir``) and a deployed one.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from fedgov.audit import AuditLog
from fedgov.ledger import Budget, PrivacyLedger
from fedgov.nodestate import NodeState
from fedgov.policy import DatasetSpec, NodePolicy, load_policy

__all__ = ["NodeHome", "budget_of"]


def budget_of(ds: DatasetSpec) -> Budget:
    """The ledger's view of a data set's budget in the policy."""
    return Budget(epsilon=ds.budget.epsilon, delta=ds.budget.delta, period=ds.budget.period)


class NodeHome:
    POLICY = "policy.toml"
    LEDGER = "ledger.sqlite"
    AUDIT = "audit.sqlite"
    STATE = "nodestate.sqlite"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()

    @property
    def policy_path(self) -> Path:
        return self.path / self.POLICY

    def exists(self) -> bool:
        return self.policy_path.is_file()

    def policy(self) -> NodePolicy:
        """The policy as the file says now: an operator's edit applies to the next task."""
        return load_policy(self.policy_path)

    @cached_property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.path / self.LEDGER)

    @cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.path / self.AUDIT)

    @cached_property
    def state(self) -> NodeState:
        return NodeState(self.path / self.STATE)

    @classmethod
    def create(cls, path: Path | str, *, policy_text: str, overwrite: bool = False) -> NodeHome:
        """Create the directory and its policy (kept if present unless ``overwrite``)."""
        home = cls(path)
        home.path.mkdir(parents=True, exist_ok=True)
        if overwrite or not home.policy_path.exists():
            tmp = home.policy_path.with_suffix(".toml.tmp")
            tmp.write_text(policy_text, encoding="utf-8")
            tmp.replace(home.policy_path)
        return home
