"""Timing an experiment at a candidate input size, before preprocess (``budget.sizes``).

:mod:`segflow.model.resolution_plan` needs each experiment's timings at sizes that no preprocess run
has produced yet. Step time does not depend on pixel content, so this module writes random
arrays of the candidate size (a temporary preprocess folder: images, masks, index and stats,
and a two-fold ``folds.csv``) and times them with
:func:`segflow.model.budget_measure.measure_experiment`, the code the budget plan uses: the same
trainer, loaders, validation, checkpoint and prediction (whose way back to the original size
is a crop in pad mode, a resize otherwise).

It also holds the ``segflow plan-resolution`` command (:func:`add_arguments`, :func:`run`).
Like :mod:`segflow.model.budget_measure` it is left out of the ``plan-resolution`` code
fingerprint (:data:`segflow.stages.STAGES` starts it from :mod:`segflow.model.resolution_plan`):
editing how time is measured does not choose again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.artifacts.resolution import pad_columns
from segflow.artifacts.tables import read_table
from segflow.core.atomic import write_json
from segflow.core.devices import compute, resolve_device
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace
from segflow.core.stage_args import stage_log, stage_provenance, with_provenance
from segflow.formats.labels import label_dtype
from segflow.model import budget_measure
from segflow.model.budget import BudgetOptions, Measurement
from segflow.model.budget_measure import (
    TIMED_BATCHES,
    add_planning_arguments,
    measure_experiment,
    planning_inputs,
)
from segflow.model.datasets import SegmentationArrays
from segflow.model.experiment import Experiment
from segflow.model.inference.predict import PredictOptions
from segflow.model.resolution_plan import Candidate, ResolutionOptions, plan_resolution


def write_random_arrays(
    out_dir: Path,
    candidate: Candidate,
    original: tuple[int, int],
    channels: int,
    n_classes: int,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
) -> Path:
    """A preprocess folder of random uint8 images and masks at the candidate size, and a
    ``folds.csv`` whose fold 0 holds the ``n_val`` validation items.

    Args:
        out_dir: the folder to write.
        candidate: the size (and mode: pad rows get their offsets in the index).
        original: the originals' (height, width), recorded as ``orig_height``/``orig_width``.
        channels: image channels.
        n_classes: label classes (the mask dtype).
        n_train, n_val, n_test: items of each kind.
        seed: the random generator's seed.

    Returns:
        The path of ``folds.csv``.
    """
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_labelled = n_train + n_val
    shape = (candidate.height, candidate.width)
    np.save(
        out_dir / "train_images.npy",
        rng.integers(0, 256, (n_labelled, *shape, channels), dtype=np.uint8),
    )
    masks = rng.integers(0, 2**n_classes, (n_labelled, *shape), dtype=np.int64)
    np.save(out_dir / "train_masks.npy", masks.astype(label_dtype(n_classes)))
    np.save(
        out_dir / "test_images.npy",
        rng.integers(0, 256, (n_test, *shape, channels), dtype=np.uint8),
    )
    ids = [f"t{i:05d}" for i in range(n_labelled)] + [f"x{i:05d}" for i in range(n_test)]
    index = pd.DataFrame(
        {
            "id": ids,
            "split": ["train"] * n_labelled + ["test"] * n_test,
            "row": list(range(n_labelled)) + list(range(n_test)),
            "orig_height": original[0],
            "orig_width": original[1],
        }
    )
    if candidate.mode == "pad":
        index = index.assign(**pad_columns([original] * len(index), shape, ids))
    index.to_parquet(out_dir / "index.parquet", index=False)
    stats = {
        "n_train": n_labelled,
        "n_test": n_test,
        "height": candidate.height,
        "width": candidate.width,
        "channels": channels,
        "dtype": "uint8",
        "train_mean": [0.5] * channels,
        "train_std": [0.29] * channels,
        "classes": ["mask"] if n_classes == 1 else [f"class{k}" for k in range(n_classes)],
    }
    (out_dir / "stats.json").write_text(json.dumps(stats))
    folds = out_dir / "folds.csv"
    pd.DataFrame(
        {"id": ids[:n_labelled], "fold": [1] * n_train + [0] * n_val},
    ).to_csv(folds, index=False)
    return folds


def measure_at_size(
    experiment: Experiment,
    candidate: Candidate,
    channels: int,
    n_classes: int,
    original: tuple[int, int],
    predict: PredictOptions,
    measure_steps: int,
    predict_threads: int,
    startup_seconds: float,
) -> Measurement:
    """Time one experiment at the candidate size on random arrays.

    Args:
        experiment: the parsed experiment.
        candidate: the size and mode.
        channels: image channels (as preprocess will write them).
        n_classes: label classes.
        original: the originals' (height, width) (the prediction's way back).
        predict: the ``predict`` options.
        measure_steps: optimizer steps timed, after as many untimed ones.
        predict_threads: torch threads of the prediction jobs.
        startup_seconds: a job's start-up.

    Returns:
        The experiment's :class:`~segflow.model.budget.Measurement` at that size.
    """
    batch = experiment.train.batch_size
    with tempfile.TemporaryDirectory(prefix="segflow-resolution-") as tmp:
        folds = write_random_arrays(
            Path(tmp),
            candidate,
            original,
            channels,
            n_classes,
            n_train=2 * batch + 1,  # more than a batch: the loader drops the last partial one
            # The prediction is timed on these too (the plan never reads the test set).
            n_val=max(batch, predict.batch_size) * (TIMED_BATCHES + 1),
            n_test=0,
        )
        return measure_experiment(
            SegmentationArrays.open(tmp),
            folds,
            experiment,
            predict,
            measure_steps,
            predict_threads,
            startup_seconds,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow plan-resolution``'s flags."""
    add_dataclass_arguments(parser, BudgetOptions)
    parser.add_argument("--manifest", required=True, help="train manifest Parquet from ingest")
    parser.add_argument("--folds", required=True, help="folds.csv")
    parser.add_argument(
        "--sizes",
        required=True,
        help='budget.sizes as JSON: [[h, w], {"height": h, "width": w, "mode": "pad"}]',
    )
    parser.add_argument(
        "--resize-mode", default="resize", help="preprocess.resize_mode (candidates without mode)"
    )
    parser.add_argument("--channels", default="auto", help="preprocess.channels")
    add_planning_arguments(parser, "resolution.json to write")


def run(args: argparse.Namespace) -> None:
    """``segflow plan-resolution``: time each experiment at each candidate size here, write
    the choice (``resolution.json``)."""
    with compute(args):
        _plan_resolution_command(args)


def _plan_resolution_command(args: argparse.Namespace) -> None:
    budget = dataclass_from_namespace(BudgetOptions, args)
    try:
        sizes = json.loads(args.sizes)
    except json.JSONDecodeError as error:
        raise SegflowError(f"--sizes is not valid JSON ({error})") from None
    options = ResolutionOptions(sizes=sizes, min_fold_steps=args.min_fold_steps)
    experiments, predict = planning_inputs(args)
    threads = max(1, args.threads)
    predict_threads = max(1, min(args.predict_threads, threads))
    # What every job pays before it works, timed once per process and device (through the
    # module: tests replace the timing).
    startups: dict[str, float] = {}

    def measure(name, experiment, candidate, channels, n_classes, original):
        device = resolve_device(experiment.train.device)
        if "process" not in startups:
            startups["process"] = budget_measure.process_startup_seconds()
        if str(device) not in startups:
            startups[str(device)] = budget_measure.device_startup_seconds(device)
        stage_log.info("resolution: timing %s at %s on %s", name, candidate.label, device)
        return measure_at_size(
            experiment,
            candidate,
            channels,
            n_classes,
            original,
            predict,
            budget.measure_steps,
            predict_threads,
            startups["process"] + startups[str(device)],
        )

    record = plan_resolution(
        read_table(args.manifest, "manifest"),
        args.folds,
        experiments,
        budget,
        options,
        args.resize_mode,
        args.channels,
        measure,
        pseudo_rounds=args.pseudo_rounds,
        max_pseudo_share=args.max_pseudo_share,
        n_test=args.n_test,
        train_folds=args.train_folds,
        parallel_jobs=budget.parallel_jobs or max(1, args.gpus),
        machine=budget_measure.machine_description(
            resolve_device("auto"), threads, predict_threads
        ),
    )
    block = stage_provenance(
        {
            "budget": dataclasses.asdict(budget),
            "resolution": {"sizes": sizes, "min_fold_steps": options.min_fold_steps},
            "experiments": experiments,
            "predict": dataclasses.asdict(predict),
            "resize_mode": args.resize_mode,
            "channels": args.channels,
            "pseudo_rounds": args.pseudo_rounds,
            "max_pseudo_share": args.max_pseudo_share,
            "n_test": args.n_test,
            # Only when set: a run with every fold keeps its record as it was.
            **({} if args.train_folds is None else {"train_folds": args.train_folds}),
        }
    )
    write_json(args.out, with_provenance(record, block))
    stage_log.info("resolution choice -> %s", args.out)
