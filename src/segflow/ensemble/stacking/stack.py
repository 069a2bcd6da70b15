"""The stacking stage on files: an image-level gate or a pixel-level blender, per class.

``segflow stack --candidate gate|pixel`` fits one of the two stacked candidates
(:mod:`segflow.ensemble.stacking.stackers`) on the OOF side only; the workflow runs one job per
candidate, each with only the options it reads. Features come from every experiment's OOF
probability maps, the preprocessed train images and (gate) the manifest's ``meta_*``
metadata. Both models are cross-fitted on the first level's folds
(:mod:`segflow.ensemble.stacking.learners`), so their OOF is honest; the final models, fitted
on all OOF and saved in their native formats, are applied to the test set by
``segflow apply-stack`` (:mod:`segflow.ensemble.stacking.apply_stack`), so a test-set change
refits nothing. An OOF of a single trained fold (``folds.train_folds: [k]``) is cross-fitted on
sub-folds of it, whole duplicate groups at a time
(:func:`segflow.ensemble.stacking.learners.stacking_folds`).

* ``stack_gate`` (``--candidate gate``): the ensemble's probabilities with the gate's non-empty
  probability (tuned as ``postprocess.gates`` like an aux head's); with
  ``stack.threshold_target`` the probabilities are recalibrated to each image's predicted best
  threshold (:mod:`segflow.ensemble.stacking.threshold`). Reads the ensemble.
* ``stack_pixel`` (``--candidate pixel``): the blender's probabilities. Reads the experiments
  only, not the ensemble nor the gate.

Both write into the same ``stack/round<r>/class_<k>/`` folders (the gate its OOF feature table,
gate and threshold files, the pixel job its ``blender_*`` files: no name is shared) and a
``summary_<stacker>.json`` each (its ``backend`` and ``options`` tell apply-stack which model
files to load).
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
from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import Prediction, read_oof, with_gates, without_gates
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
from segflow.core.stage_args import (
    PROVENANCE_KEY,
    add_experiment_dirs,
    add_stage_tables,
    check_names,
    stage_log,
    stage_provenance,
    with_provenance,
)
from segflow.data.blobs import check_sigmas
from segflow.ensemble.candidates import check_aligned, json_ready, write_oof_candidate
from segflow.ensemble.stacking.features import image_features
from segflow.ensemble.stacking.learners import (
    BACKENDS,
    fit_gate,
    fit_pixel_blender,
    nonempty_images,
    stacking_folds,
    write_blender_artifacts,
    write_gate_artifacts,
)
from segflow.ensemble.stacking.rows import (
    base_dir_for,
    class_maps,
    images_for,
    metadata_for,
    write_parquet,
)
from segflow.ensemble.stacking.stackers import (
    STACKER_OPTIONS,
    STACKERS,
    candidate_name,
    summary_name,
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

    def blob_features(self) -> dict[str, Any]:
        """:func:`segflow.ensemble.stacking.features.image_features`'s blob arguments (none
        without ``blob_sigmas``); apply-stack reads them back from the recorded options."""
        if self.blob_sigmas is None:
            return {}
        return {"blob_sigmas": self.blob_sigmas, "blob_threshold": self.blob_threshold}

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
    """Everything the fit reads (the OOF side), already loaded and row-aligned."""

    names: Sequence[str]
    oof: Sequence[Prediction]  # per experiment, OOF (sorted ids)
    base_oof: Prediction | None  # the ensemble's (what the gate gates); None for the blender
    truths: np.ndarray  # packed (N, H, W)
    folds: pd.DataFrame  # id, fold
    classes: Sequence[str]
    train_images: np.ndarray  # preprocessed rows of the OOF ids (N, h, w, C)
    train_metadata: pd.DataFrame  # meta_* columns of the OOF ids


def load_stack_inputs(
    names: Sequence[str],
    oof: Sequence[Prediction],
    base_oof: Prediction | None,
    truths: np.ndarray,
    folds: pd.DataFrame,
    classes: Sequence[str],
    arrays_dir: str | os.PathLike[str],
    manifest: pd.DataFrame,
) -> StackInputs:
    """Check alignment and read the train images and metadata the features need.

    Args:
        base_oof: the ensemble's OOF predictions (the gate's), or None (the pixel blender
            reads the experiments only).

    Raises:
        SegflowError: experiments (and ensemble) cover different ids or shapes.
    """
    with_base = base_oof is not None
    check_aligned(
        [*oof, base_oof] if with_base else list(oof),
        [*names, "ensemble"] if with_base else list(names),
        "OOF predictions",
    )
    oof_ids = oof[0].ids["id"]
    return StackInputs(
        names=list(names),
        oof=oof,
        base_oof=base_oof,
        truths=truths,
        folds=folds,
        classes=list(classes),
        train_images=images_for(arrays_dir, "train", oof_ids),
        train_metadata=metadata_for(manifest, oof_ids),
    )


def run_stack(
    inputs: StackInputs,
    options: StackOptions,
    stacker: str,
    out_dir: str | os.PathLike[str],
    oof_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Fit one stacked model per class, write its artifacts and its candidate's OOF side.

    Args:
        inputs: from :func:`load_stack_inputs` (with the ensemble's OOF for the gate).
        options: the ``stack`` options; only ``options.of(stacker)`` is read.
        stacker: ``gate`` or ``pixel`` (:data:`segflow.ensemble.stacking.stackers.STACKERS`).
        out_dir: artifacts: ``class_<k>/`` (gate: OOF feature table, gate and threshold models,
            importances, metrics; pixel: the blender's) and ``summary_<stacker>.json``; every
            JSON carries the job's provenance block (:mod:`segflow.core.stage_args`, seed
            ``options.seed``).
        oof_dir: the candidate's OOF folder.

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
    rows = inputs.folds.set_index("id").loc[inputs.oof[0].ids["id"]]
    # The first level's folds; an OOF of one trained fold (folds.train_folds) is split into as
    # many sub-folds as folds.csv has folds, by duplicate group (learners.stacking_folds; a
    # table without groups: each image its own).
    fold_of = stacking_folds(
        rows["fold"].to_numpy(),
        rows["group"].to_numpy() if "group" in rows else rows.index.to_numpy(),
        int(inputs.folds["fold"].nunique()),
        options.seed,
    )
    fit = _fit_gates if stacker == "gate" else _fit_blenders
    per_class, oof = fit(inputs, options, fold_of, out_dir, block)
    scores = write_oof_candidate(
        oof_dir, oof, inputs.folds, inputs.truths, inputs.classes, {PROVENANCE_KEY: block}
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
    write_json(out_dir / summary_name(stacker), summary)
    return summary


def _fit_gates(
    inputs: StackInputs,
    options: StackOptions,
    fold_of: np.ndarray,
    out_dir: Path,
    block: dict[str, Any],
) -> tuple[dict[str, Any], Prediction]:
    """Per class: the OOF feature table, the gate (and per-image thresholds), their artifacts.

    Returns:
        (per-class metrics, the stack_gate candidate's OOF).
    """
    base_oof = inputs.base_oof
    if base_oof is None:
        raise SegflowError("the gate needs the ensemble's OOF predictions")
    n_classes = len(inputs.classes)
    gate_oof = np.zeros((len(base_oof.ids), n_classes), np.float32)
    maps_oof = np.asarray(base_oof.probs)
    if options.threshold_target:  # per-image thresholds rewrite them class by class
        maps_oof = maps_oof.copy()
    per_class: dict[str, Any] = {}
    for k, class_name in enumerate(inputs.classes):
        class_dir = out_dir / f"class_{k}"
        truth = class_truths(inputs.truths, k)
        train_features = image_features(
            class_maps(inputs.names, inputs.oof, k),
            inputs.train_images,
            inputs.train_metadata,
            **options.blob_features(),
        )
        write_parquet(
            class_dir / "features_oof.parquet",
            train_features.assign(id=base_oof.ids["id"].to_numpy(), fold=fold_of),
        )
        gate = fit_gate(
            train_features, nonempty_images(truth), fold_of, options.backend, seed=options.seed
        )
        write_gate_artifacts(gate, class_dir, base_oof.ids["id"].tolist(), block)
        gate_oof[:, k] = gate.nonempty_prob
        record: dict[str, Any] = {"gate": gate.metrics()}
        if options.threshold_target:
            threshold = _fit_thresholds(
                inputs, k, truth, train_features, fold_of, options, class_dir, block
            )
            maps_oof[:, k] = recalibrate(maps_oof[:, k], threshold.predicted)
            record["threshold"] = threshold.metrics()
        log.info("class %s: gate OOF AUC %.4f", class_name, gate.auc)
        per_class[class_name] = record
    return per_class, Prediction(with_gates(base_oof.ids, gate_oof), maps_oof)


def _fit_blenders(
    inputs: StackInputs,
    options: StackOptions,
    fold_of: np.ndarray,
    out_dir: Path,
    block: dict[str, Any],
) -> tuple[dict[str, Any], Prediction]:
    """Per class: the pixel blender on the experiments' maps and its artifacts.

    Returns:
        (per-class metrics, the stack_pixel candidate's OOF).
    """
    oof_ids = without_gates(inputs.oof[0].ids)
    blend_oof = np.zeros(inputs.oof[0].probs.shape, np.float16)
    per_class: dict[str, Any] = {}
    for k, class_name in enumerate(inputs.classes):
        blender = fit_pixel_blender(
            class_maps(inputs.names, inputs.oof, k),
            class_truths(inputs.truths, k),
            fold_of,
            inputs.train_images,
            options.backend,
            seed=options.seed,
            pixels_per_image=options.pixels_per_image,
        )
        write_blender_artifacts(blender, out_dir / f"class_{k}", block)
        blend_oof[:, k] = blender.oof_probs
        log.info("class %s: blender scores %s", class_name, blender.scores.to_dict())
        per_class[class_name] = {"blender": blender.metrics()}
    return per_class, Prediction(oof_ids, blend_oof)


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
    add_experiment_dirs(parser, test=False)
    parser.add_argument(
        "--base-oof-dir", default=None, help="the ensemble's OOF folder (gate only, required)"
    )
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_stage_tables(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", required=True, help="artifacts folder")


def _base_oof(args: argparse.Namespace) -> Prediction | None:
    """The ensemble's OOF predictions for the gate; None for the blender.

    Raises:
        SegflowError: the gate without ``--base-oof-dir``, or the blender given it.
    """
    base = base_dir_for(args.candidate, args.base_oof_dir, "stack", "--base-oof-dir")
    return None if base is None else read_oof(base)


def run(args: argparse.Namespace) -> None:
    """``segflow stack``: fit one stacked model, write its artifacts and its candidate's OOF
    side (stack_gate or stack_pixel) next to the experiments' (same results folder and round)."""
    options = dataclass_from_namespace(StackOptions, args)
    classes, _ = read_classes(args.arrays_dir)
    check_names(args)
    manifest = read_table(args.manifest, "manifest")
    base_oof = _base_oof(args)
    oof = [read_oof(d) for d in args.oof_dirs]
    inputs = load_stack_inputs(
        args.names,
        oof,
        base_oof,
        original_truths(
            manifest, read_table(args.dedup_items, "dedup items"), oof[0].ids["id"], len(classes)
        ),
        read_folds(args.folds),
        classes,
        args.arrays_dir,
        manifest,
    )
    # The stacked candidates sit next to the experiments: same results folder and round.
    try:
        results, _, round_ = layout.candidate_of(args.oof_dirs[0])
    except ValueError as error:
        raise SegflowError(f"--oof-dirs: {error}") from None
    oof_dir = layout.candidate_dir(results, "oof", candidate_name(args.candidate), round_)
    summary = run_stack(inputs, options, args.candidate, args.out_dir, oof_dir)
    stage_log.info("stacking (%s): %s", args.candidate, summary["candidates"])
