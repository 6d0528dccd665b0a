"""Shared fixtures and factories of the whole suite.

Paths into the repository, the Hypothesis profile, and one factory for each file or directory
the tests keep making: a text file (``write_file``), a federation (``write_federation``), a
training task (``write_task``) and a node's home with its policy (``node_home``). A factory is
a plain function handed out by a fixture, so that module-scoped fixtures can use it too.

Layer-specific fixtures live beside their tests: ``tests/inprocess/conftest.py`` (running a
task on an in-process federation), ``tests/e2e/conftest.py`` (real Flower processes).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

from fedgov.node.home import NodeHome
from fedgov.node.policy import default_policy_text

ROOT = Path(__file__).resolve().parent.parent
ADULT = ROOT / "data" / "adult" / "adult.csv"
ADULT_TEST = ROOT / "data" / "adult" / "adult_test.csv"
CONTRACT = ROOT / "configs" / "contracts" / "adult-income.toml"

# Property tests must not fail by chance in CI: there Hypothesis runs derandomized (the same
# examples every run, derived from each test's source). Elsewhere it explores new examples on
# every run, and a failure it finds is a real counterexample (it prints how to reproduce it).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# One torch thread per test process, and per process it starts (Flower's, in the end-to-end
# tests): the suite runs on two workers on two cores, and the tests' models are small. With a
# thread pool each, a busy machine made every logistic-regression step wait ~2 ms for a
# descheduled thread (profiled in the attack tests); on an idle one, one thread is as fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# --------------------------------------------------------------------------- repetition


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--repeat-statistical", type=int, default=1, metavar="N",
        help="run every test marked statistical N times (fresh randomness each time): scripts/repeat_statistical.sh",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    n = metafunc.config.getoption("--repeat-statistical")
    if n > 1 and metafunc.definition.get_closest_marker("statistical") is not None:
        metafunc.fixturenames.append("statistical_run")
        metafunc.parametrize("statistical_run", range(1, n + 1), ids=lambda i: f"run{i}")


# --------------------------------------------------------------------------- parallel runs


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``pytest -n 2 --dist loadgroup`` (``make test``): the end-to-end tests, which start
    Flower and Ray processes, run in two serial groups (simulations; deployments), which start
    first, one on each worker; an in-process module runs
    whole on one worker, so that its module-scoped set-up (a prepared federation, its runs) is
    made once; unit tests go one by one to whichever worker is free. (A scheduler rather than
    ``xdist_group`` marks: pytest-xdist 3.8 groups by rewriting node ids, which pytest 9 no
    longer allows.)"""
    if config.getoption("dist", "no") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndTogether(LoadScopeScheduling):  # type: ignore[misc]  # pytest-xdist ships no type information
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path.endswith("test_console_browser.py"):
                return path  # a browser against the web consoles: no Flower process, runs beside either group
            if path.startswith("tests/e2e/"):
                # Two serial groups, one per worker at the start: simulations (Flower's
                # simulation engine, Ray) and deployments (SuperLink, SuperNodes, gateway).
                simulated = path.endswith(("test_simulation_e2e.py", "test_stats_e2e.py"))
                return "tests/e2e:simulation" if simulated else "tests/e2e:deployment"
            return path if path.startswith("tests/inprocess/") else nodeid

    return EndToEndTogether(config, log)


# --------------------------------------------------------------------------- paths


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def adult_contract_path() -> Path:
    return CONTRACT


@pytest.fixture(scope="session")
def adult_csv() -> Path:
    """The Adult training data (the source that federations split among municipalities)."""
    return ADULT


@pytest.fixture(scope="session")
def adult_test_csv() -> Path:
    """The Adult test data (a task's centralized evaluation)."""
    return ADULT_TEST


@pytest.fixture(scope="session")
def demo_task_path() -> Path:
    return ROOT / "configs" / "tasks" / "adult-income.toml"


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps the messages it creates with the running task's identity (run 1, task 1, as
    a ServerApp process sets it); give it one for the test, then take it back."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# --------------------------------------------------------------------------- factories


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal: strings and paths quoted, booleans lower case, lists inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def toml_table(header: str | None, values: Mapping[str, Any]) -> str:
    """``[header]`` (none for the top level) and one ``key = value`` line per entry; None values are left out."""
    lines = [f"[{header}]"] if header else []
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_file_(path: Path, text: str | bytes) -> Path:
    """Write ``text`` (dedented: tests indent their inline files) or ``bytes`` to ``path``, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def write_federation_(
    path: Path,
    *,
    name: str,
    members: Sequence[str],
    seed: int,
    min_rows: int,
    skew: str | None = None,
    dirichlet_alpha: float | None = None,
    source: Path = ADULT,
) -> Path:
    """A federation of ``members`` (municipality codes) that splits ``source`` by population."""
    partition = {"kind": "population", "skew": skew, "dirichlet_alpha": dirichlet_alpha, "min_rows": min_rows}
    text = toml_table(None, {"name": name, "seed": seed, "source": source}) + toml_table("partition", partition)
    text += "".join("\n" + toml_table("[members]", {"code": code}) for code in members)
    return write_file_(path, text)


def write_task_(
    path: Path,
    *,
    name: str,
    training: Mapping[str, Any],
    privacy: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
    federation: Path | None = None,
    contract: Path = CONTRACT,
    model: str | Mapping[str, Any] | None = "logreg",
    personal: Mapping[str, Any] | None = None,
) -> Path:
    """A training task on the Adult contract: the sections as given (``model``: the model's name or
    its whole section, None for no ``[model]`` section; ``evaluation=None``: no ``[evaluation]``
    section); a None value leaves its key out; ``training.local_epochs`` is 1 unless given. ``personal`` is the ``[personal]`` section; by
    default the nodes keep no personal model (fine-tuning at every node of every run would cost
    the suite seconds a run; ``tests/inprocess/test_personal_release.py`` turns it on)."""
    text = toml_table(None, {"name": name, "contract": contract, "federation": federation})
    if model is not None:
        text += toml_table("model", {"name": model} if isinstance(model, str) else model)
    # one local epoch unless a test says otherwise (local_epochs=None: fedgov's automatic epochs, which
    # give small nodes up to 20 epochs a round where local steps spend no privacy: seconds per run)
    training = {"local_epochs": 1, **training}
    text += toml_table("training", training) + toml_table("privacy", privacy)
    if evaluation is not None:
        text += toml_table("evaluation", evaluation)
    text += toml_table("personal", personal if personal is not None else {"enabled": False})
    return write_file_(path, text)


def make_node_home(
    path: Path,
    code: str = "GM0363",
    *,
    budget: float = 10.0,
    dataset: str = "adult",
    contract: str = "adult-income",
    data: str | Path = "train.csv",
    **policy: Any,
) -> NodeHome:
    """A node directory at ``path`` with the default policy of ``code`` (``fedgov node init``'s
    template) for one data set; ``policy`` passes further template options (approval, kinds ...)."""
    text = default_policy_text(code, dataset=dataset, contract=contract, version="1.0", path=data, budget_epsilon=budget, **policy)
    return NodeHome.create(path, policy_text=text)


@pytest.fixture(scope="session")
def write_file() -> Callable[[Path, str | bytes], Path]:
    """``write_file(path, text)``: the file, dedented, its folder made."""
    return write_file_


@pytest.fixture(scope="session")
def write_federation() -> Callable[..., Path]:
    """``write_federation(path, name=, members=, seed=, min_rows=, skew=, dirichlet_alpha=, source=)``."""
    return write_federation_


@pytest.fixture(scope="session")
def write_task() -> Callable[..., Path]:
    """``write_task(path, name=, training={...}, privacy={...}, evaluation={...}, federation=, model=)``."""
    return write_task_


@pytest.fixture
def node_home(tmp_path: Path) -> Callable[..., NodeHome]:
    """``node_home(path=tmp_path / "node", code="GM0363", budget=10.0, **policy)``: a node's home."""

    def make(path: Path | None = None, code: str = "GM0363", **kw: Any) -> NodeHome:
        return make_node_home(path or tmp_path / "node", code, **kw)

    return make


def with_sql_(policy_text: str, block: str) -> str:
    """A policy (``default_policy_text``'s template) whose data set is the SQL query ``block``
    (the lines of ``[datasets.sql]``) instead of its file: ``path``/``test_path`` go, the table
    comes after the data set's budget."""
    import re

    text = re.sub(r"^(test_)?path = .*\n", "", policy_text, flags=re.M)
    marker = "\n# What this node takes part in."
    assert marker in text
    return text.replace(marker, "\n[datasets.sql]\n" + textwrap.dedent(block).strip() + "\n" + marker, 1)


@pytest.fixture(scope="session")
def with_sql() -> Callable[[str, str], str]:
    """``with_sql(policy_text, block)``: the policy with its data set as the SQL query ``block``."""
    return with_sql_
