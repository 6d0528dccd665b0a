"""fedgov's typed configuration, loaded from TOML files (``configs/``).

* :mod:`~fedgov.config.task`, :mod:`~fedgov.config.federation`, :mod:`~fedgov.config.contract`:
  a task, a federation of municipalities and a data contract, each a frozen pydantic model
  with ``extra="forbid"``, loaded with every problem reported at once (file and field);
* :mod:`~fedgov.config.registry`: organisation registries, the CBS municipalities by default
  or a registry file a federation names; :mod:`~fedgov.config.municipalities`: the CBS
  municipality codes and names;
* the building blocks other configuration files use (a node's policy, a query): ``StrictModel``,
  ``ConfigPath`` and the loaders that collect problems.
"""

from fedgov.config._base import (
    ConfigPath,
    StrictModel,
    load_referenced,
    load_toml,
    problems_from_validation,
    validate_file,
)
from fedgov.config.contract import Column, ColumnType, Contract, load_contract
from fedgov.config.federation import Federation, Member, PartitionSpec, load_federation
from fedgov.config.municipalities import Municipality, all_municipalities, display_name, municipality
from fedgov.config.registry import Organisation, Registry, default_registry, load_registry
from fedgov.config.task import (
    MODEL_NAMES,
    EvaluationSpec,
    PersonalSpec,
    ModelSpec,
    PrivacySpec,
    Task,
    TrainingSpec,
    load_task,
)

__all__ = [
    "MODEL_NAMES",
    "Column",
    "ColumnType",
    "ConfigPath",
    "Contract",
    "EvaluationSpec",
    "PersonalSpec",
    "Federation",
    "Member",
    "ModelSpec",
    "Municipality",
    "Organisation",
    "PartitionSpec",
    "PrivacySpec",
    "Registry",
    "StrictModel",
    "Task",
    "TrainingSpec",
    "all_municipalities",
    "default_registry",
    "display_name",
    "load_contract",
    "load_federation",
    "load_registry",
    "load_referenced",
    "load_task",
    "load_toml",
    "municipality",
    "problems_from_validation",
    "validate_file",
]
