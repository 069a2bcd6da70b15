"""OOF assembly and scoring: per-fold probabilities -> one OOF array, metrics per fold and overall."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.errors import SegflowError
from segflow.metrics import summarise_scores
from segflow.preprocess import load_mask, mask_sources


def original_truths(
    manifest: pd.DataFrame, dedup_items: pd.DataFrame, ids: Sequence[str]
) -> np.ndarray:
    """Training labels of ``ids`` at the original resolution, as the model was trained on them
    (the union mask for members of a group resolved by the ``union`` policy).

    Shape:
        output: (len(ids), H, W) uint8; all images must share one size.
    """
    sources = mask_sources(manifest, dedup_items)
    sizes = manifest.set_index("id").loc[list(ids), ["height", "width"]]
    if len(sizes.drop_duplicates()) > 1:
        raise SegflowError("OOF scoring needs one original image size; these images differ")
    shape = (int(sizes["height"].iloc[0]), int(sizes["width"].iloc[0]))
    return np.stack([load_mask(sources[item_id], shape) for item_id in ids])


def assemble_oof(fold_dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """Concatenate per-fold OOF outputs (``ids.csv`` + ``probs.npy``), sorted by id.

    Raises:
        SegflowError: an id predicted by two folds (the folds would leak) or a size mismatch.
    """
    frames, arrays = [], []
    for fold_dir in fold_dirs:
        fold_dir = Path(fold_dir)
        ids = pd.read_csv(fold_dir / "ids.csv", dtype={"id": str})
        probs = np.load(fold_dir / "probs.npy", mmap_mode="r")
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


def score_oof(
    probs: np.ndarray, truths: np.ndarray, folds: np.ndarray, threshold: float = 0.5
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dice, IoU and the Kaggle metric per fold and overall, plus the all-empty baseline.

    Returns:
        (table with one row per group 'all' and each fold, JSON-ready summary).
    """
    pred = probs.astype(np.float32) > threshold
    table = summarise_scores(pred, truths.astype(bool), groups=folds)
    baseline = summarise_scores(np.zeros_like(pred), truths.astype(bool))
    overall = table.iloc[0]
    summary = {
        "threshold": threshold,
        "n_images": int(overall["n_images"]),
        "dice": float(overall["dice"]),
        "iou": float(overall["iou"]),
        "kaggle": float(overall["kaggle"]),
        "all_empty_baseline_kaggle": float(baseline.iloc[0]["kaggle"]),
        "per_fold": table.iloc[1:].to_dict("records"),
    }
    return table, summary
