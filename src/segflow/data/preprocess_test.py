"""Preprocess the test images as the train images were: a test-side stage of its own.

Reads the train side's ``stats.json`` (size, channels, depth and the preprocess options it was
written with) and writes ``test_images.npy`` (M, H, W, C) and ``test_index.parquet`` next to
the train arrays. Nothing on the train side reads these, so new, removed or replaced test
images rerun this stage and what predicts the test set, never training.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from segflow.artifacts.arrays import STATS_KEYS, images_file, read_stats, write_index
from segflow.artifacts.resolution import pad_offsets
from segflow.artifacts.tables import data_roots, read_table, resolve_manifest_path
from segflow.core.atomic import atomic_path
from segflow.core.errors import SegflowError
from segflow.core.stage_args import add_workers, stage_log
from segflow.data.preprocess import (
    Geometry,
    PreprocessOptions,
    _Item,
    array_index,
    context_items,
    write_arrays,
    write_context_arrays,
)
from segflow.formats.imageio import (
    DicomWindow,
    add_dicom_window_arguments,
    dicom_window_from_args,
)


def preprocess_test(
    manifest: pd.DataFrame,
    stats: dict[str, Any],
    out_dir: str | Path,
    workers: int = 1,
    dicom_window: DicomWindow | None = None,
    where: str = "stats.json",
) -> int:
    """Write ``test_images.npy`` and ``test_index.parquet`` into ``out_dir``.

    Args:
        manifest: the test manifest (ingest ``--split test``; may be empty).
        stats: the train side's ``stats.json`` (geometry and ``options``).
        out_dir: the preprocess output folder.
        workers: processes.
        dicom_window: HU window for DICOM sources.
        where: the stats file, for messages.

    Returns:
        The number of test images written.

    Raises:
        SegflowError: a stats key missing, or (``resize_mode`` pad) a test image larger than
            the train arrays.
    """
    missing = [key for key in (*STATS_KEYS, "options") if key not in stats]
    if missing:
        raise SegflowError(f"{where}: missing key(s) {', '.join(missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = PreprocessOptions(**stats["options"])
    geometry = Geometry(
        int(stats["height"]), int(stats["width"]), int(stats["channels"]), str(stats["dtype"])
    )
    test = manifest[manifest["split"] == "test"].sort_values("id")
    if options.resize_mode == "pad":  # every image must fit: checked before any work
        for row in test.itertuples():
            target = (geometry.height, geometry.width)
            pad_offsets((int(row.height), int(row.width)), target, row.image_path)
    roots = data_roots(manifest)
    items = [
        _Item(str(resolve_manifest_path(row.image_path, "image_path", row.id, roots)), ())
        for row in test.itertuples()
    ]
    window = dicom_window or DicomWindow()
    with atomic_path(out_dir / images_file("test")) as images_path:
        if options.context_slices and not test.empty:  # 2.5D: the test series' neighbours
            write_context_arrays(
                test,
                context_items(test, roots),
                test["id"].tolist(),
                images_path,
                None,
                geometry,
                options,
                window,
                1,
                workers,
            )
        else:
            write_arrays(items, images_path, None, geometry, options, window, 1, workers)
    write_index(out_dir, array_index(test, geometry, options), split="test")
    return len(test)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow preprocess-test``'s flags."""
    parser.add_argument("--test-manifest", required=True, help="test manifest Parquet")
    parser.add_argument("--stats", required=True, help="the train side's stats.json")
    parser.add_argument(
        "--out-dir", required=True, help="the preprocess folder (test_images.npy, test_index)"
    )
    add_workers(parser)
    add_dicom_window_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow preprocess-test``: write the test arrays and their index."""
    stats = read_stats(args.stats, required=STATS_KEYS)
    n_test = preprocess_test(
        read_table(args.test_manifest, "test manifest"),
        stats,
        args.out_dir,
        workers=args.workers,
        dicom_window=dicom_window_from_args(args),
        where=str(args.stats),
    )
    stage_log.info("preprocessed %d test images in %s", n_test, args.out_dir)
