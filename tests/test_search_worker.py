"""Search workers on tiny synthetic arrays (CPU): a planted search, pruning, two worker processes
sharing one study, a worker killed mid-trial and the study finished by a rerun, and another
storage (an SQLite URL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers import write_synthetic_arrays

from segflow.search.search_summary import summarize
from segflow.search.search_worker import run_worker
from segflow.search.study import counts, load_study

BASE = {
    "model": {
        "arch": "Unet",
        "encoder": "mobilenet_v2",
        "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    },
    "augment": "none",
    "train": {"epochs": 5, "batch_size": 8, "lr": 0.01},
}
REPO_SRC = Path(__file__).resolve().parents[1] / "src"


def settings(root: Path, **overrides: object) -> dict:
    search = {
        "name": "s",
        "study_id": "s-test",
        "experiment": BASE,
        "space": {"train.lr": {"log_uniform": [1.0e-7, 3.0e-2]}},
        "sampler": "random",
        "pruner": "none",
        "pruner_startup_trials": 1,
        "n_trials": 4,
        "folds": [0],
        "trial_epochs": 2,
        "seed": 0,
        "storage": None,
        "journal": str(root / "s-test.journal"),
        "heartbeat_seconds": 2.0,
    }
    return {**search, **overrides}


@pytest.fixture(scope="module")
def arrays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_arrays(tmp_path_factory.mktemp("arrays"), n=24, size=32)


def test_a_planted_search_finds_the_learning_rates_that_learn(arrays: Path, tmp_path: Path) -> None:
    # lr <= 1e-5 barely moves the weights in 2 epochs; the planted good region is >= 1e-3.
    lrs = [1.0e-7, 1.0e-5, 1.0e-2, 3.0e-2]
    search = settings(tmp_path, sampler="grid", space={"train.lr": {"choice": lrs}})
    run_worker(search, arrays, arrays / "folds.csv", tmp_path / "work")
    best = summarize(search, arrays, arrays / "folds.csv", tmp_path / "out")
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 4 and (trials["state"] == "COMPLETE").all()
    lrs = trials["params.train.lr"]
    assert sorted(lrs) == [1.0e-7, 1.0e-5, 1.0e-2, 3.0e-2]  # the grid, each point once
    assert best["params"]["train.lr"] >= 1e-3
    assert best["value"] > trials.loc[lrs <= 1e-5, "value"].max() + 0.1
    assert best["experiment"]["train"]["epochs"] == 5  # the base's, for the final training
    assert list(pd.read_csv(tmp_path / "out" / "importance.csv")["param"]) == ["train.lr"]
    # A rerun of the finished study does nothing.
    again = run_worker(search, arrays, arrays / "folds.csv", tmp_path / "work")
    assert again["trials"] == {"COMPLETE": [], "PRUNED": [], "FAIL": []}


def test_pruning_stops_a_bad_trial_after_its_first_epoch(arrays: Path, tmp_path: Path) -> None:
    search = settings(
        tmp_path,
        space={"train.lr": {"choice": [0.01, 1.0e-7]}},
        pruner="median",
        n_trials=2,
        trial_epochs=4,
    )
    study = load_study(search, arrays, arrays / "folds.csv")
    study.enqueue_trial({"train.lr": 0.01})
    study.enqueue_trial({"train.lr": 1.0e-7})
    summary = run_worker(search, arrays, arrays / "folds.csv", tmp_path / "work")
    assert summary["trials"]["COMPLETE"] == [0] and summary["trials"]["PRUNED"] == [1]
    assert summary["study_counts"]["PRUNED"] == 1
    pruned = study.trials[1]
    assert len(pruned.intermediate_values) == 1  # stopped after epoch 1 of 4
    summarize(search, arrays, arrays / "folds.csv", tmp_path / "out")
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "PRUNED"]
    assert list(trials["epochs_reported"]) == [4, 1]


def _worker(search: dict, arrays: Path, root: Path, index: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segflow",
            "search-worker",
            "--arrays-dir",
            str(arrays),
            "--folds",
            str(arrays / "folds.csv"),
            "--search",
            json.dumps(search),
            "--worker",
            str(index),
            "--work-dir",
            str(root / "work"),
            "--out",
            str(root / f"worker{index}.json"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_worker_processes_share_one_study(arrays: Path, tmp_path: Path) -> None:
    search = settings(tmp_path, n_trials=5, trial_epochs=3)
    workers = [_worker(search, arrays, tmp_path, index) for index in (0, 1)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-2000:]
    ran = [json.loads((tmp_path / f"worker{i}.json").read_text())["trials"] for i in (0, 1)]
    numbers = [n for trials in ran for n in trials["COMPLETE"] + trials["PRUNED"]]
    assert sorted(numbers) == [0, 1, 2, 3, 4]  # none lost, none run twice
    assert all(trials["COMPLETE"] for trials in ran)  # both workers ran trials
    study = load_study(search, arrays, arrays / "folds.csv")
    assert counts(study)["COMPLETE"] == 5 and len(study.trials) == 5


def test_a_killed_worker_trial_is_failed_and_a_rerun_finishes_the_study(
    arrays: Path, tmp_path: Path
) -> None:
    search = settings(tmp_path, n_trials=3, trial_epochs=30)
    worker = _worker(search, arrays, tmp_path, 0)
    study = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            study = load_study(search, arrays, arrays / "folds.csv")
        except (KeyError, optuna.exceptions.DuplicatedStudyError):
            continue
        running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if running and len(running[0].intermediate_values) >= 1:  # mid-trial: an epoch done
            break
    else:
        worker.kill()
        pytest.fail("the worker never started a trial")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert study is not None
    killed = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0].number
    summary = run_worker(
        {**search, "trial_epochs": 1}, arrays, arrays / "folds.csv", tmp_path / "work"
    )
    study = load_study(search, arrays, arrays / "folds.csv")
    assert counts(study)["COMPLETE"] == 3  # the total, not 3 more
    assert study.trials[killed].state == optuna.trial.TrialState.FAIL
    assert "worker gone" in study.trials[killed].user_attrs["failed_reason"]
    assert killed not in summary["trials"]["COMPLETE"]
    best = summarize(search, arrays, arrays / "folds.csv", tmp_path / "out")
    assert best["trial"] != killed


def test_a_storage_url_holds_the_study(arrays: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = settings(tmp_path, storage=url, n_trials=2, trial_epochs=1)
    run_worker(search, arrays, arrays / "folds.csv", tmp_path / "work")
    assert not (tmp_path / "s-test.journal").exists()
    stored = optuna.load_study(
        study_name=load_study(search, arrays, arrays / "folds.csv").study_name, storage=url
    )
    assert len(stored.trials) == 2
    best = summarize(search, arrays, arrays / "folds.csv", tmp_path / "out")
    assert best["value"] == pytest.approx(max(t.value for t in stored.trials))
