"""Time budget: how many epochs each experiment trains so that the whole run fits a deadline.

``budget.minutes`` is the wall-clock time of the run from the ``plan_budget`` job on: every
training job (all experiments, folds and pseudo-labelling rounds), its OOF and test predictions
(with TTA), and the second level. :mod:`segflow.model.budget_measure` times each experiment on the
machine and device that train it; this module turns those timings into epochs
(:func:`plan_epochs`, pure arithmetic) and writes ``plan.json``, which ``segflow train --plan``
reads. The plan is the only thing that varies with the machine: training is deterministic given
its plan.

The cost model, per experiment ``e`` and each of its trainings ``t`` (one fold of one round)::

    epoch_t = steps_t * step_seconds + n_val_t * val_seconds_per_image + checkpoint_seconds
    fixed_t = 3 * startup_seconds + setup_seconds + n_val_t * val_seconds_per_image
              + (n_val_t + n_test) * predict_seconds_per_image
    wall    = overhead + sum_e sum_t (fixed_t + epochs_e * epoch_t) / parallel_jobs

``steps_t`` is what the loader yields per epoch (a pseudo-labelling round counts every test
image as selected, the most it can draw); ``fixed_t`` covers the three processes (train,
predict-oof, predict-test), the trainer's set-up, the final validation and both predictions.
``overhead`` is ``reserve_share * budget`` (evaluation, post-processing grid, blend, stacking,
pseudo selection, report: what is not measured) plus the planning job's own time.

A full-data refit (``experiments.<name>.refit.enabled``, :mod:`segflow.model.training.refit`) is one more
training of its experiment per round, on every training image, with no validation: its epoch is
``steps * step_seconds + checkpoint_seconds`` (steps from all of folds.csv's items), its fixed
cost the start-ups of its jobs (train, and predict-test when it predicts the test set), set-up and
its test prediction; no OOF prediction. With ``refit.test_models: full`` the folds predict no test
set: their predict-test job and its images leave their fixed cost. The refit trains as many epochs
as its experiment's folds (the plan's ``fold: "full"`` training, read by ``segflow train --plan``),
not the median of the folds' best epochs as without a budget: those are known only after the folds
have trained, and the plan must fit before anything trains.

``refit.test_models: auto`` lets the plan choose. It plans (a) the fold models predict the test
set and no refit is trained, and (b) the folds plus the refit, which predicts the test set, and
takes (b) when that plan fits and every fold training of every experiment still gets at least
``budget.min_fold_steps`` optimizer steps (planned epochs x steps per epoch), else (a); one choice
for all the experiments with ``auto``. ``plan.json``'s ``refit_choice`` records it with both
estimates, and the workflow follows it (plan_budget is then a Snakemake checkpoint).

Epochs follow one common scale ``s``: ``epochs_e ~ s * train.epochs_e``, so the experiments keep
the ratios of their configured epochs, each clamped to ``[min_epochs, cap]`` (cap: the
configured epochs when ``cap_at_config_epochs``, and ``max_epochs``). ``s`` is the largest scale
whose estimate fits the budget; epochs are rounded down, then the experiments with the largest
remainders get one epoch more while that still fits. A budget too small even for ``min_epochs``
everywhere gives ``min_epochs`` with ``feasible: false`` and a warning in the plan, not an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from segflow.artifacts.arrays import classes_of, read_stats
from segflow.core.errors import SegflowError
from segflow.core.options import option
from segflow.model.training.train_options import MIN_OPTIMIZER_STEPS

if TYPE_CHECKING:
    from segflow.model.experiment import Experiment

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
# Processes per training of an experiment: segflow train, predict-oof and predict-test.
JOBS_PER_TRAINING = 3
# The full refit's member name: its trainings' ``fold`` in plan.json (results/models/<name>/
# round<r>/full/ in the workflow).
REFIT = "full"


@dataclass(frozen=True)
class BudgetOptions:
    """The time budget (config section ``budget``)."""

    minutes: float | None = option(
        None,
        "wall-clock minutes for the run from plan_budget on (training, prediction, second "
        "level); null = off: every experiment trains its train.epochs",
    )
    reserve_share: float = option(
        0.1,
        "share of the budget kept for what is not measured: OOF evaluation, post-processing "
        "grid, blending, stacking, pseudo selection, report",
    )
    min_epochs: int = option(
        1, "fewest epochs planned for an experiment (a budget too small for them is flagged)"
    )
    max_epochs: int | None = option(None, "most epochs planned for an experiment; null = no bound")
    cap_at_config_epochs: bool = option(
        True,
        "never plan more than an experiment's train.epochs (false: a large budget trains longer)",
    )
    parallel_jobs: int | None = option(
        None, "training and prediction jobs running at once; null = gpus (at least 1)"
    )
    measure_steps: int = option(
        10, "optimizer steps timed per experiment, after as many untimed warm-up steps"
    )
    min_fold_steps: int = option(
        MIN_OPTIMIZER_STEPS,
        "refit.test_models auto: the full refit replaces the folds' test prediction only when "
        "every fold still gets at least this many optimizer steps with the refit in the plan",
    )

    def __post_init__(self) -> None:
        """Raises: SegflowError naming the first invalid option as ``budget.<name>``."""
        checks = [
            ("minutes", self.minutes is None or _positive(self.minutes), "a number > 0 or null"),
            (
                "reserve_share",
                _number(self.reserve_share) and 0 <= self.reserve_share < 1,
                "in [0, 1)",
            ),
            ("min_epochs", _int(self.min_epochs), "an integer >= 1"),
            ("max_epochs", self.max_epochs is None or _int(self.max_epochs), "an integer >= 1"),
            ("cap_at_config_epochs", isinstance(self.cap_at_config_epochs, bool), "true/false"),
            (
                "parallel_jobs",
                self.parallel_jobs is None or _int(self.parallel_jobs),
                "an integer >= 1 or null",
            ),
            ("measure_steps", _int(self.measure_steps), "an integer >= 1"),
            (
                "min_fold_steps",
                isinstance(self.min_fold_steps, int)
                and not isinstance(self.min_fold_steps, bool)
                and self.min_fold_steps >= 0,
                "an integer >= 0",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SegflowError(f"budget.{name} must be {expected}, got {getattr(self, name)!r}")
        if self.max_epochs is not None and self.max_epochs < self.min_epochs:
            raise SegflowError(
                f"budget.max_epochs ({self.max_epochs}) is below budget.min_epochs "
                f"({self.min_epochs})"
            )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# --------------------------------------------------------------------------- the arithmetic


@dataclass(frozen=True)
class TrainingCost:
    """Estimated seconds of one training (one experiment, fold and round) with its predictions.

    Attributes:
        steps_per_epoch: optimizer steps of one epoch.
        step_seconds: one optimizer step (loading, forward, backward, update).
        epoch_extra_seconds: per epoch besides the steps: validating the fold, saving the resume
            state.
        fixed_seconds: once per training, whatever the epochs: process start-ups, set-up, the
            final validation, the OOF and test predictions.
    """

    steps_per_epoch: int
    step_seconds: float
    epoch_extra_seconds: float
    fixed_seconds: float

    @property
    def epoch_seconds(self) -> float:
        """One epoch: its steps plus the per-epoch extras."""
        return self.steps_per_epoch * self.step_seconds + self.epoch_extra_seconds

    def seconds(self, epochs: int) -> float:
        """The whole training of ``epochs`` epochs, predictions included."""
        return self.fixed_seconds + epochs * self.epoch_seconds


@dataclass(frozen=True)
class EpochPlan:
    """What :func:`plan_epochs` decided.

    Attributes:
        epochs: experiment -> epochs of each of its trainings.
        estimated_seconds: the run's estimated wall clock with these epochs (overhead included).
        budget_seconds: the budget.
        feasible: whether the estimate fits the budget (false: even the fewest epochs do not).
        scale: the common factor ``s`` (epochs ~ s x configured epochs before bounds and
            rounding); 0 when infeasible.
    """

    epochs: dict[str, int]
    estimated_seconds: float
    budget_seconds: float
    feasible: bool
    scale: float


def plan_epochs(
    trainings: Mapping[str, Sequence[TrainingCost]],
    weights: Mapping[str, int],
    budget_seconds: float,
    overhead_seconds: float = 0.0,
    min_epochs: int = 1,
    max_epochs: Mapping[str, int | None] | None = None,
    parallel_jobs: int = 1,
) -> EpochPlan:
    """Epochs per experiment so that every training fits ``budget_seconds`` (see the module doc).

    Args:
        trainings: experiment -> the costs of its trainings (folds x rounds); more trainings
            (folds, rounds) leave fewer epochs for each.
        weights: experiment -> its configured ``train.epochs``; planned epochs keep these ratios.
        budget_seconds: the wall-clock budget.
        overhead_seconds: wall-clock time outside the trainings (reserve, planning).
        min_epochs: fewest epochs of any experiment (capped by its ``max_epochs``).
        max_epochs: experiment -> most epochs (None: unbounded).
        parallel_jobs: jobs running at once; the trainings' time is divided by it.

    Returns:
        The plan; ``feasible`` is False (with ``min_epochs`` everywhere) when even those do not
        fit.

    Raises:
        SegflowError: inconsistent arguments (experiments without weights, an epoch that costs
            nothing and has no upper bound, ...).
    """
    names = sorted(trainings)
    if not names:
        raise SegflowError("budget: no experiment to plan")
    if set(weights) != set(names):
        raise SegflowError(f"budget: weights for {sorted(weights)} but trainings of {names}")
    if not _positive(budget_seconds) or not _number(overhead_seconds) or overhead_seconds < 0:
        raise SegflowError(
            f"budget: need budget_seconds > 0 and overhead_seconds >= 0, got {budget_seconds} "
            f"and {overhead_seconds}"
        )
    if not _int(parallel_jobs) or not _int(min_epochs):
        raise SegflowError(
            f"budget: parallel_jobs and min_epochs must be integers >= 1, got {parallel_jobs} "
            f"and {min_epochs}"
        )
    max_epochs = dict(max_epochs or {})
    fixed = sum(t.fixed_seconds for name in names for t in trainings[name]) / parallel_jobs
    unit = {name: sum(t.epoch_seconds for t in trainings[name]) / parallel_jobs for name in names}
    high = {name: max_epochs.get(name) for name in names}
    low = {
        name: min_epochs if high[name] is None else min(min_epochs, high[name]) for name in names
    }
    for name in names:
        if not _int(weights[name]):
            raise SegflowError(f"budget: {name}: weight (train.epochs) must be >= 1")
        if unit[name] <= 0 and high[name] is None:
            raise SegflowError(f"budget: {name}: an epoch costs nothing and has no upper bound")

    def wall(epochs: Mapping[str, float]) -> float:
        return overhead_seconds + fixed + sum(unit[name] * epochs[name] for name in names)

    def clamped(scale: float) -> dict[str, float]:
        values = {}
        for name in names:
            value = max(float(low[name]), scale * weights[name])
            values[name] = value if high[name] is None else min(value, float(high[name]))
        return values

    if wall(low) > budget_seconds:
        return EpochPlan(dict(low), wall(low), budget_seconds, False, 0.0)

    # The largest common scale that fits: wall(clamped(s)) grows with s (piecewise linear).
    capped_scale = max(
        (high[name] / weights[name] for name in names if high[name] is not None), default=None
    )
    if (
        capped_scale is not None
        and all(high[name] is not None for name in names)
        and wall(clamped(capped_scale)) <= budget_seconds
    ):
        scale = capped_scale  # every experiment reaches its cap
    else:
        lower, upper = 0.0, 1.0
        while wall(clamped(upper)) <= budget_seconds:
            lower, upper = upper, upper * 2
        for _ in range(100):  # fixed iterations: the same inputs give the same plan
            middle = (lower + upper) / 2
            lower, upper = (
                (middle, upper) if wall(clamped(middle)) <= budget_seconds else (lower, middle)
            )
        scale = lower

    ideal = clamped(scale)
    # The epsilon keeps 2.9999999 (float error of an exact fit) from rounding down to 2.
    epochs = {name: max(low[name], math.floor(ideal[name] + 1e-9)) for name in names}
    by_remainder = sorted(names, key=lambda name: (-(ideal[name] - epochs[name]), name))
    for name in by_remainder:
        bound = high[name]
        if ideal[name] - epochs[name] <= 1e-9 or (bound is not None and epochs[name] >= bound):
            continue
        if wall({**epochs, name: epochs[name] + 1}) <= budget_seconds:
            epochs[name] += 1
    return EpochPlan(epochs, wall(epochs), budget_seconds, True, scale)


# --------------------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class Measurement:
    """What :mod:`segflow.model.budget_measure` timed for one experiment, in seconds.

    Attributes:
        step_seconds: one optimizer step at the experiment's batch size and input size.
        val_seconds_per_image: validation (forward, loss, scores) per image.
        predict_seconds_per_image: prediction with the ``predict`` options (TTA, tiling) and
            the original size restored, per image.
        setup_seconds: building model, loss, data loaders and optimizer.
        checkpoint_seconds: saving the resume state and a snapshot once (done every epoch).
        startup_seconds: a segflow process starting (interpreter, imports, device).
    """

    step_seconds: float
    val_seconds_per_image: float
    predict_seconds_per_image: float
    setup_seconds: float
    checkpoint_seconds: float
    startup_seconds: float


def steps_per_epoch(
    n_train: int, batch_size: int, n_pseudo: int = 0, max_pseudo_share: float = 0.0
) -> int:
    """Optimizer steps of one epoch, as the training loader yields them.

    Mirrors :meth:`segflow.model.training.fold_data.FoldData.build`: one draw per real item (also with
    ``empty_ratio``), pseudo-labelled draws capped at ``max_pseudo_share`` of the epoch, the
    last partial batch dropped when the training set is larger than a batch.

    Args:
        n_train: real training items of the fold.
        batch_size: ``train.batch_size``.
        n_pseudo: pseudo-labelled test images (a round > 0; at most every test image).
        max_pseudo_share: ``pseudo.max_pseudo_share``.
    """
    pseudo_draws = 0
    if n_pseudo:
        pseudo_draws = min(n_pseudo, int(max_pseudo_share / (1.0 - max_pseudo_share) * n_train))
    draws = n_train + pseudo_draws
    if n_train + n_pseudo > batch_size:
        return draws // batch_size
    return math.ceil(draws / batch_size)


def fold_sizes(folds_csv: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(training items, validation items) of each fold of ``folds.csv``, in fold order."""
    path = Path(folds_csv)
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run the folds stage first)")
    folds = pd.read_csv(path, dtype={"id": str})
    if "fold" not in folds.columns:
        raise SegflowError(f"{path}: missing column 'fold'")
    counts = folds["fold"].value_counts().sort_index()
    return [(len(folds) - int(count), int(count)) for count in counts]


def check_train_folds(
    train_folds: Sequence[int] | None, n_folds: int, where: str | os.PathLike[str]
) -> None:
    """``--train-folds`` must name folds of ``folds.csv``.

    Args:
        train_folds: the folds that train, or None (every fold).
        n_folds: the folds ``folds.csv`` holds.
        where: folds.csv, for the message.

    Raises:
        SegflowError: an empty list, or a fold that ``folds.csv`` lacks.
    """
    if train_folds is None:
        return
    if not train_folds:
        raise SegflowError("--train-folds: no fold to train (folds.train_folds is empty)")
    missing = [fold for fold in train_folds if not 0 <= fold < n_folds]
    if missing:
        raise SegflowError(
            f"--train-folds: fold {missing[0]} is not in {where} ({n_folds} folds); "
            "folds.train_folds must name folds of folds.n_folds"
        )


def training_costs(
    measurement: Measurement,
    sizes: Sequence[tuple[int, int]],
    n_test: int,
    pseudo_rounds: int,
    batch_size: int,
    max_pseudo_share: float,
    refit: str | None = None,
    train_folds: Sequence[int] | None = None,
) -> dict[tuple[int, int | str], TrainingCost]:
    """The cost of each (round, fold) training of one experiment (the module's cost model).

    Args:
        measurement: the experiment's timings.
        sizes: (training items, validation items) per fold (:func:`fold_sizes`).
        n_test: test images (predicted by every fold; pseudo-labelling candidates).
        pseudo_rounds: rounds after round 0.
        batch_size: the experiment's ``train.batch_size``.
        max_pseudo_share: ``pseudo.max_pseudo_share``.
        refit: None (no full refit), or the ``refit.test_models`` it follows: ``full`` (the
            refit alone predicts the test set, the folds do not), ``folds`` (the refit only
            trains) or ``both``.
        train_folds: the folds that train (``folds.train_folds``); None: every fold of
            ``sizes``. A refit still trains on every item.

    Returns:
        (round, fold) -> cost of the trained folds, rounds then folds in order; with ``refit``
        each round's (round, :data:`REFIT`) after its folds.

    Raises:
        SegflowError: an unknown ``refit``.
    """
    if refit not in (None, "full", "folds", "both"):
        raise SegflowError(f"budget: refit must be full, folds, both or None, got {refit!r}")
    m = measurement
    folds_predict_test = refit != "full"
    refit_predicts_test = refit in ("full", "both")
    n_items = sum(sizes[0]) if sizes else 0  # every item of folds.csv
    costs: dict[tuple[int, int | str], TrainingCost] = {}
    for round_ in range(pseudo_rounds + 1):
        n_pseudo = n_test if round_ else 0
        for fold, (n_train, n_val) in enumerate(sizes):
            if train_folds is not None and fold not in train_folds:
                continue
            steps = steps_per_epoch(n_train, batch_size, n_pseudo, max_pseudo_share)
            validation = n_val * m.val_seconds_per_image
            predicted = n_val + (n_test if folds_predict_test else 0)
            costs[(round_, fold)] = TrainingCost(
                steps_per_epoch=steps,
                step_seconds=m.step_seconds,
                epoch_extra_seconds=validation + m.checkpoint_seconds,
                fixed_seconds=(JOBS_PER_TRAINING - (0 if folds_predict_test else 1))
                * m.startup_seconds
                + m.setup_seconds
                + validation
                + predicted * m.predict_seconds_per_image,
            )
        if refit is not None:
            # Every item, nothing validated: per epoch the steps and the resume checkpoint; once
            # the train job (and predict-test's when it predicts the test set), no OOF.
            costs[(round_, REFIT)] = TrainingCost(
                steps_per_epoch=steps_per_epoch(n_items, batch_size, n_pseudo, max_pseudo_share),
                step_seconds=m.step_seconds,
                epoch_extra_seconds=m.checkpoint_seconds,
                fixed_seconds=(2 if refit_predicts_test else 1) * m.startup_seconds
                + m.setup_seconds
                + (n_test * m.predict_seconds_per_image if refit_predicts_test else 0.0),
            )
    return costs


# --------------------------------------------------------------------------- the plan file


def experiment_hash(values: Mapping[str, Any]) -> str:
    """A short digest of an experiment's config mapping (canonical JSON) without its ``refit``
    section (which trains no fold): ``segflow train --plan`` refuses a plan made for another
    configuration of the experiment."""
    trained = {key: value for key, value in values.items() if key != "refit"}
    text = json.dumps(trained, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Option:
    """One way to run the experiments that :func:`make_plan` weighs: which refits train and
    whom they predict for (name -> resolved ``refit.test_models``), their costs and the plan."""

    refits: dict[str, str]
    costs: dict[str, dict[tuple[int, int | str], TrainingCost]]
    plan: EpochPlan

    def fewest_fold_steps(self) -> int:
        """The fewest optimizer steps of any fold training (planned epochs x steps per epoch;
        early stopping may take fewer)."""
        return min(
            self.plan.epochs[name] * cost.steps_per_epoch
            for name, costs in self.costs.items()
            for (_, fold), cost in costs.items()
            if fold != REFIT
        )

    def summary(self) -> dict[str, Any]:
        """What plan.json records of an option."""
        return {
            "estimated_seconds": round(self.plan.estimated_seconds, 3),
            "feasible": self.plan.feasible,
            "epochs": dict(self.plan.epochs),
            "refits": dict(self.refits),
            "fewest_fold_steps": self.fewest_fold_steps(),
        }


def make_plan(
    options: BudgetOptions,
    experiments: Mapping[str, Mapping[str, Any]],
    configured_epochs: Mapping[str, int],
    batch_sizes: Mapping[str, int],
    measurements: Mapping[str, Measurement],
    sizes: Sequence[tuple[int, int]],
    n_test: int,
    pseudo_rounds: int,
    max_pseudo_share: float,
    parallel_jobs: int,
    planning_seconds: float = 0.0,
    machine: Mapping[str, Any] | None = None,
    refits: Mapping[str, str] | None = None,
    train_folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The contents of ``plan.json`` (without its provenance block).

    Args:
        options: the budget (``minutes`` set).
        experiments: name -> the experiment's config mapping (as the workflow passes it).
        configured_epochs: name -> its ``train.epochs`` (the weights, and the cap).
        batch_sizes: name -> its ``train.batch_size``.
        measurements: name -> its timings on this machine.
        sizes: (training items, validation items) per fold.
        n_test: test images.
        pseudo_rounds: ``pseudo.rounds``.
        max_pseudo_share: ``pseudo.max_pseudo_share``.
        parallel_jobs: jobs running at once.
        planning_seconds: the planning job's own time so far (counted against the budget).
        machine: where it was measured (device, threads), recorded as is.
        refits: name -> ``refit.test_models`` (full, folds, both or auto) of each experiment
            with ``refit.enabled``; auto is chosen here (see the module doc).
        train_folds: the folds that train (``folds.train_folds``), None for every fold: only
            their trainings are planned, so fewer folds leave more epochs to each.

    Returns:
        The plan: the budget, ``feasible``/``warning``, per experiment its timings, epochs,
        estimate and refit (``None`` without one; else ``test_models`` as resolved, whether it
        ``trained`` and its ``epochs``), one ``trainings`` record per (experiment, round, fold)
        (``fold`` :data:`REFIT` for a refit), and ``refit_choice`` (None without auto).

    Raises:
        SegflowError: a refit of an unknown experiment or with an unknown ``test_models``.
    """
    if options.minutes is None:
        raise SegflowError("budget.minutes is null: the budget is off, there is nothing to plan")
    budget_seconds = 60.0 * options.minutes
    overhead = options.reserve_share * budget_seconds + planning_seconds
    names = sorted(experiments)
    refits = dict(refits or {})
    for name, test_models in sorted(refits.items()):
        if name not in experiments:
            raise SegflowError(f"budget: a refit of {name!r}, which is not planned")
        if test_models not in ("full", "folds", "both", "auto"):
            raise SegflowError(
                f"budget: experiments.{name}.refit.test_models must be full, folds, both or "
                f"auto, got {test_models!r}"
            )
    caps = {}
    for name in names:
        bounds = [options.max_epochs] + (
            [configured_epochs[name]] if options.cap_at_config_epochs else []
        )
        caps[name] = min((b for b in bounds if b is not None), default=None)

    def planned(resolved: dict[str, str]) -> _Option:
        costs = {
            name: training_costs(
                measurements[name],
                sizes,
                n_test,
                pseudo_rounds,
                batch_sizes[name],
                max_pseudo_share,
                refit=resolved.get(name),
                train_folds=train_folds,
            )
            for name in names
        }
        plan = plan_epochs(
            {name: list(costs[name].values()) for name in names},
            {name: configured_epochs[name] for name in names},
            budget_seconds,
            overhead,
            options.min_epochs,
            caps,
            parallel_jobs,
        )
        return _Option(resolved, costs, plan)

    fixed = {name: test_models for name, test_models in refits.items() if test_models != "auto"}
    auto = sorted(name for name, test_models in refits.items() if test_models == "auto")
    choice = None
    if auto:
        # (a) the folds predict the test set, no refit; (b) the refit does, the folds train.
        folds_option = planned(fixed)
        full_option = planned({**fixed, **dict.fromkeys(auto, "full")})
        fewest = full_option.fewest_fold_steps()
        take_full = full_option.plan.feasible and fewest >= options.min_fold_steps
        chosen = full_option if take_full else folds_option
        if take_full:
            reason = (
                f"with the refit every fold gets at least {fewest} optimizer steps "
                f">= budget.min_fold_steps = {options.min_fold_steps}"
            )
        elif not full_option.plan.feasible:
            reason = "the plan with the refit does not fit the budget"
        else:
            reason = (
                f"with the refit a fold would get only {fewest} optimizer steps "
                f"< budget.min_fold_steps = {options.min_fold_steps}"
            )
        choice = {
            "experiments": auto,
            "choice": "full" if take_full else "folds",
            "reason": reason,
            "min_fold_steps": options.min_fold_steps,
            "options": {"folds": folds_option.summary(), "full": full_option.summary()},
        }
        log.info("budget: refit.test_models auto -> %s (%s)", choice["choice"], reason)
    else:
        chosen = planned(fixed)
    plan, costs = chosen.plan, chosen.costs
    warning = None
    if not plan.feasible:
        warning = (
            f"budget.minutes = {options.minutes} cannot fit even {options.min_epochs} epoch(s) "
            f"per experiment: estimated {plan.estimated_seconds / 60:.1f} min; planned the "
            "minimum anyway (raise the budget, or run fewer experiments, folds or rounds)"
        )
        log.warning(warning)
    records = [
        {
            "experiment": name,
            "round": round_,
            "fold": fold,
            "epochs": plan.epochs[name],
            "steps_per_epoch": cost.steps_per_epoch,
            "estimated_seconds": round(cost.seconds(plan.epochs[name]), 3),
        }
        for name in names
        for (round_, fold), cost in costs[name].items()
    ]

    def refit_record(name: str) -> dict[str, Any] | None:
        if name not in refits:
            return None
        trained = name in chosen.refits
        return {
            "configured": refits[name],
            # auto choosing the folds trains no refit: the folds predict the test set.
            "test_models": chosen.refits[name] if trained else "folds",
            "trained": trained,
            "epochs": plan.epochs[name] if trained else None,
        }

    return {
        "format": PLAN_FORMAT,
        "budget": {
            **asdict(options),
            "seconds": budget_seconds,
            "overhead_seconds": round(overhead, 3),
            "parallel_jobs": parallel_jobs,
        },
        "feasible": plan.feasible,
        "warning": warning,
        "estimated_seconds": round(plan.estimated_seconds, 3),
        "scale": round(plan.scale, 6),
        "data": {
            "folds": len(sizes),
            "fold_sizes": [list(s) for s in sizes],
            "train_folds": list(range(len(sizes)) if train_folds is None else train_folds),
            "n_test": n_test,
        },
        "pseudo_rounds": pseudo_rounds,
        "machine": dict(machine or {}),
        "refit_choice": choice,
        "experiments": {
            name: {
                "configured_epochs": configured_epochs[name],
                "epochs": plan.epochs[name],
                "experiment_hash": experiment_hash(experiments[name]),
                "measured": {k: round(v, 6) for k, v in asdict(measurements[name]).items()},
                "estimated_seconds": round(
                    sum(c.seconds(plan.epochs[name]) for c in costs[name].values()) / parallel_jobs,
                    3,
                ),
                "refit": refit_record(name),
            }
            for name in names
        },
        "trainings": records,
    }


def refit_test_models(
    plan: Mapping[str, Any], experiment: str, where: str = "plan.json"
) -> str | None:
    """Which models predict an experiment's test set under ``plan``, for the workflow.

    Args:
        plan: :func:`read_plan`'s result.
        experiment: a planned experiment with ``refit.enabled``.
        where: the plan's path, for messages.

    Returns:
        ``refit.test_models`` as the plan resolved it (``full``, ``folds`` or ``both``; auto
        chosen), or None when no refit is trained (auto chose the folds).

    Raises:
        SegflowError: the plan has no refit of that experiment.
    """
    info = (plan.get("experiments", {}).get(experiment) or {}).get("refit")
    if info is None:
        raise SegflowError(
            f"{where}: no full refit of experiment {experiment!r} planned; re-plan "
            "(snakemake -R plan_budget)"
        )
    return info["test_models"] if info["trained"] else None


def read_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``plan.json`` (``segflow plan-budget``).

    Raises:
        SegflowError: a missing, unreadable or other-format file.
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run segflow plan-budget)")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SegflowError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise SegflowError(
            f"{path}: not a plan of format {PLAN_FORMAT}; re-plan (snakemake -R plan_budget)"
        )
    return plan


def planned_epochs(
    plan: Mapping[str, Any],
    experiment: str,
    round_: int,
    fold: int | str,
    values: Mapping[str, Any],
    where: str = "plan.json",
) -> int:
    """The epochs ``plan`` gives one training.

    Args:
        plan: :func:`read_plan`'s result.
        experiment: the experiment's name.
        round_: the pseudo-labelling round.
        fold: the validation fold, or :data:`REFIT` for the experiment's full refit.
        values: the experiment's config mapping (its ``refit`` section is not compared); must
            be the one the plan was made for.
        where: the plan's path, for messages.

    Raises:
        SegflowError: no entry for that training, or a plan made for another configuration.
    """
    info = plan.get("experiments", {}).get(experiment)
    if info is None:
        raise SegflowError(
            f"{where}: no experiment {experiment!r} (planned: "
            f"{', '.join(sorted(plan.get('experiments', {})))}); re-plan (snakemake -R plan_budget)"
        )
    if info.get("experiment_hash") != experiment_hash(values):
        raise SegflowError(
            f"{where}: planned for another configuration of experiment {experiment!r}; "
            "re-plan (snakemake -R plan_budget)"
        )
    for record in plan.get("trainings", []):
        if (record["experiment"], record["round"], record["fold"]) == (experiment, round_, fold):
            return int(record["epochs"])
    if fold == REFIT:
        raise SegflowError(
            f"{where}: no full refit of {experiment!r} round {round_} planned (refit.test_models "
            "auto chose the folds, or the plan was made without the refit); re-plan "
            "(snakemake -R plan_budget)"
        )
    raise SegflowError(
        f"{where}: no training of {experiment!r} round {round_} fold {fold}; re-plan "
        "(snakemake -R plan_budget)"
    )


# --------------------------------------------------------------------------- the stage


def plan_budget(
    arrays_dir: str | os.PathLike[str],
    folds_csv: str | os.PathLike[str],
    experiments: Mapping[str, Mapping[str, Any]],
    options: BudgetOptions,
    measure: Callable[[str, Experiment], Measurement],
    pseudo_rounds: int = 0,
    max_pseudo_share: float = 0.3,
    parallel_jobs: int = 1,
    machine: Mapping[str, Any] | None = None,
    n_test: int = 0,
    train_folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The ``segflow plan-budget`` stage: time every experiment, plan its epochs.

    Args:
        arrays_dir: the preprocess output folder (its stats.json: channels, classes).
        folds_csv: the folds stage's folds.csv.
        experiments: name -> the experiment's config mapping (the run experiments; with
            ``refit`` for those refit on all data: the refit is planned with them).
        options: the budget (``minutes`` set).
        measure: times one parsed experiment on this machine
            (:func:`segflow.model.budget_measure.measure_experiment` with the job's settings).
        pseudo_rounds: ``pseudo.rounds``.
        max_pseudo_share: ``pseudo.max_pseudo_share``.
        parallel_jobs: training and prediction jobs running at once.
        machine: where it is measured, recorded in the plan.
        n_test: test images every test prediction costs (their count only: the plan never
            reads the test set, so new test images of the same count re-plan nothing).
        train_folds: the folds that train (``folds.train_folds``); None: every fold.

    Returns:
        The plan (:func:`make_plan`); the time spent here counts against the budget.

    Raises:
        SegflowError: the budget is off, or bad inputs (naming the file or key).
    """
    from segflow.model.experiment import parse_experiment

    started = time.monotonic()
    if options.minutes is None:
        raise SegflowError("budget.minutes is null: the budget is off, there is nothing to plan")
    if not experiments:
        raise SegflowError("budget: no experiment to plan")
    stats = read_stats(arrays_dir)
    parsed = {
        name: parse_experiment(
            name,
            dict(values),
            in_channels=int(stats["channels"]),
            classes=len(classes_of(stats)),
        )
        for name, values in sorted(experiments.items())
    }
    sizes = fold_sizes(folds_csv)
    check_train_folds(train_folds, len(sizes), folds_csv)
    measurements = {}
    for name, experiment in parsed.items():
        measurements[name] = measure(name, experiment)
        log.info("budget: %s measured: %s", name, measurements[name])
    plan = make_plan(
        options,
        experiments,
        {name: e.train.epochs for name, e in parsed.items()},
        {name: e.train.batch_size for name, e in parsed.items()},
        measurements,
        sizes,
        n_test,
        pseudo_rounds,
        max_pseudo_share,
        parallel_jobs,
        planning_seconds=time.monotonic() - started,
        machine=machine,
        refits={name: e.refit.test_models for name, e in parsed.items() if e.refit.enabled},
        train_folds=train_folds,
    )
    for name, info in plan["experiments"].items():
        refit = info["refit"]
        log.info(
            "budget: %s: %d epoch(s) per training (configured %d)%s, about %.1f min",
            name,
            info["epochs"],
            info["configured_epochs"],
            "" if refit is None or not refit["trained"] else " and as many for its full refit",
            info["estimated_seconds"] / 60,
        )
    log.info(
        "budget: estimated %.1f of %.1f min%s",
        plan["estimated_seconds"] / 60,
        plan["budget"]["seconds"] / 60,
        "" if plan["feasible"] else " (INFEASIBLE: see the warning in the plan)",
    )
    return plan
