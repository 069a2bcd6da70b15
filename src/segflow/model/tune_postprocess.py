"""The tune-postprocess stage: grid-search each class's post-processing on a candidate's OOF.

Reads an OOF folder (:mod:`segflow.artifacts.predictions`) and the true masks, writes
``grid.csv`` and ``params.json`` (the best threshold, minimum area, hole filling and gate per
class, with the tuned score); the search itself is :func:`segflow.model.postprocess.tune_classes`.

With ``--min-distances`` and ``--compactnesses`` (the workflow passes them when the submission
splits touching objects: ``submission.instances`` and ``split_touching``), the watershed that
splits them is tuned too, per class, on the masks of the chosen post-processing, by the DSB
instance metric (:func:`segflow.model.postprocess.tune_watershed`); each class record of
``params.json`` then holds it under ``watershed``, which submit and predict-bundle apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import nonempty_probs, read_oof
from segflow.artifacts.tables import read_table
from segflow.artifacts.truths import instance_truths, object_rles_of, original_truths
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.provenance import stage_provenance, with_provenance
from segflow.core.stage_args import add_stage_tables, add_stats, stage_log
from segflow.formats.rle import RLE_ORDERS
from segflow.model.postprocess import (
    WATERSHED_KEY,
    apply_postprocess,
    tune_classes,
    tune_watershed,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow tune-postprocess``'s flags: the OOF folder and the grid."""
    parser.add_argument("--oof-dir", required=True, help="evaluate-oof output folder")
    add_stats(parser)
    add_stage_tables(parser)
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
    parser.add_argument("--out-dir", required=True, help="folder for params.json and grid.csv")


def run(args: argparse.Namespace) -> None:
    """``segflow tune-postprocess``: write grid.csv and params.json."""
    if (args.min_distances is None) != (args.compactnesses is None):
        raise SegflowError("--min-distances and --compactnesses are tuned together; give both")
    classes, _ = read_classes(args.stats)
    oof = read_oof(args.oof_dir)
    truths = original_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        oof.ids["id"],
        len(classes),
    )
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
    for record in summary["classes"]:
        stage_log.info("best post-processing of %s: %s", record["class"], record)
