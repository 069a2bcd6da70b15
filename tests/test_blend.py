"""Tests for multi-experiment ensembling (segflow.ensemble.weights): blends, aux-head blends and the
OOF weight search. References are brute force: blend, threshold, score with
segflow.model.metrics.per_image_scores at every threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

import segflow.ensemble.weights as ensemble
from segflow.artifacts.truths import class_truths
from segflow.core.errors import SegflowError
from segflow.ensemble.weights import blend, blend_nonempty, tune_weights
from segflow.model.metrics import per_image_scores

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _reference_score(
    probs: list[np.ndarray], truths: np.ndarray, weights: np.ndarray, metric: str = "kaggle"
) -> tuple[float, list[float]]:
    """(mean over classes of the best-over-thresholds mean score, best threshold per class)."""
    blended = blend(probs, weights)
    best_scores, best_thresholds = [], []
    for k in range(blended.shape[1]):
        truth = class_truths(truths, k)
        plane = blended[:, k].astype(np.float32)
        scores = [per_image_scores(plane > t, truth)[metric].mean() for t in THRESHOLDS]
        best_scores.append(max(scores))
        best_thresholds.append(THRESHOLDS[int(np.argmax(np.round(scores, 12)))])
    return float(np.mean(best_scores)), best_thresholds


def _squares(n_images: int, size: int = 12) -> np.ndarray:
    """Packed one-class truths: a square in every image, at an image-dependent place."""
    truths = np.zeros((n_images, size, size), dtype=np.uint8)
    for i in range(n_images):
        top = i % (size - 4)
        truths[i, top : top + 4, 2:7] = 1
    return truths


def _weights_of(table, kind: str, names: list[str]) -> np.ndarray:
    row = table.set_index("kind").loc[kind]
    return np.array([row[f"w_{name}"] for name in names])


def test_blend_is_the_weighted_mean_and_chunk_invariant(tmp_path) -> None:
    rng = np.random.default_rng(0)
    probs = [rng.random((7, 2, 5, 6)).astype(np.float16) for _ in range(3)]
    path = tmp_path / "p2.npy"
    np.save(path, probs[2])
    memmapped = [probs[0], probs[1], np.load(path, mmap_mode="r")]
    expected = (
        np.float32(0.2) * probs[0].astype(np.float32)
        + np.float32(0.3) * probs[1].astype(np.float32)
        + np.float32(0.5) * probs[2].astype(np.float32)
    ).astype(np.float16)
    for chunk in (1, 3, 256):
        out = blend(memmapped, [2, 3, 5], chunk=chunk)  # normalised to 0.2, 0.3, 0.5
        assert out.dtype == np.float16
        np.testing.assert_array_equal(out, expected)
    # A single experiment of weight 1 is returned unchanged; weight-0 experiments do not count.
    np.testing.assert_array_equal(blend(probs, [0, 4, 0]), probs[1])


def test_blend_nonempty_renormalises_over_experiments_with_an_aux_head() -> None:
    first = np.array([[0.2], [0.8]], dtype=np.float32)
    third = np.array([[0.6], [0.4]], dtype=np.float32)
    out = blend_nonempty([first, None, third], [1.0, 5.0, 3.0])
    np.testing.assert_allclose(out, (first * 1 + third * 3) / 4, rtol=1e-6)
    assert out.dtype == np.float32
    assert blend_nonempty([None, None], [1, 1]) is None
    assert blend_nonempty([first, None], [0, 1]) is None  # its aux head is not in the blend


@pytest.mark.parametrize(
    ("probs", "weights", "match"),
    [
        ([], [], "at least one"),
        ([np.zeros((2, 1, 3, 3), np.float16), np.zeros((2, 1, 3, 4), np.float16)], [1, 1], "shape"),
        ([np.zeros((2, 3, 3), np.float16)], [1], r"\(N, K, H, W\)"),
        ([np.zeros((2, 1, 3, 3), np.float16)] * 2, [1], "weights"),
        ([np.zeros((2, 1, 3, 3), np.float16)] * 2, [1, -1], "weights"),
        ([np.zeros((2, 1, 3, 3), np.float16)] * 2, [0, 0], "all zero"),
        ([np.zeros((2, 1, 3, 3), np.float16)] * 2, [1, float("nan")], "finite"),
    ],
)
def test_blend_rejects_bad_inputs(probs, weights, match: str) -> None:
    with pytest.raises(SegflowError, match=match):
        blend(probs, weights)


def test_blend_rejects_bad_chunk() -> None:
    with pytest.raises(SegflowError, match=r"ensemble\.chunk"):
        blend([np.zeros((2, 1, 3, 3), np.float16)], [1], chunk=0)


def test_planted_complementary_experiments_give_the_known_best_mix() -> None:
    # Images 0-3: A finds the object, B predicts nothing. Image 4: B finds it, A does not.
    # Images 5-7 are empty, where B predicts the whole image. A blend finds objects where the
    # finder's weight exceeds the threshold and stays clean where w_B <= threshold: with
    # w_A > t >= w_B every image but 4 is right, the best possible; w_A >= 0.6 all achieve it
    # (A alone too), and the tie goes to the mix closest to the mean, (0.6, 0.4).
    truths = _squares(8)
    truths[5:] = 0
    first = np.zeros((8, 1, 12, 12), np.float16)
    second = np.zeros((8, 1, 12, 12), np.float16)
    first[:4, 0] = truths[:4]
    second[4, 0] = truths[4]
    second[5:] = 1
    names = ["a", "b"]
    weights, table = tune_weights([first, second], truths, ["mask"], names=names)
    np.testing.assert_allclose(weights, [0.6, 0.4])
    scores = table.set_index("kind")["score"]
    assert scores["tuned"] == pytest.approx(7 / 8)
    assert scores["single:a"] == pytest.approx(7 / 8)
    assert scores["mean"] == pytest.approx(5 / 8)  # w_B = 0.5 > t whenever w_A = 0.5 > t
    assert scores["single:b"] == pytest.approx(1 / 8)
    assert scores["tuned"] >= scores["mean"] >= scores.min()
    assert list(table["kind"]) == ["single:a", "single:b", "mean", "tuned"]
    assert table.set_index("kind").loc["tuned", "threshold"] in (0.4, 0.5)


def test_a_perfect_experiment_takes_all_the_weight_from_noise() -> None:
    # A encodes the truth softly (0.55 on, 0.45 off): alone it is perfect at t = 0.5, but any
    # share of uniform noise pushes some background pixel above the best threshold.
    rng = np.random.default_rng(1)
    truths = _squares(30)
    perfect = np.where(truths, 0.55, 0.45)[:, None].astype(np.float16)
    noise = rng.random(perfect.shape).astype(np.float16)
    weights, table = tune_weights([noise, perfect], truths, ["mask"], names=["noise", "a"])
    np.testing.assert_array_equal(weights, [0.0, 1.0])
    tuned = table.set_index("kind").loc["tuned"]
    assert tuned["score"] == 1.0
    assert tuned["threshold"] == 0.5


def test_identical_experiments_tie_and_the_plain_mean_wins() -> None:
    rng = np.random.default_rng(2)
    truths = _squares(6)
    probs = rng.random((6, 1, 12, 12)).astype(np.float16)
    weights, _ = tune_weights([probs, probs.copy(), probs.copy()], truths, ["mask"], step=0.5)
    np.testing.assert_allclose(weights, [1 / 3] * 3)


def test_table_scores_match_brute_force_on_two_classes() -> None:
    rng = np.random.default_rng(3)
    n, size = 10, 9
    truths = (rng.random((n, size, size)) < 0.3).astype(np.uint8)
    truths |= (rng.random((n, size, size)) < 0.3).astype(np.uint8) << 1
    truths[:3] = 0  # empty images score 1 only if the blend predicts nothing
    planes = np.stack([class_truths(truths, 0), class_truths(truths, 1)], axis=1)
    probs = [
        np.clip(planes * 0.6 + rng.random(planes.shape) * scale, 0, 1).astype(np.float16)
        for scale in (0.3, 0.5, 0.7)
    ]
    names = ["x", "y", "z"]
    weights, table = tune_weights(probs, truths, ["c0", "c1"], metric="dice", names=names)
    assert (weights >= 0).all()
    assert weights.sum() == pytest.approx(1.0)
    on_grid = np.allclose(weights * 10, np.round(weights * 10), atol=1e-9)
    assert on_grid or np.allclose(weights, 1 / 3)  # a grid point, or the plain mean
    for kind in table["kind"]:
        row = table.set_index("kind").loc[kind]
        score, thresholds = _reference_score(probs, truths, _weights_of(table, kind, names), "dice")
        assert row["score"] == pytest.approx(score, abs=1e-12)
        assert json.loads(row["threshold"]) == dict(zip(["c0", "c1"], thresholds, strict=True))
    scores = table.set_index("kind")["score"]
    assert scores["tuned"] >= scores["mean"] >= scores.filter(like="single:").min()
    assert scores["tuned"] >= scores.filter(like="single:").max()


def test_chunking_and_cache_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    truths = _squares(9)
    probs = [
        np.clip(truths[:, None] * 0.5 + rng.random((9, 1, 12, 12)) * 0.6, 0, 1).astype(np.float16)
        for _ in range(2)
    ]
    expected = tune_weights(probs, truths, ["mask"])
    monkeypatch.setattr(ensemble, "_CHUNK_PIXELS", 300)  # 2 images a chunk
    monkeypatch.setattr(ensemble, "_CACHE_BYTES", 0)  # recompute the parts every pass
    monkeypatch.setattr(ensemble, "_BATCH_BYTES", 1)  # one blend per batch
    weights, table = tune_weights(probs, truths, ["mask"])
    np.testing.assert_array_equal(weights, expected[0])
    assert table.equals(expected[1])


def test_many_experiments_use_coordinate_ascent_and_beat_every_single_one() -> None:
    rng = np.random.default_rng(5)
    truths = _squares(8, size=10)
    probs = [
        np.clip(truths[:, None] * 0.5 + rng.random((8, 1, 10, 10)) * 0.7, 0, 1).astype(np.float16)
        for _ in range(6)
    ]  # 6 experiments at step 0.1: 3003 grid points, above MAX_GRID_POINTS
    weights, table = tune_weights(probs, truths, ["mask"], metric="iou")
    assert (weights >= 0).all()
    assert weights.sum() == pytest.approx(1.0)
    scores = table.set_index("kind")["score"]
    assert scores["tuned"] >= max(scores["mean"], scores.filter(like="single:").max())
    score, _ = _reference_score(probs, truths, weights, "iou")
    assert scores["tuned"] == pytest.approx(score, abs=1e-12)


def test_float16_cut_matches_rounding_then_comparing() -> None:
    rng = np.random.default_rng(6)
    for threshold in (*THRESHOLDS, 0.1, 0.333, 1e-6, 0.999):
        threshold32 = np.float32(threshold)
        cut = ensemble._float16_cut(threshold32)
        bits = np.array([cut], np.float32).view(np.int32)[0] + np.arange(-3000, 3000)
        values = np.concatenate(
            [bits.astype(np.int32).view(np.float32), rng.random(5000).astype(np.float32)]
        )
        np.testing.assert_array_equal(values > cut, values.astype(np.float16) > threshold32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": 0.3}, "ensemble.step must divide 1"),
        ({"step": 0}, "ensemble.step"),
        ({"thresholds": (0.5, 1.0)}, "ensemble.thresholds"),
        ({"thresholds": ()}, "ensemble.thresholds"),
        ({"metric": "f1"}, "ensemble.metric"),
        ({"classes": ["a", "b"]}, "class names"),
        ({"names": ["a", "a"]}, "distinct experiment names"),
        ({"truths_packed": np.zeros((3, 4, 4), np.uint8)}, "true masks"),
    ],
)
def test_tune_weights_rejects_bad_inputs(kwargs: dict, match: str) -> None:
    arguments = {
        "probs": [np.zeros((2, 1, 4, 4), np.float16)] * 2,
        "truths_packed": np.zeros((2, 4, 4), np.uint8),
        "classes": ["mask"],
        **kwargs,
    }
    with pytest.raises(SegflowError, match=match):
        tune_weights(**arguments)


# --------------------------------------------------------------------------- majority vote


def _three_members(truths: np.ndarray) -> list[np.ndarray]:
    """Planted: two members say 0.55 on the truth and nothing else, the third says 0 - the mean
    (0.37) misses every square at threshold 0.5, the majority (2 of 3) finds them all."""
    square = class_truths(truths, 0)[:, None].astype(np.float16)
    return [square * np.float16(0.55), square * np.float16(0.55), np.zeros_like(square)]


def test_vote_is_the_majority_where_the_mean_is_not() -> None:
    truths = _squares(6)
    members = _three_members(truths)
    shares = ensemble.vote(members, chunk=4)
    mean = blend(members, [1, 1, 1])
    truth = class_truths(truths, 0)
    assert np.array_equal(shares[:, 0] > 0.5, truth)
    assert not (mean[:, 0] > 0.5).any()
    assert set(np.unique(shares).tolist()) == {0.0, np.float16(2 / 3)}
    assert np.array_equal(ensemble.vote(members, chunk=1), shares)
    with pytest.raises(SegflowError, match="threshold"):
        ensemble.vote(members, threshold=1.0)


def test_blend_stage_vote_mode_scores_the_vote() -> None:
    import pandas as pd

    from segflow.artifacts.predictions import Prediction
    from segflow.ensemble.blend import run_blend

    truths = _squares(6)
    members = _three_members(truths)
    ids = pd.DataFrame({"id": [f"i{i}" for i in range(6)]})
    folds = pd.DataFrame({"id": ids["id"], "fold": [0, 1, 2] * 2})
    uncertainty = [np.full_like(m, u) for m, u in zip(members, (0.1, 0.2, 0.3), strict=True)]
    preds = [Prediction(ids, m, u) for m, u in zip(members, uncertainty, strict=True)]
    args = (["a", "b", "c"], preds, truths, folds, ["mask"], "dice", 0.5)
    oof, summary, table = run_blend(*args, mode="vote")
    assert np.array_equal(oof.probs[:, 0] > 0.5, class_truths(truths, 0))
    assert summary["mode"] == "vote" and table["kind"].tolist() == ["vote"]
    assert table["score"].iloc[0] == pytest.approx(1.0)
    assert oof.uncertainty is not None and np.allclose(oof.uncertainty, 0.2, atol=1e-3)
    assert "mode" not in run_blend(*args)[1]  # the mean's weights.json keeps its keys
    with pytest.raises(SegflowError, match=r"ensemble\.mode"):
        run_blend(*args, mode="median")
