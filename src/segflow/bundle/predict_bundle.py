"""``segflow predict-bundle``: run an export bundle (:mod:`segflow.bundle.export`) on a
folder of images and write the submission CSV, with no results folder, no Snakemake and no
network.

Every step is the pipeline's own function, applied to a stream of images a batch at a time:
decoding and preprocessing of each image (:func:`segflow.data.preprocess.prepare_image`), each
model's prediction with TTA and tiling (:func:`segflow.model.inference.predict.predict_rows`)
back at the original resolution, the fold merge
(:func:`segflow.artifacts.predictions.merge_fold_predictions`), the ensemble's blend
(:func:`segflow.ensemble.weights.blend_predictions`), the tuned post-processing and the RLE rows
(:func:`segflow.model.submit.fold_masks`, :func:`segflow.model.submit.submission_frame`). The
intermediate predictions pass through the same float16 and CSV forms as the pipeline's files
(:func:`segflow.artifacts.predictions.as_stored`), so on the same images and device the CSV is
the pipeline's ``submission.csv`` byte for byte.

A stacked candidate (``stack_gate``, ``stack_pixel``) runs the bundled second-level models on
each batch with :func:`segflow.ensemble.stacking.apply_stack.apply_stack_models`, the
pipeline's apply-stack: its features come from the experiments' fold-merged predictions, the
preprocessed images and (the gate, when it was fitted with them) the ``meta_*`` metadata
columns, which ``--metadata`` gives (the CSV the pipeline ingested as ``data.metadata_csv``).

Leak copy for exact train duplicates: a test image whose pixels are identical to a train
image's (dedup's exact-duplicate groups, by pixel hash) gets that train label, as the
pipeline's submit does (``submission.copy_train_labels``).

Images are read, predicted and written a batch at a time (memory bounded by the batch), the
CSV is written to a temporary file and renamed at the end: on any error nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.predictions import (
    Prediction,
    as_stored,
    merge_fold_predictions,
    nonempty_column,
)
from segflow.artifacts.resolution import pad_offsets
from segflow.bundle.archive import LEAKS, Bundle, split_states
from segflow.core.atomic import atomic_path
from segflow.core.errors import SegflowError
from segflow.core.stage_args import stage_log
from segflow.formats.imageio import DicomWindow, decode_image, is_gray, pixel_md5
from segflow.formats.labels import label_dtype
from segflow.formats.rle import rle_decode
from segflow.model.inference.predict import PredictOptions


class LoadedModel:
    """One bundled model, rebuilt and ready: the module, its normalisation and divisor."""

    def __init__(self, bundle: Bundle, entry: dict[str, Any], device: Any) -> None:
        from segflow.model.models import rebuild_model, required_divisor

        where = f"bundle {bundle.path}: {entry['path']}"
        states = split_states(bundle.weights(entry["path"]), int(entry.get("snapshots", 0)))
        self.model = rebuild_model(entry["spec"], states, bool(entry.get("snapshots")), where)
        self.model = self.model.to(device).eval()
        stats = bundle.config["preprocess"]
        self.mean = entry["meta"].get("mean", stats["train_mean"])
        self.std = entry["meta"].get("std", stats["train_std"])
        self.divisor = required_divisor(self.model)


class BundlePredictor:
    """A bundle's models on a device, predicting batches of images into submission rows."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        batch_size: int | None = None,
        metadata: pd.DataFrame | None = None,
        stack_folder: Path | None = None,
    ) -> None:
        """Rebuild the bundle's models.

        Args:
            bundle: the opened bundle.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            batch_size: images per batch (None: the bundle's).
            metadata: per-id metadata (:func:`segflow.data.ingest.read_metadata`), read by a
                stacked gate fitted with ``meta_*`` columns; None: none given.
            stack_folder: an empty folder the stacked candidate's models are extracted into
                (required for a stacked bundle).

        Raises:
            SegflowError: a stacked gate that reads metadata columns ``metadata`` lacks.
        """
        import dataclasses

        from segflow.core.devices import resolve_device
        from segflow.data.preprocess import Geometry, PreprocessOptions
        from segflow.model.postprocess import params_from_summary, watershed_from_summary
        from segflow.model.submit import SubmissionOptions

        config = bundle.config
        self.bundle = bundle
        self.device = resolve_device(device)
        prep = config["preprocess"]
        self.geometry = Geometry(prep["height"], prep["width"], prep["channels"], prep["dtype"])
        self.preprocess = PreprocessOptions(**prep["options"])
        if self.preprocess.context_slices:
            # A bundle predicts image by image; a 2.5D input needs the slice's whole series.
            raise SegflowError(
                f"{bundle.path}: a 2.5D bundle (preprocess.context_slices = "
                f"{self.preprocess.context_slices}) cannot predict file by file; predict its test "
                "series with the workflow instead"
            )
        self.window = DicomWindow(**prep["dicom_window"])
        self.source_channels = set(prep["source_channels"])
        self.gray_only = bool(prep["gray_only"])
        predict = PredictOptions(**config["predict"])
        if batch_size is not None:
            if batch_size < 1:
                raise SegflowError(f"--batch-size must be >= 1, got {batch_size}")
            predict = dataclasses.replace(predict, batch_size=batch_size)
        self.options = predict
        self.classes = [str(c) for c in config["classes"]]
        self.multilabel = bool(config["multilabel"])
        self.submission = SubmissionOptions(**config["submission"])
        self.params = params_from_summary(config["postprocess"], self.classes)
        self.watershed = watershed_from_summary(config["postprocess"], self.classes)
        self.candidate = config["candidate"]["name"]
        self.ensemble_mode = str(config["candidate"].get("mode", "mean"))
        self.experiments = [
            (
                str(e["name"]),
                float(e["weight"]),
                [LoadedModel(bundle, entry, self.device) for entry in e["models"]],
            )
            for e in config["experiments"]
        ]
        self.leaks = bundle.json(LEAKS) if self.submission.copy_train_labels else {}
        self.hash_prefix = int(config["leaks"]["hash_prefix"])
        self.stack = None
        self.metadata = None
        if "stack" in config:
            self.stack, self.metadata = self._load_stack(config["stack"], metadata, stack_folder)

    def _load_stack(
        self, stack: dict[str, Any], metadata: pd.DataFrame | None, folder: Path | None
    ) -> tuple[Any, pd.DataFrame | None]:
        """The stacked candidate's models and the metadata columns its features read.

        Raises:
            SegflowError: metadata columns needed and not given (or missing from the CSV).
        """
        from segflow.bundle.archive import STACK_MEMBERS
        from segflow.ensemble.stacking.apply_stack import load_stack_models

        if folder is None:
            raise SegflowError(f"bundle {self.bundle.path}: a stacked bundle needs a folder")
        models = load_stack_models(
            self.bundle.extract(STACK_MEMBERS, folder),
            str(stack["stacker"]),
            str(stack["backend"]),
            bool(stack["threshold_target"]),
            len(self.classes),
            {
                "blob_sigmas": tuple(float(s) for s in stack["blobs"]["blob_sigmas"]),
                "blob_threshold": float(stack["blobs"]["blob_threshold"]),
            }
            if stack.get("blobs")
            else None,
        )
        needed = [str(column) for column in stack["meta_columns"]]
        if not needed:
            return models, None
        if metadata is None:
            raise SegflowError(
                f"bundle {self.bundle.path}: the {self.candidate} model reads the metadata "
                f"columns {', '.join(needed)}; give --metadata CSV (data.metadata_csv)"
            )
        missing = [column for column in needed if column not in metadata.columns]
        if missing:
            raise SegflowError(
                f"--metadata: no column {missing[0].removeprefix('meta_')!r}, which the "
                f"{self.candidate} model reads"
            )
        return models, metadata.set_index("id")[needed]

    @property
    def batch_size(self) -> int:
        """Images per batch (the bundle's ``predict.batch_size`` unless overridden)."""
        return self.options.batch_size

    def read_image(self, path: Path) -> tuple[np.ndarray, np.ndarray, str, int]:
        """(decoded pixels, preprocessed (h, w, C) image, pixel hash prefix, DICOM turn) of one
        file; the turn is the EXIF code a DICOM slice was turned by into the canonical
        orientation (``data.dicom_orientation``; 1 otherwise), which the submission undoes.

        Raises:
            SegflowError: an unreadable image, or one with a channel count the models were not
                trained on.
        """
        from segflow.data.preprocess import prepare_image

        image = decode_image(path, self.window)
        gray = is_gray(image.pixels)
        if image.stored_channels not in self.source_channels or (self.gray_only and not gray):
            kind = "colour" if not gray else f"{image.stored_channels}-channel"
            trained = "/".join(str(c) for c in sorted(self.source_channels))
            raise SegflowError(
                f"{path}: a {kind} image; the models were trained on "
                f"{'gray ' if self.gray_only else ''}{trained}-channel images"
            )
        prepared = prepare_image(image.pixels, self.geometry, self.preprocess, str(path))
        turn = image.orientation if image.image_format == "dicom" else 1
        return image.pixels, prepared, pixel_md5(image.pixels, gray)[: self.hash_prefix], turn

    def known_label(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The packed train label of an image whose pixel hash is ``key``, or None."""
        record = self.leaks.get(key)
        if record is None or (record["height"], record["width"]) != shape:
            return None
        rle = self.bundle.config["leaks"]["rle"]
        label = np.zeros(shape, dtype=label_dtype(len(self.classes)))
        for k, text in enumerate(record["rle"]):
            plane = rle_decode(text, shape, order=rle["order"], start=rle["start"])
            label |= plane.astype(label.dtype) << label.dtype.type(k)
        return label

    def _model_prediction(
        self, model: LoadedModel, images: np.ndarray, ids: pd.DataFrame, offsets: list[Any]
    ) -> Prediction:
        """One model's prediction of a batch, as predict-test stores it."""
        from segflow.model.inference.predict import (
            predict_rows,
            restore_resolution,
            stack_original,
        )

        probs, nonempty = predict_rows(
            model.model,
            images,
            np.arange(len(images)),
            model.mean,
            model.std,
            self.options,
            self.device,
            model.divisor,
        )
        sizes = list(zip(ids["orig_height"], ids["orig_width"], strict=True))
        restored = stack_original(restore_resolution(probs, sizes, offsets), "test predictions")
        table = ids.copy()
        if nonempty is not None:
            for k in range(nonempty.shape[1]):
                table[nonempty_column(k)] = nonempty[:, k]
        return as_stored(Prediction(table, restored))

    def _stacked(
        self,
        per_experiment: list[list[Prediction]],
        images: np.ndarray,
        ids: pd.DataFrame,
        offsets: list[Any],
    ) -> Prediction:
        """The stacked candidate's prediction of a batch, as apply-stack stores it."""
        from segflow.artifacts.resolution import image_to_original
        from segflow.ensemble.stacking.apply_stack import apply_stack_models
        from segflow.ensemble.stacking.rows import metadata_for

        names = [name for name, _, _ in self.experiments]
        merged = [
            merge_fold_predictions(folds, self.options.fold_merge) for folds in per_experiment
        ]
        base = None
        if self.stack.stacker == "gate":
            # apply-stack reads the stored ensemble back, "merged" as one fold.
            base = merge_fold_predictions([as_stored(self._ensemble(merged))], "mean")
        if any(offset is not None for offset in offsets):  # padded: back to the maps' pixels
            sizes = zip(ids["orig_height"], ids["orig_width"], strict=True)
            images = np.stack(
                [
                    image_to_original(image, size, offset)
                    for image, size, offset in zip(images, sizes, offsets, strict=True)
                ]
            )
        metadata = None
        if self.metadata is not None:
            table = self.metadata.reindex(ids["id"]).rename_axis("id").reset_index()
            metadata = metadata_for(table, ids["id"])
        prediction, _ = apply_stack_models(self.stack, names, merged, base, images, metadata)
        return as_stored(prediction)

    def _ensemble(self, merged: Sequence[Prediction]) -> Prediction:
        """The experiments' fold-merged predictions as apply-blend combines them: the
        weighted mean, or the majority vote under ``ensemble.mode: vote``."""
        from segflow.ensemble.weights import blend_predictions, vote_predictions

        if self.ensemble_mode == "vote":
            return vote_predictions(merged, len(self.classes))
        weights = [weight for _, weight, _ in self.experiments]
        return blend_predictions(merged, weights, len(self.classes))

    def predict_batch(self, paths: Sequence[tuple[str, Path]]) -> pd.DataFrame:
        """Submission rows of a batch of (id, path), in id order."""
        from segflow.model.submit import fold_masks, submission_frame

        originals, prepared, keys, turns = [], [], [], {}
        for item_id, path in paths:
            pixels, image, key, turns[item_id] = self.read_image(path)
            originals.append(pixels.shape[:2])
            prepared.append(image)
            keys.append(key)
        ids = pd.DataFrame(
            {
                "id": [item_id for item_id, _ in paths],
                "orig_height": [int(h) for h, _ in originals],
                "orig_width": [int(w) for _, w in originals],
            }
        )
        target = (self.geometry.height, self.geometry.width)
        pad = self.preprocess.resize_mode == "pad"
        offsets = [
            pad_offsets(size, target, str(path)) if pad else None
            for size, (_, path) in zip(originals, paths, strict=True)
        ]
        images = np.stack(prepared)
        per_experiment = [
            [self._model_prediction(model, images, ids, offsets) for model in models]
            for _, _, models in self.experiments
        ]
        if self.candidate == "ensemble":
            merged = [
                merge_fold_predictions(folds, self.options.fold_merge) for folds in per_experiment
            ]
            blended = self._ensemble(merged)
            # submit "merges" the ensemble's one stored prediction with predict.fold_merge too.
            folds = [as_stored(blended)]
        elif self.stack is not None:
            folds = [self._stacked(per_experiment, images, ids, offsets)]
        else:
            folds = per_experiment[0]
        masks = fold_masks(folds, self.options.fold_merge, self.params)
        known = {}
        for (item_id, _), key, shape in zip(paths, keys, originals, strict=True):
            label = self.known_label(key, tuple(shape))
            if label is not None:
                known[item_id] = label
        item_ids = [item_id for item_id, _ in paths]
        predictions = dict(zip(item_ids, masks if self.multilabel else masks[:, 0], strict=True))
        names = (
            {item_id: path.name for item_id, path in paths}
            if self.submission.id_style == "filename"
            else None
        )
        return submission_frame(
            predictions,
            self.submission,
            known,
            self.classes if self.multilabel else None,
            names,
            watershed=self.watershed,
            orientations=turns,
        )


@contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A progress callback ``update(n)``: tqdm's bar on a terminal, else (no tqdm, or a log
    file / notebook cell) a ``done/total`` line on stderr about every tenth of the images."""
    tqdm = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
    if tqdm is not None:
        with tqdm(total=total, desc="predict-bundle", unit="img", mininterval=1.0) as bar:
            yield bar.update
        return
    done, every, shown = 0, max(1, total // 10), 0

    def update(n: int) -> None:
        nonlocal done, shown
        done += n
        if done - shown >= every or done == total:
            shown = done
            print(f"predict-bundle: {done}/{total} images", file=sys.stderr, flush=True)

    yield update


def predict_bundle(
    bundle_path: str | Path,
    images_dir: str | Path,
    out: str | Path,
    device: str = "auto",
    batch_size: int | None = None,
    metadata: str | Path | None = None,
    metadata_id_column: str = "id",
) -> int:
    """Predict every image of ``images_dir`` with the bundle; write the submission CSV.

    Args:
        bundle_path: the zip of ``segflow export``.
        images_dir: a folder of images (ids: file names without extension, as ingest names them).
        out: the submission CSV (written atomically at the end).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per batch (default: the bundle's ``predict.batch_size``; the same
            batches as the pipeline's give its probabilities to the bit).
        metadata: the per-id metadata CSV a stacked gate's ``meta_*`` features read (the
            pipeline's ``data.metadata_csv``); ignored by bundles that read none.
        metadata_id_column: its id column.

    Returns:
        The number of images predicted.

    Raises:
        SegflowError: a bad bundle (:class:`segflow.bundle.archive.Bundle`), no images, an
            image the models cannot take, or metadata a stacked gate needs and lacks.
    """
    import tempfile

    from segflow.data.ingest import list_images, read_metadata

    bundle = Bundle(bundle_path)
    found, _ = list_images(images_dir, "test image")
    table = None if metadata is None else read_metadata(metadata, metadata_id_column)
    with tempfile.TemporaryDirectory(prefix="segflow-bundle-") as folder:
        predictor = BundlePredictor(bundle, device, batch_size, table, Path(folder))
        return _write_submission(predictor, sorted(found.items()), out)


def _write_submission(
    predictor: BundlePredictor, items: list[tuple[str, Path]], out: str | Path
) -> int:
    """Predict ``items`` (id, path) a batch at a time into the CSV ``out`` (atomically)."""
    step = predictor.batch_size
    with (
        atomic_path(out) as tmp,
        open(tmp, "w", encoding="utf-8", newline="") as handle,
        _progress(len(items)) as update,
    ):
        for start in range(0, len(items), step):
            batch = items[start : start + step]
            predictor.predict_batch(batch).to_csv(handle, header=start == 0, index=False)
            update(len(batch))
    return len(items)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow predict-bundle``'s flags."""
    parser.add_argument("bundle", help="the zip written by segflow export")
    parser.add_argument("images", help="folder of images to predict")
    parser.add_argument("out", help="submission CSV to write")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default: the bundle's predict.batch_size)",
    )
    parser.add_argument(
        "--metadata",
        default=None,
        help="per-id metadata CSV (the pipeline's data.metadata_csv): a stacked gate fitted "
        "with meta_* columns reads it",
    )
    parser.add_argument("--metadata-id-column", default="id", help="id column of the metadata CSV")


def run(args: argparse.Namespace) -> None:
    """``segflow predict-bundle``: write the submission CSV of a folder of images."""
    count = predict_bundle(
        args.bundle,
        args.images,
        args.out,
        args.device,
        args.batch_size,
        args.metadata,
        args.metadata_id_column,
    )
    stage_log.info("predict-bundle: %d images -> %s", count, args.out)
