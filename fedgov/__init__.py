"""fedgov: privacy-preserving federated learning for government agencies.

Each municipality keeps its data and its decisions; all of them learn jointly; differential
privacy bounds what can be read out of what leaves a node. The public API:
"""

from fedgov.config import Contract, Federation, Task, load_contract, load_federation, load_task
from fedgov.errors import (
    ConfigError,
    DataFileError,
    DataValidationError,
    ExitCode,
    FederationError,
    FedgovError,
    ModelError,
    PrivacyError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Contract",
    "DataFileError",
    "DataValidationError",
    "ExitCode",
    "Federation",
    "FederationError",
    "FedgovError",
    "ModelError",
    "PrivacyError",
    "Task",
    "__version__",
    "load_contract",
    "load_federation",
    "load_task",
]
