"""search-summary on a study of recorded trials (no training): trials.csv, best.json,
importance.csv, the refusal of an unfinished study, and the report's search section."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from segflow.core.errors import SegflowError
from segflow.report.search_section import search_section
from segflow.search.search_summary import summarize
from segflow.search.study import load_study

BASE = {"model": {"arch": "Unet"}, "loss": {"bce": 1.0}, "train": {"epochs": 12, "lr": 0.001}}
DISTRIBUTIONS = {
    "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
    "augment": CategoricalDistribution(["d4", "heavy"]),
}


def search(root: Path, n_trials: int = 4) -> dict:
    return {
        "name": "s",
        "study_id": "s-0123",
        "experiment": BASE,
        "space": {
            "train.lr": {"log_uniform": [1e-4, 1e-2]},
            "augment": {"choice": ["d4", "heavy"]},
        },
        "sampler": "random",
        "pruner": "median",
        "pruner_startup_trials": 5,
        "n_trials": n_trials,
        "folds": [0, 1],
        "trial_epochs": 3,
        "seed": 0,
        "storage": None,
        "journal": str(root / "s-0123.journal"),
        "heartbeat_seconds": 30,
    }


def record(study: optuna.Study, lr: float, augment: str, value: float, state: TrialState) -> None:
    study.add_trial(
        create_trial(
            params={"train.lr": lr, "augment": augment},
            distributions=DISTRIBUTIONS,
            value=value if state == TrialState.COMPLETE else None,
            intermediate_values={1: value} if state == TrialState.PRUNED else {1: value, 2: value},
            state=state,
            user_attrs={"fold0_score": value, "worker": 0},
        )
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "stats.json").write_text('{"channels": 1}')
    (tmp_path / "folds.csv").write_text("id,fold\na,0\nb,1\n")
    return tmp_path


def test_summary_tables_and_best_experiment(data: Path, tmp_path: Path) -> None:
    settings = search(tmp_path)
    study = load_study(settings, data, data / "folds.csv")
    record(study, 1e-3, "d4", 0.60, TrialState.COMPLETE)
    record(study, 5e-3, "heavy", 0.70, TrialState.COMPLETE)
    record(study, 1e-4, "d4", 0.10, TrialState.PRUNED)
    record(study, 2e-3, "heavy", 0.65, TrialState.FAIL)
    with pytest.raises(SegflowError, match="3 of n_trials = 4 finished"):
        summarize(settings, data, data / "folds.csv", tmp_path / "out")
    record(study, 2e-4, "d4", 0.50, TrialState.COMPLETE)
    best = summarize(settings, data, data / "folds.csv", tmp_path / "out")
    assert best["value"] == 0.70 and best["trial"] == 1
    assert best["params"] == {"train.lr": 5e-3, "augment": "heavy"}
    assert best["experiment"] == {**BASE, "train": {"epochs": 12, "lr": 5e-3}, "augment": "heavy"}
    assert best["counts"]["FAIL"] == 1 and best["counts"]["COMPLETE"] == 3
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert list(trials["best_so_far"]) == [0.60, 0.70, 0.70, 0.70, 0.70]
    assert list(trials["epochs_reported"]) == [2, 2, 1, 2, 2]
    importance = pd.read_csv(tmp_path / "out" / "importance.csv")
    assert set(importance["param"]) == {"train.lr", "augment"}
    assert importance["importance"].sum() == pytest.approx(1.0)


def test_the_report_section_shows_value_by_trial_importance_and_top_trials(
    data: Path, tmp_path: Path
) -> None:
    settings = search(tmp_path, n_trials=2)
    study = load_study(settings, data, data / "folds.csv")
    record(study, 1e-3, "d4", 0.60, TrialState.COMPLETE)
    record(study, 5e-3, "heavy", 0.70, TrialState.COMPLETE)
    results = tmp_path / "results"
    summarize(settings, data, data / "folds.csv", results / "search" / "s")
    oof = results / "oof" / "s" / "round0"
    oof.mkdir(parents=True)
    (oof / "metrics.json").write_text(json.dumps({"kaggle": 0.55}))
    section = search_section(results)
    assert 'id="search"' in section and "Hyperparameter search" in section
    assert "best value 0.7000" in section and "every fold: 0.5500" in section
    assert section.count("<img") == 2 and section.count("<tr>") == 3  # header + 2 trials
    assert search_section(tmp_path / "none") == ""
