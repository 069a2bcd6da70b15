"""The optimizer and the learning-rate schedule of fold training.

The schedule is per batch: :func:`lr_factor` gives the learning rate of a step as a fraction of
the peak ``lr`` (linear warmup, then constant, cosine, cosine with restarts or one-cycle).
``plateau`` uses that per-batch schedule only for its warmup; afterwards a
``ReduceLROnPlateau`` multiplies the learning rate by ``plateau_factor`` at the end of the
``plateau_patience``-th consecutive epoch without improvement (:func:`make_schedulers`). The
schedule is a pure function of the step and the options, so a resumed run whose ``epochs``
changed re-derives it from the new total.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from segflow.model.training.train_options import TrainOptions, restart_cycle_epochs

# OneCycle: start and end learning rates as fractions of lr (torch's OneCycleLR defaults).
_ONECYCLE_START, _ONECYCLE_END = 1 / 25, 1 / 25 / 1e4


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """The optimizer of ``options.optimizer`` over the model's trainable parameters.

    Args:
        model: the model to train.
        options: training options (optimizer, lr, weight_decay); sgd uses momentum 0.9.

    Returns:
        An Adam, AdamW or SGD optimizer at the peak learning rate.
    """
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
        kind: a :data:`segflow.model.training.train_options.SCHEDULERS` name.
        step: batches done before this one (0-based).
        total_steps: batches in the whole run.
        warmup_steps: warmup batches.
        cycle_steps: batches per cosine_restarts cycle.

    Returns:
        The factor (1 = the peak learning rate).
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


def options_lr_factor(options: TrainOptions, steps_per_epoch: int, step: int) -> float:
    """:func:`lr_factor` of batch ``step`` for a run of ``options``.

    Args:
        options: training options (scheduler, epochs, warmup_epochs, restart_epochs).
        steps_per_epoch: batches per epoch.
        step: batches done before this one (0-based).

    Returns:
        The factor; ``restart_epochs`` defaults to a third of the epochs after warmup.
    """
    total = options.epochs * steps_per_epoch
    warmup = options.warmup_epochs * steps_per_epoch
    restart = restart_cycle_epochs(options)
    return lr_factor(options.scheduler, step, total, warmup, restart * steps_per_epoch)


def in_swa_phase(options: TrainOptions, epoch: int) -> bool:
    """Whether ``epoch`` (1-based) is one of the last ``swa_epochs`` epochs, whose end-of-epoch
    weights stochastic weight averaging collects (and which train at ``swa_lr`` if set).

    Args:
        options: training options (epochs, swa_epochs).
        epoch: the epoch.

    Returns:
        False when SWA is off.
    """
    return options.swa_epochs > 0 and epoch > options.epochs - options.swa_epochs


def swa_learning_rate(options: TrainOptions, epoch: int) -> float | None:
    """The constant learning rate of ``epoch`` if it is an SWA epoch with ``swa_lr`` set.

    It overrides the schedule batch by batch (the schedulers still step, so their state stays
    that of the schedule); None = the schedule's rate.

    Args:
        options: training options (epochs, swa_epochs, swa_lr).
        epoch: the epoch (1-based).

    Returns:
        ``swa_lr`` or None.
    """
    return options.swa_lr if in_swa_phase(options, epoch) else None


def make_schedulers(
    optimizer: torch.optim.Optimizer,
    options: TrainOptions,
    factor: Callable[[int], float],
    maximise: bool,
) -> tuple[torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.ReduceLROnPlateau | None]:
    """The per-batch schedule and, for ``plateau``, the per-epoch reduction.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        options: training options (scheduler, plateau_patience, plateau_factor).
        factor: step -> learning-rate factor. Pass a bound method or a function, not a callable
            object with attributes: ``LambdaLR`` would save those in its state and a resumed
            run would keep the old schedule.
        maximise: whether the monitored quantity is maximised (plateau mode max, else min).

    Returns:
        (LambdaLR, ReduceLROnPlateau or None). Stepped once per epoch with the monitor, the
        ReduceLROnPlateau multiplies the learning rate by ``plateau_factor`` at the end of the
        ``plateau_patience``-th consecutive step that does not improve on the best value so far
        by more than a relative 1e-4 (torch's default threshold); the count restarts after each
        reduction. torch reduces once its count of such steps *exceeds* its ``patience``, so it
        is given ``plateau_patience - 1``.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max" if maximise else "min",
            factor=options.plateau_factor,
            patience=options.plateau_patience - 1,
        )
        if options.scheduler == "plateau"
        else None
    )
    return scheduler, plateau


def per_batch_schedule_active(
    options: TrainOptions, global_step: int, steps_per_epoch: int
) -> bool:
    """Whether the per-batch schedule steps after batch ``global_step`` (1-based).

    Always, except for ``plateau`` after its warmup, where the per-epoch reduction takes over.

    Args:
        options: training options (scheduler, warmup_epochs).
        global_step: batches done including this one.
        steps_per_epoch: batches per epoch.

    Returns:
        True to call the per-batch scheduler's ``step()``.
    """
    return options.scheduler != "plateau" or global_step <= options.warmup_epochs * steps_per_epoch


def _half_cosine_up(t: float) -> float:
    """0 at t = 0 rising to 1 at t = 1 along a half cosine."""
    return 0.5 * (1 - math.cos(math.pi * t))
