"""Training one fold: resumable, seeded, with snapshot averaging, EMA and an optional aux head.

:func:`train_fold` trains on every fold but ``fold`` and validates on ``fold`` once per epoch
(at full preprocessed size, threshold 0.5). Outputs in ``out_dir``:

- ``model.pt`` (:func:`segflow.models.save_checkpoint`) holding the *evaluated* weights — the
  EMA weights when ``ema_decay`` is set, else the trained weights — of the best epoch by
  ``monitor``, or the element-wise average of the ``average_top_k`` best epochs' evaluated
  weights (BatchNorm statistics averaged too, not recalibrated). The saved weights are then
  validated once more; their score is the checkpoint's ``score``.
- ``history.csv``: one row per epoch (:data:`HISTORY_COLUMNS`), rewritten after every epoch.
- ``metrics.json``: best epoch, scores, early stopping, timing.

Resume: after every finished epoch ``resume_dir/last.pt`` is rewritten atomically with the
complete training state (model, optimizer, schedulers, AMP scaler, EMA, history, top-k
bookkeeping, RNG states); the top-k epochs' weights sit next to it as ``snapshot_eNNNN.pt``.
A rerun with the same configuration continues after the last finished epoch, so a killed job
(SIGTERM, Ctrl-C, OOM kill, node loss) loses at most one epoch. ``resume_dir`` must lie outside
``out_dir``: Snakemake deletes a failed job's outputs. It is deleted once ``model.pt`` is written.

The resume file is used only when its configuration hash matches: model spec, fold, loss,
augmentation, data (ids and stats.json) and every option except :data:`RESUME_EXEMPT`. Those
may change between an interrupted run and its rerun: ``epochs`` (train longer or stop sooner),
``early_stopping_patience``, and ``num_workers``/``device`` (where and how fast, not what).
Changing ``epochs`` re-derives the learning-rate schedule from the new total for the remaining
epochs. (A *finished* run has deleted its resume state; it is not extended but retrained.) Every epoch reseeds all generators from (seed, epoch), so an interrupted and resumed run
gives bitwise the weights of an uninterrupted one on CPU (with the same ``num_workers``; on CUDA
up to non-deterministic kernels).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, Subset
from tqdm import tqdm

from segflow.atomic import atomic_path, write_csv, write_json
from segflow.augment import build_augmentation
from segflow.datasets import (
    MemmapDataset,
    SegmentationArrays,
    balanced_sampler,
    crop_to,
    pad_to_size,
)
from segflow.devices import resolve_device
from segflow.errors import SegflowError
from segflow.losses import build_loss
from segflow.metrics import per_image_scores
from segflow.models import ModelSpec, build_model, padded_size, save_checkpoint
from segflow.options import option, options_to_dict

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "cosine_restarts", "plateau", "onecycle")
AMP_MODES = ("auto", "off", "bf16", "fp16")
MONITORS = ("kaggle", "dice", "iou", "val_loss")
SCORE_NAMES = ("dice", "iou", "kaggle")
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_iou",
    "val_kaggle",
    "lr",
    "seconds",
)
# Options that may differ between a run and its resumption (see the module docstring).
RESUME_EXEMPT = ("epochs", "early_stopping_patience", "num_workers", "device")
RESUME_FORMAT = "segflow-resume-1"
THRESHOLD = 0.5
# OneCycle: start and end learning rates as fractions of lr (torch's OneCycleLR defaults).
_ONECYCLE_START, _ONECYCLE_END = 1 / 25, 1 / 25 / 1e4


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) during training; the last finished epoch's resume file is intact."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train one fold (config section ``experiments.<name>.train``)."""

    epochs: int = option(10, "epochs to train (may be raised to extend a resumable run)")
    batch_size: int = option(16, "images per batch (training and validation)")
    optimizer: str = option("adamw", "optimizer; sgd uses momentum 0.9", OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(1e-4, "weight decay (decoupled for adamw)")
    scheduler: str = option(
        "cosine",
        "learning-rate schedule per batch: none, cosine (to 0), cosine_restarts (SGDR), plateau "
        "(x0.5 after 2 epochs without improvement of the monitor), onecycle",
        SCHEDULERS,
    )
    restart_epochs: int | None = option(
        None, "cycle length of cosine_restarts in epochs; null = a third of the epochs"
    )
    warmup_epochs: int = option(0, "linear learning-rate warmup epochs (onecycle: its rise)")
    grad_clip: float | None = option(None, "clip the gradient norm to this value; null = off")
    amp: str = option(
        "auto",
        "mixed precision: auto = bf16 on CUDA if supported else fp16, off on CPU",
        AMP_MODES,
    )
    channels_last: bool = option(True, "channels-last memory format (CUDA only)")
    ema_decay: float | None = option(
        None,
        "keep an exponential moving average of the weights (e.g. 0.999); it is validated "
        "and saved instead of the raw weights",
    )
    average_top_k: int = option(
        1, "save the average of the k best epochs' weights (1 = the best epoch's)"
    )
    early_stopping_patience: int | None = option(
        None, "stop after this many epochs without improvement; null = never"
    )
    monitor: str = option(
        "kaggle",
        "validation quantity picking the best epoch (scores: max; val_loss: min)",
        MONITORS,
    )
    empty_ratio: float | None = option(
        None, "share of empty masks drawn per epoch (sampling with replacement); null = natural"
    )
    crop: list[int] | None = option(  # noqa: RUF009 (option() builds a dataclasses.field)
        None, "train on random [height, width] patches (validation stays full size)"
    )
    num_workers: int = option(0, "DataLoader worker processes (0 = load in the main process)")
    seed: int = option(42, "seed of initialisation, sampling and augmentation")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    aux_weight: float = option(
        0.2, "loss weight of the empty/non-empty head when the model has one (model.aux_head)"
    )

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", _is_int(self.epochs, 1), "an integer >= 1"),
            ("batch_size", _is_int(self.batch_size, 1), "an integer >= 1"),
            ("lr", _is_number(self.lr) and self.lr > 0, "a number > 0"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", _is_int(self.warmup_epochs, 0), "an integer >= 0"),
            ("restart_epochs", _is_int(self.restart_epochs, 1, True), "an integer >= 1 or null"),
            (
                "grad_clip",
                self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
                "a number > 0 or null",
            ),
            ("channels_last", isinstance(self.channels_last, bool), "true or false"),
            (
                "ema_decay",
                self.ema_decay is None or (_is_number(self.ema_decay) and 0 < self.ema_decay < 1),
                "in (0, 1) or null",
            ),
            ("average_top_k", _is_int(self.average_top_k, 1), "an integer >= 1"),
            (
                "early_stopping_patience",
                _is_int(self.early_stopping_patience, 1, True),
                "an integer >= 1 or null",
            ),
            (
                "empty_ratio",
                self.empty_ratio is None
                or (_is_number(self.empty_ratio) and 0 <= self.empty_ratio <= 1),
                "in [0, 1] or null",
            ),
            ("num_workers", _is_int(self.num_workers, 0), "an integer >= 0"),
            ("seed", _is_int(self.seed, 0), "an integer >= 0"),
            ("aux_weight", _is_number(self.aux_weight) and self.aux_weight >= 0, ">= 0"),
            ("device", isinstance(self.device, str), "a string"),
        ]
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("amp", AMP_MODES),
            ("monitor", MONITORS),
        ):
            checks.append((name, getattr(self, name) in choices, f"one of {', '.join(choices)}"))
        for name, ok, expected in checks:
            if not ok:
                raise SegflowError(f"train.{name} must be {expected}, got {getattr(self, name)!r}")
        if self.crop is not None:
            crop = [self.crop, self.crop] if _is_int(self.crop, 1) else self.crop
            if not (
                isinstance(crop, list | tuple)
                and len(crop) == 2
                and all(_is_int(v, 1) for v in crop)
            ):
                raise SegflowError(
                    f"train.crop must be [height, width] (positive integers) or null, got "
                    f"{self.crop!r}"
                )
            object.__setattr__(self, "crop", [int(v) for v in crop])  # one canonical form


def _is_int(value: Any, minimum: int, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- data


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
    available = sorted(int(v) for v in folds["fold"].unique())
    if fold not in available:
        raise SegflowError(f"{folds_csv}: no fold {fold} (folds: {available})")
    if folds["id"].duplicated().any():
        raise SegflowError(
            f"{folds_csv}: id {folds['id'][folds['id'].duplicated()].iloc[0]!r} twice"
        )
    is_val = (folds["fold"] == fold).to_numpy()
    train_rows = arrays.rows_for(folds.loc[~is_val, "id"], where=str(folds_csv))
    val_rows = arrays.rows_for(folds.loc[is_val, "id"], where=str(folds_csv))
    if len(train_rows) < 2:
        raise SegflowError(
            f"{folds_csv}: only {len(train_rows)} training item(s) outside fold {fold}"
        )
    return train_rows, val_rows


def build_train_set(
    arrays: SegmentationArrays, rows: np.ndarray, transform: Any
) -> tuple[Dataset, np.ndarray]:
    """The training dataset and whether each of its items has an empty mask.

    The one place that decides what is trained on: pseudo-labelled items will be concatenated
    here (a ``ConcatDataset`` with their own flags appended).

    Returns:
        (dataset, is_empty); is_empty has one entry per dataset item.
    """
    dataset = MemmapDataset(
        arrays.train_images_path,
        rows,
        arrays.train_masks_path,
        transform=transform,
        mean=arrays.mean,
        std=arrays.std,
    )
    return dataset, arrays.empty_masks(rows)


def _memmap_datasets(dataset: Dataset) -> Iterator[MemmapDataset]:
    """The MemmapDatasets inside ``dataset`` (through ConcatDataset and Subset)."""
    if isinstance(dataset, MemmapDataset):
        yield dataset
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from _memmap_datasets(part)
    elif isinstance(dataset, Subset):
        yield from _memmap_datasets(dataset.dataset)


def _seed_dataset_transforms(dataset: Dataset, seed: int) -> None:
    for part in _memmap_datasets(dataset):
        part.seed_transform(seed)


def _worker_init(worker_id: int) -> None:
    """DataLoader worker start: distinct, reproducible seeds for numpy, random and albumentations.

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
    _seed_dataset_transforms(info.dataset, seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch that does not depend on what earlier epochs drew (resume-safe)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------- optimisation


def _make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(params, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)


def lr_factor(kind: str, step: int, total_steps: int, warmup_steps: int, cycle_steps: int) -> float:
    """The learning rate of batch ``step`` as a fraction of the peak ``lr``.

    Linear warmup over ``warmup_steps``, then: ``none``/``plateau`` 1 (plateau reductions are
    applied on top, per epoch), ``cosine`` a half cosine to 0 at ``total_steps``,
    ``cosine_restarts`` half cosines of ``cycle_steps`` each, ``onecycle`` a cosine rise from
    lr/25 (over ``warmup_steps``, or 30 % of the steps) then a cosine fall to lr/25e4.

    Args:
        kind: a :data:`SCHEDULERS` name.
        step: batches done before this one (0-based).
        total_steps: batches in the whole run.
        warmup_steps: warmup batches.
        cycle_steps: batches per cosine_restarts cycle.
    """
    if kind == "onecycle":
        rise = warmup_steps or max(1, round(0.3 * total_steps))
        if step < rise:
            return _ONECYCLE_START + (1 - _ONECYCLE_START) * _half_cosine_up(step / rise)
        fall = max(1, total_steps - rise)
        return _ONECYCLE_END + (1 - _ONECYCLE_END) * (
            1 - _half_cosine_up(min((step - rise) / fall, 1))
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = step - warmup_steps
    if kind == "cosine":
        return 1 - _half_cosine_up(min(done / max(1, total_steps - warmup_steps), 1))
    if kind == "cosine_restarts":
        return 1 - _half_cosine_up((done % cycle_steps) / cycle_steps)
    return 1.0


def _half_cosine_up(t: float) -> float:
    """0 at t = 0 rising to 1 at t = 1 along a half cosine."""
    return 0.5 * (1 - math.cos(math.pi * t))


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``, or None for full precision."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise SegflowError("train.amp = fp16 needs a CUDA device; use bf16 or off on the CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


class _Ema:
    """Exponential moving average of every float entry of a model's state dict.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are
    not dominated by the random initialisation. Integer buffers (BatchNorm's batch counter) are
    copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(source[name], 1 - decay)
            else:
                value.copy_(source[name])


# --------------------------------------------------------------------------- the fold trainer


@dataclass
class _Snapshot:
    epoch: int
    value: float  # the monitor's value
    file: str  # name inside resume_dir


class _FoldTrainer:
    """Everything one fold's training needs; :func:`train_fold` drives it epoch by epoch."""

    def __init__(
        self,
        arrays: SegmentationArrays,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        fold: int,
        model_spec: ModelSpec,
        loss_weights: Mapping[str, float],
        augment: Any,
        options: TrainOptions,
        ohem_fraction: float | None,
        resume_dir: Path,
    ) -> None:
        self.arrays, self.fold, self.options = arrays, fold, options
        self.resume_dir = resume_dir
        self.device = resolve_device(options.device)
        self.amp_dtype = _amp_dtype(options.amp, self.device)
        self.channels_last = options.channels_last and self.device.type == "cuda"
        self.maximise = options.monitor != "val_loss"

        _seed_all(options.seed)  # the initial weights
        model = build_model(model_spec)
        self.model = self._place(model)
        self.loss_fn = build_loss(dict(loss_weights), mode="binary", ohem_fraction=ohem_fraction)
        self.aux_loss_fn = nn.BCEWithLogitsLoss()

        transform = build_augmentation(
            augment,
            arrays.height,
            arrays.width,
            crop=tuple(options.crop) if options.crop else None,
            channels=arrays.channels,
        )
        self.train_set, is_empty = build_train_set(arrays, train_rows, transform)
        self.generator = torch.Generator()
        sampler = balanced_sampler(is_empty, options.empty_ratio, len(self.train_set), options.seed)
        self.sampler = (
            sampler
            if sampler is not None
            else RandomSampler(self.train_set, generator=self.generator)
        )
        loader_args: dict[str, Any] = {
            "batch_size": options.batch_size,
            "num_workers": options.num_workers,
            "pin_memory": self.device.type == "cuda",
            "worker_init_fn": _worker_init if options.num_workers else None,
        }
        # A last batch of 1 breaks BatchNorm after global pooling (and wastes a step).
        self.train_loader = DataLoader(
            self.train_set,
            sampler=self.sampler,
            generator=self.generator,
            drop_last=len(self.train_set) > options.batch_size,
            **loader_args,
        )
        self.val_set = MemmapDataset(
            arrays.train_images_path,
            val_rows,
            arrays.train_masks_path,
            mean=arrays.mean,
            std=arrays.std,
        )
        self.val_loader = DataLoader(self.val_set, shuffle=False, **loader_args)

        self.optimizer = _make_optimizer(self.model, options)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max" if self.maximise else "min", factor=0.5, patience=2
            )
            if options.scheduler == "plateau"
            else None
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.ema = _Ema(self.model, options.ema_decay) if options.ema_decay else None
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.top_k: list[_Snapshot] = []

    # ----------------------------------------------------------------- helpers

    def _place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _lr_factor(self, step: int) -> float:
        options = self.options
        total = options.epochs * self.steps_per_epoch
        warmup = options.warmup_epochs * self.steps_per_epoch
        restart = options.restart_epochs or max(
            1, round((options.epochs - options.warmup_epochs) / 3)
        )
        return lr_factor(options.scheduler, step, total, warmup, restart * self.steps_per_epoch)

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights that are validated and saved: the EMA's if enabled."""
        return self.ema.model if self.ema is not None else self.model

    def _forward(
        self, model: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mask logits, label logits or None) at the input size, padding for the model."""
        height, width = images.shape[-2:]
        padded, _ = pad_to_size(images, *padded_size(model, height, width))
        if self.channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = model(padded)
        # With an aux head smp returns (mask logits, label logits); segflow.models.forward_logits
        # drops the labels, but training needs both.
        masks, labels = (out[0], out[1]) if isinstance(out, tuple | list) else (out, None)
        return crop_to(masks, height, width).float(), None if labels is None else labels.float()

    def _loss(
        self, mask_logits: torch.Tensor, label_logits: torch.Tensor | None, masks: torch.Tensor
    ) -> torch.Tensor:
        loss = self.loss_fn(mask_logits, masks)
        if label_logits is not None:
            # Image-level target: does the (possibly cropped) mask contain anything?
            labels = masks.flatten(1).amax(dim=1, keepdim=True)
            loss = loss + self.options.aux_weight * self.aux_loss_fn(
                label_logits.reshape(len(labels), -1)[:, :1], labels
            )
        return loss

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ----------------------------------------------------------------- one epoch

    def seed_epoch(self, epoch: int) -> None:
        """Reseed every generator from (seed, epoch): the epoch is the same, resumed or not."""
        seed = _epoch_seed(self.options.seed, epoch)
        _seed_all(seed)
        self.generator.manual_seed(seed)
        sampler_generator = getattr(self.sampler, "generator", None)
        if sampler_generator is not None and sampler_generator is not self.generator:
            sampler_generator.manual_seed(seed + 1)
        _seed_dataset_transforms(self.train_set, seed + 2)  # used when num_workers == 0

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Train one epoch; returns (mean training loss, learning rate of its last batch)."""
        self.model.train()
        # Summed on the device: a float() per batch would wait for the GPU every step.
        total, count, lr = torch.zeros((), device=self.device), 0, self._current_lr()
        bar = tqdm(
            self.train_loader,
            desc=f"fold {self.fold} epoch {epoch}/{self.options.epochs}",
            unit="batch",
            leave=False,
            disable=None,
            mininterval=1.0,
        )
        for batch in bar:
            images = batch["image"].to(self.device, non_blocking=True)
            masks = batch["mask"].to(self.device, non_blocking=True)
            mask_logits, label_logits = self._forward(self.model, images)
            loss = self._loss(mask_logits, label_logits, masks)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.options.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self._current_lr()
            self.global_step += 1
            # Plateau: the per-batch schedule only runs the warmup, then plateau takes over.
            if (
                self.plateau is None
                or self.global_step <= self.options.warmup_epochs * self.steps_per_epoch
            ):
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            total += loss.detach() * len(images)
            count += len(images)
            if not bar.disable:
                bar.set_postfix(loss=f"{float(total) / count:.4f}", refresh=False)
        mean = float(total) / max(count, 1)
        if not math.isfinite(mean):
            raise SegflowError(
                f"fold {self.fold} epoch {epoch}: training loss is {mean} (diverged); lower "
                "train.lr or set train.grad_clip"
            )
        return mean, lr

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation loss and mean per-image dice/iou/kaggle at threshold 0.5."""
        model.eval()
        total, count = 0.0, 0
        scores: dict[str, list[np.ndarray]] = {name: [] for name in SCORE_NAMES}
        for batch in self.val_loader:
            images = batch["image"].to(self.device, non_blocking=True)
            masks = batch["mask"].to(self.device, non_blocking=True)
            mask_logits, label_logits = self._forward(model, images)
            total += float(self._loss(mask_logits, label_logits, masks)) * len(images)
            count += len(images)
            pred = (mask_logits[:, 0] > 0).cpu().numpy()  # sigmoid > 0.5
            truth = masks[:, 0].cpu().numpy().astype(bool)
            for name, values in per_image_scores(pred, truth).items():
                if name in scores:
                    scores[name].append(values)
        result = {"val_loss": total / max(count, 1)}
        result.update({name: float(np.concatenate(v).mean()) for name, v in scores.items()})
        return result

    def monitor_value(self, row: Mapping[str, float]) -> float:
        key = "val_loss" if self.options.monitor == "val_loss" else f"val_{self.options.monitor}"
        return float(row[key])

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.maximise else a < b

    def best_epoch(self) -> tuple[int, float]:
        """(epoch, monitor value) of the best epoch so far; the earliest among equals."""
        best = self.history[0]
        for row in self.history[1:]:
            if self._better(self.monitor_value(row), self.monitor_value(best)):
                best = row
        return int(best["epoch"]), self.monitor_value(best)

    def patience_exhausted(self) -> bool:
        patience = self.options.early_stopping_patience
        if patience is None or not self.history:
            return False
        best_epoch, _ = self.best_epoch()
        return int(self.history[-1]["epoch"]) - best_epoch >= patience

    def update_top_k(self, epoch: int, value: float) -> list[_Snapshot]:
        """Add this epoch's evaluated weights to the top k if they belong there.

        Returns:
            The snapshots that fell out (their files are deleted after last.pt is written).
        """
        k = self.options.average_top_k
        ranked = sorted(
            [*self.top_k, _Snapshot(epoch, value, f"snapshot_e{epoch:04d}.pt")],
            key=lambda s: (-s.value if self.maximise else s.value, s.epoch),
        )
        keep, dropped = ranked[:k], ranked[k:]
        for snapshot in keep:
            if snapshot.epoch == epoch:
                with atomic_path(self.resume_dir / snapshot.file) as tmp:
                    torch.save(_cpu_state(self.evaluated_model), tmp)
        self.top_k = keep
        return [s for s in dropped if s.epoch != epoch]

    # ----------------------------------------------------------------- resume

    def state(self, config_hash: str) -> dict[str, Any]:
        return {
            "format": RESUME_FORMAT,
            "config_hash": config_hash,
            "epoch": int(self.history[-1]["epoch"]) if self.history else 0,
            "global_step": self.global_step,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": _cpu_state(self.ema.model) if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "history": [dict(row) for row in self.history],
            "top_k": [dataclasses.asdict(s) for s in self.top_k],
            "rng": _rng_state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])
        self.global_step = int(state["global_step"])
        self.history = [dict(row) for row in state["history"]]
        self.top_k = [_Snapshot(**s) for s in state["top_k"]]
        _set_rng_state(state["rng"])

    # ----------------------------------------------------------------- final weights

    def final_model(self) -> tuple[nn.Module, list[int]]:
        """The weights to save: the best snapshot, or the average of the top k."""
        states = []
        for snapshot in self.top_k:
            path = self.resume_dir / snapshot.file
            if not path.is_file():
                raise SegflowError(f"{path}: snapshot of epoch {snapshot.epoch} is missing")
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        averaged = {}
        for name, value in states[0].items():
            if value.dtype.is_floating_point:
                averaged[name] = (
                    torch.stack([s[name].double() for s in states]).mean(0).to(value.dtype)
                )
            else:
                averaged[name] = value  # integer buffers (BatchNorm batch counters): the best's
        model = copy.deepcopy(self.evaluated_model)
        model.load_state_dict(averaged)
        return model, [s.epoch for s in self.top_k]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    # Plain types only: the file is read back with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_hash(
    options: TrainOptions,
    model_spec: ModelSpec,
    fold: int,
    loss_weights: Mapping[str, float],
    ohem_fraction: float | None,
    augment: Any,
    data: Mapping[str, Any],
) -> str:
    """The identity of a training configuration, guarding resume (options but RESUME_EXEMPT)."""
    payload = {
        "options": {k: v for k, v in options_to_dict(options).items() if k not in RESUME_EXEMPT},
        "model": dataclasses.asdict(model_spec),
        "fold": fold,
        "loss": dict(loss_weights),
        "ohem_fraction": ohem_fraction,
        "augment": augment,
        "data": data,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_fingerprint(
    arrays: SegmentationArrays, train_rows: np.ndarray, val_rows: np.ndarray
) -> dict[str, str]:
    def digest(rows: np.ndarray) -> str:
        return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()

    stats = json.dumps(arrays.stats, sort_keys=True)
    return {
        "train_rows": digest(train_rows),
        "val_rows": digest(val_rows),
        "stats": hashlib.sha256(stats.encode()).hexdigest(),
    }


def _load_resume(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """The resume state in ``path`` if it is readable and of this configuration, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file must not block training
        log.warning("%s: unreadable resume file ignored (%s); training from scratch", path, error)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("%s: not a segflow resume file; ignored, training from scratch", path)
        return None
    if state.get("config_hash") != expected_hash:
        log.warning(
            "%s: written for a different configuration (model, loss, data or options other than "
            "%s changed); ignored, training from scratch",
            path,
            ", ".join(RESUME_EXEMPT),
        )
        return None
    return state


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (Snakemake, SLURM, ``kill``) into :class:`TrainingInterrupted`.

    Unwinding as an exception lets pending atomic writes delete their temporary files; the
    default SIGTERM action would kill the process mid-write (the target file stays intact
    either way, since it is only ever replaced by a rename).
    """

    def handler(signum: int, frame: Any) -> None:
        raise TrainingInterrupted(f"signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_fold(
    arrays_dir: str | os.PathLike[str],
    folds_csv: str | os.PathLike[str],
    fold: int,
    model_spec: ModelSpec,
    loss_weights: Mapping[str, float],
    augment: Any,
    options: TrainOptions,
    out_dir: str | os.PathLike[str],
    resume_dir: str | os.PathLike[str],
    ohem_fraction: float | None = None,
) -> dict[str, Any]:
    """Train on the folds other than ``fold``, validate on ``fold``; resumable.

    Args:
        arrays_dir: the preprocess output folder (train_images.npy, train_masks.npy,
            index.parquet, stats.json).
        folds_csv: the folds stage's folds.csv.
        fold: the validation fold.
        model_spec: a :class:`segflow.models.ModelSpec` (binary: ``classes`` 1; ``in_channels``
            the arrays' channels).
        loss_weights: loss term -> weight (:func:`segflow.losses.build_loss`).
        augment: augmentation spec (:func:`segflow.augment.build_augmentation`).
        options: training options.
        out_dir: where model.pt, history.csv and metrics.json go.
        resume_dir: where the resume state lives while training (outside ``out_dir``); deleted
            after model.pt is written.
        ohem_fraction: online hard example mining fraction for the pixel-wise loss terms.

    Returns:
        The metrics written to metrics.json.

    Raises:
        SegflowError: bad input files or options (naming them), or a diverged loss.
        TrainingInterrupted: on SIGTERM; rerun to continue after the last finished epoch.
    """
    with _interrupt_on_sigterm():
        return _train_fold(
            arrays_dir,
            folds_csv,
            fold,
            model_spec,
            loss_weights,
            augment,
            options,
            out_dir,
            resume_dir,
            ohem_fraction,
        )


def _train_fold(
    arrays_dir: str | os.PathLike[str],
    folds_csv: str | os.PathLike[str],
    fold: int,
    model_spec: ModelSpec,
    loss_weights: Mapping[str, float],
    augment: Any,
    options: TrainOptions,
    out_dir: str | os.PathLike[str],
    resume_dir: str | os.PathLike[str],
    ohem_fraction: float | None,
) -> dict[str, Any]:
    """:func:`train_fold` without its SIGTERM handling."""
    started = time.monotonic()
    out_dir, resume_dir = Path(out_dir), Path(resume_dir)
    if (
        resume_dir.resolve() == out_dir.resolve()
        or out_dir.resolve() in resume_dir.resolve().parents
    ):
        log.warning(
            "resume_dir %s lies inside out_dir %s: a failed job loses it", resume_dir, out_dir
        )
    arrays = SegmentationArrays.open(arrays_dir)
    train_rows, val_rows = split_rows(arrays, folds_csv, fold)
    if len(val_rows) == 0:
        raise SegflowError(f"{folds_csv}: fold {fold} has no validation items")
    if model_spec.classes != 1:
        raise SegflowError(f"model.classes must be 1 (binary masks), got {model_spec.classes}")
    if model_spec.in_channels != arrays.channels:
        raise SegflowError(
            f"model.in_channels is {model_spec.in_channels} but {arrays.root / 'stats.json'} "
            f"says the images have {arrays.channels} channel(s)"
        )
    expected_hash = config_hash(
        options,
        model_spec,
        fold,
        loss_weights,
        ohem_fraction,
        augment,
        _data_fingerprint(arrays, train_rows, val_rows),
    )
    trainer = _FoldTrainer(
        arrays,
        train_rows,
        val_rows,
        fold,
        model_spec,
        loss_weights,
        augment,
        options,
        ohem_fraction,
        resume_dir,
    )
    log.info(
        "fold %d: %d training / %d validation images, %d batches per epoch, device %s, amp %s",
        fold,
        len(trainer.train_set),
        len(val_rows),
        trainer.steps_per_epoch,
        trainer.device,
        trainer.amp_dtype or "off",
    )
    resume_path = resume_dir / "last.pt"
    state = _load_resume(resume_path, expected_hash)
    resumed_from = 0
    if state is not None:
        trainer.load_state(state)
        resumed_from = int(state["epoch"])
        log.info("fold %d: resuming after epoch %d from %s", fold, resumed_from, resume_path)
        if resumed_from >= options.epochs:
            log.warning(
                "fold %d: %s already has %d epochs (train.epochs = %d); finishing with those",
                fold,
                resume_path,
                resumed_from,
                options.epochs,
            )
        write_csv(out_dir / "history.csv", _history_frame(trainer.history))

    stopped_early = False
    for epoch in range(resumed_from + 1, options.epochs + 1):
        if trainer.patience_exhausted():
            stopped_early = True
            break
        epoch_started = time.monotonic()
        trainer.seed_epoch(epoch)
        train_loss, lr = trainer.train_epoch(epoch)
        scores = trainer.validate(trainer.evaluated_model)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": scores["val_loss"],
            **{f"val_{name}": scores[name] for name in SCORE_NAMES},
            "lr": lr,
            "seconds": round(time.monotonic() - epoch_started, 3),
        }
        trainer.history.append(row)
        value = trainer.monitor_value(row)
        if trainer.plateau is not None and epoch > options.warmup_epochs:
            trainer.plateau.step(value)
        resume_dir.mkdir(parents=True, exist_ok=True)
        dropped = trainer.update_top_k(epoch, value)
        # Order matters for a kill at any point: new snapshot, then last.pt naming it, then
        # the snapshots last.pt no longer names.
        with atomic_path(resume_path) as tmp:
            torch.save(trainer.state(expected_hash), tmp)
        for snapshot in dropped:
            (resume_dir / snapshot.file).unlink(missing_ok=True)
        write_csv(out_dir / "history.csv", _history_frame(trainer.history))
        best_epoch, _ = trainer.best_epoch()
        log.info(
            "fold %d epoch %d/%d: train_loss %.4f val_loss %.4f dice %.4f iou %.4f "
            "kaggle %.4f lr %.3g %.1fs%s",
            fold,
            epoch,
            options.epochs,
            train_loss,
            row["val_loss"],
            row["val_dice"],
            row["val_iou"],
            row["val_kaggle"],
            lr,
            row["seconds"],
            " (best)" if best_epoch == epoch else "",
        )

    if not trainer.history:
        raise SegflowError(f"fold {fold}: no epoch was trained (train.epochs = {options.epochs})")
    if stopped_early:
        log.info("fold %d: early stop after epoch %d", fold, trainer.history[-1]["epoch"])
    model, averaged_epochs = trainer.final_model()
    final_scores = trainer.validate(model)
    best_epoch, best_value = trainer.best_epoch()
    score = (
        final_scores["val_loss"] if options.monitor == "val_loss" else final_scores[options.monitor]
    )
    source = "ema" if options.ema_decay else "trained"
    weights = (
        f"{source} weights averaged over epochs {averaged_epochs}"
        if len(averaged_epochs) > 1
        else f"{source} weights of epoch {best_epoch}"
    )
    save_checkpoint(
        out_dir / "model.pt",
        model,
        model_spec,
        {
            "fold": fold,
            "epoch": best_epoch,
            "monitor": options.monitor,
            "score": score,
            "mean": arrays.mean,
            "std": arrays.std,
            "input_size": [arrays.height, arrays.width],
            "dtype": arrays.dtype,
            "averaged_epochs": averaged_epochs,
            "weights": weights,
            "threshold": THRESHOLD,
        },
    )
    metrics = {
        "fold": fold,
        "monitor": options.monitor,
        "best_epoch": best_epoch,
        "best_epoch_score": best_value,
        "score": score,
        "final": final_scores,
        "weights": weights,
        "averaged_epochs": averaged_epochs,
        "epochs_trained": len(trainer.history),
        "stopped_early": stopped_early,
        "resumed_from_epoch": resumed_from,
        "train_seconds": round(sum(row["seconds"] for row in trainer.history), 3),
        "elapsed_seconds": round(time.monotonic() - started, 3),
        "n_train": len(trainer.train_set),
        "n_val": len(val_rows),
        "options": options_to_dict(options),
    }
    write_json(out_dir / "metrics.json", metrics)
    _remove_resume_state(resume_dir)
    log.info(
        "fold %d: %s = %.4f (%s) -> %s", fold, options.monitor, score, weights, out_dir / "model.pt"
    )
    return metrics


def _history_frame(history: list[dict[str, float]]) -> pd.DataFrame:
    return pd.DataFrame(history, columns=list(HISTORY_COLUMNS))


def _remove_resume_state(resume_dir: Path) -> None:
    """Delete what training put in ``resume_dir`` (and the folder if that leaves it empty)."""
    for path in [resume_dir / "last.pt", *resume_dir.glob("snapshot_e*.pt")]:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        resume_dir.rmdir()
