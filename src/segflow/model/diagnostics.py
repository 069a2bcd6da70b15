"""Why a model is weak: flags on learning curves and on OOF scores, from numbers only (no I/O).

Fold flags (one trained fold: its ``history.csv`` and ``metrics.json``). The monitored quantity
is ``val_<monitor>`` (``val_loss`` for ``monitor: val_loss``), oriented so that higher is better
(the loss is negated); ``trend`` is the least-squares slope per epoch of its last
:data:`TREND_EPOCHS` epochs.

- ``undertrained``: still rising at the last epoch. The best epoch lies in the last
  :data:`LATE_FRACTION` of the epochs (at least the last one) and ``trend`` > :data:`TREND_EPS`.
  Needs two epochs (one epoch has no trend).
- ``overfit``: peaked early. The best epoch lies in the first half, the run has at least
  :data:`MIN_OVERFIT_EPOCHS` epochs, and the mean of the (up to :data:`TREND_EPOCHS`) last epochs
  after the best is below the best by more than ``max(OVERFIT_ABS, OVERFIT_REL * |best|)``.
- ``few_steps``: fewer than :data:`MIN_OPTIMIZER_STEPS` optimizer steps, from ``metrics.json``'s
  ``optimizer_steps`` or, for older runs, estimated as ``epochs_trained * steps per epoch``
  (``n_train // batch_size``, or 1 batch when ``n_train <= batch_size``: the loader's
  ``drop_last`` rule).

Candidate flag (one candidate of the final choice, on its tuned OOF prediction):

- ``near_constant``: the tuned OOF score is within noise of the better of two constant
  predictions, all-empty and all-foreground (every pixel of every class), scored with the tuning
  metric on the OOF truths. With per-image differences ``d_i = tuned_i - constant_i``, the
  candidate is flagged when ``mean(d) <= noise`` where ``noise = 1.96 * std(d) / sqrt(n)`` (the
  half-width of a normal 95% interval of the mean gain; infinite for fewer than two images): its
  gain over doing nothing is not distinguishable from zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.image_scores import CONSTANTS
from segflow.core.errors import SegflowError
from segflow.model.training.train_options import MIN_OPTIMIZER_STEPS

TREND_EPOCHS = 3
"""Epochs the trend (least-squares slope) is fitted on."""
TREND_EPS = 1e-3
"""A slope (score per epoch) above this counts as still rising."""
LATE_FRACTION = 0.1
"""A best epoch in this last share of the epochs (at least the last epoch) counts as late."""
MIN_OVERFIT_EPOCHS = 4
"""Fewer epochs than this cannot show an early peak."""
OVERFIT_ABS = 0.01
OVERFIT_REL = 0.05
"""The final epochs are clearly below the best by more than max(OVERFIT_ABS, OVERFIT_REL*|best|)."""
# Fewer optimizer steps than MIN_OPTIMIZER_STEPS are too few to train a segmentation network
# (defined with the training options: the time budget's min_fold_steps default too).
Z_95 = 1.96
"""Normal quantile of a two-sided 95% interval."""

FLAG_KINDS: dict[str, str] = {
    "undertrained": "undertrained: raise epochs or budget",
    "overfit": "overfit: peaked early; lower epochs or lr, add augmentation or regularisation",
    "few_steps": "too few optimizer steps: raise epochs, lower batch_size or add data",
    "near_constant": "no better than a constant prediction: the model has not learnt the task",
}
"""Flag kind -> its advice."""


@dataclass(frozen=True)
class Flag:
    """One diagnosis: what is weak (``subject``), why (``kind``), and the numbers behind it."""

    kind: str
    subject: str
    detail: str

    @property
    def advice(self) -> str:
        return FLAG_KINDS[self.kind]

    def line(self) -> str:
        """One line: subject, advice, numbers."""
        return f"{self.subject}: {self.advice} ({self.detail})"


@dataclass(frozen=True)
class FoldCurve:
    """The numbers of one trained fold that the fold flags look at.

    ``best_score``, ``trend`` and ``final_score`` are in the monitor's own units (a loss, not
    negated); ``final_score`` is the mean of the up to :data:`TREND_EPOCHS` last epochs after the
    best (NaN when the best is the last epoch).
    """

    experiment: str
    round: int
    fold: int
    monitor: str
    epochs: int
    best_epoch: int
    epochs_after_best: int
    best_score: float
    trend: float
    final_score: float
    optimizer_steps: int | None
    steps_estimated: bool

    @property
    def subject(self) -> str:
        return f"{self.experiment} round {self.round} fold {self.fold}"


def monitor_column(monitor: str) -> str:
    """The ``history.csv`` column of a monitor (``kaggle`` -> ``val_kaggle``)."""
    return "val_loss" if monitor == "val_loss" else f"val_{monitor}"


def slope(epochs: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` over ``epochs`` (NaN for fewer than two points)."""
    x, y = np.asarray(epochs, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def optimizer_steps(metrics: Mapping[str, Any]) -> tuple[int | None, bool]:
    """Optimizer steps of a fold: (steps, estimated).

    ``metrics["optimizer_steps"]`` when recorded; otherwise ``epochs_trained`` times the batches
    per epoch from ``n_train`` and ``options.batch_size``; ``(None, True)`` when neither is there.
    """
    if metrics.get("optimizer_steps") is not None:
        return int(metrics["optimizer_steps"]), False
    batch_size = (metrics.get("options") or {}).get("batch_size")
    n_train, epochs = metrics.get("n_train"), metrics.get("epochs_trained")
    if batch_size is None or n_train is None or epochs is None:
        return None, True
    per_epoch = int(n_train) // int(batch_size) if int(n_train) > int(batch_size) else 1
    return int(epochs) * per_epoch, True


def fold_curve(
    history: pd.DataFrame, metrics: Mapping[str, Any], experiment: str, round_: int, fold: int
) -> FoldCurve:
    """The numbers of one fold from its ``history.csv`` and ``metrics.json``.

    Args:
        history: one row per epoch, with ``epoch`` and the monitor's column.
        metrics: the fold's metrics (``monitor``, default ``kaggle``; optimizer steps or what
            estimates them: see :func:`optimizer_steps`).
        experiment, round_, fold: where the fold belongs (for the flags' subject).

    Returns:
        The fold's :class:`FoldCurve`; the best epoch is the earliest among equals, as training
        picks it.

    Raises:
        SegflowError: the history is empty or lacks the monitor's column.
    """
    monitor = str(metrics.get("monitor", "kaggle"))
    column = monitor_column(monitor)
    where = f"{experiment} round {round_} fold {fold} history"
    if column not in history.columns or "epoch" not in history.columns:
        raise SegflowError(f"{where}: no epoch and {column} columns")
    if history.empty:
        raise SegflowError(f"{where}: no epoch")
    history = history.sort_values("epoch")
    epochs = history["epoch"].to_numpy(dtype=np.float64)
    values = history[column].to_numpy(dtype=np.float64)
    sign = -1.0 if monitor == "val_loss" else 1.0
    best = int(np.argmax(sign * values))  # argmax: the first of equals
    after = values[best + 1 :][-TREND_EPOCHS:]
    steps, estimated = optimizer_steps(metrics)
    return FoldCurve(
        experiment=experiment,
        round=int(round_),
        fold=int(fold),
        monitor=monitor,
        epochs=len(values),
        best_epoch=int(epochs[best]),
        epochs_after_best=len(values) - best - 1,
        best_score=float(values[best]),
        trend=slope(epochs[-TREND_EPOCHS:], values[-TREND_EPOCHS:]),
        final_score=float(after.mean()) if len(after) else math.nan,
        optimizer_steps=steps,
        steps_estimated=estimated,
    )


def fold_flags(curve: FoldCurve) -> list[Flag]:
    """The fold flags (``undertrained``, ``overfit``, ``few_steps``) of one fold."""
    sign = -1.0 if curve.monitor == "val_loss" else 1.0
    flags = []
    late = max(1, math.ceil(LATE_FRACTION * curve.epochs))
    column = monitor_column(curve.monitor)
    if curve.epochs >= 2 and curve.epochs_after_best < late and sign * curve.trend > TREND_EPS:
        flags.append(
            Flag(
                "undertrained",
                curve.subject,
                f"best {column} {curve.best_score:.4f} at epoch {curve.best_epoch} of "
                f"{curve.epochs}, last-{min(TREND_EPOCHS, curve.epochs)} trend "
                f"{curve.trend:+.4f}/epoch",
            )
        )
    if (
        curve.epochs >= MIN_OVERFIT_EPOCHS
        and curve.epochs - curve.epochs_after_best <= curve.epochs / 2
    ):
        drop = sign * (curve.best_score - curve.final_score)
        margin = max(OVERFIT_ABS, OVERFIT_REL * abs(curve.best_score))
        if drop > margin:
            flags.append(
                Flag(
                    "overfit",
                    curve.subject,
                    f"best {column} {curve.best_score:.4f} at epoch {curve.best_epoch} of "
                    f"{curve.epochs}, final epochs {curve.final_score:.4f} "
                    f"(worse by {drop:.4f} > {margin:.4f})",
                )
            )
    if curve.optimizer_steps is not None and curve.optimizer_steps < MIN_OPTIMIZER_STEPS:
        about = "about " if curve.steps_estimated else ""
        flags.append(
            Flag(
                "few_steps",
                curve.subject,
                f"{about}{curve.optimizer_steps} optimizer steps in {curve.epochs} epochs "
                f"< {MIN_OPTIMIZER_STEPS}",
            )
        )
    return flags


def noise_margin(differences: np.ndarray) -> float:
    """``1.96 * std / sqrt(n)`` of per-image score differences (inf for fewer than 2 images)."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return math.inf
    return float(Z_95 * d.std(ddof=1) / math.sqrt(len(d)))


@dataclass(frozen=True)
class ConstantCheck:
    """A candidate's tuned OOF score against the two constant predictions (same metric)."""

    metric: str
    tuned: float
    const_empty: float
    const_full: float
    best_constant: str
    gain: float
    noise: float

    @property
    def near_constant(self) -> bool:
        return self.gain <= self.noise


def constant_check(
    tuned: np.ndarray, constants: Mapping[str, np.ndarray], metric: str
) -> ConstantCheck:
    """Compare per-image tuned scores with the better constant prediction.

    Args:
        tuned: per-image scores of the tuned (post-processed) OOF prediction.
        constants: :func:`constant_scores` of the same images.
        metric: the metric's name (for the record).

    Returns:
        The check; ``near_constant`` when the mean gain over the better constant is at most
        :func:`noise_margin` of the per-image gains.

    Shape:
        tuned and each constant: (N,), N >= 1.
    """
    tuned = np.asarray(tuned, dtype=np.float64)
    if len(tuned) == 0:
        raise SegflowError("no OOF images to compare with constant predictions")
    means = {name: float(np.mean(constants[name])) for name in CONSTANTS}
    best = max(CONSTANTS, key=lambda name: means[name])  # ties: all-empty, listed first
    differences = tuned - np.asarray(constants[best], dtype=np.float64)
    return ConstantCheck(
        metric=metric,
        tuned=float(tuned.mean()),
        const_empty=means["all_empty"],
        const_full=means["all_foreground"],
        best_constant=best,
        gain=float(differences.mean()),
        noise=noise_margin(differences),
    )


CONSTANT_COLUMNS = ("const_empty", "const_full", "gain_vs_constant", "noise", "near_constant")
"""Columns :func:`constant_columns` adds to the stage table."""


def constant_columns(check: ConstantCheck) -> dict[str, Any]:
    """A :class:`ConstantCheck` as the stage table's extra columns (:data:`CONSTANT_COLUMNS`)."""
    return {
        "const_empty": check.const_empty,
        "const_full": check.const_full,
        "gain_vs_constant": check.gain,
        "noise": check.noise,
        "near_constant": check.near_constant,
    }


def constant_flags(stages: pd.DataFrame) -> list[Flag]:
    """``near_constant`` flags of the stage table's candidates (none without those columns)."""
    if not set(CONSTANT_COLUMNS) <= set(stages.columns):
        return []
    flags = []
    for row in stages.itertuples(index=False):
        if not _truthy(row.near_constant):
            continue
        metric = getattr(row, "tuned_metric", "score")
        flags.append(
            Flag(
                "near_constant",
                f"{row.candidate} round {row.round}",
                f"tuned OOF {metric} {row.tuned:.4f}; all-empty {row.const_empty:.4f}, "
                f"all-foreground {row.const_full:.4f}; gain {row.gain_vs_constant:+.4f} "
                f"<= noise {row.noise:.4f}",
            )
        )
    return flags


def _truthy(value: Any) -> bool:
    """A bool read back from a CSV (``True``/``"True"``)."""
    return value is True or str(value).strip().lower() in ("true", "1")


def curves_table(curves: Sequence[FoldCurve]) -> pd.DataFrame:
    """The fold curves as a table with each fold's flag kinds (``flags``, comma-separated)."""
    rows = []
    for curve in curves:
        row = asdict(curve)
        row["flags"] = ", ".join(flag.kind for flag in fold_flags(curve))
        rows.append(row)
    columns = [*FoldCurve.__dataclass_fields__, "flags"]
    return pd.DataFrame(rows, columns=columns)


def all_flags(curves: Sequence[FoldCurve], stages: pd.DataFrame | None) -> list[Flag]:
    """Every flag: the folds' in order, then the candidates'."""
    flags = [flag for curve in curves for flag in fold_flags(curve)]
    if stages is not None:
        flags += constant_flags(stages)
    return flags


__all__ = [
    "CONSTANTS",
    "CONSTANT_COLUMNS",
    "FLAG_KINDS",
    "ConstantCheck",
    "Flag",
    "FoldCurve",
    "all_flags",
    "constant_check",
    "constant_columns",
    "constant_flags",
    "curves_table",
    "fold_curve",
    "fold_flags",
    "monitor_column",
    "noise_margin",
    "optimizer_steps",
    "slope",
]
