"""The per-image threshold of the second level: target, regressors, cross-fitting, recalibration."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from segflow.core.errors import SegflowError
from segflow.ensemble.stacking.features import image_features
from segflow.ensemble.stacking.threshold import (
    THRESHOLD_GRID,
    best_thresholds,
    fit_threshold,
    make_regressor,
    recalibrate,
    write_threshold_artifacts,
)
from segflow.model.metrics import per_image_scores

BACKENDS = ["lightgbm", "catboost"]
QUICK = {
    "lightgbm": {
        "num_iterations": 60,
        "learning_rate": 0.2,
        "num_threads": 1,
        "min_data_in_leaf": 5,
    },
    "catboost": {"iterations": 60, "learning_rate": 0.2, "thread_count": 1},
}


def _object_image(inside: float, halo: float, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A square object of probability ``inside``, a one-pixel ring of ``halo`` around it and
    0.02 elsewhere: thresholds in [halo, inside) give the exact mask."""
    probs = np.full((size, size), 0.02, np.float32)
    truth = np.zeros((size, size), np.uint8)
    probs[7:17, 7:17] = halo
    probs[8:16, 8:16] = inside
    truth[8:16, 8:16] = 1
    return probs, truth


def test_best_threshold_is_the_middle_of_the_perfect_range() -> None:
    faint, faint_truth = _object_image(inside=0.42, halo=0.22)
    bright, bright_truth = _object_image(inside=0.95, halo=0.68)
    empty = np.full((24, 24), 0.3, np.float32)
    missed, missed_truth = _object_image(inside=0.05, halo=0.03)
    probs = np.stack([faint, bright, empty, missed])
    truths = np.stack([faint_truth, bright_truth, np.zeros((24, 24), np.uint8), missed_truth])
    best, informative = best_thresholds(probs, truths)
    # faint: 0.25..0.40 are perfect -> 0.325; bright: 0.70..0.90 -> 0.80.
    assert best[0] == pytest.approx(np.mean([0.25, 0.3, 0.35, 0.4]))
    assert best[1] == pytest.approx(np.mean([0.7, 0.75, 0.8, 0.85, 0.9]))
    assert informative.tolist() == [True, True, False, False]
    with pytest.raises(SegflowError, match="increasing"):
        best_thresholds(probs, truths, grid=[0.5, 0.4])
    with pytest.raises(SegflowError, match="shape"):
        best_thresholds(probs[:, :10], truths)


def test_recalibration_moves_each_images_threshold_to_one_half() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((5, 16, 16)).astype(np.float32)
    thresholds = np.array([0.2, 0.35, 0.5, 0.7, 0.9])
    out = recalibrate(probs, thresholds)
    assert out.dtype == np.float16 and out.shape == probs.shape
    assert out.min() >= 0 and out.max() <= 1
    for i, t in enumerate(thresholds):
        clear = np.abs(probs[i] - t) > 2e-3  # float16 rounding right at t
        assert np.array_equal((out[i] > 0.5)[clear], (probs[i] > t)[clear])
        order = np.argsort(probs[i].ravel())
        assert np.all(np.diff(out[i].ravel()[order].astype(np.float32)) >= 0)  # monotone
    with pytest.raises(SegflowError, match="thresholds"):
        recalibrate(probs, thresholds[:3])


def _planted(n: int = 240, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Images whose object brightness (hence best threshold) follows a metadata column."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.3, 0.95, size=n)
    maps, truths = zip(*(_object_image(v, 0.7 * v) for v in level), strict=True)
    probs, truth = np.stack(maps), np.stack(truths)
    # The metadata knows the level; the maps alone also do (prob_max): either may be used.
    features = image_features({"m": probs}, metadata=pd.DataFrame({"meta_level": level}))
    return features, probs, truth


@pytest.mark.parametrize("backend", BACKENDS)
def test_regressor_learns_the_planted_threshold(backend: str, tmp_path) -> None:
    features, probs, truth = _planted()
    folds = np.arange(len(features)) % 3
    best, informative = best_thresholds(probs, truth)
    assert informative.all()
    result = fit_threshold(features, best, informative, folds, backend, QUICK[backend])
    metrics = result.metrics()
    assert metrics["mae"] < 0.4 * metrics["mae_constant"]
    # Recalibrated to the predicted thresholds, one global 0.5 beats the best single threshold.
    calibrated = recalibrate(probs, result.predicted) > 0.5
    per_image = per_image_scores(calibrated, truth)["kaggle"].mean()
    global_best = max(per_image_scores(probs > t, truth)["kaggle"].mean() for t in THRESHOLD_GRID)
    assert per_image > global_best + 0.05
    paths = write_threshold_artifacts(result, tmp_path, [f"i{i}" for i in range(len(best))])
    assert json.loads(paths["metrics"].read_text())["n_informative"] == len(best)
    oof = pd.read_csv(paths["oof"])
    assert list(oof.columns) == ["id", "fold", "best", "informative", "predicted"]
    reloaded = type(result.final_model).load(paths["model"])
    np.testing.assert_allclose(
        reloaded.predict_proba(features), result.final_model.predict_proba(features), atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_held_out_fold_targets_never_reach_its_predictions(backend: str) -> None:
    """Leakage probe: scrambling fold 0's targets must not change fold 0's predictions."""
    features, probs, truth = _planted(n=150, seed=1)
    folds = np.arange(len(features)) % 3
    best, informative = best_thresholds(probs, truth)
    first = fit_threshold(features, best, informative, folds, backend, QUICK[backend])
    scrambled = best.copy()
    scrambled[folds == 0] = np.random.default_rng(5).uniform(0.1, 0.9, (folds == 0).sum())
    second = fit_threshold(features, scrambled, informative, folds, backend, QUICK[backend])
    np.testing.assert_array_equal(first.predicted[folds == 0], second.predicted[folds == 0])
    assert not np.array_equal(first.predicted[folds == 1], second.predicted[folds == 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_or_missing_targets(backend: str) -> None:
    features, _, _ = _planted(n=30)
    model = make_regressor(backend, QUICK[backend]).fit(features, np.full(30, 0.4))
    np.testing.assert_allclose(model.predict_proba(features), 0.4, atol=1e-6)
    folds = np.arange(30) % 2
    nothing = fit_threshold(features, np.zeros(30), np.zeros(30, bool), folds, backend)
    np.testing.assert_allclose(nothing.predicted, 0.5, atol=1e-6)


def test_regressor_errors() -> None:
    with pytest.raises(KeyError, match="lightgbm, catboost"):
        make_regressor("xgboost")
    features, _, _ = _planted(n=20)
    with pytest.raises(SegflowError, match="finite"):
        make_regressor("lightgbm").fit(features, np.full(20, np.nan))
    kwargs: dict[str, Any] = {"informative": np.ones(20, bool), "folds": np.zeros(19, int)}
    with pytest.raises(SegflowError, match="shape"):
        fit_threshold(features, np.full(20, 0.5), **kwargs)
