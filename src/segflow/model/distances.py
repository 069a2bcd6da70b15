"""Euclidean distance maps of binary masks, for the distance-based loss terms.

For each mask plane ``g`` (one per class) two maps, exact Euclidean distances in pixels
(OpenCV's ``distanceTransform`` with the precise mask, equal to scipy's
``distance_transform_edt``):

- ``inside``: at a mask pixel, the distance to the nearest background pixel (>= 1); 0 outside;
- ``outside``: at a background pixel, the distance to the nearest mask pixel (>= 1); 0 inside.

A plane without a boundary (empty, or all mask) has both maps 0: it has no contour to measure a
distance to. The loss terms derive what they need from the two maps
(:mod:`segflow.model.training.losses`): Kervadec's signed map ``outside - (inside - 1) * g``
(negative inside, 0 on the inner boundary), the unsigned distance to the boundary ``inside +
outside``, or the normalised boundary weight of the distance-penalised cross-entropy.

Where they are computed: per training sample, after its augmentation and crop
(:class:`segflow.model.datasets.MemmapDataset` with ``distances=True``), not once in the data
stage. segflow's augmentations include non-isometric warps (scale, elastic and grid distortions,
any albumentations list) and random crops: warping a stored distance map is not the distance map
of the warped mask (distances scale with a zoom, elastic warps bend them, a crop moves the
border), so the maps are recomputed from the augmented mask. That costs about 1 ms per 256 x 256
mask and class on one core, in the loader workers, against tens of ms for the model step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def plane_distances(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inside and outside distance maps of one binary plane.

    Args:
        plane: (H, W) bool or {0, 1} mask.

    Returns:
        (inside, outside): float32 (H, W) each; both 0 when the plane is empty or full.
    """
    import cv2  # only the distance-based loss terms need it

    fg = np.ascontiguousarray(plane, dtype=bool)
    if not fg.any() or fg.all():
        zero = np.zeros(fg.shape, dtype=np.float32)
        return zero, zero.copy()
    mask = fg.astype(np.uint8)
    inside = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return inside.astype(np.float32, copy=False), outside.astype(np.float32, copy=False)


def mask_distances(planes: np.ndarray) -> np.ndarray:
    """The distance maps of every plane of one sample's mask.

    Args:
        planes: (K, H, W) mask planes; values > 0.5 are mask (soft pseudo-label targets are
            thresholded there).

    Returns:
        float32 (2, K, H, W): ``[0]`` the inside maps, ``[1]`` the outside maps.
    """
    if planes.ndim != 3:
        raise ValueError(f"mask_distances: expected (K, H, W) planes, got shape {planes.shape}")
    out = np.zeros((2, *planes.shape), dtype=np.float32)
    for k, plane in enumerate(np.asarray(planes) > 0.5):
        out[0, k], out[1, k] = plane_distances(plane)
    return out


def batch_distances(masks: Tensor) -> Tensor:
    """:func:`mask_distances` of a batch, on the CPU, returned on the batch's device.

    Used for what cannot be precomputed per sample: the distance maps of the current
    prediction (the Hausdorff term's ``d_p``). No gradient flows through it.

    Args:
        masks: (N, K, H, W) binary (or thresholded-at-0.5) masks, any device.

    Returns:
        float32 (N, 2, K, H, W) on ``masks.device``.

    Shape:
        masks (N, K, H, W) -> (N, 2, K, H, W).
    """
    array = masks.detach().float().cpu().numpy()
    maps = np.stack([mask_distances(sample) for sample in array]) if len(array) else None
    if maps is None:
        return masks.new_zeros((0, 2, *masks.shape[1:]), dtype=torch.float32)
    return torch.from_numpy(maps).to(masks.device)
