"""A federation of organisations that are not Dutch municipalities, end to end: three
Norwegian municipalities from a registry file, Adult rows split by a column naming each row's
organisation, trained through fedgov's real ClientApp (all its mods and the release gate), and
the report naming them as the registry does, and the federation by its own name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedgov.config import load_task
from fedgov.coordinator.run import run_training
from fedgov.node.home import NodeHome
from fedgov.testing import InProcessGrid, prepare
from server.config import RunConfig

CODES = {"K0301": "Oslo", "K4601": "Bergen", "K5001": "Trondheim"}


def test_a_federation_of_foreign_organisations_runs_with_their_names(
    tmp_path: Path, adult_csv: Path, adult_test_csv: Path, write_task, write_file
) -> None:
    rows = pd.read_csv(adult_csv, nrows=1500)
    rows["kommune"] = np.random.default_rng(0).choice(list(CODES), size=len(rows))
    rows.to_csv(tmp_path / "adult-kommuner.csv", index=False)
    write_file(tmp_path / "kommuner.csv", "code,name,region\n" + "".join(f"{c},{n},Norway\n" for c, n in CODES.items()))
    fed = write_file(
        tmp_path / "fed.toml",  # the file's name is not the federation's
        'name = "norway-3"\nseed = 1\nsource = "adult-kommuner.csv"\nregistry = "kommuner.csv"\n'
        '[partition]\nkind = "column"\ncolumn = "kommune"\n'
        + "".join(f'[[members]]\ncode = "{c}"\n' for c in CODES),
    )
    task_path = write_task(
        tmp_path / "task.toml", name="norway", federation=fed,
        training={"rounds": 2, "batch_size": 64, "learning_rate": 0.5, "min_nodes": 3, "seed": 1},
        privacy={"target_epsilon": 2.0, "delta": 1e-5, "reproducible_noise": True},
        evaluation={"centralized": adult_test_csv},
    )
    _, _, nodes, manifest = prepare(tmp_path / "sim", fed, task_path)
    # each simulated node states its organisation's name in its own policy
    assert {NodeHome(n.train_path.parent).policy().name for n in nodes} == set(CODES.values())
    assert {n.name for n in nodes} == set(CODES.values())

    config = RunConfig.from_flower({
        "task-path": str(task_path), "federation-path": str(fed), "manifest-path": str(manifest),
        "run-dir": str(tmp_path / "run"), "local-baseline": False,
    })
    task, contract = load_task(task_path)
    report = run_training(InProcessGrid(manifest, len(nodes), run_id=21), task, contract, config.training_options(task, flower_run_id=21))

    assert report.status == "completed", report.message
    assert report.federation == "norway-3" and report.federation_file == str(fed)
    assert {n.node: n.name for n in report.nodes} == CODES
    assert all(n.status == "accepted" for n in report.nodes)
    saved = (tmp_path / "run" / "report.json").read_text("utf-8")
    assert '"federation": "norway-3"' in saved and all(name in saved for name in CODES.values())
