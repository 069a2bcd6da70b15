"""OOF assembly and scoring: per-fold probabilities -> one OOF array, metrics per fold and overall."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.data.preprocess import MaskSource, load_mask, mask_sources
from segflow.model.metrics import METRIC_NAMES, summarise_scores


def original_truths(
    manifest: pd.DataFrame,
    dedup_items: pd.DataFrame,
    ids: Sequence[str],
    n_classes: int = 1,
    sources: dict[str, tuple[MaskSource, ...]] | None = None,
) -> np.ndarray:
    """Training labels of ``ids`` at the original resolution, as the model was trained on them
    (the union mask for members of a group resolved by the ``union`` policy).

    Args:
        sources: :func:`segflow.data.preprocess.mask_sources` of the manifest, when the caller reads
            labels in chunks (it resolves and checks every mask path, so build it once).

    Returns:
        Packed label masks: bit k is class k (binary: {0, 1}); see :mod:`segflow.formats.labels`.

    Shape:
        output: (len(ids), H, W); all images must share one size.
    """
    if sources is None:
        sources = mask_sources(manifest, dedup_items)
    sizes = manifest.set_index("id").loc[list(ids), ["height", "width"]]
    if len(sizes.drop_duplicates()) > 1:
        raise SegflowError("OOF scoring needs one original image size; these images differ")
    shape = (int(sizes["height"].iloc[0]), int(sizes["width"].iloc[0]))
    return np.stack([load_mask(sources[item_id], shape, n_classes) for item_id in ids])


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


def class_truths(packed: np.ndarray, k: int) -> np.ndarray:
    """Class ``k``'s plane of packed label masks (bit k), as bool.

    Shape:
        packed: (N, H, W); output: (N, H, W).
    """
    return (np.asarray(packed) >> k) & 1 != 0


def score_oof(
    probs: np.ndarray,
    truths: np.ndarray,
    folds: np.ndarray,
    classes: Sequence[str] = ("mask",),
    threshold: float = 0.5,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dice, IoU and the Kaggle metric per class and fold, overall, and the all-empty baseline.

    With several classes every metric is the mean over classes of the per-class mean over
    images (Severstal's mean Dice over (image, class) pairs, empty-vs-empty = 1).

    Args:
        probs: OOF probabilities.
        truths: packed label masks (bit k = class k; binary masks are {0, 1}).
        folds: each image's fold.
        classes: class names, in bit order.
        threshold: foreground where probability > threshold.

    Returns:
        (table with one row per class and group 'all' / each fold, JSON-ready summary).

    Shape:
        probs: (N, K, H, W); truths: (N, H, W); folds: (N,).
    """
    if probs.ndim != 4 or probs.shape[1] != len(classes):
        raise SegflowError(
            f"OOF probabilities of shape {probs.shape} do not hold one map per class "
            f"({len(classes)}: {', '.join(classes)})"
        )
    tables, baselines = [], []
    for k, name in enumerate(classes):
        truth = class_truths(truths, k)
        table = summarise_scores(probs[:, k].astype(np.float32) > threshold, truth, groups=folds)
        tables.append(table.assign(**{"class": name}))
        baselines.append(summarise_scores(np.zeros_like(truth), truth).iloc[0]["kaggle"])
    table = pd.concat(tables, ignore_index=True)
    table = table[["class", *[c for c in table.columns if c != "class"]]]
    overall = table[table["group"] == "all"]
    summary: dict[str, Any] = {
        "threshold": threshold,
        "classes": list(classes),
        "n_images": int(overall["n_images"].iloc[0]),
        **{name: float(overall[name].mean()) for name in METRIC_NAMES},
        "all_empty_baseline_kaggle": float(np.mean(baselines)),
        "per_fold": (
            table[table["group"] != "all"]
            .groupby("group")[list(METRIC_NAMES)]
            .mean()
            .reset_index()
            .to_dict("records")
        ),
    }
    if len(classes) > 1:
        summary["per_class"] = overall.drop(columns="group").to_dict("records")
    return table, summary
