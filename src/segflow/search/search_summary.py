"""``segflow search-summary``: a finished study's tables and its best experiment.

Writes under ``search/<study>/``:

- ``trials.csv``: one row per trial (number, state, value, the searched values as
  ``params.<path>``, each fold's score, the epochs reported before a pruning, the worker, start
  and duration, ``failed_reason``) and ``best_so_far``, the best COMPLETE value up to that trial;
- ``best.json``: the best COMPLETE trial (value, number, params) and ``experiment``, the
  experiment the workflow then trains as ``experiments.<study>`` on every fold: the base
  experiment with the best values, trained for the base's own ``train.epochs`` (not
  ``trial_epochs``);
- ``importance.csv``: each searched field's importance for the value (Optuna's fANOVA
  evaluator, seeded; empty with fewer than two COMPLETE trials).

Refuses a study with fewer than ``n_trials`` finished trials (a worker failed: rerun).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.stage_args import stage_log
from segflow.search.space import apply_params, direction
from segflow.search.study import counts, finished, load_study

PARAM_PREFIX = "params."


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """trials.csv's table (see the module docstring), in trial order."""
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows, best = [], None
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            value = float(trial.value)
            if best is None or (value > best if maximise else value < best):
                best = value
        start, end = trial.datetime_start, trial.datetime_complete
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "best_so_far": best,
            "epochs_reported": len(trial.intermediate_values),
            "worker": trial.user_attrs.get("worker"),
            "started": start.isoformat() if start else None,
            "seconds": round((end - start).total_seconds(), 3) if start and end else None,
            "failed_reason": trial.user_attrs.get("failed_reason"),
        }
        for key, value in sorted(trial.params.items()):
            row[PARAM_PREFIX + key] = json.dumps(value) if isinstance(value, list | dict) else value
        for key, value in sorted(trial.user_attrs.items()):
            if key.endswith("_score"):
                row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


def importance_table(study: optuna.Study) -> pd.DataFrame:
    """Each searched field's importance (fANOVA, seed 0), most important first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return pd.DataFrame(columns=["param", "importance"])
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:  # e.g. every trial drew the same values
        stage_log.warning("parameter importances not computed: %s", exc)
        return pd.DataFrame(columns=["param", "importance"])
    return pd.DataFrame(
        [{"param": key, "importance": float(value)} for key, value in found.items()]
    )


def best_summary(study: optuna.Study, search: dict[str, Any]) -> dict[str, Any]:
    """best.json's content (see the module docstring).

    Raises:
        SegflowError: no COMPLETE trial (every trial pruned or failed).
    """
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        raise SegflowError(
            f"search.{search['name']}: no trial completed (every trial pruned or failed); "
            "see trials.csv and widen the space or lower the pruning"
        )
    best = study.best_trial
    params = _decoded(best.params)
    return {
        "study": search["name"],
        "study_id": search["study_id"],
        "optuna_study": study.study_name,
        "direction": study.direction.name.lower(),
        "value": float(best.value),
        "trial": best.number,
        "params": params,
        "experiment": apply_params(search["experiment"], params),
        "folds": search["folds"],
        "trial_epochs": search["trial_epochs"],
        "n_trials": search["n_trials"],
        "counts": counts(study),
    }


def _decoded(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params with ``json:`` choices (lists, mappings) decoded."""
    from segflow.search.study import _JSON

    return {
        key: json.loads(value[len(_JSON) :])
        if isinstance(value, str) and value.startswith(_JSON)
        else value
        for key, value in params.items()
    }


def summarize(
    search: dict[str, Any], arrays_dir: str | Path, folds_csv: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Write trials.csv, best.json and importance.csv of a finished study.

    Args:
        search: the study's settings (as :func:`segflow.search.search_worker.run_worker`).
        arrays_dir: preprocess's output folder (the data key of the study's name).
        folds_csv: folds.csv.
        out_dir: ``search/<study>/``.

    Returns:
        best.json's content.

    Raises:
        SegflowError: fewer than ``n_trials`` finished trials, or none COMPLETE.
    """
    study = load_study(search, arrays_dir, folds_csv)
    done = finished(study)
    if done < int(search["n_trials"]):
        raise SegflowError(
            f"search.{search['name']}: the study has {done} of n_trials = {search['n_trials']} "
            f"finished trials (a worker failed); rerun the workflow to finish it"
        )
    if study.direction.name.lower() != direction(search["experiment"]):
        raise SegflowError(f"search.{search['name']}: the stored study's direction differs")
    out = Path(out_dir)
    best = best_summary(study, search)
    write_csv(out / "trials.csv", trials_table(study))
    write_csv(out / "importance.csv", importance_table(study))
    write_json(out / "best.json", best)
    stage_log.info(
        "search %s: best %.4f (trial %d) %s",
        search["name"],
        best["value"],
        best["trial"],
        best["params"],
    )
    return best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow search-summary``'s flags."""
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    parser.add_argument("--search", required=True, help="the study's settings as JSON")
    parser.add_argument("--out-dir", required=True, help="search/<study>/")


def run(args: argparse.Namespace) -> None:
    """``segflow search-summary``: trials.csv, best.json, importance.csv."""
    summarize(json.loads(args.search), args.arrays_dir, args.folds, args.out_dir)
