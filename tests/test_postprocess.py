"""Tests for post-processing (segflow.model.postprocess): thresholding, small-object removal, hole
filling, the grid search and instance labelling. References are hand-made masks or scipy's own
labelling and hole filling, independent of the OpenCV code paths under test."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

import segflow.model.postprocess as postprocess
from segflow.core.errors import SegflowError
from segflow.model.metrics import instance_precision_iou, per_image_scores
from segflow.model.postprocess import (
    PostprocessParams,
    apply_classes,
    apply_postprocess,
    label_instances,
    params_from_summary,
    tune_classes,
    tune_postprocess,
)

EIGHT = np.ones((3, 3), dtype=bool)


def _reference_postprocess(prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """scipy, one image at a time: threshold, drop 8-connected objects < min_area, fill holes."""
    out = []
    for image in prob:
        mask = image > params.threshold
        labels, _ = ndimage.label(mask, structure=EIGHT)
        keep = np.bincount(labels.ravel()) >= params.min_area
        keep[0] = False
        mask = keep[labels]
        if params.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        out.append(mask)
    return np.array(out, dtype=np.uint8).reshape(prob.shape)


def _noisy_batch(
    seed: int, n: int = 40, shape: tuple[int, int] = (23, 29)
) -> tuple[np.ndarray, ...]:
    """Speckled probabilities: many small objects, holes, and objects inside holes."""
    rng = np.random.default_rng(seed)
    prob = ndimage.uniform_filter(rng.random((n, *shape)), size=(1, 3, 3))
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    truth = ndimage.uniform_filter(rng.random((n, *shape)), size=(1, 3, 3)) > 0.5
    truth[: n // 8] = False  # some empty truths
    return prob, truth


# --------------------------------------------------------------------------- params


def test_params_defaults() -> None:
    params = PostprocessParams()
    assert (params.threshold, params.min_area, params.fill_holes) == (0.5, 0, False)


@pytest.mark.parametrize("threshold", [0, 0.0, 1.0, 1.5, -0.1, "0.5", True, None])
def test_params_reject_threshold_outside_open_unit_interval(threshold: object) -> None:
    with pytest.raises(SegflowError, match=r"postprocess\.threshold"):
        PostprocessParams(threshold=threshold)  # type: ignore[arg-type]


@pytest.mark.parametrize("min_area", [-1, 2.5, True, "3"])
def test_params_reject_bad_min_area(min_area: object) -> None:
    with pytest.raises(SegflowError, match=r"postprocess\.min_area"):
        PostprocessParams(min_area=min_area)  # type: ignore[arg-type]


def test_params_reject_non_boolean_fill_holes() -> None:
    with pytest.raises(SegflowError, match=r"postprocess\.fill_holes"):
        PostprocessParams(fill_holes="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- apply_postprocess


def test_threshold_is_strict_and_output_is_uint8() -> None:
    prob = np.array([[0.5, 0.50001], [0.2, 0.9]])
    out = apply_postprocess(prob, PostprocessParams(threshold=0.5))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1], [0, 1]]


def test_small_components_removed_with_8_connectivity() -> None:
    mask = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 1, 1, 1],  # diagonal pair (area 2) | a row of 3
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 1],  # single pixel
            [1, 1, 1, 1, 1, 0, 0],  # area 5
        ]
    )
    prob = mask * 0.9
    kept_2 = apply_postprocess(prob, PostprocessParams(min_area=2))
    expected_2 = mask.copy()
    expected_2[3, 6] = 0  # only the single pixel goes: the diagonal pair is one object of 2
    assert kept_2.tolist() == expected_2.tolist()
    expected_3 = expected_2.copy()
    expected_3[0, 0] = expected_3[1, 1] = 0
    assert apply_postprocess(prob, PostprocessParams(min_area=3)).tolist() == expected_3.tolist()
    expected_6 = np.zeros_like(mask)
    assert apply_postprocess(prob, PostprocessParams(min_area=6)).tolist() == expected_6.tolist()
    # min_area 0 and 1 keep everything.
    for min_area in (0, 1):
        assert apply_postprocess(prob, PostprocessParams(min_area=min_area)).tolist() == (
            mask.tolist()
        )


def test_fill_holes_by_hand() -> None:
    ring = np.zeros((7, 7), dtype=np.uint8)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0  # 3x3 hole
    filled = np.zeros_like(ring)
    filled[1:6, 1:6] = 1
    out = apply_postprocess(ring * 0.9, PostprocessParams(fill_holes=True))
    assert out.tolist() == filled.tolist()
    # Open to the border: not a hole.
    cup = ring.copy()
    cup[2:5, 5] = 0
    cup[3, 6] = 0
    assert apply_postprocess(cup * 0.9, PostprocessParams(fill_holes=True)).tolist() == (
        cup.tolist()
    )


def test_diagonal_gap_does_not_open_a_hole() -> None:
    # A 3x3 ring missing its bottom-right corner: the centre touches the outside only
    # diagonally, so with 4-connected background it is still a hole.
    ring = np.zeros((5, 5), dtype=np.uint8)
    ring[1:4, 1:4] = 1
    ring[2, 2] = 0
    ring[3, 3] = 0
    expected = ring.copy()
    expected[2, 2] = 1
    out = apply_postprocess(ring * 0.9, PostprocessParams(fill_holes=True))
    assert out.tolist() == expected.tolist()


def test_removal_happens_before_filling() -> None:
    small_ring = np.zeros((7, 7), dtype=np.uint8)
    small_ring[2:5, 2:5] = 1
    small_ring[3, 3] = 0  # area 8, filled area 9
    params = PostprocessParams(min_area=9, fill_holes=True)
    assert apply_postprocess(small_ring * 0.9, params).sum() == 0  # removed, then nothing to fill
    # A speck inside a big ring's hole is removed, and the hole then filled over it.
    big = np.zeros((9, 9), dtype=np.uint8)
    big[1:8, 1:8] = 1
    big[2:7, 2:7] = 0
    big[4, 4] = 1
    out = apply_postprocess(big * 0.9, PostprocessParams(min_area=2, fill_holes=True))
    expected = np.zeros_like(big)
    expected[1:8, 1:8] = 1
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_apply_postprocess_matches_scipy_reference(seed: int) -> None:
    prob, _ = _noisy_batch(seed)
    for params in (
        PostprocessParams(0.5, 0, False),
        PostprocessParams(0.45, 4, False),
        PostprocessParams(0.55, 0, True),
        PostprocessParams(0.4, 7, True),
    ):
        expected = _reference_postprocess(prob, params)
        assert np.array_equal(apply_postprocess(prob, params), expected), params
        # A single (H, W) image gives the same as its row of the batch.
        assert np.array_equal(apply_postprocess(prob[5], params), expected[5])


def test_apply_postprocess_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    prob, _ = _noisy_batch(4, n=10)
    params = PostprocessParams(0.5, 3, True)
    whole = apply_postprocess(prob, params)
    monkeypatch.setattr(postprocess, "_CHUNK_PIXELS", 3 * prob.shape[1] * prob.shape[2])
    assert np.array_equal(apply_postprocess(prob, params), whole)
    assert np.array_equal(whole, _reference_postprocess(prob, params))


def test_apply_postprocess_shapes() -> None:
    assert apply_postprocess(np.zeros((0, 4, 4)), PostprocessParams()).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        apply_postprocess(np.zeros(4), PostprocessParams())


# --------------------------------------------------------------------------- tune_postprocess


def _planted_dataset() -> tuple[np.ndarray, np.ndarray]:
    """Truth squares (3x3 .. 8x8) and 1-2 px noise specks, with probabilities such that only
    threshold 0.4 and min_area 6 (on the grids below) reproduce every truth exactly.

    Inside a square: 0.9 in the interior, 0.45 on its outermost ring (lost at threshold >= 0.45);
    a 0.35 halo around it (gained at threshold < 0.35); background 0.05; specks 0.9 of area 4 and
    1 (kept unless min_area > 4); the smallest squares have area 9 (lost if min_area > 9).
    """
    truths, probs = [], []
    sizes = [3, 4, 5, 6, 7, 8]
    for index in range(24):
        truth = np.zeros((24, 24), dtype=bool)
        prob = np.full((24, 24), 0.05)
        kind = index % 4  # 0: square + specks, 1: square, 2: specks only, 3: empty
        if kind in (0, 1):
            s = sizes[index % len(sizes)]
            y = x = 3
            prob[y - 1 : y + s + 1, x - 1 : x + s + 1] = 0.35  # halo
            prob[y : y + s, x : x + s] = 0.45  # outer ring
            prob[y + 1 : y + s - 1, x + 1 : x + s - 1] = 0.9  # interior
            truth[y : y + s, x : x + s] = True
        if kind in (0, 2):
            prob[17:19, 17:19] = 0.9  # 2x2 speck, area 4
            prob[21, 14] = 0.9  # single pixel
        truths.append(truth)
        probs.append(prob)
    return np.array(probs), np.array(truths)


PLANTED_THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6]
PLANTED_MIN_AREAS = [0, 3, 6, 10, 40]


def test_tune_recovers_the_planted_optimum() -> None:
    probs, truths = _planted_dataset()
    best, grid = tune_postprocess(
        probs, truths, PLANTED_THRESHOLDS, PLANTED_MIN_AREAS, fill_holes_options=(True, False)
    )
    assert best == PostprocessParams(threshold=0.4, min_area=6, fill_holes=False)
    assert list(grid.columns) == ["threshold", "min_area", "fill_holes", "gate", "score"]
    assert len(grid) == 5 * 5 * 2
    # Nothing has holes, so filling ties; the tie goes to no filling.
    assert grid.iloc[0].tolist() == [0.4, 6, False, 0.0, 1.0]
    assert grid.iloc[1].tolist() == [0.4, 6, True, 0.0, 1.0]
    assert (grid["score"].iloc[2:] < 1.0).all()
    assert grid["score"].is_monotonic_decreasing


@pytest.mark.parametrize("metric", ["kaggle", "dice", "iou"])
def test_tune_recovers_the_planted_optimum_for_every_metric(metric: str) -> None:
    probs, truths = _planted_dataset()
    best, _ = tune_postprocess(probs, truths, PLANTED_THRESHOLDS, PLANTED_MIN_AREAS, metric=metric)
    assert (best.threshold, best.min_area) == (0.4, 6)


@pytest.mark.parametrize("seed", range(3))
def test_tune_grid_scores_match_brute_force(seed: int) -> None:
    # Speckled data with nested objects and holes: the grid search's shortcuts (components
    # once per threshold, filling derived from the inclusion tree) must give exactly what
    # post-processing each grid point and scoring it would.
    prob, truth = _noisy_batch(seed, n=30)
    thresholds, min_areas = [0.35, 0.5, 0.62], [0, 1, 3, 6, 15]
    metric = ["kaggle", "dice", "iou"][seed]
    _, grid = tune_postprocess(prob, truth, thresholds, min_areas, (False, True), metric=metric)
    assert len(grid) == 3 * 5 * 2
    for row in grid.itertuples():
        params = PostprocessParams(row.threshold, row.min_area, row.fill_holes)
        pred = _reference_postprocess(prob, params)
        expected = per_image_scores(pred, truth)[metric].mean()
        assert row.score == pytest.approx(expected, abs=1e-12), params


def test_tune_nested_rings() -> None:
    # Concentric square rings (objects inside holes inside objects ...) of growing area.
    yy, xx = np.mgrid[:41, :41]
    chebyshev = np.maximum(abs(yy - 20), abs(xx - 20))
    prob = np.where(chebyshev % 4 < 2, 0.9, 0.1)[None]
    truth = np.zeros_like(prob, dtype=bool)
    truth[0, 5:36, 5:36] = True
    min_areas = [0, 10, 40, 60, 100, 150, 200, 300]
    _, grid = tune_postprocess(prob, truth, [0.5], min_areas, (False, True), metric="iou")
    for row in grid.itertuples():
        params = PostprocessParams(row.threshold, row.min_area, row.fill_holes)
        expected = per_image_scores(_reference_postprocess(prob, params), truth)["iou"][0]
        assert row.score == pytest.approx(expected, abs=1e-12), params


def test_tune_full_and_empty_images() -> None:
    # Image 0 is above every threshold, image 1 below: neither is labelled, both still count.
    prob = np.stack([np.full((3, 3), 0.95), np.full((3, 3), 0.01)])
    truth = np.stack([np.ones((3, 3), bool), np.zeros((3, 3), bool)])
    _, grid = tune_postprocess(prob, truth, [0.5], [9, 10], (False, True), metric="iou")
    scores = {(r.min_area, r.fill_holes): r.score for r in grid.itertuples()}
    assert scores == {(9, False): 1.0, (9, True): 1.0, (10, False): 0.5, (10, True): 0.5}


def test_tune_treats_nan_as_background_like_apply() -> None:
    prob, truth = _noisy_batch(2, n=6)
    prob[0, 3:9, 4:12] = np.nan  # partly NaN
    prob[1] = np.nan  # all NaN
    prob[2, 0, 0] = np.nan  # otherwise above every threshold
    prob[2, 1:] = 0.99
    _, grid = tune_postprocess(prob, truth, [0.3, 0.5], [0, 5], (False, True), metric="dice")
    for row in grid.itertuples():
        params = PostprocessParams(row.threshold, row.min_area, row.fill_holes)
        pred = apply_postprocess(prob, params)
        assert row.score == pytest.approx(per_image_scores(pred, truth)["dice"].mean(), abs=1e-12)


def test_tune_ties_go_to_lower_threshold_then_smaller_area_then_no_fill() -> None:
    prob = np.full((2, 4, 4), 0.9)
    truth = np.ones((2, 4, 4), dtype=bool)
    best, grid = tune_postprocess(prob, truth, [0.6, 0.3, 0.5], [5, 0], (True, False))
    assert best == PostprocessParams(0.3, 0, False)
    assert grid[["threshold", "min_area", "fill_holes"]].values.tolist() == [
        [t, m, f] for t in (0.3, 0.5, 0.6) for m in (0, 5) for f in (False, True)
    ]
    assert (grid["score"] == 1.0).all()


def test_tune_in_chunks_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    prob, truth = _noisy_batch(9, n=12)
    args = (prob, truth, [0.4, 0.6], [0, 4], (False, True))
    _, whole = tune_postprocess(*args)
    monkeypatch.setattr(postprocess, "_CHUNK_PIXELS", 5 * prob.shape[1] * prob.shape[2])
    _, chunked = tune_postprocess(*args)
    assert whole.equals(chunked)


def test_tune_duplicate_grid_values_scored_once() -> None:
    probs, truths = _planted_dataset()
    _, grid = tune_postprocess(probs, truths, [0.4, 0.4, np.float64(0.5)], [6, 6])
    assert grid[["threshold", "min_area"]].values.tolist() == [[0.4, 6], [0.5, 6]]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"thresholds": []}, "postprocess.thresholds"),
        ({"thresholds": [0.5, 1.0]}, "postprocess.thresholds"),
        ({"thresholds": [0.0]}, "postprocess.thresholds"),
        ({"thresholds": 0.5}, "postprocess.thresholds"),
        ({"min_areas": []}, "postprocess.min_areas"),
        ({"min_areas": [0, -3]}, "postprocess.min_areas"),
        ({"min_areas": [2.5]}, "postprocess.min_areas"),
        ({"fill_holes_options": []}, "postprocess.fill_holes_options"),
        ({"fill_holes_options": ["no"]}, "postprocess.fill_holes_options"),
        ({"metric": "f1"}, "postprocess.metric"),
    ],
)
def test_tune_validates_the_grid(kwargs: dict, key: str) -> None:
    args = {"thresholds": [0.5], "min_areas": [0]} | kwargs
    prob = np.full((1, 4, 4), 0.7)
    truth = np.ones((1, 4, 4), dtype=bool)
    with pytest.raises(SegflowError, match=key.replace(".", r"\.")):
        tune_postprocess(prob, truth, **args)


def test_tune_rejects_bad_arrays() -> None:
    with pytest.raises(SegflowError, match="zero images"):
        tune_postprocess(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), bool), [0.5], [0])
    with pytest.raises(ValueError, match="shape"):
        tune_postprocess(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool), [0.5], [0])


# --------------------------------------------------------------------------- label_instances


def _two_touching_discs() -> tuple[np.ndarray, np.ndarray]:
    """Mask of two discs of radius 10 whose centres are 19 px apart, and their true labels."""
    left = np.zeros((40, 60), dtype=np.uint8)
    right = np.zeros((40, 60), dtype=np.uint8)
    cv2.circle(left, (20, 20), 10, 1, -1)
    cv2.circle(right, (39, 20), 10, 1, -1)
    true = np.where(left > 0, 1, 0) + np.where((right > 0) & (left == 0), 2, 0)
    return ((left | right) > 0).astype(np.uint8), true


def test_label_instances_splits_touching_discs_only_when_asked() -> None:
    mask, true = _two_touching_discs()
    joined = label_instances(mask)
    assert joined.dtype == np.int32
    assert sorted(np.unique(joined).tolist()) == [0, 1]
    split = label_instances(mask, split_touching=True)
    assert split.dtype == np.int32
    assert sorted(np.unique(split).tolist()) == [0, 1, 2]
    assert np.array_equal(split > 0, mask > 0)
    # Each piece is one disc: the left one holds the left centre, the right one the right.
    assert split[20, 20] != split[20, 39]
    assert instance_precision_iou(split, true, thresholds=[0.5, 0.75, 0.9]) == 1.0


def test_label_instances_keeps_single_objects_whole() -> None:
    disc = np.zeros((50, 50), dtype=np.uint8)
    cv2.circle(disc, (25, 25), 15, 1, -1)
    bar = np.zeros((30, 60), dtype=np.uint8)
    bar[5:15, 5:55] = 1  # a ridge of equal distance-transform maxima
    ellipse = np.zeros((60, 60), dtype=np.uint8)
    cv2.ellipse(ellipse, (30, 30), (25, 8), 30, 0, 360, 1, -1)
    for mask in (disc, bar, ellipse):
        assert label_instances(mask, split_touching=True).max() == 1


def test_label_instances_components_and_tiny_objects() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal: one object
    mask[4, 4:6] = True
    mask[7, 7] = True
    for split in (False, True):
        labels = label_instances(mask, split_touching=split)
        assert np.array_equal(labels > 0, mask)
        assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
        assert labels[0, 0] == labels[1, 1]
        assert labels[4, 4] == labels[4, 5] != labels[7, 7]
    assert label_instances(np.zeros((5, 5)), split_touching=True).tolist() == [[0] * 5] * 5
    # Thin and image-filling objects are not cut (no peak at all for a lone 1x1 image).
    for mask in (np.eye(4), np.eye(9), np.ones((1, 1)), np.ones((1, 7)), np.ones((5, 5))):
        assert (
            label_instances(mask, split_touching=True).tolist() == (mask > 0).astype(int).tolist()
        )


def test_label_instances_split_only_refines_components() -> None:
    rng = np.random.default_rng(11)
    for _ in range(150):
        mask = rng.random((14, 14)) < rng.random()
        if rng.random() < 0.5:
            mask = ndimage.binary_opening(mask)
        components, n_components = ndimage.label(mask, structure=EIGHT)
        labels = label_instances(mask, split_touching=True)
        ids = np.unique(labels[labels > 0])
        assert np.array_equal(labels > 0, mask)
        assert ids.tolist() == list(range(1, ids.size + 1))
        assert ids.size >= n_components
        for k in ids:  # each object lies inside one component
            assert np.unique(components[labels == k]).size == 1


def test_label_instances_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        label_instances(np.zeros((2, 3, 3)))
    with pytest.raises(SegflowError, match=r"postprocess\.min_distance"):
        label_instances(np.ones((3, 3)), split_touching=True, min_distance=0)


# --------------------------------------------------------------------------- aux-head gate, classes


def _gated_dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image has one confident blob; only the odd images' truth has it. A head that
    knows (non-empty probability 0.9 vs 0.2) lets a gate between 0.2 and 0.9 fix every image."""
    probs = np.full((10, 12, 12), 0.05)
    probs[:, 3:9, 3:9] = 0.95
    truths = np.zeros((10, 12, 12), dtype=bool)
    truths[1::2, 3:9, 3:9] = True
    nonempty = np.where(np.arange(10) % 2 == 1, 0.9, 0.2).astype(np.float32)
    return probs, truths, nonempty


def test_gate_empties_images_the_head_calls_empty() -> None:
    probs, _, nonempty = _gated_dataset()
    gated = apply_postprocess(probs, PostprocessParams(gate=0.5), nonempty)
    assert gated[::2].sum() == 0 and (gated[1::2].sum(axis=(1, 2)) == 36).all()
    ungated = apply_postprocess(probs, PostprocessParams(gate=0.5))  # no head: no gate
    assert (ungated.sum(axis=(1, 2)) == 36).all()
    single = apply_postprocess(probs[0], PostprocessParams(gate=0.5), nonempty[0])
    assert single.shape == (12, 12) and single.sum() == 0


def test_tune_finds_the_planted_gate_and_scores_it_like_apply() -> None:
    probs, truths, nonempty = _gated_dataset()
    best, grid = tune_postprocess(
        probs, truths, [0.5], [0], nonempty=nonempty, gates=[0.1, 0.5, 0.95]
    )
    assert best.gate == 0.5 and grid.iloc[0]["score"] == 1.0
    assert sorted(grid["gate"]) == [0.0, 0.1, 0.5, 0.95]  # "no gate" is always a candidate
    for row in grid.itertuples():
        params = PostprocessParams(row.threshold, row.min_area, row.fill_holes, row.gate)
        pred = apply_postprocess(probs, params, nonempty)
        assert row.score == pytest.approx(per_image_scores(pred, truths)["kaggle"].mean())
    _, no_head = tune_postprocess(probs, truths, [0.5], [0], gates=[0.5])
    assert no_head["gate"].tolist() == [0.0]  # without a head the gates are not tried
    with pytest.raises(SegflowError, match=r"postprocess\.gates"):
        tune_postprocess(probs, truths, [0.5], [0], nonempty=nonempty, gates=[1.0])


def test_tune_classes_tunes_each_class_on_its_own_bit() -> None:
    planted_probs, planted_truths = _planted_dataset()
    gate_probs, gate_truths, nonempty = _gated_dataset()
    n = len(gate_probs)
    # Class 0: the planted threshold/min-area problem; class 1: the gate problem.
    probs = np.stack([planted_probs[:n, :12, :12], gate_probs], axis=1)
    packed = planted_truths[:n, :12, :12].astype(np.uint8) | (gate_truths.astype(np.uint8) << 1)
    heads = np.stack([np.ones(n, np.float32), nonempty], axis=1)
    params, grid, summary = tune_classes(
        probs,
        packed,
        ["a", "b"],
        PLANTED_THRESHOLDS,
        PLANTED_MIN_AREAS,
        gates=[0.5],
        nonempty=heads,
    )
    expected_a, _ = tune_postprocess(
        planted_probs[:n, :12, :12],
        planted_truths[:n, :12, :12],
        PLANTED_THRESHOLDS,
        PLANTED_MIN_AREAS,
        nonempty=heads[:, 0],
        gates=[0.5],
    )
    assert params[0] == expected_a and params[1].gate == 0.5
    assert [r["class"] for r in summary["classes"]] == ["a", "b"]
    assert summary["score"] == pytest.approx(np.mean([r["score"] for r in summary["classes"]]))
    assert set(grid["class"]) == {"a", "b"}
    assert params_from_summary(summary, ["a", "b"]) == params
    with pytest.raises(SegflowError, match="the data has"):
        params_from_summary(summary, ["a"])
    masks = apply_classes(probs, params, heads)
    assert masks.shape == (n, 2, 12, 12)
    np.testing.assert_array_equal(masks[:, 1], apply_postprocess(gate_probs, params[1], nonempty))
