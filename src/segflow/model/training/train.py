"""Training one fold: resumable, seeded, with snapshot averaging, EMA and an optional aux head.

:func:`train_fold` trains on every fold but ``fold`` and validates on ``fold`` once per epoch
(at full preprocessed size, threshold 0.5). Outputs in ``out_dir``:

- ``model.pt`` (:func:`segflow.model.models.save_checkpoint`) holding the *evaluated* weights — the
  EMA weights when ``ema_decay`` is set, else the trained weights — of the best epoch by
  ``monitor``, or the element-wise average of the ``average_top_k`` best epochs' evaluated
  weights (BatchNorm statistics averaged too, or recalibrated with ``recalibrate_bn``). The
  saved weights are then validated once more; their score is the checkpoint's ``score``. Its
  ``mean``/``std`` are what the model was fed (:func:`segflow.model.pretrained.input_normalisation`:
  the data's statistics, or the normalisation of pretrained encoder weights), and so what
  prediction uses.
  Two alternatives (they exclude each other):

  - SWA (``swa_epochs`` N): the equal average of the *trained* weights at the end of each of
    the last N epochs (:class:`segflow.model.training.checkpointing.WeightAverage`; those epochs train at a
    constant ``swa_lr`` if set, else on the schedule). Its BatchNorm statistics are then
    recomputed with one pass over the training loader reseeded from (seed, epoch 0), so the
    recalibration is the same on every run with this seed; the result is validated and kept
    if ``swa_select: always``, or (default ``best``) only if it validates strictly better than
    the weights saved without SWA. An early stop averages the SWA epochs reached (none: no SWA).
  - Snapshot ensemble (``snapshot_ensemble`` K, with ``cosine_restarts``): the evaluated
    weights at the end of each of the last K restart cycles, all stored in model.pt; it loads
    as a :class:`segflow.model.models.SnapshotEnsemble` predicting the members' mean probability
    (K forward passes per prediction), and the ensemble is what is validated at the end.
- ``history.csv``: one row per epoch (:data:`HISTORY_COLUMNS`), rewritten after every epoch.
  ``skipped_batches`` counts the batches skipped for a NaN/inf loss (``nonfinite_loss``).
- ``metrics.json``: best epoch, scores, early stopping, optimizer steps, timing, provenance
  (:mod:`segflow.core.stage_args`: seed, :func:`config_hash`, segflow version).

Resume: after every finished epoch ``resume_dir/last.pt`` is rewritten atomically with the
complete training state (model, optimizer, schedulers, AMP scaler, EMA, history, top-k
bookkeeping, the running SWA average, RNG states); the top-k epochs' weights sit next to it as
``snapshot_eNNNN.pt``, a snapshot ensemble's cycle ends as ``cycle_eNNNN.pt``.
A rerun with the same configuration continues after the last finished epoch, so a killed job
(SIGTERM, Ctrl-C, OOM kill, node loss) loses at most one epoch. ``resume_dir`` must lie outside
``out_dir``: Snakemake deletes a failed job's outputs. It is deleted once ``model.pt`` is written.

The resume file is used only when its configuration hash matches: model spec, fold, loss,
augmentation, data (ids and stats.json) and every option except :data:`RESUME_EXEMPT`. Those
may change between an interrupted run and its rerun: ``epochs`` (train longer or stop sooner),
``early_stopping_patience``, ``num_workers``/``device`` (where and how fast, not what), and
``nonfinite_loss``/``max_skipped_fraction`` (a fold stopped by a NaN loss may resume skipping).
Changing ``epochs`` re-derives the learning-rate schedule from the new total for the remaining
epochs, and moves the SWA window (an SWA average begun before the new window is dropped). An
epoch is one pass over the training set, or ``steps_per_epoch`` batches; the augmentation phase
(``augment`` as a list of phases) and the mixup/cutmix draws are functions of (seed, epoch[,
batch]), so they resume too. (A *finished* run has deleted its resume state; it is not extended
but retrained.) Every epoch reseeds all generators from (seed, epoch), so an interrupted and resumed run
gives bitwise the weights of an uninterrupted one on CPU (with the same ``num_workers``; on CUDA
up to non-deterministic kernels).

Two stages and refits: ``train.init_from`` starts the weights from an earlier experiment's
checkpoint (``init_checkpoint``, :mod:`segflow.model.training.transfer`; its SHA-256 joins the configuration
hash), ``train.freeze_encoder_epochs`` keeps the encoder fixed for the first epochs (decided per
epoch, so resuming across the boundary changes nothing), and :func:`train_full` refits on every
item of folds.csv for the median of the folds' best epochs (:mod:`segflow.model.training.refit`), saving the
last epoch's weights: no validation, no monitor, no top-k.

Non-finite values: a batch whose loss is NaN/inf stops the fold with a :class:`SegflowError`
naming fold, epoch and batch before its optimizer step (``nonfinite_loss: error``), or is
skipped (``skip_batch``) until more than ``max_skipped_fraction`` of an epoch's batches are.
Off the CPU, ``error`` flags the loss on the device and reads the flag every
:data:`NONFINITE_CHECK_EVERY` batches and at the epoch's end (:func:`nonfinite_check_interval`):
the message names the same first non-finite batch, the steps after it ran on weights that are
discarded with the epoch.
Weights holding NaN/inf after an epoch, or a non-finite validation loss, stop the fold too: so
no snapshot, ``last.pt`` or ``model.pt`` ever holds non-finite weights.

The pieces live in their own modules and the public names are re-exported here:
:mod:`segflow.model.training.train_options` (:class:`TrainOptions`), :mod:`segflow.model.training.fold_data` (row split,
datasets, loaders, seeding), :mod:`segflow.model.training.schedules` (optimizer, learning-rate schedule) and
:mod:`segflow.model.training.checkpointing` (resume state, EMA, top-k snapshots). This module is the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from segflow.artifacts.arrays import classes_of, read_stats
from segflow.artifacts.resolution import score_window
from segflow.core.atomic import write_csv, write_json, write_torch
from segflow.core.data_stamp import hash_file
from segflow.core.devices import add_compute_arguments, compute, resolve_device
from segflow.core.errors import SegflowError
from segflow.core.late_options import published_options
from segflow.core.stage_args import provenance, stage_log
from segflow.model.datasets import SegmentationArrays, crop_to, pad_to_size
from segflow.model.experiment import Experiment
from segflow.model.metrics import scores_from_counts
from segflow.model.models import (
    ModelSpec,
    SnapshotEnsemble,
    build_model,
    padded_size,
    save_checkpoint,
)
from segflow.model.pretrained import input_normalisation
from segflow.model.training.checkpointing import (
    RESUME_EXEMPT,
    RESUME_FILE,
    RESUME_FORMAT,
    Ema,
    Snapshot,
    WeightAverage,
    average_snapshots,
    config_hash,
    cpu_state,
    data_fingerprint,
    first_nonfinite,
    keep_recent,
    load_resume,
    load_snapshots,
    rank_top_k,
    recalibrate_batchnorm,
    rng_state,
    save_resume,
    set_rng_state,
)
from segflow.model.training.checkpointing import remove_resume_state as _remove_resume_state
from segflow.model.training.fold_data import (
    FoldData,
    PseudoLabels,
    PseudoSpec,
    build_train_set,
    full_rows,
    seed_all,
    split_rows,
)
from segflow.model.training.losses import build_loss, parse_loss
from segflow.model.training.mixing import check_mixing_loss, mix_batch, mixing_enabled
from segflow.model.training.refit import refit_epoch_key, refit_epochs
from segflow.model.training.schedules import (
    in_swa_phase,
    lr_factor,
    make_optimizer,
    make_schedulers,
    options_lr_factor,
    per_batch_schedule_active,
    swa_learning_rate,
)
from segflow.model.training.train_options import (
    AMP_MODES,
    MONITORS,
    OPTIMIZERS,
    SCHEDULERS,
    TrainOptions,
    is_cycle_end,
)
from segflow.model.training.transfer import (
    checkpoint_normalisation,
    encoder_of,
    load_init_checkpoint,
    set_encoder_frozen,
)

__all__ = [
    "AMP_MODES",
    "HISTORY_COLUMNS",
    "MONITORS",
    "OPTIMIZERS",
    "RESUME_EXEMPT",
    "RESUME_FORMAT",
    "SCHEDULERS",
    "SCORE_NAMES",
    "THRESHOLD",
    "TrainOptions",
    "TrainingInterrupted",
    "build_train_set",
    "config_hash",
    "lr_factor",
    "split_rows",
    "train_fold",
    "train_full",
]

log = logging.getLogger(__name__)

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
    "skipped_batches",
)
THRESHOLD = 0.5
# BatchNorm recalibration draws its training batches as this (never trained) epoch would.
RECALIBRATION_EPOCH = 0
# Off the CPU with nonfinite_loss: error, the NaN/inf flag of the training loss is kept on the
# device and read every this many batches and at the end of the epoch (one host sync each),
# instead of once per batch.
NONFINITE_CHECK_EVERY = 50


def nonfinite_check_interval(device: torch.device, nonfinite_loss: str) -> int:
    """Batches between two host reads of the training loss's NaN/inf flag.

    1 (every batch, before its optimizer step) on the CPU, where the read costs nothing, and
    with ``skip_batch``, which must decide before the step; else :data:`NONFINITE_CHECK_EVERY`:
    the run still stops naming the first non-finite batch, found on the device, but the steps
    queued after it have run on weights that are then discarded with the whole epoch.

    Args:
        device: the training device.
        nonfinite_loss: ``train.nonfinite_loss``.

    Returns:
        The interval in batches (>= 1).
    """
    if device.type == "cpu" or nonfinite_loss != "error":
        return 1
    return NONFINITE_CHECK_EVERY


def overlap_counts(
    mask_logits: torch.Tensor,
    masks: torch.Tensor,
    window: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Per (image, class) pixel counts of a batch at threshold 0.5, on the logits' device.

    The counts :func:`segflow.model.metrics.per_image_scores` derives from the thresholded
    masks, as int64, so the scores computed from them on the host are the same numbers; a
    validation pass reads them once instead of copying every batch's masks.

    Args:
        mask_logits: the model's logits.
        masks: the true masks (0/1).
        window: (top, left, height, width) of the pixels scored (pad mode), or None for all.

    Returns:
        (intersection, predicted area, true area) stacked.

    Shape:
        mask_logits, masks: (N, C, H, W); returns (3, N * C), pairs in (image, class) order.
    """
    pred = (mask_logits > 0).flatten(0, 1)  # sigmoid > 0.5
    truth = masks.flatten(0, 1) != 0
    if window is not None:
        top, left, height, width = window
        pred = pred[:, top : top + height, left : left + width]
        truth = truth[:, top : top + height, left : left + width]
    pred, truth = pred.flatten(1), truth.flatten(1)
    return torch.stack([(pred & truth).sum(dim=1), pred.sum(dim=1), truth.sum(dim=1)])


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) during training; the last finished epoch's resume file is intact."""


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (Snakemake, SLURM, ``kill``) into :class:`TrainingInterrupted`.

    Unwinding as an exception lets pending atomic writes delete their temporary files; the
    default SIGTERM action would kill the process mid-write (the target file stays intact
    either way, since it is only ever replaced by a rename). Usable as a decorator.
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


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``, or None for full precision.

    Args:
        mode: a :data:`AMP_MODES` name.
        device: the training device.

    Returns:
        bfloat16, float16 or None.

    Raises:
        SegflowError: fp16 asked for on a device other than CUDA.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise SegflowError("train.amp = fp16 needs a CUDA device; use bf16 or off on the CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


class _FoldTrainer:
    """Everything one fold's training needs; :func:`train_fold` drives it epoch by epoch."""

    def __init__(
        self,
        arrays: SegmentationArrays,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        fold: int | None,
        model_spec: ModelSpec,
        loss_weights: Mapping[str, Any],
        augment: Any,
        options: TrainOptions,
        ohem_fraction: float | None,
        resume_dir: Path,
        pseudo: PseudoLabels | None = None,
        init_checkpoint: Path | None = None,
    ) -> None:
        """Build model, loss, data, optimizer and schedules (the arguments as in train_fold;
        ``fold`` None and no ``val_rows``: a full-data refit, which never validates)."""
        self.fold, self.options, self.resume_dir = fold, options, resume_dir
        self.label = "full refit" if fold is None else f"fold {fold}"
        self.validating = len(val_rows) > 0
        self.device = resolve_device(options.device)
        self.amp_dtype = amp_dtype(options.amp, self.device)
        self.channels_last = options.channels_last
        self.maximise = options.monitor != "val_loss"

        seed_all(options.seed)  # the initial weights
        if init_checkpoint is None:
            self.model = build_model(model_spec)
            # What the model is fed, here and (through model.pt) in prediction: the data's own
            # statistics, or the normalisation that pretrained encoder weights were trained with.
            self.normalisation = input_normalisation(model_spec, arrays.mean, arrays.std)
        else:
            # Every weight is replaced: no pretrained encoder weights to download or read.
            self.model = build_model(dataclasses.replace(model_spec, encoder_weights=None))
            # Weights only: the optimizer, schedule and EMA below start fresh from them.
            loaded = load_init_checkpoint(self.model, model_spec, init_checkpoint)
            # The loaded weights were trained on inputs normalised as their checkpoint says
            # (a first stage with pretrained weights: those weights' normalisation).
            self.normalisation = checkpoint_normalisation(
                loaded, model_spec.in_channels, init_checkpoint
            )
        if options.freeze_encoder_epochs:
            encoder_of(self.model)  # a model without an encoder fails here, not at epoch 1
        self.model = self.model.to(self.device)
        log.info(
            "%s: input normalisation mean %s std %s",
            self.label,
            [round(v, 4) for v in self.normalisation[0]],
            [round(v, 4) for v in self.normalisation[1]],
        )
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(
            dict(loss_weights),
            mode="binary" if model_spec.classes == 1 else "multilabel",
            ohem_fraction=ohem_fraction,
        ).to(self.device)  # bce's pos_weight is a buffer
        self.aux_loss_fn = nn.BCEWithLogitsLoss()
        check_mixing_loss(options, loss_weights)
        self.mixing = mixing_enabled(options)
        self.pseudo_weight = pseudo.weight if pseudo is not None else 1.0
        self.data = FoldData.build(
            arrays,
            train_rows,
            val_rows,
            augment,
            options,
            pin_memory=self.device.type == "cuda",
            pseudo=pseudo,
            normalisation=self.normalisation,
            distances=self.loss_fn.needs_distances,
        )

        # preprocess.resize_mode pad: scores count the original pixels, not the reflection.
        self.score_window = score_window(arrays.index, val_rows)
        self.optimizer = make_optimizer(self.model, options)
        # train.steps_per_epoch when set, else one pass: the lr schedule is derived from it.
        self.steps_per_epoch = len(self.data.train_loader)
        # A bound method: LambdaLR saves a callable object's attributes, which would pin the
        # schedule to the old epochs on resume.
        self.scheduler, self.plateau = make_schedulers(
            self.optimizer, options, self._lr_factor, self.maximise
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.ema = Ema(self.model, options.ema_decay) if options.ema_decay else None
        self.global_step = 0
        self.epoch_skipped = 0  # batches of the last trained epoch skipped for a NaN/inf loss
        self.nonfinite_check_every = nonfinite_check_interval(self.device, options.nonfinite_loss)
        self.history: list[dict[str, float]] = []
        self.top_k: list[Snapshot] = []
        self.swa = WeightAverage() if options.swa_epochs else None
        self.cycle_snapshots: list[Snapshot] = []  # snapshot ensemble members, oldest first

    # ----------------------------------------------------------------- helpers

    def _lr_factor(self, step: int) -> float:
        """The schedule's learning-rate factor of batch ``step`` (for LambdaLR)."""
        return options_lr_factor(self.options, self.steps_per_epoch, step)

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
        # With an aux head smp returns (mask logits, label logits); segflow.model.models.forward_logits
        # drops the labels, but training needs both.
        masks, labels = (out[0], out[1]) if isinstance(out, tuple | list) else (out, None)
        return crop_to(masks, height, width).float(), None if labels is None else labels.float()

    def _loss(
        self,
        mask_logits: torch.Tensor,
        label_logits: torch.Tensor | None,
        masks: torch.Tensor,
        distances: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The segmentation loss plus ``aux_weight`` x the empty/non-empty head's BCE
        (``distances``: the masks' distance maps, for the distance-based loss terms)."""
        loss = self.loss_fn(mask_logits, masks, distances)
        if label_logits is not None:
            # Image-level target per class: does the (possibly cropped) mask contain anything?
            labels = masks.flatten(2).amax(dim=2)
            loss = loss + self.options.aux_weight * self.aux_loss_fn(
                label_logits.reshape(labels.shape), labels
            )
        return loss

    def _batch_loss(
        self,
        mask_logits: torch.Tensor,
        label_logits: torch.Tensor | None,
        masks: torch.Tensor,
        is_pseudo: torch.Tensor,
        distances: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`_loss`, with pseudo-labelled images weighted by ``pseudo.pseudo_weight``.

        The weighted mean of the real and pseudo parts' losses, each weighted by its image
        count (times the pseudo weight), so weight 1 equals the plain loss of the batch.
        """
        pseudo = is_pseudo.to(self.device).bool()
        if self.pseudo_weight == 1.0 or not pseudo.any() or pseudo.all():
            return self._loss(mask_logits, label_logits, masks, distances)
        parts, weights = [], []
        for selected, weight in ((~pseudo, 1.0), (pseudo, self.pseudo_weight)):
            labels = None if label_logits is None else label_logits[selected]
            maps = None if distances is None else distances[selected]
            parts.append(self._loss(mask_logits[selected], labels, masks[selected], maps))
            weights.append(weight * int(selected.sum()))
        return (parts[0] * weights[0] + parts[1] * weights[1]) / (weights[0] + weights[1])

    def _current_lr(self) -> float:
        """The optimizer's current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _set_lr(self, lr: float) -> None:
        """Set every parameter group's learning rate (``swa_lr`` overriding the schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ----------------------------------------------------------------- one epoch

    def seed_epoch(self, epoch: int) -> None:
        """Reseed every generator from (seed, epoch): the epoch is the same, resumed or not."""
        self.data.seed_epoch(self.options.seed, epoch)

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Train one epoch; returns (mean training loss, learning rate of its last batch)."""
        self.model.train()
        self.loss_fn.set_epoch(epoch)  # ramped loss terms: this epoch's weights (and validation's)
        swa_lr = swa_learning_rate(self.options, epoch)
        if swa_lr is not None:
            self._set_lr(swa_lr)
        if self.options.freeze_encoder_epochs:
            # Decided by the epoch alone, so a run resumed at either side of the boundary
            # trains what an uninterrupted one does.
            set_encoder_frozen(self.model, epoch <= self.options.freeze_encoder_epochs)
        # Summed on the device: a float() per batch would wait for the GPU every step.
        total, count, lr = torch.zeros((), device=self.device), 0, self._current_lr()
        bar = tqdm(
            self.data.train_loader,
            desc=f"{self.label} epoch {epoch}/{self.options.epochs}",
            unit="batch",
            leave=False,
            disable=None,
            mininterval=1.0,
        )
        self.epoch_skipped = 0
        # A skipped batch's forward pass has already moved BatchNorm's running statistics
        # (to NaN): with skip_batch they are copied before each batch and put back.
        buffers = list(self.model.buffers()) if self.options.nonfinite_loss == "skip_batch" else []
        deferred = self.nonfinite_check_every > 1
        # Deferred check: the first non-finite batch (0: none yet) and its loss, on the device.
        first_bad = torch.zeros((), dtype=torch.int64, device=self.device)
        first_bad_loss = torch.zeros((), device=self.device)
        for index, loaded in enumerate(bar, start=1):
            # uint8 batches of the device path are augmented and normalised here, on the device.
            batch = self.data.to_device(loaded, self.device, self.channels_last)
            images, masks, distances = batch["image"], batch["mask"], batch.get("distance")
            if self.mixing:
                images, masks, _ = mix_batch(images, masks, self.options, epoch, index)
            saved = [buffer.detach().clone() for buffer in buffers]
            mask_logits, label_logits = self._forward(self.model, images)
            loss = self._batch_loss(mask_logits, label_logits, masks, batch["pseudo"], distances)
            if deferred:  # no sync: flagged on the device, read every nonfinite_check_every
                new_bad = torch.isfinite(loss.detach()).logical_not() & (first_bad == 0)
                first_bad_loss = torch.where(new_bad, loss.detach().float(), first_bad_loss)
                first_bad.masked_fill_(new_bad, index)
            # Else one device sync per batch: a NaN/inf loss is caught before its step turns
            # every weight into NaN.
            elif not bool(torch.isfinite(loss.detach())):
                with torch.no_grad():
                    for buffer, copy_ in zip(buffers, saved, strict=True):
                        buffer.copy_(copy_)
                self._skip_nonfinite_batch(epoch, index, float(loss.detach()))
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.options.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
            if swa_lr is not None:  # the schedulers keep stepping; their rate is overridden
                self._set_lr(swa_lr)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self._current_lr()
            self.global_step += 1
            # Plateau: the per-batch schedule only runs the warmup, then plateau takes over.
            if per_batch_schedule_active(self.options, self.global_step, self.steps_per_epoch):
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            total += loss.detach() * len(images)
            count += len(images)
            if deferred and index % self.nonfinite_check_every == 0:
                self._check_deferred_nonfinite(epoch, index, first_bad, first_bad_loss)
            if not bar.disable:
                bar.set_postfix(loss=f"{float(total) / count:.4f}", refresh=False)
        if deferred:
            self._check_deferred_nonfinite(epoch, self.steps_per_epoch, first_bad, first_bad_loss)
        mean = float(total) / max(count, 1)
        if not math.isfinite(mean):  # finite batch losses whose sum overflowed
            raise SegflowError(
                f"{self.label} epoch {epoch}: training loss is {mean} (diverged); lower "
                "train.lr or set train.grad_clip"
            )
        return mean, lr

    def _check_deferred_nonfinite(
        self, epoch: int, checked: int, first_bad: torch.Tensor, first_bad_loss: torch.Tensor
    ) -> None:
        """Read the device's NaN/inf flag (one host sync); stop if a batch up to ``checked`` had
        a non-finite loss.

        Args:
            epoch: the epoch (1-based).
            checked: the last batch (1-based) whose loss the flag covers.
            first_bad: the first non-finite batch of the epoch (1-based), 0 if none.
            first_bad_loss: that batch's loss.

        Raises:
            SegflowError: naming fold, epoch and the first non-finite batch.
        """
        batch = int(first_bad)
        if batch == 0:
            return
        raise SegflowError(
            f"{self.label} epoch {epoch} batch {batch}/{self.steps_per_epoch}: training loss is "
            f"{float(first_bad_loss)}; stopped at the check after batch {checked} (read every "
            f"{self.nonfinite_check_every} batches), nothing of this epoch is saved (lower "
            "train.lr, set train.grad_clip or check the input data, or set "
            "train.nonfinite_loss: skip_batch)"
        )

    def _skip_nonfinite_batch(self, epoch: int, batch: int, value: float) -> None:
        """Handle batch ``batch`` (1-based) of ``epoch`` whose loss is ``value`` (NaN or inf).

        With ``skip_batch`` the batch is dropped before its optimizer step; the learning-rate
        schedule still advances, so it stays aligned with the epochs.

        Raises:
            SegflowError: ``nonfinite_loss`` is ``error``, or more than ``max_skipped_fraction``
                of the epoch's batches (or all of them) were skipped.
        """
        where = f"{self.label} epoch {epoch} batch {batch}/{self.steps_per_epoch}"
        hint = "lower train.lr, set train.grad_clip or check the input data"
        if self.options.nonfinite_loss == "error":
            raise SegflowError(
                f"{where}: training loss is {value}; stopped before its optimizer step, nothing "
                f"of this epoch is saved ({hint}, or set train.nonfinite_loss: skip_batch)"
            )
        self.epoch_skipped += 1
        limit = math.floor(self.options.max_skipped_fraction * self.steps_per_epoch)
        if self.epoch_skipped > limit or self.epoch_skipped == self.steps_per_epoch:
            raise SegflowError(
                f"{where}: training loss is {value}; {self.epoch_skipped} of "
                f"{self.steps_per_epoch} batches of this epoch skipped, more than "
                f"train.max_skipped_fraction = {self.options.max_skipped_fraction}; stopped, "
                f"nothing of this epoch is saved ({hint})"
            )
        log.warning("%s: training loss is %s; batch skipped (train.nonfinite_loss)", where, value)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if per_batch_schedule_active(self.options, self.global_step, self.steps_per_epoch):
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def _check_finite(self, epoch: int, val_loss: float | None) -> None:
        """Stop before an epoch with NaN/inf weights or validation loss is snapshot or saved.

        A step can overflow the weights although every loss was finite (the next batch's loss
        would then be NaN); last.pt must keep the previous, finite epoch.

        Raises:
            SegflowError: naming fold, epoch and the first non-finite tensor.
        """
        models = [("trained", self.model)]
        if self.ema is not None:
            models.append(("EMA", self.ema.model))
        for label, model in models:
            name = first_nonfinite(model.state_dict())
            if name is not None:
                raise SegflowError(
                    f"{self.label} epoch {epoch}: the {label} weights hold NaN/inf ({name}); "
                    "stopped, nothing of this epoch is saved (lower train.lr or set "
                    "train.grad_clip)"
                )
        if val_loss is not None and not math.isfinite(val_loss):
            raise SegflowError(
                f"{self.label} epoch {epoch}: validation loss is {val_loss}; stopped, "
                "nothing of this epoch is saved (check the validation images)"
            )

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation loss and mean per-image dice/iou/kaggle at threshold 0.5 (pad mode: the
        scores on the original pixels, :func:`segflow.artifacts.resolution.score_window`)."""
        if self.data.val_loader is None:
            raise SegflowError(f"{self.label}: there is no validation fold to validate on")
        model.eval()
        # Summed on the device in float64 (the same sums as Python floats): read once, after
        # the pass, instead of a sync per batch.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        # The scores' pixel counts stay on the device too; one copy after the pass.
        counts: list[torch.Tensor] = []
        for loaded in self.data.val_loader:
            batch = self.data.to_device(loaded, self.device, self.channels_last)
            images, masks, distances = batch["image"], batch["mask"], batch.get("distance")
            mask_logits, label_logits = self._forward(model, images)
            loss = self._loss(mask_logits, label_logits, masks, distances)
            total += loss.detach().double() * len(images)
            count += len(images)
            # Every (image, class) pair is scored: the mean is the mean over classes.
            counts.append(overlap_counts(mask_logits, masks, self.score_window))
        intersection, pred_area, truth_area = torch.cat(counts, dim=1).cpu().numpy()
        result = {"val_loss": float(total) / max(count, 1)}
        for name in SCORE_NAMES:
            values = scores_from_counts(name, intersection, pred_area, truth_area)
            result[name] = float(values.mean())
        return result

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Seed, train and validate one epoch; record it in the history, plateau and top k.

        Args:
            epoch: the epoch (1-based).

        Returns:
            The epoch's history row; its snapshot (if in the top k) is saved, last.pt is not.
        """
        started = time.monotonic()
        self.seed_epoch(epoch)
        train_loss, lr = self.train_epoch(epoch)
        if self.validating:
            scores = self.validate(self.evaluated_model)
        else:  # a full-data refit: nothing held out (NaN in history.csv's validation columns)
            scores = {"val_loss": math.nan, **dict.fromkeys(SCORE_NAMES, math.nan)}
        self._check_finite(epoch, scores["val_loss"] if self.validating else None)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": scores["val_loss"],
            **{f"val_{name}": scores[name] for name in SCORE_NAMES},
            "lr": lr,
            "seconds": round(time.monotonic() - started, 3),
            "skipped_batches": self.epoch_skipped,
        }
        self.history.append(row)
        if self.plateau is not None and self.validating and epoch > self.options.warmup_epochs:
            self.plateau.step(self.monitor_value(row))
        return row

    def monitor_value(self, row: Mapping[str, float]) -> float:
        """The monitored quantity of a history row."""
        key = "val_loss" if self.options.monitor == "val_loss" else f"val_{self.options.monitor}"
        return float(row[key])

    def best_epoch(self) -> tuple[int, float]:
        """(epoch, monitor value) of the best epoch so far; the earliest among equals."""
        best = self.history[0]
        for row in self.history[1:]:
            value, best_value = self.monitor_value(row), self.monitor_value(best)
            if value > best_value if self.maximise else value < best_value:
                best = row
        return int(best["epoch"]), self.monitor_value(best)

    def patience_exhausted(self) -> bool:
        """Whether ``early_stopping_patience`` epochs passed without a new best."""
        patience = self.options.early_stopping_patience
        if patience is None or not self.history:
            return False
        best_epoch, _ = self.best_epoch()
        return int(self.history[-1]["epoch"]) - best_epoch >= patience

    def update_top_k(self, epoch: int, value: float) -> list[Snapshot]:
        """Add this epoch's evaluated weights to the top k if they belong there.

        Returns:
            The snapshots that fell out (their files are deleted after last.pt is written).
        """
        top_k, new, dropped = rank_top_k(
            self.top_k, epoch, value, self.options.average_top_k, self.maximise
        )
        if new is not None:
            write_torch(self.resume_dir / new.file, cpu_state(self.evaluated_model))
        self.top_k = top_k
        return dropped

    def update_averages(self, epoch: int, value: float) -> list[Snapshot]:
        """Add this epoch to the SWA average and, at a cycle end, to the snapshot ensemble.

        Returns:
            Cycle snapshots that fell out of the last ``snapshot_ensemble`` (their files are
            deleted after last.pt is written).
        """
        if self.swa is not None and in_swa_phase(self.options, epoch):
            self.swa.update(self.model, epoch)
        if self.options.snapshot_ensemble < 2 or not is_cycle_end(self.options, epoch):
            return []
        new = Snapshot(epoch, value, f"cycle_e{epoch:04d}.pt")
        write_torch(self.resume_dir / new.file, cpu_state(self.evaluated_model))
        self.cycle_snapshots, dropped = keep_recent(
            self.cycle_snapshots, new, self.options.snapshot_ensemble
        )
        return dropped

    # ----------------------------------------------------------------- resume

    def state(self, config_hash: str) -> dict[str, Any]:
        """The complete training state for ``last.pt`` (see :mod:`segflow.model.training.checkpointing`)."""
        return {
            "format": RESUME_FORMAT,
            "config_hash": config_hash,
            "epoch": int(self.history[-1]["epoch"]) if self.history else 0,
            "global_step": self.global_step,
            "model": cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": cpu_state(self.ema.model) if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "history": [dict(row) for row in self.history],
            "top_k": [dataclasses.asdict(s) for s in self.top_k],
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "cycle_snapshots": [dataclasses.asdict(s) for s in self.cycle_snapshots],
            "rng": rng_state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (read back from last.pt)."""
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
        self.top_k = [Snapshot(**s) for s in state["top_k"]]
        if self.swa is not None:
            self.swa.load_state_dict(state.get("swa"))
            first = self.options.epochs - self.options.swa_epochs + 1
            if self.swa.epochs and self.swa.epochs[0] < first:
                # train.epochs was raised: the collected epochs are no longer the last ones.
                log.warning(
                    "%s: SWA average of epochs %s dropped; SWA now starts at epoch %d",
                    self.label,
                    self.swa.epochs,
                    first,
                )
                self.swa = WeightAverage()
        self.cycle_snapshots = [Snapshot(**s) for s in state.get("cycle_snapshots", [])]
        set_rng_state(state["rng"])

    # ----------------------------------------------------------------- final weights

    def final_model(self) -> tuple[nn.Module, list[int]]:
        """The weights to save without SWA: the best snapshot, or the average of the top k
        (its BatchNorm statistics recalibrated with ``recalibrate_bn``); a full-data refit's last
        epoch (there is no best without validation)."""
        model = copy.deepcopy(self.evaluated_model)
        if not self.validating:
            return model, [int(self.history[-1]["epoch"])]
        model.load_state_dict(average_snapshots(self.resume_dir, self.top_k))
        if self.options.recalibrate_bn and len(self.top_k) > 1:
            self.recalibrate_batchnorm(model)
        return model, [s.epoch for s in self.top_k]

    def swa_model(self) -> tuple[nn.Module, list[int]] | None:
        """(the SWA average with recalibrated BatchNorm statistics, its epochs), or None (SWA
        off, or no SWA epoch trained)."""
        if self.swa is None or self.swa.average is None:
            return None
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.swa.average)
        self.recalibrate_batchnorm(model)
        return model.eval(), list(self.swa.epochs)

    def ensemble_model(self) -> SnapshotEnsemble:
        """The snapshot ensemble of the kept cycle ends' evaluated weights.

        Raises:
            SegflowError: no cycle end was reached.
        """
        if not self.cycle_snapshots:
            raise SegflowError(
                f"{self.label}: train.snapshot_ensemble is set but no restart cycle ended"
            )
        if len(self.cycle_snapshots) < self.options.snapshot_ensemble:
            log.warning(
                "%s: only %d of train.snapshot_ensemble = %d cycle ends were trained",
                self.label,
                len(self.cycle_snapshots),
                self.options.snapshot_ensemble,
            )
        members = []
        for state in load_snapshots(self.resume_dir, self.cycle_snapshots):
            member = copy.deepcopy(self.evaluated_model)
            member.load_state_dict(state)
            members.append(member)
        return SnapshotEnsemble(members).eval()

    def recalibrate_batchnorm(self, model: nn.Module) -> None:
        """Recompute ``model``'s BatchNorm statistics on one pass of the training loader,
        reseeded as epoch :data:`RECALIBRATION_EPOCH` (the same batches on every run)."""
        self.data.seed_epoch(self.options.seed, RECALIBRATION_EPOCH)
        images = (
            self.data.to_device(batch, self.device, self.channels_last)["image"]
            for batch in self.data.train_loader
        )
        batches = recalibrate_batchnorm(model, images, forward=self._forward)
        log.info("%s: BatchNorm statistics recalibrated on %d batches", self.label, batches)


@_interrupt_on_sigterm()
def train_fold(
    arrays_dir: str | os.PathLike[str],
    folds_csv: str | os.PathLike[str],
    fold: int,
    experiment: Experiment,
    out_dir: str | os.PathLike[str],
    resume_dir: str | os.PathLike[str],
    pseudo: PseudoSpec | None = None,
    init_checkpoint: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train on the folds other than ``fold``, validate on ``fold``; resumable.

    Args:
        arrays_dir: the preprocess output folder (train_images.npy, train_masks.npy,
            index.parquet, stats.json).
        folds_csv: the folds stage's folds.csv.
        fold: the validation fold.
        experiment: the parsed experiment (:func:`segflow.model.experiment.parse_experiment`):
            its ``model`` (``classes`` and ``in_channels`` those of the arrays' stats.json),
            ``loss`` (term -> weight, or -> ``{"weight": w, <option>: value}``:
            :func:`segflow.model.training.losses.build_loss`), ``ohem_fraction`` (online hard
            example mining for the pixel-wise loss terms), ``augment`` (a spec or list of
            phases: :func:`segflow.model.training.augment.build_augmentation_schedule`) and
            ``train`` options.
        out_dir: where model.pt, history.csv and metrics.json go.
        resume_dir: where the resume state lives while training (outside ``out_dir``); deleted
            after model.pt is written.
        pseudo: a pseudo-labelling round's selection to train on too (None: real labels only).
        init_checkpoint: the ``model.pt`` whose weights training starts from (the same fold of
            the experiment named by ``options.init_from``); required exactly when that is set.
        on_epoch: called after each finished epoch (its resume state saved) with the epoch and
            its validation monitor value; an exception it raises stops training there
            (the hyperparameter search's pruning, :mod:`segflow.search.search_worker`).

    Returns:
        The metrics written to metrics.json.

    Raises:
        SegflowError: bad input files or options (naming them), or a diverged loss.
        TrainingInterrupted: on SIGTERM; rerun to continue after the last finished epoch.
    """
    started = time.monotonic()
    arrays = SegmentationArrays.open(arrays_dir)
    train_rows, val_rows = split_rows(arrays, folds_csv, fold)
    if len(val_rows) == 0:
        raise SegflowError(f"{folds_csv}: fold {fold} has no validation items")
    return _train(
        _Run(arrays, train_rows, val_rows, fold, started),
        experiment,
        Path(out_dir),
        Path(resume_dir),
        pseudo,
        init_checkpoint,
        on_epoch=on_epoch,
    )


@_interrupt_on_sigterm()
def train_full(
    arrays_dir: str | os.PathLike[str],
    folds_csv: str | os.PathLike[str],
    fold_metrics: list[str | os.PathLike[str]],
    experiment: Experiment,
    out_dir: str | os.PathLike[str],
    resume_dir: str | os.PathLike[str],
    pseudo: PseudoSpec | None = None,
    init_checkpoint: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Refit on every item of folds.csv, for the median of the folds' best epochs; resumable.

    Nothing is held out, so there is no monitor, best epoch, early stopping or top-k average:
    the last epoch's weights (the EMA's with ``ema_decay``) are saved. ``options.epochs`` and
    ``early_stopping_patience`` are replaced by :func:`segflow.model.training.refit.refit_epochs` and None
    (both resume-exempt); the learning-rate schedule follows the refit's epochs. With
    ``swa_epochs`` or ``snapshot_ensemble`` (weights from the end of training) the refit trains
    the median of the folds' ``epochs_trained`` and saves the SWA average (always: there is no
    validation for ``swa_select``) or the ensemble of its last cycle ends. Under a time budget
    ``epochs`` (the plan's, :mod:`segflow.model.budget`) replaces that median: the plan is made before
    any fold has trained, and the refit's time must fit it.

    Args:
        arrays_dir: as :func:`train_fold`.
        folds_csv: the folds stage's folds.csv: every item listed is trained on.
        fold_metrics: the cross-validation folds' ``metrics.json`` (their ``best_epoch``, or
            ``epochs_trained``: :func:`segflow.model.training.refit.refit_epoch_key`).
        experiment: as :func:`train_fold` (its ``train`` options the folds' own).
        out_dir: where model.pt, history.csv (validation columns empty) and metrics.json go.
        resume_dir: as :func:`train_fold`.
        pseudo: as :func:`train_fold`.
        init_checkpoint: the full refit ``model.pt`` of the experiment named by
            ``options.init_from``; required exactly when that is set.
        epochs: the epochs to train (a time budget's plan); None: the median of the folds'.

    Returns:
        The metrics written to metrics.json (``refit_best_epochs``: the folds' best epochs, or
        ``refit_epochs_trained``: their trained epochs; ``refit_epochs_from``: ``folds`` or
        ``plan``).

    Raises:
        SegflowError: as :func:`train_fold`, a fold metrics.json without a best epoch, or
            ``scheduler: plateau`` (it steps on the validation monitor).
    """
    started = time.monotonic()
    options = experiment.train
    if options.scheduler == "plateau":
        raise SegflowError(
            "train.scheduler: plateau follows the validation monitor, which a full-data refit "
            "has not; use another scheduler"
        )
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise SegflowError(f"full refit: planned epochs must be an integer >= 1, got {epochs!r}")
    key = refit_epoch_key(options.swa_epochs, options.snapshot_ensemble)
    median, fold_epochs = refit_epochs(fold_metrics, key)
    source = "folds" if epochs is None else "plan"
    epochs = median if epochs is None else epochs
    if options.average_top_k > 1:
        log.info("full refit: train.average_top_k ignored (no validation to rank epochs by)")
    if options.swa_epochs > epochs:
        where = (
            f"the median of the folds' {key} {fold_epochs}"
            if source == "folds"
            else "the time budget's plan"
        )
        raise SegflowError(
            f"train.swa_epochs ({options.swa_epochs}) exceeds the full refit's {epochs} epochs "
            f"({where}); lower it or turn the refit off"
        )
    options = dataclasses.replace(options, epochs=epochs, early_stopping_patience=None)
    if source == "folds":
        log.info("full refit: %d epochs, the median of the folds' %s %s", epochs, key, fold_epochs)
    else:
        log.info(
            "full refit: %d epochs from the time budget's plan (the folds' %s: %s)",
            epochs,
            key,
            fold_epochs,
        )
    arrays = SegmentationArrays.open(arrays_dir)
    rows = full_rows(arrays, folds_csv)
    metrics = _train(
        _Run(arrays, rows, np.empty(0, dtype=np.int64), None, started),
        dataclasses.replace(experiment, train=options),
        Path(out_dir),
        Path(resume_dir),
        pseudo,
        init_checkpoint,
        # The folds' epochs the refit's count is the median of.
        extra={
            "refit_best_epochs" if key == "best_epoch" else "refit_epochs_trained": fold_epochs,
            "refit_epochs_from": source,
        },
    )
    return metrics


@dataclasses.dataclass(frozen=True)
class _Run:
    """What is trained and validated on: a fold (``fold``, its rows) or the full refit."""

    arrays: SegmentationArrays
    train_rows: np.ndarray
    val_rows: np.ndarray  # empty for the full refit
    fold: int | None  # None: the full refit
    started: float  # time.monotonic() at the call


def _check_training(
    arrays: SegmentationArrays,
    experiment: Experiment,
    out_dir: Path,
    resume_dir: Path,
    init_checkpoint: str | os.PathLike[str] | None,
) -> None:
    """What :func:`_train` refuses before any work: a model that does not fit the arrays, or
    ``train.init_from`` without its checkpoint (or the reverse); warns of a resume folder
    inside the output folder.

    Raises:
        SegflowError: naming the mismatch.
    """
    model_spec, options = experiment.model, experiment.train
    if (
        resume_dir.resolve() == out_dir.resolve()
        or out_dir.resolve() in resume_dir.resolve().parents
    ):
        log.warning(
            "resume_dir %s lies inside out_dir %s: a failed job loses it", resume_dir, out_dir
        )
    if model_spec.classes != len(arrays.classes):
        raise SegflowError(
            f"model.classes is {model_spec.classes} but {arrays.root / 'stats.json'} lists "
            f"{len(arrays.classes)} class(es): {', '.join(arrays.classes)}"
        )
    if model_spec.in_channels != arrays.channels:
        raise SegflowError(
            f"model.in_channels is {model_spec.in_channels} but {arrays.root / 'stats.json'} "
            f"says the images have {arrays.channels} channel(s)"
        )
    if (options.init_from is None) != (init_checkpoint is None):
        raise SegflowError(
            f"train.init_from is {options.init_from!r} but the initial checkpoint is "
            f"{None if init_checkpoint is None else str(init_checkpoint)!r}: give both or neither"
        )


def _train(
    setup: _Run,
    experiment: Experiment,
    out_dir: Path,
    resume_dir: Path,
    pseudo_spec: PseudoSpec | None,
    init_checkpoint: str | os.PathLike[str] | None,
    extra: Mapping[str, Any] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """The training loop of :func:`train_fold` and :func:`train_full` (arguments as there)."""
    arrays, fold = setup.arrays, setup.fold
    model_spec, options, augment = experiment.model, experiment.train, experiment.augment
    ohem_fraction = experiment.ohem_fraction
    label = "full refit" if fold is None else f"fold {fold}"
    _check_training(arrays, experiment, out_dir, resume_dir, init_checkpoint)
    pseudo = None
    if pseudo_spec is not None:
        pseudo = PseudoLabels.load(
            pseudo_spec.directory, arrays, pseudo_spec.max_share, pseudo_spec.weight
        )
    fingerprint = data_fingerprint(arrays, setup.train_rows, setup.val_rows)
    if pseudo is not None:
        fingerprint["pseudo"] = pseudo.fingerprint()
    # Canonical form: equal loss configs (1 vs 1.0, {weight: 1} vs 1) hash alike.
    loss_weights = parse_loss(experiment.loss, "loss", model_spec.classes)
    init_sha = None
    if init_checkpoint is not None:
        if not Path(init_checkpoint).is_file():
            raise SegflowError(
                f"train.init_from: {init_checkpoint} does not exist (train the first stage first)"
            )
        init_sha = hash_file(init_checkpoint)
    expected_hash = config_hash(
        options,
        model_spec,
        "full" if fold is None else fold,
        loss_weights,
        ohem_fraction,
        augment,
        fingerprint,
        init_checkpoint=init_sha,
    )
    trainer = _FoldTrainer(
        arrays,
        setup.train_rows,
        setup.val_rows,
        fold,
        model_spec,
        loss_weights,
        augment,
        options,
        ohem_fraction,
        resume_dir,
        pseudo,
        None if init_checkpoint is None else Path(init_checkpoint),
    )
    log.info(
        "%s: %d training / %d validation images, %d batches per epoch, device %s, amp %s%s",
        label,
        len(trainer.data.train_set),
        len(setup.val_rows),
        trainer.steps_per_epoch,
        trainer.device,
        trainer.amp_dtype or "off",
        f", starting from {init_checkpoint}" if init_checkpoint is not None else "",
    )
    resumed_from = _resume(trainer, resume_dir / RESUME_FILE, expected_hash, out_dir)

    stopped_early = False
    for epoch in range(resumed_from + 1, options.epochs + 1):
        if trainer.patience_exhausted():
            stopped_early = True
            break
        row = trainer.run_epoch(epoch)
        resume_dir.mkdir(parents=True, exist_ok=True)
        # Order matters for a kill at any point: new snapshot, then last.pt naming it, then
        # the snapshots last.pt no longer names. A refit keeps no top-k snapshots (no monitor
        # to rank epochs by); its SWA average and cycle ends are kept like a fold's.
        value = trainer.monitor_value(row) if trainer.validating else None
        dropped = trainer.update_top_k(epoch, value) if trainer.validating else []
        dropped += trainer.update_averages(epoch, value)
        save_resume(resume_dir, trainer.state(expected_hash), dropped)
        write_csv(out_dir / "history.csv", _history_frame(trainer.history))
        _log_epoch(trainer, row)
        if on_epoch is not None and value is not None:
            on_epoch(epoch, value)

    if not trainer.history:
        raise SegflowError(f"{label}: no epoch was trained (train.epochs = {options.epochs})")
    if stopped_early:
        log.info("%s: early stop after epoch %d", label, trainer.history[-1]["epoch"])
    metrics = _save_model(trainer, arrays, model_spec, out_dir)
    skipped = int(sum(row.get("skipped_batches", 0) for row in trainer.history))
    metrics.update(
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
        train_seconds=round(sum(row["seconds"] for row in trainer.history), 3),
        skipped_batches=skipped,
        # global_step counts skipped batches too; they took no step (segflow.model.diagnostics).
        optimizer_steps=trainer.global_step - skipped,
        elapsed_seconds=round(time.monotonic() - setup.started, 3),
        n_train=len(trainer.data.train_set),
        n_val=len(setup.val_rows),
        **dict(extra or {}),
        options=published_options(options),
    )
    if init_sha is not None:  # the initial weights' identity (also part of config_hash)
        metrics["init_checkpoint_sha256"] = init_sha
    # config_hash: the same digest that guards the resume file.
    metrics["provenance"] = provenance(options.seed, expected_hash)
    write_json(out_dir / "metrics.json", metrics)
    _remove_resume_state(resume_dir)
    if trainer.validating:
        log.info(
            "%s: %s = %.4f (%s) -> %s",
            label,
            options.monitor,
            metrics["score"],
            metrics["weights"],
            out_dir / "model.pt",
        )
    else:
        log.info("%s: %s -> %s", label, metrics["weights"], out_dir / "model.pt")
    return metrics


def _log_epoch(trainer: _FoldTrainer, row: Mapping[str, float]) -> None:
    """One log line per finished epoch (a refit has no validation scores to report)."""
    epochs = trainer.options.epochs
    if not trainer.validating:
        log.info(
            "%s epoch %d/%d: train_loss %.4f lr %.3g %.1fs",
            trainer.label,
            row["epoch"],
            epochs,
            row["train_loss"],
            row["lr"],
            row["seconds"],
        )
        return
    best_epoch, _ = trainer.best_epoch()
    log.info(
        "%s epoch %d/%d: train_loss %.4f val_loss %.4f dice %.4f iou %.4f kaggle %.4f lr %.3g "
        "%.1fs%s",
        trainer.label,
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_dice"],
        row["val_iou"],
        row["val_kaggle"],
        row["lr"],
        row["seconds"],
        " (best)" if best_epoch == row["epoch"] else "",
    )


def _resume(trainer: _FoldTrainer, path: Path, expected_hash: str, out_dir: Path) -> int:
    """Load the resume state of this configuration into ``trainer`` if there is one.

    Args:
        trainer: the freshly built trainer.
        path: ``resume_dir/last.pt``.
        expected_hash: the configuration's :func:`config_hash`.
        out_dir: where history.csv is rewritten from the resumed history.

    Returns:
        The last finished epoch (0 when training from scratch).
    """
    state = load_resume(path, expected_hash)
    if state is None:
        return 0
    trainer.load_state(state)
    resumed_from = int(state["epoch"])
    log.info("%s: resuming after epoch %d from %s", trainer.label, resumed_from, path)
    if resumed_from >= trainer.options.epochs:
        log.warning(
            "%s: %s already has %d epochs (train.epochs = %d); finishing with those",
            trainer.label,
            path,
            resumed_from,
            trainer.options.epochs,
        )
    write_csv(out_dir / "history.csv", _history_frame(trainer.history))
    return resumed_from


def _save_model(
    trainer: _FoldTrainer, arrays: SegmentationArrays, model_spec: ModelSpec, out_dir: Path
) -> dict[str, Any]:
    """Pick the final weights, validate them once more and save them as ``out_dir/model.pt``.

    The final weights: the snapshot ensemble if ``snapshot_ensemble``, else the best epoch or
    top-k average, replaced by the SWA average when ``swa_select`` says so.

    A full refit's weights (its last epoch's) are saved without validation: ``score``,
    ``monitor`` and ``best_epoch`` are null, ``refit`` is true.

    Args:
        trainer: the trainer after its last epoch.
        arrays: the preprocess outputs (input size for the checkpoint).
        model_spec: the model.
        out_dir: the output folder.

    Returns:
        The model-selection part of metrics.json (fold ... epochs_trained).
    """
    options = trainer.options
    source = "ema" if options.ema_decay else "trained"
    if trainer.validating:
        best_epoch, best_value = trainer.best_epoch()
    else:  # a full refit: no best epoch, its last one stands for it
        best_epoch, best_value = int(trainer.history[-1]["epoch"]), None
    ensemble_epochs: list[int] = []
    if options.snapshot_ensemble >= 2:
        model: nn.Module = trainer.ensemble_model()
        ensemble_epochs, averaged_epochs = [s.epoch for s in trainer.cycle_snapshots], []
        weights = (
            f"snapshot ensemble of the {source} weights of epochs {ensemble_epochs} (mean "
            "probability)"
        )
    else:
        model, averaged_epochs = trainer.final_model()
        recalibrated = " (BatchNorm recalibrated)" if options.recalibrate_bn else ""
        if not trainer.validating:
            weights = f"{source} weights of epoch {best_epoch} (full refit, last epoch)"
        elif len(averaged_epochs) > 1:
            weights = f"{source} weights averaged over epochs {averaged_epochs}{recalibrated}"
        else:
            weights = f"{source} weights of epoch {best_epoch}"
    _check_final_weights(trainer, model)
    monitor: str | None = options.monitor if trainer.validating else None
    final_scores = trainer.validate(model) if trainer.validating else None
    score = _monitored(options, final_scores) if final_scores is not None else None

    swa_summary = None
    swa = trainer.swa_model()
    if swa is not None:
        swa_model, swa_epochs = swa
        _check_final_weights(trainer, swa_model)
        if trainer.validating:
            swa_scores = trainer.validate(swa_model)
            swa_score = _monitored(options, swa_scores)
            better = swa_score > score if trainer.maximise else swa_score < score
            selected = options.swa_select == "always" or better
        else:
            # A refit has nothing to validate on, so swa_select cannot compare: train.swa_epochs
            # asks for SWA, and the refit keeps it.
            swa_scores, swa_score, selected = None, None, True
        swa_summary = {
            "epochs": swa_epochs,
            "score": swa_score,
            "final": swa_scores,
            "without_swa_score": score,
            "selected": selected,
        }
        if trainer.validating:
            log.info(
                "%s: SWA over epochs %s: %s %.4f vs %.4f without SWA -> %s",
                trainer.label,
                swa_epochs,
                options.monitor,
                swa_score,
                score,
                "SWA kept" if selected else "SWA dropped (train.swa_select: best)",
            )
        else:
            log.info(
                "%s: SWA over epochs %s kept (no validation: train.swa_select does not apply)",
                trainer.label,
                swa_epochs,
            )
        if selected:
            model, final_scores, score = swa_model, swa_scores, swa_score
            averaged_epochs = swa_epochs
            weights = (
                f"SWA of the trained weights over epochs {averaged_epochs} (BatchNorm recalibrated)"
            )
    elif options.swa_epochs:
        log.warning(
            "%s: no SWA epoch was trained (stopped after epoch %d, SWA from epoch %d)",
            trainer.label,
            trainer.history[-1]["epoch"],
            options.epochs - options.swa_epochs + 1,
        )
    save_checkpoint(
        out_dir / "model.pt",
        model,
        model_spec,
        {
            "fold": trainer.fold,
            "epoch": best_epoch,
            "monitor": monitor,
            "score": score,
            "mean": trainer.normalisation[0],
            "std": trainer.normalisation[1],
            "input_size": [arrays.height, arrays.width],
            "dtype": arrays.dtype,
            "averaged_epochs": averaged_epochs,
            "ensemble_epochs": ensemble_epochs,
            "weights": weights,
            "threshold": THRESHOLD,
            **({} if trainer.validating else {"refit": True}),
        },
    )
    if not trainer.validating:
        return {
            "fold": None,
            "refit": True,
            "epochs": best_epoch,
            "weights": weights,
            "averaged_epochs": averaged_epochs,
            "ensemble_epochs": ensemble_epochs,
            "swa": swa_summary,
            "epochs_trained": len(trainer.history),
        }
    return {
        "fold": trainer.fold,
        "monitor": monitor,
        "best_epoch": best_epoch,
        "best_epoch_score": best_value,
        "score": score,
        "final": final_scores,
        "weights": weights,
        "averaged_epochs": averaged_epochs,
        "ensemble_epochs": ensemble_epochs,
        "swa": swa_summary,
        "epochs_trained": len(trainer.history),
    }


def _monitored(options: TrainOptions, scores: Mapping[str, float]) -> float:
    """The monitored quantity of :meth:`_FoldTrainer.validate`'s scores."""
    return scores["val_loss"] if options.monitor == "val_loss" else scores[options.monitor]


def _check_final_weights(trainer: _FoldTrainer, model: nn.Module) -> None:
    """Refuse to save NaN/inf weights (snapshots are checked when taken; this guards old
    resume dirs and the SWA average)."""
    nonfinite = first_nonfinite(model.state_dict())
    if nonfinite is not None:
        raise SegflowError(
            f"{trainer.label}: the final weights hold NaN/inf ({nonfinite}); model.pt not "
            f"written (delete {trainer.resume_dir} to train from scratch)"
        )


def _history_frame(history: list[dict[str, float]]) -> pd.DataFrame:
    """history.csv's table: one row per epoch, :data:`HISTORY_COLUMNS`."""
    return pd.DataFrame(history, columns=list(HISTORY_COLUMNS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow train``'s flags."""
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    parser.add_argument("--fold", type=int, default=None, help="the validation fold")
    parser.add_argument(
        "--refit-from",
        nargs="+",
        default=None,
        metavar="METRICS_JSON",
        help="instead of --fold: refit on every item of --folds for the median best epoch of "
        "these folds' metrics.json, or with --plan the plan's epochs (no validation)",
    )
    parser.add_argument("--name", default="experiment", help="experiment name (for messages)")
    parser.add_argument(
        "--experiment", required=True, help="experiment as inline JSON or a JSON/YAML file"
    )
    parser.add_argument("--out-dir", required=True, help="folder for model.pt, history, metrics")
    parser.add_argument("--resume-dir", required=True, help="resume checkpoint folder")
    parser.add_argument(
        "--pseudo-dir", default=None, help="a pseudo-labelling round's select-pseudo output"
    )
    parser.add_argument(
        "--max-pseudo-share", type=float, default=0.3, help="cap on pseudo-labelled draws"
    )
    parser.add_argument(
        "--pseudo-weight", type=float, default=1.0, help="loss weight of pseudo-labelled images"
    )
    parser.add_argument(
        "--plan",
        default=None,
        help="a time budget's plan.json (segflow plan-budget): its epochs replace train.epochs "
        "(with --refit-from: the folds' median best epoch)",
    )
    parser.add_argument(
        "--round", type=int, default=0, help="the pseudo-labelling round (looked up in --plan)"
    )
    parser.add_argument(
        "--init-checkpoint",
        default=None,
        help="model.pt to start from (the stage named by the experiment's train.init_from)",
    )
    add_compute_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow train``: one fold (``--fold``) or the full refit (``--refit-from``)."""
    with compute(args):
        _train_command(args)


def _train_command(args: argparse.Namespace) -> None:
    from segflow.model.experiment import load_experiment_values, parse_experiment

    stats = read_stats(args.arrays_dir)
    values = load_experiment_values(args.experiment)
    experiment = parse_experiment(
        args.name,
        values,
        in_channels=int(stats["channels"]),
        classes=len(classes_of(stats)),
    )
    if (args.fold is None) == (args.refit_from is None):
        raise SegflowError("give either --fold (cross-validation) or --refit-from (full refit)")
    refit_epochs = None
    if args.plan is not None:
        epochs = _planned_epochs(experiment, values, args)
        if args.refit_from is not None:
            # Planned with its folds: the median of their best epochs is not known in advance.
            refit_epochs = epochs
        else:
            train = dataclasses.replace(experiment.train, epochs=epochs)
            experiment = dataclasses.replace(experiment, train=train)
    pseudo = (
        None
        if args.pseudo_dir is None
        else PseudoSpec(args.pseudo_dir, args.max_pseudo_share, args.pseudo_weight)
    )
    if args.refit_from is not None:
        result = train_full(
            args.arrays_dir,
            args.folds,
            args.refit_from,
            experiment,
            args.out_dir,
            args.resume_dir,
            pseudo,
            args.init_checkpoint,
            epochs=refit_epochs,
        )
        stage_log.info("full refit trained: %s", result)
        return
    result = train_fold(
        args.arrays_dir,
        args.folds,
        args.fold,
        experiment,
        args.out_dir,
        args.resume_dir,
        pseudo,
        args.init_checkpoint,
    )
    stage_log.info("fold %d trained: %s", args.fold, result)


def _planned_epochs(experiment: Any, values: dict[str, Any], args: argparse.Namespace) -> int:
    """The budget plan's epochs for this training (a fold, or with --refit-from the full
    refit), replacing train.epochs (a refit: the median of its folds' best epochs)."""
    # Not in train's code fingerprint (segflow.stages): the plan file carries its effect.
    from segflow.model.budget import REFIT, planned_epochs, read_plan

    member = REFIT if args.refit_from is not None else args.fold
    epochs = planned_epochs(
        read_plan(args.plan), args.name, args.round, member, values, where=args.plan
    )
    train = experiment.train
    stage_log.info(
        "budget plan %s: %d epoch(s) for %s round %d %s (train.epochs: %d)",
        args.plan,
        epochs,
        args.name,
        args.round,
        "full refit" if member == REFIT else f"fold {member}",
        train.epochs,
    )
    if epochs <= train.warmup_epochs:
        stage_log.warning(
            "the plan's %d epoch(s) do not outlast train.warmup_epochs = %d: the learning rate "
            "never decays",
            epochs,
            train.warmup_epochs,
        )
    return epochs
