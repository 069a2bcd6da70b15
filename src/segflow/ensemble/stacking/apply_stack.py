"""The apply-stack stage: a fitted stacked candidate on the test set.

``segflow apply-stack --candidate gate|pixel`` loads the final models that ``segflow stack``
fitted on OOF (native LightGBM ``.txt`` / CatBoost ``.cbm`` files in ``class_<k>/`` of the stack
folder; its ``summary_<stacker>.json`` names the backend and options) and applies them to the
experiments' fold-merged test predictions, the preprocessed test images and (gate) the test
manifest's ``meta_*`` metadata. It writes the candidate's test prediction and (gate) each
class's ``features_test.parquet``. A test-set change reruns this stage only, never the fit.

:func:`apply_stack_models` is the application itself, on in-memory predictions: ``segflow
predict-bundle`` runs it on its batches with the models an export bundle carries, so the
bundle's stacked submission is the pipeline's.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.layout import group_by_experiment
from segflow.artifacts.predictions import (
    Prediction,
    read_fold_predictions,
    with_gates,
    without_gates,
    write_prediction,
)
from segflow.artifacts.tables import read_table
from segflow.core.errors import SegflowError
from segflow.core.stage_args import add_experiment_dirs, stage_log
from segflow.data.blobs import DEFAULT_THRESHOLD as DEFAULT_BLOB_THRESHOLD
from segflow.ensemble.candidates import check_aligned
from segflow.ensemble.stacking.features import META_PREFIX, image_features
from segflow.ensemble.stacking.learners import (
    BACKENDS,
    StackingClassifier,
    apply_pixel_blender,
    load_classifier,
)
from segflow.ensemble.stacking.rows import (
    base_dir_for,
    class_maps,
    images_for,
    metadata_for,
    write_parquet,
)
from segflow.ensemble.stacking.stackers import (
    MODEL_PREFIX,
    STACKERS,
    candidate_name,
    model_name,
    summary_name,
)
from segflow.ensemble.stacking.threshold import (
    CatBoostRegressor,
    LightGBMRegressor,
    load_regressor,
    recalibrate,
)


@dataclass(frozen=True)
class StackModels:
    """A stacked candidate's final models, one per class."""

    stacker: str
    models: list[StackingClassifier]
    """The gate's (``gate``) or the pixel blender's (``pixel``) final model of each class."""
    thresholds: list[LightGBMRegressor | CatBoostRegressor] | None
    """The per-image threshold regressors of the gate (``threshold_target``), else None."""
    blobs: dict[str, Any] = field(default_factory=dict)
    """The gate's blob-feature arguments (``stack.blob_sigmas``, ``blob_threshold``); {} = none."""

    def meta_columns(self) -> list[str]:
        """The ``meta_*`` metadata columns the models' features include (gate only)."""
        names = [n for model in self.models for n in model.feature_names]
        return list(dict.fromkeys(n for n in names if n.startswith(META_PREFIX)))


def stack_setup(
    stack_dir: str | os.PathLike[str], stacker: str
) -> tuple[str, bool, dict[str, Any]]:
    """(backend, threshold_target, blob-feature arguments) of a fitted stacker, from its
    ``summary_<stacker>.json`` (the blob arguments are {} unless ``stack.blob_sigmas`` was set).

    Raises:
        SegflowError: the summary is missing or not one of ``segflow stack``.
    """
    path = Path(stack_dir) / summary_name(stacker)
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run stack --candidate {stacker} first)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        backend = str(summary["backend"])
        options = summary["options"]
        threshold_target = bool(options.get("threshold_target", False))
        blobs = {}
        if stacker == "gate" and options.get("blob_sigmas") is not None:
            blobs = {
                "blob_sigmas": tuple(float(s) for s in options["blob_sigmas"]),
                "blob_threshold": float(options.get("blob_threshold", DEFAULT_BLOB_THRESHOLD)),
            }
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise SegflowError(f"{path}: not a summary of segflow stack ({error})") from None
    if backend not in BACKENDS:
        raise SegflowError(f"{path}: unknown backend {backend!r}")
    return backend, threshold_target and stacker == "gate", blobs


def model_files(stacker: str, backend: str, threshold_target: bool, n_classes: int) -> list[str]:
    """The model files of a fitted stacker, relative to its stack folder, class by class:
    ``class_<k>/gate_model.txt`` (and ``threshold_model.txt``), or ``blender_model.txt``."""
    prefixes = MODEL_PREFIX[stacker]
    if stacker == "gate" and not threshold_target:
        prefixes = prefixes[:1]
    suffix = BACKENDS[backend].suffix
    return [model_name(k, prefix, suffix) for k in range(n_classes) for prefix in prefixes]


def load_stack_models(
    folder: str | os.PathLike[str],
    stacker: str,
    backend: str,
    threshold_target: bool,
    n_classes: int,
    blobs: Mapping[str, Any] | None = None,
) -> StackModels:
    """A fitted stacker's final models from ``folder`` (the stack folder, or a bundle's copy
    with the same relative paths, :func:`model_files`).

    Raises:
        SegflowError: a model file missing or unreadable.
    """
    candidate_name(stacker)
    folder = Path(folder)
    files = model_files(stacker, backend, threshold_target, n_classes)
    for name in files:
        if not (folder / name).is_file():
            raise SegflowError(f"{folder / name} does not exist (run stack first)")
    per_class = len(files) // n_classes
    models = [load_classifier(folder / files[k * per_class]) for k in range(n_classes)]
    thresholds = None
    if per_class == 2:
        thresholds = [load_regressor(folder / files[k * 2 + 1]) for k in range(n_classes)]
    return StackModels(stacker, models, thresholds, dict(blobs or {}))


def apply_stack_models(
    models: StackModels,
    names: Sequence[str],
    test: Sequence[Prediction],
    base_test: Prediction | None,
    images: np.ndarray,
    metadata: pd.DataFrame | None,
) -> tuple[Prediction, list[pd.DataFrame]]:
    """A stacked candidate's test prediction.

    Args:
        models: from :func:`load_stack_models`.
        names: the experiments the models were fitted on, in order.
        test: each experiment's fold-merged test prediction, row-aligned.
        base_test: the ensemble's test prediction (the gate gates it); None for the blender.
        images: the preprocessed test images, cropped to the maps' pixels
            (:func:`segflow.ensemble.stacking.rows.images_for`).
        metadata: the rows' ``meta_*`` columns (gate), or None.

    Returns:
        (the candidate's prediction, the gate's per-class feature tables; [] for the blender).

    Raises:
        SegflowError: predictions that are not aligned, the gate without ``base_test``, or
            features that differ from the fitted ones.
    """
    if models.stacker == "pixel":
        check_aligned(test, names, "test predictions")
        blended = np.zeros(test[0].probs.shape, np.float16)
        for k, model in enumerate(models.models):
            blended[:, k] = apply_pixel_blender(model, class_maps(names, test, k), images)
        return Prediction(without_gates(test[0].ids), blended), []
    if base_test is None:
        raise SegflowError("the stacked gate gates the ensemble: give its test prediction")
    check_aligned([*test, base_test], [*names, "ensemble"], "test predictions")
    gate = np.zeros((len(base_test.ids), len(models.models)), np.float32)
    maps = np.asarray(base_test.probs)
    if models.thresholds is not None:  # per-image thresholds rewrite them class by class
        maps = maps.copy()
    features = []
    for k, model in enumerate(models.models):
        table = image_features(class_maps(names, test, k), images, metadata, **models.blobs)
        gate[:, k] = model.predict_proba(table)
        if models.thresholds is not None:
            maps[:, k] = recalibrate(maps[:, k], models.thresholds[k].predict_proba(table))
        features.append(table)
    return Prediction(with_gates(base_test.ids, gate), maps), features


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow apply-stack``'s flags."""
    parser.add_argument(
        "--candidate",
        required=True,
        choices=STACKERS,
        help="gate: the image-level gate on the ensemble (stack_gate); pixel: the pixel-level "
        "blender (stack_pixel)",
    )
    add_experiment_dirs(parser, oof=False)
    parser.add_argument(
        "--base-test-dir", default=None, help="the ensemble's test folder (gate only, required)"
    )
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--test-manifest", required=True, help="test manifest Parquet (ingest)")
    parser.add_argument(
        "--stack-dir", required=True, help="segflow stack's folder (summary, class_<k> models)"
    )
    parser.add_argument("--out-dir", required=True, help="the candidate's test folder")


def _base_test(args: argparse.Namespace) -> Prediction | None:
    """The ensemble's test prediction for the gate; None for the blender.

    Raises:
        SegflowError: the gate without ``--base-test-dir``, or the blender given it.
    """
    base = base_dir_for(args.candidate, args.base_test_dir, "apply-stack", "--base-test-dir")
    return None if base is None else read_fold_predictions([base], "mean")


def run(args: argparse.Namespace) -> None:
    """``segflow apply-stack``: write a stacked candidate's test prediction (and the gate's
    test feature tables into the stack folder)."""
    classes, _ = read_classes(args.arrays_dir)
    backend, threshold_target, blobs = stack_setup(args.stack_dir, args.candidate)
    models = load_stack_models(
        args.stack_dir, args.candidate, backend, threshold_target, len(classes), blobs
    )
    base_test = _base_test(args)
    test = [
        read_fold_predictions(dirs, args.fold_merge)
        for dirs in group_by_experiment(args.test_dirs, len(args.names), "test folders")
    ]
    ids = test[0].ids["id"]
    metadata = None
    if args.candidate == "gate":
        metadata = metadata_for(read_table(args.test_manifest, "test manifest"), ids)
    prediction, features = apply_stack_models(
        models, args.names, test, base_test, images_for(args.arrays_dir, "test", ids), metadata
    )
    for k, table in enumerate(features):
        path = Path(args.stack_dir) / f"class_{k}" / "features_test.parquet"
        write_parquet(path, table.assign(id=ids.to_numpy()))
    write_prediction(args.out_dir, prediction.ids, prediction.probs)
    stage_log.info("apply-stack (%s, %s): %d test images", args.candidate, backend, len(ids))
