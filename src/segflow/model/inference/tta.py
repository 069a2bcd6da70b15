"""Test-time augmentation: the 8 dihedral (D4) transforms, input scales, and the merge of
their predictions.

Every transform acts on the last two dimensions only, so one and the same object transforms an
image batch (N, C, H, W) forward and a predicted probability map (N, K, H, W) back. The
transforms are pure index permutations: ``inverse(forward(x))`` is ``x`` bit for bit.

Multi-scale TTA repeats every transform at each scale of ``scales``: the batch is resized
bilinearly to ``round(scale * H) x round(scale * W)``, predicted, and the prediction resized
back to exactly (H, W) before the merge. Scale 1.0 is the image as it is (no resize).

``predict_with_tta`` does not touch any model; the caller wraps it in ``torch.inference_mode()``
(or ``no_grad``) with the model in ``eval()`` mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segflow.core.errors import SegflowError

Predict = Callable[[Tensor], Tensor]

# Geometric-mean merge: probabilities are clamped to at least this before the log, so one zero
# prediction pulls the merge towards 0 without producing -inf / NaN.
GMEAN_EPS = 1e-7


def _identity(x: Tensor) -> Tensor:
    return x


def _hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


def _vflip(x: Tensor) -> Tensor:
    return x.flip(-2)


def _rot90(x: Tensor) -> Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _rot180(x: Tensor) -> Tensor:
    return x.flip(-2, -1)


def _rot270(x: Tensor) -> Tensor:
    return torch.rot90(x, -1, dims=(-2, -1))


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _transverse(x: Tensor) -> Tensor:
    # Reflection in the anti-diagonal: transpose, then rotate by 180 degrees.
    return x.flip(-2, -1).transpose(-2, -1)


@dataclass(frozen=True)
class Dihedral:
    """One element of D4 as a named, invertible map on the last two dims of a tensor.

    Attributes:
        name: registry name (``identity``, ``hflip``, ...).
        forward: transform of an image batch, shape (..., H, W) -> (..., H, W) or (..., W, H).
        inverse: the exact inverse, applied to predictions of the transformed batch.
        swaps_axes: True when ``forward`` exchanges H and W (rotations by 90/270, transposes).
    """

    name: str
    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]
    swaps_axes: bool

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of ``forward(x)`` for an input of spatial size (height, width)."""
        return (width, height) if self.swaps_axes else (height, width)


# Module-level functions, not lambdas, so transforms pickle into worker processes.
IDENTITY = Dihedral("identity", _identity, _identity, swaps_axes=False)
HFLIP = Dihedral("hflip", _hflip, _hflip, swaps_axes=False)
VFLIP = Dihedral("vflip", _vflip, _vflip, swaps_axes=False)
ROT90 = Dihedral("rot90", _rot90, _rot270, swaps_axes=True)  # counter-clockwise
ROT180 = Dihedral("rot180", _rot180, _rot180, swaps_axes=False)
ROT270 = Dihedral("rot270", _rot270, _rot90, swaps_axes=True)
TRANSPOSE = Dihedral("transpose", _transpose, _transpose, swaps_axes=True)
TRANSVERSE = Dihedral("transverse", _transverse, _transverse, swaps_axes=True)  # anti-transpose

D4: tuple[Dihedral, ...] = (
    IDENTITY,
    HFLIP,
    VFLIP,
    ROT90,
    ROT180,
    ROT270,
    TRANSPOSE,
    TRANSVERSE,
)
TRANSFORMS: dict[str, Dihedral] = {t.name: t for t in D4}

TTA_MODES: dict[str, tuple[Dihedral, ...]] = {
    "none": (IDENTITY,),
    "hflip": (IDENTITY, HFLIP),
    "vflip": (IDENTITY, VFLIP),
    "d4": D4,
}
MERGES: tuple[str, ...] = ("mean", "gmean")


def get_transform(name: str) -> Dihedral:
    """The D4 transform called ``name``; KeyError listing the valid names otherwise."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise KeyError(
            f"unknown dihedral transform {name!r}; valid transforms: {', '.join(TRANSFORMS)}"
        ) from None


def get_tta(name: str) -> tuple[Dihedral, ...]:
    """The transforms of TTA mode ``name``; KeyError listing the valid modes otherwise."""
    try:
        return TTA_MODES[name]
    except KeyError:
        raise KeyError(f"unknown TTA mode {name!r}; valid modes: {', '.join(TTA_MODES)}") from None


def _group_by_output_size(
    transforms: tuple[Dihedral, ...], height: int, width: int
) -> list[list[Dihedral]]:
    """Transforms grouped by the spatial size they produce, in order of first appearance."""
    groups: dict[tuple[int, int], list[Dihedral]] = {}
    for transform in transforms:
        groups.setdefault(transform.output_size(height, width), []).append(transform)
    return list(groups.values())


def check_scales(scales: tuple[float, ...] | None) -> tuple[float, ...]:
    """The TTA scales to run: ``scales``, or (1.0,) for None.

    Raises:
        SegflowError: an empty, non-positive or repeated scale list (``predict.tta_scales``).
    """
    if scales is None:
        return (1.0,)
    values = tuple(float(scale) for scale in scales)
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise SegflowError(f"predict.tta_scales must be positive numbers, got {list(scales)}")
    if len(set(values)) != len(values):
        raise SegflowError(f"predict.tta_scales repeats a scale: {list(scales)}")
    return values


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (H, W) a batch is resized to at ``scale`` (at least 1 x 1)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of the last two dims to ``size`` (no-op at the same size)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def predict_with_tta(
    predict: Predict,
    images: Tensor,
    mode: str = "none",
    merge: str = "mean",
    scales: tuple[float, ...] | None = None,
) -> Tensor:
    """Predict ``images`` under every transform of ``mode`` at every scale and merge the
    predictions in the original orientation and size.

    All transformed copies of the same spatial size go through ``predict`` as one batch: one call
    per scale for square images, two for non-square images under ``d4`` (rot90-type transforms
    swap H and W). The batch handed to ``predict`` is therefore up to
    ``len(mode transforms) * N`` large.

    Args:
        predict: maps a batch (B, C, h, w) to probabilities (B, K, h, w) (sigmoid/softmax
            already applied; gmean needs values in (0, 1]) at any size it is given.
        images: the batch to predict; not modified.
        mode: a key of ``TTA_MODES``: ``none``, ``hflip``, ``vflip`` or ``d4``.
        merge: ``mean`` (arithmetic) or ``gmean`` (geometric, probabilities clamped to at least
            ``GMEAN_EPS``).
        scales: input scales (:func:`check_scales`); None: 1.0 only. Each scale's
            predictions are resized back to (H, W) bilinearly, then merged with the others.

    Returns:
        The merged probabilities, in the dtype ``predict`` returns.

    Shape:
        images (N, C, H, W) -> (N, K, H, W).
    """
    transforms = get_tta(mode)
    scale_values = check_scales(scales)
    if merge not in MERGES:
        raise KeyError(f"unknown TTA merge {merge!r}; valid merges: {', '.join(MERGES)}")
    if images.ndim != 4:
        raise SegflowError(
            f"predict_with_tta expects images of shape (N, C, H, W), got {tuple(images.shape)}"
        )
    n, _, height, width = images.shape
    total: Tensor | None = None
    out_dtype = images.dtype
    for scale in scale_values:
        size = scaled_size(height, width, scale)
        scaled = _resize(images, size)
        for group in _group_by_output_size(transforms, *size):
            batch = torch.cat([t.forward(scaled) for t in group], dim=0)
            predictions = predict(batch)
            _check_prediction(batch, predictions)
            out_dtype = predictions.dtype
            # Accumulate in at least float32: eight half-precision logs lose digits.
            predictions = predictions.to(torch.promote_types(predictions.dtype, torch.float32))
            chunks = predictions.split([n] * len(group), dim=0)
            for transform, chunk in zip(group, chunks, strict=True):
                restored = _resize(transform.inverse(chunk), (height, width))
                if merge == "gmean":
                    restored = restored.clamp_min(GMEAN_EPS).log()
                total = restored.clone() if total is None else total.add_(restored)
    if total is None:  # unreachable: every mode holds the identity
        raise SegflowError(f"TTA mode {mode!r} has no transforms")
    merged = total / (len(transforms) * len(scale_values))
    if merge == "gmean":
        merged = merged.exp()
    return merged.to(out_dtype)


def _check_prediction(batch: Tensor, predictions: Tensor) -> None:
    """Predictions must be (B, K, H, W) at the batch's size, or the inverse maps misalign."""
    ok = (
        predictions.ndim == 4
        and predictions.shape[0] == batch.shape[0]
        and predictions.shape[-2:] == batch.shape[-2:]
    )
    if not ok:
        raise SegflowError(
            f"predict returned shape {tuple(predictions.shape)} for a batch of shape "
            f"{tuple(batch.shape)}; it must return (B, K, H, W) at the input resolution "
            "(is the image size divisible by the model's output stride?)"
        )
