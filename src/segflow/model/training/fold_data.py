"""What one fold trains and validates on: the row split, datasets, loaders and their seeding.

Every generator involved (Python's, numpy's, torch's, the loader's and sampler's) is reseeded
per epoch from (seed, epoch) by :meth:`FoldData.seed_epoch`, so an epoch draws the same batches
whether the run was resumed or not. The sampler hands every draw its own augmentation seed
(:class:`SeededSampler`, :class:`SeededItems`), so what an item looks like does not depend on
which worker loads it, or on how many workers there are; that lets the workers persist across
epochs instead of being started again for each one. For the same reason each draw names its
augmentation phase (``augment`` as a list of phases): every worker holds every phase's pipeline,
and the epoch's phase travels with the draw, so a switch reaches persistent workers too.

``train.steps_per_epoch`` fixes an epoch at that many batches (:class:`EpochDraws`): passes of
the sampler (shuffled, balanced by ``empty_ratio`` or ``class_balance``, mixed with pseudo-labels), reshuffled each
pass and cut at ``steps_per_epoch x batch_size`` draws.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, Sampler

from segflow.core.errors import SegflowError
from segflow.model.datasets import (
    PIXEL_SCALE,
    MemmapDataset,
    PseudoMixSampler,
    SegmentationArrays,
    balanced_sampler,
    class_balanced_sampler,
)
from segflow.model.training.augment import AugmentSchedule, build_augmentation_schedule
from segflow.model.training.device_augment import (
    IDENTITY,
    DeviceBatcher,
    draw_geometry,
    is_device_geometric,
)
from segflow.model.training.train_options import TrainOptions

# Per-channel (mean, std) in [0, 1] units.
Normalisation = tuple[list[float], list[float]]


def read_folds(folds_csv: str | os.PathLike[str]) -> pd.DataFrame:
    """The folds stage's ``folds.csv`` (columns id, fold, ...), checked.

    Raises:
        SegflowError: unreadable file, missing columns or an id listed twice.
    """
    folds_csv = Path(folds_csv)
    if not folds_csv.is_file():
        raise SegflowError(f"{folds_csv} does not exist (run the folds stage first)")
    try:
        folds = pd.read_csv(folds_csv, dtype={"id": str})  # ids like "0042" stay strings
    except Exception as error:
        raise SegflowError(f"{folds_csv} is not a readable CSV ({error})") from None
    for column in ("id", "fold"):
        if column not in folds.columns:
            raise SegflowError(f"{folds_csv}: missing column {column!r}")
    if folds["id"].duplicated().any():
        raise SegflowError(
            f"{folds_csv}: id {folds['id'][folds['id'].duplicated()].iloc[0]!r} twice"
        )
    return folds


def split_rows(
    arrays: SegmentationArrays, folds_csv: str | os.PathLike[str], fold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Array rows of the training items (folds != ``fold``) and validation items (== ``fold``).

    Args:
        arrays: the preprocess outputs (index.parquet maps id -> row).
        folds_csv: the folds stage's ``folds.csv`` (columns id, fold, ...).
        fold: the validation fold.

    Returns:
        (train_rows, val_rows), each in folds.csv order.

    Raises:
        SegflowError: unreadable folds.csv, missing columns, unknown fold, or ids that are not
            in the preprocessed arrays.
    """
    folds = read_folds(folds_csv)
    available = sorted(int(v) for v in folds["fold"].unique())
    if fold not in available:
        raise SegflowError(f"{folds_csv}: no fold {fold} (folds: {available})")
    is_val = (folds["fold"] == fold).to_numpy()
    train_rows = arrays.rows_for(folds.loc[~is_val, "id"], where=str(folds_csv))
    val_rows = arrays.rows_for(folds.loc[is_val, "id"], where=str(folds_csv))
    if len(train_rows) < 2:
        raise SegflowError(
            f"{folds_csv}: only {len(train_rows)} training item(s) outside fold {fold}"
        )
    return train_rows, val_rows


def full_rows(arrays: SegmentationArrays, folds_csv: str | os.PathLike[str]) -> np.ndarray:
    """Array rows of every item of folds.csv: what a full-data refit trains on.

    Args:
        arrays: the preprocess outputs.
        folds_csv: the folds stage's ``folds.csv`` (items it left out, such as dropped
            conflicting duplicates, stay out).

    Returns:
        The rows in folds.csv order.

    Raises:
        SegflowError: as :func:`split_rows`, or fewer than 2 items.
    """
    folds = read_folds(folds_csv)
    rows = arrays.rows_for(folds["id"], where=str(folds_csv))
    if len(rows) < 2:
        raise SegflowError(f"{folds_csv}: only {len(rows)} training item(s)")
    return rows


@dataclass(frozen=True)
class PseudoSpec:
    """Which pseudo-labels a training adds, before they are read (``segflow train
    --pseudo-dir``; :meth:`PseudoLabels.load` reads them).

    Attributes:
        directory: a pseudo-labelling round's selection (``selection.csv``, ``targets.npy``):
            those test images are trained on too, never validated on.
        max_share: at most this share of each epoch's draws are pseudo-labelled.
        weight: loss weight of a pseudo-labelled image relative to a real one.
    """

    directory: str | os.PathLike[str]
    max_share: float = 0.3
    weight: float = 1.0


@dataclass(frozen=True)
class PseudoLabels:
    """Pseudo-labelled test images that a round > 0 trains on (``segflow select-pseudo``).

    Attributes:
        targets_path: ``targets.npy``: packed label masks (M, H, W) (hard labels) or float16
            probabilities (M, K, H, W) (soft labels), at the preprocessed size.
        test_rows: the images' rows in ``test_images.npy``, aligned with the targets.
        max_share: at most this share of an epoch's draws are pseudo-labelled.
        weight: loss weight of a pseudo-labelled image relative to a real one.
    """

    targets_path: Path
    test_rows: np.ndarray
    max_share: float
    weight: float

    @classmethod
    def load(
        cls,
        pseudo_dir: str | os.PathLike[str],
        arrays: SegmentationArrays,
        max_share: float,
        weight: float,
    ) -> PseudoLabels:
        """Read a selection folder: ``selection.csv`` (selected ids in target order) and
        ``targets.npy``.

        Raises:
            SegflowError: missing files, targets of another size or count, or ids that are not
                test images of these arrays.
        """
        pseudo_dir = Path(pseudo_dir)
        for name in ("selection.csv", "targets.npy"):
            if not (pseudo_dir / name).is_file():
                raise SegflowError(f"{pseudo_dir / name} does not exist (run select-pseudo)")
        selection = pd.read_csv(pseudo_dir / "selection.csv", dtype={"id": str})
        ids = selection.loc[selection["selected"].astype(bool), "id"]
        targets = np.load(pseudo_dir / "targets.npy", mmap_mode="r")
        if len(targets) != len(ids) or targets.shape[-2:] != (arrays.height, arrays.width):
            raise SegflowError(
                f"{pseudo_dir / 'targets.npy'}: shape {targets.shape}, expected "
                f"{len(ids)} targets of {arrays.height}x{arrays.width}"
            )
        rows = arrays.rows_for(ids, split="test", where=str(pseudo_dir / "selection.csv"))
        return cls(pseudo_dir / "targets.npy", rows, float(max_share), float(weight))

    def fingerprint(self) -> str:
        """Digest of the targets and rows: a changed selection must not resume old weights."""
        digest = hashlib.sha256(np.asarray(self.test_rows, dtype=np.int64).tobytes())
        with open(self.targets_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(f"{self.max_share}:{self.weight}".encode())
        return digest.hexdigest()


def build_train_set(
    arrays: SegmentationArrays,
    rows: np.ndarray,
    transform: Any,
    pseudo: PseudoLabels | None = None,
    normalisation: Normalisation | None = None,
    distances: bool = False,
) -> tuple[Dataset, np.ndarray]:
    """The training dataset and whether each of its items has an empty mask.

    The one place that decides what is trained on: the real training rows, then (for a
    pseudo-labelling round) the pseudo-labelled test images, as one ``ConcatDataset``.

    Args:
        arrays: the preprocess outputs.
        rows: the training items' array rows.
        transform: the augmentation applied to each item (or None).
        pseudo: pseudo-labelled test images to append, or None.
        normalisation: per-channel (mean, std) the model is fed; None: the data's own
            (``arrays.mean``, ``arrays.std``).
        distances: the items carry their augmented mask's distance maps (``distance``), for
            the distance-based loss terms.

    Returns:
        (dataset, is_empty); is_empty has one entry per *real* item (balanced sampling and the
        pseudo share are decided on the real items).
    """
    mean, std = normalisation or (arrays.mean, arrays.std)
    dataset: Dataset = MemmapDataset(
        arrays.train_images_path,
        rows,
        arrays.train_masks_path,
        transform=transform,
        mean=mean,
        std=std,
        n_classes=len(arrays.classes),
        distances=distances,
    )
    if pseudo is not None and len(pseudo.test_rows):
        pseudo_set = MemmapDataset(
            arrays.test_images_path,
            pseudo.test_rows,
            pseudo.targets_path,
            transform=transform,
            mean=mean,
            std=std,
            n_classes=len(arrays.classes),
            mask_rows=np.arange(len(pseudo.test_rows)),
            pseudo=True,
            distances=distances,
        )
        dataset = ConcatDataset([dataset, pseudo_set])
    return dataset, arrays.empty_masks(rows)


@dataclass
class FoldData:
    """The training and validation data of one fold, with the generators that shuffle it.

    Attributes:
        train_set: the training items (:func:`build_train_set`).
        sampler: the index sampler of one epoch (before :class:`SeededSampler`).
        generator: the generator reseeded per epoch (shuffling, augmentation seeds).
        train_loader: batches of augmented training items.
        val_loader: full-size validation batches in row order.
        augment: every augmentation phase's pipeline; :meth:`seed_epoch` selects the epoch's.
        batcher: turns a loader batch into model inputs on the device (:meth:`to_device`).
        device_path: whether the loaders give uint8 batches that are augmented and normalised
            on the device (:mod:`segflow.model.training.device_augment`).
    """

    train_set: Dataset
    sampler: Sampler[int]
    generator: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader | None  # None for a full-data refit (no validation rows)
    augment: AugmentSchedule | None = None
    batcher: DeviceBatcher | None = None
    device_path: bool = False

    def to_device(
        self, batch: dict[str, Any], device: torch.device, channels_last: bool = False
    ) -> dict[str, Any]:
        """A loader batch as model inputs on ``device`` (:class:`DeviceBatcher`): float32
        ``image`` (N, C, H, W), ``mask`` (N, K, H, W), ``distance`` if any, ``pseudo``."""
        if self.batcher is None:
            self.batcher = DeviceBatcher((0.0,), (1.0,), 1.0, 1)  # float batches: moved only
        return self.batcher(batch, device, channels_last)

    @classmethod
    def build(
        cls,
        arrays: SegmentationArrays,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        augment: Any,
        options: TrainOptions,
        pin_memory: bool,
        pseudo: PseudoLabels | None = None,
        normalisation: Normalisation | None = None,
        distances: bool = False,
        device_path: bool | None = None,
    ) -> FoldData:
        """Datasets and loaders: augmented (optionally cropped, balanced) training batches,
        full-size unaugmented validation batches in row order.

        Args:
            arrays: the preprocess outputs.
            train_rows: array rows to train on.
            val_rows: array rows to validate on (none for a full-data refit: no loader).
            augment: augmentation spec or list of phases
                (:func:`segflow.model.training.augment.build_augmentation_schedule`).
            options: training options (crop, empty_ratio, steps_per_epoch, batch_size,
                num_workers, seed).
            pin_memory: pin batches in page-locked memory (for CUDA).
            pseudo: pseudo-labelled test images for a round > 0 (training only: validation
                stays the real fold, so every round's OOF is on real labels).
            normalisation: per-channel (mean, std) the model is fed
                (:func:`segflow.model.pretrained.input_normalisation`); None: the data's own.
            distances: training and validation items carry their mask's distance maps
                (computed after augmentation), for the distance-based loss terms.
            device_path: uint8 batches augmented and normalised on the device; None (the
                default) decides it: on CUDA (``pin_memory``) whenever :func:`device_path_fits`.
                True where it does not fit raises.

        Returns:
            The fold's data.
        """
        schedule = build_augmentation_schedule(
            augment,
            arrays.height,
            arrays.width,
            crop=tuple(options.crop) if options.crop else None,
            channels=arrays.channels,
        )
        train_set, is_empty = build_train_set(
            arrays, train_rows, schedule.transforms[0], pseudo, normalisation, distances
        )
        mean, std = normalisation or (arrays.mean, arrays.std)
        fits = device_path_fits(arrays, schedule, pseudo, distances)
        if device_path and not fits:
            raise SegflowError(
                "the device input path needs lossless geometric augmentation only, uint8 "
                "images, masks of at most 8 classes, no distance maps and no pseudo-labels"
            )
        on_device = fits if device_path is None and pin_memory else bool(device_path)
        batcher = DeviceBatcher(mean, std, PIXEL_SCALE["uint8"], len(arrays.classes))
        generator = torch.Generator()
        if options.class_balance != "none":
            sampler = class_balanced_sampler(
                arrays.class_presence(train_rows),
                options.class_balance,
                len(is_empty),
                options.seed,
                options.empty_ratio,
            )
        else:
            sampler = balanced_sampler(is_empty, options.empty_ratio, len(is_empty), options.seed)
        if pseudo is not None and len(pseudo.test_rows):
            sampler = PseudoMixSampler(
                len(is_empty), len(pseudo.test_rows), pseudo.max_share, generator, sampler
            )
        elif sampler is None:
            sampler = RandomSampler(train_set, generator=generator)
        if options.steps_per_epoch is not None:
            sampler = EpochDraws(sampler, options.steps_per_epoch * options.batch_size)
        workers = loader_workers(options.num_workers, cuda=pin_memory)
        loader_args: dict[str, Any] = {
            "batch_size": options.batch_size,
            "num_workers": workers,
            "pin_memory": pin_memory,
        }
        if workers:
            loader_args["worker_init_fn"] = _worker_init
            loader_args["multiprocessing_context"] = _worker_context()
            # Started once per fold, not once per epoch: a worker start costs an unpickled
            # dataset and reopened memmaps, and with many workers that added up to seconds
            # per epoch (benchmarks/bench_train.py on a 16-core GPU machine).
            loader_args["persistent_workers"] = True
        # A last batch of 1 breaks BatchNorm after global pooling (and wastes a step).
        # The loader draws its workers' base seed from its own generator, once per worker start
        # (with persistent workers: once per fold). Sharing the sampler's generator would shift
        # the first epoch's draws against every later one.
        worker_generator = torch.Generator().manual_seed(options.seed)
        shape = (arrays.height, arrays.width, arrays.channels)
        train_loader = DataLoader(
            SeededItems(train_set, schedule.transforms, shape if on_device else None),
            sampler=SeededSampler(sampler, generator),
            generator=worker_generator,
            drop_last=len(train_set) > options.batch_size,
            **loader_args,
        )
        val_loader = None
        if len(val_rows):
            val_set = MemmapDataset(
                arrays.train_images_path,
                val_rows,
                arrays.train_masks_path,
                mean=mean,
                std=std,
                n_classes=len(arrays.classes),
                distances=distances,
            )
            val_loader = DataLoader(
                RawItems(val_set) if on_device else val_set, shuffle=False, **loader_args
            )
        return cls(
            train_set, sampler, generator, train_loader, val_loader, schedule, batcher, on_device
        )

    def seed_epoch(self, base_seed: int, epoch: int) -> None:
        """Reseed every generator from (seed, epoch) and select the epoch's augmentation phase:
        the epoch is the same, resumed or not.

        Args:
            base_seed: ``train.seed``.
            epoch: the epoch about to be trained (1-based).
        """
        if self.augment is not None:
            # Read in this process when the epoch's iterator starts, then sent with every draw.
            self.train_loader.sampler.phase = self.augment.index_for(epoch)  # type: ignore[union-attr]
        seed = epoch_seed(base_seed, epoch)
        seed_all(seed)
        self.generator.manual_seed(seed)
        base = self.sampler.sampler if isinstance(self.sampler, EpochDraws) else self.sampler
        for sampler in (base, getattr(base, "real_sampler", None)):
            sampler_generator = getattr(sampler, "generator", None)
            if sampler_generator is not None and sampler_generator is not self.generator:
                sampler_generator.manual_seed(seed + 1)


class EpochDraws(Sampler[int]):
    """Exactly ``draws`` indices per epoch: passes of ``sampler``, one after another, cut short.

    Each pass iterates the wrapped sampler anew (a fresh permutation, fresh weighted draws, a
    fresh pseudo-label subset), so a small set is seen evenly and a large one partly, and the
    epoch stays a function of the generators that :meth:`FoldData.seed_epoch` reseeds.

    Args:
        sampler: the per-pass sampler of item indices (not empty).
        draws: indices per epoch (``steps_per_epoch x batch_size``).
    """

    def __init__(self, sampler: Sampler[int], draws: int) -> None:
        if len(sampler) == 0:  # type: ignore[arg-type]
            raise SegflowError("train.steps_per_epoch: the training set is empty")
        self.sampler = sampler
        self.draws = int(draws)

    def __len__(self) -> int:
        return self.draws

    def __iter__(self) -> Iterator[int]:
        remaining = self.draws
        while remaining > 0:
            for index in self.sampler:
                yield index
                remaining -= 1
                if remaining == 0:
                    return


class SeededSampler(Sampler[tuple[int, int, int]]):
    """Wraps a sampler of item indices: yields ``(index, seed, phase)``, one augmentation seed per
    draw and the epoch's augmentation phase (set by :meth:`FoldData.seed_epoch`).

    The seeds come from ``generator`` (reseeded per epoch by :meth:`FoldData.seed_epoch`) after
    the wrapped sampler has drawn its indices, so an epoch's items and their augmentations are
    a function of (seed, epoch) alone: the same with 0 or N workers, resumed or not.
    """

    def __init__(self, sampler: Sampler[int], generator: torch.Generator) -> None:
        self.sampler = sampler
        self.generator = generator
        self.phase = 0

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        indices = [int(index) for index in self.sampler]
        seeds = torch.randint(0, 2**31 - 1, (len(indices),), generator=self.generator)
        phase = self.phase  # fixed for the whole epoch, even if changed mid-iteration
        for index, seed in zip(indices, seeds.tolist(), strict=True):
            yield index, seed, phase


class SeededItems(Dataset):
    """A training set addressed by ``(index, seed)`` or ``(index, seed, phase)``: each item's
    augmentation (phase ``phase``'s pipeline) is seeded by its own seed just before it is drawn
    (see :class:`SeededSampler`).

    The pipelines live in the dataset, so each worker process holds all of them and picks the
    one its draw names: nothing needs to be sent to (persistent) workers when the phase changes.

    Args:
        dataset: a :class:`MemmapDataset` or a ``ConcatDataset`` of them (what
            :func:`build_train_set` returns).
        transforms: each phase's pipeline (:class:`segflow.model.training.augment.AugmentSchedule`); None keeps
            the datasets' own transform whatever the phase.
        device_shape: (H, W, C) of the stored images for the device path: items are then the
            stored uint8 pixels with their drawn ``geometry``
            (:func:`segflow.model.training.device_augment.draw_geometry`), drawn from the same
            seeded generators; None: the albumentations path.
    """

    def __init__(
        self,
        dataset: Dataset,
        transforms: Sequence[Any] | None = None,
        device_shape: tuple[int, int, int] | None = None,
    ) -> None:
        parts = [dataset] if isinstance(dataset, MemmapDataset) else []
        if isinstance(dataset, ConcatDataset):
            parts = list(dataset.datasets)
        if not parts or not all(isinstance(part, MemmapDataset) for part in parts):
            raise SegflowError(
                f"SeededItems needs a MemmapDataset or a ConcatDataset of them, got {dataset!r}"
            )
        self.parts: list[MemmapDataset] = parts  # type: ignore[assignment]
        self.ends = np.cumsum([len(part) for part in self.parts])
        self.transforms = None if transforms is None else list(transforms)
        self.device_shape = device_shape

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        index, seed, phase = (*key, 0) if len(key) == 2 else key
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        which = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[which - 1]) if which else 0
        part = self.parts[which]
        if self.transforms is not None:
            part.transform = self.transforms[phase]
        part.seed_transform(seed)
        if self.device_shape is None:
            return part[index - start]
        sample = part.raw_item(index - start)
        sample["geometry"] = torch.from_numpy(draw_geometry(part.transform, *self.device_shape))
        return sample


class RawItems(Dataset):
    """A :class:`MemmapDataset`'s items as stored (uint8, packed masks) with the identity
    geometry: validation batches of the device path, normalised on the device."""

    def __init__(self, dataset: MemmapDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> dict[str, Any]:
        sample = self.dataset.raw_item(item)
        height, width = sample["image"].shape[:2]
        sample["geometry"] = torch.tensor([*IDENTITY, height, width], dtype=torch.int64)
        return sample


def device_path_fits(
    arrays: SegmentationArrays,
    schedule: AugmentSchedule,
    pseudo: PseudoLabels | None,
    distances: bool,
) -> bool:
    """Whether a fold can train on the device input path
    (:mod:`segflow.model.training.device_augment`).

    Args:
        arrays: the preprocess outputs (uint8 images and masks needed).
        schedule: every phase's pipeline; each must be lossless geometry only.
        pseudo: pseudo-labels (not on the device path: soft targets, other arrays).
        distances: distance maps wanted (computed on the host from the augmented mask).

    Returns:
        True when every condition holds.
    """
    if pseudo is not None or distances or arrays.dtype != "uint8":
        return False
    if np.load(arrays.train_masks_path, mmap_mode="r").dtype != np.uint8:
        return False
    return all(is_device_geometric(transform) for transform in schedule.transforms)


def loader_workers(requested: int | None, cuda: bool) -> int:
    """DataLoader worker processes: the configured count, or derived from the job's threads.

    Args:
        requested: ``train.num_workers``; None derives it from torch's thread count (the rule's
            ``threads``): all but one on CUDA, where the main process only feeds the GPU; none
            on CPU, where the model step already uses every core (``benchmarks/bench_train.py``
            measured 2 workers *slower* than 0 on a 2-core machine).
        cuda: whether the model runs on a CUDA device.

    Returns:
        The worker count (0 = load in the main process).
    """
    if requested is not None:
        return requested
    return max(torch.get_num_threads() - 1, 0) if cuda else 0


# Imported once by the fork server rather than by every worker of every epoch.
_WORKER_PRELOAD = (
    "numpy",
    "cv2",
    "torch",
    "albumentations",
    "segflow.model.datasets",
    "segflow.model.training.fold_data",
)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Start workers from a clean fork server, never by forking this process: the trainer has
    OpenCV and OpenMP thread pools running, and a forked child inherits their locks held and
    hangs on its first resize."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_WORKER_PRELOAD))
    return context


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch that does not depend on what earlier epochs drew (resume-safe).

    Args:
        seed: the run's seed.
        epoch: the epoch.

    Returns:
        A 32-bit seed.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device) global generators.

    Args:
        seed: any non-negative integer (numpy gets it modulo 2**32).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _worker_init(worker_id: int) -> None:
    """DataLoader worker start: one OpenCV thread, default SIGTERM, distinct reproducible seeds
    for numpy and random (albumentations is seeded per item, see :class:`SeededItems`).

    ``info.seed`` is the loader's base seed (drawn from its reseeded generator) + worker id.
    """
    import cv2

    # A cancelled job's SIGTERM is for the main process, which saves nothing mid-epoch anyway;
    # workers just die (the inherited handler would raise inside the worker loop).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cv2.setNumThreads(1)  # N workers already use N cores; OpenCV's own pool would oversubscribe
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
