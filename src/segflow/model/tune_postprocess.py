"""The tune-postprocess stage: grid-search each class's post-processing on a candidate's OOF.

Reads an OOF folder (:mod:`segflow.artifacts.predictions`) and the true masks (truth-masks'
array, :mod:`segflow.artifacts.truths`), writes ``grid.csv`` and ``params.json`` (the best
threshold, minimum area, hole filling and gate per class, with the tuned score); the search itself is :func:`segflow.model.postprocess.tune_classes`.
Also writes ``image_scores.parquet`` (:mod:`segflow.artifacts.image_scores`): every image's
score after the tuned post-processing and the scores of the two constant predictions, which
choose compares.

With ``--min-distances`` and ``--compactnesses`` (the workflow passes them when the submission
splits touching objects: ``submission.instances`` and ``split_touching``), the watershed that
splits them is tuned too, per class, on the masks of the chosen post-processing, by the DSB
instance metric (:func:`segflow.model.postprocess.tune_watershed`); each class record of
``params.json`` then holds it under ``watershed``, which submit and predict-bundle apply.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.image_scores import write_image_scores
from segflow.artifacts.predictions import Prediction, nonempty_probs, read_oof
from segflow.artifacts.tables import read_table
from segflow.artifacts.truths import class_truths, instance_truths, object_rles_of, read_truth_masks
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.stage_args import add_stats, stage_log, stage_provenance, with_provenance
from segflow.formats.rle import RLE_ORDERS
from segflow.model.metrics import constant_scores, get_metric
from segflow.model.postprocess import (
    WATERSHED_KEY,
    apply_classes,
    apply_postprocess,
    params_from_summary,
    tune_classes,
    tune_watershed,
)

# Images post-processed and scored at once for the per-image scores: bounds memory.
CHUNK = 256


def tuned_scores(
    oof: Prediction, summary: dict[str, Any], classes: Sequence[str], truths: np.ndarray
) -> np.ndarray:
    """Per-image scores of a candidate's OOF prediction after its tuned post-processing, with
    the tuning metric, the mean over classes (their mean is ``params.json``'s score).

    Args:
        oof: the candidate's OOF prediction (rows aligned with ``truths``).
        summary: its ``params.json`` (metric and per-class parameters).
        classes: class names in bit order.
        truths: packed true label masks.

    Returns:
        float64 scores.

    Shape:
        oof.probs: (N, K, H, W); truths: (N, H, W); output: (N,).
    """
    metric = get_metric(str(summary["metric"]))
    params = params_from_summary(summary, classes)
    scores = []
    for start in range(0, len(truths), CHUNK):
        part = slice(start, start + CHUNK)
        masks = apply_classes(
            np.asarray(oof.probs[part]), params, nonempty_probs(oof.ids.iloc[part], len(classes))
        )
        per_class = [
            metric(masks[:, k] != 0, class_truths(truths[part], k)) for k in range(len(classes))
        ]
        scores.append(np.mean(per_class, axis=0))
    return np.concatenate(scores) if scores else np.zeros(0)


def image_scores(
    oof: Prediction, summary: dict[str, Any], classes: Sequence[str], truths: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The per-image scores choose compares: the tuned prediction's (:func:`tuned_scores`)
    and the constant predictions' (:func:`segflow.model.metrics.constant_scores`), with the
    tuning metric.

    Returns:
        (tuned scores, constant name -> scores), float64.

    Shape:
        oof.probs: (N, K, H, W); truths: (N, H, W); every output: (N,).
    """
    areas = np.stack([class_truths(truths, k).sum(axis=(1, 2)) for k in range(len(classes))], 1)
    pixels = truths.shape[1] * truths.shape[2]
    constants = constant_scores(areas, pixels, str(summary["metric"]))
    return tuned_scores(oof, summary, classes, truths), constants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow tune-postprocess``'s flags: the OOF folder and the grid."""
    parser.add_argument("--oof-dir", required=True, help="evaluate-oof output folder")
    add_stats(parser)
    parser.add_argument(
        "--truths", required=True, help="truth-masks' masks.npy (ids.csv beside it)"
    )
    parser.add_argument("--thresholds", nargs="+", type=float, required=True)
    parser.add_argument("--min-areas", nargs="+", type=int, required=True)
    parser.add_argument(
        "--fill-holes-options", nargs="+", type=lambda t: t.lower() == "true", default=[False]
    )
    parser.add_argument(
        "--gates",
        nargs="*",
        type=float,
        default=[],
        help="aux-head non-empty probability gates to try (0, no gate, is always tried)",
    )
    parser.add_argument("--metric", default="kaggle", help="metric to maximise")
    parser.add_argument(
        "--min-distances",
        nargs="+",
        type=int,
        default=None,
        help="watershed marker distances to try (with --compactnesses: tune the split of "
        "touching objects by the instance metric)",
    )
    parser.add_argument(
        "--compactnesses", nargs="+", type=float, default=None, help="watershed compactnesses"
    )
    parser.add_argument(
        "--object-rle-csv",
        default=None,
        help="RLE CSV with one row per true object (default: objects are the truth's components)",
    )
    parser.add_argument("--object-rle-id-column", default="id")
    parser.add_argument("--object-rle-column", default="rle_mask")
    parser.add_argument("--object-rle-order", default="column", choices=RLE_ORDERS)
    parser.add_argument("--object-rle-start", type=int, default=1)
    parser.add_argument(
        "--manifest", default=None, help="with --object-rle-csv: ingest's manifest (CSV ids)"
    )
    parser.add_argument(
        "--dedup-items", default=None, help="with --object-rle-csv: dedup's items (union groups)"
    )
    parser.add_argument(
        "--out-dir", required=True, help="folder for params.json, grid.csv, image_scores.parquet"
    )


def run(args: argparse.Namespace) -> None:
    """``segflow tune-postprocess``: write grid.csv, params.json and image_scores.parquet."""
    if (args.min_distances is None) != (args.compactnesses is None):
        raise SegflowError("--min-distances and --compactnesses are tuned together; give both")
    if args.object_rle_csv is not None and (args.manifest is None or args.dedup_items is None):
        raise SegflowError("--object-rle-csv needs --manifest and --dedup-items (to match its ids)")
    classes, _ = read_classes(args.stats)
    oof = read_oof(args.oof_dir)
    truths = read_truth_masks(args.truths, oof.ids["id"])
    nonempty = nonempty_probs(oof.ids, len(classes))
    best, grid, summary = tune_classes(
        oof.probs,
        truths,
        classes,
        args.thresholds,
        args.min_areas,
        args.fill_holes_options,
        args.metric,
        nonempty,
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
    if args.min_distances is not None:
        grid_options["min_distances"] = args.min_distances
        grid_options["compactnesses"] = args.compactnesses
        object_rles = None
        if args.object_rle_csv is not None:
            object_rles = object_rles_of(
                args.object_rle_csv,
                args.object_rle_id_column,
                args.object_rle_column,
                read_table(args.manifest, "manifest"),
                read_table(args.dedup_items, "dedup items"),
            )
        for k, record in enumerate(summary["classes"]):
            masks = apply_postprocess(
                oof.probs[:, k].astype("float32"),
                best[k],
                None if nonempty is None else nonempty[:, k],
            )
            objects = instance_truths(
                (truths >> k) & 1,
                oof.ids["id"],
                object_rles if len(classes) == 1 else None,
                args.object_rle_order,
                args.object_rle_start,
            )
            chosen, watershed_grid, unsplit = tune_watershed(
                masks, objects, args.min_distances, args.compactnesses
            )
            record[WATERSHED_KEY] = {
                "min_distance": chosen.min_distance,
                "compactness": chosen.compactness,
                "metric": "instance",
                "score": float(watershed_grid["score"].iloc[0]),
                "score_unsplit": unsplit,
            }
            stage_log.info(
                "watershed grid of %s (instance metric; unsplit %.4f):\n%s",
                record["class"],
                unsplit,
                watershed_grid.to_string(index=False),
            )
    write_json(
        Path(args.out_dir) / "params.json",
        with_provenance(summary, stage_provenance(grid_options)),
    )
    tuned, constants = image_scores(oof, summary, classes, truths)
    write_image_scores(args.out_dir, oof.ids["id"], tuned, constants)
    for record in summary["classes"]:
        stage_log.info("best post-processing of %s: %s", record["class"], record)
