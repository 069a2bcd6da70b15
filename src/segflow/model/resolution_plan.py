"""The budget chooses the input resolution: ``budget.sizes`` (``segflow plan-resolution``).

With ``budget.minutes`` and ``budget.sizes`` set, the ``plan_resolution`` job runs before
preprocess. For every candidate size (``[height, width]``, or ``{height, width, mode}`` with
``mode`` ``resize`` or ``pad``; without one, ``preprocess.resize_mode``) it times each run
experiment on random arrays of that size (:mod:`segflow.model.resolution_measure`: step time does
not depend on pixel content), turns the timings into epochs with the time budget's own
arithmetic (:func:`segflow.model.budget.make_plan`: the fold sizes of ``folds.csv``, the test images
of the manifest, pseudo rounds) and counts the optimizer steps each training would get
(:func:`choose_size`, pure):

- a training *has enough* when its planned steps reach ``budget.min_fold_steps`` (default
  :data:`segflow.model.training.train_options.MIN_OPTIMIZER_STEPS`, the report's few-steps flag), or when its
  epochs already reach their cap (``train.epochs`` with ``cap_at_config_epochs``, or
  ``max_epochs``): then the budget, and so the size, is not what limits it;
- the chosen size is the LARGEST candidate (by pixels; equal ones in list order) at which every
  training of every experiment has enough and the plan is feasible;
- none qualifies: the smallest, with a warning in ``resolution.json``.

``resolution.json`` records the choice, every size's estimates and timings and the reason;
``segflow preprocess --resolution`` takes height, width and mode from it. Like the budget plan
it is a cached artifact: made again when the budget, the candidates, the experiments or the data
change, never because a timing would come out differently (``snakemake -R plan_resolution``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from segflow.artifacts.resolution import RESIZE_MODES, RESOLUTION_FORMAT, positive_int
from segflow.core.errors import SegflowError
from segflow.core.options import option
from segflow.model.budget import (
    BudgetOptions,
    Measurement,
    check_train_folds,
    fold_sizes,
    make_plan,
)
from segflow.model.training.train_options import MIN_OPTIMIZER_STEPS

if TYPE_CHECKING:
    from segflow.model.experiment import Experiment

log = logging.getLogger(__name__)

# The budget section's keys that belong to the resolution choice, not to plan-budget.
RESOLUTION_KEYS = ("sizes",)


@dataclass(frozen=True)
class ResolutionOptions:
    """The resolution choice (config section ``budget``, keys :data:`RESOLUTION_KEYS`)."""

    sizes: tuple[Any, ...] | None = option(
        None,
        "candidate sizes, each [height, width] or {height, width, mode: resize|pad}; null = off",
    )
    min_fold_steps: int = option(
        MIN_OPTIMIZER_STEPS, "optimizer steps every fold must get at the chosen size"
    )

    def __post_init__(self) -> None:
        """Raises: SegflowError naming the first invalid option as ``budget.<name>``."""
        if isinstance(self.sizes, list):  # from YAML/JSON
            object.__setattr__(self, "sizes", tuple(self.sizes))
        value = self.min_fold_steps
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SegflowError(f"budget.min_fold_steps must be an integer >= 1, got {value!r}")
        if self.sizes is not None:
            parse_candidates(self.sizes, "resize")


@dataclass(frozen=True)
class Candidate:
    """One candidate input size and how images reach it."""

    height: int
    width: int
    mode: str  # segflow.artifacts.resolution.RESIZE_MODES

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} {self.mode}"


def parse_candidates(values: Any, default_mode: str) -> list[Candidate]:
    """``budget.sizes`` as candidates, in the order given.

    Args:
        values: a non-empty list of ``[height, width]`` or ``{height, width, mode}``.
        default_mode: the mode of a candidate without one (``preprocess.resize_mode``).

    Returns:
        One :class:`Candidate` per entry.

    Raises:
        SegflowError: one line naming the bad entry (``budget.sizes[i]``).
    """
    if not isinstance(values, list | tuple) or not values:
        raise SegflowError(f"budget.sizes must be a non-empty list or null, got {values!r}")
    candidates = []
    for i, value in enumerate(values):
        where = f"budget.sizes[{i}]"
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"height", "width", "mode"})
            if unknown:
                raise SegflowError(
                    f"{where}: unknown key {unknown[0]!r}; valid: height, width, mode"
                )
            height, width = value.get("height"), value.get("width")
            mode = value.get("mode", default_mode)
        elif isinstance(value, list | tuple) and len(value) == 2:
            (height, width), mode = value, default_mode
        else:
            raise SegflowError(
                f"{where} must be [height, width] or {{height, width, mode}}, got {value!r}"
            )
        if not (positive_int(height) and positive_int(width)):
            raise SegflowError(f"{where}: height and width must be integers >= 1, got {value!r}")
        if mode not in RESIZE_MODES:
            raise SegflowError(
                f"{where}: mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}"
            )
        candidate = Candidate(height, width, mode)
        if candidate in candidates:
            raise SegflowError(f"{where}: {candidate.label} is listed twice")
        candidates.append(candidate)
    return candidates


def check_pad_candidates(candidates: Sequence[Candidate], manifest: pd.DataFrame) -> None:
    """Pad candidates must hold every image: none may be smaller than an original.

    Args:
        candidates: the parsed ``budget.sizes``.
        manifest: the ingest manifest (``height``, ``width``, ``image_path``).

    Raises:
        SegflowError: one line naming the candidate and an image that does not fit.
    """
    for i, candidate in enumerate(candidates):
        if candidate.mode != "pad":
            continue
        larger = manifest[
            (manifest["height"] > candidate.height) | (manifest["width"] > candidate.width)
        ]
        if not larger.empty:
            row = larger.iloc[0]
            raise SegflowError(
                f"budget.sizes[{i}]: pad {candidate.height}x{candidate.width} is smaller than "
                f"{row['image_path']} ({int(row['height'])}x{int(row['width'])}); a pad "
                "candidate must be >= the original size (or use mode resize)"
            )


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class SizeEstimate:
    """What the budget's arithmetic gives the trainings at one candidate size.

    Attributes:
        candidate: the size.
        plan: :func:`segflow.model.budget.make_plan`'s plan at this size.
        caps: experiment -> most epochs it may be planned (None: unbounded).
    """

    candidate: Candidate
    plan: dict[str, Any]
    caps: dict[str, int | None]

    def training_steps(self) -> list[dict[str, Any]]:
        """Per training (experiment, round, fold): planned steps and whether its epochs reach
        their cap."""
        rows = []
        for record in self.plan["trainings"]:
            cap = self.caps.get(record["experiment"])
            rows.append(
                {
                    "experiment": record["experiment"],
                    "round": record["round"],
                    "fold": record["fold"],
                    "epochs": record["epochs"],
                    "steps": record["epochs"] * record["steps_per_epoch"],
                    "capped": cap is not None and record["epochs"] >= cap,
                }
            )
        return rows

    def fewest_steps(self) -> int:
        """The fewest optimizer steps any training gets."""
        return min(row["steps"] for row in self.training_steps())

    def qualifies(self, min_fold_steps: int) -> bool:
        """Feasible, and every training gets ``min_fold_steps`` steps or reaches its cap."""
        return bool(self.plan["feasible"]) and all(
            row["steps"] >= min_fold_steps or row["capped"] for row in self.training_steps()
        )


def epoch_caps(
    options: BudgetOptions, configured_epochs: Mapping[str, int]
) -> dict[str, int | None]:
    """Experiment -> the most epochs :func:`segflow.model.budget.make_plan` may plan for it."""
    caps = {}
    for name, epochs in configured_epochs.items():
        bounds = [options.max_epochs] + ([epochs] if options.cap_at_config_epochs else [])
        caps[name] = min((b for b in bounds if b is not None), default=None)
    return caps


def estimate_sizes(
    candidates: Sequence[Candidate],
    measurements: Mapping[Candidate, Mapping[str, Measurement]],
    budget: BudgetOptions,
    experiments: Mapping[str, Mapping[str, Any]],
    configured_epochs: Mapping[str, int],
    batch_sizes: Mapping[str, int],
    sizes: Sequence[tuple[int, int]],
    n_test: int,
    pseudo_rounds: int = 0,
    max_pseudo_share: float = 0.3,
    parallel_jobs: int = 1,
    planning_seconds: Mapping[Candidate, float] | None = None,
    train_folds: Sequence[int] | None = None,
) -> list[SizeEstimate]:
    """The budget's plan at each candidate size (pure arithmetic on the timings).

    Args:
        candidates: the sizes.
        measurements: candidate -> experiment -> its timings at that size.
        budget: the budget options (``minutes`` set).
        experiments: name -> config mapping (recorded as the plan's experiment hash).
        configured_epochs: name -> ``train.epochs``.
        batch_sizes: name -> ``train.batch_size``.
        sizes: (training items, validation items) per fold (:func:`segflow.model.budget.fold_sizes`).
        n_test: test images.
        pseudo_rounds: ``pseudo.rounds``.
        max_pseudo_share: ``pseudo.max_pseudo_share``.
        parallel_jobs: jobs running at once.
        planning_seconds: candidate -> what timing it took (plan_budget spends about as much
            at the chosen size, within the budget); default 0.
        train_folds: the folds that train (``folds.train_folds``); None: every fold.

    Returns:
        One :class:`SizeEstimate` per candidate, in the given order.
    """
    planning_seconds = planning_seconds or {}
    caps = epoch_caps(budget, configured_epochs)
    return [
        SizeEstimate(
            candidate,
            make_plan(
                budget,
                experiments,
                configured_epochs,
                batch_sizes,
                measurements[candidate],
                sizes,
                n_test,
                pseudo_rounds,
                max_pseudo_share,
                parallel_jobs,
                planning_seconds=planning_seconds.get(candidate, 0.0),
                train_folds=train_folds,
            ),
            caps,
        )
        for candidate in candidates
    ]


def choose_size(
    estimates: Sequence[SizeEstimate], min_fold_steps: int
) -> tuple[SizeEstimate, str, str | None]:
    """The largest candidate at which every training gets enough steps (module doc).

    Args:
        estimates: :func:`estimate_sizes`' result (any order).
        min_fold_steps: ``budget.min_fold_steps``.

    Returns:
        (the chosen estimate, the reason, a warning or None).

    Raises:
        SegflowError: no candidates.
    """
    if not estimates:
        raise SegflowError("budget.sizes: no candidate size to choose from")
    # Largest first; sorted() is stable, so equal sizes keep their list order.
    ordered = sorted(estimates, key=lambda e: -e.candidate.pixels)
    for estimate in ordered:
        if estimate.qualifies(min_fold_steps):
            larger = [
                e.candidate.label for e in ordered if e.candidate.pixels > estimate.candidate.pixels
            ]
            reason = (
                f"largest candidate at which every fold gets >= {min_fold_steps} optimizer steps "
                f"or its full epochs (fewest: {estimate.fewest_steps()})"
            )
            if larger:
                reason += f"; larger ones leave a fold short: {', '.join(larger)}"
            return estimate, reason, None
    smallest = min(estimates, key=lambda e: e.candidate.pixels)
    warning = (
        f"no candidate size gives every fold {min_fold_steps} optimizer steps within "
        f"budget.minutes; chose the smallest, {smallest.candidate.label} (fewest steps "
        f"{smallest.fewest_steps()}): raise the budget, lower budget.min_fold_steps, or add "
        "smaller sizes"
    )
    return smallest, "no candidate qualifies: the smallest", warning


def resolution_record(
    estimates: Sequence[SizeEstimate],
    min_fold_steps: int,
    measuring_seconds: Mapping[Candidate, float] | None = None,
) -> dict[str, Any]:
    """The contents of ``resolution.json`` (without provenance): the choice and every size's
    estimates."""
    chosen, reason, warning = choose_size(estimates, min_fold_steps)
    if warning:
        log.warning(warning)
    measuring_seconds = measuring_seconds or {}
    return {
        "format": RESOLUTION_FORMAT,
        "chosen": [chosen.candidate.height, chosen.candidate.width],
        "mode": chosen.candidate.mode,
        "reason": reason,
        "warning": warning,
        "min_fold_steps": min_fold_steps,
        "sizes": [
            {
                "height": e.candidate.height,
                "width": e.candidate.width,
                "mode": e.candidate.mode,
                "qualifies": e.qualifies(min_fold_steps),
                "feasible": e.plan["feasible"],
                "fewest_fold_steps": e.fewest_steps(),
                "estimated_seconds": e.plan["estimated_seconds"],
                "epochs": {name: info["epochs"] for name, info in e.plan["experiments"].items()},
                "trainings": e.training_steps(),
                "measured": {
                    name: info["measured"] for name, info in e.plan["experiments"].items()
                },
                "measuring_seconds": round(measuring_seconds.get(e.candidate, 0.0), 3),
            }
            for e in estimates
        ],
    }


# --------------------------------------------------------------------------- the stage


def plan_resolution(
    manifest: pd.DataFrame,
    folds_csv: str | os.PathLike[str],
    experiments: Mapping[str, Mapping[str, Any]],
    budget: BudgetOptions,
    options: ResolutionOptions,
    default_mode: str,
    channels: str,
    measure: Callable[[str, Experiment, Candidate, int, int, tuple[int, int]], Measurement],
    pseudo_rounds: int = 0,
    max_pseudo_share: float = 0.3,
    parallel_jobs: int = 1,
    machine: Mapping[str, Any] | None = None,
    n_test: int = 0,
    train_folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The ``segflow plan-resolution`` stage: time every experiment at every candidate size,
    choose the size (module doc).

    Args:
        manifest: the train manifest (original sizes, channels, classes).
        folds_csv: the folds stage's folds.csv (the training and validation items per fold).
        experiments: name -> config mapping (the run experiments).
        budget: the budget options (``minutes`` set).
        options: the candidates and the steps threshold (``sizes`` set).
        default_mode: ``preprocess.resize_mode`` (candidates without a mode).
        channels: ``preprocess.channels``.
        measure: times one parsed experiment at a candidate size, given the arrays' channels,
            classes and the originals' most common (height, width) (the CLI wires
            :func:`segflow.model.resolution_measure.measure_at_size`).
        pseudo_rounds: ``pseudo.rounds``.
        max_pseudo_share: ``pseudo.max_pseudo_share``.
        parallel_jobs: training and prediction jobs running at once.
        machine: where it is measured, recorded as is.
        n_test: test images every test prediction costs (their count only).
        train_folds: the folds that train (``folds.train_folds``); None: every fold.

    Returns:
        ``resolution.json``'s contents: ``chosen`` [height, width], ``mode``, ``reason``,
        ``warning`` and per size its estimates and timings.

    Raises:
        SegflowError: the budget or the candidates are off, or bad inputs (naming the key).
    """
    from segflow.data.preprocess import output_channels
    from segflow.formats.labels import class_names, manifest_classes
    from segflow.model.experiment import parse_experiment

    if budget.minutes is None:
        raise SegflowError("budget.sizes needs budget.minutes: the budget chooses the size")
    if options.sizes is None:
        raise SegflowError("budget.sizes is null: there is no size to choose")
    if not experiments:
        raise SegflowError("budget: no experiment to plan")
    candidates = parse_candidates(options.sizes, default_mode)
    check_pad_candidates(candidates, manifest)
    sizes = fold_sizes(folds_csv)
    check_train_folds(train_folds, len(sizes), folds_csv)
    n_channels = output_channels(manifest, channels)
    n_classes = len(class_names(manifest_classes(manifest)))
    common = (
        manifest.groupby(["height", "width"]).size().sort_values(ascending=False, kind="stable")
    )
    original = (int(common.index[0][0]), int(common.index[0][1]))
    parsed = {
        name: parse_experiment(name, dict(values), in_channels=n_channels, classes=n_classes)
        for name, values in sorted(experiments.items())
    }
    measurements: dict[Candidate, dict[str, Measurement]] = {}
    seconds: dict[Candidate, float] = {}
    timed: dict[tuple[int, int], Candidate] = {}  # a size's pad and resize steps cost the same
    for candidate in candidates:
        same = timed.get((candidate.height, candidate.width))
        if same is not None:
            measurements[candidate], seconds[candidate] = measurements[same], seconds[same]
            continue
        started = time.monotonic()
        measurements[candidate] = {
            name: measure(name, experiment, candidate, n_channels, n_classes, original)
            for name, experiment in parsed.items()
        }
        seconds[candidate] = time.monotonic() - started
        timed[(candidate.height, candidate.width)] = candidate
        log.info("resolution: %s timed in %.1f s", candidate.label, seconds[candidate])
    estimates = estimate_sizes(
        candidates,
        measurements,
        budget,
        experiments,
        {name: e.train.epochs for name, e in parsed.items()},
        {name: e.train.batch_size for name, e in parsed.items()},
        sizes,
        n_test,
        pseudo_rounds,
        max_pseudo_share,
        parallel_jobs,
        planning_seconds=seconds,
        train_folds=train_folds,
    )
    record = resolution_record(estimates, options.min_fold_steps, seconds)
    record["machine"] = dict(machine or {})
    log.info(
        "resolution: chose %sx%s (%s): %s", *record["chosen"], record["mode"], record["reason"]
    )
    return record


def check_resolution_config(budget: Mapping[str, Any], preprocess: Mapping[str, Any]) -> None:
    """The workflow's check of ``budget.sizes`` when the config is loaded (before any job).

    Args:
        budget: the config's ``budget`` section (defaults filled in).
        preprocess: the config's ``preprocess`` section (its ``resize_mode`` is the candidates'
            default mode).

    Raises:
        SegflowError: one line naming the key: sizes without ``budget.minutes``, a malformed
            candidate, or a ``min_fold_steps`` below 1.
    """
    sizes = budget.get("sizes")
    ResolutionOptions(sizes=sizes, min_fold_steps=budget.get("min_fold_steps", MIN_OPTIMIZER_STEPS))
    if sizes is None:
        return
    if budget.get("minutes") is None:
        raise SegflowError(
            "invalid config: budget.sizes needs budget.minutes (the budget chooses the size); "
            "set both, or budget.sizes: null"
        )
    parse_candidates(sizes, preprocess.get("resize_mode", "resize"))
