"""The training labels at the original resolution: decoded from ingest's manifest and dedup's
items, and stored once as truth-masks' array, which the OOF stages read.

The labels the model learnt (a duplicate group resolved by the ``union`` policy contributes
the union of its members' masks), for preprocess, OOF scoring, post-processing, blending,
stacking and the report. Masks are packed labels (bit k = class k; binary: uint8 {0, 1};
:mod:`segflow.formats.labels`).

Decoded from the manifest (:func:`original_truths`): the PNG or RLE masks it names, read
through :func:`segflow.formats.labels.read_label`.

Stored once (truth-masks' array): truth-masks writes, once per run, ``truths/masks.npy``
(N, H, W) packed labels of every used train item (:func:`write_truth_masks`) and
``truths/ids.csv`` (one ``id`` per row, sorted). evaluate-oof, tune-postprocess and blend read
the rows of their OOF images there (:func:`read_truth_masks`) instead of decoding PNG or RLE
masks through the manifest and dedup's items, so their code fingerprints leave the mask
decoding out. This module is the array's only writer and reader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from segflow.artifacts.tables import csv_id_style, data_roots, resolve_manifest_path
from segflow.core.atomic import write_csv, write_npy
from segflow.core.errors import SegflowError
from segflow.formats.labels import (
    class_names,
    label_dtype,
    manifest_classes,
    manifest_orientation,
    read_label,
)

# truth-masks' array and its ids, in its folder.
MASKS_FILE = "masks.npy"
IDS_FILE = "ids.csv"


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
    to lie in the manifest's data roots (:func:`segflow.artifacts.tables.resolve_manifest_path`).

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


def write_truth_masks(
    out_dir: str | os.PathLike[str],
    ids: Sequence[str],
    masks: np.ndarray,
    series: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``masks.npy`` and ``ids.csv`` into ``out_dir`` (atomically per file).

    Args:
        out_dir: truth-masks' folder.
        ids: the items' ids, one per row of ``masks``.
        masks: packed label masks at the original resolution.
        series: each item's DICOM series uid (a ``series_uid`` column of ``ids.csv``), or None.

    Returns:
        (the masks file, the ids file).

    Raises:
        SegflowError: not one id per row, or a repeated id.

    Shape:
        masks: (len(ids), H, W).
    """
    ids = [str(item_id) for item_id in ids]
    if np.ndim(masks) != 3 or len(masks) != len(ids):
        raise SegflowError(
            f"truth masks: {len(ids)} ids for masks of shape {np.shape(masks)} (want (N, H, W))"
        )
    if len(set(ids)) != len(ids):
        raise SegflowError("truth masks: an id is repeated")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_npy(out / MASKS_FILE, np.asarray(masks))
    table = pd.DataFrame({"id": ids})
    if series is not None:
        if len(series) != len(ids):
            raise SegflowError(f"truth masks: {len(series)} series uids for {len(ids)} ids")
        table["series_uid"] = [str(uid) for uid in series]
    write_csv(out / IDS_FILE, table)
    return out / MASKS_FILE, out / IDS_FILE


def read_truth_series(truths_dir: str | os.PathLike[str], ids: Sequence[str]) -> list[str] | None:
    """The DICOM series uid of each of ``ids``, in that order, or None when truth-masks wrote
    none (not series data).

    Raises:
        SegflowError: ``ids.csv`` unreadable, or an id it does not list.
    """
    folder = _truths_folder(truths_dir)
    try:
        table = pd.read_csv(folder / IDS_FILE, dtype=str, keep_default_na=False)
    except Exception as error:
        raise SegflowError(f"{folder / IDS_FILE}: unreadable ({error})") from None
    if "series_uid" not in table.columns:
        return None
    uid_of = dict(zip(table["id"], table["series_uid"], strict=True))
    wanted = [str(item_id) for item_id in ids]
    missing = [item_id for item_id in wanted if item_id not in uid_of]
    if missing:
        raise SegflowError(f"{folder / IDS_FILE}: no row for id {missing[0]!r}")
    return [uid_of[item_id] for item_id in wanted]


def read_truth_masks(truths_dir: str | os.PathLike[str], ids: Sequence[str]) -> np.ndarray:
    """The packed label masks of ``ids``, in that order, from truth-masks' folder.

    Args:
        truths_dir: the folder of ``masks.npy`` and ``ids.csv`` (or its ``masks.npy``).
        ids: the items to read (e.g. an OOF folder's ids).

    Returns:
        Packed label masks (bit k = class k), as truth-masks wrote them.

    Raises:
        SegflowError: a file missing or unreadable, the two files disagreeing, or an id that
            is not a used train item.

    Shape:
        output: (len(ids), H, W).
    """
    folder = _truths_folder(truths_dir)
    masks_path, ids_path = folder / MASKS_FILE, folder / IDS_FILE
    for path in (masks_path, ids_path):
        if not path.is_file():
            raise SegflowError(f"{path} does not exist (run truth-masks first)")
    try:
        masks = np.load(masks_path, mmap_mode="r")
        stored = pd.read_csv(ids_path, dtype={"id": str}, keep_default_na=False)["id"]
    except Exception as error:
        raise SegflowError(f"{folder}: unreadable truth masks ({error})") from None
    if masks.ndim != 3 or len(masks) != len(stored):
        raise SegflowError(
            f"{folder}: {len(stored)} ids for masks of shape {masks.shape} (rerun truth-masks)"
        )
    row_of = pd.Series(np.arange(len(stored)), index=stored.to_numpy())
    wanted = [str(item_id) for item_id in ids]
    missing = [item_id for item_id in wanted if item_id not in row_of.index]
    if missing:
        raise SegflowError(
            f"{ids_path}: no truth mask for id {missing[0]!r} ({len(missing)} missing; "
            "not a used train item?)"
        )
    return np.asarray(masks[row_of.loc[wanted].to_numpy(dtype=np.int64)])


def class_truths(packed: np.ndarray, k: int) -> np.ndarray:
    """Class ``k``'s plane of packed label masks (bit k), as bool.

    Shape:
        packed: (N, H, W); output: (N, H, W).
    """
    return (np.asarray(packed) >> k) & 1 != 0


def _truths_folder(truths_dir: str | os.PathLike[str]) -> Path:
    """truth-masks' folder, given it or its ``masks.npy``."""
    folder = Path(truths_dir)
    return folder.parent if folder.name == MASKS_FILE else folder
