"""The node's data caches (fedgov.node.contracts, fedgov.node.rounds): a file read once per
content, never one file's rows under another file's digest."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fedgov.config import load_contract
from fedgov.node import contracts as C

ROOT = Path(__file__).resolve().parents[2]


def _rows(n: int) -> pd.DataFrame:
    return pd.read_csv(ROOT / "data" / "adult" / "adult.csv", nrows=n)


def test_the_data_checks_frame_is_kept_only_for_the_file_it_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data check's validated frame is reused by the task's read of the same file; a file
    replaced while it was being read is not kept under the new file's digest (its rows would
    be trained on as if they were the new file's)."""
    contract = load_contract(ROOT / "configs" / "contracts" / "adult-income.toml")
    path = tmp_path / "train.csv"
    _rows(30).to_csv(path, index=False)
    ds = SimpleNamespace(name="d", path=path, test_path=None)
    check = C.check_dataset(ds, contract)  # type: ignore[arg-type]
    assert check.conforms
    kept = C.conforming_frame(path, contract)
    assert kept is not None and len(kept) == 30

    import fedgov.data as D

    real = D.read_table

    def read_then_replace(p: Path) -> pd.DataFrame:
        frame = real(p)
        _rows(300).to_csv(p, index=False)  # another export lands while the first is read
        return frame

    monkeypatch.setattr(D, "read_table", read_then_replace)
    _rows(31).to_csv(path, index=False)
    C.check_dataset(ds, contract)  # type: ignore[arg-type]
    assert C.conforming_frame(path, contract) is None  # the 300-row file was never checked here
