"""Full-data refit: after cross-validation, one more model trained on every training image.

An experiment with ``refit.enabled`` gets ``models/<name>/round<r>/full/model.pt``, trained on
all of folds.csv's items with no validation fold, hence no monitor and no best-epoch choice: it
trains a fixed :func:`refit_epochs` (the median of the folds' best epochs) and keeps the last
epoch's weights (the EMA's with ``train.ema_decay``). With SWA or a snapshot ensemble, whose
weights come from the end of training, it trains the median of the folds' trained epochs and
keeps the SWA average (``swa_select`` cannot compare without validation) or the ensemble of its
last cycle ends (:func:`refit_epoch_key`). ``refit.test_models`` says which models
predict the test set: the full model alone, the fold models (the refit is then only an
artifact), or both merged like folds; ``auto`` lets the time budget choose between the full
model and the folds (:mod:`segflow.model.budget`). OOF predictions, post-processing, blending and
stacking always use the folds.

Under a time budget (``budget.minutes``) the refit is planned with its folds and trains the
plan's epochs (as many as its folds) instead of the median best epoch: see :mod:`segflow.model.budget`.

This module needs neither torch nor the data: the workflow calls :func:`check_refit` at config
time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segflow.core.errors import SegflowError
from segflow.core.options import option

TEST_MODELS = ("full", "folds", "both", "auto")


@dataclass(frozen=True)
class RefitOptions:
    """Whether and how to refit on all data (config section ``experiments.<name>.refit``)."""

    enabled: bool = option(
        False,
        "after cross-validation train one more model on every training image, for the median "
        "of the folds' best epochs, or under budget.minutes the plan's epochs "
        "(models/<name>/round<r>/full/model.pt)",
    )
    test_models: str = option(
        "full",
        "which models predict the test set: full (the refit alone), folds (the fold models; the "
        "refit is only an artifact), both (the refit joins the folds' merge as one more model) "
        "or auto (needs budget.minutes: the budget's plan chooses full when the refit still "
        "leaves every fold budget.min_fold_steps optimizer steps, else folds without a refit)",
        TEST_MODELS,
    )

    def __post_init__(self) -> None:
        """Raises: SegflowError naming the first invalid option as ``refit.<name>``."""
        if not isinstance(self.enabled, bool):
            raise SegflowError(f"refit.enabled must be true or false, got {self.enabled!r}")
        if self.test_models not in TEST_MODELS:
            raise SegflowError(
                f"refit.test_models must be one of {', '.join(TEST_MODELS)}, got "
                f"{self.test_models!r}"
            )


def refit_epochs(
    metrics_paths: Sequence[str | os.PathLike[str]], key: str = "best_epoch"
) -> tuple[int, list[int]]:
    """The refit's epoch count: the median of the folds' best epochs (halves round up).

    Args:
        metrics_paths: the folds' ``metrics.json`` (``segflow train`` writes ``best_epoch`` and
            ``epochs_trained``).
        key: the folds' epoch count to take the median of: ``best_epoch``, or
            ``epochs_trained`` for weights taken at the end of training (SWA, snapshot
            ensembles: :func:`refit_epoch_key`).

    Returns:
        (epochs, every fold's ``key`` in the given order).

    Raises:
        SegflowError: no file, or a missing/unreadable file or one without that epoch.
    """
    if not metrics_paths:
        raise SegflowError("refit: no fold metrics.json to take the epoch count from")
    best = []
    for path in map(Path, metrics_paths):
        if not path.is_file():
            raise SegflowError(f"{path} does not exist (train the folds first)")
        try:
            value = json.loads(path.read_text()).get(key)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise SegflowError(f"{path}: not a fold's metrics.json ({error})") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SegflowError(f"{path}: {key} is {value!r}, not an epoch (>= 1)")
        best.append(value)
    ordered = sorted(best)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return max(1, math.floor(median + 0.5)), best


def refit_epoch_key(swa_epochs: int, snapshot_ensemble: int) -> str:
    """Which of the folds' epoch counts a refit trains (the median over folds, :func:`refit_epochs`).

    ``best_epoch`` normally: the folds' weights are those of their best epochs. With SWA
    (``train.swa_epochs``) or a snapshot ensemble (``train.snapshot_ensemble`` >= 2) the weights
    come from the end of training (the last epochs' average, the last cycles' ends), so the
    refit trains as long as the folds did: ``epochs_trained``.

    Args:
        swa_epochs: ``train.swa_epochs``.
        snapshot_ensemble: ``train.snapshot_ensemble``.

    Returns:
        ``"best_epoch"`` or ``"epochs_trained"``.
    """
    return "epochs_trained" if swa_epochs > 0 or snapshot_ensemble >= 2 else "best_epoch"


def init_chain(experiments: Mapping[str, Mapping[str, Any]], name: str) -> list[str]:
    """``name`` and the experiments it starts from (``train.init_from``), nearest first.

    Args:
        experiments: the config's ``experiments`` (already checked by
            :func:`segflow.model.experiment.check_init_from`: no cycle).
        name: an experiment.

    Returns:
        [name, its init_from, that one's init_from, ...].
    """
    chain = [name]
    while (source := (experiments[chain[-1]].get("train") or {}).get("init_from")) is not None:
        chain.append(source)
    return chain


def refit_enabled(values: Mapping[str, Any]) -> bool:
    """Whether an experiment mapping asks for a full refit (``refit.enabled``)."""
    return bool((values.get("refit") or {}).get("enabled", False))


def check_refit(
    experiments: Mapping[str, Mapping[str, Any]], budget_minutes: float | None = None
) -> None:
    """Refuse refits that cannot be trained without a validation fold, or chosen without a
    budget.

    A refit of B that starts from A (``train.init_from``) starts from A's refit, so A is refit
    too. ``train.scheduler: plateau`` steps on the validation monitor, which a refit lacks.
    ``refit.test_models: auto`` is the time budget's choice, so it needs ``budget.minutes``.

    Args:
        experiments: the config's ``experiments``, init_from already checked.
        budget_minutes: ``budget.minutes`` (None: no time budget).

    Raises:
        SegflowError: one line naming the key.
    """
    for name, values in experiments.items():
        if not refit_enabled(values):
            continue
        if (values.get("refit") or {}).get("test_models") == "auto" and budget_minutes is None:
            raise SegflowError(
                f"experiments.{name}.refit.test_models: auto is chosen by the time budget, but "
                "budget.minutes is null; set budget.minutes or choose full, folds or both"
            )
        for member in init_chain(experiments, name):
            if (experiments[member].get("train") or {}).get("scheduler") == "plateau":
                why = (
                    f"experiments.{name}.refit.enabled"
                    if member == name
                    else f"experiments.{name}.refit.enabled starts from experiments.{member}'s "
                    "refit through train.init_from"
                )
                raise SegflowError(
                    f"experiments.{member}.train.scheduler: plateau follows the validation "
                    f"monitor, which a full refit has not ({why}); use another scheduler or "
                    "turn the refit off"
                )
