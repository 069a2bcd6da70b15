"""Difference-of-Gaussians (DoG) blob detection with OpenCV, for per-image features.

Bright blobs on a darker background: the image is blurred at increasing Gaussian sigmas
(``cv2.GaussianBlur``) and adjacent blurs are subtracted, each difference divided by its sigma
ratio minus one (so it approximates the scale-normalised Laplacian ``-s^2 lap G`` at the
geometric-mean sigma ``s``, whose response to a blob of given contrast does not depend on the
blob's size). A blob is a maximum of that response over its 3 x 3 x 3 neighbourhood in space and
scale, above a threshold; a blob overlapping a stronger one is dropped (which also removes the
weak maxima that ring a large blob's edge). Its radius is about ``sqrt(2) * s``.
scikit-image's ``blob_dog`` works the same way; it is not a dependency.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from segflow.core.errors import SegflowError

DEFAULT_SIGMAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
DEFAULT_THRESHOLD = 0.1
_KERNEL = np.ones((3, 3), np.uint8)


@dataclass(frozen=True)
class Blobs:
    """The blobs of one image: centres (row, col), scales ``s`` and DoG responses."""

    centres: np.ndarray  # (B, 2) int64
    scales: np.ndarray  # (B,) float64
    responses: np.ndarray  # (B,) float64

    @property
    def count(self) -> int:
        return len(self.scales)

    @property
    def radii(self) -> np.ndarray:
        """Blob radii in pixels, ``sqrt(2) * s``."""
        return math.sqrt(2.0) * self.scales


def check_sigmas(sigmas: Sequence[float], what: str = "blob sigmas") -> tuple[float, ...]:
    """``sigmas`` as a strictly increasing tuple of at least two positive numbers.

    Raises:
        SegflowError: fewer than two, a non-positive or non-increasing value (named by ``what``).
    """
    values = tuple(float(s) for s in sigmas)
    if len(values) < 2:
        raise SegflowError(f"{what}: need at least two sigmas (one difference), got {values}")
    if values[0] <= 0 or any(b <= a for a, b in itertools.pairwise(values)):
        raise SegflowError(f"{what}: sigmas must be positive and increasing, got {values}")
    return values


def dog_stack(
    image: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS
) -> tuple[np.ndarray, np.ndarray]:
    """The scale-normalised DoG responses of ``image`` and their scales.

    Args:
        image: one gray plane, float (any range: the responses are in its units).
        sigmas: increasing Gaussian sigmas (pixels).

    Returns:
        (responses, scales): ``(G(sigma_i) - G(sigma_i+1)) / (sigma_i+1 / sigma_i - 1)`` and
        ``sqrt(sigma_i * sigma_i+1)``.

    Shape:
        image: (H, W); responses: (len(sigmas) - 1, H, W) float32; scales: (len(sigmas) - 1,).
    """
    sigmas = check_sigmas(sigmas)
    plane = np.ascontiguousarray(image, dtype=np.float32)
    blurred = [
        cv2.GaussianBlur(plane, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT_101)
        for s in sigmas
    ]
    pairs = list(itertools.pairwise(range(len(sigmas))))
    responses = np.stack(
        [(blurred[i] - blurred[j]) / np.float32(sigmas[j] / sigmas[i] - 1.0) for i, j in pairs]
    )
    scales = np.array([math.sqrt(sigmas[i] * sigmas[j]) for i, j in pairs])
    return responses, scales


def detect_blobs(
    image: np.ndarray,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    threshold: float = DEFAULT_THRESHOLD,
) -> Blobs:
    """Bright blobs of ``image``: 3 x 3 x 3 space-scale maxima of :func:`dog_stack` above
    ``threshold``, strongest first, each dropped when it overlaps a stronger blob (centre
    distance below the sum of the radii; equal maxima side by side are one blob).

    Args:
        image: one gray plane, float (``threshold`` is in its units, e.g. [0, 1]).
        sigmas: increasing Gaussian sigmas (pixels): blobs of radius about ``1.4 sigma`` to
            ``1.4 sigma * ratio`` for adjacent sigmas ``sigma, ratio * sigma``.
        threshold: the least DoG response of a blob (> 0; a disk of contrast c peaks near
            0.45 c at its best scale, an edge of contrast c near 0.16 c).

    Returns:
        The blobs, strongest first (ties in row-major, then scale, order).

    Shape:
        image: (H, W).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold <= 0:
        raise SegflowError(f"blob threshold must be a number > 0, got {threshold!r}")
    responses, scales = dog_stack(image, sigmas)
    spread = np.stack([cv2.dilate(plane, _KERNEL) for plane in responses])
    # Pad the scale axis so the first and last responses compare with one neighbour each.
    floor = np.full((1, *responses.shape[1:]), -np.inf, dtype=np.float32)
    padded = np.concatenate([floor, spread, floor])
    peaks = (
        (responses >= padded[1:-1])
        & (responses >= padded[:-2])
        & (responses >= padded[2:])
        & (responses > threshold)
    )
    scale_index, rows, cols = np.nonzero(peaks)
    strength = responses[scale_index, rows, cols]
    order = np.argsort(-strength, kind="stable")
    radii = math.sqrt(2.0) * scales
    kept: list[int] = []
    for candidate in order:
        centre = np.array([rows[candidate], cols[candidate]], dtype=np.float64)
        radius = radii[scale_index[candidate]]
        if kept:
            others = np.array(kept)
            distance = np.hypot(rows[others] - centre[0], cols[others] - centre[1])
            if (distance < radii[scale_index[others]] + radius).any():
                continue
        kept.append(int(candidate))
    index = np.array(kept, dtype=np.int64)
    return Blobs(
        np.stack([rows[index], cols[index]], axis=1).astype(np.int64),
        scales[scale_index[index]].astype(np.float64),
        strength[index].astype(np.float64),
    )


BLOB_FEATURES = ("blob_count", "blob_area_mean", "blob_area_max")
"""Per-image features of :func:`blob_features`, in order."""


def blob_features(
    images: np.ndarray,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """Per image: the number of DoG blobs and their mean and largest area (``pi r^2`` with
    ``r = sqrt(2) s``, :attr:`Blobs.radii`) as fractions of the image's area (0 without blobs).

    Args:
        images: gray planes, float, one per image.
        sigmas: increasing Gaussian sigmas (pixels).
        threshold: the least DoG response of a blob.

    Returns:
        float64 columns :data:`BLOB_FEATURES`.

    Shape:
        images: (n, H, W); output: (n, 3).
    """
    out = np.zeros((len(images), len(BLOB_FEATURES)), dtype=np.float64)
    for index, image in enumerate(images):
        blobs = detect_blobs(image, sigmas, threshold)
        if blobs.count:
            areas = math.pi * blobs.radii**2 / image.size
            out[index] = (blobs.count, areas.mean(), areas.max())
    return out
