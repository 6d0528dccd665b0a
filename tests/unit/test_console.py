"""The web consoles in process (Starlette's TestClient): who may use them and how, what they
write, and what their pages show. The browser tests (tests/e2e/test_console_browser.py) drive
the same consoles in Chromium."""

from __future__ import annotations

import json
import os
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedgov.cli import app
from fedgov.console.coordinator import coordinator_console, figures_csv, participation, select_figures
from fedgov.console.node import budget_series, node_console, releases_of
from fedgov.console.security import Guard, check_binding, is_loopback, read_password_file
from fedgov.console.server import free_port, tls_files
from fedgov.console.web import LOOPBACK_HOSTS
from fedgov.errors import ConfigError, ExitCode
from fedgov.node.audit import AuditEntry
from fedgov.node.budget import Budget, LedgerEvent, Mechanism
from fedgov.node.home import NodeHome
from fedgov.reports import NodeResult, RoundMetrics, TrainingReport

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette 1.x would rather drive its TestClient with httpx2; httpx works
    from starlette.testclient import TestClient

SECRET = "a-login-token-for-the-tests"
SUMMARY = {"task": "demo", "dataset": "adult", "epsilon": 1.0, "rounds": 3, "sends": "its DP-SGD model update in each of 3 rounds"}


def _client(app_: Any) -> TestClient:
    return TestClient(app_, base_url="http://127.0.0.1:8765")


def _login(client: TestClient, name: str = "") -> str:
    r = client.post("/login", data={"secret": SECRET, "name": name, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/approvals")
    m = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert m is not None
    return m.group(1)


@pytest.fixture
def home(node_home: Any) -> NodeHome:
    h: NodeHome = node_home(approval="manual")
    h.state.enqueue("task-1", summary=SUMMARY)
    h.audit.append("initialized", payload={"node": "GM0363"})
    return h


@pytest.fixture
def guard() -> Guard:
    return Guard(SECRET)


@pytest.fixture
def client(home: NodeHome, guard: Guard) -> TestClient:
    return _client(node_console(home, guard, allowed_hosts=LOOPBACK_HOSTS))


# --------------------------------------------------------------------------- login and sessions


def test_every_page_needs_a_login_and_a_wrong_secret_gets_none(client: TestClient) -> None:
    for path in ("/", "/budget", "/ledger", "/audit", "/approvals", "/tasks", "/policy", "/tasks/task-1"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    r = client.post("/login", data={"secret": "wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert client.get("/", follow_redirects=False).status_code == 303


def test_the_session_cookie_is_httponly_and_samesite_strict(client: TestClient, guard: Guard) -> None:
    r = client.post("/login", data={"secret": SECRET}, follow_redirects=False)
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"fedgov-console-{guard.secret_id}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert SECRET not in cookie and guard.secret_id not in SECRET
    assert client.get("/").status_code == 200


def test_under_tls_the_cookie_is_secure_and_host_prefixed() -> None:
    g = Guard(SECRET, secure=True)
    assert g.cookie_name.startswith("__Host-")
    r = _client(coordinator_console(Path("/nonexistent"), g)).post("/login", data={"secret": SECRET}, follow_redirects=False)
    assert "Secure" in r.headers["set-cookie"] and r.headers["strict-transport-security"]


def test_failed_logins_are_throttled() -> None:
    now = [100.0]
    g = Guard(SECRET, max_failures=3, failure_window_s=60.0, clock=lambda: now[0])
    c = _client(coordinator_console(Path("/nonexistent"), g))
    for _ in range(3):
        assert c.post("/login", data={"secret": "wrong"}).status_code == 401
    assert c.post("/login", data={"secret": SECRET}).status_code == 429  # even the right one, for a while
    now[0] += 61
    assert c.post("/login", data={"secret": SECRET}, follow_redirects=False).status_code == 303


def test_an_idle_session_expires_and_logout_ends_it(home: NodeHome) -> None:
    now = [0.0]
    g = Guard(SECRET, idle_s=60.0, clock=lambda: now[0])
    c = _client(node_console(home, g))
    csrf = _login(c)
    now[0] += 30
    assert c.get("/", follow_redirects=False).status_code == 200
    now[0] += 61
    assert c.get("/", follow_redirects=False).status_code == 303
    csrf = _login(c)
    assert c.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert c.get("/", follow_redirects=False).status_code == 303


def test_the_login_returns_to_a_page_of_this_console_only(client: TestClient) -> None:
    for target, expected in (("/audit?task=x", "/audit?task=x"), ("https://evil.example/", "/"), ("//evil.example", "/")):
        r = client.post("/login", data={"secret": SECRET, "next": target}, follow_redirects=False)
        assert r.headers["location"] == expected


def test_a_host_it_does_not_serve_is_refused(client: TestClient) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1."""
    r = client.get("/login", headers={"host": "evil.example:8765"})
    assert r.status_code == 400


def test_security_headers_and_no_script_on_any_page(client: TestClient) -> None:
    _login(client)
    for path in ("/", "/budget", "/ledger", "/audit", "/approvals", "/tasks", "/policy", "/login"):
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert "<script" not in r.text.lower()
        assert not re.search(r"<[^>]+\son[a-z]+=", r.text), path  # no inline event handler either


# --------------------------------------------------------------------------- forms: forgery


def test_a_form_without_a_session_or_with_a_forged_token_is_refused(client: TestClient, home: NodeHome) -> None:
    before = len(home.audit.entries())
    assert client.post("/pause", data={"reason": "x"}, follow_redirects=False).status_code == 403
    csrf = _login(client)
    for data, headers in (
        ({"reason": "x"}, {}),  # no token
        ({"reason": "x", "csrf": "forged"}, {}),  # a wrong one
        ({"reason": "x", "csrf": csrf}, {"origin": "http://evil.example"}),  # the right one, from another site
        ({"reason": "x", "csrf": csrf}, {"origin": "null"}),
    ):
        r = client.post("/pause", data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403, (data, headers)
        r = client.post("/approvals/approve", data={**data, "task_id": "task-1"}, headers=headers, follow_redirects=False)
        assert r.status_code == 403
    assert client.post("/pause", content=b"csrf=" + csrf.encode(), headers={"content-type": "application/json"}).status_code == 415
    assert home.state.paused() == (False, "") and home.state.status("task-1") == "pending"
    assert len(home.audit.entries()) == before


def test_pause_and_resume_from_the_console_record_who(client: TestClient, home: NodeHome, guard: Guard) -> None:
    csrf = _login(client, name="Anna <FG>")
    r = client.post("/pause", data={"csrf": csrf, "reason": "maintenance", "back": "/budget"},
                    headers={"origin": "http://127.0.0.1:8765"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/budget"
    assert home.state.paused() == (True, "maintenance")
    entry = home.audit.entries()[-1]
    assert entry.kind == "paused" and entry.payload == {"reason": "maintenance", "by": f"console:{guard.secret_id}:Anna FG"}
    assert "Paused" in client.get("/").text
    client.post("/resume", data={"csrf": csrf, "back": "//evil.example"}, follow_redirects=False)
    assert home.state.paused() == (False, "")
    assert home.audit.entries()[-1].payload == {"by": f"console:{guard.secret_id}:Anna FG"}
    assert home.audit.verify().ok


def test_approve_and_reject_write_what_the_command_line_writes(tmp_path: Path, node_home: Any, guard: Guard) -> None:
    """The console and `fedgov node approve|reject` share NodeHome's decisions: the same node
    state and the same audit entries; only who decided differs."""
    cli_home, web_home = node_home(tmp_path / "cli", approval="manual"), node_home(tmp_path / "web", approval="manual")
    for h in (cli_home, web_home):
        h.state.enqueue("task-1", summary=SUMMARY)
        h.state.enqueue("task-2", summary=SUMMARY)
    runner = CliRunner()
    env = {"USER": "operator"}
    assert runner.invoke(app, ["node", "approve", "task-1", "--node-dir", str(cli_home.path)], env=env).exit_code == 0
    assert runner.invoke(app, ["node", "reject", "task-2", "--reason", "too much", "--node-dir", str(cli_home.path)], env=env).exit_code == 0
    c = _client(node_console(web_home, guard))
    csrf = _login(c)
    r = c.post("/approvals/approve", data={"csrf": csrf, "task_id": "task-1"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/approvals?done=approved&task=task-1"
    c.post("/approvals/reject", data={"csrf": csrf, "task_id": "task-2", "reason": "too much"})
    who = f"console:{guard.secret_id}"
    cli = [(e.kind, e.task_id, e.payload) for e in cli_home.audit.entries()]
    web = [(e.kind, e.task_id, e.payload) for e in web_home.audit.entries()]
    assert web == [(k, t, {**p, "by": who}) for k, t, p in cli]
    assert cli[0] == ("approved", "task-1", {"by": "operator", "summary": SUMMARY})
    assert cli[1] == ("rejected", "task-2", {"reason": "too much", "by": "operator"})
    for h, by in ((cli_home, "operator"), (web_home, who)):
        assert [(t.task_id, t.status, t.decided_by, t.reason) for t in h.state.tasks()] == [
            ("task-1", "approved", by, ""), ("task-2", "rejected", by, "too much")]
    page = c.get("/approvals").text
    assert "Nothing waits for approval" in page and who in page
    # an unknown task is a message, not a traceback
    r = c.post("/approvals/approve", data={"csrf": csrf, "task_id": "no-such-task"})
    assert r.status_code == 409 and "not in the approval queue" in r.text


def test_the_pages_show_the_budget_the_queue_the_log_and_the_policy(client: TestClient, home: NodeHome) -> None:
    ledger = home.ledger
    budget = Budget(epsilon=10.0, delta=1e-5)
    ledger.reserve(dataset="adult", task_id="q-1", mechanism=Mechanism(kind="laplace", epsilon=1.5), budget=budget)
    ledger.spend(dataset="adult", task_id="q-1", mechanism=Mechanism(kind="laplace", epsilon=1.5), round=1)
    ledger.release(dataset="adult", task_id="q-1")
    ledger.reserve(dataset="adult", task_id="q-2", mechanism=Mechanism(kind="laplace", epsilon=0.5), budget=budget)
    home.audit.append("sent", task_id="q-1", payload={"kind": "stats", "message_type": "query", "config": {"answer-json": "{...}"}})
    _login(client)
    page = client.get("/").text
    assert "2.000" in page and "8.000" in page  # composed 1.5 + 0.5 (open: its reservation); remaining 8
    assert "task-1" not in page or "1</strong> task" in page
    budget_page = client.get("/budget").text
    assert "<svg" in budget_page and "q-2" in budget_page and "laplace, epsilon 0.5" in budget_page
    assert "q-1" in client.get("/ledger?task=q-1").text and "q-2" not in client.get("/ledger?task=q-1").text.split("<tbody>")[1]
    approvals = client.get("/approvals").text
    assert "task-1" in approvals and "its DP-SGD model update in each of 3 rounds" in approvals
    task = client.get("/tasks/q-1").text
    assert "answer-json" in task and "noisy aggregates" in task
    assert client.get("/tasks/nothing-known").status_code == 404
    audit = client.get("/audit?kind=sent").text
    assert "hash chain intact" in audit and "q-1" in audit and "initialized" not in audit.split("<tbody>")[1]
    policy = client.get("/policy").text
    assert "max_epsilon_per_task" in policy and "GM0363" in policy


def test_a_tampered_audit_log_is_shown_on_every_page(client: TestClient, home: NodeHome) -> None:
    import sqlite3

    _login(client)
    assert "hash chain intact" in client.get("/").text
    con = sqlite3.connect(home.path / NodeHome.AUDIT)
    con.execute("DROP TRIGGER IF EXISTS entries_no_update")  # whoever can write the file can do this
    con.execute("UPDATE entries SET payload = ? WHERE seq = 1", (json.dumps({"node": "GM9999"}),))
    con.commit()
    con.close()
    for path in ("/", "/budget", "/policy"):
        text = client.get(path).text
        assert "Audit log TAMPERED" in text and "entry 1" in text, path


# --------------------------------------------------------------------------- pure views


def _event(i: int, kind: str, task: str, eps: float | None, when: datetime) -> LedgerEvent:
    mech = Mechanism(kind="laplace", epsilon=eps) if eps is not None else None
    return LedgerEvent(id=i, time=when, dataset="d", task_id=task, kind=kind, mechanism=mech)  # type: ignore[arg-type]


def test_the_budget_series_counts_as_the_ledger_does() -> None:
    t = datetime(2026, 5, 1, tzinfo=UTC)
    last_year = datetime(2025, 12, 31, 23, 0, tzinfo=UTC)
    events = [
        _event(1, "reserve", "old", 5.0, last_year),  # another budget year: not counted
        _event(2, "reserve", "a", 1.0, t),
        _event(3, "reserve", "b", 2.0, t),
        _event(4, "spend", "a", 0.5, t),  # an open task's spend changes nothing: no point
        _event(5, "release", "a", None, t),  # closed: only its spend counts now
        _event(6, "release", "b", None, t),  # closed without spending: nothing
    ]
    points = budget_series(events, Budget(epsilon=10, delta=1e-5), now=t)
    assert [(p.event_id, p.what, p.composed) for p in points] == [(2, "reserve", 1.0), (3, "reserve", 3.0), (5, "release", 2.5), (6, "release", 0.5)]
    assert [p.naive for p in points] == [1.0, 3.0, 2.5, 0.5]
    forever = budget_series(events, Budget(epsilon=10, delta=1e-5, period="forever"), now=t)
    assert [p.composed for p in forever] == [5.0, 6.0, 8.0, 7.5, 5.5]
    assert len(budget_series(events, Budget(epsilon=10, delta=1e-5, period="forever"), now=t, limit=2)) == 2


def test_what_left_the_node_is_every_field_with_its_declared_protection() -> None:
    t = datetime(2026, 5, 1, tzinfo=UTC)

    def sent(payload: dict[str, Any]) -> AuditEntry:
        return AuditEntry(seq=1, time=t, kind="sent", task_id="x", payload=payload, prev_hash="", hash="")

    rows = releases_of([
        sent({"kind": "train", "arrays": {"fedgov-update": [82]}, "metrics": {"num-examples": 213.0}}),
        sent({"kind": "train", "arrays": {"fedgov-update": [82]}, "metrics": {"num-examples": 213.0}}),
        sent({"kind": "evaluate", "metrics": {"correct": 40.3, "total": 39.6, "num-examples": 1.0}}),
        sent({"kind": "hello", "error": {"code": 403, "reason": "the node is paused by its operator"}}),
        sent({"kind": "train", "metrics": {"loss": 0.3}}),
    ])
    by = {(r.kind, r.name): r for r in rows}
    assert by[("train", "fedgov-update")].times == 2 and by[("train", "fedgov-update")].shape == "shape 82"
    assert "ledger" in by[("train", "fedgov-update")].protection
    assert "noisy count" in by[("train", "num-examples")].protection or "released row count" in by[("train", "num-examples")].protection
    assert "Gaussian noise" in by[("evaluate", "correct")].protection
    assert "fixed template" in by[("hello", "code 403")].protection
    assert by[("train", "loss")].protection == ""  # undeclared: the gate would have blocked it
    assert all("213" not in r.shape and "40.3" not in r.shape for r in rows)  # names and shapes, no values


def _report(**kw: Any) -> TrainingReport:
    return TrainingReport(
        fedgov_version="0", run_id="r", task="t", task_file="t.toml", federation="f", contract="c@1.0", started=datetime.now(UTC),
        model="logreg", strategy="fedavg", rounds_planned=2, **kw,
    )


def test_participation_says_who_took_part_and_why_the_others_did_not() -> None:
    report = _report(
        nodes=[NodeResult(node="GM1", status="accepted"), NodeResult(node="GM2", status="accepted"),
               NodeResult(node="GM3", status="refused", refusal_code="budget-exhausted")],
        rounds=[RoundMetrics(round=0),
                RoundMetrics(round=1, nodes_asked=["GM1", "GM2"], nodes_trained=["GM1", "GM2"], nodes_evaluated=["GM1"]),
                RoundMetrics(round=2, nodes_asked=["GM1"], nodes_absent={"GM2": "offline"}, nodes_failed={"GM1": "timeout"})],
    )
    rounds, matrix = participation(report)
    assert rounds == [1, 2]
    cells = {code: [c.text for c in cs] for code, _, cs in matrix}
    assert cells == {"GM1": ["trained, evaluated", "failed: timeout"], "GM2": ["trained", "not asked: offline"],
                     "GM3": ["refused: budget-exhausted", "refused: budget-exhausted"]}


def test_the_runs_console_shows_training_query_and_a_damaged_report(tmp_path: Path, guard: Guard) -> None:
    from fedgov.analytics.combine import Figure, QueryResult
    from fedgov.analytics.report import QueryNode, QueryReport

    runs = tmp_path / "runs"
    (runs / "train").mkdir(parents=True)
    report = _report(
        status="completed", rounds=[RoundMetrics(round=1, accuracy=0.8, nodes_trained=["GM1"])],
        nodes=[NodeResult(node="GM1", name="One", status="accepted", epsilon=1.0, local_only_accuracy=0.7, federated_accuracy=0.8,
                          federated_accuracy_sd=0.01, gain=0.1),
               NodeResult(node="GM2", status="refused", refusal_code="too-few-rows", refusal_reason="fewer rows than limits.min_rows")],
    )
    data = json.loads(report.model_dump_json())
    data["nodes"][0]["personalised_accuracy"] = 0.8312  # what a fedgov with personal models adds
    (runs / "train" / "report.json").write_text(json.dumps(data))
    figs = [Figure(measure="m", kind="count", scope="national", cell=f"c={i}", estimate=10.0 * i, std_error=1.0, ci_low=10.0 * i - 2,
                   ci_high=10.0 * i + 2, nodes=2) for i in range(3)]
    figs += [Figure(measure="m", kind="count", scope="region", scope_value="province=Utrecht", cell="c=0", estimate=None, suppressed=True)]
    q = QueryReport(query="q", query_file="q.toml", contract="c@1.0", status="completed", started=datetime.now(UTC), epsilon=1.0,
                    nodes=[QueryNode(node="GM1", accepted=True), QueryNode(node="GM2", accepted=False, code="pending-approval", reason="waits")],
                    result=QueryResult(query="q", contract="c@1.0", epsilon=1, delta=0, mechanism="laplace", max_rows_per_person=1, figures=figs))
    (runs / "query").mkdir()
    (runs / "query" / "query.json").write_text(q.model_dump_json())
    (runs / "broken").mkdir()
    (runs / "broken" / "report.json").write_text("{not json")
    c = _client(coordinator_console(runs, guard))
    _login(c)
    index = c.get("/").text
    assert "train" in index and "query" in index and "broken" in index and "not JSON" in index
    train = c.get("/runs/train").text
    assert "Personalised accuracy" in train and "0.831" in train and "0.800 ± 0.010" in train and "+0.100" in train
    assert "too-few-rows" in train and "fewer rows than limits.min_rows" in train and "<svg" in train
    query = c.get("/runs/query").text
    assert query.count('class="errorbar"') == 3 and "pending-approval" in query and "waits" in query
    region = c.get("/runs/query?scope=region:province%3DUtrecht").text
    assert "suppressed" in region
    csv_text = c.get("/runs/query/figures.csv?measure=m&scope=national").text
    assert csv_text.splitlines()[0].startswith("measure,kind,scope") and len(csv_text.splitlines()) == 4
    assert c.get("/runs/nothing").status_code == 404 and c.get("/runs/..%2Fetc").status_code == 404
    assert "not JSON" in c.get("/runs/broken").text


def test_select_figures_and_their_csv() -> None:
    from fedgov.analytics.combine import Figure

    figs = [Figure(measure=m, kind="count", scope=s, scope_value=v, cell="", estimate=1.0)
            for m in ("a", "b") for s, v in (("national", ""), ("region", "province=X"), ("node", "GM1"))]
    assert [(f.measure, f.scope) for f in select_figures(figs, measure="a", scope="region")] == [("a", "region")]
    assert len(select_figures(figs, scope="node:GM1")) == 2 and select_figures(figs, scope="node:GM2") == []
    assert len(select_figures(figs, scope="bogus")) == 2  # an unknown scope shows the national figures
    assert figures_csv(figs[:1]).splitlines()[1] == "a,count,national,,,1.0,,,,0,0,false,false"


# --------------------------------------------------------------------------- the command line


def test_the_password_file_must_be_private(tmp_path: Path) -> None:
    p = tmp_path / "pw"
    p.write_text("correct horse battery staple\n")
    p.chmod(0o644)
    with pytest.raises(ConfigError, match="readable or writable by others"):
        read_password_file(p)
    p.chmod(0o600)
    assert read_password_file(p) == "correct horse battery staple"
    p.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 12"):
        read_password_file(p)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_password_file(tmp_path / "missing")


def test_only_loopback_without_tls() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    check_binding("127.0.0.1", tls=False)
    check_binding("0.0.0.0", tls=True)
    with pytest.raises(ConfigError, match="without TLS"):
        check_binding("0.0.0.0", tls=False)


def test_the_console_commands_refuse_an_open_address_without_tls_and_a_loose_password_file(tmp_path: Path, node_home: Any) -> None:
    home = node_home(tmp_path / "node")
    runner = CliRunner()
    r = runner.invoke(app, ["node", "console", "--node-dir", str(home.path), "--host", "0.0.0.0"])
    assert r.exit_code == int(ExitCode.CONFIG) and "without TLS" in r.output
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    os.chmod(pw, 0o640)
    r = runner.invoke(app, ["console", "--runs-dir", str(tmp_path), "--password-file", str(pw)])
    assert r.exit_code == int(ExitCode.CONFIG) and "chmod 600" in r.output
    r = runner.invoke(app, ["console", "--runs-dir", str(tmp_path / "none")])
    assert r.exit_code == int(ExitCode.USAGE)
    r = runner.invoke(app, ["node", "console", "--node-dir", str(home.path), "--tls-cert", str(pw)])
    assert r.exit_code == int(ExitCode.CONFIG) and "both" in r.output


def test_the_coordinator_console_says_when_its_superlink_does_not_answer(tmp_path: Path, guard: Guard) -> None:
    from fedgov.deploy.superlink import init_coordinator

    init_coordinator(tmp_path / "coord", port=free_port(), superlink_port=free_port())
    (tmp_path / "runs").mkdir()
    c = _client(coordinator_console(tmp_path / "runs", guard, coordinator_dir=tmp_path / "coord"))
    _login(c)
    page = c.get("/").text
    assert "does not answer" in page and "fedgov coordinator start" in page and "No run yet" in page


def test_beyond_loopback_the_console_speaks_tls_only(tmp_path: Path, node_home: Any) -> None:
    """A real server with a development certificate from fedgov's PKI helper: HTTPS with its CA
    works; plain HTTP gets no page."""
    import ssl
    import threading
    import time
    import urllib.error
    import urllib.request

    import uvicorn

    tls = tls_files("0.0.0.0", None, None, tmp_path / "tls")
    assert tls is not None and tls.ca is not None and (tmp_path / "tls" / "server.key").stat().st_mode & 0o077 == 0
    port = free_port()
    guard = Guard(SECRET, secure=True)  # as `fedgov node console` makes it under TLS
    server = uvicorn.Server(uvicorn.Config(node_console(node_home(tmp_path / "node"), guard), host="127.0.0.1", port=port,
                                           log_level="warning", ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        context = ssl.create_default_context(cafile=str(tls.ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/login", context=context, timeout=10) as r:  # noqa: S310 - https
            assert r.status == 200 and "Log in" in r.read().decode()
            assert r.headers["strict-transport-security"]
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=10)  # noqa: S310 - the point
    finally:
        server.should_exit = True
        thread.join(10)


def test_charts_escape_their_text_and_draw_every_interval() -> None:
    from fedgov.console.charts import Bar, Series, errorbar_chart, line_chart, nice_ticks, tick_labels

    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert tick_labels([590.0, 592.5, 595.0]) == ["590.0", "592.5", "595.0"]
    assert tick_labels([0.0, 1000.0, 2000.0]) == ["0", "1,000", "2,000"]
    assert nice_ticks(3.2, 3.2)[0] <= 3.2 <= nice_ticks(3.2, 3.2)[-1]
    evil = "<script>alert(1)</script>"
    svg = str(line_chart([Series(evil, [(1, 0.5), (2, None), (3, 0.7)])], title=evil, x_label="round", y_label="accuracy"))
    assert "<script" not in svg and "&lt;script&gt;" in svg and svg.count("<circle") == 3  # two points (the gap is none) and the legend's
    svg = str(errorbar_chart([Bar(evil, 10.0, 8.0, 12.0), Bar("b", None, None, None, "suppressed"), Bar("c", 5.0, 4.0, 6.0)],
                             title="t", y_label="count"))
    assert "<script" not in svg and svg.count('class="errorbar"') == 2 and "suppressed" in svg
    assert 'role="img"' in svg and "<title id=" in svg and "<desc id=" in svg


def test_the_console_commands_say_when_they_cannot_listen(tmp_path: Path) -> None:
    import socket

    from fedgov.deploy.superlink import init_coordinator

    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = runner.invoke(app, ["console", "--runs-dir", str(tmp_path), "--port", str(port)])
        assert r.exit_code == int(ExitCode.CONFIG) and f"cannot listen on 127.0.0.1:{port}" in r.output
    init_coordinator(tmp_path / "coord", port=free_port(), superlink_port=free_port())
    r = runner.invoke(app, ["coordinator", "console", "-C", str(tmp_path / "coord"), "--tls-key", str(tmp_path / "k")])
    assert r.exit_code == int(ExitCode.CONFIG) and "both" in r.output


# --------------------------------------------------------------------------- review (issue 19/20): an attacker's reading


def test_a_second_click_on_approve_writes_no_second_audit_entry(client: TestClient, home: NodeHome, guard: Guard) -> None:
    """A double click (or the same decision again from the command line) changes nothing in the
    node state; the audit log then records nothing either: one decision, one entry."""
    csrf = _login(client)
    for _ in range(2):
        r = client.post("/approvals/approve", data={"csrf": csrf, "task_id": "task-1"}, follow_redirects=False)
        assert r.status_code == 303
    approved = [e for e in home.audit.entries() if e.kind == "approved"]
    assert len(approved) == 1
    home.reject("task-1", "changed my mind", by="operator")
    home.reject("task-1", "changed my mind", by="operator")
    assert [e.kind for e in home.audit.entries()][-2:] == ["approved", "rejected"]
    assert home.audit.verify().ok


def test_redirects_after_a_form_stay_on_this_console_and_carry_the_task_id_encoded(client: TestClient, home: NodeHome) -> None:
    csrf = _login(client)
    for back in ("/\\evil.example", "//evil.example", "https://evil.example", "/\t/evil.example"):
        r = client.post("/pause", data={"csrf": csrf, "reason": "x", "back": back}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/", back
    home.state.enqueue("a&done=x", summary=SUMMARY)
    r = client.post("/approvals/approve", data={"csrf": csrf, "task_id": "a&done=x"}, follow_redirects=False)
    assert r.headers["location"] == "/approvals?done=approved&task=a%26done%3Dx"


def test_the_figures_csv_cannot_start_a_spreadsheet_formula() -> None:
    """Text a node or a registry gave (a region's name, a cell's value) that starts with = + - @
    (or a tab or carriage return) is kept as text by spreadsheets: a leading apostrophe (OWASP);
    numbers are left alone, negative ones too."""
    import csv
    import io

    from fedgov.analytics.combine import Figure

    figs = [Figure(measure="=HYPERLINK(\"http://evil\")", kind="count", scope="region", scope_value="+cmd|' /C calc'!A0",
                   cell="@SUM(A1)", estimate=-1.5, ci_low=-3.0, ci_high=0.5),
            Figure(measure="mean", kind="mean", scope="node", scope_value="-2+3", cell="\tx", estimate=2.0)]
    rows = list(csv.reader(io.StringIO(figures_csv(figs))))
    assert rows[1][:5] == ["'=HYPERLINK(\"http://evil\")", "count", "region", "'+cmd|' /C calc'!A0", "'@SUM(A1)"]
    assert rows[1][5] == "-1.5" and rows[1][7] == "-3.0"
    assert rows[2][3:5] == ["'-2+3", "'\tx"]


def test_a_console_bound_to_another_loopback_address_answers_to_it(tmp_path: Path) -> None:
    """127.0.0.2 is loopback, reachable from this machine only: the console answers a browser
    that names it (and still refuses other names: DNS rebinding)."""
    from fedgov.console.web import allowed_hosts_for

    assert allowed_hosts_for("127.0.0.2") == [*LOOPBACK_HOSTS, "127.0.0.2"]
    assert allowed_hosts_for("::1") == list(LOOPBACK_HOSTS)
    assert allowed_hosts_for("127.0.0.1") == list(LOOPBACK_HOSTS)
    assert allowed_hosts_for("192.0.2.7") is None  # TLS there: its certificate names the host


def test_the_development_ca_a_browser_is_told_to_trust_can_sign_nothing_else(tmp_path: Path) -> None:
    """A browser that trusts a CA trusts whatever it signs, for any site: the console's
    development CA signs its one server certificate and its key is then gone (a copy left in
    the directory could forge certificates for the operator's bank)."""
    tls = tls_files("0.0.0.0", None, None, tmp_path / "tls")
    assert tls is not None and tls.ca is not None and tls.ca.is_file() and tls.cert.is_file() and tls.key.is_file()
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.crt", "server.key", "server.pem"]
    again = tls_files("0.0.0.0", None, None, tmp_path / "tls")  # the next start reuses the certificate
    assert again == tls


def test_the_password_files_permissions_are_checked_on_the_file_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check and the read are of one open file: a name swapped between them (here: a stat
    by name that sees another, private file) cannot pass a file others can read."""
    loose, private = tmp_path / "pw", tmp_path / "private"
    loose.write_text("correct horse battery staple\n")
    loose.chmod(0o644)
    private.write_text("x\n")
    private.chmod(0o600)
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: real_stat(private if self == loose else self, **kw))
    with pytest.raises(ConfigError, match="readable or writable by others"):
        read_password_file(loose)
