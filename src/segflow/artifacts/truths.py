"""Ground truth at the original resolution, read from ingest's manifest and dedup's items.

The training labels the model learnt (a duplicate group resolved by the ``union`` policy
contributes the union of its members' masks), for preprocess, OOF scoring, post-processing,
blending, stacking and the report (the OOF stages read them through truth-masks' array,
:mod:`segflow.artifacts.truth_masks`). Masks are packed labels (bit k = class k; binary: uint8
{0, 1}; :mod:`segflow.formats.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.formats.labels import (
    class_names,
    label_dtype,
    manifest_classes,
    manifest_orientation,
    read_label,
)
from segflow.formats.manifest import data_roots, resolve_manifest_path


class MaskSource(NamedTuple):
    """One manifest item's mask columns (see :func:`segflow.formats.labels.read_label`)."""

    mask_path: str | None
    mask_rle: str | None
    where: str = "manifest item"  # names the item in error messages (its image path)
    orientation: int = 1  # the DICOM turn of its image (manifest slice_orientation)


def load_mask(
    sources: tuple[MaskSource, ...], shape: tuple[int, int], n_classes: int = 1
) -> np.ndarray:
    """The union (per class: bitwise OR) of manifest masks at the original resolution.

    Args:
        sources: the manifest mask columns to union (see :func:`mask_sources`).
        shape: (height, width) of the image.
        n_classes: classes of the manifest (1 for binary masks).

    Returns:
        The packed label mask (bit k = class k); binary: uint8 {0, 1}.

    Shape:
        output: (H, W).
    """
    label = np.zeros(shape, dtype=label_dtype(n_classes))
    for source in sources:
        label |= read_label(
            source.mask_path,
            source.mask_rle,
            shape,
            n_classes,
            source.where,
            orientation=source.orientation,
        )
    return label


def mask_sources(manifest: pd.DataFrame, items: pd.DataFrame) -> dict[str, tuple[MaskSource, ...]]:
    """id -> masks to union: its own, or every train member's for the 'union' policy (the
    packed labels are OR-ed, so the union is per class). Mask files are resolved and checked
    to lie in the manifest's data roots (:func:`segflow.formats.manifest.resolve_manifest_path`).

    Raises:
        SegflowError: a mask path leads outside the data roots ingest recorded.
    """
    by_id = manifest.set_index("id")
    roots = data_roots(manifest)
    n_classes = len(class_names(manifest_classes(manifest)))
    own = {
        item_id: (
            MaskSource(
                resolve_manifest_path(row.mask_path, "mask_path", item_id, roots, n_classes),
                row.mask_rle,
                row.image_path,
                manifest_orientation(row),
            ),
        )
        for item_id, row in by_id.loc[items.loc[items["split"] == "train", "id"]].iterrows()
    }
    train = items[items["split"] == "train"]
    group_members = train.groupby("exact_group")["id"].agg(list)
    sources = {}
    for row in train[train["use_for_training"]].itertuples():
        if row.train_action == "union":
            sources[row.id] = tuple(
                s for member in group_members[row.exact_group] for s in own[member]
            )
        else:
            sources[row.id] = own[row.id]
    return sources


def original_truths(
    manifest: pd.DataFrame,
    dedup_items: pd.DataFrame,
    ids: Sequence[str],
    n_classes: int = 1,
    sources: dict[str, tuple[MaskSource, ...]] | None = None,
) -> np.ndarray:
    """Training labels of ``ids`` at the original resolution, as the model was trained on them
    (the union mask for members of a group resolved by the ``union`` policy).

    Args:
        sources: :func:`mask_sources` of the manifest, when the caller reads labels in chunks
            (it resolves and checks every mask path, so build it once).

    Returns:
        Packed label masks: bit k is class k (binary: {0, 1}); see :mod:`segflow.formats.labels`.

    Shape:
        output: (len(ids), H, W); all images must share one size.
    """
    if sources is None:
        sources = mask_sources(manifest, dedup_items)
    sizes = manifest.set_index("id").loc[list(ids), ["height", "width"]]
    if len(sizes.drop_duplicates()) > 1:
        raise SegflowError("OOF scoring needs one original image size; these images differ")
    shape = (int(sizes["height"].iloc[0]), int(sizes["width"].iloc[0]))
    return np.stack([load_mask(sources[item_id], shape, n_classes) for item_id in ids])


def instance_truths(
    truths: np.ndarray,
    ids: Sequence[str],
    object_rles: dict[str, list[str]] | None = None,
    rle_order: str = "column",
    rle_start: int = 1,
) -> list[np.ndarray]:
    """The true objects of each image as a label image, for the instance metric.

    Objects are the rows of an RLE CSV that lists one row per object (DSB 2018), so that
    touching objects stay apart; an image without rows there (or every image, without
    ``object_rles``) has the 8-connected components of its binary truth as objects.

    Args:
        truths: binary true masks, row-aligned with ``ids``.
        ids: the images' ids.
        object_rles: id -> the RLE strings of its objects (:func:`object_rles_of`), or None.
        rle_order, rle_start: the RLE convention of ``object_rles``.

    Returns:
        int32 label images: 0 background, objects 1..K (a pixel of two rows goes to the later).

    Shape:
        truths: (N, H, W); output: N arrays of (H, W).
    """
    import cv2

    from segflow.formats.rle import rle_decode

    labels = []
    for item_id, truth in zip(ids, np.asarray(truths), strict=True):
        rles = (object_rles or {}).get(item_id)
        if not rles:
            _, components = cv2.connectedComponents(
                (truth != 0).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
            )
            labels.append(components)
            continue
        label = np.zeros(truth.shape, dtype=np.int32)
        for index, rle in enumerate(rles, start=1):
            label[rle_decode(rle, truth.shape, order=rle_order, start=rle_start) != 0] = index  # type: ignore[arg-type]
        labels.append(label)
    return labels


def object_rles_of(
    rle_csv: str,
    id_column: str,
    rle_column: str,
    manifest: pd.DataFrame,
    dedup_items: pd.DataFrame,
) -> dict[str, list[str]]:
    """Train id -> the RLE rows of its objects in an RLE CSV with one row per object; a member
    of a duplicate group resolved by the ``union`` policy gets every member's rows (its truth
    is their union). Ids are matched as ingest matched them (stems, or the image file names
    when the manifest records the CSV's ids as file names).

    Raises:
        SegflowError: the CSV cannot be read or lacks a column.
    """
    from pathlib import Path

    from segflow.formats.manifest import csv_id_style
    from segflow.formats.rle import is_empty_rle

    try:
        frame = pd.read_csv(rle_csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SegflowError(f"{rle_csv}: cannot read the RLE CSV ({error})") from None
    for column in (id_column, rle_column):
        if column not in frame.columns:
            raise SegflowError(f"{rle_csv}: no column {column!r} (data.rle_id_column/rle_column)")
    by_csv_id: dict[str, list[str]] = {}
    for csv_id, rle in zip(frame[id_column], frame[rle_column], strict=True):
        if not is_empty_rle(rle):
            by_csv_id.setdefault(csv_id.strip(), []).append(rle)
    if csv_id_style(manifest) == "filename":
        names = {row.id: Path(str(row.image_path)).name for row in manifest.itertuples()}
    else:
        names = {item_id: item_id for item_id in manifest["id"]}
    own = {item_id: by_csv_id.get(name, []) for item_id, name in names.items()}
    train = dedup_items[dedup_items["split"] == "train"]
    members = train.groupby("exact_group")["id"].agg(list)
    rows = {}
    for row in train.itertuples():
        if getattr(row, "train_action", None) == "union":
            rows[row.id] = [rle for member in members[row.exact_group] for rle in own[member]]
        else:
            rows[row.id] = own.get(row.id, [])
    return rows
