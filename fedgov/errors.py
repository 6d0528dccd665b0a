"""fedgov's exceptions and the exit codes of its commands.

Every error fedgov raises on purpose derives from :class:`FedgovError`, so that the CLI can
turn it into a clear message and a documented exit code instead of a traceback::

    FedgovError
    ├── ConfigError          a task, federation, contract, policy or query file is malformed
    ├── DataValidationError  a data file does not conform to its data contract
    ├── DataFileError        a data file cannot be read at all (missing, empty, not CSV/Parquet)
    ├── ModelError           a model is unknown, or Opacus rejects it and it cannot be fixed
    ├── PrivacyError         a privacy target cannot be met (no noise multiplier reaches it)
    └── FederationError      the federation cannot run (too few nodes, a failed Flower process)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


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
    "or a Flower process failed.",
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


class ModelError(FedgovError):
    """A model is unknown or cannot be made private."""

    exit_code = ExitCode.MODEL


class PrivacyError(FedgovError):
    """A privacy target cannot be met."""

    exit_code = ExitCode.PRIVACY


class FederationError(FedgovError):
    """The federation cannot run or a Flower process failed."""

    exit_code = ExitCode.FEDERATION
