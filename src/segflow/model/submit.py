"""Submission: Kaggle CSV of RLE masks, with labels of test images that duplicate train images.

The RLE uses the same convention as the competition's input (column-major, 1-indexed by
default), and every written string is decoded back and compared with its mask before the
file is written, so a submission can never silently disagree with the predictions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import (
    Prediction,
    merge_folds,
    nonempty_probs,
    read_prediction,
)
from segflow.artifacts.tables import csv_id_style, data_roots, read_table, resolve_manifest_path
from segflow.core.atomic import write_csv
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace, option
from segflow.core.stage_args import add_fold_merge, add_stats, stage_log
from segflow.formats.imageio import undo_orientation
from segflow.formats.labels import (
    ORIENTATION_COLUMN,
    label_dtype,
    manifest_orientation,
    read_label,
    unpack_labels,
)
from segflow.formats.rle import RLE_ORDERS, rle_decode, rle_encode

if TYPE_CHECKING:
    from segflow.model.postprocess import PostprocessParams, WatershedParams

ID_STYLES = ("auto", "stem", "filename")


@dataclass(frozen=True)
class SubmissionOptions:
    """Format of the submission file (config section ``submission``)."""

    id_column: str = option("id", "id column name in the submission CSV")
    rle_column: str = option("rle_mask", "RLE column name in the submission CSV")
    rle_order: str = option("column", "pixel numbering of the RLE", RLE_ORDERS)
    rle_start: int = option(1, "index of the first pixel (Kaggle: 1)")
    copy_train_labels: bool = option(
        True, "give test images that dedup found identical to a train image that train label"
    )
    empty_rle: str = option("", "what an empty mask is written as ('' for TGS, '-1' for SIIM)")
    instances: bool = option(
        False, "one RLE row per object (connected component), as DSB-style competitions score"
    )
    split_touching: bool = option(
        False, "with instances: split touching objects by a watershed on the distance transform"
    )
    class_column: str = option(
        "class", "class column name in the submission CSV (multi-label data: one row per class)"
    )
    id_style: str = option(
        "auto",
        "how ids are written: stem (file name without extension), filename (with it, as "
        "Severstal and Airbus), auto: as the train RLE CSV wrote them (else stem)",
        ID_STYLES,
    )


def instance_masks(
    mask: np.ndarray, split_touching: bool = False, watershed: WatershedParams | None = None
) -> list[np.ndarray]:
    """Split a binary mask into one uint8 mask per object (8-connected, optionally watershed).

    Args:
        mask: the binary mask.
        split_touching: split touching objects (:func:`segflow.model.postprocess.label_instances`).
        watershed: the watershed's parameters (tuned, from ``params.json``); None: the defaults.

    Returns:
        One mask per object, in label order.

    Shape:
        mask: (H, W); output: K masks of (H, W).
    """
    from segflow.model.postprocess import WatershedParams, label_instances

    params = WatershedParams() if watershed is None else watershed
    labels = label_instances(
        mask, split_touching, min_distance=params.min_distance, compactness=params.compactness
    )
    return [(labels == label).astype(np.uint8) for label in range(1, int(labels.max()) + 1)]


def train_label(manifest: pd.DataFrame, train_ids: Iterable[str], n_classes: int = 1) -> np.ndarray:
    """The union (per class) of the original-resolution labels of ``train_ids`` (one id: its
    own label).

    Args:
        manifest: the ingest manifest.
        train_ids: train items whose labels are unioned.
        n_classes: classes of the manifest (1 for binary masks).

    Returns:
        The packed label mask (bit k = class k, see :mod:`segflow.formats.labels`); binary: {0, 1}.

    Shape:
        output: (H, W), dtype :func:`segflow.formats.labels.label_dtype` (binary: uint8).

    Raises:
        SegflowError: a mask path leads outside the data roots ingest recorded
            (:func:`segflow.artifacts.tables.resolve_manifest_path`), or an unreadable mask.
    """
    rows = manifest.set_index("id").loc[list(train_ids)]
    shape = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
    roots = data_roots(manifest)
    label = np.zeros(shape, dtype=label_dtype(n_classes))
    for row in rows.itertuples():
        mask_path = resolve_manifest_path(row.mask_path, "mask_path", row.Index, roots, n_classes)
        label |= read_label(
            mask_path,
            row.mask_rle,
            shape,
            n_classes,
            row.image_path,
            orientation=manifest_orientation(row),
        )
    return label


def known_test_labels(
    manifest: pd.DataFrame, dedup_items: pd.DataFrame, n_classes: int = 1
) -> dict[str, np.ndarray]:
    """Test id -> train label for test images identical to usable train images.

    Members of a duplicate group whose masks agree share one mask; a group resolved by the
    ``union`` policy gives the union, matching what the model was trained on.

    Args:
        manifest: the train manifest.
        dedup_items: a table with test rows' ``leak_train_ids`` (``segflow leaks``' output).

    Returns:
        Packed label masks (bit k = class k; binary: {0, 1}), see :mod:`segflow.formats.labels`.
    """
    leaks = dedup_items[dedup_items["split"].eq("test") & dedup_items["leak_train_ids"].notna()]
    return {
        row.id: train_label(manifest, str(row.leak_train_ids).split(";"), n_classes)
        for row in leaks.itertuples()
    }


def written_ids(
    manifest: pd.DataFrame,
    ids: Iterable[str],
    id_style: str = "auto",
    test_manifest: pd.DataFrame | None = None,
) -> dict[str, str]:
    """Each id as the submission writes it: the id (file stem), or its image's file name.

    Args:
        manifest: the ingest manifest (its image paths give the file names, its attributes
            the train RLE CSV's id style, :func:`segflow.artifacts.tables.csv_id_style`).
        ids: the ids to write.
        id_style: ``stem``, ``filename``, or ``auto``: as the train RLE CSV wrote its ids.
        test_manifest: the test manifest, whose image paths name the ids (None: ``manifest``
            holds them).

    Returns:
        id -> the id to write.

    Raises:
        SegflowError: an unknown style, or an id the manifest does not have.
    """
    if id_style not in ID_STYLES:
        raise SegflowError(
            f"unknown submission.id_style {id_style!r}; valid: {', '.join(ID_STYLES)}"
        )
    ids = list(ids)
    style = csv_id_style(manifest) if id_style == "auto" else id_style
    if style == "stem":
        return {item_id: item_id for item_id in ids}
    paths = (manifest if test_manifest is None else test_manifest).set_index("id")["image_path"]
    missing = [item_id for item_id in ids if item_id not in paths.index]
    if missing:
        raise SegflowError(f"id {missing[0]!r} is not in the manifest; rerun the workflow")
    # Only the name is used: no file is opened, so the path needs no check here.
    return {item_id: Path(str(paths[item_id])).name for item_id in ids}


def stored_orientations(test_manifest: pd.DataFrame) -> dict[str, int] | None:
    """Test id -> the EXIF code (1-8) ingest turned its DICOM slice by
    (``data.dicom_orientation``), or None for a manifest without the column.

    The predictions are in the canonical orientation; :func:`submission_frame` turns each one
    back onto its file's stored grid, the grid the competition's RLE numbers.
    """
    if ORIENTATION_COLUMN not in test_manifest.columns:
        return None
    return {str(row.id): manifest_orientation(row) for row in test_manifest.itertuples()}


def submission_frame(
    masks: Mapping[str, np.ndarray | list[np.ndarray]],
    options: SubmissionOptions,
    known_labels: Mapping[str, np.ndarray] | None = None,
    classes: Sequence[str] | None = None,
    id_names: Mapping[str, str] | None = None,
    watershed: Sequence[WatershedParams] | None = None,
    orientations: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Build the submission table: one row per id, or per (id, class) with classes, or per
    object with ``options.instances``.

    Args:
        masks: test id -> prediction at the original resolution: a binary (H, W) mask, a list
            of instance masks (binary data, already split; an empty list gives one empty row),
            or with ``classes`` one (K, H, W) stack of class masks.
        options: column names, RLE convention, instance mode.
        known_labels: test id -> packed train label that replaces the prediction
            (``copy_train_labels``); bit k is class k.
        classes: class names for multi-label data (adds ``options.class_column``); None for
            binary data.
        id_names: id -> the id written in the file (:func:`written_ids`); None writes the ids.
        watershed: per class, the tuned watershed of ``options.split_touching``
            (:func:`segflow.model.postprocess.watershed_from_summary`); None: the defaults.
        orientations: id -> the EXIF code its DICOM slice was turned by into the canonical
            orientation (:func:`stored_orientations`); the mask (prediction or copied train
            label, both canonical) is turned back onto the file's stored grid before it is
            encoded. None (or an id without one): written as given.

    Returns:
        DataFrame with the configured columns, sorted by id, then class (instance rows in
        label order).

    Raises:
        SegflowError: an RLE string that does not decode back to its mask (a bug, not bad input).
    """
    if options.rle_order not in RLE_ORDERS:
        raise SegflowError(f"unknown submission.rle_order {options.rle_order!r}")
    names = list(classes) if classes is not None else [None]
    rows: list[tuple[str, ...]] = []
    for item_id in sorted(masks):
        prediction = masks[item_id]
        if options.copy_train_labels and known_labels and item_id in known_labels:
            prediction = unpack_labels(known_labels[item_id], len(names))
            if classes is None:
                prediction = prediction[0]
        per_class = prediction if classes is not None else [prediction]
        turn = orientations.get(item_id, 1) if orientations else 1
        written = id_names[item_id] if id_names is not None else item_id
        if len(per_class) != len(names):
            raise SegflowError(
                f"prediction of {item_id} has {len(per_class)} classes, not {len(names)}"
            )
        for k, (name, class_prediction) in enumerate(zip(names, per_class, strict=True)):
            key = (written,) if name is None else (written, name)
            if isinstance(class_prediction, list):
                instances = [undo_orientation(mask, turn) for mask in class_prediction]
            elif options.instances:
                stored = undo_orientation(class_prediction, turn)
                instances = instance_masks(
                    stored,
                    options.split_touching,
                    None if watershed is None else watershed[k],
                )
            else:
                instances = [undo_orientation(class_prediction, turn)]
            if not instances:
                rows.append((*key, options.empty_rle))
            for mask in instances:
                rows.append((*key, _checked_rle(item_id, mask, options)))
    columns = [options.id_column, options.rle_column]
    if classes is not None:
        columns.insert(1, options.class_column)
    return pd.DataFrame(rows, columns=columns)


def _checked_rle(item_id: str, mask: np.ndarray, options: SubmissionOptions) -> str:
    rle = rle_encode(mask, order=options.rle_order, start=options.rle_start)  # type: ignore[arg-type]
    decoded = rle_decode(rle, mask.shape, order=options.rle_order, start=options.rle_start)  # type: ignore[arg-type]
    if not np.array_equal(decoded, mask != 0):
        raise SegflowError(f"submission RLE of {item_id} does not decode back to its mask")
    return rle if rle else options.empty_rle


def fold_masks(
    folds: Sequence[Prediction], fold_merge: str, params: Sequence[PostprocessParams]
) -> np.ndarray:
    """The submitted masks of row-aligned test predictions (a candidate's fold models', or a
    second-level candidate's one): probabilities merged (:func:`merge_folds`), aux-head gates
    averaged when every fold has them, then each class's tuned post-processing.

    Shape:
        output: (N, K, H, W) uint8 {0, 1}.

    Raises:
        SegflowError: the predictions' ids are not in the same order.
    """
    from segflow.model.postprocess import apply_classes

    fold_ids = [fold.ids for fold in folds]
    if any(not ids["id"].equals(fold_ids[0]["id"]) for ids in fold_ids):
        raise SegflowError("test predictions of the folds are not in the same id order")
    probs = merge_folds([fold.probs for fold in folds], fold_merge)
    gates = [nonempty_probs(ids, len(params)) for ids in fold_ids]
    nonempty = None if any(g is None for g in gates) else np.mean(gates, axis=0)
    return apply_classes(probs, params, nonempty)


def write_submission(path: str | Path, frame: pd.DataFrame) -> None:
    """Write the submission CSV atomically."""
    write_csv(path, frame)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow submit``'s flags."""
    add_dataclass_arguments(parser, SubmissionOptions)
    parser.add_argument("--fold-dirs", nargs="+", required=True, help="predict-test outputs")
    add_fold_merge(parser)
    parser.add_argument("--postprocess", required=True, help="params.json from tune-postprocess")
    add_stats(parser)
    parser.add_argument("--manifest", required=True, help="train manifest Parquet (ingest)")
    parser.add_argument("--test-manifest", required=True, help="test manifest Parquet (ingest)")
    parser.add_argument(
        "--leaks", required=True, help="test items' train copies Parquet (segflow leaks)"
    )
    parser.add_argument("--out", required=True, help="submission CSV to write")


def run(args: argparse.Namespace) -> None:
    """``segflow submit``: merge the folds' test predictions, post-process, write the CSV."""
    from segflow.model.postprocess import params_from_summary, watershed_from_summary

    classes, multilabel = read_classes(args.stats)
    options = dataclass_from_namespace(SubmissionOptions, args)
    folds = [read_prediction(d, mmap=False) for d in args.fold_dirs]
    fold_ids = [fold.ids for fold in folds]
    summary = json.loads(Path(args.postprocess).read_text())
    params = params_from_summary(summary, classes)
    watershed = watershed_from_summary(summary, classes)
    masks = fold_masks(folds, args.fold_merge, params)
    manifest = read_table(args.manifest, "manifest")
    known = known_test_labels(manifest, read_table(args.leaks, "test leaks"), len(classes))
    # Binary data keeps the two-column format: one (H, W) mask per id, no class column.
    predictions = dict(zip(fold_ids[0]["id"], masks if multilabel else masks[:, 0], strict=True))
    # Stems or file names: the style of the train CSV, the names of the test images.
    test_manifest = read_table(args.test_manifest, "test manifest")
    id_names = written_ids(manifest, predictions, options.id_style, test_manifest)
    frame = submission_frame(
        predictions,
        options,
        known,
        classes if multilabel else None,
        id_names,
        watershed=watershed,
        orientations=stored_orientations(test_manifest),
    )
    write_submission(args.out, frame)
    copied = len(set(known) & set(fold_ids[0]["id"])) if options.copy_train_labels else 0
    stage_log.info(
        "submission %s: %d rows, %d labels copied from train duplicates",
        args.out,
        len(frame),
        copied,
    )
