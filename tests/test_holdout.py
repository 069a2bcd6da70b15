"""folds.train_folds: a holdout fold instead of full cross-validation, end to end on a small
demo (one Snakemake run, 1 epoch, 32 px) and as dry runs (null plans today's jobs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    SMALL_POSTPROCESS_GRID,
    TINY_EXPERIMENT,
    copy_workflow,
    run_snakemake,
)

from segflow.report.summary import results_summary

pytestmark = pytest.mark.workflow

TINY = TINY_EXPERIMENT
HOLDOUT_DEMO = {
    "demo": {"n_train": 60, "n_test": 24, "seed": 5},
    "preprocess": {"height": 32, "width": 32},
    "folds": {"n_folds": 3, "train_folds": [0]},
    "run_experiments": ["tiny"],
    "experiments": {"tiny": TINY},
    # Untrained models are unsure everywhere; a loose bound still selects some images.
    "pseudo": {"rounds": 1, "max_uncertain_share": 1.0, "top_fraction": 0.5},
    "predict": {"tta": "none"},
    "postprocess": SMALL_POSTPROCESS_GRID,
    "stack": {"pixel_blender": False},
    "max_threads": 1,
}
PER_FOLD_RULES = ("train_fold", "predict_oof", "predict_test")


def _write(workdir: Path, name: str, config: dict) -> str:
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("holdout"))
    run_snakemake(workdir, "--configfile", _write(workdir, "holdout.yaml", HOLDOUT_DEMO))
    return workdir


def test_one_holdout_fold_trains_and_every_oof_consumer_works_on_its_oof(
    holdout_run: Path,
) -> None:
    results = holdout_run / "results"
    # One job per experiment and round of each fold-wise rule: fold 0's.
    for rule in PER_FOLD_RULES:
        logs = sorted(p.name for p in (results / "logs" / rule).iterdir())
        assert logs == ["tiny_round0_fold0.log", "tiny_round1_fold0.log"], rule
    assert sorted(p.name for p in (results / "models" / "tiny" / "round0").iterdir()) == ["fold0"]
    folds = pd.read_csv(results / "folds" / "folds.csv", dtype={"id": str})
    assert folds["fold"].nunique() == 3  # the split is the 3-fold one
    fold0 = sorted(folds.loc[folds["fold"] == 0, "id"])
    # The OOF of every candidate (experiments, ensemble, stacked gate) is fold 0's images.
    for candidate, round_ in (("tiny", 0), ("tiny", 1), ("ensemble", 1), ("stack_gate", 1)):
        ids = pd.read_csv(results / "oof" / candidate / f"round{round_}" / "oof_ids.csv")
        assert sorted(ids["id"].astype(str)) == fold0, candidate
        assert set(ids["fold"]) == {0}, candidate
        assert (results / "postprocess" / candidate / f"round{round_}" / "params.json").is_file()
    # The gate ran, cross-fitted on sub-folds of fold 0 that keep each fold group whole.
    gate = json.loads((results / "stack" / "round1" / "summary_gate.json").read_text())
    assert "stack_gate" in gate["candidates"]
    features = pd.read_parquet(results / "stack" / "round1" / "class_0" / "features_oof.parquet")
    assert features["fold"].nunique() >= 2
    groups = folds.set_index("id").loc[features["id"].astype(str), "group"].to_numpy()
    assert (features.assign(group=groups).groupby("group")["fold"].nunique() == 1).all()
    # The pseudo round and the test set use fold 0's model only.
    assert json.loads((results / "pseudo" / "round1" / "summary.json").read_text())
    submission = pd.read_csv(results / "final" / "submission.csv", dtype=str, keep_default_na=False)
    test_manifest = pd.read_parquet(results / "ingest" / "test_manifest.parquet")
    assert sorted(submission["id"]) == sorted(test_manifest["id"])
    choice = json.loads((results / "final" / "choice.json").read_text())
    assert np.isfinite(choice["tuned_oof_score"])
    # summary and report say how much the OOF covers.
    n_train = len(folds)
    coverage = f"1 of 3 folds ({len(fold0)} of {n_train} images; folds 0)"
    assert f"  OOF covers  {coverage}" in results_summary(results).splitlines()
    assert f"The OOF covers {coverage}." in (results / "report" / "report.html").read_text()


def _plan(workdir: Path, *configs: str) -> tuple[dict[str, int], list[str]]:
    """One dry run of every job (--forceall): rule -> job count, as planned_jobs reads it, and
    the shell command of every job, sorted."""
    args = ["--configfile", *configs] if configs else []
    result = run_snakemake(workdir, "--dry-run", "--printshellcmds", "--forceall", *args)
    table = (result.stdout + result.stderr).split("Job stats:", 1)[1]
    jobs = {
        match.group(1): int(match.group(2))
        for match in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE)
        if match.group(1) != "total"
    }
    shells = re.findall(r"^(?:Shell command: )?\s*(segflow .*)$", result.stdout, flags=re.M)
    return jobs, sorted(shells)


def test_train_folds_null_plans_the_jobs_of_full_cross_validation(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    base = workdir / "config" / "config.yaml"
    small = {**HOLDOUT_DEMO, "run_experiments": ["tiny", "unet_lite0"], "max_threads": 2}
    small["experiments"] = {"tiny": TINY, "unet_lite0": {"train": {"epochs": 1}}}
    small["folds"] = {"n_folds": 3}
    without = _write(workdir, "without.yaml", small)
    null = _write(workdir, "null.yaml", {**small, "folds": {"n_folds": 3, "train_folds": None}})
    every = _write(
        workdir, "every.yaml", {**small, "folds": {"n_folds": 3, "train_folds": [2, 0, 1]}}
    )
    holdout = _write(
        workdir, "holdout.yaml", {**small, "folds": {"n_folds": 3, "train_folds": [1]}}
    )
    # A config from before the key existed (none in config.yaml either) plans what null plans.
    base.write_text(re.sub(r"\n  train_folds: null[^\n]*\n", "\n", base.read_text()))
    assert "train_folds" not in yaml.safe_load(base.read_text())["folds"]
    absent_jobs, absent_shells = _plan(workdir, without)
    null_jobs, null_shells = _plan(workdir, null)
    assert null_jobs == absent_jobs
    assert _plan(workdir, every)[0] == absent_jobs
    assert absent_jobs["train_fold"] == 2 * 2 * 3  # experiments x rounds x folds
    assert null_shells == absent_shells  # every command byte for byte
    assert not any("--train-folds" in shell for shell in absent_shells)
    # [1]: a third of the fold-wise jobs, the same split (make_folds' command unchanged).
    held, held_shells = _plan(workdir, holdout)
    for rule in PER_FOLD_RULES:
        assert held[rule] == absent_jobs[rule] // 3, rule
    assert {k: v for k, v in held.items() if k not in PER_FOLD_RULES} == {
        k: v for k, v in absent_jobs.items() if k not in PER_FOLD_RULES
    }
    folds_cmd = [s for s in absent_shells if s.startswith("segflow folds ")]
    assert folds_cmd and [s for s in held_shells if s.startswith("segflow folds ")] == folds_cmd
    trains = [s for s in held_shells if s.startswith("segflow train ")]
    assert trains and all("--fold 1 " in s for s in trains)
    refit = {
        "tiny": {**TINY, "refit": {"enabled": True}},
        "unet_lite0": small["experiments"]["unet_lite0"],
    }
    # A refit takes its epochs from the trained fold's metrics alone, and the budget plans the
    # trained fold only (one dry run of both).
    refit_cfg = _write(workdir, "refit.yaml", {"experiments": refit})
    budget = _write(workdir, "budget.yaml", {"budget": {"minutes": 10}})
    refit_shells = _plan(workdir, holdout, refit_cfg, budget)[1]
    fulls = [s for s in refit_shells if "--refit-from" in s]
    assert len(fulls) == 2  # tiny, rounds 0 and 1
    for shell in fulls:
        sources = shell.split("--refit-from ", 1)[1].split(" --name", 1)[0].split()
        assert len(sources) == 1 and sources[0].endswith("/fold1/metrics.json"), shell
    plan = [s for s in refit_shells if s.startswith("segflow plan-budget ")]
    assert len(plan) == 1 and " --train-folds 1 " in plan[0]
    plan = [s for s in _plan(workdir, null, budget)[1] if s.startswith("segflow plan-budget ")]
    assert len(plan) == 1 and "--train-folds" not in plan[0]
