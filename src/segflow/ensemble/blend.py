"""The blend stage: tune the experiments' blend weights on OOF and apply them to OOF.

The weights' search is :func:`segflow.ensemble.weights.tune_weights` (pure, on arrays); this
module reads the experiments' OOF folders only and writes the OOF side of the ``ensemble``
candidate (:mod:`segflow.ensemble.candidates`) with ``weights.json`` and ``table.csv``; the
test side is :mod:`segflow.ensemble.apply_blend`'s (``weights.json`` read by
:func:`read_blend_weights`), so a test-set change does not re-tune the weights.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import (
    Prediction,
    nonempty_probs,
    read_oof,
    with_gates,
    without_gates,
)
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
from segflow.ensemble.candidates import check_aligned, json_ready, write_oof_candidate
from segflow.ensemble.weights import blend, blend_nonempty, tune_weights


def run_blend(
    names: Sequence[str],
    oof: Sequence[Prediction],
    truths: np.ndarray,
    classes: Sequence[str],
    metric: str,
    step: float,
) -> tuple[Prediction, dict[str, Any], pd.DataFrame]:
    """Tune the experiments' blend weights on OOF and apply them to OOF.

    Returns:
        (blended OOF, weights summary, the table of single / mean / tuned).
    """
    check_aligned(oof, names, "OOF predictions")
    weights, table = tune_weights(
        [p.probs for p in oof], truths, classes, metric=metric, step=step, names=names
    )

    summary = {
        "metric": metric,
        "step": step,
        "weights": {name: float(w) for name, w in zip(names, weights, strict=True)},
        "table": table.to_dict("records"),
    }
    return blend_predictions(oof, weights, len(classes)), json_ready(summary), table


def read_blend_weights(path: str | os.PathLike[str]) -> dict[str, float]:
    """blend's ``weights.json``: experiment -> weight, in the blend's experiment order (the
    one reader of the file, for apply-blend and export). ``weights.json`` sorts its keys, so
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
        weights = json.loads(path.read_text(encoding="utf-8"))["weights"]
        weights = {str(name): float(weight) for name, weight in weights.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise SegflowError(f"{path}: not a weights.json of segflow blend ({error})") from None
    columns = pd.read_csv(table_path, nrows=0).columns
    order = [str(c)[2:] for c in columns if str(c).startswith("w_")]
    if sorted(order) != sorted(weights):
        raise SegflowError(
            f"{table_path} weighs {', '.join(order)}, {path.name} {', '.join(weights)}; rerun blend"
        )
    return {name: weights[name] for name in order}


def blend_predictions(
    predictions: Sequence[Prediction], weights: Sequence[float] | np.ndarray, n_classes: int
) -> Prediction:
    """The experiments' row-aligned predictions blended with ``weights``: probabilities by
    :func:`segflow.ensemble.weights.blend`, aux-head gates by
    :func:`segflow.ensemble.weights.blend_nonempty`.

    Returns:
        The blend (float16 probabilities; gate columns when any weighted experiment has them).
    """
    ids = without_gates(predictions[0].ids)
    heads = [nonempty_probs(p.ids, n_classes) for p in predictions]
    gate = blend_nonempty(heads, weights)
    if gate is not None:
        ids = with_gates(ids, gate)
    return Prediction(ids, blend([p.probs for p in predictions], weights))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow blend``'s flags."""
    add_experiment_dirs(parser, test=False)
    parser.add_argument("--metric", default="kaggle")
    parser.add_argument("--step", type=float, default=0.1, help="weight grid step")
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_stats(parser)
    add_stage_tables(parser)
    parser.add_argument("--out-oof", required=True, help="blended oof_probs.npy to write")
    parser.add_argument("--out-weights", required=True, help="weights.json to write")


def run(args: argparse.Namespace) -> None:
    """``segflow blend``: write the ensemble's OOF side, weights.json and table.csv
    (``--fold-merge`` is recorded in their provenance: apply-blend merges the test folds)."""
    classes, _ = read_classes(args.stats)
    check_names(args)
    oof = [read_oof(d) for d in args.oof_dirs]
    folds = read_folds(args.folds)
    truths = original_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        oof[0].ids["id"],
        len(classes),
    )
    blended_oof, summary, table = run_blend(
        args.names, oof, truths, classes, args.metric, args.step
    )
    block = stage_provenance(
        {
            "names": args.names,
            "n_folds": args.n_folds,
            "fold_merge": args.fold_merge,
            "metric": args.metric,
            "step": args.step,
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
