"""The privacy-budget ledger: composition, reservations, spends, releases, concurrency, crashes.

PRV evaluations are the slow part (0.1 to 0.3 s each): the tests use one DP-SGD mechanism
(``M``, the demo task's sigma and q with 340 steps) and the cache in ``fedgov.node.ledger``. The
multi-process tests fork after the parent has warmed that cache.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedgov.errors import ExitCode, FedgovError, PrivacyError
from fedgov.node.ledger import (
    Budget,
    BudgetExceeded,
    LedgerCorrupted,
    LedgerError,
    Mechanism,
    PrivacyLedger,
    compose,
)
from fedgov.privacy.accounting import epsilon_from_history

DELTA = 1e-5
SIGMA, Q = 1.38, 1 / 34
M = Mechanism.dpsgd([(SIGMA, Q, 340)])
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def laplace(eps: float) -> Mechanism:
    return Mechanism(kind="laplace", epsilon=eps)


@pytest.fixture(scope="module")
def eps_n() -> dict[int, float]:
    """compose([M] * n) for n = 1..3 (also warms the cache that forked children inherit)."""
    return {n: compose([M] * n, delta=DELTA) for n in (1, 2, 3)}


@pytest.fixture
def two_task_budget(eps_n: dict[int, float]) -> Budget:
    return Budget(epsilon=eps_n[2] + 1e-6, delta=DELTA, period="forever")


# --------------------------------------------------------------------------- compose


def test_compose_one_task_equals_epsilon_from_history(eps_n: dict[int, float]) -> None:
    assert eps_n[1] == pytest.approx(epsilon_from_history(history=M.history, delta=DELTA, accountant="prv"), abs=1e-12)


def test_compose_reference_value() -> None:
    # FLOWER-NOTES: sigma 1.0, q 0.0128, 781 steps, delta 1e-5: PRV 2.131 (PLD 2.121).
    eps = compose([Mechanism.dpsgd([(1.0, 0.0128, 781)])], delta=1e-5)
    assert eps == pytest.approx(2.131, abs=0.02)


def test_two_identical_tasks_cost_less_than_twice_one(eps_n: dict[int, float]) -> None:
    assert eps_n[1] < eps_n[2] < 2 * eps_n[1]
    # the two tasks are merged into one history of 680 steps
    assert eps_n[2] == compose([Mechanism.dpsgd([(SIGMA, Q, 680)])], delta=DELTA)


def test_compose_is_order_free_and_merges_split_histories(eps_n: dict[int, float]) -> None:
    split = Mechanism.dpsgd([(SIGMA, Q, 100), (SIGMA, Q, 240)])
    assert compose([split, M], delta=DELTA) == compose([M, split], delta=DELTA) == eps_n[2]


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=12))
def test_basic_composition_for_laplace(epsilons: list[float]) -> None:
    assert compose([laplace(e) for e in epsilons], delta=DELTA) == pytest.approx(sum(epsilons))


def test_dpsgd_plus_gaussian_uses_the_delta_left(eps_n: dict[int, float]) -> None:
    assert compose([M, laplace(0.5)], delta=DELTA) == pytest.approx(eps_n[1] + 0.5)
    g = Mechanism(kind="gaussian", epsilon=0.3, delta=DELTA / 2)
    expected = 0.3 + epsilon_from_history(history=M.history, delta=DELTA / 2, accountant="prv")
    assert compose([M, g], delta=DELTA) == pytest.approx(expected)
    assert compose([M, g], delta=DELTA) > compose([M, laplace(0.3)], delta=DELTA)  # less delta for DP-SGD


def test_compose_refuses_when_no_delta_is_left() -> None:
    g = Mechanism(kind="gaussian", epsilon=0.3, delta=DELTA)
    with pytest.raises(PrivacyError, match="delta"):
        compose([M, g], delta=DELTA)
    assert compose([g], delta=DELTA) == 0.3  # without DP-SGD the whole delta may go to it
    with pytest.raises(PrivacyError):
        compose([g, g], delta=DELTA)


def test_rdp_anywhere_means_rdp_for_all(eps_n: dict[int, float]) -> None:
    m_rdp = Mechanism.dpsgd([(SIGMA, Q, 340)], accountant="rdp")
    both = compose([M, m_rdp], delta=DELTA)
    assert both == pytest.approx(epsilon_from_history(history=[(SIGMA, Q, 680)], delta=DELTA, accountant="rdp"))
    assert both > eps_n[2]


def test_compose_empty_is_zero() -> None:
    assert compose([], delta=DELTA) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "dpsgd", "history": [(1.0, 0.1, 10)], "epsilon": 1.0},
        {"kind": "dpsgd", "history": [(0.0, 0.1, 10)]},
        {"kind": "dpsgd", "history": [(1.0, 1.5, 10)]},
        {"kind": "dpsgd", "history": [(1.0, 0.1, -1)]},
        {"kind": "laplace"},
        {"kind": "laplace", "epsilon": -1.0},
        {"kind": "gaussian", "epsilon": 1.0, "delta": 1.0},
        {"kind": "other", "epsilon": 1.0, "history": [(1.0, 0.1, 10)]},
        {"kind": "laplace", "epsilon": 1.0, "extra": 1},
    ],
)
def test_mechanism_validation(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError):
        Mechanism(**kwargs)


# --------------------------------------------------------------------------- reservations


def test_budget_for_exactly_two_tasks(tmp_path: Path, two_task_budget: Budget, eps_n: dict[int, float]) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    s1 = ledger.reserve(dataset="adult", task_id="t1", mechanism=M, budget=two_task_budget, now=NOW)
    assert s1.epsilon_committed == pytest.approx(eps_n[1]) and s1.open_tasks == ["t1"]
    s2 = ledger.reserve(dataset="adult", task_id="t2", mechanism=M, budget=two_task_budget, now=NOW)
    assert s2.epsilon_committed == pytest.approx(eps_n[2])
    assert s2.epsilon_naive == pytest.approx(2 * eps_n[1])
    assert 0 <= s2.remaining < 1e-5
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(dataset="adult", task_id="t3", mechanism=M, budget=two_task_budget, now=NOW)
    err = info.value
    assert isinstance(err, FedgovError) and err.exit_code == ExitCode.PRIVACY
    assert err.status.open_tasks == ["t1", "t2"] and err.status.epsilon_committed == pytest.approx(eps_n[2])
    assert err.task_epsilon == pytest.approx(eps_n[1]) and err.epsilon_after == pytest.approx(eps_n[3])
    for part in ("adult", "t3", f"{two_task_budget.epsilon:g}", f"{eps_n[2]:.4f}", f"{eps_n[1]:.4f}"):
        assert part in str(err)
    assert ledger.task_state("t3") == "none"
    assert len(ledger.events()) == 2
    # other data sets have their own budgets
    ledger.reserve(dataset="household", task_id="t3", mechanism=M, budget=two_task_budget, now=NOW)
    assert ledger.datasets() == ["adult", "household"]


def test_reserve_is_idempotent_for_an_open_task(tmp_path: Path, two_task_budget: Budget) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    a = ledger.reserve(dataset="d", task_id="t1", mechanism=M, budget=two_task_budget, now=NOW)
    b = ledger.reserve(dataset="d", task_id="t1", mechanism=M, budget=two_task_budget, now=NOW)
    assert a == b and len(ledger.events()) == 1
    with pytest.raises(LedgerError, match="different mechanism"):
        ledger.reserve(dataset="d", task_id="t1", mechanism=laplace(0.1), budget=two_task_budget, now=NOW)
    ledger.release(dataset="d", task_id="t1", now=NOW)
    with pytest.raises(LedgerError, match="closed"):
        ledger.reserve(dataset="d", task_id="t1", mechanism=M, budget=two_task_budget, now=NOW)


def test_delta_budget_is_checked(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    budget = Budget(epsilon=100, delta=DELTA, period="forever")
    g = Mechanism(kind="gaussian", epsilon=0.1, delta=0.6 * DELTA)
    ledger.reserve(dataset="d", task_id="g1", mechanism=g, budget=budget)
    with pytest.raises(BudgetExceeded, match="delta"):
        ledger.reserve(dataset="d", task_id="g2", mechanism=g, budget=budget)
    with pytest.raises(BudgetExceeded) as info:  # 0.4 delta left is enough for DP-SGD only with more epsilon
        ledger.reserve(dataset="d", task_id="dp", mechanism=M, budget=Budget(epsilon=2.0, delta=DELTA, period="forever"))
    assert info.value.epsilon_after > 2.0


def _thread_worker(ledger: PrivacyLedger, budget: Budget, i: int, barrier: threading.Barrier, out: list[str]) -> None:
    barrier.wait()
    try:
        ledger.reserve(dataset="d", task_id=f"t{i}", mechanism=M, budget=budget)
        out.append("ok")
    except BudgetExceeded:
        out.append("refused")


def test_eight_threads_never_overspend(tmp_path: Path, two_task_budget: Budget, eps_n: dict[int, float]) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    barrier = threading.Barrier(8)
    out: list[str] = []
    threads = [threading.Thread(target=_thread_worker, args=(ledger, two_task_budget, i, barrier, out)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == ["ok"] * 2 + ["refused"] * 6
    status = ledger.status("d", two_task_budget)
    assert len(status.open_tasks) == 2 and status.epsilon_committed <= two_task_budget.epsilon


def _process_worker(path: str, budget_json: str, i: int, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    ledger = PrivacyLedger(Path(path))  # each process its own ledger object
    budget = Budget.model_validate_json(budget_json)
    barrier.wait()
    try:
        ledger.reserve(dataset="d", task_id=f"p{i}", mechanism=M, budget=budget)
        queue.put("ok")
    except BudgetExceeded:
        queue.put("refused")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"error: {exc!r}")


def test_four_processes_never_overspend(tmp_path: Path, two_task_budget: Budget, eps_n: dict[int, float]) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger(path)
    ctx = mp.get_context("fork")  # the children inherit the warm composition cache
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(str(path), two_task_budget.model_dump_json(), i, barrier, queue))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == ["ok", "ok", "refused", "refused"]
    assert len(PrivacyLedger(path).status("d", two_task_budget).open_tasks) == 2


def _reserve_and_die(path: str, budget_json: str) -> None:
    ledger = PrivacyLedger(Path(path))
    ledger.reserve(dataset="d", task_id="crashed", mechanism=M, budget=Budget.model_validate_json(budget_json))
    os._exit(0)  # no release, no clean-up


def test_crash_after_reservation_keeps_it_counted(tmp_path: Path, two_task_budget: Budget, eps_n: dict[int, float]) -> None:
    path = tmp_path / "ledger.db"
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_reserve_and_die, args=(str(path), two_task_budget.model_dump_json()))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    after_crash = PrivacyLedger(path)
    assert after_crash.task_state("crashed") == "open"
    status = after_crash.status("d", two_task_budget)
    assert status.open_tasks == ["crashed"] and status.epsilon_committed == pytest.approx(eps_n[1])
    after_crash.reserve(dataset="d", task_id="second", mechanism=M, budget=two_task_budget)
    with pytest.raises(BudgetExceeded):
        after_crash.reserve(dataset="d", task_id="third", mechanism=M, budget=two_task_budget)
    restarted = PrivacyLedger(path)
    assert restarted.status("d", two_task_budget) == after_crash.status("d", two_task_budget)
    assert restarted.status("d", two_task_budget).epsilon_committed == pytest.approx(eps_n[2])


# --------------------------------------------------------------------------- spend and release


def test_spend_release_and_hand_back(tmp_path: Path, two_task_budget: Budget, eps_n: dict[int, float]) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    with pytest.raises(LedgerError, match="no reservation"):
        ledger.spend(dataset="d", task_id="t1", mechanism=Mechanism.dpsgd([(SIGMA, Q, 34)]), round=1)
    ledger.reserve(dataset="d", task_id="t1", mechanism=M, budget=two_task_budget, now=NOW)
    ledger.reserve(dataset="d", task_id="t2", mechanism=M, budget=two_task_budget, now=NOW)
    one_round = Mechanism.dpsgd([(SIGMA, Q, 34)])
    for r in (1, 2):
        ev = ledger.spend(dataset="d", task_id="t1", mechanism=one_round, round=r, now=NOW)
        assert ev.kind == "spend" and ev.round == r
    # spends do not change the balance while the task is open: the reservation counts in full
    assert ledger.status("d", two_task_budget, now=NOW).epsilon_committed == pytest.approx(eps_n[2])
    with pytest.raises(LedgerError, match="reserved 340"):
        ledger.spend(dataset="d", task_id="t1", mechanism=Mechanism.dpsgd([(SIGMA, Q, 340 - 67)]), round=3)
    with pytest.raises(LedgerError, match="reserved 0"):  # a (sigma, q) that was not reserved
        ledger.spend(dataset="d", task_id="t1", mechanism=Mechanism.dpsgd([(SIGMA / 2, Q, 1)]), round=3)
    with pytest.raises(LedgerError, match="does not match"):
        ledger.spend(dataset="d", task_id="t1", mechanism=laplace(0.1), round=3)
    with pytest.raises(LedgerError, match="does not match"):
        ledger.spend(dataset="d", task_id="t1", mechanism=Mechanism.dpsgd([(SIGMA, Q, 1)], accountant="rdp"), round=3)
    ledger.spend(dataset="d", task_id="t1", mechanism=Mechanism.dpsgd([(SIGMA, Q, 340 - 68)]), round=3)  # exactly all
    ledger.release(dataset="d", task_id="t1", now=NOW)
    ledger.release(dataset="d", task_id="t1", now=NOW)  # idempotent
    assert ledger.task_state("t1") == "closed" and ledger.task_state("t1", dataset="other") == "none"
    with pytest.raises(LedgerError, match="released"):
        ledger.spend(dataset="d", task_id="t1", mechanism=one_round, round=4)
    assert ledger.status("d", two_task_budget, now=NOW).epsilon_committed == pytest.approx(eps_n[2])  # all was used

    # t2 uses two rounds only: release hands back the rest
    ledger.spend(dataset="d", task_id="t2", mechanism=one_round, round=1, now=NOW)
    ledger.spend(dataset="d", task_id="t2", mechanism=one_round, round=2, now=NOW)
    ledger.release(dataset="d", task_id="t2", note="stopped early", now=NOW)
    status = ledger.status("d", two_task_budget, now=NOW)
    assert status.closed_tasks == ["t1", "t2"] and status.open_tasks == []
    assert status.epsilon_committed == pytest.approx(compose([M, Mechanism.dpsgd([(SIGMA, Q, 68)])], delta=DELTA))
    assert status.epsilon_committed < eps_n[2]
    assert status.events == 2 + 3 + 1 + 2 + 1  # the second release of t1 wrote nothing
    with pytest.raises(LedgerError, match="nothing to release"):
        ledger.release(dataset="d", task_id="never")


def test_laplace_spends_are_summed(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    budget = Budget(epsilon=1.0, delta=DELTA, period="forever")
    ledger.reserve(dataset="d", task_id="q", mechanism=laplace(0.6), budget=budget)
    ledger.spend(dataset="d", task_id="q", mechanism=laplace(0.2), round=0)
    ledger.spend(dataset="d", task_id="q", mechanism=laplace(0.4), round=1)
    with pytest.raises(LedgerError, match="would spend epsilon"):
        ledger.spend(dataset="d", task_id="q", mechanism=laplace(0.01), round=2)
    with pytest.raises(BudgetExceeded):
        ledger.reserve(dataset="d", task_id="q2", mechanism=laplace(0.5), budget=budget)


def test_period_year(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.db")
    budget = Budget(epsilon=1.0, delta=DELTA, period="year")
    last_year = datetime(2024, 12, 31, 23, 59, tzinfo=UTC)
    this_year = datetime(2025, 1, 1, 0, 1, tzinfo=UTC)
    ledger.reserve(dataset="d", task_id="old", mechanism=laplace(0.8), budget=budget, now=last_year)
    assert ledger.status("d", budget, now=this_year).epsilon_committed == 0.0
    assert ledger.status("d", budget, now=this_year).year == 2025
    s = ledger.reserve(dataset="d", task_id="new", mechanism=laplace(0.8), budget=budget, now=this_year)
    assert s.open_tasks == ["new"] and s.epsilon_committed == pytest.approx(0.8)
    assert ledger.status("d", budget, now=last_year).open_tasks == ["old"]
    forever = Budget(epsilon=1.0, delta=DELTA, period="forever")
    assert ledger.status("d", forever, now=this_year).epsilon_committed == pytest.approx(1.6)
    with pytest.raises(ValueError, match="aware"):
        ledger.status("d", budget, now=datetime(2025, 1, 1))


# --------------------------------------------------------------------------- the file


def test_events_are_immutable_in_the_database(tmp_path: Path, two_task_budget: Budget) -> None:
    path = tmp_path / "ledger.db"
    ledger = PrivacyLedger(path)
    ledger.reserve(dataset="d", task_id="t1", mechanism=laplace(0.1), budget=two_task_budget, note="x")
    con = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE events SET note = 'y'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM events")
        with pytest.raises(sqlite3.IntegrityError):  # a second reservation of the same task
            con.execute(
                "INSERT INTO events (time, dataset, task_id, kind) VALUES ('2025-01-01T00:00:00.000000Z', 'd', 't1', 'reserve')"
            )
        # an attacker who drops the triggers is refused on the next open, not silently trusted
        con.execute("DROP TRIGGER events_no_delete")
        con.commit()
    finally:
        con.close()
    with pytest.raises(LedgerCorrupted, match="triggers"):
        PrivacyLedger(path)
    [ev] = ledger.events()
    assert ev.note == "x" and ev.budget == two_task_budget


def _make_ledger(path: Path) -> None:
    ledger = PrivacyLedger(path)
    budget = Budget(epsilon=1000, delta=DELTA, period="forever")
    for i in range(25):
        ledger.reserve(dataset="d", task_id=f"t{i}", mechanism=laplace(0.001), budget=budget, note="n" * 2000)
    ledger.close()  # the file at rest (its last connection closed: checkpointed), then damaged


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign", "zeroed"])
def test_corrupted_file_is_refused_and_left_alone(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ledger.db"
    if damage == "garbage":
        path.write_bytes(os.urandom(8192))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE events (x)")
        con.commit()
        con.close()
    else:
        _make_ledger(path)
        data = path.read_bytes()
        assert len(data) > 3 * 4096
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:  # a run of zeros in the middle, as after a bad sector
            path.write_bytes(data[:4096] + b"\0" * (len(data) - 8192) + data[-4096:])
    before = path.read_bytes()
    with pytest.raises(LedgerCorrupted) as info:
        PrivacyLedger(path)
    assert str(path) in str(info.value) and info.value.exit_code == ExitCode.STATE_CORRUPTED
    assert path.read_bytes() == before  # never recreated over it


def test_new_file_in_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.db"
    PrivacyLedger(path)
    assert path.exists() and [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


# --------------------------------------------------------------------------- invariants


_ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "spend", "release"]),
        st.integers(min_value=0, max_value=4),  # task
        st.floats(min_value=0.0, max_value=0.6, allow_nan=False),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_balance_matches_a_model_and_never_exceeds_the_budget(ops: list[tuple[str, int, float]]) -> None:
    """Random reserve/spend/release sequences with Laplace mechanisms: the committed epsilon
    is always (open reservations) + (closed spends), and never above the budget."""
    budget = Budget(epsilon=1.0, delta=DELTA, period="forever")
    reserved: dict[str, float] = {}
    spent: dict[str, float] = {}
    closed: set[str] = set()
    with tempfile.TemporaryDirectory() as d:
        ledger = PrivacyLedger(Path(d) / "l.db")
        for op, i, eps in ops:
            task = f"t{i}"
            try:
                if op == "reserve":
                    ledger.reserve(dataset="d", task_id=task, mechanism=laplace(eps), budget=budget)
                    reserved.setdefault(task, eps)
                elif op == "spend":
                    ledger.spend(dataset="d", task_id=task, mechanism=laplace(eps / 4), round=0)
                    spent[task] = spent.get(task, 0.0) + eps / 4
                else:
                    ledger.release(dataset="d", task_id=task)
                    closed.add(task)
            except LedgerError:
                pass
            expected = sum(spent.get(t, 0.0) if t in closed else r for t, r in reserved.items())
            status = ledger.status("d", budget)
            assert status.epsilon_committed == pytest.approx(expected)
            assert status.epsilon_committed <= budget.epsilon + 1e-9
            assert all(spent.get(t, 0.0) <= r + 1e-9 for t, r in reserved.items())
            assert sorted(status.open_tasks) == sorted(set(reserved) - closed)
