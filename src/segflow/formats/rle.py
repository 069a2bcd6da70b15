"""Kaggle run-length encoding of binary masks.

Kaggle's convention (TGS Salt, Airbus, SIIM, ...): pixels are numbered **column-major** —
top to bottom, then left to right — starting at **1**, and a mask is written as space-separated
``start length`` pairs. An empty string (or ``-1``, as SIIM writes it) is an empty mask. Some
competitions (Carvana) number pixels row-major instead; ``order="row"`` handles those.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import numpy as np

from segflow.core.errors import SegflowError

RleOrder = Literal["column", "row"]
RLE_ORDERS: tuple[str, ...] = ("column", "row")
_EMPTY_TOKENS = frozenset({"", "-1"})
_INTEGER_TOKEN = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() also takes "1_0", "٣"
# Bound on |start| and |length| so that start + length cannot overflow int64 (any real image is
# far smaller, so such a run is reported as running past the end or out of range, not wrapped).
_MAX_TOKEN = 2**60


def _numpy_order(order: str) -> Literal["F", "C"]:
    if order == "column":
        return "F"
    if order == "row":
        return "C"
    raise KeyError(f"unknown RLE order {order!r}; valid orders: {', '.join(RLE_ORDERS)}")


def is_empty_rle(rle: object) -> bool:
    """True for the spellings of an empty mask: None, NaN, blank string or ``-1``."""
    if rle is None:
        return True
    if isinstance(rle, float) and math.isnan(rle):
        return True
    return isinstance(rle, str) and rle.strip() in _EMPTY_TOKENS


def rle_encode(mask: np.ndarray, order: RleOrder = "column", start: int = 1) -> str:
    """Encode a binary mask as a Kaggle RLE string.

    Args:
        mask: 2-D array; any non-zero pixel is foreground.
        order: ``"column"`` (Kaggle default) or ``"row"`` pixel numbering.
        start: index of the first pixel (1 for Kaggle).

    Returns:
        ``"start length start length ..."``; ``""`` for an empty mask.

    Shape:
        mask: (H, W).
    """
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    flat = np.asarray(mask).ravel(order=_numpy_order(order)) != 0
    padded = np.concatenate(([False], flat, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    if edges.size == 0:
        return ""
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(starts.size * 2, dtype=np.int64)
    runs[0::2] = starts + start
    runs[1::2] = ends - starts
    return " ".join(map(str, runs.tolist()))


def rle_decode(
    rle: object,
    shape: tuple[int, int],
    order: RleOrder = "column",
    start: int = 1,
    where: str = "RLE",
) -> np.ndarray:
    """Decode a Kaggle RLE string into a binary mask, validating every run.

    Args:
        rle: the RLE string; empty spellings (see :func:`is_empty_rle`) give an empty mask.
        shape: (height, width) of the image the mask belongs to.
        order: ``"column"`` or ``"row"`` pixel numbering.
        start: index of the first pixel (1 for Kaggle).
        where: names the source (file and row) in error messages.

    Returns:
        uint8 mask with values {0, 1}.

    Shape:
        output: (H, W).

    Raises:
        SegflowError: odd token count, non-integer tokens, runs that start before the first
            pixel, have non-positive length, overlap, or run past the end of the image.
    """
    height, width = shape
    total = height * width
    flat = np.zeros(total, dtype=np.uint8)
    if not is_empty_rle(rle):
        starts, lengths = _parse_runs(rle, where)
        begin = starts - start
        if (begin < 0).any():
            raise SegflowError(
                f"{where}: run starts at {int(starts[begin < 0][0])}, before pixel {start}"
            )
        if (lengths <= 0).any():
            raise SegflowError(
                f"{where}: run length {int(lengths[lengths <= 0][0])} is not positive"
            )
        end = begin + lengths
        if (end > total).any():
            bad = int(np.argmax(end > total))
            raise SegflowError(
                f"{where}: run '{int(starts[bad])} {int(lengths[bad])}' ends at pixel "
                f"{int(end[bad]) + start - 1}, past the {height}x{width} image ({total} pixels)"
            )
        sorted_idx = np.argsort(begin, kind="stable")
        if (begin[sorted_idx][1:] < end[sorted_idx][:-1]).any():
            raise SegflowError(f"{where}: runs overlap")
        # Mark run boundaries with +1/-1 and integrate: O(pixels + runs), no Python loop.
        delta = np.zeros(total + 1, dtype=np.int32)
        np.add.at(delta, begin, 1)
        np.add.at(delta, end, -1)
        flat = (np.cumsum(delta[:-1]) > 0).astype(np.uint8)
    return flat.reshape((height, width), order=_numpy_order(order))


def _parse_runs(rle: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(rle, str):
        raise SegflowError(f"{where}: expected an RLE string, got {type(rle).__name__} {rle!r}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise SegflowError(
            f"{where}: odd number of RLE tokens ({len(tokens)}); expected start/length pairs"
        )
    try:
        if not rle.isascii() or "_" in rle:
            raise ValueError(rle)
        values = np.array([int(token) for token in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((token for token in tokens if not _INTEGER_TOKEN.fullmatch(token)), None)
        if bad is not None:
            raise SegflowError(f"{where}: RLE token {bad!r} is not an integer") from None
        values = np.array([max(-_MAX_TOKEN - 1, min(int(t), _MAX_TOKEN + 1)) for t in tokens])
    out_of_range = (values > _MAX_TOKEN) | (values < -_MAX_TOKEN)
    if out_of_range.any():
        bad = tokens[int(np.argmax(out_of_range))]
        raise SegflowError(f"{where}: RLE token {bad!r} is out of range")
    return values[0::2], values[1::2]
