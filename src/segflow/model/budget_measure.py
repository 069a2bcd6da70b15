"""Timing an experiment on this machine for the time budget (:mod:`segflow.model.budget`).

Everything is timed through the code that the real jobs run: the fold trainer
(:class:`segflow.model.training.train._FoldTrainer`, with the experiment's model, loss, augmentation, batch
size, input size and loaders, on the training device and threads), its validation and resume
checkpoint, and :func:`segflow.model.inference.predict.predict_rows` with the ``predict`` options (TTA, tiling)
on the prediction device and threads. The weights are untrained: timing does not depend on them.

Timings vary from run to run; that is why the plan is a cached artifact. This module is left out
of the ``plan-budget`` code fingerprint (:data:`segflow.stages.STAGES`): editing
how time is measured does not re-plan, and so does not retrain; ``snakemake -R plan_budget``
does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segflow.artifacts.resolution import index_offsets
from segflow.core.atomic import write_json
from segflow.core.devices import add_compute_arguments, compute, resolve_device
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace
from segflow.core.stage_args import json_mapping, stage_log, stage_provenance, with_provenance
from segflow.model.budget import BudgetOptions, Measurement, plan_budget
from segflow.model.datasets import SegmentationArrays
from segflow.model.experiment import Experiment
from segflow.model.inference.predict import (
    PredictOptions,
    predict_rows,
    restore_resolution,
    stack_original,
)
from segflow.model.models import required_divisor
from segflow.model.training.checkpointing import save_resume
from segflow.model.training.fold_data import split_rows
from segflow.model.training.train import _FoldTrainer

log = logging.getLogger(__name__)

# Validation and prediction are timed on this many batches (after one untimed batch).
TIMED_BATCHES = 2
# What a segflow job imports before it starts working (segflow.cli imports these lazily).
JOB_IMPORTS = "import torch, segflow.model.training.train, segflow.model.inference.predict"


class _StepClock:
    """A training loader that yields ``steps`` batches (over as many passes as needed) and
    records when each is handed to the training loop."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps
        self.times: list[float] = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        while True:
            for batch in self.loader:
                if len(self.times) == self.steps:
                    return
                self.times.append(time.perf_counter())
                yield batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_startup_seconds() -> float:
    """Seconds a fresh segflow job takes to start: the interpreter and its imports, timed in a
    child process of this interpreter."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", JOB_IMPORTS], capture_output=True, text=True, timeout=600
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        log.warning("timing a job's start-up failed (%s)", result.stderr.strip()[-300:])
    return elapsed


def device_startup_seconds(device: torch.device) -> float:
    """Seconds a process takes to set up ``device`` (the CUDA context); 0 on the CPU. Only the
    first call in a process measures it: call before anything else uses the device."""
    if device.type != "cuda":
        return 0.0
    started = time.perf_counter()
    torch.zeros(1, device=device)
    _sync(device)
    return time.perf_counter() - started


def measure_experiment(
    arrays: SegmentationArrays,
    folds_csv: str | Path,
    experiment: Experiment,
    predict: PredictOptions,
    measure_steps: int,
    predict_threads: int,
    startup_seconds: float,
    fold: int = 0,
) -> Measurement:
    """Time one experiment's training step, validation, checkpoint and prediction.

    Args:
        arrays: the preprocess outputs.
        folds_csv: folds.csv (fold ``fold`` is used).
        experiment: the parsed experiment.
        predict: the ``predict`` options (TTA, tiling, batch size, device).
        measure_steps: optimizer steps timed, after as many untimed ones.
        predict_threads: torch threads of the prediction jobs.
        startup_seconds: a job's start-up (:func:`process_startup_seconds` plus the device's).
        fold: the fold trained on.

    Returns:
        The experiment's :class:`~segflow.model.budget.Measurement`.
    """
    train_rows, val_rows = split_rows(arrays, folds_csv, fold)
    # A NaN loss of the untrained model must not stop the planning. Steps are timed with the
    # encoder trained (the frozen first epochs, cheaper, are timed as the rest: an upper bound).
    options = dataclasses.replace(
        experiment.train,
        nonfinite_loss="skip_batch",
        max_skipped_fraction=1.0,
        freeze_encoder_epochs=0,
    )
    val_subset = val_rows[: options.batch_size * (TIMED_BATCHES + 1)]
    with tempfile.TemporaryDirectory(prefix="segflow-budget-") as tmp:
        resume_dir = Path(tmp)
        started = time.perf_counter()
        trainer = _FoldTrainer(
            arrays,
            train_rows,
            val_subset,
            fold,
            experiment.model,
            experiment.loss,
            experiment.augment,
            options,
            experiment.ohem_fraction,
            resume_dir,
        )
        _sync(trainer.device)
        setup_seconds = time.perf_counter() - started

        # Seeded before the clock wraps the loader: seeding sets the augmentation phase on the
        # loader's own sampler.
        trainer.seed_epoch(1)
        clock = _StepClock(trainer.data.train_loader, 2 * measure_steps)
        trainer.data.train_loader = clock  # type: ignore[assignment]
        trainer.train_epoch(1)  # syncs at its end (the mean loss)
        ended = time.perf_counter()
        step_seconds = (ended - clock.times[measure_steps]) / measure_steps

        model = trainer.evaluated_model
        trainer.validate(model)  # warm-up (first eval-mode pass)
        started = time.perf_counter()
        trainer.validate(model)
        val_seconds_per_image = (time.perf_counter() - started) / len(val_subset)

        started = time.perf_counter()
        dropped = trainer.update_top_k(1, 0.0)  # a snapshot, as an improving epoch writes
        save_resume(resume_dir, trainer.state("budget"), dropped)
        checkpoint_seconds = time.perf_counter() - started

        predict_seconds_per_image = _time_prediction(
            arrays, copy.deepcopy(model), predict, predict_threads
        )
    return Measurement(
        step_seconds=step_seconds,
        val_seconds_per_image=val_seconds_per_image,
        predict_seconds_per_image=predict_seconds_per_image,
        setup_seconds=setup_seconds,
        checkpoint_seconds=checkpoint_seconds,
        startup_seconds=startup_seconds,
    )


def _time_prediction(
    arrays: SegmentationArrays, model: torch.nn.Module, predict: PredictOptions, threads: int
) -> float:
    """Seconds per image of :func:`predict_rows` plus restoring the original size (as
    ``segflow predict-test`` does), on train images: the test images have the same array size,
    and the plan must not depend on their contents (only on their count, ``--n-test``)."""
    items = arrays.index[arrays.index["split"] == "train"].reset_index(drop=True)
    images = np.load(arrays.train_images_path, mmap_mode="r")
    device = resolve_device(predict.device)
    model = model.to(memory_format=torch.contiguous_format)  # a loaded checkpoint's layout
    divisor = required_divisor(model)
    rows = items["row"].to_numpy()
    if {"orig_height", "orig_width"} <= set(items.columns):
        sizes = list(
            zip(items["orig_height"].astype(int), items["orig_width"].astype(int), strict=True)
        )
    else:
        sizes = [(arrays.height, arrays.width)] * len(items)
    warm = min(len(rows), predict.batch_size)
    timed = min(len(rows), predict.batch_size * TIMED_BATCHES)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        predict_rows(model, images, rows[:warm], arrays.mean, arrays.std, predict, device, divisor)
        started = time.perf_counter()
        probs, _ = predict_rows(
            model, images, rows[:timed], arrays.mean, arrays.std, predict, device, divisor
        )
        offsets = index_offsets(items)[:timed]  # pad mode crops; resize mode resizes
        stack_original(restore_resolution(probs, sizes[:timed], offsets), "budget timing")
        return (time.perf_counter() - started) / max(timed, 1)
    finally:
        torch.set_num_threads(previous)


def machine_description(device: torch.device, threads: int, predict_threads: int) -> dict[str, Any]:
    """Where the plan was measured (recorded in plan.json)."""
    import platform

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": str(device),
        "device_name": name or platform.machine(),
        "threads": threads,
        "predict_threads": predict_threads,
        "torch": torch.__version__,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow plan-budget``'s flags."""
    add_dataclass_arguments(parser, BudgetOptions)
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--folds", required=True, help="folds.csv")
    add_planning_arguments(parser, "plan.json to write")


def add_planning_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The flags every planning command shares (plan-budget, plan-resolution): what is trained
    and predicted, the output file, the compute options."""
    parser.add_argument(
        "--experiments", required=True, help="JSON mapping of experiment name -> experiment"
    )
    parser.add_argument("--predict", default="{}", help="the predict section as JSON (TTA, ...)")
    parser.add_argument("--pseudo-rounds", type=int, default=0, help="pseudo-labelling rounds")
    parser.add_argument(
        "--max-pseudo-share", type=float, default=0.3, help="cap on pseudo-labelled draws"
    )
    parser.add_argument(
        "--predict-threads", type=int, default=2, help="CPU threads of the prediction jobs"
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=0,
        help="test images to plan the prediction of (their count only: the plan never reads them)",
    )
    parser.add_argument(
        "--train-folds",
        type=int,
        nargs="+",
        default=None,
        help="the folds that train (folds.train_folds); default: every fold of --folds",
    )
    parser.add_argument("--out", required=True, help=out_help)
    add_compute_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow plan-budget``: time each experiment here, write the plan."""
    with compute(args):
        _plan_budget_command(args)


def planning_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The run experiments (name -> mapping) and the predict options of a planning command's
    ``--experiments`` and ``--predict`` flags (:func:`add_planning_arguments`).

    Raises:
        SegflowError: one line naming the flag or the unknown ``predict`` key.
    """
    from segflow.model.inference.predict import PredictOptions

    experiments = json_mapping(args.experiments, "--experiments")
    if not all(isinstance(values, dict) for values in experiments.values()):
        raise SegflowError("--experiments must map each experiment name to its mapping")
    predict_values = json_mapping(args.predict, "--predict")
    known = {field.name for field in dataclasses.fields(PredictOptions)}
    unknown = sorted(set(predict_values) - known)
    if unknown:
        raise SegflowError(f"unknown key predict.{unknown[0]}; valid: {', '.join(sorted(known))}")
    predict = PredictOptions(**predict_values)
    return experiments, predict


def _plan_budget_command(args: argparse.Namespace) -> None:

    options = dataclass_from_namespace(BudgetOptions, args)
    if options.minutes is None:
        raise SegflowError("budget.minutes is null: the budget is off, there is nothing to plan")
    experiments, predict = planning_inputs(args)
    arrays = SegmentationArrays.open(args.arrays_dir)
    threads = max(1, args.threads)
    predict_threads = max(1, min(args.predict_threads, threads))
    # What every job pays before it works: the interpreter, imports and the device (timed
    # within plan_budget, whose time counts against the budget).
    startups: dict[str, float] = {}

    def measure(name: str, experiment: Experiment) -> Any:
        device = resolve_device(experiment.train.device)
        if "process" not in startups:
            startups["process"] = process_startup_seconds()
        if str(device) not in startups:  # measurable once per process and device
            startups[str(device)] = device_startup_seconds(device)
        stage_log.info("budget: timing %s on %s", name, device)
        return measure_experiment(
            arrays,
            args.folds,
            experiment,
            predict,
            options.measure_steps,
            predict_threads,
            startups["process"] + startups[str(device)],
        )

    plan = plan_budget(
        args.arrays_dir,
        args.folds,
        experiments,
        options,
        measure,
        pseudo_rounds=args.pseudo_rounds,
        max_pseudo_share=args.max_pseudo_share,
        n_test=args.n_test,
        train_folds=args.train_folds,
        parallel_jobs=options.parallel_jobs or max(1, args.gpus),
        machine=machine_description(resolve_device("auto"), threads, predict_threads),
    )
    # The config values the plan follows from (no paths); the timings are not seeded.
    block = stage_provenance(
        {
            "budget": dataclasses.asdict(options),
            "experiments": experiments,
            "predict": dataclasses.asdict(predict),
            "pseudo_rounds": args.pseudo_rounds,
            "max_pseudo_share": args.max_pseudo_share,
            "n_test": args.n_test,
            # Only when set: a run with every fold keeps its record as it was.
            **({} if args.train_folds is None else {"train_folds": args.train_folds}),
        }
    )
    write_json(args.out, with_provenance(plan, block))
    stage_log.info("budget plan -> %s", args.out)
