"""fedgov's typed configuration, loaded from TOML files (``configs/``)."""

from fedgov.config.contract import Column, ColumnType, Contract, load_contract
from fedgov.config.federation import Federation, Member, PartitionSpec, load_federation
from fedgov.config.task import (
    EvaluationSpec,
    ModelSpec,
    PrivacySpec,
    Task,
    TrainingSpec,
    load_task,
)

__all__ = [
    "Column",
    "ColumnType",
    "Contract",
    "EvaluationSpec",
    "Federation",
    "Member",
    "ModelSpec",
    "PartitionSpec",
    "PrivacySpec",
    "Task",
    "TrainingSpec",
    "load_contract",
    "load_federation",
    "load_task",
]
