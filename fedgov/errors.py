"""fedgov's exceptions and the exit codes of its commands: the whole tree in one module.

Every error fedgov raises on purpose derives from :class:`FedgovError`, so that the CLI (one
handler, :func:`fedgov.cli.console.run_command`) turns it into a clear message and its
documented exit code (:class:`ExitCode`, :data:`EXIT_HELP`) instead of a traceback::

    FedgovError                      exit code
    ├── ConfigError                  10  a task, federation, contract, policy or query file is malformed
    │   └── RosterError              10  a roster is unsigned, signed by another authority, malformed
    ├── DataFileError                11  a data file cannot be read at all (missing, empty, not CSV/Parquet)
    ├── DataValidationError          12  a data file does not conform to its data contract
    │   └── DataNotConforming        12  a node's recorded data check says its data set does not conform
    ├── ModelError                   13  a model is unknown, or Opacus rejects it and it cannot be fixed
    ├── PrivacyError                 14  a privacy target cannot be met (no noise multiplier reaches it)
    │   └── LedgerError              14  the privacy ledger refuses an operation; nothing was recorded
    │       └── BudgetExceeded       14  a reservation would overspend a data set's budget
    ├── FederationError              20  the federation cannot run (too few nodes, a failed Flower process),
    │                                    or a report shows a failed or unfinished run (fedgov report)
    │   (no exception)               21  a completed run whose global model does not beat guessing (NOT_LEARNED)
    ├── ReportError                  10  a run's report file is missing, not JSON, or not a fedgov report
    ├── LedgerCorrupted              31  the ledger file is not fedgov's, or SQLite reports it damaged
    ├── AuditError                    1  the audit log refuses an entry (payload too large, not JSON)
    │   └── AuditCorrupted           31  the file is not a fedgov audit log, or SQLite reports it damaged
    ├── NodeStateError               31  the node state file is corrupted, locked or foreign
    │   ├── NodeStateRequestError     2  a request on the node state is wrong (a bad task summary)
    │   │   ├── UnknownTask           2  a task id that is not in the approval queue
    │   │   └── TaskChanged           2  a queued task id with a different summary
    │   └── RevealConflict            1  secure aggregation: a reveal the node must refuse
    ├── SecAggError                   1  a secure-aggregation step that must not go on (also a RuntimeError)
    │   └── NoRoster                  1  the node's policy pins no federation roster: no secure aggregation
    ├── ShareError                    1  Shamir shares that do not combine (also a ValueError)
    ├── SecureLayoutError             1  a node's secure release has not the query's layout (also a ValueError)
    ├── RefusalTextError              1  a refusal text that is not one of the templates (also a ValueError)
    └── NodeError                     1  what a node's ClientApp returns when a handler fails (also a RuntimeError)

Errors that also derive from a built-in (``ValueError``, ``RuntimeError``) keep it so that
code catching the built-in still works. ``fedgov.testing.CoordinatorCrash`` is a
``BaseException`` on purpose: it simulates a dead process and must not be caught as an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedgov.node.budget import BudgetStatus
    from fedgov.privacy.events import Mechanism

__all__ = [
    "EXIT_HELP",
    "AuditCorrupted",
    "AuditError",
    "BudgetExceeded",
    "ConfigError",
    "DataFileError",
    "DataNotConforming",
    "DataValidationError",
    "ExitCode",
    "FederationError",
    "FedgovError",
    "LedgerCorrupted",
    "LedgerError",
    "ModelError",
    "NoRoster",
    "NodeError",
    "NodeStateError",
    "NodeStateRequestError",
    "PrivacyError",
    "Problem",
    "RefusalTextError",
    "ReportError",
    "RevealConflict",
    "RosterError",
    "SecAggError",
    "SecureLayoutError",
    "ShareError",
    "TaskChanged",
    "UnknownTask",
]


class ExitCode(IntEnum):
    """Exit codes of the ``fedgov`` commands. Each has a help text in :data:`EXIT_HELP`."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 10
    DATA_FILE = 11
    DATA_VALIDATION = 12
    MODEL = 13
    PRIVACY = 14
    FEDERATION = 20
    NOT_LEARNED = 21
    AUDIT_TAMPERED = 30
    STATE_CORRUPTED = 31
    INTERRUPTED = 130


EXIT_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success.",
    ExitCode.INTERNAL: "An unexpected internal error; the message says where. Please report it.",
    ExitCode.USAGE: "The command line was wrong (unknown option, missing argument).",
    ExitCode.CONFIG: "A configuration file (task, federation, contract) is malformed; "
    "every problem is listed with its file and field.",
    ExitCode.DATA_FILE: "A data file could not be read: missing, empty, or not CSV/Parquet.",
    ExitCode.DATA_VALIDATION: "A data file does not conform to its data contract; "
    "every violation is listed with row, column, found and expected value.",
    ExitCode.MODEL: "The model is unknown, or Opacus rejects it and it cannot be fixed.",
    ExitCode.PRIVACY: "The privacy target cannot be met with the task's settings.",
    ExitCode.FEDERATION: "The federation could not run: too few nodes accepted, "
    "or a Flower process failed; also what `fedgov report` ends in for a run (training or query) "
    "that failed or never finished.",
    ExitCode.NOT_LEARNED: "The run completed, but the global model does not beat guessing (the majority rate, or an AUC "
    "of 0.5 for an imbalanced binary target) by more than the noise of its test set; the summary and the report "
    "('learning') say what to try: more rounds or local epochs, a larger epsilon, other features.",
    ExitCode.AUDIT_TAMPERED: "The node's audit log failed verification: an entry was changed, "
    "removed or reordered; the message names the first bad entry.",
    ExitCode.STATE_CORRUPTED: "A node database (ledger, audit log, node state) is corrupted or is not "
    "fedgov's; nothing was changed. Move it aside and restore it from a backup.",
    ExitCode.INTERRUPTED: "Interrupted by the user (Ctrl-C); managed processes were stopped.",
}


@dataclass(frozen=True)
class Problem:
    """One problem in a file: where (file and location inside it) and what."""

    file: str
    location: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.location}" if self.location else self.file
        return f"{where}: {self.message}"


class FedgovError(Exception):
    """Base class of every error fedgov raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class _ProblemsError(FedgovError):
    """An error that carries a list of problems, all reported at once."""

    def __init__(self, summary: str, problems: list[Problem] | None = None) -> None:
        self.summary = summary
        self.problems = list(problems or [])
        lines = [summary] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ConfigError(_ProblemsError):
    """A configuration file is malformed. ``problems`` lists every error with its location."""

    exit_code = ExitCode.CONFIG


class DataFileError(FedgovError):
    """A data file cannot be read at all."""

    exit_code = ExitCode.DATA_FILE


class DataValidationError(_ProblemsError):
    """A data file violates its contract. ``problems`` lists the violations (row, column)."""

    exit_code = ExitCode.DATA_VALIDATION


class DataNotConforming(DataValidationError):
    """The node's data set does not conform to the contract (the details are in its report)."""


class ModelError(FedgovError):
    """A model is unknown or cannot be made private."""

    exit_code = ExitCode.MODEL


class PrivacyError(FedgovError):
    """A privacy target cannot be met."""

    exit_code = ExitCode.PRIVACY


class FederationError(FedgovError):
    """The federation cannot run or a Flower process failed.

    ``run_dir`` is the run directory the failed run left (its logs and report), when a
    launcher knows it: the CLI points the user there.
    """

    exit_code = ExitCode.FEDERATION
    run_dir: Path | None = None


class ReportError(_ProblemsError):
    """A run's report file is missing, not JSON, or not a fedgov report. ``problems`` lists the
    fields at fault when the file is JSON of another shape."""

    exit_code = ExitCode.CONFIG


class LedgerError(PrivacyError):
    """The privacy ledger refuses an operation; nothing was recorded."""

    exit_code = ExitCode.PRIVACY


class BudgetExceeded(LedgerError):
    """A reservation would take a data set beyond its privacy budget; nothing was recorded.

    ``status`` is the data set's balance without the refused task; ``requested`` its
    mechanism; ``task_epsilon`` the task's epsilon alone; ``epsilon_after`` the composed
    epsilon had it been accepted (``inf`` when the delta budget is what ran out).
    """

    exit_code = ExitCode.PRIVACY

    def __init__(
        self,
        message: str,
        *,
        status: BudgetStatus,
        requested: Mechanism,
        task_epsilon: float,
        epsilon_after: float,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.requested = requested
        self.task_epsilon = task_epsilon
        self.epsilon_after = epsilon_after


class LedgerCorrupted(FedgovError):
    """The ledger file is not a fedgov privacy ledger, or SQLite reports it damaged.

    Never delete the file to continue: that would hand back every epsilon spent. Restore it
    from a backup.
    """

    exit_code = ExitCode.STATE_CORRUPTED

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path}: {reason}. The privacy ledger was not changed; restore it from a backup "
            "(deleting it would hand back all privacy budget spent)"
        )
        self.path = path
        self.reason = reason


class NodeStateError(FedgovError):
    """The node state file cannot be used: corrupted, locked, or another application's. Nothing
    was changed."""

    exit_code = ExitCode.STATE_CORRUPTED


class NodeStateRequestError(NodeStateError):
    """A request on the node state is wrong (a bad task summary, an empty task id); the file is fine."""

    exit_code = ExitCode.USAGE


class RevealConflict(NodeStateError):
    """Secure aggregation: revealing this would give the coordinator both secrets of one peer,
    or sign a second survivor list for one round."""

    exit_code = ExitCode.INTERNAL


class UnknownTask(NodeStateRequestError):
    """A task id that is not in the approval queue."""


class TaskChanged(NodeStateRequestError):
    """A task id already queued with a different summary: the same id must mean the same task."""


class AuditError(FedgovError):
    """The audit log refuses an entry; nothing was written."""

    exit_code = ExitCode.INTERNAL


class AuditCorrupted(AuditError):
    """The file is not a fedgov audit log, or SQLite reports it damaged. It was not changed."""

    exit_code = ExitCode.STATE_CORRUPTED

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}. The audit log was not changed; restore it from a backup")
        self.path = path
        self.reason = reason


class RefusalTextError(FedgovError, ValueError):
    """A refusal text that is not one of the templates (or a placeholder with a bad value)."""


class SecAggError(FedgovError, RuntimeError):
    """A protocol step that must not go on (a node refuses, too few survivors, bad shares)."""


class NoRoster(SecAggError):
    """This node's policy pins no federation roster: it takes no part in secure aggregation."""


class RosterError(ConfigError):
    """A roster that cannot be used: unsigned, signed by another authority, malformed."""

    def __init__(self, message: str, where: str = "roster") -> None:
        super().__init__(message, [Problem(where, "", message)])


class ShareError(FedgovError, ValueError):
    """Shares that do not combine; ``position`` is the secret's position in the batch."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


class SecureLayoutError(FedgovError, ValueError):
    """A node's release does not have the layout the query fixes."""


class NodeError(FedgovError, RuntimeError):
    """What goes back to the coordinator when a handler fails: a text without data values."""

