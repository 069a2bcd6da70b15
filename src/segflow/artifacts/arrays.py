"""The preprocessed arrays (preprocess -> train, predict, stack, budget, select-pseudo, report).

One folder, written by two stages. The train side (preprocess): ``train_images.npy``
(N, H, W, C), ``train_masks.npy`` (N, H, W) packed labels, ``index.parquet`` (id, split, row,
original size) and ``stats.json`` (size, channels, dtype, per-channel train mean/std, class
names). The test side (preprocess-test): ``test_images.npy`` (M, H, W, C) and
``test_index.parquet``. This module is the only reader and writer of the indexes and
``stats.json``; a reader names the split it reads, so a train-side reader never opens a test
file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from segflow.core.atomic import write_json, write_parquet
from segflow.core.errors import SegflowError

STATS = "stats.json"
INDEX = "index.parquet"
TEST_INDEX = "test_index.parquet"
STATS_KEYS = ("height", "width", "channels", "dtype", "train_mean", "train_std")
INDEX_COLUMNS = ("id", "split", "row")
# The class list of binary data (segflow.formats.labels.BINARY_CLASSES, without its imports).
BINARY_CLASSES = ("mask",)


def images_file(split: str) -> str:
    """``train_images.npy`` or ``test_images.npy``."""
    return f"{split}_images.npy"


def masks_file() -> str:
    """The packed training label masks."""
    return "train_masks.npy"


def stats_path(arrays_dir: str | os.PathLike[str]) -> Path:
    """The ``stats.json`` of a preprocess output folder."""
    return Path(arrays_dir) / STATS


def read_stats(
    path: str | os.PathLike[str], *, required: tuple[str, ...] = (), hint: str = "preprocess"
) -> dict[str, Any]:
    """Read ``stats.json`` (a folder means its ``stats.json``).

    Args:
        path: the preprocess output folder or its ``stats.json``.
        required: keys that must be present (e.g. :data:`STATS_KEYS`).
        hint: the stage to run when it is missing.

    Returns:
        The stats mapping.

    Raises:
        SegflowError: missing, not JSON, or a required key missing.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":  # a (perhaps missing) folder
        path = path / STATS
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run {hint} first)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SegflowError(f"{path} is not valid JSON ({error})") from None
    missing = [key for key in required if key not in stats]
    if missing:
        raise SegflowError(f"{path}: missing key(s) {', '.join(missing)}")
    return stats


def classes_of(stats: dict[str, Any]) -> list[str]:
    """The class names in bit order (binary data: ``["mask"]``)."""
    return [str(name) for name in stats.get("classes", list(BINARY_CLASSES))]


def read_classes(path: str | os.PathLike[str]) -> tuple[list[str], bool]:
    """(class names in bit order, multi-label?) from ``stats.json`` (or its folder)."""
    stats = read_stats(path)
    return classes_of(stats), bool(stats.get("multilabel", False))


def image_size(stats: dict[str, Any]) -> tuple[int, int]:
    """The preprocessed (height, width)."""
    return int(stats["height"]), int(stats["width"])


def index_file(split: str) -> str:
    """``index.parquet`` (train, written with ``stats.json``) or ``test_index.parquet``."""
    if split not in ("train", "test"):
        raise KeyError(f"unknown split {split!r}; valid: train, test")
    return INDEX if split == "train" else TEST_INDEX


def read_index(
    arrays_dir: str | os.PathLike[str], *, check: bool = False, split: str = "train"
) -> pd.DataFrame:
    """Read the index of one split of a preprocess output folder.

    Args:
        arrays_dir: the preprocess output folder.
        check: also require the ``id``, ``split`` and ``row`` columns.
        split: ``train`` (``index.parquet``) or ``test`` (``test_index.parquet``).

    Returns:
        One row per preprocessed image of ``split``: id, split, row, original size.

    Raises:
        SegflowError: missing or unreadable, or (``check``) a column missing.
    """
    path = Path(arrays_dir) / index_file(split)
    if not path.is_file():
        stage = "preprocess" if split == "train" else "preprocess-test"
        raise SegflowError(f"{path} does not exist (run {stage} first)")
    try:
        index = pd.read_parquet(path)
    except Exception as error:
        raise SegflowError(f"{path} is not readable ({error})") from None
    index = index[index["split"] == split] if "split" in index.columns else index
    if check:
        for column in INDEX_COLUMNS:
            if column not in index.columns:
                raise SegflowError(f"{path}: missing column {column!r}")
    return index


def split_rows(index: pd.DataFrame, split: str, ids: pd.Series) -> Any:
    """The array rows of ``ids`` in ``split`` (``index`` from :func:`read_index` of it)."""
    return index[index["split"] == split].set_index("id").loc[ids, "row"].to_numpy()


def write_index(out_dir: str | os.PathLike[str], index: pd.DataFrame, split: str = "train") -> None:
    """Write the index of ``split`` (:func:`index_file`) atomically."""
    write_parquet(Path(out_dir) / index_file(split), index)


def write_stats(out_dir: str | os.PathLike[str], stats: dict[str, Any]) -> None:
    """Write ``stats.json`` atomically."""
    write_json(Path(out_dir) / STATS, stats)
