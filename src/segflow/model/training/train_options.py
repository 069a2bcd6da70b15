"""Options of fold training: :class:`TrainOptions`, its validation and the allowed values.

The config section ``experiments.<name>.train`` and the ``segflow train`` flags map one to one
onto :class:`TrainOptions` fields (:mod:`segflow.core.options`). This module needs neither torch nor
the data: parsing an experiment does not import the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from segflow.core.errors import SegflowError
from segflow.core.options import option

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "cosine_restarts", "plateau", "onecycle")
AMP_MODES = ("auto", "off", "bf16", "fp16")
MONITORS = ("kaggle", "dice", "iou", "val_loss")
NONFINITE_LOSS = ("error", "skip_batch")
SWA_SELECT = ("best", "always")
CLASS_BALANCE = ("none", "sqrt", "inverse")
MIN_OPTIMIZER_STEPS = 300
"""Fewer optimizer steps than this are too few to train a segmentation network (the
diagnostics' ``few_steps`` flag; the time budget's ``min_fold_steps`` default). Here, not in
:mod:`segflow.model.diagnostics`, so that the budget's plan does not depend on the diagnostics' code."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train one fold (config section ``experiments.<name>.train``)."""

    # Left out of summaries and the resume hash at their defaults: runs that do not set them
    # keep byte-identical outputs (segflow.core.late_options.published_options).
    _omit_at_default: ClassVar[tuple[str, ...]] = ("class_balance",)

    epochs: int = option(10, "epochs to train (may be raised to extend a resumable run)")
    batch_size: int = option(16, "images per batch (training and validation)")
    optimizer: str = option("adamw", "optimizer; sgd uses momentum 0.9", OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(1e-4, "weight decay (decoupled for adamw)")
    scheduler: str = option(
        "cosine",
        "learning-rate schedule per batch: none, cosine (to 0), cosine_restarts (SGDR), plateau "
        "(after warmup, x plateau_factor at the end of the plateau_patience-th consecutive "
        "epoch without improvement of the monitor), onecycle",
        SCHEDULERS,
    )
    plateau_patience: int = option(
        3,
        "scheduler plateau: the learning rate is multiplied by plateau_factor at the end of the "
        "plateau_patience-th consecutive epoch after warmup whose monitor does not improve on "
        "the best since warmup (by more than a relative 1e-4); the count restarts after each "
        "reduction",
    )
    plateau_factor: float = option(
        0.5, "scheduler plateau: the factor (in (0, 1)) applied to the learning rate"
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
    channels_last: bool = option(
        True, "channels-last (NHWC) memory format: faster convolutions on CUDA and on the CPU"
    )
    ema_decay: float | None = option(
        None,
        "keep an exponential moving average of the weights (e.g. 0.999); it is validated "
        "and saved instead of the raw weights",
    )
    average_top_k: int = option(
        1, "save the average of the k best epochs' weights (1 = the best epoch's)"
    )
    recalibrate_bn: bool = option(
        False,
        "recompute the BatchNorm running statistics of an average_top_k > 1 average with one "
        "seeded pass over the training batches (false = the snapshots' statistics averaged)",
    )
    swa_epochs: int = option(
        0,
        "stochastic weight averaging: average the trained weights at the end of each of the "
        "last N epochs, recompute BatchNorm statistics on the training batches and validate "
        "the result (0 = off)",
    )
    swa_lr: float | None = option(
        None,
        "constant learning rate during the swa_epochs; null = the schedule goes on (with "
        "cosine it is small by then: prefer none, cosine_restarts or an swa_lr)",
    )
    swa_select: str = option(
        "best",
        "best = keep the SWA weights only if they validate better than the weights saved "
        "without SWA (best epoch or top-k average); always = keep them (a full refit, with "
        "nothing to validate on, always keeps them)",
        SWA_SELECT,
    )
    snapshot_ensemble: int = option(
        0,
        "with cosine_restarts, save the weights at the end of each of the last K cycles; "
        "model.pt predicts the mean of their probabilities (prediction costs x K; 0 or 1 = off)",
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
    class_balance: str = option(
        "none",
        "multi-label data: draw images (with replacement) so rare classes come more often - "
        "an image weighs by its rarest class, 1/sqrt(images of that class) (sqrt) or "
        "1/(images of that class) (inverse); empty masks keep their share (or empty_ratio's); "
        "none = off",
        CLASS_BALANCE,
    )
    crop: list[int] | None = option(  # noqa: RUF009 (option() builds a dataclasses.field)
        None, "train on random [height, width] patches (validation stays full size)"
    )
    steps_per_epoch: int | None = option(
        None,
        "optimizer steps per epoch: steps x batch_size draws in passes over the training set, "
        "reshuffled (and empty_ratio-balanced) each pass; null = one pass. The lr schedule "
        "follows",
    )
    mixup_prob: float = option(
        0.0,
        "share of batches mixed with mixup (images and masks blended with one Beta(mixup_alpha) "
        "weight: soft masks, refused with the lovasz loss); 0 = off",
    )
    mixup_alpha: float = option(0.4, "Beta(alpha, alpha) parameter of mixup's weight")
    cutmix_prob: float = option(
        0.0,
        "share of batches mixed with cutmix (one box pasted into image and mask alike); "
        "mixup_prob + cutmix_prob <= 1, at most one of them per batch; 0 = off",
    )
    cutmix_alpha: float = option(1.0, "Beta(alpha, alpha) parameter of cutmix's area share")
    num_workers: int | None = option(
        None,
        "DataLoader worker processes (0 = load in the main process); null = from the job's"
        " threads: threads - 1 on CUDA, 0 on CPU",
    )
    seed: int = option(42, "seed of initialisation, sampling and augmentation")
    init_from: str | None = option(
        None,
        "start fold k from fold k's model.pt of this experiment (same round; weights only, the "
        "optimizer and schedule start fresh); its model must match; null = from scratch",
    )
    freeze_encoder_epochs: int = option(
        0,
        "train only the decoder and heads for this many first epochs: the encoder gets no "
        "gradient and its BatchNorm statistics stay as loaded",
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    aux_weight: float = option(
        0.2, "loss weight of the empty/non-empty head when the model has one (model.aux_head)"
    )
    nonfinite_loss: str = option(
        "error",
        "a batch with a NaN/inf loss: error = stop the fold naming the batch (nothing of that "
        "epoch is saved); skip_batch = skip it without an optimizer step (counted in history.csv)",
        NONFINITE_LOSS,
    )
    max_skipped_fraction: float = option(
        0.1,
        "with nonfinite_loss: skip_batch, stop the fold when more than this fraction of an "
        "epoch's batches is skipped (a fully skipped epoch always stops it)",
    )

    def __post_init__(self) -> None:
        """Check every option and canonicalise ``crop`` to ``[height, width]``.

        Raises:
            SegflowError: naming the first invalid option as ``train.<name>``.
        """
        checks: list[tuple[str, bool, str]] = [
            ("epochs", _is_int(self.epochs, 1), "an integer >= 1"),
            ("batch_size", _is_int(self.batch_size, 1), "an integer >= 1"),
            ("lr", _is_number(self.lr) and self.lr > 0, "a number > 0"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", _is_int(self.warmup_epochs, 0), "an integer >= 0"),
            ("restart_epochs", _is_int(self.restart_epochs, 1, True), "an integer >= 1 or null"),
            ("plateau_patience", _is_int(self.plateau_patience, 1), "an integer >= 1"),
            (
                "plateau_factor",
                _is_number(self.plateau_factor) and 0 < self.plateau_factor < 1,
                "a number in (0, 1)",
            ),
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
            ("recalibrate_bn", isinstance(self.recalibrate_bn, bool), "true or false"),
            ("swa_epochs", _is_int(self.swa_epochs, 0), "an integer >= 0"),
            (
                "swa_lr",
                self.swa_lr is None or (_is_number(self.swa_lr) and self.swa_lr > 0),
                "a number > 0 or null",
            ),
            ("snapshot_ensemble", _is_int(self.snapshot_ensemble, 0), "an integer >= 0"),
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
            (
                "steps_per_epoch",
                _is_int(self.steps_per_epoch, 1, True),
                "an integer >= 1 or null",
            ),
            ("mixup_prob", _is_fraction(self.mixup_prob), "in [0, 1]"),
            ("mixup_alpha", _is_number(self.mixup_alpha) and self.mixup_alpha > 0, "a number > 0"),
            ("cutmix_prob", _is_fraction(self.cutmix_prob), "in [0, 1]"),
            (
                "cutmix_alpha",
                _is_number(self.cutmix_alpha) and self.cutmix_alpha > 0,
                "a number > 0",
            ),
            (
                "num_workers",
                self.num_workers is None or _is_int(self.num_workers, 0),
                "an integer >= 0 or null",
            ),
            ("seed", _is_int(self.seed, 0), "an integer >= 0"),
            (
                "init_from",
                self.init_from is None or (isinstance(self.init_from, str) and self.init_from),
                "an experiment name or null",
            ),
            ("freeze_encoder_epochs", _is_int(self.freeze_encoder_epochs, 0), "an integer >= 0"),
            ("aux_weight", _is_number(self.aux_weight) and self.aux_weight >= 0, ">= 0"),
            (
                "max_skipped_fraction",
                _is_number(self.max_skipped_fraction) and 0 <= self.max_skipped_fraction <= 1,
                "in [0, 1]",
            ),
            ("device", isinstance(self.device, str), "a string"),
        ]
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("amp", AMP_MODES),
            ("monitor", MONITORS),
            ("nonfinite_loss", NONFINITE_LOSS),
            ("swa_select", SWA_SELECT),
            ("class_balance", CLASS_BALANCE),
        ):
            checks.append((name, getattr(self, name) in choices, f"one of {', '.join(choices)}"))
        for name, ok, expected in checks:
            if not ok:
                raise SegflowError(f"train.{name} must be {expected}, got {getattr(self, name)!r}")
        if self.mixup_prob + self.cutmix_prob > 1:
            raise SegflowError(
                f"train.cutmix_prob: mixup_prob + cutmix_prob must be <= 1 (at most one mix per "
                f"batch), got {self.mixup_prob} + {self.cutmix_prob}"
            )
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
        self._check_averaging()

    def _check_averaging(self) -> None:
        """Refuse combinations of SWA and snapshot ensembles that cannot do what they say.

        Raises:
            SegflowError: naming the option.
        """
        if self.swa_epochs > self.epochs:
            raise SegflowError(
                f"train.swa_epochs ({self.swa_epochs}) exceeds train.epochs ({self.epochs})"
            )
        if self.snapshot_ensemble < 2:
            return
        if self.swa_epochs:
            raise SegflowError(
                "train.snapshot_ensemble and train.swa_epochs exclude each other (an ensemble of "
                "cycle ends, or one average of the last epochs)"
            )
        if self.scheduler != "cosine_restarts":
            raise SegflowError(
                f"train.snapshot_ensemble needs train.scheduler: cosine_restarts (cycles to take "
                f"snapshots at), got {self.scheduler!r}"
            )
        if self.early_stopping_patience is not None:
            raise SegflowError(
                "train.snapshot_ensemble: early stopping would cut the restart cycles short; set "
                "train.early_stopping_patience: null"
            )
        cycles = (self.epochs - self.warmup_epochs) // restart_cycle_epochs(self)
        if self.snapshot_ensemble > cycles:
            raise SegflowError(
                f"train.snapshot_ensemble: {self.snapshot_ensemble} cycle ends asked for but "
                f"{self.epochs} epochs ({self.warmup_epochs} warmup) hold {cycles} complete "
                f"cycle(s) of {restart_cycle_epochs(self)} epochs (train.restart_epochs)"
            )


def restart_cycle_epochs(options: TrainOptions) -> int:
    """The cycle length of ``cosine_restarts`` in epochs: ``restart_epochs``, or by default a
    third of the epochs after warmup (at least 1)."""
    if options.restart_epochs is not None:
        return options.restart_epochs
    return max(1, round((options.epochs - options.warmup_epochs) / 3))


def is_cycle_end(options: TrainOptions, epoch: int) -> bool:
    """Whether ``epoch`` (1-based) ends a ``cosine_restarts`` cycle (its learning rate's low)."""
    done = epoch - options.warmup_epochs
    return done > 0 and done % restart_cycle_epochs(options) == 0


def _is_int(value: Any, minimum: int, optional: bool = False) -> bool:
    """Whether ``value`` is an int (not a bool) >= ``minimum``, or None when ``optional``."""
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_fraction(value: Any) -> bool:
    """Whether ``value`` is a number in [0, 1]."""
    return _is_number(value) and 0 <= value <= 1


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
