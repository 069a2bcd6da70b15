"""``segflow search-worker``: run trials of one study until it has ``n_trials`` finished.

Several workers (Snakemake jobs, each on its own GPU slot or SLURM job) share one study
(:mod:`segflow.search.study`). A worker loops: under the study's lock it marks the trials of
dead workers FAIL, counts the finished (COMPLETE + PRUNED) and running trials, and starts a
trial only while finished + running < ``n_trials``; it waits while the others' running trials
could still make up the count, and stops once the study has ``n_trials`` finished. So the
workers share the total (no worker has a quota), a killed trial is made up by the next one, and
a rerun of a finished study does nothing.

A trial trains the experiment (``base`` with the trial's values, ``train.epochs`` replaced by
``trial_epochs``) on each fold of ``folds`` in turn with :func:`segflow.model.training.train.
train_fold` (training on the other folds, validating on that one) and reports each epoch's
validation monitor to the pruner (step = fold position x trial_epochs + epoch); a pruned trial
stops there. Its value is the mean over those folds of the saved weights' validation score:
scored on images it did not train on. A trial whose training stops with a
:class:`~segflow.core.errors.SegflowError` (a diverged loss) is recorded FAIL with the message
(user attribute ``failed_reason``) and does not count; more than ``n_trials`` such failures of one
worker stop it. The folds' models are deleted after scoring (their history.csv and metrics.json
stay, under ``<work-dir>/trial<N>/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import optuna

from segflow.artifacts.arrays import classes_of, read_stats
from segflow.core.atomic import write_json
from segflow.core.devices import add_compute_arguments, compute
from segflow.core.errors import SegflowError
from segflow.core.stage_args import stage_log
from segflow.search.space import apply_params
from segflow.search.study import (
    Heartbeat,
    counts,
    fail_stale,
    load_study,
    study_lock,
    suggest,
    worker_identity,
)

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0


def run_worker(
    search: dict[str, Any],
    arrays_dir: str | Path,
    folds_csv: str | Path,
    work_dir: str | Path,
    worker: int = 0,
) -> dict[str, Any]:
    """Run trials until the study has ``n_trials`` finished (see the module docstring).

    Args:
        search: the study's settings as the workflow passes them: ``study_id``, ``name``,
            ``experiment`` (the base experiment's mapping), ``space``, ``sampler``, ``pruner``,
            ``pruner_startup_trials``, ``n_trials``, ``folds``, ``trial_epochs``, ``seed``,
            ``storage`` (URL or None), ``journal`` (the journal file), ``heartbeat_seconds``.
        arrays_dir: preprocess's output folder.
        folds_csv: folds.csv.
        work_dir: where trials train (``trial<N>/fold<f>/``).
        worker: this worker's index (seeds its sampler).

    Returns:
        Summary: the trials this worker ran by state, and the study's counts when it stopped.

    Raises:
        SegflowError: more failed trials than ``n_trials`` (naming the last failure).
    """
    study = load_study(search, arrays_dir, folds_csv, worker)
    n_trials = int(search["n_trials"])
    beat = float(search["heartbeat_seconds"])
    lock = Path(search["journal"]).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    ran: dict[str, list[int]] = {"COMPLETE": [], "PRUNED": [], "FAIL": []}
    last_error = ""
    while True:
        with study_lock(lock):
            stale = fail_stale(study, beat)
            if stale:
                stage_log.warning("trials %s of a dead worker marked FAIL", stale)
            state = counts(study)
            done = state["COMPLETE"] + state["PRUNED"]
            trial = None
            if done < n_trials and done + state["RUNNING"] < n_trials:
                trial = study.ask()
                for key, value in worker_identity().items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr("worker", worker)
        if done >= n_trials:
            break
        if len(ran["FAIL"]) > n_trials:
            raise SegflowError(
                f"search {search['name']}: {len(ran['FAIL'])} trials of worker {worker} failed "
                f"(more than n_trials = {n_trials}); the last: {last_error}"
            )
        if trial is None:  # the others' running trials may make up the count: wait
            time.sleep(POLL_SECONDS)
            continue
        outcome, error = _run_trial(study, trial, search, arrays_dir, folds_csv, work_dir, beat)
        ran[outcome].append(trial.number)
        last_error = error or last_error
    summary = {
        "study_id": search["study_id"],
        "optuna_study": study.study_name,
        "worker": worker,
        "trials": ran,
        "study_counts": counts(study),
    }
    stage_log.info("search %s worker %d done: %s", search["name"], worker, summary)
    return summary


def _run_trial(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    search: dict[str, Any],
    arrays_dir: str | Path,
    folds_csv: str | Path,
    work_dir: str | Path,
    beat: float,
) -> tuple[str, str]:
    """Train and score one trial; tell the study. Returns (state name, failure message)."""
    params = suggest(trial, search["space"])
    values = apply_params(search["experiment"], params)
    values.setdefault("train", {})["epochs"] = int(search["trial_epochs"])
    trial.set_user_attr("experiment", values)
    folder = Path(work_dir) / f"trial{trial.number}"
    stage_log.info("trial %d: %s", trial.number, params)
    try:
        with Heartbeat(trial, beat):
            value = score_trial(trial, search, values, arrays_dir, folds_csv, folder)
    except optuna.TrialPruned as pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        stage_log.info("trial %d pruned (%s)", trial.number, pruned)
        return "PRUNED", ""
    except SegflowError as exc:
        trial.set_user_attr("failed_reason", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        stage_log.warning("trial %d failed: %s", trial.number, exc)
        return "FAIL", str(exc)
    except BaseException as exc:  # a bug or an interrupt: record it, then stop
        trial.set_user_attr("failed_reason", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    study.tell(trial, value)
    stage_log.info("trial %d: %.4f", trial.number, value)
    return "COMPLETE", ""


def score_trial(
    trial: optuna.trial.Trial,
    search: dict[str, Any],
    values: dict[str, Any],
    arrays_dir: str | Path,
    folds_csv: str | Path,
    folder: Path,
) -> float:
    """Train the trial's experiment on each fold of ``search['folds']``; its mean validation
    score on those folds (each fold's model never saw it). Reports every epoch to the pruner.

    Raises:
        optuna.TrialPruned: the pruner stopped the trial.
    """
    from segflow.model.experiment import parse_experiment
    from segflow.model.training.train import train_fold

    stats = read_stats(arrays_dir)
    experiment = parse_experiment(
        search["name"], values, in_channels=int(stats["channels"]), classes=len(classes_of(stats))
    )
    epochs = int(search["trial_epochs"])
    experiment = dataclasses.replace(
        experiment, train=dataclasses.replace(experiment.train, epochs=epochs)
    )
    scores = []
    for position, fold in enumerate(search["folds"]):

        def report(
            epoch: int, value: float, offset: int = position * epochs, fold: int = fold
        ) -> None:
            trial.report(value, offset + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"fold {fold} epoch {epoch}: {value:.4f}")

        out = folder / f"fold{fold}"
        resume = folder / f".resume_fold{fold}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(resume, ignore_errors=True)
        try:
            metrics = train_fold(
                arrays_dir, folds_csv, fold, experiment, out, resume, on_epoch=report
            )
        finally:
            shutil.rmtree(resume, ignore_errors=True)
            (out / "model.pt").unlink(missing_ok=True)
        scores.append(float(metrics["score"]))
        trial.set_user_attr(f"fold{fold}_score", scores[-1])
    return sum(scores) / len(scores)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow search-worker``'s flags."""
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    parser.add_argument(
        "--search", required=True, help="the study's settings as JSON (see run_worker)"
    )
    parser.add_argument("--worker", type=int, default=0, help="this worker's index")
    parser.add_argument("--work-dir", required=True, help="folder the trials train in")
    parser.add_argument("--out", required=True, help="JSON summary of this worker's trials")
    add_compute_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow search-worker``: run trials until the study has n_trials finished."""
    search = json.loads(args.search)
    with compute(args):
        summary = run_worker(search, args.arrays_dir, args.folds, args.work_dir, args.worker)
    write_json(Path(args.out), summary)
