"""Tests for the segmentation metrics (segflow.model.metrics); expected values are worked by hand or
by plain-Python reference implementations, never by the code under test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from segflow.model.metrics import (
    IOU_THRESHOLDS,
    METRICS,
    get_metric,
    instance_precision_iou,
    per_image_scores,
    scores_from_counts,
    summarise_scores,
)

THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def _mask(shape: tuple[int, int], pixels: int) -> np.ndarray:
    """A mask whose first ``pixels`` pixels (row-major) are set."""
    mask = np.zeros(shape, dtype=bool)
    mask.ravel()[:pixels] = True
    return mask


# --------------------------------------------------------------------------- thresholds


def test_iou_thresholds_are_the_exact_decimals() -> None:
    assert IOU_THRESHOLDS.tolist() == THRESHOLDS  # exact: 0.65 is 0.65, not 0.6500000000000001


# --------------------------------------------------------------------------- per-image scores

# (truth pixels, pred pixels) with pred a subset of truth, in a 5x5 image; expected by hand.
# kaggle = #{t in THRESHOLDS : iou > t} / 10.
SUBSET_CASES = [
    # both empty: everything 1
    (0, 0, 1.0, 1.0, 1.0),
    # empty truth, non-empty prediction; non-empty truth, empty prediction
    (0, 1, 0.0, 0.0, 0.0),
    (4, 0, 0.0, 0.0, 0.0),
    (7, 7, 1.0, 1.0, 1.0),
    # IoU 2/4 = 0.5 exactly: not > 0.5, so 0 hits
    (4, 2, 4 / 6, 0.5, 0.0),
    # IoU 3/4 = 0.75 exactly: hits 0.50..0.70 (5), not 0.75
    (4, 3, 6 / 7, 0.75, 0.5),
    # IoU 7/10 = 0.7 exactly: hits 0.50..0.65 (4)
    (10, 7, 14 / 17, 0.7, 0.4),
    # IoU 19/20 = 0.95 exactly: hits 0.50..0.90 (9)
    (20, 19, 38 / 39, 0.95, 0.9),
    # IoU 11/20 = 0.55 exactly: hits 0.50 only
    (20, 11, 22 / 31, 0.55, 0.1),
    # IoU 24/25 = 0.96: all 10
    (25, 24, 48 / 49, 0.96, 1.0),
]


@pytest.mark.parametrize(("truth_px", "pred_px", "dice", "iou", "kaggle"), SUBSET_CASES)
def test_per_image_scores_by_hand(
    truth_px: int, pred_px: int, dice: float, iou: float, kaggle: float
) -> None:
    truth = _mask((5, 5), truth_px)[None]
    pred = _mask((5, 5), pred_px)[None]
    scores = per_image_scores(pred, truth)
    assert scores["dice"].tolist() == pytest.approx([dice], abs=1e-15)
    assert scores["iou"].tolist() == pytest.approx([iou], abs=1e-15)
    assert scores["kaggle"].tolist() == pytest.approx([kaggle], abs=1e-15)


def test_per_image_scores_vectorised_over_the_batch_and_partial_overlap() -> None:
    truth = np.zeros((3, 4, 4), dtype=np.uint8)
    pred = np.zeros((3, 4, 4), dtype=np.uint8)
    truth[0, 0:2] = 1  # rows 0-1: 8 px
    pred[0, 1:3] = 1  # rows 1-2: 8 px; overlap row 1: 4 px; union 12
    truth[1, :, 0] = 1  # 4 px, prediction empty
    pred[2, 3, 3] = 1  # 1 px, truth empty
    scores = per_image_scores(pred, truth)
    assert scores["dice"].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert scores["iou"].tolist() == pytest.approx([1 / 3, 0.0, 0.0])
    assert scores["kaggle"].tolist() == [0.0, 0.0, 0.0]
    assert all(v.dtype == np.float64 and v.shape == (3,) for v in scores.values())


def _reference_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, list[float]]:
    """Plain-Python per-image scores, one image and one threshold at a time."""
    out: dict[str, list[float]] = {"dice": [], "iou": [], "kaggle": []}
    for p, t in zip(pred.tolist(), truth.tolist(), strict=True):
        p_set = {(y, x) for y, row in enumerate(p) for x, v in enumerate(row) if v}
        t_set = {(y, x) for y, row in enumerate(t) for x, v in enumerate(row) if v}
        if not p_set and not t_set:
            out["dice"].append(1.0)
            out["iou"].append(1.0)
            out["kaggle"].append(1.0)
            continue
        inter, union = len(p_set & t_set), len(p_set | t_set)
        iou = inter / union
        out["dice"].append(2 * inter / (len(p_set) + len(t_set)))
        out["iou"].append(iou)
        out["kaggle"].append(sum(1 for t in THRESHOLDS if iou > t) / len(THRESHOLDS))
    return out


def test_per_image_scores_match_a_plain_python_reference() -> None:
    rng = np.random.default_rng(7)
    truth = rng.random((40, 6, 7)) < rng.random((40, 1, 1))
    pred = truth ^ (rng.random((40, 6, 7)) < 0.15)
    pred[:5] = False
    truth[3:8] = False
    expected = _reference_scores(pred, truth)
    got = per_image_scores(pred, truth)
    for name in ("dice", "iou", "kaggle"):
        assert got[name].tolist() == pytest.approx(expected[name], abs=1e-12), name


def test_per_image_scores_rejects_probabilities_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="0/1 mask"):
        per_image_scores(np.full((1, 2, 2), 0.7), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        per_image_scores(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        per_image_scores(np.zeros((2, 2)), np.zeros((2, 2)))


def test_per_image_scores_of_no_images() -> None:
    scores = per_image_scores(np.zeros((0, 3, 3), bool), np.zeros((0, 3, 3), bool))
    assert all(v.shape == (0,) for v in scores.values())


# --------------------------------------------------------------------------- registry


def test_metric_registry() -> None:
    assert sorted(METRICS) == ["dice", "iou", "kaggle"]
    truth = _mask((5, 5), 4)[None]
    pred = _mask((5, 5), 3)[None]
    assert get_metric("dice")(pred, truth).tolist() == pytest.approx([6 / 7])
    assert get_metric("iou")(pred, truth).tolist() == pytest.approx([0.75])
    assert get_metric("kaggle")(pred, truth).tolist() == pytest.approx([0.5])


def test_unknown_metric_lists_the_valid_names() -> None:
    with pytest.raises(KeyError, match="unknown metric 'x'; valid: dice, iou, kaggle"):
        get_metric("x")
    with pytest.raises(KeyError, match="unknown metric 'f1'; valid: dice, iou, kaggle"):
        scores_from_counts("f1", np.zeros(1), np.zeros(1), np.zeros(1))


def test_scores_from_counts_by_hand() -> None:
    # (intersection, pred area, truth area): both empty; 3 of 4; disjoint
    scores = scores_from_counts("kaggle", np.array([0, 3, 0]), np.array([0, 3, 2]), [0, 4, 2])
    assert scores.tolist() == [1.0, 0.5, 0.0]
    dice = scores_from_counts("dice", np.array([0, 3, 0]), np.array([0, 3, 2]), [0, 4, 2])
    assert dice.tolist() == pytest.approx([1.0, 6 / 7, 0.0])


# --------------------------------------------------------------------------- instance metric


def _reference_instance_score(
    pred: np.ndarray, true: np.ndarray, thresholds: list[float] = THRESHOLDS
) -> float:
    """DSB 2018 score with explicit per-object masks and an explicit one-to-one matching."""
    pred_ids = [int(i) for i in np.unique(pred) if i != 0]
    true_ids = [int(i) for i in np.unique(true) if i != 0]
    if not pred_ids and not true_ids:
        return 1.0
    iou = {}
    for t in true_ids:
        for p in pred_ids:
            a, b = true == t, pred == p
            iou[t, p] = np.logical_and(a, b).sum() / np.logical_or(a, b).sum()
    precisions = []
    for threshold in thresholds:
        matched_pred: set[int] = set()
        tp = 0
        for t in true_ids:
            for p in pred_ids:
                if p not in matched_pred and iou[t, p] > threshold:
                    matched_pred.add(p)
                    tp += 1
                    break
        fp, fn = len(pred_ids) - tp, len(true_ids) - tp
        precisions.append(tp / (tp + fp + fn))
    return sum(precisions) / len(precisions)


def _random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Overlapping random rectangles painted in order (later ones cover earlier ones)."""
    labels = np.zeros(shape, dtype=np.int64)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(2, 9), rng.integers(2, 9)
        labels[y : y + h, x : x + w] = k
    return labels


@pytest.mark.parametrize("seed", range(8))
def test_instance_metric_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = _random_labels(rng, (30, 30), int(rng.integers(0, 9)))
    # Prediction: the truth with objects shifted by a pixel, some dropped, some spurious, and
    # ids scattered (non-contiguous, large).
    pred = np.zeros_like(true)
    for k in np.unique(true)[1:]:
        if rng.random() < 0.2:
            continue
        dy, dx = rng.integers(-1, 2, size=2)
        pred[np.roll(true == k, (dy, dx), axis=(0, 1))] = k * 7 + 1000
    extra = _random_labels(rng, (30, 30), int(rng.integers(0, 3)))
    pred[extra > 0] = extra[extra > 0] + 50
    if seed == 3:
        pred[pred > 0] += 10**9  # the np.unique path for huge ids
    expected = _reference_instance_score(pred, true)
    assert instance_precision_iou(pred, true) == pytest.approx(expected, abs=1e-12)


def test_instance_metric_hand_cases() -> None:
    empty = np.zeros((10, 10), dtype=np.int32)
    a = empty.copy()
    a[1:5, 1:5] = 1  # object A: 16 px
    b = empty.copy()
    b[6:9, 6:9] = 2  # object B: 9 px
    assert instance_precision_iou(empty, empty) == 1.0
    assert instance_precision_iou(a, empty) == 0.0  # a spurious object, nothing to find
    assert instance_precision_iou(empty, a) == 0.0  # everything missed
    # Same objects, other ids: perfect.
    assert instance_precision_iou((a + b) * 5, a + b) == 1.0
    # A missed object: TP 1, FN 1 at every threshold.
    assert instance_precision_iou(a, a + b) == pytest.approx(0.5)
    # A spurious object: TP 1, FP 1.
    assert instance_precision_iou(a + b, a) == pytest.approx(0.5)


def test_instance_metric_object_split_in_two() -> None:
    true = np.zeros((10, 10), dtype=np.int32)
    true[0:10, 0:10] = 1  # one object of 100 px
    pred = np.zeros_like(true)
    pred[:, 0:6] = 1  # 60 px: IoU 0.6
    pred[:, 6:10] = 2  # 40 px: IoU 0.4
    # t = 0.50, 0.55: TP 1, FP 1 -> 1/2; t >= 0.60 (0.6 is not > 0.6): TP 0, FP 2, FN 1 -> 0.
    assert instance_precision_iou(pred, true) == pytest.approx(0.1)
    assert instance_precision_iou(pred, true, thresholds=[0.5]) == pytest.approx(0.5)
    assert instance_precision_iou(pred, true, thresholds=np.array([0.6])) == 0.0


def test_instance_metric_iou_exactly_half_is_a_miss() -> None:
    true = np.zeros((4, 4), dtype=np.int32)
    true[0, :] = 1  # 4 px
    pred = np.zeros_like(true)
    pred[0, :2] = 3  # 2 px inside: IoU exactly 0.5
    assert instance_precision_iou(pred, true) == 0.0


def test_instance_metric_rejects_bad_input() -> None:
    labels = np.zeros((3, 3), dtype=np.int32)
    with pytest.raises(ValueError, match="shape"):
        instance_precision_iou(labels, np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match=r">= 0\.5"):
        instance_precision_iou(labels, labels, thresholds=[0.3])
    with pytest.raises(ValueError, match="integer label image"):
        instance_precision_iou(labels.astype(float), labels)
    with pytest.raises(ValueError, match="negative label"):
        instance_precision_iou(labels - 1, labels)


# --------------------------------------------------------------------------- summaries


def _summary_batch() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((4, 5, 5), dtype=bool)
    pred = np.zeros((4, 5, 5), dtype=bool)
    # 0: both empty -> 1, 1, 1
    truth[1] = _mask((5, 5), 4)  # 1: truth 4, pred 2 inside -> dice 2/3, iou 0.5, kaggle 0
    pred[1] = _mask((5, 5), 2)
    truth[2] = _mask((5, 5), 4)  # 2: prediction empty -> 0, 0, 0
    truth[3] = pred[3] = _mask((5, 5), 9)  # 3: exact -> 1, 1, 1
    return pred, truth


def test_summarise_scores_overall_and_per_group() -> None:
    pred, truth = _summary_batch()
    summary = summarise_scores(pred, truth, groups=np.array([0, 0, 1, 1]))
    assert list(summary.columns) == [
        "group",
        "n_images",
        "n_empty_truth",
        "n_empty_pred",
        "dice",
        "iou",
        "kaggle",
    ]
    assert summary["group"].tolist() == ["all", 0, 1]
    assert summary["n_images"].tolist() == [4, 2, 2]
    assert summary["n_empty_truth"].tolist() == [1, 1, 0]
    assert summary["n_empty_pred"].tolist() == [2, 1, 1]
    assert summary["dice"].tolist() == pytest.approx([(1 + 2 / 3 + 0 + 1) / 4, 5 / 6, 0.5])
    assert summary["iou"].tolist() == pytest.approx([0.625, 0.75, 0.5])
    assert summary["kaggle"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    # Serialisable for the OOF metrics artifacts.
    records = json.loads(summary.to_json(orient="records"))
    assert records[1]["group"] == 0 and records[0]["n_images"] == 4
    assert "all,4,1,2," in summary.to_csv(index=False)


def test_summarise_scores_without_groups_and_with_named_groups() -> None:
    pred, truth = _summary_batch()
    overall = summarise_scores(pred, truth)
    assert len(overall) == 1 and overall["group"].tolist() == ["all"]
    assert overall["iou"].tolist() == pytest.approx([0.625])
    named = summarise_scores(pred, truth, groups=np.array(["b", "a", "b", "b"]))
    assert named["group"].tolist() == ["all", "a", "b"]
    assert named["n_images"].tolist() == [4, 1, 3]
    assert named["kaggle"].tolist() == pytest.approx([0.5, 0.0, 2 / 3])
    assert isinstance(named, pd.DataFrame)


def test_summarise_scores_rejects_misaligned_groups() -> None:
    pred, truth = _summary_batch()
    with pytest.raises(ValueError, match="groups"):
        summarise_scores(pred, truth, groups=np.array([0, 1]))
