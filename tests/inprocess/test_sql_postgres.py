"""A node whose data set lives in a database: a real PostgreSQL server that this module starts
and stops itself (``pgserver``'s binaries, :mod:`pg_server`), and SQLite, through fedgov's real
ClientApp (issue 19, item 2).

Kept in one module: under ``make test`` (pytest-xdist, ``--dist loadgroup``) an in-process
module runs whole on one worker (tests/conftest.py), so one server serves all these tests.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedgov import protocol as P
from fedgov.cli import app as cli
from fedgov.config import Contract, load_contract
from fedgov.config.datasource import SqlQuery, SqlSource
from fedgov.data import read_table, validate_frame
from fedgov.data.sql import frame_digest, read_sql
from fedgov.errors import DataFileError, DataValidationError, ExitCode
from fedgov.node.home import NodeHome, init_node
from fedgov.testing import InProcessGrid, prepare
from pg_server import Postgres, running_postgres

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "configs" / "contracts" / "adult-income.toml"
ADULT_TEST = ROOT / "data" / "adult" / "adult_test.csv"
CODES = ["GM0363", "GM0344", "GM0150"]
READER_PASSWORD = "r3ader-Secret"
PW_ENV = "FEDGOV_TEST_PG_PASSWORD"
SQL_TYPES = {"integer": "bigint", "float": "double precision", "boolean": "boolean"}
runner = CliRunner()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for this session (started here, stopped at the end), with a database
    ``sociaal`` and a login role ``fedgov_reader`` (password :data:`READER_PASSWORD`) that may only
    read what it is granted."""
    with running_postgres() as pg:
        pg.execute("CREATE DATABASE sociaal", f"CREATE ROLE fedgov_reader LOGIN PASSWORD '{READER_PASSWORD}'")
        pg.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC", database="sociaal")
        yield pg


def _load_csv(pg: Postgres, table: str, contract: Contract, path: Path) -> None:
    """A typed table from a CSV export (empty cells as NULL), readable by the reader role."""
    cols = ", ".join(f"{c.name} {SQL_TYPES.get(c.type.value, 'text')}" for c in contract.columns)
    pg.execute(f"DROP TABLE IF EXISTS {table}", f"CREATE TABLE {table} ({cols})", f"GRANT SELECT ON {table} TO fedgov_reader",
               database="sociaal")
    import psycopg

    from pg_server import SUPERUSER_PASSWORD

    with psycopg.connect(host=str(pg.socket_dir), user="postgres", password=SUPERUSER_PASSWORD, dbname="sociaal") as con:
        with con.cursor().copy(f"COPY {table} FROM STDIN WITH (FORMAT csv, HEADER true, NULL '')".encode()) as copy:
            copy.write(path.read_bytes())


def _load_sqlite(db: Path, table: str, path: Path) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    con = sqlite3.connect(db)
    con.execute(f"CREATE TABLE {table} ({', '.join(rows[0])})")
    con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})",
                    [[None if v == "" else v for v in r] for r in rows[1:]])
    con.commit()
    con.close()


def _source(pg: Postgres, sql: str, **kw: object) -> SqlQuery:
    return SqlSource.model_validate({"url": pg.url("fedgov_reader", "sociaal"), "query": sql, "password_env": PW_ENV, **kw}).queries()[0]


@pytest.fixture
def reader_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PW_ENV, READER_PASSWORD)


# --- a node trains and answers a query from PostgreSQL and from SQLite ------------------------------


def test_nodes_train_and_answer_a_query_from_postgresql_and_sqlite(
    tmp_path: Path, postgres: Postgres, reader_password: None, write_federation, write_task, write_file,
    with_sql: Callable[[str, str], str],
) -> None:
    from fedgov.analytics import load_query
    from fedgov.coordinator.run import run_training
    from fedgov.coordinator.statistics import run_query

    fed = write_federation(tmp_path / "fed.toml", name="sql-3", members=CODES, seed=5, min_rows=300)
    task_path = write_task(
        tmp_path / "task.toml", name="sql", federation=fed,
        training={"rounds": 1, "local_epochs": 1, "batch_size": 128, "learning_rate": 0.5, "min_nodes": 3, "seed": 1,
                  "fraction_evaluate": 1.0, "reply_timeout": 5},
        privacy={"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
    )
    task, contract, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    pg_node, lite_node = nodes[0], nodes[1]
    # GM0363's rows live in PostgreSQL, GM0344's in SQLite; their CSV files are gone
    _load_csv(postgres, "gm0363_train", contract, pg_node.train_path)
    _load_csv(postgres, "gm0363_test", contract, pg_node.test_path)
    pg_home, lite_home = NodeHome(pg_node.train_path.parent), NodeHome(lite_node.train_path.parent)
    url = postgres.url("fedgov_reader", "sociaal")
    pg_home.policy_path.write_text(with_sql(pg_home.policy_path.read_text(), f"""
        url = "{url}"
        password_env = "{PW_ENV}"
        query = "SELECT * FROM gm0363_train"
        test_query = "SELECT * FROM gm0363_test"
        timeout_s = 30
    """))
    _load_sqlite(lite_home.path / "sociaal.db", "adult", lite_node.train_path)
    lite_home.policy_path.write_text(with_sql(lite_home.policy_path.read_text(), """
        url = "sqlite:///sociaal.db"
        query = "SELECT * FROM adult WHERE age >= 17"
    """))
    for n in (pg_node, lite_node):
        n.train_path.rename(n.train_path.with_suffix(".gone"))
        n.test_path.rename(n.test_path.with_suffix(".gone"))
    assert [ds.sql is not None for ds in (pg_home.policy().datasets[0], lite_home.policy().datasets[0])] == [True, True]

    grid = InProcessGrid(manifest, len(nodes), run_id=71)
    report = run_training(
        grid, task, contract, run_dir=tmp_path / "run", expected_nodes=len(nodes), task_file=str(task_path),
        federation="sql-3", local_baseline=False, flower_run_id=71, connect_timeout=5,
    )
    assert report.status == "completed", report
    assert sorted((n.node, n.status) for n in report.nodes) == sorted((c, "accepted") for c in CODES)
    # the row count each released is that of its query's rows, once, under the digest of those rows
    pg_rows = read_sql(pg_home.policy().datasets[0].sql.queries()[0])  # type: ignore[union-attr]
    released = [e.task_id for e in pg_home.ledger.events() if e.task_id.startswith("rows-") and e.kind == "spend"]
    assert released == [f"rows-adult-income-{frame_digest(pg_rows)[:16]}"]
    assert any(e.kind == "spend" and not e.task_id.startswith("rows-") for e in lite_home.ledger.events())

    query_path = write_file(tmp_path / "query.toml", f"""
        name = "sql-overview"
        contract = "{CONTRACT}"
        federation = "{fed}"
        [privacy]
        epsilon = 0.5
        delta = 0.0
        mechanism = "laplace"
        max_rows_per_person = 1
        [[measures]]
        name = "people-by-sex"
        kind = "count"
        by = ["sex"]
    """)
    for home in (pg_home, lite_home):
        home.policy_path.write_text(home.policy_path.read_text().replace('kinds = ["training"]', 'kinds = ["training", "statistics"]'))
    query, qcontract = load_query(query_path)
    qreport = run_query(InProcessGrid(manifest, len(nodes), run_id=72), query, qcontract, run_dir=tmp_path / "q",
                        query_file=str(query_path), expected_nodes=len(nodes))
    assert qreport.status == "completed"
    assert sorted((a.node, a.accepted) for a in qreport.nodes) == sorted((c, True) for c in CODES)


def test_rows_in_another_physical_order_are_the_same_data_version(postgres: Postgres, reader_password: None, tmp_path: Path) -> None:
    contract = load_contract(CONTRACT)
    small = tmp_path / "small.csv"
    small.write_text("\n".join(ADULT_TEST.read_text().splitlines()[:201]) + "\n")
    _load_csv(postgres, "ordered", contract, small)
    q = _source(postgres, "SELECT * FROM ordered")
    before = read_sql(q)
    heap = postgres.fetch("SELECT fnlwgt FROM ordered", database="sociaal")
    # an UPDATE that changes no value moves the rows to the end of the table: a plain scan returns another order
    postgres.execute("UPDATE ordered SET age = age WHERE age < 40", database="sociaal")
    assert postgres.fetch("SELECT fnlwgt FROM ordered", database="sociaal") != heap
    after = read_sql(q)
    assert frame_digest(after) == frame_digest(before)
    postgres.execute("UPDATE ordered SET age = age + 1 WHERE age = 40", database="sociaal")
    assert frame_digest(read_sql(q)) != frame_digest(before)  # a changed value is a new version


# --- the same validation as a file ---------------------------------------------------------------------


def test_undeclared_columns_wrong_types_and_nulls_are_refused_as_in_a_file(
    postgres: Postgres, reader_password: None, tmp_path: Path
) -> None:
    contract = load_contract(CONTRACT)
    rows = ADULT_TEST.read_text().splitlines()[:6]
    header = rows[0].split(",")
    body = [r.split(",") for r in rows[1:]]
    body[1][header.index("age")] = "41.5"  # a float in an integer column
    body[2][header.index("workclass")] = "private"  # a category spelt otherwise than the contract
    body[3][header.index("education")] = ""  # NULL in a column that is not nullable
    text = ",".join(header + ["bsn"]) + "\n" + "".join(",".join(r + [f"99{i}"]) + "\n" for i, r in enumerate(body))
    export = tmp_path / "bad.csv"
    export.write_text(text)
    cols = ", ".join(f"{c.name} {'double precision' if c.name == 'age' else SQL_TYPES.get(c.type.value, 'text')}" for c in contract.columns)
    postgres.execute("DROP TABLE IF EXISTS bad", f"CREATE TABLE bad ({cols}, bsn text)", "GRANT SELECT ON bad TO fedgov_reader",
                     database="sociaal")
    import psycopg

    from pg_server import SUPERUSER_PASSWORD

    with psycopg.connect(host=str(postgres.socket_dir), user="postgres", password=SUPERUSER_PASSWORD, dbname="sociaal") as con:
        with con.cursor().copy(b"COPY bad FROM STDIN WITH (FORMAT csv, HEADER true, NULL '')") as copy:
            copy.write(export.read_bytes())
    with pytest.raises(DataValidationError) as from_db:
        validate_frame(read_sql(_source(postgres, "SELECT * FROM bad")), contract, file="x")
    with pytest.raises(DataValidationError) as from_file:
        validate_frame(read_table(export), contract, file="x")
    got = [(p.location, p.message) for p in from_db.value.problems]
    assert got == [(p.location, p.message) for p in from_file.value.problems]
    assert ("column 'bsn'", f"not declared in contract {contract.ref}; remove it from the export "
            "(a municipality shares only the columns its contract names)") in got
    assert ("row 2, column 'age'", "found '41.5', expected an integer in [17, 90]") in got
    assert any(loc == "row 3, column 'workclass'" and "did you mean 'Private'?" in msg for loc, msg in got)
    assert ("row 4, column 'education'", "found '', expected a value (column is not nullable)") in got


# --- credentials, read-only, timeout ---------------------------------------------------------------------


def test_a_wrong_or_missing_password_is_a_clear_error_that_never_shows_it(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    postgres.execute("CREATE TABLE IF NOT EXISTS one (x int)", "GRANT SELECT ON one TO fedgov_reader", database="sociaal")
    monkeypatch.setenv(PW_ENV, "Wr0ng-Guess")
    with pytest.raises(DataFileError) as err:
        read_sql(_source(postgres, "SELECT * FROM one"))
    assert 'password authentication failed for user "fedgov_reader"' in str(err.value) and "Wr0ng-Guess" not in str(err.value)
    monkeypatch.delenv(PW_ENV)
    with pytest.raises(DataFileError, match=f"environment variable {PW_ENV} .*is not set"):
        read_sql(_source(postgres, "SELECT * FROM one"))


def test_a_password_file_only_the_node_user_can_read(postgres: Postgres, tmp_path: Path) -> None:
    postgres.execute("DROP TABLE IF EXISTS pw", "CREATE TABLE pw (x int)", "INSERT INTO pw VALUES (1), (2)",
                     "GRANT SELECT ON pw TO fedgov_reader", database="sociaal")
    secret = tmp_path / "db-password"
    secret.write_text(READER_PASSWORD + "\n")
    os.chmod(secret, 0o644)
    q = SqlSource(url=postgres.url("fedgov_reader", "sociaal"), query="SELECT * FROM pw", password_file=secret).queries()[0]
    with pytest.raises(DataFileError) as err:
        read_sql(q)
    assert "permissions 0644" in str(err.value) and "too open" in str(err.value) and READER_PASSWORD not in str(err.value)
    os.chmod(secret, 0o600)
    assert sorted(read_sql(q)["x"]) == ["1", "2"]


def test_the_query_runs_read_only_and_under_its_timeout(postgres: Postgres, reader_password: None) -> None:
    postgres.execute(
        "DROP TABLE IF EXISTS kept", "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (1)", "GRANT ALL ON kept TO fedgov_reader",
        "DROP SEQUENCE IF EXISTS counter", "CREATE SEQUENCE counter", "GRANT ALL ON counter TO fedgov_reader",
        "CREATE OR REPLACE FUNCTION sneaky() RETURNS int LANGUAGE sql AS 'INSERT INTO kept VALUES (2) RETURNING x'",
        database="sociaal",
    )
    # the role may write (GRANT ALL), the node's transaction may not
    for sql in ("SELECT sneaky()", "SELECT nextval('counter')"):
        with pytest.raises(DataFileError, match="read-only transaction"):
            read_sql(_source(postgres, sql))
    assert postgres.fetch("SELECT x FROM kept", database="sociaal") == [(1,)]
    with pytest.raises(DataFileError, match="ran longer than timeout_s = 0.5 s"):
        read_sql(_source(postgres, "SELECT pg_sleep(30)", timeout_s=0.5))
    with pytest.raises(ValueError, match="not INSERT"):
        _source(postgres, "INSERT INTO kept VALUES (3)")


def test_a_second_statement_is_refused_by_the_server_too(postgres: Postgres, reader_password: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind fedgov's own check (switched off here), the server refuses to prepare two commands,
    and the read-only transaction refuses the write."""
    import fedgov.data.sql as S

    postgres.execute("DROP TABLE IF EXISTS kept2", "CREATE TABLE kept2 (x int)", "INSERT INTO kept2 VALUES (1)",
                     "GRANT ALL ON kept2 TO fedgov_reader", database="sociaal")
    q = _source(postgres, "SELECT * FROM kept2")
    monkeypatch.setattr(S, "check_select", lambda sql, **kw: sql)
    forged = SqlQuery(SqlSource.model_construct(**{**q.source.model_dump(), "query": "SELECT 1; DELETE FROM kept2"}))
    with pytest.raises(DataFileError, match="cannot insert multiple commands"):
        read_sql(forged)
    forged = SqlQuery(SqlSource.model_construct(**{**q.source.model_dump(), "query": "DELETE FROM kept2 RETURNING x"}))
    with pytest.raises(DataFileError, match="read-only transaction"):
        read_sql(forged)
    assert postgres.fetch("SELECT x FROM kept2", database="sociaal") == [(1,)]


# --- the operator's data check -----------------------------------------------------------------------------


def test_node_data_check_on_a_postgresql_data_set(
    postgres: Postgres, reader_password: None, tmp_path: Path, with_sql: Callable[[str, str], str]
) -> None:
    contract = load_contract(CONTRACT)
    small = tmp_path / "small.csv"
    small.write_text("\n".join(ADULT_TEST.read_text().splitlines()[:121]) + "\n")
    _load_csv(postgres, "checked", contract, small)
    home = init_node(tmp_path / "node", node="GM0363", contract=contract, data=small, contract_path=CONTRACT, approval="auto")
    home.policy_path.write_text(with_sql(home.policy_path.read_text(), f"""
        url = "{postgres.url('fedgov_reader', 'sociaal')}"
        password_env = "{PW_ENV}"
        query = "SELECT * FROM checked"
    """))
    out = runner.invoke(cli, ["node", "data", "check", "--node-dir", str(home.path)])
    assert out.exit_code == 0, out.output
    [record] = home.state.data_checks()[-1:]
    assert record.conforms and record.data_sha256 == frame_digest(read_sql(_source(postgres, "SELECT * FROM checked")))
    postgres.execute("UPDATE checked SET workclass = 'ZQXJ' WHERE age = (SELECT min(age) FROM checked)", database="sociaal")
    out = runner.invoke(cli, ["node", "data", "check", "--node-dir", str(home.path)])
    assert out.exit_code == int(ExitCode.DATA_VALIDATION), out.output
    assert "ZQXJ" not in out.output and "workclass" in out.output
    assert "ZQXJ" in (home.path / "reports" / "data-check-adult-income.txt").read_text()
    # a hello at task time gets the fixed refusal: no rows, columns or values leave
    from fedgov.config import load_task

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    task, tcontract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    grid = InProcessGrid(tmp_path / "none.json", 0, run_id=81)
    grid.contexts[1000] = Context(run_id=81, node_id=1000, node_config={"node-dir": str(home.path), "node-name": "GM0363"},
                                  state=RecordDict(), run_config={})
    cfg = {P.CONTRACT_JSON: tcontract.model_dump_json(), P.TASK_JSON: task.model_dump_json(), P.KIND: P.HELLO, "server-round": 1}
    [reply] = grid.send_and_receive([Message(RecordDict({P.CONFIG: ConfigRecord(cfg)}), dst_node_id=1000, message_type=MessageType.QUERY)])
    hello = P.NodeHello.model_validate_json(str(reply.content[P.HELLO][P.NODE_JSON]))
    assert not hello.accepted and hello.code == "data-invalid"
