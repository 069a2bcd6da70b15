"""The blend stage: tune the experiments' blend weights on OOF, apply them to OOF and test.

The weights' search is :func:`segflow.ensemble.weights.tune_weights` (pure, on arrays); this
module reads the experiments' OOF and test folders and writes the ``ensemble`` candidate
(:mod:`segflow.ensemble.candidates`) with ``weights.json`` and ``table.csv``.

``ensemble.mode: vote`` replaces the weighted mean by hard majority voting
(:func:`segflow.ensemble.weights.vote`): every experiment's probabilities thresholded at
:data:`~segflow.ensemble.weights.VOTE_THRESHOLD` (0.5, not each experiment's tuned
post-processing threshold: the blend then does not depend on every member's tuning run), one
vote each; the candidate's "probabilities" are the vote shares, so the ensemble's
post-processing tuning runs on them as on any OOF prediction (threshold 0.5 = strict majority).
MC-dropout uncertainty maps travel with the test prediction when every experiment has one:
their weighted mean (equal weights under ``vote``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.layout import group_by_experiment
from segflow.artifacts.predictions import Prediction, read_fold_predictions, read_oof
from segflow.artifacts.tables import read_folds, read_table
from segflow.artifacts.truths import original_truths
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.provenance import PROVENANCE_KEY, stage_provenance, with_provenance
from segflow.core.stage_args import (
    add_experiment_dirs,
    add_stage_tables,
    add_stats,
    check_names,
    stage_log,
)
from segflow.ensemble.candidates import check_aligned, json_ready, write_candidate
from segflow.ensemble.weights import (
    ENSEMBLE_MODES,
    VOTE_THRESHOLD,
    blend_predictions,
    tune_weights,
    vote_predictions,
)
from segflow.model.metrics import score_oof


def run_blend(
    names: Sequence[str],
    oof: Sequence[Prediction],
    test: Sequence[Prediction],
    truths: np.ndarray,
    folds: pd.DataFrame,
    classes: Sequence[str],
    metric: str,
    step: float,
    mode: str = "mean",
) -> tuple[Prediction, Prediction, dict[str, Any], pd.DataFrame]:
    """Tune the experiments' blend weights on OOF and apply them to OOF and test, or with
    ``mode="vote"`` take the experiments' majority vote (equal weights, nothing tuned).

    Returns:
        (blended OOF, blended test, weights summary, the table of single / mean / tuned; under
        vote one ``vote`` row scored at threshold 0.5).

    Raises:
        SegflowError: an unknown mode, or predictions that are not aligned.
    """
    if mode not in ENSEMBLE_MODES:
        raise SegflowError(
            f"ensemble.mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}"
        )
    check_aligned(oof, names, "OOF predictions")
    check_aligned(test, names, "test predictions")
    if mode == "vote":
        weights = np.full(len(names), 1.0 / len(names))
        blended_oof = vote_predictions(oof, len(classes))
        fold_of = folds.set_index("id").loc[blended_oof.ids["id"], "fold"].to_numpy()
        _, scores = score_oof(np.asarray(blended_oof.probs), truths, fold_of, classes)
        table = pd.DataFrame(
            [
                {
                    "kind": "vote",
                    **{f"w_{name}": float(w) for name, w in zip(names, weights, strict=True)},
                    "score": scores[metric],
                    "threshold": VOTE_THRESHOLD,
                }
            ]
        )
        blended_test = vote_predictions(test, len(classes))
    else:
        weights, table = tune_weights(
            [p.probs for p in oof], truths, classes, metric=metric, step=step, names=names
        )
        blended_oof = blend_predictions(oof, weights, len(classes))
        blended_test = blend_predictions(test, weights, len(classes))

    summary = {
        "metric": metric,
        "step": step,
        "weights": {name: float(w) for name, w in zip(names, weights, strict=True)},
        "table": table.to_dict("records"),
    }
    if mode != "mean":  # the mean's weights.json stays as it was
        summary["mode"] = mode
    return blended_oof, blended_test, json_ready(summary), table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow blend``'s flags."""
    add_experiment_dirs(parser)
    parser.add_argument("--metric", default="kaggle")
    parser.add_argument("--step", type=float, default=0.1, help="weight grid step")
    parser.add_argument(
        "--mode",
        choices=ENSEMBLE_MODES,
        default="mean",
        help="mean: OOF-tuned weighted mean; vote: per-pixel majority of the masks (p > 0.5)",
    )
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_stats(parser)
    add_stage_tables(parser)
    parser.add_argument("--out-oof", required=True, help="blended oof_probs.npy to write")
    parser.add_argument("--out-test", required=True, help="blended test probs.npy to write")
    parser.add_argument("--out-weights", required=True, help="weights.json to write")


def run(args: argparse.Namespace) -> None:
    """``segflow blend``: write the ensemble candidate, weights.json and table.csv."""
    classes, _ = read_classes(args.stats)
    check_names(args)
    oof = [read_oof(d) for d in args.oof_dirs]
    test = [
        read_fold_predictions(dirs, args.fold_merge)
        for dirs in group_by_experiment(args.test_dirs, len(args.names), "test folders")
    ]
    folds = read_folds(args.folds)
    truths = original_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        oof[0].ids["id"],
        len(classes),
    )
    blended_oof, blended_test, summary, table = run_blend(
        args.names, oof, test, truths, folds, classes, args.metric, args.step, args.mode
    )
    block = stage_provenance(
        {
            "names": args.names,
            "n_folds": args.n_folds,
            "fold_merge": args.fold_merge,
            "metric": args.metric,
            "step": args.step,
            # Only a non-default mode is recorded: the mean's provenance stays as it was.
            **({"mode": args.mode} if args.mode != "mean" else {}),
        }
    )
    metrics = write_candidate(
        Path(args.out_oof).parent,
        Path(args.out_test).parent,
        blended_oof,
        blended_test,
        folds,
        truths,
        classes,
        {"weights": summary["weights"], PROVENANCE_KEY: block},
    )
    write_json(args.out_weights, with_provenance(summary, block))
    write_csv(Path(args.out_weights).with_name("table.csv"), table)
    stage_log.info(
        "ensemble (%s) weights %s: OOF kaggle %.4f",
        args.mode,
        summary["weights"],
        metrics["kaggle"],
    )
