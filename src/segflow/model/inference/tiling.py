"""Tiled inference: predict an image larger than the model input as overlapping tiles.

Tiles are blended with a weight map that falls off towards the tile border (Gaussian as in
nnU-Net by default), because a network sees the least context at its input border and is least
reliable there. The result at each pixel is the weighted mean of every tile prediction covering
it, so a per-pixel (translation-equivariant) predictor gives exactly the full-image prediction.

Images smaller than the tile are reflect-padded up to the tile size and cropped back. Combine
with test-time augmentation by passing ``lambda b: predict_with_tta(model, b, "d4")`` as the
predictor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from segflow.core.errors import SegflowError

Predict = Callable[[Tensor], Tensor]

# Floor of the blending weights: border pixels covered by a single tile keep a usable weight, and
# the weight sum is never 0 (nnU-Net likewise replaces zeros by the smallest positive weight).
MIN_WEIGHT = 1e-4


def _tent(n: int) -> Tensor:
    """1-D linear fall-off from 1 at the centre to 1/ceil(n/2) at both ends (never 0)."""
    index = torch.arange(n, dtype=torch.float32)
    return torch.minimum(index + 1, n - index) / math.ceil(n / 2)


def _gaussian_1d(n: int) -> Tensor:
    # sigma = n/8 as nnU-Net; centred between the middle pixels so the map is symmetric.
    index = torch.arange(n, dtype=torch.float32)
    sigma = n / 8
    return torch.exp(-((index - (n - 1) / 2) ** 2) / (2 * sigma**2))


def _gaussian_weights(tile_h: int, tile_w: int) -> Tensor:
    weights = torch.outer(_gaussian_1d(tile_h), _gaussian_1d(tile_w))
    return (weights / weights.max()).clamp_min(MIN_WEIGHT)


def _pyramid_weights(tile_h: int, tile_w: int) -> Tensor:
    # Minimum of the two tents: a square pyramid whose level sets are rectangles.
    return torch.minimum(_tent(tile_h)[:, None], _tent(tile_w)[None, :])


def _uniform_weights(tile_h: int, tile_w: int) -> Tensor:
    return torch.ones(tile_h, tile_w)


TILE_WEIGHTS: dict[str, Callable[[int, int], Tensor]] = {
    "gaussian": _gaussian_weights,
    "pyramid": _pyramid_weights,
    "uniform": _uniform_weights,
}


def tile_weights(tile_h: int, tile_w: int, kind: str) -> Tensor:
    """The blending weight map of one tile.

    Args:
        tile_h: tile height in pixels (>= 1).
        tile_w: tile width in pixels (>= 1).
        kind: ``gaussian`` (sigma = tile/8 per axis, max 1, floor ``MIN_WEIGHT``), ``pyramid``
            (linear fall-off to the border, max 1, min 1/ceil(tile/2)) or ``uniform`` (all 1).

    Returns:
        float32 weights, all > 0, maximal at the centre.

    Shape:
        (tile_h, tile_w).
    """
    try:
        make = TILE_WEIGHTS[kind]
    except KeyError:
        raise KeyError(
            f"unknown tile weighting {kind!r}; valid weightings: {', '.join(TILE_WEIGHTS)}"
        ) from None
    _check_tile((tile_h, tile_w))
    return make(tile_h, tile_w)


def tile_positions(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering [0, size) along one axis.

    The fewest tiles whose neighbours overlap by at least ``overlap * tile`` pixels (at most
    ``tile - 1``: tiles step by whole pixels), spread evenly, the first at 0 and the last flush
    with the end (``size - tile``). For ``size <= tile`` this is ``[0]``: the caller pads the
    image to the tile size.

    Args:
        size: image extent along the axis (>= 1).
        tile: tile extent along the axis (>= 1).
        overlap: minimal overlap of neighbouring tiles as a fraction of the tile, 0 <= overlap < 1.

    Returns:
        Strictly increasing offsets.
    """
    _check_tile((tile,))
    _check_overlap(overlap)
    if size < 1:
        raise SegflowError(f"image size must be >= 1, got {size}")
    size, tile = int(size), int(tile)
    if size <= tile:
        return [0]
    # Largest whole step keeping the overlap; the epsilon stops 10 * (1 - 0.7) = 2.999... -> 2.
    max_step = max(1, math.floor(tile * (1 - overlap) + 1e-9))
    span = size - tile
    n_steps = math.ceil(span / max_step)
    # Floors of an even spread: consecutive gaps are at most ceil(span / n_steps) <= max_step.
    return [i * span // n_steps for i in range(n_steps + 1)]


def _check_tile(tile: tuple[int, ...]) -> None:
    # numbers.Integral, not int: sizes often come out of numpy arrays (np.int64 is no int).
    if any(not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 1 for t in tile):
        raise SegflowError(f"tile size must be positive integers, got {tile}")


def _check_overlap(overlap: float) -> None:
    if not 0 <= overlap < 1:
        raise SegflowError(f"tile overlap must be in [0, 1), got {overlap}")


def _reflect_index(n: int, target: int, device: torch.device) -> Tensor:
    """Indices into a length-``n`` axis that reflect-pad it to ``target`` (any amount).

    torch's reflect padding refuses a pad >= the input size; the period-2(n-1) reflection here
    repeats as numpy's ``np.pad(mode="reflect")`` does, so tiny images still pad.
    """
    index = torch.arange(target, device=device)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index % period
    return torch.where(index < n, index, period - index)


def _pad_to(image: Tensor, height: int, width: int) -> Tensor:
    """Reflect-pad (C, H, W) at the bottom and right to at least (height, width)."""
    _, h, w = image.shape
    if h < height:
        image = image.index_select(1, _reflect_index(h, height, image.device))
    if w < width:
        image = image.index_select(2, _reflect_index(w, width, image.device))
    return image


def predict_tiled(
    predict: Predict,
    image: Tensor,
    tile: tuple[int, int],
    overlap: float = 0.5,
    weighting: str = "gaussian",
    batch_size: int = 8,
) -> Tensor:
    """Predict one image of any size with a model of fixed input size, as blended tiles.

    Args:
        predict: maps a batch of tiles (B, C, tile_h, tile_w) to (B, K, tile_h, tile_w)
            (probabilities or logits; the blend is linear).
        image: the image; reflect-padded at the bottom/right when smaller than the tile.
        tile: (tile_h, tile_w), the model input size.
        overlap: minimal overlap of neighbouring tiles as a fraction of the tile, in [0, 1).
        weighting: blending weights, a key of ``TILE_WEIGHTS`` (see ``tile_weights``).
        batch_size: tiles per ``predict`` call (>= 1).

    Returns:
        The blended prediction in the dtype ``predict`` returns (accumulated in >= float32).

    Shape:
        image (C, H, W) -> (K, H, W).
    """
    if image.ndim != 3:
        raise SegflowError(f"predict_tiled expects an image (C, H, W), got {tuple(image.shape)}")
    if len(tile) != 2:
        raise SegflowError(f"tile must be (height, width), got {tile}")
    _check_tile(tuple(tile))
    _check_overlap(overlap)
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise SegflowError(f"batch_size must be a positive integer, got {batch_size}")
    tile_h, tile_w = int(tile[0]), int(tile[1])
    weights = tile_weights(tile_h, tile_w, weighting).to(image.device)
    _, height, width = image.shape
    padded = _pad_to(image, tile_h, tile_w)
    padded_h, padded_w = padded.shape[-2:]
    corners = [
        (y, x)
        for y in tile_positions(padded_h, tile_h, overlap)
        for x in tile_positions(padded_w, tile_w, overlap)
    ]
    # The weight sum depends on the grid only; every pixel is covered, so it is > 0.
    weight_sum = torch.zeros(padded_h, padded_w, device=image.device)
    for y, x in corners:
        weight_sum[y : y + tile_h, x : x + tile_w] += weights
    total: Tensor | None = None
    out_dtype = image.dtype
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        batch = torch.stack([padded[:, y : y + tile_h, x : x + tile_w] for y, x in chunk])
        predictions = predict(batch)
        if predictions.ndim != 4 or predictions.shape[0] != len(chunk):
            raise SegflowError(
                f"predict returned shape {tuple(predictions.shape)} for a batch of tiles of "
                f"shape {tuple(batch.shape)}; it must return (B, K, {tile_h}, {tile_w})"
            )
        if predictions.shape[-2:] != (tile_h, tile_w):
            raise SegflowError(
                f"predict returned tiles of {tuple(predictions.shape[-2:])} for input tiles of "
                f"{(tile_h, tile_w)}; it must predict at the input resolution"
            )
        out_dtype = predictions.dtype
        if total is None:
            accumulate = torch.promote_types(predictions.dtype, torch.float32)
            total = predictions.new_zeros(
                (predictions.shape[1], padded_h, padded_w), dtype=accumulate
            )
            weights = weights.to(device=predictions.device, dtype=accumulate)
            weight_sum = weight_sum.to(device=predictions.device, dtype=accumulate)
        for (y, x), prediction in zip(chunk, predictions, strict=True):
            total[:, y : y + tile_h, x : x + tile_w] += prediction * weights
    if total is None:  # unreachable: there is always at least one tile
        raise SegflowError("predict_tiled: no tiles to predict")
    return (total / weight_sum)[:, :height, :width].to(out_dtype)
