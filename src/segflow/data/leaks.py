"""Leaks: the test items that are exact copies of train items (test-side, after dedup).

Dedup groups the train set alone, so the folds and the models never depend on the test set;
this stage links each test item to the train copies whose label applies
(:func:`segflow.data.dedup.find_test_leaks`). submit copies those labels, and the
pseudo-labelling selection leaves those items out.
"""

from __future__ import annotations

import argparse

from segflow.artifacts.tables import read_table
from segflow.core.atomic import write_json, write_parquet
from segflow.core.stage_args import stage_log, stage_provenance, with_provenance
from segflow.data.dedup import find_test_leaks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow leaks``' flags."""
    parser.add_argument("--test-manifest", required=True, help="test manifest Parquet")
    parser.add_argument("--manifest", required=True, help="train manifest Parquet")
    parser.add_argument("--dedup-items", required=True, help="dedup's items Parquet")
    parser.add_argument("--out-leaks", required=True, help="test leak links Parquet to write")
    parser.add_argument("--out-summary", required=True, help="summary JSON to write")


def run(args: argparse.Namespace) -> None:
    """``segflow leaks``: write the test items' links to train copies and a summary."""
    leaks, summary = find_test_leaks(
        read_table(args.test_manifest, "test manifest"),
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
    )
    write_parquet(args.out_leaks, leaks)
    write_json(args.out_summary, with_provenance(summary, stage_provenance({})))
    stage_log.info(
        "%d of %d test items are copies of a train image",
        summary["test_items_with_train_label"],
        summary["n_test"],
    )
