"""Where an original image sits in the preprocessed arrays, and the way back.

``preprocess.resize_mode`` decides how an image of the original size (H, W) becomes the
preprocessed (h, w):

- ``resize`` (the default): scaled to (h, w). The way back scales predictions bilinearly to
  (H, W); masks go the other way with nearest neighbours.
- ``pad``: the image keeps its native pixels and is reflect-padded (``BORDER_REFLECT_101``:
  the border pixel is not repeated, ``dcb|abcd|cba``) symmetrically to (h, w), the odd pixel
  going to the bottom and right (TGS Salt: 101 -> 128 is 13 above, 14 below; the Kaggle
  winners' way). Masks are reflect-padded exactly like their images, so the padded truth is
  the mirror of the image content it lies on: a padded pixel's label is the label of the
  pixel its image value was copied from. The way back crops the original window; nothing is
  interpolated, so a crop of a padded map is exactly the original map.

Every stage that maps between the two grids goes through :func:`to_original` and
:func:`from_original`, with the offsets of :func:`pad_offsets` (pad mode) or None (resize
mode). In pad mode the preprocessed ``index.parquet`` records them as ``pad_top`` and
``pad_left`` (:func:`index_offsets` reads them back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError

RESIZE_MODES = ("resize", "pad")
PAD_COLUMNS = ("pad_top", "pad_left")
RESOLUTION_FORMAT = 1
"""The format of ``resolution.json`` (:mod:`segflow.model.resolution_plan` writes it)."""

Offsets = tuple[int, int]
"""(top, left): where the original image's first pixel lies in the padded canvas."""


def pad_offsets(
    original: tuple[int, int], target: tuple[int, int], where: str = "image"
) -> Offsets:
    """The (top, left) padding that centres an ``original`` (H, W) image in ``target`` (h, w).

    Args:
        original: (height, width) of the original image.
        target: (height, width) of the padded canvas.
        where: names the image in the error message (its path or id).

    Returns:
        (top, left); the bottom and right padding are the rest (the odd pixel goes there).

    Raises:
        SegflowError: the image is larger than the target on either side.
    """
    (height, width), (target_height, target_width) = original, target
    if height > target_height or width > target_width:
        raise SegflowError(
            f"{where}: {width}x{height} (WxH) is larger than the preprocess size "
            f"{target_width}x{target_height}; preprocess.resize_mode pad requires a target >= "
            "the original size"
        )
    return int(target_height - height) // 2, int(target_width - width) // 2


def reflect_pad(
    array: np.ndarray, target: tuple[int, int], offsets: Offsets, channels_last: bool = True
) -> np.ndarray:
    """Reflect-pad (``BORDER_REFLECT_101``) the spatial axes of ``array`` to ``target``.

    Args:
        array: (H, W), (H, W, C) with ``channels_last``, or (K, H, W) without; any dtype.
        target: (h, w) of the result.
        offsets: (top, left) padding (:func:`pad_offsets`).
        channels_last: whether a 3-D array is (H, W, C) (images) or (K, H, W) (maps).

    Returns:
        The padded array, same dtype; the original at ``[top:top + H, left:left + W]``.
    """
    spatial = (0, 1) if array.ndim == 2 or channels_last else (1, 2)
    height, width = (array.shape[axis] for axis in spatial)
    top, left = offsets
    bottom, right = target[0] - height - top, target[1] - width - left
    if min(top, left, bottom, right) < 0:
        raise SegflowError(
            f"cannot pad a {width}x{height} array to {target[1]}x{target[0]} at offsets {offsets}"
        )
    widths = [(0, 0)] * array.ndim
    widths[spatial[0]], widths[spatial[1]] = (top, bottom), (left, right)
    # numpy's "reflect" mirrors without repeating the edge: OpenCV's BORDER_REFLECT_101.
    return np.pad(array, widths, mode="reflect")


def to_original(maps: np.ndarray, original: tuple[int, int], offsets: Offsets | None) -> np.ndarray:
    """One image's preprocessed maps back on its original pixel grid.

    Args:
        maps: (K, h, w) probabilities (or any planes) at the preprocessed size.
        original: (H, W) of the original image.
        offsets: (top, left) in pad mode: crop; None in resize mode: bilinear resize.

    Returns:
        (K, H, W), float32 when resized, the input's dtype when cropped or unchanged.
    """
    height, width = int(original[0]), int(original[1])
    if offsets is not None:
        top, left = offsets
        if top + height > maps.shape[1] or left + width > maps.shape[2]:
            raise SegflowError(
                f"cannot crop {width}x{height} at offsets {offsets} from maps of "
                f"{maps.shape[2]}x{maps.shape[1]}"
            )
        return maps[:, top : top + height, left : left + width]
    if maps.shape[1:] == (height, width):
        return maps
    # cv2 resizes (h, w, K) channel-wise in one call (up to 512 channels).
    resized = cv2.resize(
        np.ascontiguousarray(maps.transpose(1, 2, 0)),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    return resized.reshape(height, width, -1).transpose(2, 0, 1)


def image_to_original(
    image: np.ndarray, original: tuple[int, int], offsets: Offsets | None
) -> np.ndarray:
    """A preprocessed (h, w, C) image on its original grid: cropped in pad mode, else as is.

    Resize mode returns the image unchanged (the callers resample it as they need).
    """
    if offsets is None:
        return image
    top, left = offsets
    return image[top : top + int(original[0]), left : left + int(original[1])]


def from_original(
    planes: np.ndarray, size: tuple[int, int], offsets: Offsets | None, labels: bool
) -> np.ndarray:
    """One image's original-grid target in the preprocessed grid (pseudo-labels).

    Args:
        planes: (H, W) packed labels or (K, H, W) soft targets at the original size.
        size: (h, w) of the preprocessed arrays.
        offsets: (top, left) in pad mode: reflect-pad as preprocess pads the image and its
            mask; None in resize mode: resize (nearest for labels, bilinear for soft targets).
        labels: whether ``planes`` are packed labels (nearest neighbour; keeps the bits).

    Returns:
        (h, w) labels or (K, h, w) soft targets, the input's dtype (soft: float32 when resized).
    """
    height, width = size
    if offsets is not None:
        return reflect_pad(planes, size, offsets, channels_last=False)
    if labels:
        return resize_labels(planes, height, width)
    resized = cv2.resize(
        np.ascontiguousarray(planes.astype(np.float32).transpose(1, 2, 0)),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    return resized.reshape(height, width, -1).transpose(2, 0, 1)


def resize_labels(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize, so a mask stays binary and a packed label keeps its values.

    Shape:
        mask: (H, W) uint8, uint16 or uint32; output: (height, width), same dtype.
    """
    if mask.shape == (height, width):
        return mask
    if mask.dtype == np.uint32:  # OpenCV 4 has no unsigned 32-bit type; nearest only copies bits
        return resize_labels(mask.view(np.int32), height, width).view(np.uint32)
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def index_offsets(rows: pd.DataFrame) -> list[Offsets | None]:
    """Per row of an ``index.parquet`` selection: its (top, left) padding, or None throughout
    when the index has no ``pad_top``/``pad_left`` columns (resize mode, older runs)."""
    if not set(PAD_COLUMNS) <= set(rows.columns):
        return [None] * len(rows)
    return [
        (int(top), int(left)) for top, left in zip(rows["pad_top"], rows["pad_left"], strict=True)
    ]


def pad_columns(
    sizes: Sequence[tuple[int, int]], target: tuple[int, int], where: Sequence[str]
) -> dict[str, list[int]]:
    """``pad_top`` and ``pad_left`` of index rows whose originals have ``sizes`` (pad mode).

    Raises:
        SegflowError: an original larger than ``target``, named by its ``where`` entry.
    """
    offsets = [pad_offsets(size, target, name) for size, name in zip(sizes, where, strict=True)]
    return {"pad_top": [o[0] for o in offsets], "pad_left": [o[1] for o in offsets]}


def score_window(index: pd.DataFrame, rows: Sequence[int]) -> tuple[int, int, int, int] | None:
    """The original pixels' window (top, left, height, width) shared by the train ``rows``
    of a pad-mode index, where validation scores; None in resize mode, or when the rows differ
    in size or offsets (the whole canvas is scored then).

    Args:
        index: the preprocessed ``index.parquet``.
        rows: rows of ``train_images.npy`` (a fold's validation items).
    """
    if not set(PAD_COLUMNS) <= set(index.columns) or len(rows) == 0:
        return None
    train = index[index["split"] == "train"].set_index("row")
    selected = train.loc[list(rows), ["pad_top", "pad_left", "orig_height", "orig_width"]]
    windows = selected.drop_duplicates()
    if len(windows) != 1:
        return None
    top, left, height, width = (int(v) for v in windows.iloc[0])
    return top, left, height, width


def positive_int(value: Any) -> bool:
    """An int (not a bool) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_resolution(path: str | os.PathLike[str]) -> tuple[int, int, str]:
    """(height, width, mode) chosen in ``resolution.json`` (``segflow preprocess --resolution``).

    Raises:
        SegflowError: a missing, unreadable or other-format file.
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run segflow plan-resolution)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SegflowError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != RESOLUTION_FORMAT:
        raise SegflowError(
            f"{path}: not a resolution choice of format {RESOLUTION_FORMAT}; re-plan "
            "(snakemake -R plan_resolution)"
        )
    chosen, mode = record.get("chosen"), record.get("mode")
    if (
        not isinstance(chosen, list)
        or len(chosen) != 2
        or not all(positive_int(v) for v in chosen)
        or mode not in RESIZE_MODES
    ):
        raise SegflowError(f"{path}: 'chosen' must be [height, width] and 'mode' resize or pad")
    return int(chosen[0]), int(chosen[1]), str(mode)
