"""Typed configuration: the shipped files load, and malformed ones list every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgov.config import load_contract, load_federation, load_task
from fedgov.errors import ConfigError, ExitCode


def locations(err: ConfigError) -> set[str]:
    return {p.location for p in err.problems}


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs" / "tasks").glob("*.toml")))
def test_shipped_tasks_load_with_their_contract_and_federation(path: Path) -> None:
    task, contract = load_task(path)
    assert contract.target is not None
    assert task.federation is not None and task.federation.is_file()
    fed = load_federation(task.federation)
    assert len(fed.members) >= task.training.min_nodes
    if task.evaluation.centralized is not None:
        assert task.evaluation.centralized.is_file()


def test_relative_paths_resolve_against_the_file(demo_task_path: Path) -> None:
    task, _ = load_task(demo_task_path)
    assert task.contract.is_absolute()
    assert task.contract == (demo_task_path.parent / "../contracts/adult-income.toml").resolve()


def test_contract_lists_every_problem_with_its_location(tmp_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "c.toml",
        """
        name = "Bad Name"
        version = "one"
        target = "nope"
        colour = "blue"
        [[columns]]
        name = "age"
        type = "integer"
        min = 90
        max = 17
        [[columns]]
        name = "kind"
        type = "categorical"
        [[columns]]
        name = "x"
        type = "complex"
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_contract(p)
    err = ei.value
    assert err.exit_code == ExitCode.CONFIG
    locs = locations(err)
    assert {"name", "version", "colour", "columns[0]", "columns[1]", "columns[2].type"} <= locs
    text = str(err)
    assert str(p) in text
    assert "'min' (90.0) is above 'max' (17.0)" in text
    assert "categorical column needs" in text


def test_contract_target_must_exist_and_be_categorical(tmp_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "c.toml",
        """
        name = "c"
        version = "1.0"
        target = "age"
        [[columns]]
        name = "age"
        type = "integer"
        min = 0
        max = 120
        """,
    )
    with pytest.raises(ConfigError, match="must be categorical"):
        load_contract(p)


def test_numeric_columns_need_bounds(tmp_path: Path, write_file) -> None:
    p = write_file(tmp_path / "c.toml", 'name = "c"\nversion = "1.0"\n[[columns]]\nname = "v"\ntype = "float"\n')
    with pytest.raises(ConfigError, match="never from the data"):
        load_contract(p)


def test_task_lists_every_problem(tmp_path: Path, adult_contract_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "t.toml",
        f"""
        name = "t"
        contract = "{adult_contract_path}"
        [model]
        name = "resnet"
        [training]
        rounds = 0
        learning_rate = -1
        strategy = "fedprox"
        [privacy]
        target_epsilon = -2
        accountant = "gdp"
        delta = 1.5
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_task(p)
    locs = locations(ei.value)
    assert {"model.name", "training.rounds", "training.learning_rate", "privacy.target_epsilon", "privacy.accountant", "privacy.delta"} <= locs


def test_cross_field_rule_reported_on_its_block(tmp_path: Path, adult_contract_path: Path, write_file) -> None:
    p = write_file(tmp_path / "t.toml", f'name = "t"\ncontract = "{adult_contract_path}"\n[training]\nstrategy = "fedprox"\n')
    with pytest.raises(ConfigError) as ei:
        load_task(p)
    assert locations(ei.value) == {"training"}
    assert "proximal_mu" in str(ei.value)


def test_task_features_are_checked_against_the_contract(tmp_path: Path, adult_contract_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "t.toml",
        f"""
        name = "t"
        contract = "{adult_contract_path}"
        features = ["age", "shoe_size", "income"]
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_task(p)
    assert locations(ei.value) == {"features[1]", "features[2]"}
    assert "shoe_size" in str(ei.value) and "is the target" in str(ei.value)


def test_task_with_missing_contract_file(tmp_path: Path, write_file) -> None:
    p = write_file(tmp_path / "t.toml", 'name = "t"\ncontract = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="not found"):
        load_task(p)


def test_toml_syntax_error_names_the_file(tmp_path: Path, write_file) -> None:
    p = write_file(tmp_path / "t.toml", 'name = "t\n')
    with pytest.raises(ConfigError) as ei:
        load_task(p)
    assert str(p) in str(ei.value) and "TOML syntax error" in str(ei.value)


def test_federation_lists_every_problem(tmp_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "f.toml",
        """
        name = "f"
        [partition]
        dirichlet_alpha = 0
        test_fraction = 1.5
        [[members]]
        code = "GM9999"
        [[members]]
        code = "Amsterdam"
        [[members]]
        code = "GM0363"
        [[members]]
        code = "GM0363"
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_federation(p)
    locs = locations(ei.value)
    assert {"partition.dirichlet_alpha", "partition.test_fraction", "members[0].code", "members[1].code"} <= locs
    assert "GM9999" in str(ei.value)


def test_federation_needs_source_unless_files(tmp_path: Path, write_file) -> None:
    p = write_file(tmp_path / "f.toml", 'name = "f"\n[[members]]\ncode = "GM0363"\n')
    with pytest.raises(ConfigError, match="needs 'source'"):
        load_federation(p)
    q = write_file(tmp_path / "g.toml", 'name = "g"\n[partition]\nkind = "files"\n[[members]]\ncode = "GM0363"\n')
    with pytest.raises(ConfigError, match="needs 'data' for every member"):
        load_federation(q)


def test_duplicate_members_refused(tmp_path: Path, write_file) -> None:
    p = write_file(
        tmp_path / "f.toml",
        'name = "f"\nsource = "x.csv"\n[[members]]\ncode = "GM0363"\n[[members]]\ncode = "GM0363"\n',
    )
    with pytest.raises(ConfigError, match="repeated: GM0363"):
        load_federation(p)


PUBLIC_TABLES = ["chem97", "egsingle", "guprenat", "benefits", "vietnam"]


@pytest.mark.parametrize("name", PUBLIC_TABLES)
def test_public_tables_conform_and_split_over_their_organisations(name: str, tmp_path: Path) -> None:
    """Each shipped public table conforms to its contract, and its federation gives every
    member (an organisation of its registry) rows to train on and to test with."""
    from fedgov.data.partition import materialize

    root = Path(__file__).resolve().parents[2]
    task, contract = load_task(root / "configs" / "tasks" / f"{name}.toml")
    assert task.federation is not None
    fed = load_federation(task.federation)
    assert (root / "data" / name / "README.md").read_text("utf-8").count("Licence") == 1
    nodes = materialize(fed, contract, tmp_path)
    assert [n.code for n in nodes] == [m.code for m in fed.members]
    assert all(n.train_rows >= 1 and n.test_rows >= 1 for n in nodes)
