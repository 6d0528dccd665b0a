"""The web consoles in a real browser: headless Chromium (Playwright) against real consoles
(``fedgov node console``, ``fedgov console --runs-dir``, each its own process) on a real node
directory and real run directories.

The node directories and runs are made by fedgov's own code, as ``fedgov run`` and ``fedgov
query`` make them, on fedgov's real ClientApp (:mod:`fedgov.testing`, without Flower's
transport): four municipalities with synthetic iWmo data (seeded), a 3-round training task
(reproducible noise), a statistics query with national, provincial and municipal figures, and
a second query that one node, switched to manual approval, queues for its operator.

The browser is the system's Chromium (``make test`` installs Debian's package where it may);
Playwright never downloads one here. Without Chromium the module is skipped, saying so.
Screenshots go to ``$FEDGOV_SCREENSHOTS`` (``FEDGOV_SCREENSHOTS=docs/img`` makes the README's)
or to the test's temporary directory.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FEDGOV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
CODES = ["GM0363", "GM0473", "GM0344", "GM0589"]  # Amsterdam, Zandvoort (North Holland); Utrecht, Oudewater (Utrecht)
MANUAL = "GM0473"  # the node whose operator the browser plays

pytestmark = pytest.mark.slow  # about 30 s: the federation's runs, two console processes, a browser

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    pytest.skip("the browser tests need the Python package playwright (pip install -e '.[test]')", allow_module_level=True)

expect.set_options(timeout=20_000)  # the first page of a console composes the budget (PRV): seconds on a busy machine

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"Chromium not found ({CHROMIUM}): the browser tests of the consoles did not run. 'make test' installs Debian's "
        "chromium package where it may (as root, with apt-get); else install it, or set FEDGOV_CHROMIUM to a Chromium",
        allow_module_level=True,
    )


# --------------------------------------------------------------------------- the world


def write_file_(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _build(tmp: Path) -> dict[str, Any]:
    """Node directories and run directories, by fedgov's own code (module docstring)."""
    from fedgov.analytics import load_query
    from fedgov.coordinator.run import run_training
    from fedgov.coordinator.statistics import run_query
    from fedgov.data import iwmo
    from fedgov.testing import InProcessGrid, prepare

    contract = ROOT / "configs" / "contracts" / "iwmo-wmo.toml"
    iwmo.write(tmp / "wmo.csv", iwmo.generate(2026, scale=0.2, codes=CODES))
    iwmo.write(tmp / "wmo-test.csv", iwmo.generate(2026, scale=0.2, codes=["GM0150"]))
    fed = write_file_(
        tmp / "fed.toml",
        f'name = "console-wmo"\nseed = 2026\nsource = "{tmp / "wmo.csv"}"\n[partition]\nkind = "column"\ncolumn = "municipality"\n'
        'test_fraction = 0.2\n' + "".join(f'[[members]]\ncode = "{c}"\n' for c in CODES),
    )
    task_text = (ROOT / "configs" / "tasks" / "wmo-ended-early.toml").read_text()
    task_text = task_text.replace('"../contracts/iwmo-wmo.toml"', f'"{contract}"').replace('"../federations/wmo-12.toml"', f'"{fed}"')
    task_text = task_text.replace("rounds = 5", "rounds = 3").replace(
        'accountant = "prv"',
        f'accountant = "prv"\nreproducible_noise = true\n[evaluation]\ncentralized = "{tmp / "wmo-test.csv"}"\nat_nodes = "every-round"\nepsilon = 0.3',
    )
    task_path = write_file_(tmp / "task.toml", task_text)
    task, tcontract, nodes, manifest = prepare(tmp / "nodes", fed, task_path)
    runs = tmp / "runs"
    training = run_training(
        InProcessGrid(manifest, len(nodes), run_id=7), task, tcontract, run_dir=runs / "20261203-training", expected_nodes=len(nodes),
        task_file=str(task_path), federation="console-wmo",
        local_baseline=bool(os.environ.get("FEDGOV_SCREENSHOTS")),  # local-only models: for the README's picture only (seconds)
        flower_run_id=7, connect_timeout=5,
    )
    assert training.status == "completed", training.message

    def query(name: str, run: str, run_id: int) -> Any:
        path = write_file_(tmp / f"{name}.toml", f'''
            name = "{name}"
            contract = "{contract}"
            regions = ["province"]
            [privacy]
            epsilon = 1.0
            delta = 0.0
            mechanism = "laplace"
            max_rows_per_person = 1
            [[measures]]
            name = "clients-by-category"
            kind = "count"
            by = ["product_category"]
            [[measures]]
            name = "mean-duration-days"
            kind = "mean"
            column = "duration_days"
            ''')
        q, qc = load_query(path)
        return run_query(InProcessGrid(manifest, len(nodes), run_id=run_id), q, qc, run_dir=runs / run, query_file=str(path),
                         expected_nodes=len(nodes), node_wait=5)

    first = query("wmo-console", "20261203-query", 8)
    assert first.status == "completed", first.message
    home = next(n.train_path.parent for n in nodes if n.code == MANUAL)
    policy = home / "policy.toml"
    policy.write_text(policy.read_text().replace('approval = "auto"', 'approval = "manual"'))
    second = query("wmo-second", "20261203-query-2", 9)
    assert [n.code for n in second.nodes if not n.accepted] == ["pending-approval"]
    return {"home": home, "runs": runs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Console:
    """A console started as its own process by the command line; its URL and login token."""

    def __init__(self, args: list[str]) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.proc = subprocess.Popen(  # noqa: S603 - our own command line
            [sys.executable, "-m", "fedgov.cli", *args, "--port", str(self.port)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = self._token()
        self._wait_listening()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _token(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if line.startswith("login token: "):
                return line.split(": ", 1)[1].strip()
        raise AssertionError("the console printed no login token:\n" + "".join(self.output))

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None, "the console exited:\n" + "".join(self.output)
            time.sleep(0.1)
        raise AssertionError("the console does not listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _build(tmp_path_factory.mktemp("console-world"))


@pytest.fixture(scope="module")
def consoles(world: dict[str, Any]) -> Iterator[dict[str, Console]]:
    started: dict[str, Console] = {}
    try:
        started["node"] = Console(["node", "console", "--node-dir", str(world["home"])])
        started["runs"] = Console(["console", "--runs-dir", str(world["runs"])])
        yield started
    finally:
        for c in started.values():
            c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    p = context.new_page()
    p.set_default_timeout(20_000)
    yield p
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("FEDGOV_SCREENSHOTS")
    out = (ROOT / wanted) if wanted and not Path(wanted).is_absolute() else Path(wanted) if wanted else tmp_path_factory.mktemp("shots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _login(page: Page, console: Console, secret: str | None = None, name: str = "") -> None:
    page.goto(console.url + "/")
    expect(page).to_have_url(console.url + "/login?next=%2F")
    page.get_by_label("Token or password").fill(secret if secret is not None else console.token)
    if name:
        page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Log in").click()


def _screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the node console


def test_the_node_console_refuses_without_its_token(page: Page, consoles: dict[str, Console], world: dict[str, Any]) -> None:
    node = consoles["node"]
    for path in ("/", "/budget", "/audit", "/approvals"):
        page.goto(node.url + path)
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    _login(page, node, secret="not-the-token")
    expect(page.get_by_role("alert")).to_contain_text("not this console's token")
    # a form sent without a session is refused, and changes nothing
    response = page.request.post(node.url + "/pause", form={"reason": "forged"}, max_redirects=0)
    assert response.status == 403
    from fedgov.node.home import NodeHome

    assert NodeHome(world["home"]).state.paused() == (False, "")


def test_log_in_see_the_budget_and_approve_a_pending_query(
    page: Page, consoles: dict[str, Console], world: dict[str, Any], shots: Path,
) -> None:
    from fedgov.node.home import NodeHome, budget_of

    node = consoles["node"]
    home = NodeHome(world["home"])
    [pending] = home.state.pending()
    # keyboard only: the token field has the focus, Enter logs in
    page.goto(node.url + "/")
    # the field takes the focus itself (autofocus); wait for it before typing, which a loaded
    # machine can otherwise start before the page has applied it
    expect(page.get_by_label("Token or password")).to_be_focused()
    page.keyboard.type(node.token)
    page.keyboard.press("Tab")
    page.keyboard.type("Anna de Vries")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=f"Node {MANUAL}")).to_be_visible()
    expect(page.locator("#audit-chain")).to_contain_text("hash chain intact")

    # the budget: what the ledger says, composed and naive
    ds = home.policy().datasets[0]
    status = home.ledger.status(ds.name, budget_of(ds))
    row = page.locator("table.budget tbody tr", has_text=ds.name)
    expect(row).to_contain_text(f"{status.epsilon_committed:.3f}")
    expect(row).to_contain_text(f"{status.epsilon_naive:.3f}")
    page.get_by_role("link", name="Budget", exact=True).click()
    chart = page.locator("svg.chart").first
    expect(chart).to_be_visible()
    assert "Committed epsilon of data set" in (chart.locator("title").first.text_content() or "")
    _screenshot(page, shots / "node-console.png")

    # approve the pending query with the keyboard; the decision appears in the audit log
    page.get_by_role("link", name="Approvals").click()
    expect(page.get_by_role("heading", name=pending.task_id)).to_be_visible()
    expect(page.locator("article.pending")).to_contain_text("noisy aggregates per cell")
    _screenshot(page, shots / "node-console-approvals.png")
    page.get_by_role("button", name=f"Approve {pending.task_id}").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_contain_text("approved")
    expect(page.locator("#no-pending")).to_be_visible()
    page.get_by_role("link", name="Audit log").click()
    first = page.locator("#audit-table tbody tr").first
    expect(first).to_contain_text("approved")
    expect(first).to_contain_text(pending.task_id)
    who = first.locator("td.details").inner_text()
    assert "by=console:" in who and "Anna de Vries" in who
    # the same node state and audit entry as `fedgov node approve`
    assert home.state.status(pending.task_id) == "approved"
    last = home.audit.entries()[-1]
    assert last.kind == "approved" and last.task_id == pending.task_id
    assert last.payload == {"by": home.state.get(pending.task_id).decided_by, "summary": pending.summary}  # type: ignore[union-attr]
    assert last.payload["by"].startswith("console:") and home.audit.verify().ok


def test_a_forged_form_is_refused(page: Page, consoles: dict[str, Console], world: dict[str, Any], browser: Browser) -> None:
    from fedgov.node.home import NodeHome

    node = consoles["node"]
    home = NodeHome(world["home"])
    _login(page, node)
    expect(page.locator("#pause-state")).to_contain_text("not paused")
    entries = len(home.audit.entries())
    # logged in, but the anti-forgery token is wrong: refused
    response = page.request.post(node.url + "/pause", form={"csrf": "forged", "reason": "x"}, max_redirects=0)
    assert response.status == 403 and "anti-forgery" in response.text()
    # a page of another origin (here: another port on this host, the same *site*, so the
    # SameSite cookie goes along) that submits a form to the console: refused by its origin
    evil = _free_port()
    html = (f'<html><body><form method="post" action="{node.url}/pause"><input name="csrf" value="guess">'
            '<input name="reason" value="forged"><button id="go">go</button></form></body></html>').encode()
    server = _serve_once(evil, html)
    try:
        page.goto(f"http://127.0.0.1:{evil}/")
        page.click("#go")
        expect(page.get_by_role("heading", name="Refused")).to_be_visible()
        expect(page.get_by_role("alert")).to_contain_text("another site")
    finally:
        server.shutdown()
    assert home.state.paused() == (False, "") and len(home.audit.entries()) == entries
    # the console's own form works, and records who paused
    page.goto(node.url + "/")
    page.get_by_label("Reason").fill("maintenance window")
    page.get_by_role("button", name="Pause the node").click()
    expect(page.locator("#pause-state")).to_contain_text("maintenance window")
    assert home.state.paused() == (True, "maintenance window")
    assert home.audit.entries()[-1].payload["by"].startswith("console:")
    page.get_by_role("button", name="Resume the node").click()
    expect(page.locator("#pause-state")).to_contain_text("not paused")


def _serve_once(port: int, body: bytes) -> Any:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_what_left_the_node_and_the_policy(page: Page, consoles: dict[str, Console]) -> None:
    node = consoles["node"]
    _login(page, node)
    page.get_by_role("link", name="Tasks").click()
    page.get_by_role("link", name="wmo-ended-early").first.click()
    releases = page.locator("#releases")
    expect(releases).to_contain_text("fedgov-update")
    expect(releases).to_contain_text("DP-SGD noise at the node")
    expect(releases).not_to_contain_text("not declared")
    page.get_by_role("link", name="Policy").click()
    expect(page.get_by_role("heading", name="Contracts this node holds")).to_be_visible()
    expect(page.locator("main")).to_contain_text("matches")


# --------------------------------------------------------------------------- the runs console


def test_runs_training_and_query_figures_with_error_bars(
    page: Page, consoles: dict[str, Console], world: dict[str, Any], shots: Path,
) -> None:
    runs = consoles["runs"]
    _login(page, runs)
    table = page.locator("#runs")
    expect(table.locator("tbody tr")).to_have_count(3)
    expect(table).to_contain_text("completed")

    page.get_by_role("link", name="20261203-training").click()
    expect(page.locator("svg.chart")).to_have_count(1)
    per_node = page.locator("#per-node")
    for code in CODES:
        expect(per_node).to_contain_text(code)
    expect(page.locator("#participation")).to_contain_text("trained, evaluated")
    _screenshot(page, shots / "coordinator-console.png")

    page.get_by_role("link", name="All runs").click()
    page.get_by_role("link", name="20261203-query", exact=True).click()
    bars = page.locator("svg.chart g.errorbar")
    assert bars.count() >= 18  # 18 product categories nationally, and the mean, each with its interval
    expect(page.locator("svg.chart").first).to_contain_text("clients-by-category")
    page.get_by_label("Where").select_option(label="every region")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("heading", name="province: North Holland").first).to_be_visible()
    expect(page.get_by_role("heading", name="province: Utrecht").first).to_be_visible()
    page.get_by_label("Measure").select_option("clients-by-category")
    page.get_by_label("Where").select_option(label="GM0363")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("heading", name="municipality GM0363")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download these figures (CSV)").click()
    text = Path(download.value.path()).read_text()
    lines = text.splitlines()
    assert lines[0].startswith("measure,kind,scope,scope_value,cell,estimate,std_error,ci_low,ci_high")
    assert len(lines) > 1 and all(",node,GM0363," in line for line in lines[1:])
    page.get_by_label("Where").select_option(label="national")
    page.get_by_label("Measure").select_option("")
    page.get_by_role("button", name="Show").click()
    _screenshot(page, shots / "coordinator-console-query.png")

    # the second query: the node that waits for its operator, with the reason
    page.get_by_role("link", name="All runs").click()
    page.get_by_role("link", name="20261203-query-2").click()
    expect(page.locator("#answers")).to_contain_text("pending-approval")


def test_pages_fit_a_tablet(browser: Browser, consoles: dict[str, Console]) -> None:
    context = browser.new_context(viewport={"width": 768, "height": 1024})
    page = context.new_page()
    try:
        for console, paths in ((consoles["node"], ["/", "/budget", "/audit", "/policy"]),
                               (consoles["runs"], ["/", "/runs/20261203-training", "/runs/20261203-query"])):
            _login(page, console)
            for path in paths:
                page.goto(console.url + path)
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path
                assert page.locator("script").count() == 0
    finally:
        context.close()
