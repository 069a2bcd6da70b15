"""The GPU input path: uint8 batches, lossless geometric augmentation and normalisation on the
device.

When every augmentation phase is made of lossless geometric transforms only (flips, rot90,
transpose, D4, a random crop without padding: :func:`is_device_geometric`), the loader workers
no longer touch pixels. Each draw is seeded exactly as the albumentations path seeds it
(:meth:`segflow.model.datasets.MemmapDataset.seed_transform`), the transforms' *parameters* are
drawn with their own generators (:func:`draw_geometry`), without applying them, and folded into
one integer coordinate map per sample: ``source = A @ target + b``, A a signed 2x2 permutation.
Workers ship the stored uint8 image and packed mask with that map; the trainer moves the batch
(pinned, ``non_blocking``) and :class:`DeviceBatcher` gathers every sample's pixels at once,
unpacks the mask planes and normalises on the device. The result equals the albumentations path
pixel for pixel (the same draws, the same float32 arithmetic), so a run stays reproducible and
resumable whichever path it takes.

Anything else (colour, elastic, affine, noise...) keeps the albumentations path in the workers.
The choice follows from the augmentation spec and the data (uint8 images, masks of at most 8
classes, no distance maps, no pseudo-labels) and is made on CUDA only: on the CPU the model step
dominates and today's path stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

from segflow.core.errors import SegflowError

# albumentations classes whose apply() is a signed permutation of the pixel axes, and the crop.
PERMUTATIONS = (
    "HorizontalFlip",
    "VerticalFlip",
    "Transpose",
    "RandomRotate90",
    "D4",
    "SquareSymmetry",
)
CROPS = ("RandomCrop",)
# Columns of one sample's geometry: A (row-major), b, output height and width.
GEOMETRY_FIELDS = 8
IDENTITY = (1, 0, 0, 1, 0, 0)


def is_device_geometric(transform: Any) -> bool:
    """Whether ``transform`` (an ``albumentations.Compose`` or None) is lossless geometry only.

    Args:
        transform: one phase's pipeline (:func:`segflow.model.training.augment.build_augmentation`).

    Returns:
        True for None, or a Compose of probability 1 whose every entry is a flip, rot90,
        transpose, D4 or a RandomCrop that never pads; False for anything else (nested
        compositions included).
    """
    if transform is None:
        return True
    entries = getattr(transform, "transforms", None)
    if entries is None or float(getattr(transform, "p", 1.0)) < 1.0:
        return False
    for entry in entries:
        name = type(entry).__name__
        if name in CROPS:
            if getattr(entry, "pad_if_needed", False):
                return False
        elif name not in PERMUTATIONS:
            return False
    return True


@cache
def _permutation_map(apply: _BoundApply) -> tuple[tuple[int, ...], bool]:
    """(A row-major, (corner_i, corner_j)) of one permutation op, and whether it swaps the axes.

    Read off the transform's own ``apply`` on a 2x3 probe, so it is albumentations' semantics
    whatever its version: target (i, j) reads source A @ (i, j) + corner * (size - 1).
    """
    probe = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    result = np.asarray(apply(probe))
    shape = tuple(result.shape[:2])
    if shape not in ((2, 3), (3, 2)) or result.size != 6:
        raise SegflowError(f"augment: {apply.key} changes the image size (device path)")
    src = np.stack(np.divmod(result.reshape(shape).astype(np.int64), 3), axis=-1)
    b = src[0, 0]
    a = np.stack([src[1, 0] - b, src[0, 1] - b], axis=1)  # columns: d/di, d/dj
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    expected = np.einsum("kl,lij->ijk", a, np.stack([ii, jj])) + b
    if not np.array_equal(expected, src) or sorted(np.abs(a).sum(axis=0).tolist()) != [1, 1]:
        raise SegflowError(f"augment: {apply.key} is not an axis permutation (device path)")
    corner = (int(b[0] != 0), int(b[1] != 0))
    return (int(a[0, 0]), int(a[0, 1]), int(a[1, 0]), int(a[1, 1]), *corner), shape == (3, 2)


class _BoundApply:
    """A transform's ``apply`` with its drawn parameters; hashable by class and parameters (the
    cache key of :func:`_permutation_map`)."""

    def __init__(self, entry: Any, params: Mapping[str, Any]) -> None:
        self.apply, self.params = entry.apply, dict(params)
        self.key = (type(entry).__name__, tuple(sorted(self.params.items())))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.apply(image, **self.params)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BoundApply) and other.key == self.key


def draw_geometry(transform: Any, height: int, width: int, channels: int) -> np.ndarray:
    """One sample's geometry from ``transform``'s own (already seeded) generators.

    Draws exactly what ``transform(image=..., mask=...)`` would draw (the same calls in the same
    order: ``should_apply``, ``get_params``, ``get_params_dependent_on_data``) but moves no
    pixel; the ops are composed into one coordinate map.

    Args:
        transform: a pipeline accepted by :func:`is_device_geometric`, seeded for this draw.
        height, width, channels: the stored image's shape.

    Returns:
        int64 (8,): A row-major (4), b (2), output height and width. Target pixel (i, j) of the
        augmented image is source pixel A @ (i, j) + b.
    """
    a = np.eye(2, dtype=np.int64)
    b = np.zeros(2, dtype=np.int64)
    h, w = height, width
    for entry in getattr(transform, "transforms", ()) if transform is not None else ():
        fake = {
            "image": np.broadcast_to(np.zeros((), np.uint8), (h, w, channels)),
            "mask": np.broadcast_to(np.zeros((), np.uint8), (h, w)),
        }
        if not entry.should_apply():
            continue
        params = entry.get_params()
        params = entry.update_transform_params(params=params, data=fake)
        params.update(entry.get_params_dependent_on_data(params=params, data=fake))
        name = type(entry).__name__
        if name in CROPS:
            if params.get("pad_params") is not None:
                raise SegflowError(f"augment: {name} would pad (device path takes no padding)")
            x_min, y_min, x_max, y_max = (int(v) for v in params["crop_coords"])
            b = a @ np.array([y_min, x_min], dtype=np.int64) + b
            h, w = y_max - y_min, x_max - x_min
            continue
        drawn = {k: v for k, v in params.items() if k in ("group_element", "factor")}
        op, swap = _permutation_map(_BoundApply(entry, drawn))
        a_op = np.array(op[:4], dtype=np.int64).reshape(2, 2)
        b_op = np.array([op[4] * (h - 1), op[5] * (w - 1)], dtype=np.int64)
        b = a @ b_op + b
        a = a @ a_op
        if swap:
            h, w = w, h
    return np.array([*a.reshape(-1), *b, h, w], dtype=np.int64)


def apply_geometry(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    geometry: torch.Tensor,
    out_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every sample's coordinate map at once: one gather for the images, one for the masks.

    Args:
        images: the stored pixels, any dtype.
        masks: packed label masks, or None.
        geometry: per sample (:func:`draw_geometry`), on the images' device.
        out_size: (h, w), the same for every sample (read on the host: no device sync).

    Returns:
        (images, masks) augmented.

    Shape:
        images: (N, H, W, C) -> (N, h, w, C); masks: (N, H, W) -> (N, h, w); geometry: (N, 8).
    """
    n, height, width, channels = images.shape
    h, w = out_size
    device = images.device
    g = geometry.to(device=device, dtype=torch.int64)
    ii = torch.arange(h, device=device).view(1, h, 1)
    jj = torch.arange(w, device=device).view(1, 1, w)

    def col(k: int) -> torch.Tensor:
        return g[:, k].view(n, 1, 1)

    src_i = col(0) * ii + col(1) * jj + col(4)
    src_j = col(2) * ii + col(3) * jj + col(5)
    flat = (src_i * width + src_j).view(n, h * w)
    out = images.reshape(n, height * width, channels)
    out = out.gather(1, flat.unsqueeze(2).expand(n, h * w, channels)).view(n, h, w, channels)
    if masks is not None:
        masks = masks.reshape(n, height * width).gather(1, flat).view(n, h, w)
    return out, masks


class DeviceBatcher:
    """Turns a loader batch into model inputs on the device.

    Batches of the device path (``geometry`` present, uint8 ``image`` (N, H, W, C) and packed
    ``mask`` (N, H, W)) are moved, augmented, unpacked and normalised there; float batches of
    the albumentations path are only moved. Either way the result is ``image`` float32
    (N, C, h, w), ``mask`` float32 (N, K, h, w), ``distance`` if any, ``pseudo``.

    Args:
        mean, std: per-channel normalisation in [0, 1] units (std without zeros).
        scale: the stored pixels' full scale (255 for uint8).
        n_classes: mask planes to unpack.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], scale: float, n_classes: int
    ) -> None:
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        self.std = torch.as_tensor(np.asarray(std, dtype=np.float32))
        self.scale = float(scale)
        self.n_classes = int(n_classes)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        return self._on[device]

    def __call__(
        self, batch: Mapping[str, Any], device: torch.device, channels_last: bool = False
    ) -> dict[str, Any]:
        """Args:
            batch: a loader batch.
            device: the model's device.
            channels_last: keep the NHWC layout the gather produces (CUDA); else contiguous
                NCHW as the albumentations path gives.

        Returns:
            The model inputs (see the class docstring).
        """
        non_blocking = device.type == "cuda"
        out: dict[str, Any] = {"pseudo": batch.get("pseudo")}
        if "geometry" not in batch:
            out["image"] = batch["image"].to(device, non_blocking=non_blocking)
            if "mask" in batch:
                out["mask"] = batch["mask"].to(device, non_blocking=non_blocking)
            if "distance" in batch:
                out["distance"] = batch["distance"].to(device, non_blocking=non_blocking)
            return out
        geometry = batch["geometry"]
        sizes = geometry[:, 6:8]
        if not bool((sizes == sizes[0]).all()):  # host tensor: no device sync
            raise SegflowError("augment: the samples of one batch have different output sizes")
        out_size = (int(sizes[0, 0]), int(sizes[0, 1]))
        images = batch["image"].to(device, non_blocking=non_blocking)
        masks = batch.get("mask")
        if masks is not None:
            masks = masks.to(device, non_blocking=non_blocking)
        identity = bool((geometry[:, :6] == torch.tensor(IDENTITY)).all())
        if not identity or out_size != tuple(images.shape[1:3]):
            images, masks = apply_geometry(
                images, masks, geometry.to(device, non_blocking=non_blocking), out_size
            )
        mean, std = self._stats(device)
        scaled = (images.float() / self.scale - mean) / std
        scaled = scaled.permute(0, 3, 1, 2)
        out["image"] = (
            scaled.contiguous(memory_format=torch.channels_last)
            if channels_last
            else scaled.contiguous()
        )
        if masks is not None:
            bits = torch.arange(self.n_classes, device=device, dtype=torch.int32).view(1, -1, 1, 1)
            planes = (masks.to(torch.int32).unsqueeze(1) >> bits) & 1
            out["mask"] = planes.float()
        return out
