"""Training data: the preprocessed memmaps as a torch Dataset, a balanced sampler, padding.

Training never decodes a PNG: :class:`MemmapDataset` slices ``train_images.npy`` /
``train_masks.npy`` (written by :mod:`segflow.data.preprocess`) with ``np.load(mmap_mode="r")``.
The memmaps are opened lazily in the process that reads them (each DataLoader worker opens its
own), so the dataset pickles as a few paths and an index array however large the data is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from segflow.artifacts.arrays import (
    INDEX,
    STATS,
    STATS_KEYS,
    classes_of,
    images_file,
    index_file,
    masks_file,
    read_index,
    read_stats,
)
from segflow.core.errors import SegflowError
from segflow.formats.labels import unpack_labels
from segflow.model.distances import mask_distances

# Full-scale value of each stored pixel type: pixels are scaled to [0, 1] before normalising,
# the same scale in which preprocess computed train_mean / train_std.
PIXEL_SCALE = {"uint8": 255.0, "uint16": 65535.0}


def pixel_scale(dtype: np.dtype | str, where: str) -> float:
    """255 for uint8 images, 65535 for uint16; SegflowError naming ``where`` otherwise."""
    name = np.dtype(dtype).name
    if name not in PIXEL_SCALE:
        raise SegflowError(f"{where}: image dtype {name} is not supported (uint8 or uint16)")
    return PIXEL_SCALE[name]


def safe_std(std: Sequence[float]) -> np.ndarray:
    """Per-channel std with zeros replaced by 1 (a constant channel is centred, not blown up)."""
    std = np.asarray(std, dtype=np.float32)
    return np.where(std > 0, std, np.float32(1.0)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SegmentationArrays:
    """The artifacts of one preprocess output folder, validated.

    Use :meth:`open`; the arrays themselves are not loaded (datasets memory-map them).
    ``index`` is the train side's; the test side's is read only when asked for
    (:meth:`rows_for` with ``split="test"``: a pseudo-labelling round).
    """

    root: Path
    index: pd.DataFrame
    stats: dict[str, Any]

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> SegmentationArrays:
        """Check that the preprocess outputs exist and agree; read the index and stats.

        Args:
            root: the preprocess output folder.

        Returns:
            The validated arrays description.

        Raises:
            SegflowError: naming the missing or inconsistent file.
        """
        root = Path(root)
        for name in (images_file("train"), masks_file(), INDEX, STATS):
            if not (root / name).is_file():
                raise SegflowError(f"{root / name} does not exist (run preprocess first)")
        stats = read_stats(root, required=STATS_KEYS)
        index = read_index(root, check=True)
        arrays = cls(root, index, stats)
        arrays._check_shapes()
        return arrays

    def _check_shapes(self) -> None:
        # Header-only reads (mmap): a mismatch here means files from different preprocess runs.
        images = np.load(self.train_images_path, mmap_mode="r")
        masks = np.load(self.train_masks_path, mmap_mode="r")
        n_train = int((self.index["split"] == "train").sum())
        expected = (n_train, self.height, self.width, self.channels)
        if images.shape != expected:
            raise SegflowError(
                f"{self.train_images_path}: shape {images.shape}, but index.parquet/stats.json "
                f"describe {expected}"
            )
        if masks.shape != expected[:3]:
            raise SegflowError(
                f"{self.train_masks_path}: shape {masks.shape}, expected {expected[:3]}"
            )
        if images.dtype.name != self.dtype:
            raise SegflowError(
                f"{self.train_images_path}: dtype {images.dtype}, stats.json says {self.dtype}"
            )
        pixel_scale(images.dtype, str(self.train_images_path))
        for key in ("train_mean", "train_std"):
            if len(self.stats[key]) != self.channels:
                raise SegflowError(
                    f"{self.root / 'stats.json'}: {key} has {len(self.stats[key])} values for "
                    f"{self.channels} channel(s)"
                )

    @property
    def train_images_path(self) -> Path:
        return self.root / images_file("train")

    @property
    def train_masks_path(self) -> Path:
        return self.root / masks_file()

    @property
    def test_images_path(self) -> Path:
        path = self.root / images_file("test")
        if not path.is_file():
            raise SegflowError(f"{path} does not exist (run preprocess first)")
        return path

    @property
    def height(self) -> int:
        return int(self.stats["height"])

    @property
    def width(self) -> int:
        return int(self.stats["width"])

    @property
    def channels(self) -> int:
        return int(self.stats["channels"])

    @property
    def dtype(self) -> str:
        return str(self.stats["dtype"])

    @property
    def classes(self) -> list[str]:
        """Class names in bit order of the packed masks (binary data: one class)."""
        return classes_of(self.stats)

    @property
    def mean(self) -> list[float]:
        """Per-channel mean of the train images in [0, 1] units."""
        return [float(v) for v in self.stats["train_mean"]]

    @property
    def std(self) -> list[float]:
        """Per-channel std of the train images in [0, 1] units (0 replaced by 1)."""
        return safe_std(self.stats["train_std"]).tolist()

    def rows_for(self, ids: Sequence[str], split: str = "train", where: str = "") -> np.ndarray:
        """Array rows of ``ids`` in ``split``, in the order given.

        Args:
            ids: item ids.
            split: "train" or "test".
            where: the file the ids came from, for the error message.

        Returns:
            int64 rows.

        Raises:
            SegflowError: when an id is not in index.parquet for that split.
        """
        index = self.index if split == "train" else read_index(self.root, split=split)
        table = index.set_index("id")["row"]
        ids = pd.Index(ids)
        unknown = ids[~ids.isin(table.index)]
        if len(unknown):
            source = f"{where}: " if where else ""
            raise SegflowError(
                f"{source}{len(unknown)} id(s) not among the preprocessed {split} items in "
                f"{self.root / index_file(split)} (e.g. {', '.join(map(str, unknown[:3]))})"
            )
        return table.loc[ids].to_numpy(dtype=np.int64)

    def empty_masks(self, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Whether each train mask of ``rows`` is empty, read from the memmap in chunks.

        Shape:
            rows: (K,); output: (K,) bool.
        """
        masks = np.load(self.train_masks_path, mmap_mode="r")
        rows = np.asarray(rows, dtype=np.int64)
        empty = np.empty(len(rows), dtype=bool)
        for start in range(0, len(rows), chunk):
            part = np.asarray(masks[rows[start : start + chunk]])
            empty[start : start + chunk] = ~part.reshape(len(part), -1).any(axis=1)
        return empty

    def class_presence(self, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Which classes each train mask of ``rows`` holds (bit k of the packed label = class
        k), read from the memmap in chunks.

        Shape:
            rows: (K,); output: (K, len(classes)) bool.
        """
        masks = np.load(self.train_masks_path, mmap_mode="r")
        rows = np.asarray(rows, dtype=np.int64)
        n_classes = len(self.classes)
        present = np.zeros((len(rows), n_classes), dtype=bool)
        for start in range(0, len(rows), chunk):
            part = np.asarray(masks[rows[start : start + chunk]])
            flat = part.reshape(len(part), -1)
            for k in range(n_classes):
                present[start : start + chunk, k] = ((flat >> k) & 1).any(axis=1)
        return present


class MemmapDataset(Dataset):
    """Rows of a preprocessed (N, H, W, C) image array (and (N, H, W) mask array) as tensors.

    Each item is a dict: ``image`` float32 (C, H, W), normalised as (pixel / full scale - mean) /
    std; ``mask`` float32 (K, H, W) in {0, 1}, one plane per class (only when ``masks_path`` is
    given); ``distance`` float32 (2, K, H, W), the mask's inside and outside distance maps
    (:func:`segflow.model.distances.mask_distances`, only with ``distances``), computed from the
    mask *after* the transform, so they are those of the augmented mask; ``row`` the
    array row (int). ``transform`` (an albumentations transform) is applied to the uint8/uint16
    image and the mask together, before scaling, so spatial augmentations move both alike.
    """

    def __init__(
        self,
        images_path: str | os.PathLike[str],
        rows: np.ndarray,
        masks_path: str | os.PathLike[str] | None = None,
        transform: Any = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        n_classes: int = 1,
        mask_rows: np.ndarray | None = None,
        pseudo: bool = False,
        distances: bool = False,
    ) -> None:
        """Args:
        images_path: ``*_images.npy`` (N, H, W, C), uint8 or uint16.
        rows: which rows of the arrays make up the dataset, in order.
        masks_path: ``train_masks.npy`` (N, H, W) packed labels (bit k = class k; binary data
            {0, 1}), or None for unlabelled images.
        transform: an albumentations transform called as ``transform(image=..., mask=...)``.
        mean: per-channel mean in [0, 1] units (``stats.json`` train_mean).
        std: per-channel std in [0, 1] units (``stats.json`` train_std).
        n_classes: mask planes to unpack from the packed labels.
        mask_rows: rows of the mask array, when they differ from ``rows`` (pseudo-labelled test
            images: targets are stored apart from the images).
        pseudo: mark the items as pseudo-labelled (``sample["pseudo"]`` 1.0), for the loss.
        distances: add each mask's distance maps (``sample["distance"]``), for the
            distance-based loss terms; needs ``masks_path``.
        """
        self.images_path = str(images_path)
        self.masks_path = str(masks_path) if masks_path is not None else None
        self.rows = np.asarray(rows, dtype=np.int64)
        self.mask_rows = self.rows if mask_rows is None else np.asarray(mask_rows, dtype=np.int64)
        if len(self.mask_rows) != len(self.rows):
            raise SegflowError(
                f"{self.masks_path}: {len(self.mask_rows)} mask rows for {len(self.rows)} images"
            )
        self.pseudo = pseudo
        if distances and masks_path is None:
            raise SegflowError(f"{images_path}: distance maps need masks; no masks_path given")
        self.distances = distances
        self.transform = transform
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = safe_std(std)
        self.n_classes = n_classes
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._scale = 1.0

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        # Ship paths, not open memmaps: workers reopen the files themselves.
        state = self.__dict__.copy()
        state["_images"] = None
        state["_masks"] = None
        return state

    def _open(self) -> None:
        images = np.load(self.images_path, mmap_mode="r")
        if images.ndim != 4:
            raise SegflowError(f"{self.images_path}: expected (N, H, W, C), got {images.shape}")
        self._scale = pixel_scale(images.dtype, self.images_path)
        if len(self.mean) not in (1, images.shape[3]) or len(self.std) not in (1, images.shape[3]):
            raise SegflowError(
                f"{self.images_path}: {images.shape[3]} channel(s) but mean/std have "
                f"{len(self.mean)}/{len(self.std)} values"
            )
        if self.masks_path is not None:
            self._masks = np.load(self.masks_path, mmap_mode="r")
        self._images = images

    def seed_transform(self, seed: int) -> None:
        """Reseed the transform's own RNG (albumentations ignores numpy's and Python's seeds).

        Called per epoch (and per DataLoader worker) so that augmentations are reproducible
        and workers do not repeat each other's draws.
        """
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % 2**32)

    def raw_item(self, item: int) -> dict[str, Any]:
        """Item ``item`` as stored, for the device path
        (:mod:`segflow.model.training.device_augment`): no transform, no scaling.

        Returns:
            ``image`` uint8 tensor (H, W, C), ``mask`` the packed labels (H, W) (when there
            are masks), ``row``, ``pseudo``.
        """
        if self._images is None:
            self._open()
        row = int(self.rows[item])
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.array(self._images[row])),
            "row": row,
        }
        if self._masks is not None:
            mask = np.array(self._masks[int(self.mask_rows[item])])
            sample["mask"] = torch.from_numpy(mask)
            sample["pseudo"] = torch.tensor(1.0 if self.pseudo else 0.0)
        return sample

    def __getitem__(self, item: int) -> dict[str, Any]:
        if self._images is None:
            self._open()
        row = int(self.rows[item])
        image = np.asarray(self._images[row])
        mask = None
        if self._masks is not None:
            mask = np.asarray(self._masks[int(self.mask_rows[item])])
        # Soft targets (pseudo-labels) are (K, H, W) probabilities: channels-last for albumentations.
        soft = mask is not None and mask.ndim == 3
        if soft:
            mask = mask.transpose(1, 2, 0).astype(np.float32)
        if self.transform is not None:
            if mask is not None:
                # OpenCV warps have no uint32 (17-32 classes): move the same bits as int32.
                signed = mask.dtype == np.uint32
                out = self.transform(image=image, mask=mask.view(np.int32) if signed else mask)
                image, mask = out["image"], out["mask"]
                if signed:
                    mask = np.ascontiguousarray(mask).view(np.uint32)
            else:
                image = self.transform(image=image)["image"]
        if image.ndim == 2:  # some transforms drop a single channel axis
            image = image[:, :, None]
        scaled = (image.astype(np.float32) / self._scale - self.mean) / self.std
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1))),
            "row": row,
        }
        if mask is not None:
            if soft:
                planes = np.asarray(mask).reshape(*mask.shape[:2], -1).transpose(2, 0, 1)
            else:  # augmented packed (nearest-neighbour moves whole labels), then split
                planes = unpack_labels(np.asarray(mask), self.n_classes)
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))
            if self.distances:
                sample["distance"] = torch.from_numpy(mask_distances(np.asarray(planes)))
            sample["pseudo"] = torch.tensor(1.0 if self.pseudo else 0.0)
        return sample


def balanced_sampler(
    is_empty: np.ndarray, empty_ratio: float | None, num_samples: int, seed: int
) -> Sampler | None:
    """Draw images with replacement so that a share ``empty_ratio`` of them has an empty mask.

    Args:
        is_empty: per dataset item, whether its mask is empty.
        empty_ratio: the expected share of empty masks among the draws, in [0, 1]; None keeps
            the natural distribution (returns None: use plain shuffling).
        num_samples: draws per epoch.
        seed: seed of the sampler's own generator.

    Returns:
        A ``WeightedRandomSampler`` (its ``generator`` may be reseeded per epoch), or None.

    Shape:
        is_empty: (N,) bool.
    """
    if empty_ratio is None:
        return None
    if not 0.0 <= empty_ratio <= 1.0:
        raise SegflowError(f"train.empty_ratio must be in [0, 1], got {empty_ratio}")
    is_empty = np.asarray(is_empty, dtype=bool)
    n_empty = int(is_empty.sum())
    n_full = len(is_empty) - n_empty
    if (empty_ratio > 0 and n_empty == 0) or (empty_ratio < 1 and n_full == 0):
        raise SegflowError(
            f"train.empty_ratio = {empty_ratio} but the training set has {n_empty} empty and "
            f"{n_full} non-empty masks"
        )
    weights = np.where(
        is_empty,
        empty_ratio / max(n_empty, 1),
        (1.0 - empty_ratio) / max(n_full, 1),
    )
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=int(num_samples),
        replacement=True,
        generator=generator,
    )


def class_balance_weights(
    presence: np.ndarray, mode: str, empty_ratio: float | None = None
) -> np.ndarray:
    """Per-item draw probabilities that favour images of rare classes (multi-label data).

    A class present in ``n_k`` images weighs ``1 / sqrt(n_k)`` (``sqrt``) or ``1 / n_k``
    (``inverse``: with one class per image, every class is then drawn equally often); an image
    weighs as its rarest class (the largest weight among its classes). Images without any class
    (empty masks) keep their natural share, or ``empty_ratio`` when given; the non-empty ones
    share the rest in proportion to their weights.

    Args:
        presence: per item and class, whether the item's mask holds that class.
        mode: ``sqrt`` or ``inverse``.
        empty_ratio: the share of empty masks among the draws, in [0, 1]; None = natural.

    Returns:
        float64 probabilities summing to 1.

    Shape:
        presence: (N, K) bool; output: (N,).

    Raises:
        SegflowError: an unknown mode, fewer than two classes, no non-empty mask, or an
            ``empty_ratio`` the items cannot give.
    """
    presence = np.asarray(presence, dtype=bool)
    if mode not in ("sqrt", "inverse"):
        raise SegflowError(f"train.class_balance must be none, sqrt or inverse, got {mode!r}")
    if presence.ndim != 2 or presence.shape[1] < 2:
        classes = presence.shape[1] if presence.ndim == 2 else 0
        raise SegflowError(
            f"train.class_balance: {mode} needs multi-label data (data.classes with at least "
            f"2 classes); this data has {classes} class(es) - use train.empty_ratio instead"
        )
    counts = presence.sum(axis=0)
    if not counts.any():
        raise SegflowError("train.class_balance: no training mask holds any class")
    with np.errstate(divide="ignore"):
        class_weight = np.where(counts > 0, 1.0 / counts.astype(np.float64), 0.0)
    if mode == "sqrt":
        class_weight = np.sqrt(class_weight)
    item_weight = np.where(presence, class_weight[None, :], 0.0).max(axis=1)
    empty = ~presence.any(axis=1)
    n_empty = int(empty.sum())
    share = n_empty / len(empty) if empty_ratio is None else float(empty_ratio)
    if not 0.0 <= share <= 1.0:
        raise SegflowError(f"train.empty_ratio must be in [0, 1], got {empty_ratio}")
    if share > 0 and n_empty == 0:
        raise SegflowError(
            f"train.empty_ratio = {empty_ratio} but the training set has no empty masks"
        )
    if share >= 1.0:
        raise SegflowError(
            "train.class_balance: empty_ratio 1 leaves no draw for the classes to balance"
        )
    weights = (1.0 - share) * item_weight / item_weight.sum()
    if n_empty:
        weights[empty] = share / n_empty
    return weights


def class_balanced_sampler(
    presence: np.ndarray,
    mode: str,
    num_samples: int,
    seed: int,
    empty_ratio: float | None = None,
) -> Sampler:
    """Draw images with replacement by :func:`class_balance_weights` (``train.class_balance``).

    Args:
        presence: per item and class, whether the item's mask holds that class.
        mode: ``sqrt`` or ``inverse``.
        num_samples: draws per epoch.
        seed: seed of the sampler's own generator (the same seed gives the same draws).
        empty_ratio: share of empty masks among the draws; None = natural.

    Returns:
        A ``WeightedRandomSampler`` (its ``generator`` may be reseeded per epoch).

    Shape:
        presence: (N, K) bool.
    """
    weights = class_balance_weights(presence, mode, empty_ratio)
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=int(num_samples),
        replacement=True,
        generator=torch.Generator().manual_seed(int(seed)),
    )


class PseudoMixSampler(Sampler[int]):
    """Every epoch: the real items (or draws from ``real_sampler``) plus a fresh random subset
    of the pseudo-labelled items, capped so they are at most ``max_share`` of the epoch.

    Items 0..n_real-1 are real and n_real.. are pseudo-labelled (a ConcatDataset in that order).
    The ``generator`` is reseeded per epoch by the trainer, so a resumed epoch draws the same.
    """

    def __init__(
        self,
        n_real: int,
        n_pseudo: int,
        max_share: float,
        generator: torch.Generator,
        real_sampler: Sampler[int] | None = None,
    ) -> None:
        if not 0.0 <= max_share < 1.0:
            raise SegflowError(f"pseudo.max_pseudo_share must be in [0, 1), got {max_share}")
        self.n_real, self.n_pseudo = n_real, n_pseudo
        self.real_sampler = real_sampler
        self.generator = generator
        real_draws = len(real_sampler) if real_sampler is not None else n_real
        # share = p / (real + p)  <=>  p = share / (1 - share) * real
        self.pseudo_draws = min(n_pseudo, int(max_share / (1.0 - max_share) * real_draws))
        self.real_draws = real_draws

    def __len__(self) -> int:
        return self.real_draws + self.pseudo_draws

    def __iter__(self) -> Iterator[int]:
        if self.real_sampler is not None:
            real = torch.as_tensor(list(self.real_sampler), dtype=torch.int64)
        else:
            real = torch.arange(self.n_real)
        pseudo = self.n_real + torch.randperm(self.n_pseudo, generator=self.generator)
        items = torch.cat([real, pseudo[: self.pseudo_draws]])
        yield from items[torch.randperm(len(items), generator=self.generator)].tolist()


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom and right of a batch up to multiples of ``divisor``.

    Encoders halve the resolution several times (5 times: a multiple of 32); a 101x101 TGS
    image becomes 128x128. Reflection keeps the border statistics natural, unlike zeros.

    Args:
        x: a batch.
        divisor: required multiple of height and width.

    Returns:
        (padded, (pad_h, pad_w)); undo with ``crop_to(y, h, w)``.

    Shape:
        x: (N, C, H, W); padded: (N, C, H + pad_h, W + pad_w).
    """
    if divisor < 1:
        raise ValueError(f"divisor must be positive, got {divisor}")
    height, width = x.shape[-2:]
    return pad_to_size(x, height + -height % divisor, width + -width % divisor)


def pad_to_size(x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom and right of a batch to ``height`` x ``width`` (at least its size).

    Pads larger than the image (tiny inputs, e.g. a model's minimum input size) are done in
    several reflections; a side of 1 pixel, which cannot reflect, is replicated.

    Returns:
        (padded, (pad_h, pad_w)); undo with ``crop_to(y, h, w)``.

    Shape:
        x: (N, C, H, W); padded: (N, C, max(H, height), max(W, width)).
    """
    pad_h, pad_w = max(height - x.shape[-2], 0), max(width - x.shape[-1], 0)
    remaining_h, remaining_w = pad_h, pad_w
    while remaining_h or remaining_w:
        # reflect needs pad < size; grow in steps of at most size - 1.
        step_h = min(remaining_h, x.shape[-2] - 1)
        step_w = min(remaining_w, x.shape[-1] - 1)
        if (remaining_h and step_h == 0) or (remaining_w and step_w == 0):
            x = F.pad(x, (0, remaining_w, 0, remaining_h), mode="replicate")
            break
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        remaining_h -= step_h
        remaining_w -= step_w
    return x, (pad_h, pad_w)


def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left ``height`` x ``width`` of a batch (undoes :func:`pad_to_multiple`).

    Shape:
        x: (..., H', W') with H' >= height, W' >= width; output: (..., height, width).
    """
    return x[..., :height, :width]
