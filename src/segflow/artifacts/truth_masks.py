"""The training labels at the original resolution as one array (truth-masks -> OOF stages).

truth-masks writes, once per run, ``truths/masks.npy`` (N, H, W) packed labels (bit k = class
k; binary: uint8 {0, 1}) of every used train item, the union mask for a group resolved by the
``union`` policy (:func:`segflow.artifacts.truths.original_truths`), and ``truths/ids.csv``
(one ``id`` per row, sorted). evaluate-oof, tune-postprocess and blend read the rows of their
OOF images here instead of decoding PNG or RLE masks through the manifest and dedup's items,
so their code fingerprints leave the mask decoding out. This module is the array's only writer
and reader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.atomic import write_csv, write_npy
from segflow.core.errors import SegflowError

MASKS_FILE = "masks.npy"
IDS_FILE = "ids.csv"


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
    folder = Path(truths_dir)
    if folder.name == MASKS_FILE:
        folder = folder.parent
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
    folder = Path(truths_dir)
    if folder.name == MASKS_FILE:
        folder = folder.parent
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
