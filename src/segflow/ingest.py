"""Ingest: list, decode and validate every train/test item into one manifest.

Every image is decoded exactly once here — which is what validates it — and the same pass
records what later stages need without decoding again: size, channels, bit depth, md5 of the
file bytes and of the decoded pixels (for dedup), and the mask's md5 and coverage (for dedup's
conflict check and the folds' stratification).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.dedup import perceptual_hash
from segflow.errors import SegflowError
from segflow.imageio import (
    DICOM_EXTENSIONS,
    RASTER_EXTENSIONS,
    DicomWindow,
    decode_image,
    image_kind,
    is_gray,
    mask_md5,
    pixel_md5,
    read_mask,
)
from segflow.options import option
from segflow.parallel import chunked, parallel_map
from segflow.rle import RLE_ORDERS, rle_decode, rle_encode

log = logging.getLogger(__name__)

MASK_SOURCES = ("folder", "rle_csv")
METADATA_PREFIX = "meta_"
_SCAN_CHUNK = 64


@dataclass(frozen=True)
class IngestOptions:
    """Where the data is and how to read it (config section ``data``)."""

    train_images: str | None = option(None, "folder of training images")
    test_images: str | None = option(None, "folder of unlabelled test images (optional)")
    mask_source: str = option("folder", "where train masks come from", MASK_SOURCES)
    train_masks: str | None = option(None, "folder of mask images matched by file stem")
    mask_suffix: str = option("", "suffix after the image stem in mask file names, e.g. '_mask'")
    rle_csv: str | None = option(None, "CSV of run-length-encoded masks (mask_source rle_csv)")
    rle_id_column: str = option("id", "id column of the RLE CSV")
    rle_column: str = option("rle_mask", "RLE column of the RLE CSV")
    rle_order: str = option("column", "pixel numbering of the RLE", RLE_ORDERS)
    rle_start: int = option(1, "index of the first pixel in the RLE (Kaggle: 1)")
    metadata_csv: str | None = option(None, "CSV of per-id metadata joined to the manifest")
    metadata_id_column: str = option("id", "id column of the metadata CSV")
    dicom_window_center: float = option(40.0, "DICOM window centre in Hounsfield units")
    dicom_window_width: float = option(400.0, "DICOM window width in Hounsfield units")
    max_pixels: int = option(100_000_000, "refuse images with more pixels (decompression bombs)")


@dataclass(frozen=True)
class _ScanTask:
    item_id: str
    split: str
    image_path: str
    mask_path: str | None
    rles: tuple[tuple[str, str], ...] | None  # (rle, where-it-came-from) per CSV row
    rle_order: str
    rle_start: int
    dicom_window: DicomWindow
    max_pixels: int


def _item_id(path: Path) -> str:
    """The item id of an image file: its name without a known image extension.

    A DICOM file recognised by its magic bytes keeps its whole name: files named by their SOP
    Instance UID ("1.2.840.113619.2.55.3.1234") have no extension, only dots.
    """
    suffix = path.suffix.lower()
    if suffix in RASTER_EXTENSIONS or suffix in DICOM_EXTENSIONS:
        return path.stem
    return path.name


def _csv_line_numbers(path: Path, n_rows: int) -> list[int]:
    """Line number in the file of each data row pandas parsed (blank lines are skipped by pandas,
    so ``row index + 2`` would point at the wrong line after one)."""
    fallback = list(range(2, n_rows + 2))
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except Exception:
        return fallback
    blank = (raw.apply(lambda column: column.str.strip()) == "").all(axis=1).to_numpy()
    lines = (np.flatnonzero(~blank) + 2).tolist()
    return lines if len(lines) == n_rows else fallback


def list_images(folder: str | Path, role: str) -> tuple[dict[str, Path], list[str]]:
    """Map item id (file stem) -> path for the images in ``folder``; also return skipped entries.

    Raises:
        SegflowError: missing folder, no images, or two files sharing a stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegflowError(f"{role} folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    skipped: list[str] = []
    # Resolve the folder once; its entries are then absolute without a resolve() per file.
    for path in sorted(folder.resolve().iterdir()):
        if path.name.startswith(".") or not path.is_file() or image_kind(path) is None:
            skipped.append(path.name)
            continue
        item_id = _item_id(path)
        if item_id in found:
            raise SegflowError(
                f"duplicate id {item_id!r} in {folder}: {found[item_id].name} and {path.name}"
            )
        found[item_id] = path
    if skipped:
        log.warning(
            "%s: skipped %d entries that are not image files (e.g. %s)",
            folder,
            len(skipped),
            ", ".join(skipped[:5]),
        )
    if not found:
        raise SegflowError(f"{role} folder {folder} contains no images")
    return found, skipped


def _read_rle_csv(options: IngestOptions) -> dict[str, list[tuple[str, str]]]:
    """id -> [(rle, 'file row N'), ...]; several rows per id are unioned later."""
    path = Path(options.rle_csv or "")
    if not options.rle_csv or not path.is_file():
        raise SegflowError(f"RLE CSV {options.rle_csv!r} does not exist (data.rle_csv)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SegflowError(f"{path}: cannot parse CSV ({error})") from None
    # Blank lines are kept while reading and dropped here, so each row knows its line number.
    lines = np.arange(len(frame)) + 2  # line 1 is the header
    blank = (frame.apply(lambda column: column.str.strip()) == "").all(axis=1).to_numpy()
    frame, lines = frame[~blank], lines[~blank].tolist()
    for column in (options.rle_id_column, options.rle_column):
        if column not in frame.columns:
            raise SegflowError(
                f"{path}: no column {column!r} (columns: {', '.join(frame.columns)}); "
                "set data.rle_id_column / data.rle_column"
            )
    rles: dict[str, list[tuple[str, str]]] = {}
    ids = frame[options.rle_id_column].tolist()
    for line, item_id, rle in zip(lines, ids, frame[options.rle_column].tolist(), strict=True):
        where = f"{path} row {line} (id {item_id!r})"  # row = line in the file, header is 1
        if not item_id.strip():
            raise SegflowError(f"{where}: empty id")
        rles.setdefault(item_id, []).append((rle, where))
    return rles


def _read_metadata(options: IngestOptions) -> pd.DataFrame:
    path = Path(options.metadata_csv or "")
    if not path.is_file():
        raise SegflowError(
            f"metadata CSV {options.metadata_csv!r} does not exist (data.metadata_csv)"
        )
    try:
        frame = pd.read_csv(path, dtype={options.metadata_id_column: str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SegflowError(f"{path}: cannot parse CSV ({error})") from None
    id_column = options.metadata_id_column
    if id_column not in frame.columns:
        raise SegflowError(f"{path}: no column {id_column!r} (set data.metadata_id_column)")
    duplicated = frame[id_column].duplicated()
    if duplicated.any():
        row = int(duplicated.to_numpy().argmax())
        line = _csv_line_numbers(path, len(frame))[row]
        raise SegflowError(f"{path} row {line}: duplicate id {frame[id_column].iloc[row]!r}")
    renamed = {column: METADATA_PREFIX + column for column in frame.columns if column != id_column}
    return frame.rename(columns={id_column: "id", **renamed})


def _scan_chunk(tasks: list[_ScanTask]) -> list[dict[str, Any]]:
    return [_scan_item(task) for task in tasks]


def _scan_item(task: _ScanTask) -> dict[str, Any]:
    image = decode_image(task.image_path, task.dicom_window, task.max_pixels)
    height, width = image.pixels.shape[:2]
    gray = is_gray(image.pixels)
    row: dict[str, Any] = {
        "id": task.item_id,
        "split": task.split,
        "image_path": task.image_path,
        "image_format": image.image_format,
        "file_bytes": image.file_bytes,
        "height": height,
        "width": width,
        "channels": image.stored_channels,
        "bit_depth": image.bit_depth,
        "is_gray": gray,
        "md5_bytes": image.md5_bytes,
        "md5_pixels": pixel_md5(image.pixels, gray),
        # Hashed here, on pixels already decoded, so dedup's near-duplicate search never decodes.
        "phash": f"{perceptual_hash(image.pixels):016x}",
        "mask_path": task.mask_path,
        "mask_rle": None,
        "mask_md5": None,
        "mask_coverage": float("nan"),
    }
    if task.split != "train":
        return row
    if task.mask_path is not None:
        mask = read_mask(task.mask_path, task.max_pixels)
        if mask.shape != (height, width):
            raise SegflowError(
                f"{task.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{task.image_path} is {width}x{height}"
            )
    else:
        mask = np.zeros((height, width), dtype=np.uint8)
        for rle, where in task.rles or ():  # several rows per id: union of their masks
            mask |= rle_decode(rle, (height, width), task.rle_order, task.rle_start, where=where)
        # Canonical form (column-major, 1-based, one union string) whatever the input's convention.
        row["mask_rle"] = rle_encode(mask)
    row["mask_md5"] = mask_md5(mask)
    row["mask_coverage"] = float(mask.mean())
    return row


def _build_tasks(options: IngestOptions) -> tuple[list[_ScanTask], dict[str, Any]]:
    if not options.train_images:
        raise SegflowError("data.train_images is not set")
    if options.mask_source not in MASK_SOURCES:
        raise SegflowError(
            f"unknown data.mask_source {options.mask_source!r}; valid: {', '.join(MASK_SOURCES)}"
        )
    if options.rle_order not in RLE_ORDERS:
        raise SegflowError(
            f"unknown data.rle_order {options.rle_order!r}; valid: {', '.join(RLE_ORDERS)}"
        )
    window = DicomWindow(options.dicom_window_center, options.dicom_window_width)
    train, train_skipped = list_images(options.train_images, "train image")
    test: dict[str, Path] = {}
    test_skipped: list[str] = []
    if options.test_images:
        test, test_skipped = list_images(options.test_images, "test image")
    clash = sorted(set(train) & set(test))
    if clash:
        raise SegflowError(
            f"ids {', '.join(map(repr, clash[:5]))} appear in both train and test image folders"
        )

    mask_paths: dict[str, str] = {}
    rles: dict[str, list[tuple[str, str]]] = {}
    if options.mask_source == "folder":
        if not options.train_masks:
            raise SegflowError("data.train_masks is not set (needed for mask_source: folder)")
        masks, _ = list_images(options.train_masks, "train mask")
        by_image_id = {
            stem[: len(stem) - len(options.mask_suffix)] if options.mask_suffix else stem: path
            for stem, path in masks.items()
            if stem.endswith(options.mask_suffix)
        }
        for item_id in train:
            if item_id not in by_image_id:
                raise SegflowError(
                    f"train image {train[item_id]} has no mask "
                    f"{Path(options.train_masks) / (item_id + options.mask_suffix)}.*"
                )
            mask_paths[item_id] = str(by_image_id[item_id])
        orphans = sorted(set(by_image_id) - set(train))
        if orphans:
            raise SegflowError(
                f"mask {by_image_id[orphans[0]]} has no train image "
                f"({len(orphans)} masks without images)"
            )
    else:
        rles = _read_rle_csv(options)
        missing = [item_id for item_id in train if item_id not in rles]
        if missing:
            raise SegflowError(
                f"train image {train[missing[0]]} has no row in {options.rle_csv} "
                f"({len(missing)} images without masks)"
            )
        orphans = sorted(set(rles) - set(train))
        if orphans:
            raise SegflowError(
                f"{rles[orphans[0]][0][1]}: no train image with this id in {options.train_images} "
                f"({len(orphans)} ids without images)"
            )

    tasks = [
        _ScanTask(
            item_id,
            split,
            str(path),
            mask_paths.get(item_id) if split == "train" else None,
            tuple(rles[item_id]) if split == "train" and rles else None,
            options.rle_order,
            options.rle_start,
            window,
            options.max_pixels,
        )
        for split, items in (("train", train), ("test", test))
        for item_id, path in sorted(items.items())
    ]
    skipped = {"train": train_skipped, "test": test_skipped}
    return tasks, skipped


def ingest(options: IngestOptions, workers: int = 1) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Build the manifest of every train and test item.

    Args:
        options: data locations and formats.
        workers: processes for decoding.

    Returns:
        (manifest, summary): one row per item (columns: id, split, image_path, image_format,
        file_bytes, height, width, channels, bit_depth, is_gray, md5_bytes, md5_pixels, phash,
        mask_path, mask_rle, mask_md5, mask_coverage, then ``meta_*`` metadata columns), and a
        JSON-ready summary.

    Raises:
        SegflowError: any unreadable, missing, mismatched or duplicated input, naming it.
    """
    tasks, skipped = _build_tasks(options)
    chunks = chunked(tasks, _SCAN_CHUNK)
    rows = [
        row
        for chunk_rows in parallel_map(
            _scan_chunk, chunks, workers, desc="ingest", unit="img", weights=map(len, chunks)
        )
        for row in chunk_rows
    ]
    manifest = pd.DataFrame(rows)
    missing_metadata = 0
    if options.metadata_csv:
        metadata = _read_metadata(options)
        manifest = manifest.merge(metadata, on="id", how="left", validate="one_to_one")
        meta_columns = [column for column in manifest.columns if column.startswith(METADATA_PREFIX)]
        missing_metadata = (
            int(manifest[meta_columns].isna().all(axis=1).sum()) if meta_columns else 0
        )
        if missing_metadata:
            log.warning("%d items have no row in %s", missing_metadata, options.metadata_csv)
    return manifest, _summarise(manifest, skipped, missing_metadata)


def _summarise(
    manifest: pd.DataFrame, skipped: dict[str, list[str]], missing_metadata: int
) -> dict[str, Any]:
    train = manifest[manifest["split"] == "train"]
    summary: dict[str, Any] = {
        "n_items": len(manifest),
        "n_train": len(train),
        "n_test": int((manifest["split"] == "test").sum()),
        "n_train_empty_masks": int((train["mask_coverage"] == 0).sum()),
        "sizes": {
            f"{w}x{h}": int(n) for (h, w), n in manifest.groupby(["height", "width"]).size().items()
        },
        "channels": {str(k): int(v) for k, v in manifest["channels"].value_counts().items()},
        "bit_depths": {str(k): int(v) for k, v in manifest["bit_depth"].value_counts().items()},
        "formats": {str(k): int(v) for k, v in manifest["image_format"].value_counts().items()},
        "all_gray": bool(manifest["is_gray"].all()),
        "skipped_files": {
            split: {"count": len(names), "examples": names[:20]} for split, names in skipped.items()
        },
        "items_without_metadata": missing_metadata,
    }
    return summary
