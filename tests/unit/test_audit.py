"""The hash-chained audit log: appends verify; every kind of tampering is found.

Tampering goes around the triggers (dropped first), straight into the SQLite file, as an
attacker with write access would: ``verify`` must not rely on the triggers.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import sqlite3
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.node.audit import (
    GENESIS_HASH,
    MAX_PAYLOAD_BYTES,
    AuditCorrupted,
    AuditError,
    AuditLog,
    canonical_json,
    entry_hash,
)
from fedgov.errors import FedgovError


def _log(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(1, n + 1):
        log.append("round", task_id="t1" if i % 2 else "t2", payload={"round": i, "loss": 1.0 / i, "shape": [30, 64]})
    return log


def _tamper(path: Path, *sql: str) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("DROP TRIGGER IF EXISTS entries_no_update")
        con.execute("DROP TRIGGER IF EXISTS entries_no_delete")
        for s in sql:
            con.execute(s)
        con.commit()
    finally:
        con.close()


def test_append_and_verify(tmp_path: Path) -> None:
    log = _log(tmp_path / "audit.db")
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert [e.seq for e in log.entries(task_id="t2")] == [2, 4]
    e = entries[2]
    assert e.hash == entry_hash(
        prev_hash=e.prev_hash, seq=3, time=e.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), kind="round", task_id="t1",
        payload=e.payload,
    )
    v = log.verify()
    assert v.ok and v.entries == 5 and v.first_bad_seq is None
    anchor = json.loads(Path(f"{tmp_path / 'audit.db'}.head").read_text())
    assert anchor == {"seq": 5, "hash": entries[-1].hash}
    assert log.head() == (5, entries[-1].hash)
    assert log.verify(expected_head=(3, entries[2].hash)).ok
    assert AuditLog(tmp_path / "audit.db").verify().ok  # reopening keeps it


def test_empty_log_verifies(tmp_path: Path) -> None:
    v = AuditLog(tmp_path / "audit.db").verify()
    assert v.ok and v.entries == 0


def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    _log(tmp_path / "audit.db")
    con = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE entries SET payload = '{}'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM entries WHERE seq = 5")
    con.close()


@pytest.mark.parametrize("seq", [1, 3, 5])
def test_changed_payload_is_found(tmp_path: Path, seq: int) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, f"""UPDATE entries SET payload = '{{"loss":0.0,"round":{seq},"shape":[30,64]}}' WHERE seq = {seq}""")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == seq and "changed" in v.reason


def test_changed_payload_with_recomputed_hash_is_found_at_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    e = log.entries()[1]
    forged = {"round": 2, "loss": 0.0}
    h = entry_hash(prev_hash=e.prev_hash, seq=2, time=e.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), kind=e.kind,
                   task_id=e.task_id, payload=forged)
    _tamper(path, f"UPDATE entries SET payload = '{canonical_json(forged)}', hash = '{h}' WHERE seq = 2")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 3 and "link" in v.reason


def test_non_canonical_payload_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, """UPDATE entries SET payload = '{"shape": [30, 64], "loss": 0.5, "round": 2}' WHERE seq = 2""")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 2


def test_changed_kind_or_task_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, "UPDATE entries SET task_id = 'other' WHERE seq = 4")
    assert log.verify().first_bad_seq == 4


def test_deleted_middle_entry_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, "DELETE FROM entries WHERE seq = 3")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 3 and "missing" in v.reason


def test_deleted_and_renumbered_entry_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, "DELETE FROM entries WHERE seq = 3", "UPDATE entries SET seq = seq - 1 WHERE seq > 3")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 3


def test_deleted_last_entry_is_found_by_the_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, "DELETE FROM entries WHERE seq = 5")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 5 and "tail" in v.reason
    _tamper(path, "DELETE FROM entries")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 1


def test_append_refuses_to_hide_a_removed_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    _tamper(path, "DELETE FROM entries WHERE seq = 5")
    with pytest.raises(AuditCorrupted, match="anchor"):
        log.append("round", payload={"round": 6})
    assert log.verify().first_bad_seq == 5


def test_old_anchor_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path, 2)
    old = Path(f"{path}.head").read_text()
    log.append("round", payload={"round": 3})
    log.append("round", payload={"round": 4})
    Path(f"{path}.head").write_text(old)
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 3
    with pytest.raises(AuditCorrupted):
        log.append("round", payload={"round": 5})


def test_missing_or_edited_anchor_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    anchor = Path(f"{path}.head")
    anchor.write_text(json.dumps({"seq": 4, "hash": "f" * 64}))
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 4
    anchor.write_text("not json")
    assert not log.verify().ok
    anchor.unlink()
    v = log.verify()
    assert not v.ok and "anchor" in v.reason


def test_anchor_one_behind_is_accepted(tmp_path: Path) -> None:
    """A crash between the commit and the anchor write leaves the anchor one entry behind."""
    path = tmp_path / "audit.db"
    log = _log(path, 4)
    anchor = Path(f"{path}.head").read_text()
    log.append("round", payload={"round": 5})
    Path(f"{path}.head").write_text(anchor)
    v = log.verify()
    assert v.ok and "behind" in v.reason
    log.append("round", payload={"round": 6})  # the next append moves the anchor to the head
    v = log.verify()
    assert v.ok and v.entries == 6 and "behind" not in v.reason


def test_expected_head_catches_a_rebuilt_log(tmp_path: Path) -> None:
    """Whoever can write both files can rebuild the chain; a head kept elsewhere still catches it."""
    path = tmp_path / "audit.db"
    log = _log(path, 3)
    published = log.head()
    path.unlink()
    Path(f"{path}.head").unlink()
    for sfx in ("-wal", "-shm"):
        Path(f"{path}{sfx}").unlink(missing_ok=True)
    rebuilt = _log(path, 3)
    assert rebuilt.verify().ok
    v = rebuilt.verify(expected_head=published)
    assert not v.ok and v.first_bad_seq == 3


def test_swapped_entries_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    # swap the seq numbers of entries 2 and 4
    _tamper(path, "UPDATE entries SET seq = -1 WHERE seq = 2", "UPDATE entries SET seq = 2 WHERE seq = 4",
            "UPDATE entries SET seq = 4 WHERE seq = -1")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 2


def test_swapped_content_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _log(path)
    cols = "time, kind, task_id, payload, prev_hash, hash"
    con = sqlite3.connect(path)
    r3 = con.execute(f"SELECT {cols} FROM entries WHERE seq = 3").fetchone()
    r4 = con.execute(f"SELECT {cols} FROM entries WHERE seq = 4").fetchone()
    con.close()

    def sets(r: tuple[str, ...]) -> str:
        return ", ".join(f"{c} = '{v}'" for c, v in zip(cols.split(", "), r, strict=True))

    _tamper(path, f"UPDATE entries SET {sets(r4)} WHERE seq = 3", f"UPDATE entries SET {sets(r3)} WHERE seq = 4")
    v = log.verify()
    assert not v.ok and v.first_bad_seq == 3


@settings(max_examples=15, deadline=None)
@given(
    payloads=st.lists(
        st.dictionaries(
            st.text(min_size=1, max_size=8),
            st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10), st.booleans(), st.none()),
            max_size=4,
        ),
        min_size=1,
        max_size=6,
    ),
    data=st.data(),
)
def test_any_payload_change_is_found(payloads: list[dict], data: st.DataObject) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "audit.db"
        log = AuditLog(path)
        for p in payloads:
            log.append("k", payload=p)
        assert [e.payload for e in log.entries()] == payloads
        assert log.verify().ok
        seq = data.draw(st.integers(min_value=1, max_value=len(payloads)))
        changed = dict(payloads[seq - 1], __tampered__=True)
        con = sqlite3.connect(path)
        con.execute("DROP TRIGGER entries_no_update")
        con.execute("UPDATE entries SET payload = ? WHERE seq = ?", (canonical_json(changed), seq))
        con.commit()
        con.close()
        v = log.verify()
        assert not v.ok and v.first_bad_seq == seq


def test_payload_guards(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    with pytest.raises(AuditError, match="never data rows"):
        log.append("data", payload={"rows": ["x" * 100] * (MAX_PAYLOAD_BYTES // 100)})
    with pytest.raises(AuditError, match="finite"):
        log.append("metric", payload={"loss": float("nan")})
    with pytest.raises(AuditError):
        log.append("metric", payload={"obj": object()})
    with pytest.raises(AuditError):
        log.append("", payload={})
    assert log.entries() == [] and log.verify().ok


def _append_many(path: str, who: str, n: int) -> None:
    log = AuditLog(Path(path))
    for i in range(n):
        log.append("tick", task_id=who, payload={"i": i})


def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    AuditLog(path)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), f"p{i}", 15)) for i in range(3)]
    threads = [threading.Thread(target=_append_many, args=(str(path), f"t{i}", 15)) for i in range(3)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    log = AuditLog(path)
    v = log.verify()
    assert v.ok and v.entries == 90 and "behind" not in v.reason


@pytest.mark.parametrize("damage", ["garbage", "empty", "foreign", "truncated"])
def test_corrupted_file_raises(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.db"
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE entries (x)")
        con.commit()
        con.close()
    else:
        log = AuditLog(path)
        for i in range(20):
            log.append("k", payload={"pad": "p" * 3000, "i": i})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AuditCorrupted) as info:
        AuditLog(path)
    assert str(path) in str(info.value) and isinstance(info.value, FedgovError)
