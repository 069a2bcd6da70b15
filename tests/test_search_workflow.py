"""The hyperparameter search in the workflow: workers, summary checkpoint, the best experiment
trained on every fold, caching (edit matrix), the stage table and the report; config errors stop
before any job naming the key.

One tiny run (CPU, a two-fold split, two-epoch trials on fold 0) on a grid over two learning
rates, one of which (1e-7) learns nothing: the grid tries both, so the best is known. The best
experiment then trains, predicts and is scored like any experiment on the trained folds
(``folds.train_folds: [0]``, from test_determinism's tiny config), up to the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, planned_jobs, run_job_counts, run_snakemake
from test_determinism import TINY_EXPERIMENT, tiny_config

from segflow.data.demo_data import DemoDataOptions, generate_demo_data

TRIGGERS = ("--rerun-triggers", "mtime", "params", "input", "code")
STUDY = {
    "base": "tiny",
    "space": {"train.lr": {"choice": [1.0e-7, 0.01]}},
    "sampler": "grid",
    "pruner": "none",
    "n_trials": 2,
    "workers": 2,
    "folds": [0],
    "trial_epochs": 2,
}


def search_config(data: Path, **study: object) -> dict:
    config = tiny_config(data)
    # Validation loss: on 18 validation images after 2 epochs a smoother signal than the Kaggle
    # metric, so the learning rate that learns (0.01) is the best.
    train = {**TINY_EXPERIMENT["train"], "monitor": "val_loss", "epochs": 3}
    config["experiments"] = {"tiny": {**TINY_EXPERIMENT, "train": train}}
    config["run_experiments"] = ["lr_search"]
    config["stack"] = {"enabled": False}
    config["search"] = {"lr_search": {**STUDY, **study}}
    return config


def write(workdir: Path, name: str, config: dict) -> str:
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    data = root / "data"
    generate_demo_data(data, DemoDataOptions(n_train=40, n_test=12, seed=5))
    workdir = copy_workflow(root / "run")
    write(workdir, "search.yaml", search_config(data))
    (workdir / "data_path").write_text(str(data))
    run_snakemake(workdir, "--configfile", "search.yaml")
    return workdir


@pytest.mark.workflow
def test_search_writes_its_tables_and_trains_the_best_as_an_experiment(search_run: Path) -> None:
    results = search_run / "results"
    folder = results / "search" / "lr_search"
    best = json.loads((folder / "best.json").read_text())
    assert best["params"] == {"train.lr": 0.01}
    assert best["experiment"]["train"]["lr"] == 0.01
    assert best["direction"] == "minimize"
    assert best["experiment"]["train"]["epochs"] == 3  # the base's epochs, not trial_epochs
    trials = pd.read_csv(folder / "trials.csv")
    assert sorted(trials["params.train.lr"]) == [1.0e-7, 0.01]
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE"]
    assert set(pd.read_csv(folder / "importance.csv").columns) == {"param", "importance"}
    assert len(list(folder.glob("lr_search-*.journal"))) == 1
    # Trained on the workflow's trained folds (fold 0 of 2), with the base's epochs.
    models = results / "models" / "lr_search" / "round0"
    assert sorted(p.name for p in models.iterdir()) == ["fold0"]
    metrics = json.loads((models / "fold0" / "metrics.json").read_text())
    assert metrics["options"]["lr"] == 0.01 and metrics["options"]["epochs"] == 3
    stages = pd.read_csv(results / "final" / "stages.csv")
    row = stages[stages["candidate"] == "lr_search"].iloc[0]
    assert row["search_best"] == pytest.approx(best["value"])
    html = (results / "report" / "report.html").read_text()
    assert "Hyperparameter search" in html and "lr_search" in html


@pytest.mark.workflow
def test_a_finished_search_reruns_nothing(search_run: Path) -> None:
    assert planned_jobs(search_run, "--configfile", "search.yaml", *TRIGGERS) == {}


@pytest.mark.workflow
def test_editing_the_space_starts_a_new_study(search_run: Path) -> None:
    data = Path((search_run / "data_path").read_text())
    changed = {"train.lr": {"choice": [1.0e-7, 0.02]}}
    write(search_run, "space.yaml", search_config(data, space=changed))
    jobs = planned_jobs(search_run, "--configfile", "space.yaml", *TRIGGERS)
    assert jobs["search_worker"] == 2 and jobs["search_summary"] == 1


@pytest.mark.workflow
def test_more_trials_continue_the_study_and_keep_an_unchanged_best(search_run: Path) -> None:
    data = Path((search_run / "data_path").read_text())
    write(search_run, "more.yaml", search_config(data, n_trials=3))
    results = search_run / "results"
    model = results / "models" / "lr_search" / "round0" / "fold0" / "model.pt"
    before = model.stat().st_mtime_ns
    run = run_snakemake(search_run, "--configfile", "more.yaml", *TRIGGERS)
    # The jobs the run planned (its own job table, as a dry run would print it).
    jobs = run_job_counts(run)
    assert jobs["search_worker"] == 2 and jobs["search_summary"] == 1
    folder = results / "search" / "lr_search"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 3 and (trials["state"] == "COMPLETE").all()
    assert len(list(folder.glob("lr_search-*.journal"))) == 1  # the same study, continued
    assert json.loads((folder / "best.json").read_text())["params"] == {"train.lr": 0.01}
    # Training is keyed by the best experiment's content: the same best retrains nothing.
    assert model.stat().st_mtime_ns == before
    assert planned_jobs(search_run, "--configfile", "more.yaml", *TRIGGERS) == {}


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"train.lrr": {"uniform": [0.1, 0.2]}}, "search.lr_search.space.train.lrr"),
        ({"train.lr": {"log_uniform": [0.01, 0.001]}}, "search.lr_search.space.train.lr"),
        (
            {"model.encoder": {"choice": ["resnet18", "resnet_99"]}},
            "search.lr_search.space.model.encoder",
        ),
    ],
    ids=["unknown-field", "empty-range", "unknown-encoder"],
)
def test_a_bad_space_stops_before_any_job_naming_the_key(
    tmp_path: Path, space: dict, named: str
) -> None:
    workdir = copy_workflow(tmp_path)
    write(workdir, "bad.yaml", search_config(tmp_path / "data", space=space))
    result = run_snakemake(workdir, "--dry-run", "--configfile", "bad.yaml", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert named in output
    assert not (workdir / "results").exists()
