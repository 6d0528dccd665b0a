"""Bad input wherever a user hands it, fuzzed with hypothesis: every case ends in a fedgov error
that names the file (and field or row), with a documented exit code; nothing else escapes.

Config files: a shipped task, federation, contract, policy or query file with one line deleted,
one value replaced by something of the wrong type or range, or a stray line inserted. Data
files: a slice of the Adult test set with a header only, another delimiter, extra or renamed
columns, random bytes in a row, non-UTF-8 bytes, huge or non-finite numbers, duplicated rows,
or nothing at all.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgov.analytics import load_query
from fedgov.config import load_contract, load_federation, load_task
from fedgov.data import read_table, validate_frame
from fedgov.errors import EXIT_HELP, ExitCode, FedgovError
from fedgov.node.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
CONFIGS: dict[str, tuple[Path, Callable[[Path], Any]]] = {
    "task": (ROOT / "configs" / "tasks" / "adult-income.toml", load_task),
    "federation": (ROOT / "configs" / "federations" / "demo-12.toml", load_federation),
    "contract": (ROOT / "configs" / "contracts" / "adult-income.toml", load_contract),
    "policy": (ROOT / "configs" / "policies" / "GM0363.toml", load_policy),
    "query": (ROOT / "configs" / "queries" / "wmo-monitor.toml", load_query),
}
VALUES = ['""', "-1", "0", "1e309", "nan", "inf", "-inf", "true", "[]", "{}", '"x"', '[1, "a"]',
          "99999999999999999999999", '"../../../etc/passwd"', "{ a = 1 }", '"\\u0000"', "1979-05-27"]
STRAY = ["[x]", "junk", "a = 1", "[[measures]]", "= 3", "name = 5", "[[members]]", "[privacy]\nepsilon = -1"]
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _assert_clean(exc: FedgovError, path: Path) -> None:
    text = str(exc) + " " + " ".join(str(p) for p in getattr(exc, "problems", []))
    assert str(path) in text, text[:400]
    assert exc.exit_code in EXIT_HELP and exc.exit_code != ExitCode.INTERNAL


@FUZZ
@given(kind=st.sampled_from(sorted(CONFIGS)), op=st.sampled_from(["delete", "replace", "insert"]),
       line=st.integers(min_value=0, max_value=10_000), value=st.sampled_from(VALUES), stray=st.sampled_from(STRAY))
def test_a_damaged_config_file_is_a_config_error_naming_it(tmp_path: Path, kind: str, op: str, line: int, value: str, stray: str) -> None:
    src, loader = CONFIGS[kind]
    lines = src.read_text("utf-8").splitlines()
    keyed = [i for i, ln in enumerate(lines) if "=" in ln and not ln.lstrip().startswith("#")]
    i = keyed[line % len(keyed)]
    if op == "delete":
        del lines[i]
    elif op == "replace":
        lines[i] = f"{lines[i].split('=')[0]}= {value}"
    else:
        lines.insert(i, stray)
    # Beside the original, so that relative paths to contracts and data still resolve.
    path = src.parent / f"_fuzz_{kind}_{tmp_path.name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        loader(path)  # some edits leave a valid file: that is fine
    except FedgovError as exc:
        _assert_clean(exc, path)
    finally:
        path.unlink(missing_ok=True)


ADULT = (ROOT / "data" / "adult" / "adult_test.csv").read_bytes().splitlines()[:25]
CELLS = [b"1e400", b"-1e400", b"nan", b"inf", b"", b"9" * 60, b'"', b'a"b', b"0x10", b" 39 ", b"\xff\xfe", b"-0", b"39.5"]


@FUZZ
@given(op=st.integers(min_value=0, max_value=9), row=st.integers(min_value=1, max_value=24),
       col=st.integers(min_value=0, max_value=14), cell=st.sampled_from(CELLS), noise=st.binary(min_size=1, max_size=40))
def test_a_damaged_data_file_is_a_data_error_naming_it(tmp_path: Path, op: int, row: int, col: int, cell: bytes, noise: bytes) -> None:
    from fedgov.config import load_contract as lc

    contract = lc(ROOT / "configs" / "contracts" / "adult-income.toml")
    lines = list(ADULT)
    if op == 0:
        lines = [lines[0]]  # a header only
    elif op == 1:
        lines = [ln.replace(b",", b";") for ln in lines]  # another delimiter
    elif op == 2:
        lines[row] += b",extra"
    elif op == 3:
        lines[0] = lines[0].replace(b"age", b"agee")  # a renamed column
    elif op == 4:
        lines[row] = noise
    elif op == 5:
        lines[0] = b"\xff\xfe" + lines[0]  # not UTF-8
    elif op == 6:
        cells = lines[row].split(b",")
        cells[col % len(cells)] = cell
        lines[row] = b",".join(cells)
    elif op == 7:
        lines = lines + lines[1:]  # duplicated rows: valid for a contract without person ids
    elif op == 8:
        lines = [b""]
    else:
        lines[0] = b",".join(lines[0].split(b",")[:-1])  # a missing column
    path = tmp_path / "export.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        validate_frame(read_table(path), contract, file=str(path))
    except FedgovError as exc:
        _assert_clean(exc, path)
        assert exc.exit_code in (ExitCode.DATA_FILE, ExitCode.DATA_VALIDATION)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_missing_or_unreadable_config_names_the_file(tmp_path: Path, kind: str) -> None:
    _, loader = CONFIGS[kind]
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(FedgovError) as info:
        loader(missing)
    _assert_clean(info.value, missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x00\xff\xfe garbage = = =")
    with pytest.raises(FedgovError) as info:
        loader(binary)
    _assert_clean(info.value, binary)


def test_a_task_naming_a_missing_contract_names_the_task_and_field(tmp_path: Path) -> None:
    src = ROOT / "configs" / "tasks" / "adult-income.toml"
    task = tmp_path / "task.toml"
    shutil.copy(src, task)
    task.write_text(task.read_text().replace('contract = "../contracts/adult-income.toml"', 'contract = "nowhere.toml"'))
    with pytest.raises(FedgovError) as info:
        load_task(task)
    text = str(info.value) + " ".join(str(p) for p in info.value.problems)
    assert str(task) in text and "'contract'" in text and "nowhere.toml" in text
