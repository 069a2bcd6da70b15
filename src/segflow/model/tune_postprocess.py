"""The tune-postprocess stage: grid-search each class's post-processing on a candidate's OOF.

Reads an OOF folder (:mod:`segflow.artifacts.predictions`) and the true masks, writes
``grid.csv`` and ``params.json`` (the best threshold, minimum area, hole filling and gate per
class, with the tuned score); the search itself is :func:`segflow.model.postprocess.tune_classes`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.predictions import nonempty_probs, read_oof
from segflow.artifacts.tables import read_table
from segflow.artifacts.truths import original_truths
from segflow.core.atomic import write_csv, write_json
from segflow.core.provenance import stage_provenance, with_provenance
from segflow.core.stage_args import add_stage_tables, add_stats, stage_log
from segflow.model.postprocess import tune_classes


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
    parser.add_argument("--out-dir", required=True, help="folder for params.json and grid.csv")


def run(args: argparse.Namespace) -> None:
    """``segflow tune-postprocess``: write grid.csv and params.json."""
    classes, _ = read_classes(args.stats)
    oof = read_oof(args.oof_dir)
    truths = original_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        oof.ids["id"],
        len(classes),
    )
    _, grid, summary = tune_classes(
        oof.probs,
        truths,
        classes,
        args.thresholds,
        args.min_areas,
        args.fill_holes_options,
        args.metric,
        nonempty_probs(oof.ids, len(classes)),
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
        stage_log.info("best post-processing of %s: %s", record["class"], record)
