"""The second level's optional per-image threshold: which threshold suits each image best.

One global threshold is a compromise: a faint object wants a low one, a bright image with a
noisy halo a high one. For every training image with a true object, :func:`best_thresholds`
finds the thresholds of a grid that maximise that image's Kaggle score; a gradient-boosted
regressor (:func:`fit_threshold`, LightGBM or CatBoost, cross-fitted on the first level's folds
like the gate) learns it from the gate's image features. :func:`recalibrate` then rescales each
image's probabilities so that its own threshold lands on 0.5, which keeps every later stage
(post-processing grid, gate, submission) unchanged: tuning the global threshold around 0.5
shifts all per-image thresholds together.

Images whose truth is empty, or where no threshold finds any of the object, say nothing about
the threshold; they are left out of the fit (the gate handles emptiness) but still predicted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.ensemble.stacking.features import check_feature_frame, check_truth_plane
from segflow.ensemble.stacking.learners import (
    BACKENDS,
    CatBoostClassifier,
    LightGBMClassifier,
    write_image_model_artifacts,
)
from segflow.model.metrics import per_image_scores

THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))
"""0.10, 0.15, ..., 0.90: the thresholds :func:`best_thresholds` tries."""
# Recalibration divides by t and by 1 - t: keep thresholds away from 0 and 1.
THRESHOLD_LIMITS = (0.05, 0.95)


def _regression_target(target: object, n_rows: int, what: str = "target") -> np.ndarray:
    values = np.asarray(target, dtype=np.float64)
    if values.shape != (n_rows,) or not np.all(np.isfinite(values)):
        raise SegflowError(f"{what} must be {n_rows} finite numbers, got shape {values.shape}")
    return values


class LightGBMRegressor(LightGBMClassifier):
    """LightGBM least-squares regressor; ``predict_proba`` returns the predicted value."""

    objective: ClassVar[str] = "regression"

    def _check_target(self, target: object, n_rows: int) -> np.ndarray:
        return _regression_target(target, n_rows)

    def _fit_constant(self, matrix: np.ndarray, value: float) -> Any:
        # LightGBM starts from the label mean and finds no split: the constant model.
        return self._fit_matrix(matrix, np.full(len(matrix), value))


class CatBoostRegressor(CatBoostClassifier):
    """CatBoost RMSE regressor; ``predict_proba`` returns the predicted value."""

    loss_function: ClassVar[str] = "RMSE"

    def _check_target(self, target: object, n_rows: int) -> np.ndarray:
        return _regression_target(target, n_rows)

    @staticmethod
    def _model_class() -> type:
        from catboost import CatBoostRegressor as CatBoostModel

        return CatBoostModel

    def _constant_bias(self, value: float) -> float:
        return float(value)  # a regressor's raw prediction is the value itself

    def _predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        from catboost import Pool

        return self._model.predict(Pool(matrix, feature_names=self.feature_names))


REGRESSORS: dict[str, type[LightGBMRegressor] | type[CatBoostRegressor]] = {
    "lightgbm": LightGBMRegressor,
    "catboost": CatBoostRegressor,
}


def make_regressor(
    backend: str, params: Mapping[str, Any] | None = None, seed: int = 0
) -> LightGBMRegressor | CatBoostRegressor:
    """An unfitted regressor of ``backend``, with the classifiers' defaults (see
    :func:`segflow.ensemble.stacking.learners.make_classifier`).

    Raises:
        KeyError: unknown backend (the message lists the valid names).
    """
    if backend not in REGRESSORS:
        raise KeyError(f"stacking: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return REGRESSORS[backend](params, seed)


def best_thresholds(
    prob_plane: np.ndarray,
    truth_plane: np.ndarray,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's best threshold on ``grid`` by its own Kaggle score.

    Scores are flat over ranges of thresholds; the best threshold is the middle (mean) of the
    thresholds that reach the image's maximum, a stable regression target.

    Args:
        prob_plane: one class's probabilities.
        truth_plane: that class's true masks, bool or 0/1.
        grid: increasing thresholds in (0, 1).

    Returns:
        (best threshold per image, float64; informative per image, bool: the truth is
        non-empty and some threshold scores above 0).

    Shape:
        prob_plane, truth_plane: (N, H, W); outputs: (N,).
    """
    truth_plane = check_truth_plane(truth_plane)
    probs = np.asarray(prob_plane)
    if probs.shape != truth_plane.shape:
        raise SegflowError(
            f"probabilities {probs.shape} and truths {truth_plane.shape} differ in shape"
        )
    grid_values = np.asarray(grid, dtype=np.float64)
    if grid_values.ndim != 1 or not len(grid_values) or np.any(np.diff(grid_values) <= 0):
        raise SegflowError(f"threshold grid must be increasing, got {list(grid)}")
    if grid_values[0] <= 0 or grid_values[-1] >= 1:
        raise SegflowError(f"thresholds must lie in (0, 1), got {list(grid)}")
    scores = np.stack(
        [per_image_scores(probs > t, truth_plane)["kaggle"] for t in grid_values], axis=1
    )
    best = scores.max(axis=1)
    at_best = scores >= best[:, None] - 1e-12
    chosen = (at_best * grid_values).sum(axis=1) / at_best.sum(axis=1)
    informative = truth_plane.reshape(len(truth_plane), -1).any(axis=1) & (best > 0)
    return chosen, informative


def recalibrate(prob_plane: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Rescale each image's probabilities so that its threshold becomes 0.5.

    Piecewise linear and increasing: [0, t] -> [0, 0.5] and [t, 1] -> [0.5, 1], so thresholding
    the result at 0.5 equals thresholding the input at t (and nearby global thresholds shift
    every image's threshold alike). Thresholds are clipped to :data:`THRESHOLD_LIMITS`.

    Args:
        prob_plane: probabilities in [0, 1].
        thresholds: one per image.

    Returns:
        float16 probabilities, same shape.

    Shape:
        prob_plane: (N, H, W); thresholds: (N,).
    """
    probs = np.asarray(prob_plane, dtype=np.float32)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (len(probs),) or not np.all(np.isfinite(t)):
        raise SegflowError(f"need {len(probs)} finite thresholds, got shape {t.shape}")
    t = np.clip(t, *THRESHOLD_LIMITS).astype(np.float32)[:, None, None]
    low = 0.5 * probs / t
    high = 0.5 + 0.5 * (probs - t) / (1.0 - t)
    out = np.where(probs < t, low, high)
    return np.clip(out, 0.0, 1.0).astype(np.float16)


@dataclass(frozen=True)
class ThresholdResult:
    """The per-image threshold model of one class (see :func:`fit_threshold`)."""

    predicted: np.ndarray
    """Honest OOF predicted threshold of every image, float64 (N,)."""
    best: np.ndarray
    """Each image's best threshold on the grid (:func:`best_thresholds`)."""
    informative: np.ndarray
    """Which images the models were fitted on, bool (N,)."""
    folds: np.ndarray
    final_model: LightGBMRegressor | CatBoostRegressor
    """Fitted on every informative image; apply it to the test set's features."""
    importances: pd.Series

    def metrics(self) -> dict[str, Any]:
        """Mean absolute error of the OOF prediction against the best thresholds, on the
        informative images, next to that of the best constant (their median)."""
        rows = self.informative
        best, predicted = self.best[rows], self.predicted[rows]
        constant = float(np.median(best)) if rows.any() else math.nan
        return {
            "backend": self.final_model.backend,
            "n_images": len(self.best),
            "n_informative": int(rows.sum()),
            "mae": float(np.abs(predicted - best).mean()) if rows.any() else math.nan,
            "mae_constant": float(np.abs(constant - best).mean()) if rows.any() else math.nan,
            "constant": constant,
            "predicted_range": [float(self.predicted.min()), float(self.predicted.max())],
            "features": list(self.final_model.feature_names),
        }


def fit_threshold(
    features: pd.DataFrame,
    best: np.ndarray,
    informative: np.ndarray,
    folds: np.ndarray,
    backend: str = "lightgbm",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ThresholdResult:
    """Fit the per-image threshold regressor, cross-fitted on ``folds``.

    The model for fold f is fitted on the informative images of the other folds and predicts
    every image of fold f; the final model is fitted on all informative images.

    Args:
        features: one row per image (the gate's image features).
        best, informative: from :func:`best_thresholds`.
        folds: each image's first-level fold.
        backend, params, seed: see :func:`segflow.ensemble.stacking.learners.make_classifier`.

    Returns:
        The :class:`ThresholdResult`.

    Shape:
        features: (N, F); best, informative, folds: (N,).
    """
    features = check_feature_frame(features)
    n_rows = len(features)
    best = _regression_target(best, n_rows, "best thresholds")
    informative = np.asarray(informative, dtype=bool)
    folds = np.asarray(folds)
    if informative.shape != (n_rows,) or folds.shape != (n_rows,):
        raise SegflowError(f"informative and folds must have shape ({n_rows},)")
    make_regressor(backend, params, seed)  # an unknown backend fails before any training
    # No informative image at all: every model predicts the middle of the grid.
    fallback = float(np.median(best[informative])) if informative.any() else 0.5
    predicted = np.empty(n_rows, dtype=np.float64)
    for fold in np.unique(folds):
        held_out = folds == fold
        train = ~held_out & informative
        model = make_regressor(backend, params, seed)
        if train.any():
            model.fit(features[train].reset_index(drop=True), best[train])
        else:
            model.fit(features.iloc[:1].reset_index(drop=True), np.array([fallback]))
        predicted[held_out] = model.predict_proba(features[held_out].reset_index(drop=True))
    final_model = make_regressor(backend, params, seed)
    if informative.any():
        final_model.fit(features[informative].reset_index(drop=True), best[informative])
    else:
        final_model.fit(features.iloc[:1].reset_index(drop=True), np.array([fallback]))
    return ThresholdResult(
        predicted=np.clip(predicted, *THRESHOLD_LIMITS),
        best=best,
        informative=informative,
        folds=folds,
        final_model=final_model,
        importances=final_model.feature_importances().sort_values(ascending=False),
    )


def write_threshold_artifacts(
    result: ThresholdResult,
    out_dir: str | os.PathLike[str],
    ids: Sequence[str],
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``threshold_model.txt|cbm``, ``threshold_oof.csv`` (id, fold, best, informative,
    predicted), ``threshold_importances.csv`` and ``threshold_metrics.json`` (with the stage's
    :mod:`segflow.core.stage_args` block when ``provenance`` is given) atomically.

    Returns:
        Kind (``model``, ``oof``, ``importances``, ``metrics``) -> path.
    """
    oof = {"best": result.best, "informative": result.informative, "predicted": result.predicted}
    return write_image_model_artifacts("threshold", result, out_dir, ids, oof, provenance)


def load_regressor(path: str | os.PathLike[str]) -> LightGBMRegressor | CatBoostRegressor:
    """A threshold model saved by ``save``; the backend is the one whose suffix the file has
    (as :func:`segflow.ensemble.stacking.learners.load_classifier` for the classifiers)."""
    path = Path(path)
    for regressor_class in REGRESSORS.values():
        if path.suffix == regressor_class.suffix:
            return regressor_class.load(path)
    suffixes = ", ".join(f"{cls.suffix} ({name})" for name, cls in REGRESSORS.items())
    raise SegflowError(f"{path}: unknown model format; expected one of {suffixes}")
