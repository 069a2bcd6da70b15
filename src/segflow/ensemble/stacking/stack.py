"""The stacking stage on files: image-level gate and pixel-level blender, per class.

Features come from every experiment's OOF probability maps (and the fold-merged test maps for
the test set), the preprocessed images and the manifest's ``meta_*`` metadata. Both models are
cross-fitted on the first level's folds (:mod:`segflow.ensemble.stacking.learners`), so their OOF is honest; the
final models, fitted on all OOF, are applied to the test features. Two candidates come out:

* ``stack_gate``: the ensemble's probabilities with the gate's non-empty probability (tuned as
  ``postprocess.gates`` like an aux head's); with ``stack.threshold_target`` the probabilities
  are recalibrated to each image's predicted best threshold (:mod:`segflow.ensemble.stacking.threshold`);
* ``stack_pixel``: the blender's probabilities.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts import layout
from segflow.artifacts.arrays import images_file, read_classes, read_index
from segflow.artifacts.layout import group_by_experiment
from segflow.artifacts.predictions import (
    Prediction,
    read_fold_predictions,
    read_oof,
    with_gates,
    without_gates,
)
from segflow.artifacts.resolution import image_to_original, index_offsets
from segflow.artifacts.tables import read_folds, read_table
from segflow.artifacts.truths import class_truths, original_truths
from segflow.core.atomic import write_json
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace, option
from segflow.core.provenance import PROVENANCE_KEY, stage_provenance, with_provenance
from segflow.core.stage_args import add_experiment_dirs, add_stage_tables, check_names, stage_log
from segflow.ensemble.candidates import check_aligned, json_ready, write_candidate
from segflow.ensemble.stacking.features import image_features
from segflow.ensemble.stacking.learners import (
    BACKENDS,
    apply_pixel_blender,
    fit_gate,
    fit_pixel_blender,
    nonempty_images,
    write_blender_artifacts,
    write_gate_artifacts,
)
from segflow.ensemble.stacking.threshold import (
    ThresholdResult,
    best_thresholds,
    fit_threshold,
    recalibrate,
    write_threshold_artifacts,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackOptions:
    """Second-level models (config section ``stack``)."""

    backend: str = option("lightgbm", "gradient-boosting library", tuple(BACKENDS))
    pixels_per_image: int = option(
        64, "pixels sampled per training image for the pixel blender (half positive)"
    )
    seed: int = option(0, "seed of sampling and boosting")
    threshold_target: bool = option(
        False,
        "also fit each image's best threshold (regression on the gate's features) and apply it "
        "in the stack_gate candidate",
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise KeyError(f"unknown stack.backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if isinstance(self.pixels_per_image, bool) or not isinstance(self.pixels_per_image, int):
            raise SegflowError(
                f"stack.pixels_per_image must be an integer, got {self.pixels_per_image!r}"
            )
        if self.pixels_per_image < 2:
            raise SegflowError(f"stack.pixels_per_image must be >= 2, got {self.pixels_per_image}")
        if not isinstance(self.threshold_target, bool):
            raise SegflowError(
                f"stack.threshold_target must be true or false, got {self.threshold_target!r}"
            )


@dataclass(frozen=True)
class StackInputs:
    """Everything the stage reads, already loaded and row-aligned."""

    names: Sequence[str]
    oof: Sequence[Prediction]  # per experiment, OOF (sorted ids)
    test: Sequence[Prediction]  # per experiment, fold-merged test
    base_oof: Prediction  # the ensemble's (what the gate gates)
    base_test: Prediction
    truths: np.ndarray  # packed (N, H, W)
    folds: pd.DataFrame  # id, fold
    classes: Sequence[str]
    train_images: np.ndarray  # preprocessed rows of the OOF ids (N, h, w, C)
    test_images: np.ndarray  # preprocessed rows of the test ids
    train_metadata: pd.DataFrame  # meta_* columns of the OOF ids
    test_metadata: pd.DataFrame


def _images_for(arrays_dir: Path, split: str, ids: pd.Series) -> np.ndarray:
    """The preprocessed images of ``ids``; reflect-padded ones (``resize_mode: pad``) cropped
    back to their original pixels, which is where the probability maps are."""
    index = read_index(arrays_dir, split=split)
    selected = index.set_index("id").loc[ids].reset_index()
    rows = selected["row"].to_numpy()
    images = np.asarray(np.load(arrays_dir / images_file(split), mmap_mode="r")[rows])
    offsets = index_offsets(selected)
    if all(offset is None for offset in offsets):
        return images
    sizes = zip(selected["orig_height"], selected["orig_width"], strict=True)
    return np.stack(
        [
            image_to_original(image, size, offset)
            for image, size, offset in zip(images, sizes, offsets, strict=True)
        ]
    )


def _metadata_for(manifest: pd.DataFrame, ids: pd.Series) -> pd.DataFrame:
    meta = [c for c in manifest.columns if c.startswith("meta_")]
    frame = manifest.set_index("id").loc[ids, meta].reset_index(drop=True)
    return frame.apply(pd.to_numeric, errors="coerce")


def load_stack_inputs(
    names: Sequence[str],
    oof: Sequence[Prediction],
    test: Sequence[Prediction],
    base_oof: Prediction,
    base_test: Prediction,
    truths: np.ndarray,
    folds: pd.DataFrame,
    classes: Sequence[str],
    arrays_dir: str | os.PathLike[str],
    manifest: pd.DataFrame,
    test_manifest: pd.DataFrame | None = None,
) -> StackInputs:
    """Check alignment and read the images and metadata the features need (the test items'
    metadata from ``test_manifest``, the test side's manifest; None: ``manifest`` holds both)."""
    check_aligned([*oof, base_oof], [*names, "ensemble"], "OOF predictions")
    check_aligned([*test, base_test], [*names, "ensemble"], "test predictions")
    arrays_dir = Path(arrays_dir)
    oof_ids, test_ids = base_oof.ids["id"], base_test.ids["id"]
    return StackInputs(
        names=list(names),
        oof=oof,
        test=test,
        base_oof=base_oof,
        base_test=base_test,
        truths=truths,
        folds=folds,
        classes=list(classes),
        train_images=_images_for(arrays_dir, "train", oof_ids),
        test_images=_images_for(arrays_dir, "test", test_ids),
        train_metadata=_metadata_for(manifest, oof_ids),
        test_metadata=_metadata_for(manifest if test_manifest is None else test_manifest, test_ids),
    )


@dataclass
class _StackOutputs:
    """What the per-class fits fill in, class ``k`` in column ``k``."""

    gate_oof: np.ndarray  # (N, K) gate probabilities
    gate_test: np.ndarray  # (M, K)
    blend_oof: np.ndarray  # (N, K, H, W) pixel blender
    blend_test: np.ndarray
    gate_maps_oof: np.ndarray  # the gate candidate's maps: the ensemble's, or recalibrated
    gate_maps_test: np.ndarray

    @classmethod
    def empty(cls, inputs: StackInputs, recalibrated: bool) -> _StackOutputs:
        n_classes = len(inputs.classes)
        maps_oof = np.asarray(inputs.base_oof.probs)
        maps_test = np.asarray(inputs.base_test.probs)
        if recalibrated:  # per-image thresholds rewrite them class by class
            maps_oof, maps_test = maps_oof.copy(), maps_test.copy()
        return cls(
            gate_oof=np.zeros((len(inputs.base_oof.ids), n_classes), np.float32),
            gate_test=np.zeros((len(inputs.base_test.ids), n_classes), np.float32),
            blend_oof=np.zeros(inputs.base_oof.probs.shape, np.float16),
            blend_test=np.zeros(inputs.base_test.probs.shape, np.float16),
            gate_maps_oof=maps_oof,
            gate_maps_test=maps_test,
        )


def run_stack(
    inputs: StackInputs,
    options: StackOptions,
    out_dir: str | os.PathLike[str],
    candidate_dirs: dict[str, tuple[Path, Path]],
) -> dict[str, Any]:
    """Fit gate and blender per class, write their artifacts and the two candidates.

    Args:
        inputs: from :func:`load_stack_inputs`.
        options: backend, pixel sample size, seed.
        out_dir: artifacts: ``class_<k>/`` (feature tables, native models, importances,
            metrics) and ``summary.json``; every JSON carries the stage's provenance block
            (:mod:`segflow.core.provenance`, seed ``options.seed``).
        candidate_dirs: ``stack_gate`` / ``stack_pixel`` -> (OOF folder, test folder).

    Returns:
        The summary written to ``summary.json``.
    """
    out_dir = Path(out_dir)
    # One block for every JSON of the stage: its options, the experiments it stacks, its seed.
    block = stage_provenance(
        {"options": dataclasses.asdict(options), "names": list(inputs.names)}, seed=options.seed
    )
    fold_of = inputs.folds.set_index("id").loc[inputs.base_oof.ids["id"], "fold"].to_numpy()
    outputs = _StackOutputs.empty(inputs, options.threshold_target)
    per_class = {
        name: _stack_class(inputs, k, options, fold_of, out_dir / f"class_{k}", block, outputs)
        for k, name in enumerate(inputs.classes)
    }
    summaries = _write_stack_candidates(inputs, outputs, candidate_dirs, block)
    summary = json_ready(
        {
            "backend": options.backend,
            "options": dataclasses.asdict(options),
            "classes": per_class,
            "candidates": {
                k: {m: v[m] for m in ("kaggle", "dice", "iou")} for k, v in summaries.items()
            },
        }
    )
    summary = with_provenance(summary, block)
    write_json(out_dir / "summary.json", summary)
    return summary


def _stack_class(
    inputs: StackInputs,
    k: int,
    options: StackOptions,
    fold_of: np.ndarray,
    class_dir: Path,
    block: dict[str, Any],
    outputs: _StackOutputs,
) -> dict[str, Any]:
    """Class ``k``: feature tables, the gate, the pixel blender (and per-image thresholds),
    their artifacts in ``class_dir``; fills column ``k`` of ``outputs``.

    Returns:
        The class's metrics for ``summary.json``.
    """
    truth = class_truths(inputs.truths, k)
    oof_maps = {
        n: np.asarray(p.probs[:, k], np.float32)
        for n, p in zip(inputs.names, inputs.oof, strict=True)
    }
    test_maps = {
        n: np.asarray(p.probs[:, k], np.float32)
        for n, p in zip(inputs.names, inputs.test, strict=True)
    }

    train_features = image_features(oof_maps, inputs.train_images, inputs.train_metadata)
    test_features = image_features(test_maps, inputs.test_images, inputs.test_metadata)
    _write_parquet(
        class_dir / "features_oof.parquet",
        train_features.assign(id=inputs.base_oof.ids["id"].to_numpy(), fold=fold_of),
    )
    _write_parquet(
        class_dir / "features_test.parquet",
        test_features.assign(id=inputs.base_test.ids["id"].to_numpy()),
    )
    gate = fit_gate(
        train_features, nonempty_images(truth), fold_of, options.backend, seed=options.seed
    )
    write_gate_artifacts(gate, class_dir, inputs.base_oof.ids["id"].tolist(), block)
    outputs.gate_oof[:, k] = gate.nonempty_prob
    outputs.gate_test[:, k] = gate.final_model.predict_proba(test_features)

    blender = fit_pixel_blender(
        oof_maps,
        truth,
        fold_of,
        inputs.train_images,
        options.backend,
        seed=options.seed,
        pixels_per_image=options.pixels_per_image,
    )
    write_blender_artifacts(blender, class_dir, block)
    outputs.blend_oof[:, k] = blender.oof_probs
    outputs.blend_test[:, k] = apply_pixel_blender(
        blender.final_model, test_maps, inputs.test_images
    )
    record: dict[str, Any] = {"gate": gate.metrics(), "blender": blender.metrics()}
    if options.threshold_target:
        threshold = _fit_thresholds(
            inputs, k, truth, train_features, fold_of, options, class_dir, block
        )
        outputs.gate_maps_oof[:, k] = recalibrate(outputs.gate_maps_oof[:, k], threshold.predicted)
        outputs.gate_maps_test[:, k] = recalibrate(
            outputs.gate_maps_test[:, k], threshold.final_model.predict_proba(test_features)
        )
        record["threshold"] = threshold.metrics()
    log.info(
        "class %s: gate OOF AUC %.4f; blender scores %s",
        inputs.classes[k],
        gate.auc,
        blender.scores.to_dict(),
    )
    return record


def _write_stack_candidates(
    inputs: StackInputs,
    outputs: _StackOutputs,
    candidate_dirs: dict[str, tuple[Path, Path]],
    block: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The ``stack_gate`` and ``stack_pixel`` candidates, in an experiment's layout.

    Returns:
        Each candidate's OOF summary (its ``metrics.json``).
    """
    base_oof, base_test = inputs.base_oof, inputs.base_test
    candidates = {
        "stack_gate": (
            Prediction(with_gates(base_oof.ids, outputs.gate_oof), outputs.gate_maps_oof),
            Prediction(with_gates(base_test.ids, outputs.gate_test), outputs.gate_maps_test),
        ),
        "stack_pixel": (
            Prediction(without_gates(base_oof.ids), outputs.blend_oof),
            Prediction(without_gates(base_test.ids), outputs.blend_test),
        ),
    }
    return {
        name: write_candidate(
            *candidate_dirs[name],
            oof,
            test,
            inputs.folds,
            inputs.truths,
            inputs.classes,
            {PROVENANCE_KEY: block},
        )
        for name, (oof, test) in candidates.items()
    }


def _fit_thresholds(
    inputs: StackInputs,
    k: int,
    truth: np.ndarray,
    features: pd.DataFrame,
    fold_of: np.ndarray,
    options: StackOptions,
    class_dir: Path,
    provenance: dict[str, Any],
) -> ThresholdResult:
    """Class k's per-image threshold model, on the ensemble's OOF maps; artifacts written."""
    best, informative = best_thresholds(inputs.base_oof.probs[:, k], truth)
    result = fit_threshold(features, best, informative, fold_of, options.backend, seed=options.seed)
    write_threshold_artifacts(result, class_dir, inputs.base_oof.ids["id"].tolist(), provenance)
    log.info("class %d: per-image thresholds %s", k, result.metrics())
    return result


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    from segflow.core.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow stack``'s flags."""
    add_dataclass_arguments(parser, StackOptions)
    add_experiment_dirs(parser)
    parser.add_argument("--base-oof-dir", required=True, help="the ensemble's OOF folder")
    parser.add_argument("--base-test-dir", required=True, help="the ensemble's test folder")
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_stage_tables(parser)
    parser.add_argument("--test-manifest", required=True, help="test manifest Parquet (ingest)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", required=True, help="artifacts folder")


def run(args: argparse.Namespace) -> None:
    """``segflow stack``: fit the stacked models, write the stack_gate and stack_pixel
    candidates next to the ensemble's (same results folder and round)."""
    options = dataclass_from_namespace(StackOptions, args)
    classes, _ = read_classes(args.arrays_dir)
    check_names(args)
    manifest = read_table(args.manifest, "manifest")
    base_oof = read_oof(args.base_oof_dir)
    inputs = load_stack_inputs(
        args.names,
        [read_oof(d) for d in args.oof_dirs],
        [
            read_fold_predictions(dirs, args.fold_merge)
            for dirs in group_by_experiment(args.test_dirs, len(args.names), "test folders")
        ],
        base_oof,
        read_fold_predictions([args.base_test_dir], "mean"),
        original_truths(
            manifest, read_table(args.dedup_items, "dedup items"), base_oof.ids["id"], len(classes)
        ),
        read_folds(args.folds),
        classes,
        args.arrays_dir,
        manifest,
        read_table(args.test_manifest, "test manifest"),
    )
    try:
        results, _, round_ = layout.candidate_of(args.base_oof_dir)
    except ValueError as error:
        raise SegflowError(f"--base-oof-dir: {error}") from None
    candidate_dirs = {
        name: (
            layout.candidate_dir(results, "oof", name, round_),
            layout.candidate_dir(results, "test", name, round_),
        )
        for name in ("stack_gate", "stack_pixel")
    }
    summary = run_stack(inputs, options, args.out_dir, candidate_dirs)
    stage_log.info("stacking: %s", summary["candidates"])
