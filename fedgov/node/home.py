"""A node directory: everything a municipality's node keeps, in one place it owns.

::

    <node-dir>/
      node-key, node-key.pub   the node's key pair (OpenSSH ECDSA P-384, as Flower's SuperNode
                               authentication requires); the private key never leaves the node
      identity-key, identity-key.pub   the node's Ed25519 identity (mode 0600): it signs the node's
                               secure-aggregation keys; its fingerprint goes into the federation
                               roster ('fedgov roster add')
      policy.toml        what the node takes part in, its limits and budgets (the operator edits it)
      contracts/         the data contracts the node holds, pinned by SHA-256 in policy.toml
      reports/           data-check and error reports (mode 0600: they may quote data values)
      ledger.sqlite      the privacy-budget ledger (immutable events)
      audit.sqlite       the hash-chained audit log (+ audit.sqlite.head, the anchor)
      nodestate.sqlite   the pause switch and the manual-approval queue

The same layout serves a simulated node (under ``--state-dir``) and a deployed one.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal, cast

from fedgov.config import Contract
from fedgov.node.audit import AuditLog
from fedgov.node.budget import Budget
from fedgov.node.ledger import PrivacyLedger
from fedgov.node.policy import DatasetSpec, NodePolicy, load_policy
from fedgov.node.state import NodeState, PendingTask

__all__ = ["NodeHome", "budget_of", "init_node"]


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

    # --- the operator's decisions: one place for the command line and the console ----------
    # Each changes the node state and records who did it in the audit log, in that order; a
    # decision that changes nothing (the same one by the same person again) records nothing.

    def approve(self, task_id: str, *, by: str) -> PendingTask:
        """Approve a queued task (:class:`~fedgov.errors.UnknownTask` if it is not queued)."""
        p, changed = self.state.decide(task_id, "approved", by=by)
        if changed:
            self.audit.append("approved", task_id=task_id, payload={"by": p.decided_by, "summary": p.summary})
        return p

    def reject(self, task_id: str, reason: str, *, by: str) -> PendingTask:
        """Reject a queued task, saying why."""
        p, changed = self.state.decide(task_id, "rejected", by=by, reason=reason)
        if changed:
            self.audit.append("rejected", task_id=task_id, payload={"reason": reason, "by": by})
        return p

    def pause(self, reason: str, *, by: str) -> None:
        """Stop taking part from the next message on."""
        self.state.pause(reason)
        self.audit.append("paused", payload={"reason": reason, "by": by})

    def resume(self, *, by: str) -> None:
        """Take part again."""
        self.state.resume()
        self.audit.append("resumed", payload={"by": by})

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


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def init_node(
    path: Path | str,
    *,
    node: str,
    contract: Contract,
    data: Path,
    name: str | None = None,
    test_data: Path | None = None,
    budget_epsilon: float = 10.0,
    approval: str = "manual",
    contract_path: Path | None = None,
) -> NodeHome:
    """Create a node directory: key pair, policy (for one data set), ledger and audit log.

    The contract is copied into the node directory (``contracts/``: the bytes of
    ``contract_path``, or else its canonical JSON) and pinned by SHA-256 in the policy: the
    node serves its data only under the contracts it holds itself.

    Refuses a directory that already holds a policy or a key: a node's ledger and keys are
    never overwritten. The new policy starts in ``manual`` approval unless told otherwise.
    ``name``: the organisation's name as reports show it (none: the CBS name of a GM code).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedgov.errors import ConfigError, Problem
    from fedgov.node.policy import default_policy_text

    home = NodeHome(path)
    key_path = home.path / "node-key"
    for existing in (home.policy_path, key_path):
        if existing.exists():
            raise ConfigError(
                f"{home.path} is already a node directory",
                [Problem(str(existing), "", "exists; fedgov never overwrites a node's policy, keys or ledger")],
            )
    home.path.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (home.path / "node-key.pub").write_bytes(public + f" {node}\n".encode())
    from fedgov.privacy.roster import ensure_identity, fingerprint as identity_fingerprint

    identity = ensure_identity(home.path, node)
    from fedgov.node.contracts import pin_new_contract

    pinned = pin_new_contract(home.path, contract, contract_path)
    text = default_policy_text(
        node, name=name, dataset=contract.name, contract=contract.name, version=contract.version,
        path=data.resolve(), test_path=test_data.resolve() if test_data else None,
        budget_epsilon=budget_epsilon, approval=cast(Literal["auto", "manual", "deny"], approval),  # the policy checks it
        kinds=("training", "statistics"), contract_files={contract.version: pinned},
    )
    NodeHome.create(home.path, policy_text=text)
    home.policy()  # the policy written must load
    import hashlib

    fingerprint = hashlib.sha256(public).hexdigest()[:16]
    home.audit.append("initialized", payload={"node": node, "public_key_sha256": fingerprint, "contract": contract.ref,
                                              "identity_key_sha256": identity_fingerprint(identity)})
    return home
