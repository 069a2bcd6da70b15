"""The stacking stage on files: an image-level gate or a pixel-level blender, per class.

``segflow stack --candidate gate|pixel`` fits one of the two stacked candidates
(:mod:`segflow.ensemble.stacking.stackers`); the workflow runs one job per candidate, each with
only the options it reads. Features come from every experiment's OOF probability maps (and the
fold-merged test maps for the test set), the preprocessed images and (gate) the manifest's
``meta_*`` metadata. Both models are cross-fitted on the first level's folds
(:mod:`segflow.ensemble.stacking.learners`), so their OOF is honest; the final models, fitted
on all OOF, are applied to the test features.

* ``stack_gate`` (``--candidate gate``): the ensemble's probabilities with the gate's non-empty
  probability (tuned as ``postprocess.gates`` like an aux head's); with
  ``stack.threshold_target`` the probabilities are recalibrated to each image's predicted best
  threshold (:mod:`segflow.ensemble.stacking.threshold`). Reads the ensemble.
* ``stack_pixel`` (``--candidate pixel``): the blender's probabilities. Reads the experiments
  only, not the ensemble nor the gate.

Both write into the same ``stack/round<r>/class_<k>/`` folders (the gate its feature tables,
gate and threshold files, the pixel job its ``blender_*`` files: no name is shared) and a
``summary_<stacker>.json`` each.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
from segflow.core.late_options import published_options
from segflow.core.options import (
    add_dataclass_arguments,
    dataclass_from_namespace,
    lists_to_tuples,
    option,
)
from segflow.core.provenance import PROVENANCE_KEY, stage_provenance, with_provenance
from segflow.core.stage_args import add_experiment_dirs, add_stage_tables, check_names, stage_log
from segflow.data.blobs import check_sigmas
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
from segflow.ensemble.stacking.stackers import STACKER_OPTIONS, STACKERS, candidate_name
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
    """Second-level models (config section ``stack``); each candidate reads only its own
    fields (:data:`segflow.ensemble.stacking.stackers.STACKER_OPTIONS`)."""

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
    blob_sigmas: tuple[float, ...] | None = option(
        None,
        "Difference-of-Gaussians blob features for the gate (count, mean and largest area) at "
        "these increasing Gaussian sigmas (pixels); null = none",
    )
    blob_threshold: float = option(
        0.1, "with blob_sigmas, the least scale-normalised DoG response of a blob"
    )

    # Left out of the stackers' recorded options at their defaults (byte-identical summaries
    # and provenance for runs without them; segflow.core.late_options.published_options).
    _omit_at_default: ClassVar[tuple[str, ...]] = ("blob_sigmas", "blob_threshold")

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        if self.blob_sigmas is not None:
            object.__setattr__(
                self, "blob_sigmas", check_sigmas(self.blob_sigmas, "stack.blob_sigmas")
            )
        if (
            isinstance(self.blob_threshold, bool)
            or not isinstance(self.blob_threshold, int | float)
            or not self.blob_threshold > 0
        ):
            raise SegflowError(
                f"stack.blob_threshold must be a number > 0, got {self.blob_threshold!r}"
            )
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

    def of(self, stacker: str) -> dict[str, Any]:
        """The options ``stacker`` reads, by name (what its provenance and summary record).

        Raises:
            KeyError: an unknown stacker (the message lists the valid ones).
        """
        candidate_name(stacker)
        values = published_options(self)
        return {name: values[name] for name in STACKER_OPTIONS[stacker] if name in values}


@dataclass(frozen=True)
class StackInputs:
    """Everything the stage reads, already loaded and row-aligned."""

    names: Sequence[str]
    oof: Sequence[Prediction]  # per experiment, OOF (sorted ids)
    test: Sequence[Prediction]  # per experiment, fold-merged test
    base_oof: Prediction | None  # the ensemble's (what the gate gates); None for the blender
    base_test: Prediction | None
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
    base_oof: Prediction | None,
    base_test: Prediction | None,
    truths: np.ndarray,
    folds: pd.DataFrame,
    classes: Sequence[str],
    arrays_dir: str | os.PathLike[str],
    manifest: pd.DataFrame,
    test_manifest: pd.DataFrame | None = None,
) -> StackInputs:
    """Check alignment and read the images and metadata the features need (the test items'
    metadata from ``test_manifest``, the test side's manifest; None: ``manifest`` holds both).

    Args:
        base_oof, base_test: the ensemble's OOF and test predictions (the gate's), both or
            neither (the pixel blender reads the experiments only).

    Raises:
        SegflowError: experiments (and ensemble) cover different ids or shapes, or only one
            of ``base_oof`` and ``base_test`` is given.
    """
    if (base_oof is None) != (base_test is None):
        raise SegflowError("stacking: give the ensemble's OOF and test predictions, or neither")
    with_base = base_oof is not None and base_test is not None
    check_aligned(
        [*oof, base_oof] if with_base else list(oof),
        [*names, "ensemble"] if with_base else list(names),
        "OOF predictions",
    )
    check_aligned(
        [*test, base_test] if with_base else list(test),
        [*names, "ensemble"] if with_base else list(names),
        "test predictions",
    )
    arrays_dir = Path(arrays_dir)
    oof_ids, test_ids = oof[0].ids["id"], test[0].ids["id"]
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


def _class_maps(inputs: StackInputs, k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Class ``k``'s probability planes of every experiment: (OOF, test), float32."""
    oof_maps = {
        n: np.asarray(p.probs[:, k], np.float32)
        for n, p in zip(inputs.names, inputs.oof, strict=True)
    }
    test_maps = {
        n: np.asarray(p.probs[:, k], np.float32)
        for n, p in zip(inputs.names, inputs.test, strict=True)
    }
    return oof_maps, test_maps


def run_stack(
    inputs: StackInputs,
    options: StackOptions,
    stacker: str,
    out_dir: str | os.PathLike[str],
    candidate_dirs: tuple[Path, Path],
) -> dict[str, Any]:
    """Fit one stacked model per class, write its artifacts and its candidate.

    Args:
        inputs: from :func:`load_stack_inputs` (with the ensemble's predictions for the gate).
        options: the ``stack`` options; only ``options.of(stacker)`` is read.
        stacker: ``gate`` or ``pixel`` (:data:`segflow.ensemble.stacking.stackers.STACKERS`).
        out_dir: artifacts: ``class_<k>/`` (gate: feature tables, gate and threshold models,
            importances, metrics; pixel: the blender's) and ``summary_<stacker>.json``; every
            JSON carries the job's provenance block (:mod:`segflow.core.provenance`, seed
            ``options.seed``).
        candidate_dirs: the candidate's (OOF folder, test folder).

    Returns:
        The summary written to ``summary_<stacker>.json``.

    Raises:
        SegflowError: the gate without the ensemble's predictions.
        KeyError: an unknown stacker.
    """
    name = candidate_name(stacker)
    used = options.of(stacker)
    if stacker == "gate" and inputs.base_oof is None:
        raise SegflowError("stack --candidate gate gates the ensemble: give --base-oof-dir")
    out_dir = Path(out_dir)
    # One block for every JSON of the job: the options it reads, the experiments, its seed.
    block = stage_provenance(
        {"stacker": stacker, "options": used, "names": list(inputs.names)}, seed=options.seed
    )
    fold_of = inputs.folds.set_index("id").loc[inputs.oof[0].ids["id"], "fold"].to_numpy()
    fit = _fit_gates if stacker == "gate" else _fit_blenders
    per_class, oof, test = fit(inputs, options, fold_of, out_dir, block)
    scores = write_candidate(
        *candidate_dirs,
        oof,
        test,
        inputs.folds,
        inputs.truths,
        inputs.classes,
        {PROVENANCE_KEY: block},
    )
    summary = json_ready(
        {
            "stacker": stacker,
            "backend": options.backend,
            "options": used,
            "classes": per_class,
            "candidates": {name: {m: scores[m] for m in ("kaggle", "dice", "iou")}},
        }
    )
    summary = with_provenance(summary, block)
    write_json(out_dir / f"summary_{stacker}.json", summary)
    return summary


def _fit_gates(
    inputs: StackInputs,
    options: StackOptions,
    fold_of: np.ndarray,
    out_dir: Path,
    block: dict[str, Any],
) -> tuple[dict[str, Any], Prediction, Prediction]:
    """Per class: feature tables, the gate (and per-image thresholds), their artifacts.

    Returns:
        (per-class metrics, the stack_gate candidate's OOF, its test prediction).
    """
    base_oof, base_test = inputs.base_oof, inputs.base_test
    if base_oof is None or base_test is None:
        raise SegflowError("the gate needs the ensemble's OOF and test predictions")
    n_classes = len(inputs.classes)
    gate_oof = np.zeros((len(base_oof.ids), n_classes), np.float32)
    gate_test = np.zeros((len(base_test.ids), n_classes), np.float32)
    maps_oof, maps_test = np.asarray(base_oof.probs), np.asarray(base_test.probs)
    if options.threshold_target:  # per-image thresholds rewrite them class by class
        maps_oof, maps_test = maps_oof.copy(), maps_test.copy()
    per_class: dict[str, Any] = {}
    for k, class_name in enumerate(inputs.classes):
        class_dir = out_dir / f"class_{k}"
        truth = class_truths(inputs.truths, k)
        oof_maps, test_maps = _class_maps(inputs, k)
        blobs = {"blob_sigmas": options.blob_sigmas, "blob_threshold": options.blob_threshold}
        train_features = image_features(
            oof_maps, inputs.train_images, inputs.train_metadata, **blobs
        )
        test_features = image_features(test_maps, inputs.test_images, inputs.test_metadata, **blobs)
        _write_parquet(
            class_dir / "features_oof.parquet",
            train_features.assign(id=base_oof.ids["id"].to_numpy(), fold=fold_of),
        )
        _write_parquet(
            class_dir / "features_test.parquet",
            test_features.assign(id=base_test.ids["id"].to_numpy()),
        )
        gate = fit_gate(
            train_features, nonempty_images(truth), fold_of, options.backend, seed=options.seed
        )
        write_gate_artifacts(gate, class_dir, base_oof.ids["id"].tolist(), block)
        gate_oof[:, k] = gate.nonempty_prob
        gate_test[:, k] = gate.final_model.predict_proba(test_features)
        record: dict[str, Any] = {"gate": gate.metrics()}
        if options.threshold_target:
            threshold = _fit_thresholds(
                inputs, k, truth, train_features, fold_of, options, class_dir, block
            )
            maps_oof[:, k] = recalibrate(maps_oof[:, k], threshold.predicted)
            maps_test[:, k] = recalibrate(
                maps_test[:, k], threshold.final_model.predict_proba(test_features)
            )
            record["threshold"] = threshold.metrics()
        log.info("class %s: gate OOF AUC %.4f", class_name, gate.auc)
        per_class[class_name] = record
    return (
        per_class,
        Prediction(with_gates(base_oof.ids, gate_oof), maps_oof),
        Prediction(with_gates(base_test.ids, gate_test), maps_test),
    )


def _fit_blenders(
    inputs: StackInputs,
    options: StackOptions,
    fold_of: np.ndarray,
    out_dir: Path,
    block: dict[str, Any],
) -> tuple[dict[str, Any], Prediction, Prediction]:
    """Per class: the pixel blender on the experiments' maps and its artifacts.

    Returns:
        (per-class metrics, the stack_pixel candidate's OOF, its test prediction).
    """
    oof_ids, test_ids = without_gates(inputs.oof[0].ids), without_gates(inputs.test[0].ids)
    blend_oof = np.zeros(inputs.oof[0].probs.shape, np.float16)
    blend_test = np.zeros(inputs.test[0].probs.shape, np.float16)
    per_class: dict[str, Any] = {}
    for k, class_name in enumerate(inputs.classes):
        oof_maps, test_maps = _class_maps(inputs, k)
        blender = fit_pixel_blender(
            oof_maps,
            class_truths(inputs.truths, k),
            fold_of,
            inputs.train_images,
            options.backend,
            seed=options.seed,
            pixels_per_image=options.pixels_per_image,
        )
        write_blender_artifacts(blender, out_dir / f"class_{k}", block)
        blend_oof[:, k] = blender.oof_probs
        blend_test[:, k] = apply_pixel_blender(blender.final_model, test_maps, inputs.test_images)
        log.info("class %s: blender scores %s", class_name, blender.scores.to_dict())
        per_class[class_name] = {"blender": blender.metrics()}
    return per_class, Prediction(oof_ids, blend_oof), Prediction(test_ids, blend_test)


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
    if inputs.base_oof is None:
        raise SegflowError("per-image thresholds need the ensemble's OOF predictions")
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
    parser.add_argument(
        "--candidate",
        required=True,
        choices=STACKERS,
        help="gate: the image-level gate on the ensemble (stack_gate); pixel: the pixel-level "
        "blender (stack_pixel). Each reads only its own options: "
        + "; ".join(f"{s}: {', '.join(STACKER_OPTIONS[s])}" for s in STACKERS),
    )
    add_dataclass_arguments(parser, StackOptions)
    add_experiment_dirs(parser)
    parser.add_argument(
        "--base-oof-dir", default=None, help="the ensemble's OOF folder (gate only, required)"
    )
    parser.add_argument(
        "--base-test-dir", default=None, help="the ensemble's test folder (gate only, required)"
    )
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_stage_tables(parser)
    parser.add_argument("--test-manifest", required=True, help="test manifest Parquet (ingest)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", required=True, help="artifacts folder")


def _base_predictions(args: argparse.Namespace) -> tuple[Prediction | None, Prediction | None]:
    """The ensemble's OOF and test predictions for the gate; (None, None) for the blender.

    Raises:
        SegflowError: the gate without both folders, or the blender given one.
    """
    given = [flag for flag in ("base_oof_dir", "base_test_dir") if getattr(args, flag)]
    if args.candidate == "pixel":
        if given:
            flag = given[0].replace("_", "-")
            raise SegflowError(f"stack --candidate pixel reads the experiments only; drop --{flag}")
        return None, None
    if len(given) < 2:
        raise SegflowError("stack --candidate gate needs --base-oof-dir and --base-test-dir")
    return read_oof(args.base_oof_dir), read_fold_predictions([args.base_test_dir], "mean")


def run(args: argparse.Namespace) -> None:
    """``segflow stack``: fit one stacked model, write its candidate (stack_gate or
    stack_pixel) next to the experiments' (same results folder and round)."""
    options = dataclass_from_namespace(StackOptions, args)
    classes, _ = read_classes(args.arrays_dir)
    check_names(args)
    manifest = read_table(args.manifest, "manifest")
    base_oof, base_test = _base_predictions(args)
    oof = [read_oof(d) for d in args.oof_dirs]
    inputs = load_stack_inputs(
        args.names,
        oof,
        [
            read_fold_predictions(dirs, args.fold_merge)
            for dirs in group_by_experiment(args.test_dirs, len(args.names), "test folders")
        ],
        base_oof,
        base_test,
        original_truths(
            manifest, read_table(args.dedup_items, "dedup items"), oof[0].ids["id"], len(classes)
        ),
        read_folds(args.folds),
        classes,
        args.arrays_dir,
        manifest,
        read_table(args.test_manifest, "test manifest"),
    )
    # The stacked candidates sit next to the experiments: same results folder and round.
    try:
        results, _, round_ = layout.candidate_of(args.oof_dirs[0])
    except ValueError as error:
        raise SegflowError(f"--oof-dirs: {error}") from None
    name = candidate_name(args.candidate)
    candidate_dirs = (
        layout.candidate_dir(results, "oof", name, round_),
        layout.candidate_dir(results, "test", name, round_),
    )
    summary = run_stack(inputs, options, args.candidate, args.out_dir, candidate_dirs)
    stage_log.info("stacking (%s): %s", args.candidate, summary["candidates"])
