"""The second-level (stacking) layer: gradient-boosted models on first-level OOF predictions.

Two models, both per class plane and both trained only on out-of-fold information:

* the image-level **gate** (:func:`fit_gate`): from per-image features
  (:func:`segflow.ensemble.stacking.features.image_features`: OOF probability statistics, intensities,
  metadata) it predicts the probability that an image's true mask is non-empty. Its honest OOF
  prediction is exactly the ``nonempty`` input of :func:`segflow.model.postprocess.tune_postprocess`
  (with ``gates=[...]``) and :func:`segflow.model.postprocess.apply_postprocess`, which empty a mask
  whose non-empty probability is below the tuned gate.
* the pixel-level **blender** (:func:`fit_pixel_blender`): from per-pixel features of several
  experiments' OOF maps (:func:`segflow.ensemble.stacking.features.pixel_feature_names`) it predicts each
  pixel's foreground probability; :func:`apply_pixel_blender` maps whole images in chunks.

Honesty: the first-level OOF maps of an image come from a model that never saw it, but a
second-level model trained on all images and scored on the same images would still be scored
in-sample. :func:`cross_fit` therefore predicts the rows of each fold with a model fitted on the
other folds only (use the first level's folds, so duplicates grouped there stay grouped); the
final model, fitted on all rows, is only for the test set. When the OOF covers a single first-
level fold (``folds.train_folds: [0]``, a holdout), :func:`stacking_folds` splits its rows into
sub-folds by their (near-)duplicate fold group instead, so the copies of an image still share a
sub-fold.

Backends (:data:`BACKENDS`): LightGBM and CatBoost behind one interface
(:class:`StackingClassifier`); models are saved in the backend's native format (LightGBM text
``.txt``, CatBoost ``.cbm``) and :func:`load_classifier` picks the backend from the suffix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, Self

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import roc_auc_score

from segflow.core.atomic import atomic_path, write_csv, write_json, write_npy
from segflow.core.errors import SegflowError
from segflow.core.stage_args import with_provenance
from segflow.ensemble.stacking.features import (
    MASK_THRESHOLD,
    check_feature_frame,
    check_truth_plane,
    chunk_size,
    iter_pixel_features,
    sample_pixels,
    sample_weights,
    sampled_pixel_features,
)
from segflow.model.metrics import METRIC_NAMES, per_image_scores

# A constant training target is predicted as this probability (or 1 minus it): LightGBM's own
# clipping for a one-class target, so both backends give the same answer.
_CONSTANT_EPSILON = 1e-15
# Scores are computed on chunks of at most this many pixels.
_SCORE_CHUNK_PIXELS = 1 << 22


class StackingClassifier(Protocol):
    """What every backend provides: a binary classifier on a numeric feature table."""

    backend: ClassVar[str]
    suffix: ClassVar[str]
    feature_names: list[str]

    def fit(
        self, features: pd.DataFrame, target: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> Self:
        """Fit on ``features`` (rows) and the 0/1 ``target`` (optionally weighted)."""
        ...

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Probability of class 1 per row, float64 (n,)."""
        ...

    def feature_importances(self) -> pd.Series:
        """Feature name -> importance, summing to 1 (all 0 when the model has no split)."""
        ...

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model atomically in the native format; returns the path."""
        ...


def _binary_target(target: object, n_rows: int, what: str = "target") -> np.ndarray:
    """``target`` as int (n,) after checking length and 0/1 values."""
    values = np.asarray(target)
    if values.shape != (n_rows,):
        raise SegflowError(
            f"{what} must have shape ({n_rows},) to match the features, got {values.shape}"
        )
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise SegflowError(f"{what} must hold only 0/1 (or bool) values")
    return values.astype(np.int64)


class _BoostedClassifier:
    """Shared validation and constant-target handling; subclasses wrap one library."""

    backend: ClassVar[str]
    suffix: ClassVar[str]
    default_params: ClassVar[dict[str, Any]]

    def __init__(self, params: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        if params is not None and not isinstance(params, Mapping):
            raise SegflowError(f"{self.backend}: params must be a mapping, got {params!r}")
        self.seed = int(seed)
        self.params: dict[str, Any] = {**self.default_params, **dict(params or {})}
        self.feature_names: list[str] = []
        self._model: Any = None

    def fit(
        self,
        features: pd.DataFrame,
        target: np.ndarray,
        sample_weight: np.ndarray | None = None,
    ) -> Self:
        """Fit on a numeric feature table and a 0/1 target.

        A target with a single value (a fold with no positive image, say) cannot train a
        classifier; the model then predicts that value (as 1e-15 or 1 - 1e-15) for every row.

        Args:
            features: one row per sample, numeric or bool columns, NaN allowed.
            target: the label of each row, 0/1 or bool.
            sample_weight: a positive weight per row (None: all 1).

        Returns:
            self, fitted.

        Shape:
            features: (n, F); target, sample_weight: (n,).

        Raises:
            SegflowError: a non-numeric column, bad name, or a target of another length or
                with values other than 0/1.
        """
        features = check_feature_frame(features)
        target = self._check_target(target, len(features))
        self.feature_names = list(features.columns)
        matrix = features.to_numpy(dtype=np.float64)
        weight = None
        if sample_weight is not None:
            weight = np.asarray(sample_weight, dtype=np.float64)
            if (
                weight.shape != (len(target),)
                or not np.all(np.isfinite(weight))
                or (weight <= 0).any()
            ):
                raise SegflowError(
                    f"{self.backend}: sample_weight must be {len(target)} positive finite values"
                )
        if target.min() == target.max():
            self._model = self._fit_constant(matrix, float(target[0]))
        else:
            self._model = self._fit_matrix(matrix, target, weight)
        return self

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Probability of class 1 for each row.

        Args:
            features: the columns the model was fitted on (any order; extra or missing columns
                are an error, so a feature set mix-up cannot pass silently).

        Returns:
            float64 (n,).

        Raises:
            SegflowError: not fitted, or the columns differ from the fitted ones.
        """
        if self._model is None:
            raise SegflowError(f"{self.backend}: the model is not fitted")
        features = check_feature_frame(features)
        missing = [name for name in self.feature_names if name not in features.columns]
        extra = [name for name in features.columns if name not in self.feature_names]
        if missing or extra:
            raise SegflowError(
                f"{self.backend}: features differ from the fitted ones; missing {missing}, "
                f"unexpected {extra}"
            )
        matrix = features[self.feature_names].to_numpy(dtype=np.float64)
        return np.asarray(self._predict_matrix(matrix), dtype=np.float64).reshape(len(matrix))

    def feature_importances(self) -> pd.Series:
        """Feature name -> importance, normalised to sum 1 (all 0 for a constant model).

        LightGBM: total split gain; CatBoost: PredictionValuesChange.
        """
        if self._model is None:
            raise SegflowError(f"{self.backend}: the model is not fitted")
        raw = np.asarray(self._raw_importances(), dtype=np.float64)
        total = raw.sum()
        normalised = raw / total if total > 0 else np.zeros_like(raw)
        return pd.Series(normalised, index=self.feature_names, name="importance")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model atomically in the backend's native format.

        Args:
            path: the target file; its suffix must be the backend's (``.txt`` for LightGBM,
                ``.cbm`` for CatBoost) so :func:`load_classifier` can find the backend.

        Returns:
            ``path`` as a Path.
        """
        path = Path(path)
        if self._model is None:
            raise SegflowError(f"{self.backend}: the model is not fitted")
        if path.suffix != self.suffix:
            raise SegflowError(f"{path}: a {self.backend} model is saved as *{self.suffix}")
        with atomic_path(path) as tmp:
            self._save_native(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """A fitted model from a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise SegflowError(f"{path}: no such {cls.backend} model file")
        model = cls()
        model._model, model.feature_names = cls._load_native(path)
        return model

    def _check_target(self, target: object, n_rows: int) -> np.ndarray:
        return _binary_target(target, n_rows)

    # Backend-specific parts.
    def _fit_matrix(self, matrix: np.ndarray, target: np.ndarray) -> Any:
        raise NotImplementedError

    def _fit_constant(self, matrix: np.ndarray, value: float) -> Any:
        raise NotImplementedError

    def _predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _raw_importances(self) -> np.ndarray:
        raise NotImplementedError

    def _save_native(self, path: Path) -> None:
        raise NotImplementedError

    @classmethod
    def _load_native(cls, path: Path) -> tuple[Any, list[str]]:
        raise NotImplementedError


# LightGBM names the number of trees in many ways; any of them overrides the default.
_LIGHTGBM_ROUND_ALIASES = (
    "num_iterations",
    "num_iteration",
    "n_iter",
    "num_tree",
    "num_trees",
    "num_round",
    "num_rounds",
    "nrounds",
    "num_boost_round",
    "n_estimators",
    "max_iter",
)


class LightGBMClassifier(_BoostedClassifier):
    """LightGBM binary classifier (``lightgbm.train`` on a float64 matrix)."""

    backend: ClassVar[str] = "lightgbm"
    suffix: ClassVar[str] = ".txt"
    objective: ClassVar[str] = "binary"
    default_params: ClassVar[dict[str, Any]] = {
        "num_iterations": 200,
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": 20,
        "num_threads": 2,
        # Deterministic results for a given seed and thread count.
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
    }

    def _train_params(self) -> tuple[dict[str, Any], int]:
        params = dict(self.params)
        rounds = [params.pop(alias) for alias in _LIGHTGBM_ROUND_ALIASES if alias in params]
        if len(rounds) != 1:
            raise SegflowError("lightgbm: give the number of trees once (num_iterations)")
        params.update(objective=self.objective, seed=self.seed)
        return params, int(rounds[-1])

    def _fit_matrix(
        self, matrix: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None
    ) -> Any:
        import lightgbm

        params, rounds = self._train_params()
        dataset = lightgbm.Dataset(
            matrix,
            label=target,
            weight=weight,
            feature_name=self.feature_names,
            params={"verbosity": -1},
        )
        return lightgbm.train(params, dataset, num_boost_round=rounds)

    def _fit_constant(self, matrix: np.ndarray, value: float) -> Any:
        # LightGBM accepts a one-class target: it starts from the clipped average (1e-15 or
        # 1 - 1e-15) and finds no split, which is the constant model in the native format.
        return self._fit_matrix(matrix, np.full(len(matrix), int(value)))

    def _predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        return self._model.predict(matrix)

    def _raw_importances(self) -> np.ndarray:
        return self._model.feature_importance(importance_type="gain")

    def _save_native(self, path: Path) -> None:
        self._model.save_model(str(path))

    @classmethod
    def _load_native(cls, path: Path) -> tuple[Any, list[str]]:
        import lightgbm

        booster = lightgbm.Booster(model_file=str(path))
        return booster, list(booster.feature_name())


class CatBoostClassifier(_BoostedClassifier):
    """CatBoost binary classifier (Logloss, symmetric trees)."""

    backend: ClassVar[str] = "catboost"
    suffix: ClassVar[str] = ".cbm"
    default_params: ClassVar[dict[str, Any]] = {
        "iterations": 200,
        "learning_rate": 0.05,
        "depth": 4,
        "thread_count": 2,
        "verbose": False,
        # CatBoost otherwise writes a catboost_info/ folder into the working directory.
        "allow_writing_files": False,
    }

    loss_function: ClassVar[str] = "Logloss"

    @staticmethod
    def _model_class() -> type:
        from catboost import CatBoostClassifier as CatBoostModel

        return CatBoostModel

    def _new_model(self, **overrides: Any) -> Any:
        params = {**self.params, "loss_function": self.loss_function, "random_seed": self.seed}
        return self._model_class()(**{**params, **overrides})

    def _fit_matrix(
        self, matrix: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None
    ) -> Any:
        from catboost import CatBoostError, Pool

        model = self._new_model()
        try:
            model.fit(Pool(matrix, label=target, weight=weight, feature_names=self.feature_names))
        except CatBoostError as error:
            raise SegflowError(f"catboost: training failed: {error}") from error
        return model

    def _fit_constant(self, matrix: np.ndarray, value: float) -> Any:
        from catboost import Pool

        # CatBoost refuses a one-class target. Fit one tree on two synthetic rows (any split
        # will do), then zero its weight (scale 0) and set the bias to the target's logit: a
        # native model that predicts the constant everywhere, like LightGBM's.
        synthetic = np.tile(np.array([[0.0], [1.0]]), (1, len(self.feature_names)))
        model = self._new_model(iterations=1)
        model.fit(Pool(synthetic, label=[0, 1], feature_names=self.feature_names))
        model.set_scale_and_bias(0.0, self._constant_bias(value))
        return model

    def _constant_bias(self, value: float) -> float:
        """The raw prediction (a logit here) that a constant model outputs for ``value``."""
        probability = min(max(value, _CONSTANT_EPSILON), 1.0 - _CONSTANT_EPSILON)
        return math.log(probability / (1.0 - probability))

    def _predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        from catboost import Pool

        return self._model.predict_proba(Pool(matrix, feature_names=self.feature_names))[:, 1]

    def _raw_importances(self) -> np.ndarray:
        scale, _ = self._model.get_scale_and_bias()
        if scale == 0:  # the constant model: its one synthetic split carries no weight
            return np.zeros(len(self.feature_names))
        return self._model.get_feature_importance()

    def _save_native(self, path: Path) -> None:
        self._model.save_model(str(path), format="cbm")

    @classmethod
    def _load_native(cls, path: Path) -> tuple[Any, list[str]]:
        model = cls._model_class()()
        model.load_model(str(path), format="cbm")
        return model, list(model.feature_names_)


BACKENDS: dict[str, type[_BoostedClassifier]] = {
    "lightgbm": LightGBMClassifier,
    "catboost": CatBoostClassifier,
}


def make_classifier(
    backend: str, params: Mapping[str, Any] | None = None, seed: int = 0
) -> StackingClassifier:
    """An unfitted classifier of ``backend`` with the small, fast defaults overridden by ``params``.

    Defaults: 200 trees, learning rate 0.05, LightGBM 15 leaves (min 20 rows per leaf) /
    CatBoost depth 4, 2 threads, silent. Results are deterministic for a given seed (and thread
    count).

    Args:
        backend: a name in :data:`BACKENDS`.
        params: the library's own parameter names (LightGBM ``lightgbm.train`` params,
            CatBoost constructor arguments).
        seed: the model's random seed.

    Raises:
        KeyError: unknown backend (the message lists the valid names).
    """
    if backend not in BACKENDS:
        raise KeyError(f"stacking: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return BACKENDS[backend](params, seed)


def load_classifier(path: str | os.PathLike[str]) -> StackingClassifier:
    """A model saved by ``save``; the backend is the one whose suffix the file has."""
    path = Path(path)
    for backend_class in BACKENDS.values():
        if path.suffix == backend_class.suffix:
            return backend_class.load(path)
    suffixes = ", ".join(f"{cls.suffix} ({name})" for name, cls in BACKENDS.items())
    raise SegflowError(f"{path}: unknown model format; expected one of {suffixes}")


def _check_folds(folds: object, n_rows: int) -> np.ndarray:
    values = np.asarray(folds)
    if values.shape != (n_rows,):
        raise SegflowError(
            f"folds must have shape ({n_rows},) to match the rows, got {values.shape}"
        )
    if not np.issubdtype(values.dtype, np.integer):
        raise SegflowError(f"folds must be integers, got dtype {values.dtype}")
    if len(np.unique(values)) < 2:
        raise SegflowError("folds: cross-fitting needs at least two distinct folds")
    return values


def stacking_folds(
    folds: np.ndarray, groups: np.ndarray, n_sub_folds: int, seed: int = 0
) -> np.ndarray:
    """The folds the second level cross-fits on: the first level's, or sub-folds of one.

    With at least two distinct first-level folds among the rows they are returned as given.
    With one (the OOF of a single trained fold: ``folds.train_folds: [k]``) the rows are split
    into ``min(n_sub_folds, groups)`` sub-folds (at least 2), a whole group at a time, so the
    (near-)duplicates that ``folds.csv``'s ``group`` column keeps together stay together:
    the groups are shuffled with ``seed``, ordered by size (largest first, the shuffle breaking
    ties) and each given to the sub-fold with the fewest rows so far (ties: the lowest index).
    The same rows, groups and seed give the same sub-folds.

    Args:
        folds: each row's first-level fold.
        groups: each row's fold group (``folds.csv``'s ``group``).
        n_sub_folds: sub-folds to make when there is a single fold (use ``folds.n_folds``).
        seed: the shuffle's seed (``stack.seed``).

    Returns:
        The fold of each row, int64 (n,): the first-level folds, or sub-folds 0 .. k-1.

    Raises:
        SegflowError: mismatched lengths, no row, or fewer than two groups to split one fold.

    Shape:
        folds, groups: (n,).
    """
    folds = np.asarray(folds)
    groups = np.asarray(groups)
    if folds.shape != groups.shape or folds.ndim != 1:
        raise SegflowError(
            f"folds {folds.shape} and groups {groups.shape} must be (n,) of the same length"
        )
    if len(folds) == 0:
        raise SegflowError("stacking: no OOF row to cross-fit on")
    if len(np.unique(folds)) >= 2:
        return folds.astype(np.int64)
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    k = min(max(2, int(n_sub_folds)), len(names))
    if k < 2:
        raise SegflowError(
            f"stacking: the OOF covers fold {folds[0]} only and its {len(folds)} rows form "
            "a single duplicate group: nothing to cross-fit on (train more folds: "
            "folds.train_folds, or set stack.enabled: false)"
        )
    shuffled = np.random.default_rng(seed).permutation(len(names))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    group_fold = np.empty(len(names), dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for group in order:
        target = int(np.argmin(load))
        group_fold[group] = target
        load[target] += sizes[group]
    return group_fold[inverse]


class CrossFit(NamedTuple):
    """The result of :func:`cross_fit` (unpacks as ``oof, final_model, fold_models``)."""

    oof: np.ndarray
    """Each row's prediction by the model of its own fold, float64 (n,)."""
    final_model: StackingClassifier
    """Fitted on every row; for new data (the test set)."""
    fold_models: dict[int, StackingClassifier]
    """fold -> the model fitted on the other folds' rows, which predicted this fold."""


def cross_fit(
    features: pd.DataFrame,
    target: np.ndarray,
    folds: np.ndarray,
    backend: str = "lightgbm",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> CrossFit:
    """Honest second-level out-of-fold predictions, and the final model.

    For each fold f, a model fitted on the rows with fold != f predicts the rows with fold == f,
    so no row's prediction comes from a model that saw it. Every model uses the same seed.

    Args:
        features: one row per sample (numeric columns, NaN allowed).
        target: 0/1 per row.
        folds: the fold of each row (at least two distinct values).
        backend, params, seed: see :func:`make_classifier`.

    Returns:
        ``CrossFit(oof, final_model, fold_models)``.

    Shape:
        features: (n, F); target, folds, oof: (n,).
    """
    features = check_feature_frame(features)
    target = _binary_target(target, len(features))
    folds = _check_folds(folds, len(features))
    make_classifier(backend, params, seed)  # an unknown backend fails before any training
    oof = np.empty(len(features), dtype=np.float64)
    fold_models: dict[int, StackingClassifier] = {}
    for fold in np.unique(folds):
        held_out = folds == fold
        model = make_classifier(backend, params, seed)
        model.fit(features[~held_out].reset_index(drop=True), target[~held_out])
        oof[held_out] = model.predict_proba(features[held_out].reset_index(drop=True))
        fold_models[int(fold)] = model
    final_model = make_classifier(backend, params, seed).fit(features, target)
    return CrossFit(oof, final_model, fold_models)


def _auc(target: np.ndarray, prediction: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present (it is undefined there)."""
    if target.min() == target.max():
        return float("nan")
    return float(roc_auc_score(target, prediction))


def _log_loss(target: np.ndarray, prediction: np.ndarray) -> float:
    clipped = np.clip(prediction, _CONSTANT_EPSILON, 1.0 - _CONSTANT_EPSILON)
    return float(sklearn_log_loss(target, clipped, labels=[0, 1]))


@dataclass(frozen=True)
class GateResult:
    """The image-level gate of one class (see :func:`fit_gate`)."""

    nonempty_prob: np.ndarray
    """Honest OOF probability that each image's mask is non-empty, float64 (N,); the
    ``nonempty`` input of :func:`segflow.model.postprocess.tune_postprocess`."""
    truth_nonempty: np.ndarray
    """Whether each image's true mask is non-empty, bool (N,)."""
    folds: np.ndarray
    """Each image's fold, as given."""
    final_model: StackingClassifier
    """Fitted on every image; apply it to the test set's features."""
    fold_models: dict[int, StackingClassifier]
    """fold -> the model that predicted that fold's images."""
    importances: pd.Series
    """The final model's feature importances (sum 1), largest first."""
    auc: float
    """OOF ROC AUC (NaN when every image is empty, or none is)."""
    log_loss: float
    """OOF log-loss."""

    def metrics(self) -> dict[str, Any]:
        """A JSON-able summary: backend, sizes, OOF AUC and log-loss overall and per fold."""
        per_fold = {}
        for fold in np.unique(self.folds):
            rows = self.folds == fold
            target = self.truth_nonempty[rows].astype(np.int64)
            per_fold[str(int(fold))] = {
                "n_images": int(rows.sum()),
                "auc": _auc(target, self.nonempty_prob[rows]),
                "log_loss": _log_loss(target, self.nonempty_prob[rows]),
            }
        return {
            "backend": self.final_model.backend,
            "n_images": len(self.nonempty_prob),
            "n_nonempty": int(self.truth_nonempty.sum()),
            "auc": self.auc,
            "log_loss": self.log_loss,
            "features": list(self.final_model.feature_names),
            "folds": per_fold,
        }


def nonempty_images(truth_plane: np.ndarray) -> np.ndarray:
    """Whether each image of one class's true masks has a foreground pixel; bool (N,).

    Shape:
        truth_plane: (N, H, W) bool or 0/1 (``truths.class_truths(packed, k)``).
    """
    truth_plane = check_truth_plane(truth_plane)
    return np.array([np.asarray(plane).any() for plane in truth_plane], dtype=bool)


def fit_gate(
    features: pd.DataFrame,
    truth_nonempty: np.ndarray,
    folds: np.ndarray,
    backend: str = "lightgbm",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> GateResult:
    """Fit the image-level gate: P(true mask non-empty | image features), cross-fitted.

    Feed ``result.nonempty_prob`` to ``postprocess.tune_postprocess(..., nonempty=...,
    gates=[...])`` and, on the test set, ``result.final_model.predict_proba(test_features)`` to
    ``postprocess.apply_postprocess(..., nonempty=...)``.

    Args:
        features: one row per image, e.g. :func:`segflow.ensemble.stacking.features.image_features`.
        truth_nonempty: whether each image's true mask (this class) is non-empty
            (:func:`nonempty_images` of the class plane).
        folds: each image's fold (use the first level's folds).
        backend, params, seed: see :func:`make_classifier`.

    Returns:
        The :class:`GateResult`.

    Shape:
        features: (N, F); truth_nonempty, folds: (N,).
    """
    features = check_feature_frame(features)
    target = _binary_target(truth_nonempty, len(features), "truth_nonempty")
    fitted = cross_fit(features, target, folds, backend, params, seed)
    return GateResult(
        nonempty_prob=fitted.oof,
        truth_nonempty=target.astype(bool),
        folds=np.asarray(folds),
        final_model=fitted.final_model,
        fold_models=fitted.fold_models,
        importances=fitted.final_model.feature_importances().sort_values(ascending=False),
        auc=_auc(target, fitted.oof),
        log_loss=_log_loss(target, fitted.oof),
    )


@dataclass(frozen=True)
class PixelBlenderResult:
    """The pixel-level blender of one class (see :func:`fit_pixel_blender`)."""

    oof_probs: np.ndarray
    """Fold-honest blended probability maps, float16 (N, H, W)."""
    final_model: StackingClassifier
    fold_models: dict[int, StackingClassifier]
    importances: pd.Series
    """The final model's feature importances (sum 1), largest first."""
    n_samples: int
    """Pixels the final model was trained on."""
    scores: pd.DataFrame
    """Mean per-image dice, iou and kaggle at threshold 0.5; rows ``blend`` and each input
    experiment, so the blend can be compared with what it blends."""

    def metrics(self) -> dict[str, Any]:
        """A JSON-able summary: backend, features, sample size, scores."""
        return {
            "backend": self.final_model.backend,
            "features": list(self.final_model.feature_names),
            "n_samples": self.n_samples,
            "threshold": MASK_THRESHOLD,
            "scores": {name: row.to_dict() for name, row in self.scores.iterrows()},
        }


def apply_pixel_blender(
    model: StackingClassifier,
    prob_maps: Mapping[str, np.ndarray],
    images: np.ndarray | None = None,
    rows: np.ndarray | Sequence[int] | None = None,
    chunk_images: int | None = None,
) -> np.ndarray:
    """Blend whole probability maps with a fitted pixel blender, a chunk of images at a time.

    Args:
        model: from :func:`fit_pixel_blender` (or :func:`load_classifier`).
        prob_maps: experiment name -> this class's probabilities, the same experiments (and
            ``images`` or not) as at training.
        images: the preprocessed images (any size), if the blender was trained with them.
        rows: the images to blend (default all), in the order given.
        chunk_images: images per chunk (None: a 4 Mi-value feature budget); the result does not
            depend on it.

    Returns:
        The blended probabilities, float16.

    Shape:
        prob_maps values: (N, H, W); output: (len(rows), H, W).
    """
    first = next(iter(prob_maps.values()), None)
    if first is None or getattr(first, "ndim", 0) != 3:
        raise SegflowError("prob_maps must map at least one experiment name to (N, H, W) maps")
    n_rows = first.shape[0] if rows is None else len(rows)
    out = np.empty((n_rows, *first.shape[1:]), dtype=np.float16)
    done = 0
    for chunk_rows, chunk_features in iter_pixel_features(prob_maps, images, rows, chunk_images):
        blended = model.predict_proba(chunk_features).reshape(len(chunk_rows), *first.shape[1:])
        out[done : done + len(chunk_rows)] = blended
        done += len(chunk_rows)
    return out


def _mean_scores(prob_plane: np.ndarray, truth_plane: np.ndarray) -> dict[str, float]:
    """Mean per-image dice, iou, kaggle of ``prob > 0.5``, in chunks of images."""
    n_images, height, width = prob_plane.shape
    sums = dict.fromkeys(METRIC_NAMES, 0.0)
    step = chunk_size(None, height * width, _SCORE_CHUNK_PIXELS)
    for start in range(0, n_images, step):
        pred = np.asarray(prob_plane[start : start + step], dtype=np.float32) > MASK_THRESHOLD
        truth = np.asarray(truth_plane[start : start + step]) != 0
        for name, values in per_image_scores(pred, truth).items():
            sums[name] += float(values.sum())
    return {name: total / n_images for name, total in sums.items()}


def fit_pixel_blender(
    prob_maps: Mapping[str, np.ndarray],
    truth_plane: np.ndarray,
    folds: np.ndarray,
    images: np.ndarray | None = None,
    backend: str = "lightgbm",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    pixels_per_image: int = 256,
    chunk_images: int | None = None,
) -> PixelBlenderResult:
    """Fit the pixel-level blender of several experiments' OOF maps, fold-honestly.

    Pixels are sampled per image (:func:`segflow.ensemble.stacking.features.sample_pixels`, stratified).
    The maps of fold f's images are predicted by a model trained on pixels sampled from the
    other folds' images only; the final model is trained on the samples of every image.

    Args:
        prob_maps: experiment name -> this class's OOF probabilities, row-aligned.
        truth_plane: this class's true masks, bool or 0/1.
        folds: each image's fold (use the first level's folds).
        images: the preprocessed images (any size), or None for no intensity feature.
        backend, params, seed: see :func:`make_classifier`; ``seed`` also seeds the sample.
        pixels_per_image: sampled pixels per image (half positives where available).
        chunk_images: images per chunk when predicting; None: automatic.

    Returns:
        The :class:`PixelBlenderResult`.

    Shape:
        prob_maps values, truth_plane: (N, H, W); folds: (N,); images: (N, h, w, C).
    """
    first = next(iter(prob_maps.values()), None) if isinstance(prob_maps, Mapping) else None
    truth_plane = check_truth_plane(truth_plane)
    if first is None or getattr(first, "shape", None) != truth_plane.shape:
        got = getattr(first, "shape", None)
        raise SegflowError(f"truth_plane has shape {truth_plane.shape}, the prob maps {got}")
    folds = _check_folds(folds, len(truth_plane))
    make_classifier(backend, params, seed)  # an unknown backend fails before any work
    rows, ys, xs = sample_pixels(truth_plane, pixels_per_image, seed)
    features = sampled_pixel_features(prob_maps, images, rows, ys, xs, chunk_images)
    target = np.asarray(truth_plane[rows, ys, xs]).astype(np.int64)
    sample_folds = folds[rows]
    # The sample over-represents positives (and small images' pixels); inverse-probability
    # weights make it stand for every pixel, so the blend's probabilities keep the base rate.
    weights = sample_weights(truth_plane, rows, ys, xs)
    oof_probs = np.empty(truth_plane.shape, dtype=np.float16)
    fold_models: dict[int, StackingClassifier] = {}
    for fold in np.unique(folds):
        trained_on = sample_folds != fold
        if not trained_on.any():
            raise SegflowError(f"fold {fold}: no pixels sampled outside it to train on")
        model = make_classifier(backend, params, seed)
        model.fit(
            features[trained_on].reset_index(drop=True), target[trained_on], weights[trained_on]
        )
        fold_rows = np.flatnonzero(folds == fold)
        oof_probs[fold_rows] = apply_pixel_blender(
            model, prob_maps, images, fold_rows, chunk_images
        )
        fold_models[int(fold)] = model
    final_model = make_classifier(backend, params, seed).fit(features, target, weights)
    scores = {"blend": _mean_scores(oof_probs, truth_plane)}
    for name, maps in prob_maps.items():
        scores[name] = _mean_scores(maps, truth_plane)
    return PixelBlenderResult(
        oof_probs=oof_probs,
        final_model=final_model,
        fold_models=fold_models,
        importances=final_model.feature_importances().sort_values(ascending=False),
        n_samples=len(target),
        scores=pd.DataFrame.from_dict(scores, orient="index")[list(METRIC_NAMES)],
    )


def importance_frame(importances: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"feature": importances.index, "importance": importances.to_numpy()})


def write_gate_artifacts(
    result: GateResult,
    out_dir: str | os.PathLike[str],
    ids: Sequence[str],
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a gate's artifacts atomically into ``out_dir``.

    Files: ``gate_model.txt|cbm`` (the final model, native format), ``gate_oof.csv`` (id, fold,
    nonempty_prob, truth_nonempty), ``gate_importances.csv`` (feature, importance),
    ``gate_metrics.json`` (:meth:`GateResult.metrics`).

    Args:
        result: from :func:`fit_gate`.
        out_dir: the folder (created if missing).
        ids: the image ids, row-aligned with the features the gate was fitted on.
        provenance: the stage's :mod:`segflow.core.stage_args` block, added to the metrics JSON.

    Returns:
        Kind (``model``, ``oof``, ``importances``, ``metrics``) -> path.
    """
    oof = {
        "nonempty_prob": result.nonempty_prob,
        "truth_nonempty": result.truth_nonempty,
    }
    return write_image_model_artifacts("gate", result, out_dir, ids, oof, provenance)


def write_image_model_artifacts(
    prefix: str,
    result: Any,
    out_dir: str | os.PathLike[str],
    ids: Sequence[str],
    oof_columns: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """The artifacts of an image-level second-level model (the gate, the threshold regressor).

    Files: ``<prefix>_model.txt|cbm`` (``result.final_model``, native format),
    ``<prefix>_oof.csv`` (id, fold, then ``oof_columns``), ``<prefix>_importances.csv`` and
    ``<prefix>_metrics.json`` (``result.metrics()``), each written atomically.

    Args:
        prefix: file name prefix.
        result: a fitted result with ``final_model``, ``folds``, ``importances``, ``metrics()``.
        out_dir: the folder (created if missing).
        ids: the image ids, row-aligned with ``result.folds``.
        oof_columns: the per-image OOF columns after id and fold.
        provenance: the stage's :mod:`segflow.core.stage_args` block, added to the metrics JSON.

    Returns:
        Kind (``model``, ``oof``, ``importances``, ``metrics``) -> path.
    """
    out_dir = Path(out_dir)
    if len(ids) != len(result.folds):
        raise SegflowError(
            f"{len(ids)} ids for a {prefix} model fitted on {len(result.folds)} images"
        )
    paths = {
        "model": out_dir / f"{prefix}_model{result.final_model.suffix}",
        "oof": out_dir / f"{prefix}_oof.csv",
        "importances": out_dir / f"{prefix}_importances.csv",
        "metrics": out_dir / f"{prefix}_metrics.json",
    }
    result.final_model.save(paths["model"])
    oof = pd.DataFrame({"id": list(ids), "fold": result.folds, **oof_columns})
    write_csv(paths["oof"], oof)
    write_csv(paths["importances"], importance_frame(result.importances))
    write_json(paths["metrics"], _metrics_json(result.metrics(), provenance))
    return paths


def write_blender_artifacts(
    result: PixelBlenderResult,
    out_dir: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a pixel blender's artifacts atomically into ``out_dir``.

    Files: ``blender_model.txt|cbm`` (the final model, native format),
    ``blender_oof_probs.npy`` (float16 (N, H, W), row-aligned like the input maps),
    ``blender_importances.csv``, ``blender_metrics.json`` (:meth:`PixelBlenderResult.metrics`,
    with the stage's :mod:`segflow.core.stage_args` block when ``provenance`` is given).

    Returns:
        Kind (``model``, ``oof_probs``, ``importances``, ``metrics``) -> path.
    """
    out_dir = Path(out_dir)
    paths = {
        "model": out_dir / f"blender_model{result.final_model.suffix}",
        "oof_probs": out_dir / "blender_oof_probs.npy",
        "importances": out_dir / "blender_importances.csv",
        "metrics": out_dir / "blender_metrics.json",
    }
    result.final_model.save(paths["model"])
    write_npy(paths["oof_probs"], result.oof_probs)
    write_csv(paths["importances"], importance_frame(result.importances))
    write_json(paths["metrics"], _metrics_json(result.metrics(), provenance))
    return paths


def _metrics_json(
    metrics: Mapping[str, Any], provenance: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A second-level model's metrics as strict JSON, with the provenance block if given."""
    metrics = finite_or_none(dict(metrics))
    return metrics if provenance is None else with_provenance(metrics, provenance)


def finite_or_none(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    return value
