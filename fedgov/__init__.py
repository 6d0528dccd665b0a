"""fedgov: privacy-preserving federated learning for government agencies.

Each municipality keeps its data and its decisions; all of them learn jointly; differential
privacy bounds what can be read out of what leaves a node. The public API: the configuration
loaders and their typed models, and the errors with the exit codes they map to (the tree is in
:mod:`fedgov.errors`). The command line is :mod:`fedgov.cli`; the roles have packages of their
own (:mod:`fedgov.node`, :mod:`fedgov.coordinator`, :mod:`fedgov.privacy`, :mod:`fedgov.launch`,
:mod:`fedgov.deploy`).
"""

from fedgov.config import Contract, Federation, Task, load_contract, load_federation, load_task
from fedgov.errors import (
    EXIT_HELP,
    AuditCorrupted,
    AuditError,
    BudgetExceeded,
    ConfigError,
    DataFileError,
    DataNotConforming,
    DataValidationError,
    ExitCode,
    FederationError,
    FedgovError,
    LedgerCorrupted,
    LedgerError,
    ModelError,
    NodeError,
    NoRoster,
    NodeStateError,
    NodeStateRequestError,
    PrivacyError,
    Problem,
    RefusalTextError,
    ReportError,
    RevealConflict,
    RosterError,
    SecAggError,
    SecureLayoutError,
    ShareError,
    TaskChanged,
    UnknownTask,
)

__version__ = "0.1.0"

__all__ = [
    # configuration
    "Contract",
    "Federation",
    "Task",
    "load_contract",
    "load_federation",
    "load_task",
    # errors and exit codes (fedgov.errors)
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
    "__version__",
]
