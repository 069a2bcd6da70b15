"""The ``segflow`` command line: one sub-command per pipeline stage.

The Snakemake rules call exactly these commands, so every stage can also be run by hand:

    segflow demo-data resources/demo
    segflow ingest --train-images ... --out-manifest results/ingest/manifest.parquet ...

A :class:`~segflow.errors.SegflowError` is printed as one ``segflow <stage>: error: ...`` line
with exit status 2; nothing is left half-written because every artifact is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from segflow import __version__
from segflow.atomic import write_csv, write_json, write_parquet, write_text
from segflow.errors import SegflowError
from segflow.imageio import DicomWindow
from segflow.options import add_dataclass_arguments, dataclass_from_namespace

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

    manifest, summary = ingest(dataclass_from_namespace(IngestOptions, args), workers=args.workers)
    write_parquet(args.out_manifest, manifest)
    write_json(args.out_summary, summary)
    log.info(
        "manifest: %d train + %d test items -> %s",
        summary["n_train"],
        summary["n_test"],
        args.out_manifest,
    )


def _run_dedup(args: argparse.Namespace) -> None:
    from segflow.dedup import DedupOptions, find_duplicates, summary_markdown

    manifest = read_table(args.manifest, "manifest")
    items, summary = find_duplicates(manifest, dataclass_from_namespace(DedupOptions, args))
    write_parquet(args.out_items, items)
    write_json(args.out_summary, summary)
    write_text(args.out_report, summary_markdown(summary))
    log.info(
        "%d duplicate groups with %d members; %d conflicting",
        summary["n_groups"],
        summary["n_members"],
        summary["conflicting_groups"],
    )


def _run_preprocess(args: argparse.Namespace) -> None:
    from segflow.preprocess import PreprocessOptions, preprocess

    stats = preprocess(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        dataclass_from_namespace(PreprocessOptions, args),
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

    folds, summary = make_folds(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        dataclass_from_namespace(FoldOptions, args),
    )
    write_csv(args.out_folds, folds)
    write_json(args.out_summary, summary)
    log.info(
        "%d items in %d folds: %s per fold",
        summary["n_items"],
        summary["n_folds"],
        summary["items_per_fold"],
    )


def _run_summary(args: argparse.Namespace) -> None:
    from segflow.report import results_summary

    print(results_summary(args.results_dir))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    from segflow.dedup import DedupOptions
    from segflow.demo_data import DemoDataOptions
    from segflow.folds import FoldOptions
    from segflow.ingest import IngestOptions
    from segflow.preprocess import PreprocessOptions

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
    prep.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    prep.add_argument("--dedup-items", required=True, help="items Parquet from dedup")
    prep.add_argument(
        "--out-dir", required=True, help="folder for the .npy arrays, index and stats"
    )
    _add_workers(prep)
    _add_dicom_window(prep)

    folds = command("folds", _run_folds, "assign stratified, duplicate-grouped folds", FoldOptions)
    folds.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    folds.add_argument("--dedup-items", required=True, help="items Parquet from dedup")
    folds.add_argument("--out-folds", required=True, help="folds CSV to write")
    folds.add_argument("--out-summary", required=True, help="summary JSON to write")

    summary = command("summary", _run_summary, "print what a workflow run produced")
    summary.add_argument("results_dir", help="the workflow's results folder")
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
    return 0
