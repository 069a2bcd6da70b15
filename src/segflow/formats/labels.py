"""Packed multi-label masks: one 2-D integer array per image where bit k is class k.

A pixel can belong to several classes at once (Severstal-style multi-label data), so a label
is a bit field rather than a class index. Binary data is the one-class case: bit 0 only, i.e.
the uint8 {0, 1} masks every stage has always used, unchanged.

In the ingest manifest a multi-label item's mask columns hold one part per class, in class
order, joined by :data:`CLASS_SEPARATOR`: ``mask_rle`` the canonical (column-major, 1-based)
RLE of each class ("" for an empty class), ``mask_path`` the mask file of each class (""
where the class has no file). The class names themselves are the ``mask_classes`` column
(same ``|``-joined value on every row); a binary manifest has no such column.
:func:`read_label` is the one decoder of those columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.formats.imageio import apply_orientation, read_mask
from segflow.formats.rle import rle_decode

CLASS_SEPARATOR = "|"
CLASSES_COLUMN = "mask_classes"
BINARY_CLASSES = ("mask",)  # the name stats.json gives the single class of binary data
MAX_CLASSES = 32
_DTYPE_BITS = ((8, np.uint8), (16, np.uint16), (32, np.uint32))


ORIENTATION_COLUMN = "slice_orientation"
"""Manifest column ingest adds with ``data.dicom_orientation``: the EXIF code (1-8) each DICOM
image was turned by (its mask files are turned the same way when read)."""


def manifest_orientation(row: object) -> int:
    """The DICOM turn of a manifest row (a namedtuple or Series): its ``slice_orientation``,
    1 in a manifest without the column."""
    value = getattr(row, ORIENTATION_COLUMN, 1)
    return 1 if pd.isna(value) else int(value)


def label_dtype(n_classes: int) -> np.dtype:
    """The smallest unsigned integer type with one bit per class.

    Args:
        n_classes: number of classes (1 for binary data).

    Returns:
        uint8 for up to 8 classes, uint16 up to 16, uint32 up to 32.

    Raises:
        SegflowError: fewer than 1 or more than :data:`MAX_CLASSES` classes.
    """
    if n_classes < 1:
        raise SegflowError(f"a label mask needs at least 1 class, got {n_classes}")
    for bits, dtype in _DTYPE_BITS:
        if n_classes <= bits:
            return np.dtype(dtype)
    raise SegflowError(
        f"{n_classes} classes: at most {MAX_CLASSES} classes fit in a packed label mask"
    )


def pack_labels(masks: np.ndarray) -> np.ndarray:
    """Pack per-class masks into one label mask (bit k = class k).

    Args:
        masks: per-class masks; any non-zero pixel is on.

    Returns:
        The packed label mask, of :func:`label_dtype` for the number of classes.

    Shape:
        masks: (C, H, W); output: (H, W).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"pack_labels expects (C, H, W) masks, got shape {masks.shape}")
    dtype = label_dtype(masks.shape[0])
    packed = np.zeros(masks.shape[1:], dtype=dtype)
    for bit, mask in enumerate(masks):
        packed |= (mask != 0).astype(dtype) << dtype.type(bit)
    return packed


def unpack_labels(packed: np.ndarray, n_classes: int) -> np.ndarray:
    """Split packed label masks into one {0, 1} plane per class.

    Args:
        packed: label masks whose bit k is class k.
        n_classes: number of classes (planes to return).

    Returns:
        uint8 {0, 1} planes, class k at index k of the class axis.

    Shape:
        packed: (..., H, W); output: (..., C, H, W).

    Raises:
        SegflowError: a pixel has a bit set beyond the last class (labels of another class set).
    """
    packed = np.asarray(packed)
    if packed.ndim < 2:
        raise ValueError(f"unpack_labels expects (..., H, W) labels, got shape {packed.shape}")
    label_dtype(n_classes)  # validates the class count
    if n_classes < packed.dtype.itemsize * 8 and (packed >> n_classes).any():
        raise SegflowError(
            f"label mask has bits set beyond its {n_classes} classes (made with other classes?)"
        )
    bits = np.arange(n_classes, dtype=packed.dtype).reshape(n_classes, 1, 1)
    return ((packed[..., None, :, :] >> bits) & 1).astype(np.uint8)


def label_md5(label: np.ndarray, n_classes: int) -> str:
    """md5 of a label mask: its shape and the bits of every class plane.

    For one class this is exactly :func:`segflow.formats.imageio.mask_md5` of the binary mask, so binary
    manifests keep their hashes.

    Shape:
        label: (H, W).
    """
    digest = hashlib.md5(f"{label.shape}|".encode())
    digest.update(np.packbits(unpack_labels(label, n_classes)).data)
    return digest.hexdigest()


def class_names(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The names of the label bits: the configured classes, or ``("mask",)`` for binary data."""
    return tuple(classes) if classes else BINARY_CLASSES


def manifest_classes(manifest: pd.DataFrame) -> tuple[str, ...] | None:
    """The class names a manifest's masks are split into; None for a binary manifest.

    Raises:
        SegflowError: rows disagree on the classes (a manifest pieced together from two runs).
    """
    if CLASSES_COLUMN not in manifest.columns:
        return None
    values = manifest[CLASSES_COLUMN].dropna().unique().tolist()
    if len(values) != 1:
        raise SegflowError(
            f"manifest column {CLASSES_COLUMN} must hold one class list, found {values[:3]}; "
            "rerun ingest"
        )
    return tuple(values[0].split(CLASS_SEPARATOR))


def read_label(
    mask_path: object,
    mask_rle: object,
    shape: tuple[int, int],
    n_classes: int,
    where: str,
    *,
    max_pixels: int | None = None,
    orientation: int = 1,
) -> np.ndarray:
    """Decode one manifest item's label mask from its ``mask_path`` / ``mask_rle`` columns.

    A string ``mask_path`` means mask files (folder source); otherwise ``mask_rle`` holds
    canonical RLE (a null RLE is an empty mask). With several classes each column holds one
    part per class joined by :data:`CLASS_SEPARATOR`; with one class it is used whole, so a
    binary item decodes exactly as it always has (a ``|`` in a file name included).

    Args:
        mask_path: the manifest's ``mask_path`` value (str, or None/NaN).
        mask_rle: the manifest's ``mask_rle`` value (str, or None/NaN).
        shape: (height, width) of the item's image.
        n_classes: number of classes (1 for binary data).
        where: names the item (e.g. its image path) in error messages.
        max_pixels: refuse larger mask files before decoding them.
        orientation: the EXIF code (1-8) its DICOM image was turned by (manifest column
            ``slice_orientation``): mask files, drawn on the stored pixels, are turned the same
            way (``shape`` is the turned image's); ingest stores ``mask_rle`` already turned.

    Returns:
        The packed label mask (:func:`label_dtype`); binary data gives uint8 {0, 1}.

    Shape:
        output: (H, W).

    Raises:
        SegflowError: unreadable mask file, mask of another size than its image, malformed
            RLE, or a number of ``|`` parts other than ``n_classes``.
    """
    if isinstance(mask_path, str):
        parts = _class_parts(mask_path, n_classes, "mask_path", where)
        stored = shape[::-1] if orientation >= 5 else shape  # 5-8 swap height and width
        planes = [
            apply_orientation(_read_mask_part(part, stored, where, max_pixels), orientation)
            for part in parts
        ]
    elif isinstance(mask_rle, str):
        parts = _class_parts(mask_rle, n_classes, "mask_rle", where)
        planes = [
            rle_decode(part, shape, where=_rle_where(where, k, n_classes))
            for k, part in enumerate(parts)
        ]
    else:  # no mask recorded: an empty label
        return np.zeros(shape, dtype=label_dtype(n_classes))
    return planes[0] if n_classes == 1 else pack_labels(np.stack(planes))


def _class_parts(value: str, n_classes: int, column: str, where: str) -> list[str]:
    if n_classes == 1:
        return [value]
    parts = value.split(CLASS_SEPARATOR)
    if len(parts) != n_classes:
        raise SegflowError(
            f"{where}: manifest {column} has {len(parts)} {CLASS_SEPARATOR!r}-separated parts, "
            f"expected one per class ({n_classes}); was the manifest made with other classes?"
        )
    return parts


def _read_mask_part(
    path: str, shape: tuple[int, int], where: str, max_pixels: int | None
) -> np.ndarray:
    if not path:  # this class has no mask file for the item: the class is empty
        return np.zeros(shape, dtype=np.uint8)
    mask = read_mask(path, max_pixels)
    if mask.shape != shape:
        raise SegflowError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {where} is "
            f"{shape[1]}x{shape[0]}"
        )
    return mask


def _rle_where(where: str, class_index: int, n_classes: int) -> str:
    suffix = f" (class {class_index})" if n_classes > 1 else ""
    return f"{where}: manifest mask_rle{suffix}"
