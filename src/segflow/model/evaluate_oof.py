"""OOF assembly and scoring: per-fold probabilities -> one OOF array, metrics per fold and overall
(:func:`segflow.model.metrics.score_oof`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import read_prediction, write_oof
from segflow.artifacts.tables import read_folds
from segflow.artifacts.truths import read_truth_masks, read_truth_series
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.stage_args import add_stats, stage_log, stage_provenance, with_provenance
from segflow.model.metrics import score_oof


def assemble_oof(fold_dirs: Sequence[str | os.PathLike[str]]) -> tuple[pd.DataFrame, np.ndarray]:
    """Concatenate per-fold OOF outputs (``ids.csv`` + ``probs.npy``), sorted by id.

    Raises:
        SegflowError: an id predicted by two folds (the folds would leak) or a size mismatch.
    """
    frames, arrays = [], []
    for fold_dir in fold_dirs:
        fold_dir = Path(fold_dir)
        prediction = read_prediction(fold_dir)
        ids, probs = prediction.ids, prediction.probs
        if len(ids) != len(probs):
            raise SegflowError(f"{fold_dir}: {len(ids)} ids but {len(probs)} predictions")
        frames.append(ids)
        arrays.append(probs)
    ids = pd.concat(frames, ignore_index=True)
    duplicated = ids["id"].duplicated()
    if duplicated.any():
        raise SegflowError(f"id {ids['id'][duplicated].iloc[0]!r} is predicted by two folds")
    order = np.argsort(ids["id"].to_numpy(), kind="stable")
    probs = np.concatenate([np.asarray(array) for array in arrays])[order]
    return ids.iloc[order].reset_index(drop=True), probs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow evaluate-oof``'s flags."""
    parser.add_argument("--fold-dirs", nargs="+", required=True, help="predict-oof outputs")
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_stats(parser)
    parser.add_argument(
        "--truths", required=True, help="truth-masks' masks.npy (ids.csv beside it)"
    )
    parser.add_argument("--out-dir", required=True, help="folder for OOF arrays and metrics")


def run(args: argparse.Namespace) -> None:
    """``segflow evaluate-oof``: the OOF folder (arrays, ids, metrics)."""
    classes, _ = read_classes(args.stats)
    ids, probs = assemble_oof(args.fold_dirs)
    folds = read_folds(args.folds).set_index("id")
    truths = read_truth_masks(args.truths, ids["id"])
    # DICOM series (data.dicom_series): each series' 3D Dice too.
    series = read_truth_series(args.truths, ids["id"])
    table, summary = score_oof(
        probs, truths, folds.loc[ids["id"], "fold"].to_numpy(), classes, series=series
    )
    out = Path(args.out_dir)
    write_oof(out, ids.assign(fold=folds.loc[ids["id"], "fold"].to_numpy()), probs)
    write_csv(out / "metrics.csv", table)
    # No options and no randomness: the metrics follow from the fold predictions alone.
    write_json(out / "metrics.json", with_provenance(summary, stage_provenance({})))
    stage_log.info(
        "OOF %s: kaggle %.4f, dice %.4f, iou %.4f (all-empty baseline kaggle %.4f)",
        args.out_dir,
        summary["kaggle"],
        summary["dice"],
        summary["iou"],
        summary["all_empty_baseline_kaggle"],
    )
    if series is not None:
        stage_log.info(
            "OOF %s: mean 3D Dice over %d series %.4f",
            args.out_dir,
            len(set(series)),
            summary["series_dice"],
        )
