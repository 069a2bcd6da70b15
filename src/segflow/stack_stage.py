"""The stacking stage on files: image-level gate and pixel-level blender, per class.

Features come from every experiment's OOF probability maps (and the fold-merged test maps for
the test set), the preprocessed images and the manifest's ``meta_*`` metadata. Both models are
cross-fitted on the first level's folds (:mod:`segflow.stacking`), so their OOF is honest; the
final models, fitted on all OOF, are applied to the test features. Two candidates come out:

* ``stack_gate``: the ensemble's probabilities with the gate's non-empty probability (tuned as
  ``postprocess.gates`` like an aux head's); with ``stack.threshold_target`` the probabilities
  are recalibrated to each image's predicted best threshold (:mod:`segflow.stack_threshold`);
* ``stack_pixel``: the blender's probabilities.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.atomic import write_json
from segflow.errors import SegflowError
from segflow.options import option
from segflow.provenance import PROVENANCE_KEY, stage_provenance, with_provenance
from segflow.resolution import image_to_original, index_offsets
from segflow.second_level import (
    Prediction,
    check_aligned,
    class_truths,
    gate_columns,
    json_ready,
    write_candidate,
)
from segflow.stack_threshold import (
    ThresholdResult,
    best_thresholds,
    fit_threshold,
    recalibrate,
    write_threshold_artifacts,
)
from segflow.stacking import BACKENDS

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
    index = pd.read_parquet(arrays_dir / "index.parquet")
    selected = index[index["split"] == split].set_index("id").loc[ids].reset_index()
    images = np.asarray(
        np.load(arrays_dir / f"{split}_images.npy", mmap_mode="r")[selected["row"].to_numpy()]
    )
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
) -> StackInputs:
    """Check alignment and read the images and metadata the features need."""
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
        test_metadata=_metadata_for(manifest, test_ids),
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
            (:mod:`segflow.provenance`, seed ``options.seed``).
        candidate_dirs: ``stack_gate`` / ``stack_pixel`` -> (OOF folder, test folder).

    Returns:
        The summary written to ``summary.json``.
    """
    from segflow.stack_features import image_features
    from segflow.stacking import (
        apply_pixel_blender,
        fit_gate,
        fit_pixel_blender,
        nonempty_images,
        write_blender_artifacts,
        write_gate_artifacts,
    )

    out_dir = Path(out_dir)
    # One block for every JSON of the stage: its options, the experiments it stacks, its seed.
    block = stage_provenance(
        {"options": dataclasses.asdict(options), "names": list(inputs.names)}, seed=options.seed
    )
    fold_of = inputs.folds.set_index("id").loc[inputs.base_oof.ids["id"], "fold"].to_numpy()
    n_classes = len(inputs.classes)
    gate_oof = np.zeros((len(fold_of), n_classes), np.float32)
    gate_test = np.zeros((len(inputs.base_test.ids), n_classes), np.float32)
    blend_oof = np.zeros(inputs.base_oof.probs.shape, np.float16)
    blend_test = np.zeros(inputs.base_test.probs.shape, np.float16)
    # The gate candidate's maps: the ensemble's, or recalibrated to per-image thresholds.
    gate_maps_oof = np.asarray(inputs.base_oof.probs)
    gate_maps_test = np.asarray(inputs.base_test.probs)
    if options.threshold_target:
        gate_maps_oof, gate_maps_test = gate_maps_oof.copy(), gate_maps_test.copy()
    per_class: dict[str, Any] = {}
    for k, name in enumerate(inputs.classes):
        class_dir = out_dir / f"class_{k}"
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
        gate_oof[:, k] = gate.nonempty_prob
        gate_test[:, k] = gate.final_model.predict_proba(test_features)

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
        blend_oof[:, k] = blender.oof_probs
        blend_test[:, k] = apply_pixel_blender(blender.final_model, test_maps, inputs.test_images)
        per_class[name] = {"gate": gate.metrics(), "blender": blender.metrics()}
        if options.threshold_target:
            threshold = _fit_thresholds(
                inputs, k, truth, train_features, fold_of, options, class_dir, block
            )
            gate_maps_oof[:, k] = recalibrate(gate_maps_oof[:, k], threshold.predicted)
            gate_maps_test[:, k] = recalibrate(
                gate_maps_test[:, k], threshold.final_model.predict_proba(test_features)
            )
            per_class[name]["threshold"] = threshold.metrics()
        log.info(
            "class %s: gate OOF AUC %.4f; blender scores %s",
            name,
            gate.auc,
            blender.scores.to_dict(),
        )

    gate_dirs, pixel_dirs = candidate_dirs["stack_gate"], candidate_dirs["stack_pixel"]
    summaries = {
        "stack_gate": write_candidate(
            *gate_dirs,
            Prediction(gate_columns(inputs.base_oof.ids, gate_oof), gate_maps_oof),
            Prediction(gate_columns(inputs.base_test.ids, gate_test), gate_maps_test),
            inputs.folds,
            inputs.truths,
            inputs.classes,
            {PROVENANCE_KEY: block},
        ),
        "stack_pixel": write_candidate(
            *pixel_dirs,
            Prediction(_without_gate(inputs.base_oof.ids), blend_oof),
            Prediction(_without_gate(inputs.base_test.ids), blend_test),
            inputs.folds,
            inputs.truths,
            inputs.classes,
            {PROVENANCE_KEY: block},
        ),
    }
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


def _without_gate(ids: pd.DataFrame) -> pd.DataFrame:
    return ids.drop(columns=[c for c in ids.columns if c.startswith("nonempty_prob_")])


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    from segflow.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
