"""The blend stage: tune the experiments' blend weights on OOF and apply them to OOF.

The weights' search is :func:`segflow.ensemble.weights.tune_weights` (pure, on arrays); this
module reads the experiments' OOF folders only and writes the OOF side of the ``ensemble``
candidate (:mod:`segflow.ensemble.candidates`) with ``weights.json`` and ``table.csv``; the
test side is :mod:`segflow.ensemble.apply_blend`'s (``weights.json`` read by
:func:`read_blend_weights`), so a test-set change does not re-tune the weights.

``ensemble.mode: vote`` replaces the weighted mean by hard majority voting
(:func:`segflow.ensemble.weights.vote`): every experiment's probabilities thresholded at
:data:`~segflow.ensemble.weights.VOTE_THRESHOLD` (0.5, not each experiment's tuned
post-processing threshold: the blend then does not depend on every member's tuning run), one
vote each; the candidate's "probabilities" are the vote shares, so the ensemble's
post-processing tuning runs on them as on any OOF prediction (threshold 0.5 = strict majority).
MC-dropout uncertainty maps travel with the prediction when every experiment has one: their
weighted mean (equal weights under ``vote``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import Prediction, read_oof
from segflow.artifacts.tables import read_folds
from segflow.artifacts.truths import read_truth_masks
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.stage_args import (
    PROVENANCE_KEY,
    add_experiment_dirs,
    add_stats,
    check_names,
    stage_log,
    stage_provenance,
    with_provenance,
)
from segflow.ensemble.candidates import check_aligned, json_ready, write_oof_candidate
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
    truths: np.ndarray,
    folds: pd.DataFrame,
    classes: Sequence[str],
    metric: str,
    step: float,
    mode: str = "mean",
) -> tuple[Prediction, dict[str, Any], pd.DataFrame]:
    """Tune the experiments' blend weights on OOF and apply them to OOF, or with
    ``mode="vote"`` take the experiments' majority vote (equal weights, nothing tuned).

    Returns:
        (blended OOF, weights summary, the table of single / mean / tuned; under vote one
        ``vote`` row scored at threshold 0.5).

    Raises:
        SegflowError: an unknown mode, or predictions that are not aligned.
    """
    if mode not in ENSEMBLE_MODES:
        raise SegflowError(
            f"ensemble.mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}"
        )
    check_aligned(oof, names, "OOF predictions")
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
    else:
        weights, table = tune_weights(
            [p.probs for p in oof], truths, classes, metric=metric, step=step, names=names
        )
        blended_oof = blend_predictions(oof, weights, len(classes))

    summary = {
        "metric": metric,
        "step": step,
        "weights": {name: float(w) for name, w in zip(names, weights, strict=True)},
        "table": table.to_dict("records"),
    }
    if mode != "mean":  # the mean's weights.json stays as it was
        summary["mode"] = mode
    return blended_oof, json_ready(summary), table


@dataclass(frozen=True)
class BlendWeights:
    """blend's ``weights.json`` as apply-blend and export use it."""

    weights: dict[str, float]
    """experiment -> weight, in the blend's experiment order."""
    mode: str
    """``mean`` (the weighted mean) or ``vote`` (majority vote, equal weights)."""


def read_blend_weights(path: str | os.PathLike[str]) -> BlendWeights:
    """blend's ``weights.json``: experiment -> weight, in the blend's experiment order, and the
    mode (the one reader of the file, for apply-blend and export). ``weights.json`` sorts its keys, so
    the order is that of the ``w_<name>`` columns of ``table.csv`` beside it, which the
    weighted sum follows (a float32 sum in another order may differ in the last bit).

    Raises:
        SegflowError: a file missing, not JSON, without a ``weights`` mapping of numbers, or
            a table of other experiments.
    """
    path = Path(path)
    table_path = path.with_name("table.csv")
    for required in (path, table_path):
        if not required.is_file():
            raise SegflowError(f"{required} does not exist (run blend first)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        weights = {str(name): float(weight) for name, weight in summary["weights"].items()}
        mode = str(summary.get("mode", "mean"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise SegflowError(f"{path}: not a weights.json of segflow blend ({error})") from None
    columns = pd.read_csv(table_path, nrows=0).columns
    order = [str(c)[2:] for c in columns if str(c).startswith("w_")]
    if sorted(order) != sorted(weights):
        raise SegflowError(
            f"{table_path} weighs {', '.join(order)}, {path.name} {', '.join(weights)}; rerun blend"
        )
    if mode not in ENSEMBLE_MODES:
        raise SegflowError(f"{path}: unknown ensemble mode {mode!r}; rerun blend")
    return BlendWeights({name: weights[name] for name in order}, mode)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow blend``'s flags."""
    add_experiment_dirs(parser, test=False)
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
    parser.add_argument(
        "--truths", required=True, help="truth-masks' masks.npy (ids.csv beside it)"
    )
    parser.add_argument("--out-oof", required=True, help="blended oof_probs.npy to write")
    parser.add_argument("--out-weights", required=True, help="weights.json to write")


def run(args: argparse.Namespace) -> None:
    """``segflow blend``: write the ensemble's OOF side, weights.json and table.csv
    (``--fold-merge`` is recorded in their provenance: apply-blend merges the test folds)."""
    classes, _ = read_classes(args.stats)
    check_names(args)
    oof = [read_oof(d) for d in args.oof_dirs]
    folds = read_folds(args.folds)
    truths = read_truth_masks(args.truths, oof[0].ids["id"])
    blended_oof, summary, table = run_blend(
        args.names, oof, truths, folds, classes, args.metric, args.step, args.mode
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
    metrics = write_oof_candidate(
        Path(args.out_oof).parent,
        blended_oof,
        folds,
        truths,
        classes,
        {"weights": summary["weights"], PROVENANCE_KEY: block},
    )
    write_json(args.out_weights, with_provenance(summary, block))
    write_csv(Path(args.out_weights).with_name("table.csv"), table)
    stage_log.info("ensemble weights %s: OOF kaggle %.4f", summary["weights"], metrics["kaggle"])
