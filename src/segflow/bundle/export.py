"""``segflow export``: the final choice of a results folder as one self-contained zip
(:mod:`segflow.bundle.archive`) that ``segflow predict-bundle`` runs on a folder of images,
e.g. in an offline Kaggle code-competition notebook.

The bundle holds the chosen candidate (``results/final/choice.json``, or ``--candidate``): an
experiment (its test models: the folds', the refit's or both, as the pipeline predicted the
test set with), the ``ensemble`` (every experiment's test models and the blend weights) or a
stacked candidate (``stack_gate``, ``stack_pixel``: the experiments and blend weights as the
ensemble's, plus the fitted second-level models of every class in their native formats,
``stack/class_<k>/<prefix>_model.txt`` LightGBM or ``.cbm`` CatBoost, never a pickle). The
stacked gate's features may include the ``meta_*`` metadata columns; ``bundle.json`` names
them and predict-bundle reads them from its ``--metadata`` CSV.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts import layout
from segflow.artifacts.arrays import classes_of, read_stats
from segflow.artifacts.tables import csv_id_style, read_table
from segflow.bundle.archive import (
    CONFIG,
    LEAKS,
    STACK_MEMBERS,
    WEIGHT_SUFFIXES,
    encode_weights,
    flat_states,
    weights_format,
    write_bundle,
)
from segflow.core.errors import SegflowError
from segflow.core.late_options import published_options
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace
from segflow.core.stage_args import stage_log
from segflow.ensemble.blend import read_blend_weights
from segflow.formats.imageio import (
    DicomWindow,
    add_dicom_window_arguments,
    dicom_window_from_args,
)
from segflow.formats.rle import rle_encode
from segflow.model.inference.predict import PredictOptions
from segflow.model.submit import SubmissionOptions, train_label

SECOND_LEVEL = ("ensemble", "stack_gate", "stack_pixel")
# Stacked candidate -> its stacker (segflow.ensemble.stacking.stackers.candidate_name).
STACKED = {"stack_gate": "gate", "stack_pixel": "pixel"}
# Every leak label's RLE uses this convention, whatever the submission's.
LEAK_RLE = {"order": "column", "start": 1}
# An exact-duplicate group's key: the first characters of ingest's md5_pixels (dedup's
# exact_group).
HASH_PREFIX = 16


def stack_models(results: Path, name: str, round_: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A stacked candidate's fitted models as bundle members, and ``bundle.json``'s ``stack``.

    Returns:
        (``{"stacker", "backend", "threshold_target", "models", "meta_columns"}``: the model
        members in :func:`segflow.ensemble.stacking.apply_stack.model_files` order under
        ``stack/`` and the metadata columns their features read; member path -> bytes).

    Raises:
        SegflowError: the stack's summary or a model file is missing.
    """
    from segflow.ensemble.stacking.apply_stack import load_stack_models, model_files, stack_setup

    stacker = STACKED[name]
    folder = layout.stack_dir(results, round_)
    backend, threshold_target, blobs = stack_setup(folder, stacker)
    n_classes = len(classes_of(read_stats(layout.arrays_dir(results))))
    models = load_stack_models(folder, stacker, backend, threshold_target, n_classes, blobs)
    files = model_files(stacker, backend, threshold_target, n_classes)
    config = {
        "stacker": stacker,
        "backend": backend,
        "threshold_target": threshold_target,
        "models": [f"{STACK_MEMBERS}/{file}" for file in files],
        "meta_columns": models.meta_columns(),
    }
    if blobs:  # the gate's DoG blob features (stack.blob_sigmas)
        config["blobs"] = {
            "blob_sigmas": list(blobs["blob_sigmas"]),
            "blob_threshold": blobs["blob_threshold"],
        }
    return config, {f"{STACK_MEMBERS}/{file}": (folder / file).read_bytes() for file in files}


def parse_candidate(text: str) -> tuple[str, int]:
    """``name:round`` (round 0 when left out)."""
    name, _, round_ = text.partition(":")
    if not name or (round_ and not round_.isdigit()):
        raise SegflowError(f"--candidate {text!r}: expected name:round, e.g. ensemble:0")
    return name, int(round_ or 0)


def chosen_candidate(results: Path) -> tuple[str, int]:
    """(candidate, round) of ``results/final/choice.json``."""
    path = layout.choice_json(results)
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run the workflow's choose first)")
    try:
        choice = json.loads(path.read_text(encoding="utf-8"))
        return str(choice["candidate"]), int(choice["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SegflowError(f"{path}: not a choice of segflow choose ({error})") from None


def test_members(results: Path, name: str, round_: int, test_dirs: Sequence[str]) -> list[str]:
    """The models (``fold<k>``, ``full``) whose test predictions the pipeline merged for an
    experiment: those of ``test_dirs`` under ``test/<name>/round<r>`` (what the workflow
    passes), else every such folder holding a prediction, in name order.

    Raises:
        SegflowError: none found.
    """
    base = layout.candidate_dir(results, "test", name, round_)
    if test_dirs:
        members = [Path(d).name for d in test_dirs if Path(d).parent == base]
    else:
        members = sorted(
            d.name for d in base.glob("*") if (d / "probs.npy").is_file() and d.is_dir()
        )
    if not members:
        raise SegflowError(f"{base}: no test predictions of {name} round {round_} to export")
    return members


def experiment_models(
    results: Path, name: str, round_: int, members: Sequence[str], fmt: str, fp16: bool
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """An experiment's test models as bundle entries and weight members.

    Returns:
        (one ``{"member", "path", "spec", "snapshots", "meta"}`` per model, path -> bytes).
    """
    from segflow.model.models import SnapshotEnsemble, load_checkpoint

    entries, files = [], {}
    for member in members:
        checkpoint = layout.model_checkpoint(results, name, round_, member)
        model, meta = load_checkpoint(checkpoint)
        models = model.members if isinstance(model, SnapshotEnsemble) else [model]
        states = [m.state_dict() for m in models]
        path = f"models/{name}/{member}{WEIGHT_SUFFIXES[fmt]}"
        files[path] = encode_weights(flat_states(states, fp16), fmt)
        entries.append(
            {
                "member": member,
                "path": path,
                "spec": meta["spec"],
                "snapshots": len(states) if isinstance(model, SnapshotEnsemble) else 0,
                "meta": {k: v for k, v in meta.items() if k not in ("spec", "format")},
            }
        )
    return entries, files


def leak_labels(
    manifest: pd.DataFrame, dedup_items: pd.DataFrame, n_classes: int
) -> dict[str, dict[str, Any]]:
    """Per exact-duplicate group of usable train images (keyed by the pixel hash prefix): the
    label the pipeline's submit copies to a test image of that group (the union of the group's
    usable train labels, :func:`segflow.model.submit.train_label`), as one RLE per class.
    """
    used = set(dedup_items.loc[dedup_items["use_for_training"].astype(bool), "id"])
    train = manifest[manifest["split"].eq("train") & manifest["id"].isin(used)]
    groups = train.assign(key=train["md5_pixels"].str[:HASH_PREFIX]).groupby("key")["id"]
    labels = {}
    for key, ids in groups:
        label = train_label(manifest, sorted(ids), n_classes)
        planes = [(label >> k) & 1 for k in range(n_classes)]
        labels[str(key)] = {
            "height": int(label.shape[0]),
            "width": int(label.shape[1]),
            "rle": [rle_encode(plane.astype(np.uint8), **LEAK_RLE) for plane in planes],  # type: ignore[arg-type]
        }
    return labels


def bundle_config(
    results: Path,
    candidate: tuple[str, int],
    experiments: list[dict[str, Any]],
    predict: PredictOptions,
    submission: SubmissionOptions,
    dicom_window: DicomWindow,
    manifest: pd.DataFrame,
    test_manifest: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """``bundle.json``: everything predict-bundle needs besides weights and leak labels.

    Args:
        results: the workflow's results folder.
        candidate: (name, round) exported.
        experiments: the bundled experiments (names, weights, models).
        predict: the prediction options.
        submission: the submission format.
        dicom_window: the HU window DICOM sources were decoded with.
        manifest: ingest's train manifest (the RLE CSV's id style, the stored channels).
        test_manifest: ingest's test manifest (its stored channel counts are accepted too, as
            preprocess-test accepted them); None when there is none.

    Returns:
        The JSON-ready config.
    """
    name, round_ = candidate
    stats = read_stats(layout.arrays_dir(results))
    params_path = layout.postprocess_params(results, name, round_)
    if not params_path.is_file():
        raise SegflowError(f"{params_path} does not exist (run tune-postprocess first)")
    options = dataclasses.asdict(submission)
    if options["id_style"] == "auto":
        options["id_style"] = csv_id_style(manifest)
    return {
        "candidate": {"name": name, "round": round_},
        "preprocess": {
            "options": stats["options"],
            "height": int(stats["height"]),
            "width": int(stats["width"]),
            "channels": int(stats["channels"]),
            "dtype": str(stats["dtype"]),
            "train_mean": stats["train_mean"],
            "train_std": stats["train_std"],
            "dicom_window": published_options(dicom_window),
            # The stored channel counts of the pipeline's images (train and test); with
            # channels auto and 1 channel, only gray images unless the pipeline's own test set
            # held colour ones (preprocess-test turns them gray, as the train side decided).
            "source_channels": sorted(
                {
                    int(c)
                    for frame in (manifest, test_manifest)
                    if frame is not None
                    for c in frame["channels"].unique()
                }
            ),
            "gray_only": stats["options"].get("channels") == "auto"
            and int(stats["channels"]) == 1
            and (test_manifest is None or bool(test_manifest["is_gray"].all())),
        },
        "predict": dataclasses.asdict(predict),
        "classes": classes_of(stats),
        "multilabel": bool(stats.get("multilabel", False)),
        "submission": options,
        "postprocess": json.loads(params_path.read_text(encoding="utf-8")),
        "experiments": experiments,
        "leaks": {"hash_prefix": HASH_PREFIX, "rle": LEAK_RLE},
    }


def export(
    results: str | Path,
    out: str | Path,
    predict: PredictOptions,
    submission: SubmissionOptions,
    dicom_window: DicomWindow | None = None,
    candidate: tuple[str, int] | None = None,
    test_dirs: Sequence[str] = (),
    fp16: bool = False,
) -> dict[str, Any]:
    """Write the bundle of ``results``' final choice (or ``candidate``) to ``out``.

    Args:
        results: the workflow's results folder.
        out: the zip to write (atomically).
        predict: TTA, batch size, tiling, fold merge (the config's ``predict`` section).
        submission: the submission format (the config's ``submission`` section).
        dicom_window: the HU window DICOM sources were decoded with.
        candidate: (name, round) to export instead of ``final/choice.json``'s.
        test_dirs: the experiments' test prediction folders the pipeline merged (the
            workflow's; empty: found in ``results/test``).
        fp16: store floating weights as float16 (half the size; predictions may differ in
            the last bits from the pipeline's).

    Returns:
        A summary: candidate, round, experiments, models, size in bytes.
    """
    results = Path(results)
    name, round_ = candidate or chosen_candidate(results)
    manifest = read_table(layout.manifest(results), "manifest")
    dedup_items = read_table(layout.dedup_items(results), "dedup items")
    test_path = layout.test_manifest(results)
    test_manifest = read_table(test_path, "test manifest") if test_path.is_file() else None
    stacked = name in STACKED
    fmt = weights_format()
    experiments, members = [], {}
    stack: dict[str, Any] | None = None
    if stacked:
        stack, members = stack_models(results, name, round_)
    if name == "ensemble" or stacked:
        # A stacked candidate reads every experiment (the gate: through the ensemble).
        blend = read_blend_weights(layout.ensemble_weights(results, round_))
        weights, mode = blend.weights, blend.mode
    else:
        weights, mode = {name: 1.0}, "mean"
    for experiment, weight in weights.items():
        entries, files = experiment_models(
            results,
            experiment,
            round_,
            test_members(results, experiment, round_, test_dirs),
            fmt,
            fp16,
        )
        experiments.append({"name": experiment, "weight": float(weight), "models": entries})
        members.update(files)
    config = bundle_config(
        results,
        (name, round_),
        experiments,
        predict,
        submission,
        dicom_window or DicomWindow(),
        manifest,
        test_manifest,
    )
    if stack is not None:
        config["stack"] = stack
    leaks = (
        leak_labels(manifest, dedup_items, len(config["classes"]))
        if submission.copy_train_labels
        else {}
    )
    if mode != "mean":  # ensemble.mode vote: predict-bundle votes as blend did
        config["candidate"]["mode"] = mode
    members[CONFIG] = json.dumps(config, indent=1).encode()
    members[LEAKS] = json.dumps(leaks).encode()
    size = write_bundle(out, members, {"weights_format": fmt, "fp16": bool(fp16)})
    return {
        "candidate": name,
        "round": round_,
        "experiments": [e["name"] for e in experiments],
        "models": sum(len(e["models"]) for e in experiments),
        "bytes": size,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow export``'s flags."""
    parser.add_argument("results", help="the workflow's results folder")
    parser.add_argument("out", help="the bundle zip to write")
    add_dataclass_arguments(parser, PredictOptions)
    add_dataclass_arguments(parser, SubmissionOptions)
    add_dicom_window_arguments(parser)
    parser.add_argument(
        "--candidate", default=None, help="name:round to export instead of final/choice.json's"
    )
    parser.add_argument(
        "--test-dirs",
        nargs="*",
        default=(),
        help="test prediction folders the pipeline merged (default: those under results/test)",
    )
    parser.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="store weights as float16 (half the size)",
    )


def run(args: argparse.Namespace) -> None:
    """``segflow export``: write the bundle and report its size."""
    predict = dataclass_from_namespace(PredictOptions, args)
    if predict == PredictOptions():
        # The options are not read from the results (predictions do not record them): a bundle
        # built by hand with no flags predicts without TTA whatever the run used.
        stage_log.warning(
            "export: no predict options given, the bundle predicts with the defaults (TTA none);"
            " give the run's predict.* (e.g. --tta hflip) to reproduce its submission, or build"
            " it with the export_bundle rule, which passes them from the config"
        )
    summary = export(
        args.results,
        args.out,
        predict,
        dataclass_from_namespace(SubmissionOptions, args),
        dicom_window_from_args(args),
        parse_candidate(args.candidate) if args.candidate else None,
        args.test_dirs,
        args.fp16,
    )
    stage_log.info(
        "bundle %s: %s round %d, %d model(s) of %s, TTA %s, %.1f MB",
        args.out,
        summary["candidate"],
        summary["round"],
        summary["models"],
        ", ".join(summary["experiments"]),
        predict.tta,
        summary["bytes"] / 1e6,
    )
