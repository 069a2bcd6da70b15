"""The ``segflow`` command line: one sub-command per pipeline stage.

The Snakemake rules call exactly these commands, so every stage can also be run by hand:

    segflow demo-data resources/demo
    segflow ingest --train-images ... --out-manifest results/ingest/manifest.parquet ...

A :class:`~segflow.errors.SegflowError` is printed as one ``segflow <stage>: error: ...`` line
with exit status 2; nothing is left half-written because every artifact is written atomically.
An ``OSError`` (disk full, permission denied) is printed the same way with exit status 1
(``--verbose`` adds its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from segflow import __version__
from segflow.atomic import (
    is_disk_full,
    write_csv,
    write_json,
    write_npy,
    write_parquet,
    write_text,
)
from segflow.errors import SegflowError
from segflow.imageio import DicomWindow
from segflow.options import add_dataclass_arguments, dataclass_from_namespace
from segflow.provenance import PROVENANCE_KEY, stage_provenance, with_provenance

log = logging.getLogger("segflow")

Handler = Callable[[argparse.Namespace], None]


def read_table(path: str, role: str) -> pd.DataFrame:
    """Read a Parquet artifact of an earlier stage, with a clear error if it is not there."""
    if not Path(path).is_file():
        raise SegflowError(f"{role} {path} does not exist (run the earlier stage first)")
    try:
        return pd.read_parquet(path)
    except Exception as error:
        raise SegflowError(f"{role} {path} is not a readable Parquet file ({error})") from None


def _add_stage_tables(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    parser.add_argument("--dedup-items", required=True, help="items Parquet from dedup")


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")


def _add_dicom_window(parser: argparse.ArgumentParser) -> None:
    default = DicomWindow()
    parser.add_argument(
        "--dicom-window-center",
        type=float,
        default=default.center,
        help=f"DICOM window centre in HU (default: {default.center})",
    )
    parser.add_argument(
        "--dicom-window-width",
        type=float,
        default=default.width,
        help=f"DICOM window width in HU (default: {default.width})",
    )


def _dicom_window(args: argparse.Namespace) -> DicomWindow:
    return DicomWindow(args.dicom_window_center, args.dicom_window_width)


def _run_demo_data(args: argparse.Namespace) -> None:
    from segflow.demo_data import DemoDataOptions, generate_demo_data

    truth = generate_demo_data(args.out_dir, dataclass_from_namespace(DemoDataOptions, args))
    log.info(
        "demo dataset written to %s (%d train, %d test images)",
        args.out_dir,
        truth["n_train"],
        truth["n_test"],
    )


def _run_ingest(args: argparse.Namespace) -> None:
    from segflow.ingest import IngestOptions, ingest

    options = dataclass_from_namespace(IngestOptions, args)
    manifest, summary = ingest(options, workers=args.workers)
    write_parquet(args.out_manifest, manifest, keep_attrs=True)  # its data roots
    write_json(args.out_summary, with_provenance(summary, stage_provenance(options)))
    log.info(
        "manifest: %d train + %d test items -> %s",
        summary["n_train"],
        summary["n_test"],
        args.out_manifest,
    )


def _run_dedup(args: argparse.Namespace) -> None:
    from segflow.dedup import DedupOptions, find_duplicates, summary_markdown

    manifest = read_table(args.manifest, "manifest")
    options = dataclass_from_namespace(DedupOptions, args)
    items, summary = find_duplicates(manifest, options)
    write_parquet(args.out_items, items)
    write_json(args.out_summary, with_provenance(summary, stage_provenance(options)))
    write_text(args.out_report, summary_markdown(summary))
    log.info(
        "%d duplicate groups with %d members; %d conflicting",
        summary["n_groups"],
        summary["n_members"],
        summary["conflicting_groups"],
    )


def _run_preprocess(args: argparse.Namespace) -> None:
    import dataclasses

    from segflow.preprocess import PreprocessOptions, preprocess

    options = dataclass_from_namespace(PreprocessOptions, args)
    if args.resolution:
        from segflow.resolution_plan import read_resolution

        height, width, mode = read_resolution(args.resolution)
        log.info("resolution %s: %dx%d (%s)", args.resolution, height, width, mode)
        options = dataclasses.replace(options, height=height, width=width, resize_mode=mode)
    stats = preprocess(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        options,
        args.out_dir,
        workers=args.workers,
        dicom_window=_dicom_window(args),
    )
    log.info(
        "preprocessed %d train + %d test images to %dx%dx%d %s in %s",
        stats["n_train"],
        stats["n_test"],
        stats["height"],
        stats["width"],
        stats["channels"],
        stats["dtype"],
        args.out_dir,
    )


def _run_folds(args: argparse.Namespace) -> None:
    from segflow.folds import FoldOptions, make_folds

    options = dataclass_from_namespace(FoldOptions, args)
    folds, summary = make_folds(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        options,
    )
    write_csv(args.out_folds, folds)
    write_json(
        args.out_summary, with_provenance(summary, stage_provenance(options, seed=options.seed))
    )
    log.info(
        "%d items in %d folds: %s per fold",
        summary["n_items"],
        summary["n_folds"],
        summary["items_per_fold"],
    )


@contextlib.contextmanager
def _compute(args: argparse.Namespace) -> Iterator[None]:
    """Pin torch to the job's threads and, on a multi-GPU machine, to a GPU of its own.

    The GPU slot must be taken before anything initialises CUDA in this process.
    """
    import torch

    torch.set_num_threads(max(1, args.threads))
    if not args.gpus:
        yield
        return
    from segflow.devices import acquire_gpu, default_gpu_lock_dir

    lock_dir = args.gpu_lock_dir or default_gpu_lock_dir()
    with acquire_gpu(lock_dir, args.gpus, timeout_s=args.gpu_timeout) as lease:
        log.info("using GPU slot %s (%s)", lease.index, lease.device)
        yield


def _add_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stats", required=True, help="preprocess's stats.json (the class names, in bit order)"
    )


def _add_compute(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs on this machine (0: none)")
    parser.add_argument(
        "--gpu-lock-dir",
        default=None,
        help="folder of this machine's GPU slot locks, on local disk "
        "(default: $SEGFLOW_GPU_LOCK_DIR, else <tmp>/segflow-gpu-locks-<uid>)",
    )
    parser.add_argument(
        "--gpu-timeout", type=float, default=24 * 3600.0, help="seconds to wait for a free GPU"
    )


def _run_train(args: argparse.Namespace) -> None:
    with _compute(args):
        _train(args)


def _train(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from segflow.experiment import load_experiment_values, parse_experiment
    from segflow.train import train_fold, train_full

    stats = json.loads((Path(args.arrays_dir) / "stats.json").read_text())
    values = load_experiment_values(args.experiment)
    experiment = parse_experiment(
        args.name,
        values,
        in_channels=int(stats["channels"]),
        classes=len(stats.get("classes", ["mask"])),
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
    common = {
        "ohem_fraction": experiment.ohem_fraction,
        "pseudo_dir": args.pseudo_dir,
        "max_pseudo_share": args.max_pseudo_share,
        "pseudo_weight": args.pseudo_weight,
        "init_checkpoint": args.init_checkpoint,
    }
    model_args = (experiment.model, experiment.loss, experiment.augment, experiment.train)
    if args.refit_from is not None:
        result = train_full(
            args.arrays_dir,
            args.folds,
            args.refit_from,
            *model_args,
            args.out_dir,
            args.resume_dir,
            epochs=refit_epochs,
            **common,
        )
        log.info("full refit trained: %s", result)
        return
    result = train_fold(
        args.arrays_dir,
        args.folds,
        args.fold,
        *model_args,
        args.out_dir,
        args.resume_dir,
        **common,
    )
    log.info("fold %d trained: %s", args.fold, result)


def _planned_epochs(experiment, values: dict, args: argparse.Namespace) -> int:
    """The budget plan's epochs for this training (a fold, or with --refit-from the full
    refit), replacing train.epochs (a refit: the median of its folds' best epochs)."""
    from segflow.budget import REFIT, planned_epochs, read_plan

    member = REFIT if args.refit_from is not None else args.fold
    epochs = planned_epochs(
        read_plan(args.plan), args.name, args.round, member, values, where=args.plan
    )
    train = experiment.train
    log.info(
        "budget plan %s: %d epoch(s) for %s round %d %s (train.epochs: %d)",
        args.plan,
        epochs,
        args.name,
        args.round,
        "full refit" if member == REFIT else f"fold {member}",
        train.epochs,
    )
    if epochs <= train.warmup_epochs:
        log.warning(
            "the plan's %d epoch(s) do not outlast train.warmup_epochs = %d: the learning rate "
            "never decays",
            epochs,
            train.warmup_epochs,
        )
    return epochs


def _json_mapping(text: str, flag: str) -> dict:
    """A JSON object given on the command line."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SegflowError(f"{flag} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise SegflowError(f"{flag} must be a JSON mapping")
    return value


def _run_plan_budget(args: argparse.Namespace) -> None:
    with _compute(args):
        _plan_budget(args)


def _plan_budget(args: argparse.Namespace) -> None:
    import dataclasses

    from segflow.budget import BudgetOptions, plan_budget
    from segflow.budget_measure import (
        device_startup_seconds,
        machine_description,
        measure_experiment,
        process_startup_seconds,
    )
    from segflow.datasets import SegmentationArrays
    from segflow.devices import resolve_device
    from segflow.predict import PredictOptions

    options = dataclass_from_namespace(BudgetOptions, args)
    if options.minutes is None:
        raise SegflowError("budget.minutes is null: the budget is off, there is nothing to plan")
    experiments = _json_mapping(args.experiments, "--experiments")
    if not all(isinstance(values, dict) for values in experiments.values()):
        raise SegflowError("--experiments must map each experiment name to its mapping")
    predict_values = _json_mapping(args.predict, "--predict")
    known = {field.name for field in dataclasses.fields(PredictOptions)}
    unknown = sorted(set(predict_values) - known)
    if unknown:
        raise SegflowError(f"unknown key predict.{unknown[0]}; valid: {', '.join(sorted(known))}")
    predict = PredictOptions(**predict_values)
    arrays = SegmentationArrays.open(args.arrays_dir)
    threads = max(1, args.threads)
    predict_threads = max(1, min(args.predict_threads, threads))
    # What every job pays before it works: the interpreter, imports and the device (timed
    # within plan_budget, whose time counts against the budget).
    startups: dict[str, float] = {}

    def measure(name, experiment):
        device = resolve_device(experiment.train.device)
        if "process" not in startups:
            startups["process"] = process_startup_seconds()
        if str(device) not in startups:  # measurable once per process and device
            startups[str(device)] = device_startup_seconds(device)
        log.info("budget: timing %s on %s", name, device)
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
        }
    )
    write_json(args.out, with_provenance(plan, block))
    log.info("budget plan -> %s", args.out)


def _run_plan_resolution(args: argparse.Namespace) -> None:
    with _compute(args):
        _plan_resolution(args)


def _plan_resolution(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from segflow.budget import BudgetOptions
    from segflow.budget_measure import (
        device_startup_seconds,
        machine_description,
        process_startup_seconds,
    )
    from segflow.devices import resolve_device
    from segflow.predict import PredictOptions
    from segflow.resolution_measure import measure_at_size
    from segflow.resolution_plan import ResolutionOptions, plan_resolution

    budget = dataclass_from_namespace(BudgetOptions, args)
    try:
        sizes = json.loads(args.sizes)
    except json.JSONDecodeError as error:
        raise SegflowError(f"--sizes is not valid JSON ({error})") from None
    options = ResolutionOptions(sizes=sizes, min_fold_steps=args.min_fold_steps)
    experiments = _json_mapping(args.experiments, "--experiments")
    if not all(isinstance(values, dict) for values in experiments.values()):
        raise SegflowError("--experiments must map each experiment name to its mapping")
    predict_values = _json_mapping(args.predict, "--predict")
    known = {field.name for field in dataclasses.fields(PredictOptions)}
    unknown = sorted(set(predict_values) - known)
    if unknown:
        raise SegflowError(f"unknown key predict.{unknown[0]}; valid: {', '.join(sorted(known))}")
    predict = PredictOptions(**predict_values)
    threads = max(1, args.threads)
    predict_threads = max(1, min(args.predict_threads, threads))
    startups: dict[str, float] = {}

    def measure(name, experiment, candidate, channels, n_classes, original):
        device = resolve_device(experiment.train.device)
        if "process" not in startups:
            startups["process"] = process_startup_seconds()
        if str(device) not in startups:
            startups[str(device)] = device_startup_seconds(device)
        log.info("resolution: timing %s at %s on %s", name, candidate.label, device)
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
        parallel_jobs=budget.parallel_jobs or max(1, args.gpus),
        machine=machine_description(resolve_device("auto"), threads, predict_threads),
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
        }
    )
    write_json(args.out, with_provenance(record, block))
    log.info("resolution choice -> %s", args.out)


def _predict_options(args: argparse.Namespace):
    from segflow.predict import PredictOptions

    return dataclass_from_namespace(PredictOptions, args)


def _run_predict(args: argparse.Namespace) -> None:
    from segflow.predict import predict_split, write_prediction

    split = "train" if args.command == "predict-oof" else "test"
    with _compute(args):
        ids, probs = predict_split(
            args.arrays_dir, args.model, split, _predict_options(args), args.fold, args.folds
        )
    write_prediction(args.out_dir, ids, probs)
    log.info("%s: %d predictions at %s", args.command, len(ids), probs.shape[1:])


def _classes(stats_path: str) -> tuple[list[str], bool]:
    """(class names in bit order, multi-label?) from preprocess's stats.json."""
    import json

    path = Path(stats_path)
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run preprocess first)")
    stats = json.loads(path.read_text())
    return list(stats.get("classes", ["mask"])), bool(stats.get("multilabel", False))


def _run_evaluate_oof(args: argparse.Namespace) -> None:
    import numpy as np

    from segflow.evaluate import assemble_oof, original_truths, score_oof

    classes, _ = _classes(args.stats)
    ids, probs = assemble_oof(args.fold_dirs)
    folds = pd.read_csv(args.folds, dtype={"id": str}).set_index("id")
    manifest = read_table(args.manifest, "manifest")
    truths = original_truths(
        manifest, read_table(args.dedup_items, "dedup items"), ids["id"], len(classes)
    )
    table, summary = score_oof(probs, truths, folds.loc[ids["id"], "fold"].to_numpy(), classes)
    out = Path(args.out_dir)
    write_npy(out / "oof_probs.npy", probs.astype(np.float16))
    write_csv(out / "oof_ids.csv", ids.assign(fold=folds.loc[ids["id"], "fold"].to_numpy()))
    write_csv(out / "metrics.csv", table)
    # No options and no randomness: the metrics follow from the fold predictions alone.
    write_json(out / "metrics.json", with_provenance(summary, stage_provenance({})))
    log.info(
        "OOF %s: kaggle %.4f, dice %.4f, iou %.4f (all-empty baseline kaggle %.4f)",
        args.out_dir,
        summary["kaggle"],
        summary["dice"],
        summary["iou"],
        summary["all_empty_baseline_kaggle"],
    )


def _run_tune_postprocess(args: argparse.Namespace) -> None:
    import numpy as np

    from segflow.evaluate import original_truths
    from segflow.postprocess import tune_classes
    from segflow.predict import nonempty_probs

    classes, _ = _classes(args.stats)
    oof_dir = Path(args.oof_dir)
    ids = pd.read_csv(oof_dir / "oof_ids.csv", dtype={"id": str})
    probs = np.load(oof_dir / "oof_probs.npy", mmap_mode="r")
    truths = original_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        ids["id"],
        len(classes),
    )
    _, grid, summary = tune_classes(
        probs,
        truths,
        classes,
        args.thresholds,
        args.min_areas,
        args.fill_holes_options,
        args.metric,
        nonempty_probs(ids, len(classes)),
        args.gates,
    )
    write_csv(Path(args.out_dir) / "grid.csv", grid)
    grid_options = {
        "thresholds": args.thresholds,
        "min_areas": args.min_areas,
        "fill_holes_options": args.fill_holes_options,
        "gates": args.gates,
        "metric": args.metric,
    }
    write_json(
        Path(args.out_dir) / "params.json",
        with_provenance(summary, stage_provenance(grid_options)),
    )
    for record in summary["classes"]:
        log.info("best post-processing of %s: %s", record["class"], record)


def _run_submit(args: argparse.Namespace) -> None:
    import json

    import numpy as np

    from segflow.postprocess import apply_classes, params_from_summary
    from segflow.predict import merge_folds, nonempty_probs
    from segflow.submission import (
        SubmissionOptions,
        known_test_labels,
        submission_frame,
        write_submission,
        written_ids,
    )

    classes, multilabel = _classes(args.stats)
    options = dataclass_from_namespace(SubmissionOptions, args)
    fold_ids = [pd.read_csv(Path(d) / "ids.csv", dtype={"id": str}) for d in args.fold_dirs]
    if any(not ids["id"].equals(fold_ids[0]["id"]) for ids in fold_ids):
        raise SegflowError("test predictions of the folds are not in the same id order")
    probs = merge_folds([np.load(Path(d) / "probs.npy") for d in args.fold_dirs], args.fold_merge)
    gates = [nonempty_probs(ids, len(classes)) for ids in fold_ids]
    nonempty = None if any(g is None for g in gates) else np.mean(gates, axis=0)
    params = params_from_summary(json.loads(Path(args.postprocess).read_text()), classes)
    masks = apply_classes(probs, params, nonempty)
    manifest = read_table(args.manifest, "manifest")
    known = known_test_labels(manifest, read_table(args.dedup_items, "dedup items"), len(classes))
    # Binary data keeps the two-column format: one (H, W) mask per id, no class column.
    predictions = dict(zip(fold_ids[0]["id"], masks if multilabel else masks[:, 0], strict=True))
    id_names = written_ids(manifest, predictions, options.id_style)  # stems or file names
    frame = submission_frame(predictions, options, known, classes if multilabel else None, id_names)
    write_submission(args.out, frame)
    copied = len(set(known) & set(fold_ids[0]["id"])) if options.copy_train_labels else 0
    log.info(
        "submission %s: %d rows, %d labels copied from train duplicates",
        args.out,
        len(frame),
        copied,
    )


def _grouped(dirs: Sequence[str], groups: int, what: str) -> list[list[str]]:
    """Split experiment-major folder lists (``--test-dirs``) into one list per experiment.

    In the results layout (``test/<name>/round<r>/fold<k>`` and ``.../full``) consecutive
    folders with the same parent are one experiment's, so experiments may bring different
    counts (a full refit's one folder, or the folds' and the refit's); folders outside that
    layout are split evenly.
    """
    runs: list[list[str]] = []
    for directory in dirs:
        if runs and Path(runs[-1][-1]).parent == Path(directory).parent:
            runs[-1].append(directory)
        else:
            runs.append([directory])
    if len(runs) == groups:
        return runs
    if len(dirs) % groups:
        raise SegflowError(f"{len(dirs)} {what} do not split into {groups} experiments")
    size = len(dirs) // groups
    return [list(dirs[i * size : (i + 1) * size]) for i in range(groups)]


def _run_blend(args: argparse.Namespace) -> None:

    from segflow.second_level import (
        load_oof,
        load_test,
        oof_truths,
        run_blend,
        write_candidate,
    )

    classes, _ = _classes(args.stats)
    if len(args.oof_dirs) != len(args.names):
        raise SegflowError(f"{len(args.names)} names but {len(args.oof_dirs)} OOF folders")
    oof = [load_oof(d) for d in args.oof_dirs]
    test = [
        load_test(dirs, args.fold_merge)
        for dirs in _grouped(args.test_dirs, len(args.names), "test folders")
    ]
    folds = pd.read_csv(args.folds, dtype={"id": str})
    truths = oof_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        oof[0].ids["id"],
        len(classes),
    )
    blended_oof, blended_test, summary, table = run_blend(
        args.names, oof, test, truths, folds, classes, args.metric, args.step
    )
    block = stage_provenance(
        {
            "names": args.names,
            "n_folds": args.n_folds,
            "fold_merge": args.fold_merge,
            "metric": args.metric,
            "step": args.step,
        }
    )
    metrics = write_candidate(
        Path(args.out_oof).parent,
        Path(args.out_test).parent,
        blended_oof,
        blended_test,
        folds,
        truths,
        classes,
        {"weights": summary["weights"], PROVENANCE_KEY: block},
    )
    write_json(args.out_weights, with_provenance(summary, block))
    write_csv(Path(args.out_weights).with_name("table.csv"), table)
    log.info("ensemble weights %s: OOF kaggle %.4f", summary["weights"], metrics["kaggle"])


def _run_select_pseudo(args: argparse.Namespace) -> None:
    import json

    from segflow.pseudo import PseudoOptions
    from segflow.resolution import PAD_COLUMNS, index_offsets
    from segflow.second_level import load_test, select_pseudo_stage

    options = dataclass_from_namespace(PseudoOptions, args)
    stats_path = Path(args.arrays_dir) / "stats.json"
    classes, _ = _classes(str(stats_path))
    stats = json.loads(stats_path.read_text())
    index = read_table(str(Path(args.arrays_dir) / "index.parquet"), "preprocessed index")
    test_rows = index[index["split"] == "test"]
    # Pad mode: the targets are reflect-padded as the test images were.
    offsets = (
        dict(zip(test_rows["id"], index_offsets(test_rows), strict=True))
        if set(PAD_COLUMNS) <= set(index.columns)
        else None
    )
    selection, targets, summary = select_pseudo_stage(
        load_test([args.test_dir], "mean"),
        json.loads(Path(args.postprocess).read_text()),
        classes,
        read_table(args.dedup_items, "dedup items"),
        options,
        (int(stats["height"]), int(stats["width"])),
        offsets,
    )
    out = Path(args.out_dir)
    write_npy(out / "targets.npy", targets)
    write_csv(out / "selection.csv", selection)
    write_json(
        out / "summary.json",
        with_provenance({**summary, "source": args.test_dir}, stage_provenance(options)),
    )
    log.info("pseudo-labels: %d of %d test images selected", summary["n_selected"], len(selection))


def _run_stack(args: argparse.Namespace) -> None:
    from segflow.second_level import load_oof, load_test, oof_truths
    from segflow.stack_stage import StackOptions, load_stack_inputs, run_stack

    options = dataclass_from_namespace(StackOptions, args)
    classes, _ = _classes(str(Path(args.arrays_dir) / "stats.json"))
    if len(args.oof_dirs) != len(args.names):
        raise SegflowError(f"{len(args.names)} names but {len(args.oof_dirs)} OOF folders")
    manifest = read_table(args.manifest, "manifest")
    base_oof = load_oof(args.base_oof_dir)
    inputs = load_stack_inputs(
        args.names,
        [load_oof(d) for d in args.oof_dirs],
        [
            load_test(dirs, args.fold_merge)
            for dirs in _grouped(args.test_dirs, len(args.names), "test folders")
        ],
        base_oof,
        load_test([args.base_test_dir], "mean"),
        oof_truths(
            manifest, read_table(args.dedup_items, "dedup items"), base_oof.ids["id"], len(classes)
        ),
        pd.read_csv(args.folds, dtype={"id": str}),
        classes,
        args.arrays_dir,
        manifest,
    )
    round_dir = Path(args.base_oof_dir).name
    results = Path(args.base_oof_dir).parent.parent.parent
    candidate_dirs = {
        name: (results / "oof" / name / round_dir, results / "test" / name / round_dir)
        for name in ("stack_gate", "stack_pixel")
    }
    summary = run_stack(inputs, options, args.out_dir, candidate_dirs)
    log.info("stacking: %s", summary["candidates"])


def _run_choose(args: argparse.Namespace) -> None:
    import shutil

    from segflow.atomic import atomic_path
    from segflow.second_level import (
        choose_candidate,
        constant_baselines,
        markdown_table,
        stage_table,
    )

    pairs = []
    for text in args.candidates:
        name, _, round_ = text.partition(":")
        pairs.append((name, int(round_ or 0)))
    results = Path(args.results_dir)
    table = constant_baselines(stage_table(pairs, results), results)
    chosen = choose_candidate(table, args.force)
    source = (
        results / "submission" / chosen["candidate"] / f"round{chosen['round']}" / "submission.csv"
    )
    out = Path(args.out_dir)
    with atomic_path(out / "submission.csv") as tmp:
        shutil.copyfile(source, tmp)
    table["chosen"] = (table["candidate"] == chosen["candidate"]) & (
        table["round"] == chosen["round"]
    )
    write_csv(out / "stages.csv", table)
    write_text(out / "stages.md", markdown_table(table))
    choice = {
        "candidate": chosen["candidate"],
        "round": int(chosen["round"]),
        "stage": chosen["stage"],
        "metric": chosen["tuned_metric"],
        "tuned_oof_score": float(chosen["tuned"]),
        "delta_vs_best_single": float(chosen["delta_tuned"]),
        "reason": f"forced by submit_experiment {args.force}"
        if args.force
        else "best tuned OOF score",
        "submission": str(source),
    }
    block = stage_provenance({"candidates": args.candidates, "force": args.force})
    write_json(out / "choice.json", with_provenance(choice, block))
    log.info(
        "final submission: %s round %d (%s)", choice["candidate"], choice["round"], choice["reason"]
    )


def _run_summary(args: argparse.Namespace) -> None:
    from segflow.report import results_summary

    print(results_summary(args.results_dir))


def _run_report(args: argparse.Namespace) -> None:
    from segflow.html_report import write_report

    write_report(args.results_dir, args.out, _dicom_window(args), args.title)
    log.info("report %s", args.out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    from segflow.budget import BudgetOptions
    from segflow.dedup import DedupOptions
    from segflow.demo_data import DemoDataOptions
    from segflow.folds import FoldOptions
    from segflow.ingest import IngestOptions
    from segflow.predict import PredictOptions
    from segflow.preprocess import PreprocessOptions
    from segflow.pseudo import PseudoOptions
    from segflow.stack_stage import StackOptions
    from segflow.submission import SubmissionOptions

    parser = argparse.ArgumentParser(prog="segflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"segflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Handler, help_text: str, options: type | None = None
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if options is not None:
            add_dataclass_arguments(sub, options)
        return sub

    demo = command(
        "demo-data", _run_demo_data, "write the seeded synthetic demo dataset", DemoDataOptions
    )
    demo.add_argument("out_dir", help="output folder (Kaggle layout)")

    ingest = command(
        "ingest", _run_ingest, "list, decode and validate all items into a manifest", IngestOptions
    )
    ingest.add_argument("--out-manifest", required=True, help="manifest Parquet to write")
    ingest.add_argument("--out-summary", required=True, help="summary JSON to write")
    _add_workers(ingest)

    dedup = command(
        "dedup", _run_dedup, "group duplicates and resolve mask conflicts", DedupOptions
    )
    dedup.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    dedup.add_argument("--out-items", required=True, help="per-item dedup Parquet to write")
    dedup.add_argument("--out-summary", required=True, help="summary JSON to write")
    dedup.add_argument("--out-report", required=True, help="summary Markdown to write")

    prep = command(
        "preprocess", _run_preprocess, "CLAHE/resize into memory-mappable arrays", PreprocessOptions
    )
    _add_stage_tables(prep)
    prep.add_argument(
        "--out-dir", required=True, help="folder for the .npy arrays, index and stats"
    )
    prep.add_argument(
        "--resolution",
        default=None,
        help="resolution.json (segflow plan-resolution): its chosen size and mode replace "
        "--height, --width and --resize-mode",
    )
    _add_workers(prep)
    _add_dicom_window(prep)

    folds = command("folds", _run_folds, "assign stratified, duplicate-grouped folds", FoldOptions)
    _add_stage_tables(folds)
    folds.add_argument("--out-folds", required=True, help="folds CSV to write")
    folds.add_argument("--out-summary", required=True, help="summary JSON to write")

    train = command("train", _run_train, "train one fold of one experiment (resumable)")
    train.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    train.add_argument("--folds", required=True, help="folds.csv")
    train.add_argument("--fold", type=int, default=None, help="the validation fold")
    train.add_argument(
        "--refit-from",
        nargs="+",
        default=None,
        metavar="METRICS_JSON",
        help="instead of --fold: refit on every item of --folds for the median best epoch of "
        "these folds' metrics.json, or with --plan the plan's epochs (no validation)",
    )
    train.add_argument("--name", default="experiment", help="experiment name (for messages)")
    train.add_argument(
        "--experiment", required=True, help="experiment as inline JSON or a JSON/YAML file"
    )
    train.add_argument("--out-dir", required=True, help="folder for model.pt, history, metrics")
    train.add_argument("--resume-dir", required=True, help="resume checkpoint folder")
    train.add_argument(
        "--pseudo-dir", default=None, help="a pseudo-labelling round's select-pseudo output"
    )
    train.add_argument(
        "--max-pseudo-share", type=float, default=0.3, help="cap on pseudo-labelled draws"
    )
    train.add_argument(
        "--pseudo-weight", type=float, default=1.0, help="loss weight of pseudo-labelled images"
    )
    train.add_argument(
        "--plan",
        default=None,
        help="a time budget's plan.json (segflow plan-budget): its epochs replace train.epochs "
        "(with --refit-from: the folds' median best epoch)",
    )
    train.add_argument(
        "--round", type=int, default=0, help="the pseudo-labelling round (looked up in --plan)"
    )
    train.add_argument(
        "--init-checkpoint",
        default=None,
        help="model.pt to start from (the stage named by the experiment's train.init_from)",
    )
    _add_compute(train)

    plan = command(
        "plan-budget",
        _run_plan_budget,
        "time each experiment here; plan epochs that fit the time budget",
        BudgetOptions,
    )
    plan.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    plan.add_argument("--folds", required=True, help="folds.csv")
    plan.add_argument(
        "--experiments", required=True, help="JSON mapping of experiment name -> experiment"
    )
    plan.add_argument("--predict", default="{}", help="the predict section as JSON (TTA, ...)")
    plan.add_argument("--pseudo-rounds", type=int, default=0, help="pseudo-labelling rounds")
    plan.add_argument(
        "--max-pseudo-share", type=float, default=0.3, help="cap on pseudo-labelled draws"
    )
    plan.add_argument(
        "--predict-threads", type=int, default=2, help="CPU threads of the prediction jobs"
    )
    plan.add_argument("--out", required=True, help="plan.json to write")
    _add_compute(plan)

    resolution = command(
        "plan-resolution",
        _run_plan_resolution,
        "time each experiment at each budget.sizes candidate; choose the input size",
        BudgetOptions,
    )
    resolution.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    resolution.add_argument("--folds", required=True, help="folds.csv")
    resolution.add_argument(
        "--sizes",
        required=True,
        help='budget.sizes as JSON: [[h, w], {"height": h, "width": w, "mode": "pad"}]',
    )
    resolution.add_argument(
        "--resize-mode", default="resize", help="preprocess.resize_mode (candidates without mode)"
    )
    resolution.add_argument("--channels", default="auto", help="preprocess.channels")
    resolution.add_argument(
        "--experiments", required=True, help="JSON mapping of experiment name -> experiment"
    )
    resolution.add_argument("--predict", default="{}", help="the predict section as JSON")
    resolution.add_argument("--pseudo-rounds", type=int, default=0, help="pseudo-labelling rounds")
    resolution.add_argument(
        "--max-pseudo-share", type=float, default=0.3, help="cap on pseudo-labelled draws"
    )
    resolution.add_argument(
        "--predict-threads", type=int, default=2, help="CPU threads of the prediction jobs"
    )
    resolution.add_argument("--out", required=True, help="resolution.json to write")
    _add_compute(resolution)

    for name, help_text in (
        ("predict-oof", "predict a fold model on its own validation fold"),
        ("predict-test", "predict a fold model on the test set"),
    ):
        sub = command(name, _run_predict, help_text, PredictOptions)
        sub.add_argument("--arrays-dir", required=True, help="preprocess output folder")
        sub.add_argument("--model", required=True, help="model.pt of the fold")
        sub.add_argument("--fold", type=int, default=None, help="the fold (predict-oof)")
        sub.add_argument("--folds", default=None, help="folds.csv (predict-oof)")
        sub.add_argument("--out-dir", required=True, help="folder for ids.csv and probs.npy")
        _add_compute(sub)

    evaluate = command("evaluate-oof", _run_evaluate_oof, "assemble and score the OOF predictions")
    evaluate.add_argument("--fold-dirs", nargs="+", required=True, help="predict-oof outputs")
    evaluate.add_argument("--folds", required=True, help="folds.csv")
    _add_stats(evaluate)
    _add_stage_tables(evaluate)
    evaluate.add_argument("--out-dir", required=True, help="folder for OOF arrays and metrics")

    tune = command("tune-postprocess", _run_tune_postprocess, "grid-search post-processing on OOF")
    tune.add_argument("--oof-dir", required=True, help="evaluate-oof output folder")
    _add_stats(tune)
    _add_stage_tables(tune)
    tune.add_argument("--thresholds", nargs="+", type=float, required=True)
    tune.add_argument("--min-areas", nargs="+", type=int, required=True)
    tune.add_argument(
        "--fill-holes-options", nargs="+", type=lambda t: t.lower() == "true", default=[False]
    )
    tune.add_argument(
        "--gates",
        nargs="*",
        type=float,
        default=[],
        help="aux-head non-empty probability gates to try (0, no gate, is always tried)",
    )
    tune.add_argument("--metric", default="kaggle", help="metric to maximise")
    tune.add_argument("--out-dir", required=True, help="folder for params.json and grid.csv")

    submit = command("submit", _run_submit, "write the Kaggle submission CSV", SubmissionOptions)
    submit.add_argument("--fold-dirs", nargs="+", required=True, help="predict-test outputs")
    submit.add_argument("--fold-merge", default="mean", choices=("mean", "gmean"))
    submit.add_argument("--postprocess", required=True, help="params.json from tune-postprocess")
    _add_stats(submit)
    _add_stage_tables(submit)
    submit.add_argument("--out", required=True, help="submission CSV to write")

    blend = command("blend", _run_blend, "tune the experiments' blend weights on OOF, apply them")
    blend.add_argument("--names", nargs="+", required=True, help="experiment names")
    blend.add_argument("--oof-dirs", nargs="+", required=True, help="evaluate-oof folders")
    blend.add_argument(
        "--test-dirs", nargs="+", required=True, help="predict-test folders, experiment-major"
    )
    blend.add_argument("--n-folds", type=int, required=True)
    blend.add_argument("--fold-merge", default="mean", choices=("mean", "gmean"))
    blend.add_argument("--metric", default="kaggle")
    blend.add_argument("--step", type=float, default=0.1, help="weight grid step")
    blend.add_argument("--folds", required=True, help="folds.csv")
    _add_stats(blend)
    _add_stage_tables(blend)
    blend.add_argument("--out-oof", required=True, help="blended oof_probs.npy to write")
    blend.add_argument("--out-test", required=True, help="blended test probs.npy to write")
    blend.add_argument("--out-weights", required=True, help="weights.json to write")

    pseudo = command(
        "select-pseudo",
        _run_select_pseudo,
        "select pseudo-labels for the next round",
        PseudoOptions,
    )
    pseudo.add_argument("--test-dir", required=True, help="the round's final test prediction")
    pseudo.add_argument("--postprocess", required=True, help="its tuned params.json")
    pseudo.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    pseudo.add_argument("--dedup-items", required=True, help="dedup items Parquet")
    pseudo.add_argument("--out-dir", required=True, help="selection.csv, targets.npy, summary")

    stack = command("stack", _run_stack, "fit the stacked gate and pixel blender", StackOptions)
    stack.add_argument("--names", nargs="+", required=True, help="experiment names")
    stack.add_argument("--oof-dirs", nargs="+", required=True, help="evaluate-oof folders")
    stack.add_argument(
        "--test-dirs", nargs="+", required=True, help="predict-test folders, experiment-major"
    )
    stack.add_argument("--n-folds", type=int, required=True)
    stack.add_argument("--fold-merge", default="mean", choices=("mean", "gmean"))
    stack.add_argument("--base-oof-dir", required=True, help="the ensemble's OOF folder")
    stack.add_argument("--base-test-dir", required=True, help="the ensemble's test folder")
    stack.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    stack.add_argument("--folds", required=True, help="folds.csv")
    _add_stage_tables(stack)
    stack.add_argument("--threads", type=int, default=1)
    stack.add_argument("--out-dir", required=True, help="artifacts folder")

    choose = command("choose", _run_choose, "pick the final submission on OOF; stage table")
    choose.add_argument("--candidates", nargs="+", required=True, help="name:round pairs")
    choose.add_argument("--results-dir", required=True)
    choose.add_argument("--force", default=None, help="name:round to submit regardless")
    choose.add_argument("--out-dir", required=True)

    summary = command("summary", _run_summary, "print what a workflow run produced")
    summary.add_argument("results_dir", help="the workflow's results folder")

    report = command("report", _run_report, "write the run's self-contained HTML report")
    report.add_argument("--results-dir", required=True, help="the workflow's results folder")
    report.add_argument("--title", default="segflow report", help="page title")
    _add_dicom_window(report)
    report.add_argument("--out", required=True, help="report.html to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segflow`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.handler(args)
    except SegflowError as error:
        print(f"segflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # The machine, not the input: say so in one line (the atomic writers left no partial
        # artifact behind); the traceback only helps a developer.
        log.debug("traceback of the error below", exc_info=True)
        hint = "; free some space and rerun" if is_disk_full(error) else ""
        message = " ".join(str(error).splitlines())  # pyarrow's messages span lines
        print(f"segflow {args.command}: error: {message}{hint}", file=sys.stderr)
        return 1
    return 0
