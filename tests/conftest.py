"""Shared fixtures: paths into the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def adult_contract_path() -> Path:
    return ROOT / "configs" / "contracts" / "adult-income.toml"


@pytest.fixture(scope="session")
def demo_task_path() -> Path:
    return ROOT / "configs" / "tasks" / "adult-income.toml"
