"""Ingest: list, decode and validate the train or the test items into a manifest.

The train and the test set are ingested by separate runs (``--split``), into separate
manifests: nothing the train side writes depends on the test images, so new test images never
retrain. The test run reads the train manifest only to refuse ids that appear in both.

Every image is decoded exactly once here — which is what validates it — and the same pass
records what later stages need without decoding again: size, channels, bit depth, md5 of the
file bytes and of the decoded pixels (for dedup), and the mask's md5 and coverage (for dedup's
conflict check and the folds' stratification).

With ``classes`` set, masks are multi-label (see :mod:`segflow.formats.labels`): one mask folder per
class, or a long-format RLE CSV with one row per (id, class); the manifest's mask columns then
hold one ``|``-separated part per class and the ``mask_classes`` column names the classes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from segflow.artifacts.tables import read_table, record_attributes
from segflow.core.atomic import write_json, write_parquet
from segflow.core.errors import SegflowError
from segflow.core.late_options import published_options
from segflow.core.options import (
    add_dataclass_arguments,
    dataclass_from_namespace,
    lists_to_tuples,
    option,
)
from segflow.core.parallel import chunked, parallel_map
from segflow.core.stage_args import add_workers, stage_log, stage_provenance, with_provenance
from segflow.formats.dicom_series import ORIENTATION_COLUMN, SERIES_COLUMNS, read_slice_geometry
from segflow.formats.imageio import (
    DICOM_EXTENSIONS,
    RASTER_EXTENSIONS,
    DicomWindow,
    apply_orientation,
    decode_image,
    image_kind,
    is_gray,
    perceptual_hash,
    pixel_md5,
)
from segflow.formats.labels import (
    CLASS_SEPARATOR,
    CLASSES_COLUMN,
    MAX_CLASSES,
    class_names,
    label_md5,
    pack_labels,
    read_label,
)
from segflow.formats.rle import RLE_ORDERS, rle_decode, rle_encode

log = logging.getLogger(__name__)

MASK_SOURCES = ("folder", "rle_csv")
METADATA_PREFIX = "meta_"
_SCAN_CHUNK = 64
# The CLI reads these alone as null, so a class of that name could silently turn binary.
_RESERVED_CLASS_NAMES = ("none", "null")
# In an id or class name these would make a path of it (class names become folder names).
_PATH_CHARACTERS = ("/", "\\", "\0")
SPLITS = ("train", "test")
# ``all``: both splits in one manifest (the library's default; the workflow ingests each side
# on its own, ``--split``).
SPLIT_CHOICES = (*SPLITS, "all")
# The manifest's columns in order (an empty test manifest keeps them); + mask_classes, meta_*.
MANIFEST_COLUMNS = (
    "id",
    "split",
    "image_path",
    "image_format",
    "file_bytes",
    "height",
    "width",
    "channels",
    "bit_depth",
    "is_gray",
    "md5_bytes",
    "md5_pixels",
    "phash",
    "mask_path",
    "mask_rle",
    "mask_md5",
    "mask_coverage",
)

# Per scanned item, the EXIF orientation its image was turned by (1: none).
_ORIENTATION_KEY = "_exif_orientation"

RleRow = tuple[str, str]  # (RLE string, where it came from: 'file row N (id ...)')


@dataclass(frozen=True)
class IngestOptions:
    """Where the data is and how to read it (config section ``data``)."""

    # Left out of provenance at their defaults (segflow.core.late_options.published_options).
    _omit_at_default: ClassVar[tuple[str, ...]] = ("dicom_series", "dicom_orientation")

    train_images: str | None = option(None, "folder of training images")
    test_images: str | None = option(None, "folder of unlabelled test images (optional)")
    mask_source: str = option("folder", "where train masks come from", MASK_SOURCES)
    train_masks: str | None = option(None, "folder of mask images matched by file stem")
    mask_suffix: str = option("", "suffix after the image stem in mask file names, e.g. '_mask'")
    rle_csv: str | None = option(None, "CSV of run-length-encoded masks (mask_source rle_csv)")
    rle_id_column: str = option(
        "id", "id column of the RLE CSV: image file names with or without extension (one style)"
    )
    rle_column: str = option("rle_mask", "RLE column of the RLE CSV")
    rle_order: str = option("column", "pixel numbering of the RLE", RLE_ORDERS)
    rle_start: int = option(1, "index of the first pixel in the RLE (Kaggle: 1)")
    classes: tuple[str, ...] | None = option(
        None,
        "class names of multi-label masks (bit k = class k); null = binary masks",
    )
    rle_class_column: str = option(
        "class", "class column of a long-format RLE CSV (one row per id and class; with classes)"
    )
    rle_missing_is_empty: bool = option(
        False, "a train image without any RLE CSV row has an empty mask instead of an error"
    )
    metadata_csv: str | None = option(None, "CSV of per-id metadata joined to the manifest")
    metadata_id_column: str = option("id", "id column of the metadata CSV")
    dicom_window_center: float = option(40.0, "DICOM window centre in Hounsfield units")
    dicom_window_width: float = option(400.0, "DICOM window width in Hounsfield units")
    dicom_series: bool = option(
        False,
        "the images are DICOM series slices: record each slice's SeriesInstanceUID and position "
        "along the slice normal (ImagePositionPatient) in the manifest; folds keep a series "
        "together and preprocess.context_slices can stack neighbours",
    )
    dicom_orientation: bool = option(
        False,
        "turn every DICOM slice by its ImageOrientationPatient into one canonical orientation "
        "(columns along the lower patient axis, both axes positive), masks with them",
    )
    max_pixels: int = option(100_000_000, "refuse images with more pixels (decompression bombs)")
    data_root: str | None = option(
        None,
        "folder every image and mask file must lie in once symlinks are resolved; null: the "
        "folder it is listed from",
    )

    def __post_init__(self) -> None:
        lists_to_tuples(self)

    @property
    def n_classes(self) -> int:
        """Bits of the label masks: one per class, one for binary masks."""
        return len(class_names(self.classes))


@dataclass(frozen=True)
class _ScanTask:
    item_id: str
    split: str
    image_path: str
    mask_path: str | None  # folder source: the mask file, or one '|'-joined path per class
    rles: tuple[tuple[RleRow, ...], ...]  # RLE source: per class, the CSV rows to union
    classes: tuple[str, ...] | None
    rle_order: str
    rle_start: int
    dicom_window: DicomWindow
    max_pixels: int
    dicom_series: bool = False

    @property
    def n_classes(self) -> int:
        return len(class_names(self.classes))


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


def _printable(name: str) -> str:
    """A file name as text that UTF-8 files can hold: undecodable bytes become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_inside(path: Path, root: Path, role: str) -> None:
    """Refuse a symlink whose target (all links resolved) lies outside ``root``.

    Raises:
        SegflowError: the link leaves the data root (a dataset's link to /etc/passwd or
            ~/.ssh would otherwise be read, hashed and recorded).
    """
    target = path.resolve()
    if not target.is_relative_to(root):
        raise SegflowError(
            f"{_printable(str(path))}: {role} is a symlink to {_printable(str(target))}, outside "
            f"the data root {root}; set data.data_root to a folder that holds the link targets"
        )


def list_images(
    folder: str | Path, role: str, allow_empty: bool = False, root: Path | None = None
) -> tuple[dict[str, Path], list[str]]:
    """Map item id (file stem) -> path for the images in ``folder``; also return skipped entries.

    Args:
        folder: the folder to list (not recursively).
        role: what the files are, for messages ("train image").
        allow_empty: a folder without images is fine (a class no image has), not an error.
        root: resolved folder that the folder and every symlink in it must resolve into;
            None: the folder itself.

    Returns:
        (id -> path, names of the skipped entries): hidden entries, folders, FIFOs, sockets,
        devices and files that are not images by extension or DICOM magic; the warning says
        which each is.

    Raises:
        SegflowError: missing folder, no images (unless allowed), two files sharing a stem, a
            file name that is not UTF-8, a folder or symlink resolving outside ``root``, or a
            broken (dangling) or looping symlink.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegflowError(f"{role} folder {folder} does not exist or is not a folder")
    # Resolve the folder once; its entries are then absolute without a resolve() per file, and
    # only an entry that is itself a symlink can lead elsewhere.
    resolved = folder.resolve()
    root = root or resolved
    if not resolved.is_relative_to(root):
        raise SegflowError(
            f"{role} folder {folder} resolves to {resolved}, outside data.data_root {root}"
        )
    found: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []  # (name, what it is)
    for path in sorted(resolved.iterdir()):
        if path.name.startswith("."):
            skipped.append((_printable(path.name), "hidden"))
            continue
        # A broken or looping link is checked before anything else: is_file() is False for
        # it, so it would be skipped as "not an image" and its item silently left out (an
        # un-fetched git-annex file is such a link).
        mode = _entry_mode(path, role)
        if not stat.S_ISREG(mode):  # a folder, FIFO, socket or device: never opened
            skipped.append((_printable(path.name), _kind_of_entry(mode)))
            continue
        if path.is_symlink():  # checked before image_kind, which may open the file
            _check_inside(path, root, role)
        if image_kind(path) is None:
            skipped.append((_printable(path.name), _NOT_AN_IMAGE))
            continue
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            # The id and path must go into UTF-8 Parquet and CSV files; a guessed re-encoding
            # would give ids that match neither the file nor a CSV row.
            raise SegflowError(
                f"{_printable(str(path))}: file name is not valid UTF-8; rename the file "
                "(e.g. convmv -f latin1 -t utf8)"
            ) from None
        item_id = _item_id(path)
        if item_id in found:
            raise SegflowError(
                f"duplicate id {item_id!r} in {folder}: {found[item_id].name} and {path.name}"
            )
        found[item_id] = path
    if skipped:
        log.warning(
            "%s: skipped %d entries (e.g. %s)",
            folder,
            len(skipped),
            ", ".join(f"{name} ({kind})" for name, kind in skipped[:5]),
        )
    if not found and not allow_empty:
        hint = (
            " (set data.test_images: null to run without a test set)"
            if role == "test image"
            else ""
        )
        raise SegflowError(f"{role} folder {folder} contains no images{hint}")
    return found, [name for name, _ in skipped]


_NOT_AN_IMAGE = "not an image file"
# What list_images skips besides files without an image extension, by file type.
_ENTRY_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _entry_mode(path: Path, role: str) -> int:
    """The file type bits of a folder entry, following symlinks.

    Raises:
        SegflowError: a symlink whose target is missing (a dangling link, e.g. git-annex
            content not fetched) or a symlink loop, naming the link.
    """
    try:
        return path.stat().st_mode
    except OSError as error:
        name = _printable(str(path))
        if error.errno == errno.ELOOP:
            raise SegflowError(
                f"{name}: {role} is a symlink loop (it links to {_printable(os.readlink(path))}, "
                "which leads back to it); fix or remove the link"
            ) from None
        if path.is_symlink() and error.errno == errno.ENOENT:
            raise SegflowError(
                f"{name}: {role} is a broken symlink (its target "
                f"{_printable(os.readlink(path))} does not exist; with git-annex: git annex "
                "get); fix or remove the link"
            ) from None
        raise SegflowError(f"{name}: cannot read {role} ({error.strerror or error})") from None


def _kind_of_entry(mode: int) -> str:
    """What a folder entry that is not a regular file is, for the skip warning."""
    return next((kind for test, kind in _ENTRY_KINDS if test(mode)), "not a regular file")


def _check_id_is_a_name(item_id: str, where: str) -> None:
    """Ids are file names or stems: one that is a path is refused before anything could build a
    file name from it (``../../etc/passwd``, ``/abs/path``, ``a/b``)."""
    if any(char in item_id for char in _PATH_CHARACTERS) or item_id.strip() in (".", ".."):
        raise SegflowError(
            f"{where}: the id is a path, not an image id (ids are image file names, with or "
            "without their extension; '/', '\\' and '..' are refused)"
        )


def _read_rle_csv(options: IngestOptions) -> dict[str, list[list[RleRow]]]:
    """id -> per class, [(rle, 'file row N'), ...]; several rows per (id, class) are unioned
    later. Binary data has one class; with ``classes`` each row names its class."""
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
    needed = [options.rle_id_column, options.rle_column]
    if options.classes:
        needed.append(options.rle_class_column)
    for column in needed:
        if column not in frame.columns:
            raise SegflowError(
                f"{path}: no column {column!r} (columns: {', '.join(frame.columns)}); "
                "set data.rle_id_column / data.rle_column / data.rle_class_column"
            )
    class_values = (
        frame[options.rle_class_column].tolist() if options.classes else [None] * len(frame)
    )
    class_index = {name: k for k, name in enumerate(options.classes or ())}
    rles: dict[str, list[list[RleRow]]] = {}
    ids = frame[options.rle_id_column].tolist()
    rows = zip(lines, ids, frame[options.rle_column].tolist(), class_values, strict=True)
    for line, item_id, rle, class_value in rows:
        where = f"{path} row {line} (id {item_id!r})"  # row = line in the file, header is 1
        if not item_id.strip():
            raise SegflowError(f"{where}: empty id")
        _check_id_is_a_name(item_id, where)
        k = 0 if class_value is None else _class_of_row(class_value, class_index, where, options)
        rles.setdefault(item_id, [[] for _ in range(options.n_classes)])[k].append((rle, where))
    return rles


def _class_of_row(
    value: str, class_index: dict[str, int], where: str, options: IngestOptions
) -> int:
    """The class index of a long-format CSV row; class values match the names as strings."""
    if value.strip() not in class_index:
        raise SegflowError(
            f"{where}: {options.rle_class_column} {value!r} is not one of data.classes "
            f"({', '.join(options.classes or ())})"
        )
    return class_index[value.strip()]


def _read_metadata(options: IngestOptions) -> pd.DataFrame:
    path = Path(options.metadata_csv or "")
    if not path.is_file():
        raise SegflowError(
            f"metadata CSV {options.metadata_csv!r} does not exist (data.metadata_csv)"
        )
    return read_metadata(path, options.metadata_id_column)


def read_metadata(path: str | os.PathLike[str], id_column: str = "id") -> pd.DataFrame:
    """A per-id metadata CSV as the manifest joins it: ``id`` and one ``meta_<column>`` per
    other column (the one reader: ingest's ``data.metadata_csv``, predict-bundle's
    ``--metadata``).

    Raises:
        SegflowError: missing, not a CSV, without ``id_column``, or with a duplicate id (the
            row named).
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"metadata CSV {str(path)!r} does not exist")
    try:
        frame = pd.read_csv(path, dtype={id_column: str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SegflowError(f"{path}: cannot parse CSV ({error})") from None
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
        _ORIENTATION_KEY: image.orientation,  # counted for the summary, not a manifest column
    }
    if task.classes:  # multi-label manifests only: binary ones keep their columns
        row[CLASSES_COLUMN] = CLASS_SEPARATOR.join(task.classes)
    # A DICOM slice's turn applies to its mask (drawn on the stored pixels); a raster mask
    # carries its own EXIF orientation instead.
    dicom_turn = image.orientation if image.image_format == "dicom" else 1
    if task.dicom_series:
        if image.image_format != "dicom":
            raise SegflowError(
                f"{task.image_path}: not a DICOM file, but data.dicom_series expects every "
                "image to be a DICOM slice"
            )
        geometry = read_slice_geometry(task.image_path)
        row["series_uid"] = geometry.series_uid
        row["slice_position"] = geometry.position
    if task.dicom_window.orientation:
        row[ORIENTATION_COLUMN] = dicom_turn
    if task.split != "train":
        return row
    if task.mask_path is not None:
        label = read_label(
            task.mask_path,
            None,
            (height, width),
            task.n_classes,
            task.image_path,
            max_pixels=task.max_pixels,
            orientation=dicom_turn,
        )
    else:
        # The CSV's runs number the stored pixels: decode them there, then turn (the manifest
        # keeps the turned mask's RLE, which no later reader turns again).
        stored = (width, height) if dicom_turn >= 5 else (height, width)
        planes = [
            apply_orientation(_union_of_rows(rows, stored, task), dicom_turn) for rows in task.rles
        ]
        # Canonical form (column-major, 1-based, one union string per class) whatever the
        # input's convention.
        row["mask_rle"] = CLASS_SEPARATOR.join(rle_encode(plane) for plane in planes)
        label = pack_labels(np.stack(planes))
    row["mask_md5"] = label_md5(label, task.n_classes)
    row["mask_coverage"] = float(np.count_nonzero(label) / label.size)  # pixels of any class
    return row


def _union_of_rows(rows: tuple[RleRow, ...], shape: tuple[int, int], task: _ScanTask) -> np.ndarray:
    """One class's mask: the union of its CSV rows (none: empty)."""
    mask = np.zeros(shape, dtype=np.uint8)
    for rle, where in rows:
        mask |= rle_decode(rle, shape, task.rle_order, task.rle_start, where=where)
    return mask


def count_images(folder: str | Path | None) -> int:
    """How many image files ``folder`` lists as :func:`list_images` would (0: no folder).

    Nothing is decoded or checked: the count of a folder whose files change but not their
    number stays the same (the time budget's plan uses it, see ``workflow/rules/budget.smk``).
    """
    if not folder or not Path(folder).is_dir():
        return 0
    return sum(
        1
        for path in Path(folder).iterdir()
        if not path.name.startswith(".") and path.is_file() and image_kind(path) is not None
    )


def _check_options(options: IngestOptions, split: str = "all") -> None:
    if split not in SPLIT_CHOICES:
        raise SegflowError(f"unknown ingest split {split!r}; valid: {', '.join(SPLIT_CHOICES)}")
    if split != "test" and not options.train_images:
        raise SegflowError("data.train_images is not set")
    if options.mask_source not in MASK_SOURCES:
        raise SegflowError(
            f"unknown data.mask_source {options.mask_source!r}; valid: {', '.join(MASK_SOURCES)}"
        )
    if options.rle_order not in RLE_ORDERS:
        raise SegflowError(
            f"unknown data.rle_order {options.rle_order!r}; valid: {', '.join(RLE_ORDERS)}"
        )
    if options.max_pixels < 0:
        raise SegflowError(
            f"data.max_pixels must be positive (0: no limit), got {options.max_pixels}"
        )
    _check_classes(options.classes)


def _check_classes(classes: Any) -> None:
    """Class names must be usable as CSV values, folder names and '|'-joined manifest parts."""
    if classes is None:
        return
    if isinstance(classes, str) or not all(isinstance(name, str) for name in classes):
        raise SegflowError(f"data.classes must be a list of class names, got {classes!r}")
    if not classes:
        raise SegflowError("data.classes is an empty list; use null for binary masks")
    if len(classes) > MAX_CLASSES:
        raise SegflowError(
            f"data.classes has {len(classes)} classes; at most {MAX_CLASSES} are supported"
        )
    for name in classes:
        if not name or name != name.strip():
            raise SegflowError(
                f"data.classes: class name {name!r} is empty or has surrounding spaces"
            )
        if CLASS_SEPARATOR in name:
            raise SegflowError(f"data.classes: class name {name!r} contains {CLASS_SEPARATOR!r}")
        # The folder source reads train_masks/<class>/: a path here would leave train_masks.
        if any(char in name for char in _PATH_CHARACTERS) or name in (".", ".."):
            raise SegflowError(
                f"data.classes: class name {name!r} is a path (contains '/', '\\' or is '..')"
            )
        if name.lower() in _RESERVED_CLASS_NAMES:
            raise SegflowError(
                f"data.classes: class name {name!r} is reserved (the CLI reads it as null)"
            )
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise SegflowError(f"data.classes names {repeated[0]!r} more than once")


def _masks_by_image_id(
    folder: Path, options: IngestOptions, role: str, allow_empty: bool, root: Path | None
) -> dict[str, Path]:
    """Image id -> mask file in ``folder`` (file stem minus ``mask_suffix``)."""
    masks, _ = list_images(folder, role, allow_empty=allow_empty, root=root)
    suffix = options.mask_suffix
    return {
        stem[: len(stem) - len(suffix)] if suffix else stem: path
        for stem, path in masks.items()
        if stem.endswith(suffix)
    }


def _check_no_orphan_masks(by_image_id: dict[str, Path], train: dict[str, Path]) -> None:
    orphans = sorted(set(by_image_id) - set(train))
    if orphans:
        raise SegflowError(
            f"mask {by_image_id[orphans[0]]} has no train image "
            f"({len(orphans)} masks without images)"
        )


def _binary_mask_paths(
    options: IngestOptions, train: dict[str, Path], root: Path | None
) -> dict[str, str]:
    """Every train image must have its mask file."""
    folder = Path(options.train_masks or "")
    by_image_id = _masks_by_image_id(folder, options, "train mask", allow_empty=False, root=root)
    for item_id in train:
        if item_id not in by_image_id:
            raise SegflowError(
                f"train image {train[item_id]} has no mask "
                f"{folder / (item_id + options.mask_suffix)}.*"
            )
    _check_no_orphan_masks(by_image_id, train)
    return {item_id: str(by_image_id[item_id]) for item_id in train}


def _class_mask_paths(
    options: IngestOptions, train: dict[str, Path], data_root: Path | None
) -> dict[str, str]:
    """'|'-joined per-class mask files (``train_masks/<class>/``); a missing file is an empty
    class, a missing class folder an error."""
    root = Path(options.train_masks or "")
    per_class = []
    for name in options.classes or ():
        folder = root / name
        if not folder.is_dir():
            raise SegflowError(
                f"class folder {folder} does not exist: mask_source folder with data.classes "
                f"expects one folder per class in {root} (missing class {name!r})"
            )
        role = f"train mask (class {name!r})"
        per_class.append(
            _masks_by_image_id(folder, options, role, allow_empty=True, root=data_root)
        )
        _check_no_orphan_masks(per_class[-1], train)
    joined = {
        item_id: CLASS_SEPARATOR.join(str(masks.get(item_id, "")) for masks in per_class)
        for item_id in train
    }
    if len(per_class) > 1:  # only then are the paths split on '|' when read back
        for masks in per_class:
            clash = next((path for path in masks.values() if CLASS_SEPARATOR in str(path)), None)
            if clash is not None:
                raise SegflowError(
                    f"{clash}: a mask path containing {CLASS_SEPARATOR!r} cannot be recorded "
                    "with several data.classes; rename the file or folder"
                )
    return joined


def _first_row(rows: list[list[RleRow]]) -> str:
    """Where one of an id's CSV rows is ('file row N (id ...)'): its first of the first class
    it has rows for."""
    return next(class_rows[0][1] for class_rows in rows if class_rows)


def _match_csv_ids(
    rles: dict[str, list[list[RleRow]]], train: dict[str, Path]
) -> tuple[dict[str, list[list[RleRow]]], str]:
    """Key the CSV's rows by train id: a CSV id is an image's stem, or its whole file name
    (Severstal and Airbus write ``0002cc93b.jpg``).

    Returns:
        (train id -> rows, for ids that match no image: the CSV id -> rows; the CSV's id style,
        ``filename`` or ``stem``).

    Raises:
        SegflowError: an id that is one image's stem and another's file name, or a CSV mixing
            both styles (``a`` and ``b.jpg``): which image a row means would be a guess.
    """
    by_name = {path.name: item_id for item_id, path in train.items()}
    matched: dict[str, list[list[RleRow]]] = {}
    first_of_style: dict[str, str] = {}  # style -> where its first row is
    for csv_id, rows in rles.items():
        named = by_name.get(csv_id)
        if csv_id in train and named is not None and named != csv_id:
            raise SegflowError(
                f"{_first_row(rows)}: ambiguous id: the stem of {train[csv_id].name} and the "
                f"file name of {train[named].name}; rename one of the images"
            )
        item_id = csv_id if csv_id in train else named
        # An extension-less file (a DICOM named by its UID) reads the same in both styles.
        if item_id is not None and train[item_id].name != item_id:
            style = "filename" if item_id != csv_id else "stem"
            first_of_style.setdefault(style, _first_row(rows))
        matched[item_id if item_id is not None else csv_id] = rows
    if len(first_of_style) > 1:
        raise SegflowError(
            f"{first_of_style['filename']}: the id is an image file name, but "
            f"{first_of_style['stem']} names an image without its extension; write every id "
            "in one style"
        )
    return matched, next(iter(first_of_style), "stem")


def _check_ids_without_spaces(rles: dict[str, list[list[RleRow]]], train: dict[str, Path]) -> None:
    """Refuse a CSV id that matches no image only because of surrounding whitespace
    (``"abc ,1 1"``): its image would be reported as having no row, the row not named.

    Raises:
        SegflowError: naming the CSV row, the id's repr and the image it would match.
    """
    names = {path.name: path for path in train.values()}
    for csv_id, rows in rles.items():
        if csv_id in train or csv_id == csv_id.strip():
            continue
        image = train.get(csv_id.strip()) or names.get(csv_id.strip())
        if image is not None:
            raise SegflowError(
                f"{_first_row(rows)}: the id has surrounding whitespace, so it matches no image "
                f"(without it, it is {image.name}); remove the spaces from the CSV"
            )


def _train_rle_rows(
    options: IngestOptions, train: dict[str, Path]
) -> tuple[dict[str, tuple[tuple[RleRow, ...], ...]], str]:
    """Train id -> per class, its RLE CSV rows; an id without rows has none (empty mask) when
    ``rle_missing_is_empty``, else it is an error. Also returns the CSV's id style
    (:func:`_match_csv_ids`)."""
    rles, id_style = _match_csv_ids(_read_rle_csv(options), train)
    _check_ids_without_spaces(rles, train)
    if id_style == "filename":
        log.info("%s: ids are image file names (with extension)", options.rle_csv)
    missing = [item_id for item_id in train if item_id not in rles]
    if missing and options.rle_missing_is_empty:
        log.info("%d train images have no row in %s: empty masks", len(missing), options.rle_csv)
    elif missing:
        raise SegflowError(
            f"train image {train[missing[0]]} has no row in {options.rle_csv} "
            f"({len(missing)} images without masks; set data.rle_missing_is_empty if the CSV "
            "lists non-empty masks only)"
        )
    orphans = sorted(set(rles) - set(train))
    if orphans:
        raise SegflowError(
            f"{_first_row(rles[orphans[0]])}: no train image with this id in "
            f"{options.train_images} ({len(orphans)} ids without images)"
        )
    no_rows: tuple[tuple[RleRow, ...], ...] = ((),) * options.n_classes
    rows = {
        item_id: tuple(map(tuple, rles[item_id])) if item_id in rles else no_rows
        for item_id in train
    }
    return rows, id_style


def _data_root(options: IngestOptions) -> Path | None:
    """The resolved ``data_root``; None when unset (each folder is then its own root)."""
    if not options.data_root:
        return None
    root = Path(options.data_root)
    if not root.is_dir():
        raise SegflowError(f"data.data_root {root} does not exist or is not a folder")
    return root.resolve()


def _recorded_roots(options: IngestOptions, root: Path | None, split: str) -> list[Path]:
    """The roots :func:`list_images` checked the files against: ``data_root``, or else each
    folder listed for ``split`` (resolved), for later stages to check the manifest's paths
    against."""
    if root is not None:
        return [root]
    if split == "test":
        return [Path(options.test_images).resolve()] if options.test_images else []
    folders = [options.train_images] + ([options.test_images] if split == "all" else [])
    if options.mask_source == "folder":
        masks = Path(options.train_masks or "")
        folders += [str(masks / name) for name in options.classes or ()] or [str(masks)]
    return [Path(folder).resolve() for folder in folders if folder]


def _build_tasks(
    options: IngestOptions, split: str = "all", train_ids: frozenset[str] = frozenset()
) -> tuple[list[_ScanTask], dict[str, Any], list[Path], str | None]:
    """The scan tasks of ``split``, its skipped entries, the roots the paths were checked
    against and the RLE CSV's id style (None without a CSV). ``train_ids``: the train
    manifest's ids, which no test id may repeat."""
    _check_options(options, split)
    window = DicomWindow(
        options.dicom_window_center, options.dicom_window_width, options.dicom_orientation
    )
    root = _data_root(options)
    train: dict[str, Path] = {}
    test: dict[str, Path] = {}
    train_skipped: list[str] = []
    test_skipped: list[str] = []
    if split != "test":
        train, train_skipped = list_images(options.train_images or "", "train image", root=root)
    if split != "train" and options.test_images:
        test, test_skipped = list_images(options.test_images, "test image", root=root)
    clash = sorted((set(train_ids) | set(train)) & set(test))
    if clash:
        raise SegflowError(
            f"ids {', '.join(map(repr, clash[:5]))} appear in both train and test image folders"
        )

    mask_paths: dict[str, str] = {}
    rles: dict[str, tuple[tuple[RleRow, ...], ...]] = {}
    id_style = None
    if split == "test":
        pass  # test images have no masks
    elif options.mask_source == "folder":
        if not options.train_masks:
            raise SegflowError("data.train_masks is not set (needed for mask_source: folder)")
        if options.classes:
            mask_paths = _class_mask_paths(options, train, root)
        else:
            mask_paths = _binary_mask_paths(options, train, root)
    else:
        rles, id_style = _train_rle_rows(options, train)

    tasks = [
        _ScanTask(
            item_id,
            split,
            str(path),
            mask_paths.get(item_id) if split == "train" else None,
            rles.get(item_id, ()) if split == "train" else (),
            options.classes,
            options.rle_order,
            options.rle_start,
            window,
            options.max_pixels,
            options.dicom_series,
        )
        for split, items in (("train", train), ("test", test))
        for item_id, path in sorted(items.items())
    ]
    skipped = {"train": train_skipped, "test": test_skipped}
    skipped = skipped if split == "all" else {split: skipped[split]}
    return tasks, skipped, _recorded_roots(options, root, split), id_style


def ingest(
    options: IngestOptions,
    workers: int = 1,
    split: str = "all",
    train_ids: frozenset[str] = frozenset(),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Build the manifest of every train item, or of every test item.

    Args:
        options: data locations and formats (``split`` test reads ``test_images`` and the
            metadata only; no test folder gives an empty manifest).
        workers: processes for decoding.
        split: ``train``, ``test`` or ``all`` (both in one manifest).
        train_ids: with ``split`` test, the train manifest's ids (a test id among them is an
            error).

    Returns:
        (manifest, summary): one row per item (columns: id, split, image_path, image_format,
        file_bytes, height, width, channels, bit_depth, is_gray, md5_bytes, md5_pixels, phash,
        mask_path, mask_rle, mask_md5, mask_coverage, with ``classes`` also mask_classes, then
        ``meta_*`` metadata columns), and a JSON-ready summary. Multi-label items hold one
        ``|``-separated part per class in mask_path / mask_rle; mask_md5 hashes the packed
        label and mask_coverage is the fraction of pixels of any class (see
        :mod:`segflow.formats.labels`). The manifest's ``attrs`` record the data roots its paths were
        checked against and the RLE CSV's id style (:mod:`segflow.artifacts.tables`).

    Raises:
        SegflowError: any unreadable, missing, mismatched or duplicated input, naming it.
    """
    tasks, skipped, roots, id_style = _build_tasks(options, split, train_ids)
    # Several rows for one id (and class) are unioned: Airbus lists one row per ship. Counted,
    # since in a one-row-per-image CSV (TGS) they mean a broken file.
    several_rows = sum(any(len(rows) > 1 for rows in task.rles) for task in tasks)
    if several_rows:
        log.warning(
            "%d train ids have several rows for one class in %s: their runs are unioned",
            several_rows,
            options.rle_csv,
        )
    chunks = chunked(tasks, _SCAN_CHUNK)
    rows = [
        row
        for chunk_rows in parallel_map(
            _scan_chunk, chunks, workers, desc="ingest", unit="img", weights=map(len, chunks)
        )
        for row in chunk_rows
    ]
    columns = [
        *MANIFEST_COLUMNS,
        *([CLASSES_COLUMN] if options.classes else []),
        *(SERIES_COLUMNS if options.dicom_series else ()),
        *((ORIENTATION_COLUMN,) if options.dicom_orientation else ()),
        _ORIENTATION_KEY,
    ]
    manifest = pd.DataFrame(rows, columns=columns)
    exif = manifest.pop(_ORIENTATION_KEY)
    oriented = (exif != 1) & (manifest["image_format"] != "dicom")
    if oriented.any():
        log.warning(
            "%d images (e.g. %s) have an EXIF orientation and are read turned as a viewer "
            "shows them (their masks are read the same way)",
            int(oriented.sum()),
            manifest.loc[oriented, "image_path"].iloc[0],
        )
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
    record_attributes(manifest, roots, id_style)
    summary = _summarise(manifest, skipped, missing_metadata, options.classes)
    summary["rle_ids_with_several_rows"] = several_rows
    summary["images_with_exif_orientation"] = int(oriented.sum())
    if options.dicom_series:
        summary["dicom_series"] = int(manifest["series_uid"].nunique())
    if options.dicom_orientation:
        turned = (manifest["image_format"] == "dicom") & (exif != 1)
        summary["dicom_slices_turned"] = int(turned.sum())
    return manifest, summary


def _summarise(
    manifest: pd.DataFrame,
    skipped: dict[str, list[str]],
    missing_metadata: int,
    classes: tuple[str, ...] | None,
) -> dict[str, Any]:
    train = manifest[manifest["split"] == "train"]
    summary: dict[str, Any] = {
        "classes": list(class_names(classes)),
        "multilabel": classes is not None,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow ingest``'s flags."""
    add_dataclass_arguments(parser, IngestOptions)
    parser.add_argument(
        "--split",
        default="all",
        choices=SPLIT_CHOICES,
        help="ingest the train or the test images, or both into one manifest (the workflow "
        "ingests each on its own)",
    )
    parser.add_argument(
        "--train-manifest",
        default=None,
        help="with --split test: the train manifest, whose ids no test image may repeat",
    )
    parser.add_argument("--out-manifest", required=True, help="manifest Parquet to write")
    parser.add_argument("--out-summary", required=True, help="summary JSON to write")
    add_workers(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow ingest``: write the manifest and its summary."""
    options = dataclass_from_namespace(IngestOptions, args)
    train_ids: frozenset[str] = frozenset()
    if args.split == "test" and args.train_manifest:
        train_ids = frozenset(read_table(args.train_manifest, "train manifest")["id"])
    manifest, summary = ingest(options, workers=args.workers, split=args.split, train_ids=train_ids)
    write_parquet(args.out_manifest, manifest, keep_attrs=True)  # its data roots
    write_json(
        args.out_summary, with_provenance(summary, stage_provenance(published_options(options)))
    )
    stage_log.info(
        "manifest: %d train + %d test items -> %s",
        summary["n_train"],
        summary["n_test"],
        args.out_manifest,
    )
