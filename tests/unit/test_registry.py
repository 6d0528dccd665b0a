"""Organisation registries: the CBS municipalities by default, any others from a registry file;
every problem with its file, line and column; members checked against the federation's
registry; codes safe wherever they end up; the names reach the nodes' policies and answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgov.config import load_contract, load_federation
from fedgov.config.registry import CODE_PATTERN, default_registry, load_registry
from fedgov.errors import ConfigError
from fedgov.node.home import NodeHome

ROOT = Path(__file__).resolve().parents[2]


def _problems(err: ConfigError) -> list[tuple[str, str, str]]:
    return [(p.file, p.location, p.message) for p in err.problems]


def _fed(path: Path, members: list[str], *, registry: str | None = "orgs.csv", kind: str = "column", extra: str = "") -> Path:
    head = f'name = "abroad"\nsource = "data.csv"\n{extra}'
    if registry is not None:
        head += f'registry = "{registry}"\n'
    head += f'[partition]\nkind = "{kind}"\n' + ('column = "org"\n' if kind == "column" else "")
    path.write_text(head + "".join(f'[[members]]\ncode = "{c}"\n' for c in members), encoding="utf-8")
    return path


ORGS = "code,name,region,population\nK0301,Oslo,Oslo,709000\nK4601,Bergen,Vestland,291000\nK5001,Trondheim,Trøndelag,\n"


# --------------------------------------------------------------------------- the default registry


def test_the_default_registry_is_the_342_cbs_municipalities() -> None:
    reg = default_registry()
    assert len(reg) == 342 and reg.default
    assert all(re.fullmatch(r"GM\d{4}", o.code) for o in reg)
    assert reg.name("GM0363") == "Amsterdam" and reg.get("GM0363").region == "North Holland"  # type: ignore[union-attr]
    assert reg.path.is_absolute() and reg.path.is_file() and reg.path.name == "nl_gemeenten.csv"
    # a code it does not hold: its own code as name, and an error that says where the list is
    assert reg.name("VR09") == "VR09"
    assert str(reg.path) in reg.unknown("GM9999")


# --------------------------------------------------------------------------- registry files


def test_a_registry_file_loads_with_optional_columns(tmp_path: Path) -> None:
    p = tmp_path / "orgs.csv"
    p.write_bytes(b"\xef\xbb\xbf" + ORGS.encode())  # a spreadsheet's UTF-8 byte-order mark is fine
    reg = load_registry(p)
    assert not reg.default and reg.path == p.resolve() and len(reg) == 3
    assert reg.get("K5001").name == "Trondheim" and reg.get("K5001").region == "Trøndelag"  # type: ignore[union-attr]
    assert reg.get("K5001").population is None and reg.get("K0301").population == 709000  # type: ignore[union-attr]
    q = tmp_path / "minimal.csv"
    q.write_text("name,code\nWaterschap Aa en Maas,WS0654\n\n", encoding="utf-8")  # any column order; blank lines skipped
    assert load_registry(q).get("WS0654").region is None  # type: ignore[union-attr]


def test_every_problem_of_a_registry_names_file_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(
        "code,name,population\n"
        "ok-1,Fine,10\n"
        "../x,Traversal,1\n"  # line 3: a path
        "a b,Space,1\n"  # line 4: a space
        "OK-1,Same code in other case,1\n"  # line 5: a duplicate ignoring case
        "x2,,1\n"  # line 6: no name
        "x3,Bad population,-4\n"  # line 7
        "x4,Not a number,many\n"  # line 8
        "x5,Control\x07char,1\n"  # line 9
        "x6,Too,many,fields\n",  # line 10
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as ei:
        load_registry(p)
    found = _problems(ei.value)
    assert {f for f, _, _ in found} == {str(p.resolve())}
    where = {loc for _, loc, _ in found}
    assert {
        "line 3, column 'code'", "line 4, column 'code'", "line 5, column 'code'", "line 6, column 'name'",
        "line 7, column 'population'", "line 8, column 'population'", "line 9, column 'name'", "line 10",
    } == where
    text = str(ei.value)
    assert "already given on line 2" in text and "whole number" in text and "no '/'" in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty"),
        ("code,naam\nA,B\n", "missing column(s) name"),
        ("code,name,province\nA,B,C\n", "unknown column(s) 'province'"),
        ("code,name\n", "lists no organisation"),
        (b"code,name\nA,\xff\n", "not UTF-8"),
    ],
)
def test_a_malformed_registry_says_what_is_expected(tmp_path: Path, content: str | bytes, expected: str) -> None:
    p = tmp_path / "r.csv"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=re.escape(expected)) as ei:
        load_registry(p)
    assert str(p.resolve()) in str(ei.value)


def test_a_missing_registry_names_its_full_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str((tmp_path / "nope.csv").resolve()))):
        load_registry(tmp_path / "nope.csv")


def test_an_edited_registry_is_read_again(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text("code,name\nA,Alpha\n", encoding="utf-8")
    assert load_registry(p).name("A") == "Alpha"
    p.write_text("code,name\nA,Alpha renamed\n", encoding="utf-8")
    assert load_registry(p).name("A") == "Alpha renamed"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=70))
def test_an_accepted_code_is_a_safe_path_component(code: str) -> None:
    """Codes become node directories, node ids, roster names and ledger keys: one the syntax
    accepts never leaves its parent directory, never holds a separator, quote or white space."""
    if not re.fullmatch(CODE_PATTERN, code):
        return
    assert code not in (".", "..") and len(code) <= 64
    assert not any(c in code for c in "/\\'\" \t\n\r\0:")
    base = Path("/srv/fedgov/nodes")
    assert (base / code).resolve().parent == base


# --------------------------------------------------------------------------- federations


def test_members_come_from_the_federations_registry(tmp_path: Path) -> None:
    (tmp_path / "orgs.csv").write_text(ORGS, encoding="utf-8")
    fed = load_federation(_fed(tmp_path / "f.toml", ["K0301", "K4601", "K5001"]))
    assert [m.name for m in fed.members] == ["Oslo", "Bergen", "Trondheim"]
    assert fed.organisations.path == (tmp_path / "orgs.csv").resolve()
    assert fed.name_of("K4601") == "Bergen" and fed.policy_name("K4601") == "Bergen"
    # a Dutch municipality's policy names no organisation: the node finds its CBS name itself
    demo = load_federation(ROOT / "configs" / "federations" / "demo-12.toml")
    assert demo.registry is None and demo.policy_name("GM0363") is None and demo.members[1].name == "Amsterdam"


def test_a_member_unknown_to_the_registry_is_an_error_naming_the_registry(tmp_path: Path) -> None:
    (tmp_path / "orgs.csv").write_text(ORGS, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_federation(_fed(tmp_path / "f.toml", ["K0301", "GM0363", "K9999"]))
    found = _problems(ei.value)
    assert [loc for _, loc, _ in found] == ["members[1].code", "members[2].code"]
    assert all(str((tmp_path / "orgs.csv").resolve()) in msg for _, _, msg in found)
    # without a registry the CBS list decides, and the error says where that list is
    with pytest.raises(ConfigError) as ei:
        load_federation(_fed(tmp_path / "g.toml", ["K0301"], registry=None))
    (problem,) = ei.value.problems
    assert problem.location == "members[0].code"
    assert str(default_registry().path) in problem.message and "registry =" in problem.message


def test_a_bad_registry_is_reported_from_the_federation_with_its_lines(tmp_path: Path) -> None:
    (tmp_path / "orgs.csv").write_text("code,name\nK0301,Oslo\nK/1,Slash\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_federation(_fed(tmp_path / "f.toml", ["K0301"]))
    (problem,) = ei.value.problems
    assert problem.location == "registry"
    assert str((tmp_path / "orgs.csv").resolve()) in problem.message and "line 3, column 'code'" in problem.message
    with pytest.raises(ConfigError, match=r"registry: .*missing\.csv: no such file"):
        load_federation(_fed(tmp_path / "g.toml", ["K0301"], registry="missing.csv"))


def test_population_partitioning_needs_a_population_for_every_member(tmp_path: Path) -> None:
    (tmp_path / "orgs.csv").write_text(ORGS, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_federation(_fed(tmp_path / "f.toml", ["K0301", "K5001"], kind="population"))
    (problem,) = ei.value.problems
    assert problem.location == "partition.kind"
    assert "K5001" in problem.message and "K0301" not in problem.message and "'population' column" in problem.message
    assert load_federation(_fed(tmp_path / "g.toml", ["K0301", "K4601"], kind="population")).members[0].name == "Oslo"


def test_population_partitioning_follows_the_registrys_populations(tmp_path: Path, adult_contract_path: Path) -> None:
    from fedgov.data import split_federation

    (tmp_path / "orgs.csv").write_text("code,name,population\nbig,Big,9000\nsmall,Small,1000\n", encoding="utf-8")
    fed = load_federation(_fed(tmp_path / "f.toml", ["big", "small"], kind="population", extra="seed = 3\n"))
    contract = load_contract(adult_contract_path)
    df = pd.DataFrame({"income": np.array([">50K", "<=50K"] * 500)})
    parts = split_federation(fed, contract, df)
    assert len(parts["big"]) + len(parts["small"]) == 1000
    assert len(parts["big"]) > 4 * len(parts["small"])


def test_the_shipped_safety_region_federation_loads() -> None:
    fed = load_federation(ROOT / "configs" / "federations" / "safety-regions-wmo.toml")
    assert fed.registry is not None and fed.registry.name == "nl-veiligheidsregios.csv"
    assert len(fed.organisations) == 25
    assert [m.name for m in fed.members] == ["Groningen", "Fryslân", "Drenthe", "Utrecht", "Zeeland", "Flevoland"]
    cbs = default_registry()
    claimed = [v for m in fed.members for v in m.values or []]
    assert len(claimed) == len(set(claimed)) and all(v in cbs for v in claimed)


# --------------------------------------------------------------------------- the node side


def test_a_node_states_its_own_name_in_its_policy(tmp_path: Path, node_home) -> None:
    from fedgov.node.admission import node_display_name
    from fedgov.node.policy import default_policy_text

    dutch = node_home(tmp_path / "a", "GM0363")
    head = dutch.policy_path.read_text("utf-8").split("[[datasets]]")[0]
    assert "\nname = " not in head  # a municipality's policy is as it was
    assert dutch.policy().name is None and node_display_name(dutch, "GM0363") == "Amsterdam"
    foreign = node_home(tmp_path / "b", "K0301", name="Oslo kommune")
    assert '\nnode = "K0301"\n# The organisation\'s name, as reports show it.\nname = "Oslo kommune"\n' in foreign.policy_path.read_text("utf-8")
    assert foreign.policy().name == "Oslo kommune" and node_display_name(foreign, "K0301") == "Oslo kommune"
    assert node_display_name(node_home(tmp_path / "c", "VR09"), "VR09") == "VR09"  # no name, no CBS code: the code
    with pytest.raises(ConfigError, match="plain text"):
        default_policy_text("K0301", name="Oslo\nkommune", dataset="d", contract="c", version="1.0", path="t.csv", budget_epsilon=1.0)
    with pytest.raises(ConfigError):
        default_policy_text("../K0301", dataset="d", contract="c", version="1.0", path="t.csv", budget_epsilon=1.0)


def test_the_gate_lets_a_hello_name_only_this_node() -> None:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgov import protocol as P
    from fedgov.node.gate import GateContext, check_reply

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def hello(node: str, name: str) -> Message:
        body = P.NodeHello(node=node, node_name=name, accepted=True).model_dump_json()
        return Message(RecordDict({P.HELLO: ConfigRecord({P.NODE_JSON: body})}), dst_node_id=1, message_type="query")

    me = GateContext(kind=P.HELLO, identity=("K0301", "Oslo"))
    assert check_reply(hello("K0301", "Oslo"), me) == []
    assert check_reply(hello("K0301", "Oslo: 412 rows"), me) == ["node-json: node_name is not this node's name"]
    assert check_reply(hello("K4601", "Oslo"), me) == ["node-json: node is not this node's code"]


def test_regions_come_from_the_registry(tmp_path: Path) -> None:
    from fedgov.coordinator.statistics import regions_of

    (tmp_path / "orgs.csv").write_text(ORGS, encoding="utf-8")
    reg = load_registry(tmp_path / "orgs.csv")
    assert regions_of(["K0301", "K4601", "X"], ["region"], registry=reg) == {"K0301": {"region": "Oslo"}, "K4601": {"region": "Vestland"}, "X": {}}
    assert regions_of(["GM0363"], ["province"]) == {"GM0363": {"province": "North Holland"}}
    assert json.dumps(regions_of(["K0301"], ["province"], registry=reg)) == '{"K0301": {}}'


# --------------------------------------------------------------------------- the command line


def test_the_command_line_uses_the_registrys_names(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedgov.cli import app
    from fedgov.privacy.roster import IDENTITY_PUB, ensure_identity

    runner = CliRunner()
    (tmp_path / "orgs.csv").write_text(ORGS, encoding="utf-8")
    # fedgov check: a federation of another registry says which
    fed = _fed(tmp_path / "f.toml", ["K0301", "K4601"])
    out = runner.invoke(app, ["check", str(fed)])
    assert out.exit_code == 0 and "2 members of registry" in out.output, out.output
    # fedgov node init --organisation: the node states its organisation's name
    node = tmp_path / "oslo"
    out = runner.invoke(app, [
        "node", "init", str(node), "--name", "K0301", "--organisation", "Oslo kommune",
        "-c", str(ROOT / "configs/contracts/adult-income.toml"), "--data", str(ROOT / "data/adult/adult_test.csv"),
    ])
    assert out.exit_code == 0, out.output
    assert NodeHome(node).policy().name == "Oslo kommune"
    # fedgov roster show --registry: each member's organisation beside its code
    roster = tmp_path / "roster.json"
    assert runner.invoke(app, ["roster", "init", str(roster), "--federation", "abroad"]).exit_code == 0
    ensure_identity(tmp_path / "bergen", "K4601")
    assert runner.invoke(app, ["roster", "add", str(roster), "K4601", str(tmp_path / "bergen" / IDENTITY_PUB)]).exit_code == 0
    assert runner.invoke(app, ["roster", "add", str(roster), "K0301", str(node / IDENTITY_PUB)]).exit_code == 0
    shown = runner.invoke(app, ["roster", "show", str(roster), "--registry", str(tmp_path / "orgs.csv")], terminal_width=200)
    assert shown.exit_code == 0 and "Bergen" in shown.output and "Oslo" in shown.output, shown.output
    plain = runner.invoke(app, ["roster", "show", str(roster)], terminal_width=200)
    assert plain.exit_code == 0 and "Bergen" not in plain.output and "organisation" not in plain.output
