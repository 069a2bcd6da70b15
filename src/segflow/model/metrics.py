"""Segmentation metrics, vectorised over a batch of binary masks (numpy and pandas).

Per-image scores (``dice``, ``iou``, ``kaggle``) compare one predicted mask with one true mask;
``kaggle`` is the TGS Salt metric, where the whole mask is a single object. The DSB 2018
object-level metric (:func:`instance_precision_iou`) compares two label images instance by
instance. Conventions for empty masks: an empty prediction of an empty truth scores 1 on every
metric; an empty prediction of a non-empty truth, or a non-empty prediction of an empty truth,
scores 0. :func:`score_oof` scores an OOF prediction per class and fold against packed
labels (the evaluate-oof stage, and every ensemble candidate).

IoU thresholds are compared **strictly** (a hit needs IoU > t), as the TGS and DSB evaluation
kernels do, so an IoU of exactly 0.5 is a miss at t = 0.5. IoUs are computed as one float64
division of two pixel counts, which is correctly rounded, and so are the thresholds: an IoU that
equals a threshold as a fraction (e.g. 7/10 and 0.70) compares equal, never a rounding hair above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.image_scores import CONSTANTS
from segflow.artifacts.truths import class_truths
from segflow.core.errors import SegflowError

# 0.50, 0.55, ..., 0.95; rounded so that each is the double nearest its decimal (np.arange
# accumulates 0.05 steps and drifts, e.g. 0.6500000000000001).
IOU_THRESHOLDS: np.ndarray = np.round(np.arange(10) * 0.05 + 0.5, 2)

Metric = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """``mask != 0`` after checking that it holds only 0/1 (catches probabilities passed in)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    binary = mask != 0
    if not np.array_equal(mask, binary):
        raise ValueError(f"{name} must be a bool or 0/1 mask, got values outside {{0, 1}}")
    return binary


def _overlap_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-image (intersection, predicted area, true area) pixel counts."""
    pred = _as_binary(pred, "pred")
    truth = _as_binary(truth, "truth")
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and truth must both have shape (N, H, W), got {pred.shape} and {truth.shape}"
        )
    n, height, width = pred.shape
    pred, truth = pred.reshape(n, height * width), truth.reshape(n, height * width)
    intersection = np.count_nonzero(pred & truth, axis=1)
    return intersection, np.count_nonzero(pred, axis=1), np.count_nonzero(truth, axis=1)


def _dice(intersection: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    total = pred_area + truth_area
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total == 0, 1.0, 2.0 * intersection / total)


def _iou(intersection: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    union = pred_area + truth_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union == 0, 1.0, intersection / union)


def _kaggle(intersection: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    iou = _iou(intersection, pred_area, truth_area)
    return (iou[:, None] > IOU_THRESHOLDS[None, :]).mean(axis=1)


_FROM_COUNTS = {"dice": _dice, "iou": _iou, "kaggle": _kaggle}
METRIC_NAMES: tuple[str, ...] = tuple(_FROM_COUNTS)


def scores_from_counts(
    metric: str, intersection: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray
) -> np.ndarray:
    """Per-image scores of ``metric`` from pixel counts, without the masks.

    Lets a caller that already knows the counts (e.g. the post-processing grid search, which
    derives them from connected-component sizes) score without rebuilding masks; gives exactly
    the values of :func:`per_image_scores`.

    Args:
        metric: a name in :data:`METRICS`.
        intersection: pixels in both prediction and truth, per image.
        pred_area: predicted pixels per image.
        truth_area: true pixels per image.

    Returns:
        float64 scores in [0, 1].

    Shape:
        every array: (N,).
    """
    if metric not in _FROM_COUNTS:
        raise KeyError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}")
    return _FROM_COUNTS[metric](
        np.asarray(intersection), np.asarray(pred_area), np.asarray(truth_area)
    )


def constant_scores(truth_areas: np.ndarray, pixels: int, metric: str) -> dict[str, np.ndarray]:
    """Per-image scores of the two constant predictions (all-empty, all-foreground: every
    pixel of every class), the mean over classes.

    Args:
        truth_areas: true foreground pixels of every image and class.
        pixels: pixels of one image (height * width).
        metric: ``dice``, ``iou`` or ``kaggle``.

    Returns:
        :data:`~segflow.artifacts.image_scores.CONSTANTS` (``all_empty``, ``all_foreground``)
        -> float64 scores.

    Raises:
        SegflowError: ``truth_areas`` is not (N, K).

    Shape:
        truth_areas: (N, K); every output: (N,).
    """
    areas = np.asarray(truth_areas, dtype=np.int64)
    if areas.ndim != 2:
        raise SegflowError(f"truth areas must have shape (N, K), got {areas.shape}")
    zeros, full = np.zeros_like(areas), np.full_like(areas, int(pixels))
    empty = scores_from_counts(metric, zeros.ravel(), zeros.ravel(), areas.ravel())
    foreground = scores_from_counts(metric, areas.ravel(), full.ravel(), areas.ravel())
    scores = (empty, foreground)
    return {
        name: score.reshape(areas.shape).mean(axis=1)
        for name, score in zip(CONSTANTS, scores, strict=True)
    }


def per_image_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Dice, IoU and the TGS Salt score of every image of a batch.

    Args:
        pred: predicted masks, bool or 0/1.
        truth: true masks, bool or 0/1.

    Returns:
        ``{"dice": ..., "iou": ..., "kaggle": ...}``, float64 arrays. ``kaggle`` treats each mask
        as one object: 1 at threshold t when IoU > t (strictly), averaged over
        :data:`IOU_THRESHOLDS`. Empty truth and empty prediction score 1 on all three; exactly
        one of them empty scores 0.

    Shape:
        pred, truth: (N, H, W); every output: (N,).
    """
    counts = _overlap_counts(pred, truth)
    return {name: function(*counts) for name, function in _FROM_COUNTS.items()}


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice coefficient 2 |P and T| / (|P| + |T|); see :func:`per_image_scores`."""
    return _dice(*_overlap_counts(pred, truth))


def iou_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image IoU |P and T| / |P or T|; see :func:`per_image_scores`."""
    return _iou(*_overlap_counts(pred, truth))


def kaggle_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image TGS Salt score (precision of the one-object mask); see :func:`per_image_scores`."""
    return _kaggle(*_overlap_counts(pred, truth))


METRICS: dict[str, Metric] = {"dice": dice_scores, "iou": iou_scores, "kaggle": kaggle_scores}


def get_metric(name: str) -> Metric:
    """The per-image metric called ``name``: a function of (pred, truth) of shape (N, H, W)."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]


def _compact_labels(labels: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Renumber a label image to 0 (background), 1..K (objects in label order); returns (ids, K)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    flat = labels.ravel()
    if flat.size == 0:
        return flat.astype(np.intp), 0
    low, high = int(flat.min()), int(flat.max())
    if low < 0:
        raise ValueError(f"{name} has negative label {low}; 0 is background, objects are > 0")
    if high <= flat.size:
        # Lookup table over the label range: O(pixels), no sort.
        present = np.bincount(flat, minlength=high + 1) > 0
        present[0] = False
        lookup = np.cumsum(present)
        lookup[0] = 0
        return lookup[flat], int(lookup[-1])
    values, inverse = np.unique(flat, return_inverse=True)
    if values[0] == 0:
        return inverse.ravel(), values.size - 1
    return inverse.ravel() + 1, values.size


def instance_precision_iou(
    pred_labels: np.ndarray, true_labels: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS
) -> float:
    """The Data Science Bowl 2018 object-level score of one image.

    Every pair of a predicted and a true object is scored by IoU (from one joint histogram of
    the two label images). At threshold t a true object is matched when some predicted object
    has IoU > t (strictly); for t >= 0.5 a match is necessarily one-to-one, since two objects
    that each overlap a third by more than half its union would have to overlap each other.
    Precision at t is TP / (TP + FP + FN), averaged over the thresholds. No objects on either
    side scores 1; objects on one side only score 0.

    Args:
        pred_labels: predicted instances, 0 = background, any positive integer ids.
        true_labels: true instances, same convention.
        thresholds: IoU thresholds, each >= 0.5.

    Returns:
        The mean precision in [0, 1].

    Shape:
        pred_labels, true_labels: (H, W) (any equal shapes work).
    """
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(
            f"pred_labels and true_labels differ in shape: {pred_labels.shape} vs "
            f"{true_labels.shape}"
        )
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if thresholds.size == 0 or (thresholds < 0.5).any():
        raise ValueError(f"thresholds must be non-empty and >= 0.5, got {thresholds.tolist()}")
    pred_ids, n_pred = _compact_labels(pred_labels, "pred_labels")
    true_ids, n_true = _compact_labels(true_labels, "true_labels")
    if n_pred == 0 and n_true == 0:
        return 1.0
    joint = np.bincount(
        true_ids * (n_pred + 1) + pred_ids, minlength=(n_true + 1) * (n_pred + 1)
    ).reshape(n_true + 1, n_pred + 1)
    true_area, pred_area = joint.sum(axis=1)[1:], joint.sum(axis=0)[1:]
    overlap = joint[1:, 1:]
    # Only overlapping pairs can match; every object has area >= 1, so no union is 0.
    rows, cols = np.nonzero(overlap)
    intersection = overlap[rows, cols]
    iou = intersection / (true_area[rows] + pred_area[cols] - intersection)
    true_positives = (iou[:, None] > thresholds[None, :]).sum(axis=0)
    precision = true_positives / (n_true + n_pred - true_positives)
    return float(precision.mean())


def summarise_scores(
    pred: np.ndarray, truth: np.ndarray, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """Mean Dice, IoU and TGS score overall and per group (e.g. per fold), with counts.

    Args:
        pred: predicted masks, bool or 0/1.
        truth: true masks, bool or 0/1.
        groups: optional group of each image (fold number, source, ...).

    Returns:
        One row for all images (group ``"all"``) followed by one row per group in sorted order,
        columns ``group, n_images, n_empty_truth, n_empty_pred, dice, iou, kaggle``; ready for
        ``to_csv`` / ``to_json(orient="records")``.

    Shape:
        pred, truth: (N, H, W); groups: (N,).
    """
    intersection, pred_area, truth_area = _overlap_counts(pred, truth)
    n = intersection.shape[0]
    table = pd.DataFrame(
        {
            "n_images": np.ones(n, dtype=np.int64),
            "n_empty_truth": (truth_area == 0).astype(np.int64),
            "n_empty_pred": (pred_area == 0).astype(np.int64),
            **{name: f(intersection, pred_area, truth_area) for name, f in _FROM_COUNTS.items()},
        }
    )
    aggregation = {
        "n_images": "sum",
        "n_empty_truth": "sum",
        "n_empty_pred": "sum",
        **dict.fromkeys(METRIC_NAMES, "mean"),
    }
    overall = pd.DataFrame([{"group": "all", **table.agg(aggregation).to_dict()}])
    if groups is None:
        summary = overall
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
        per_group = table.groupby(groups, sort=True, dropna=False).agg(aggregation)
        per_group = per_group.rename_axis("group").reset_index()
        per_group["group"] = per_group["group"].astype(object)
        summary = pd.concat([overall, per_group], ignore_index=True)
    counts = ["n_images", "n_empty_truth", "n_empty_pred"]
    return summary.astype(dict.fromkeys(counts, np.int64))


def series_scores(pred: np.ndarray, truth: np.ndarray, series: Sequence[str]) -> pd.DataFrame:
    """Dice of each volume (a DICOM series): its slices' masks scored as one 3D mask.

    Args:
        pred: binary predictions, one slice per row.
        truth: binary truths.
        series: each slice's series (manifest ``series_uid``).

    Returns:
        One row per series, sorted: series_uid, n_slices, dice (``2|P & T| / (|P| + |T|)`` over
        all of the series' pixels; 1 when prediction and truth are both empty).

    Shape:
        pred, truth: (N, H, W); series: (N,).

    Raises:
        ValueError: ``series`` does not name one series per slice.
    """
    intersection, pred_area, truth_area = _overlap_counts(pred, truth)
    if len(series) != len(intersection):
        raise ValueError(f"{len(series)} series names for {len(intersection)} slices")
    counts = (
        pd.DataFrame(
            {
                "series_uid": np.asarray(series, dtype=str),
                "slices": 1,
                "intersection": intersection,
                "pred_area": pred_area,
                "truth_area": truth_area,
            }
        )
        .groupby("series_uid", sort=True)
        .sum()
    )
    dice = _dice(*(counts[c].to_numpy() for c in ("intersection", "pred_area", "truth_area")))
    return pd.DataFrame(
        {"series_uid": counts.index, "n_slices": counts["slices"].to_numpy(), "dice": dice}
    )


def score_oof(
    probs: np.ndarray,
    truths: np.ndarray,
    folds: np.ndarray,
    classes: Sequence[str] = ("mask",),
    threshold: float = 0.5,
    series: Sequence[str] | None = None,
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
        series: each image's DICOM series (``data.dicom_series``): the summary then also has
            ``series_dice``, the mean over classes of the mean over series of each series'
            3D Dice (:func:`series_scores`), and ``per_series``, its rows. None: neither key.

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
    if series is not None:
        rows = [
            {"class": name, **record}
            for k, name in enumerate(classes)
            for record in series_scores(
                probs[:, k].astype(np.float32) > threshold, class_truths(truths, k), series
            ).to_dict("records")
        ]
        per_class_mean = pd.DataFrame(rows).groupby("class", sort=False)["dice"].mean()
        summary["series_dice"] = float(per_class_mean.mean())
        summary["per_series"] = [
            {
                "class": row["class"],
                "series_uid": str(row["series_uid"]),
                "n_slices": int(row["n_slices"]),
                "dice": float(row["dice"]),
            }
            for row in rows
        ]
    return table, summary
