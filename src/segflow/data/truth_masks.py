"""``segflow truth-masks``: the training labels at the original resolution, decoded once.

Every used train item's packed label mask (the union of its group's masks under the ``union``
policy, :func:`segflow.artifacts.truths.original_truths`), read from the PNG or RLE masks that
ingest's manifest names and written as one array (:mod:`segflow.artifacts.truths`).
The OOF stages (evaluate-oof, tune-postprocess, blend) read their images' rows there: an edit of
the mask decoding reruns this stage (and, through its output, them), not their code
fingerprints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from segflow.artifacts.tables import read_table
from segflow.artifacts.truths import original_truths, write_truth_masks
from segflow.core.errors import SegflowError
from segflow.core.stage_args import add_stage_tables, stage_log
from segflow.formats.labels import class_names, manifest_classes


def used_train_ids(dedup_items: pd.DataFrame) -> list[str]:
    """The used train items' ids (``use_for_training``), sorted: the array's rows.

    Raises:
        SegflowError: no train item is used.
    """
    used = dedup_items[(dedup_items["split"] == "train") & dedup_items["use_for_training"]]
    if used.empty:
        raise SegflowError("no train items left to read truths of (all dropped by dedup?)")
    return sorted(str(item_id) for item_id in used["id"])


def write_truths(
    manifest: pd.DataFrame, dedup_items: pd.DataFrame, out_dir: str | Path
) -> tuple[Path, Path]:
    """Write every used train item's original-resolution label mask into ``out_dir``.

    Args:
        manifest: ingest's train manifest.
        dedup_items: dedup's items (which train items are used, and how).
        out_dir: the output folder.

    Returns:
        (``masks.npy``, ``ids.csv``).

    Raises:
        SegflowError: no used item, images of different sizes, or a mask path outside the data.
    """
    ids = used_train_ids(dedup_items)
    n_classes = len(class_names(manifest_classes(manifest)))
    masks = original_truths(manifest, dedup_items, ids, n_classes)
    # DICOM series (data.dicom_series): evaluate-oof scores each series' volume too.
    series = None
    if "series_uid" in manifest.columns:
        series = manifest.set_index("id").loc[ids, "series_uid"].astype(str).tolist()
    return write_truth_masks(out_dir, ids, masks, series)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow truth-masks``'s flags."""
    add_stage_tables(parser)
    parser.add_argument("--out-dir", required=True, help="folder for masks.npy and ids.csv")


def run(args: argparse.Namespace) -> None:
    """``segflow truth-masks``: write masks.npy and ids.csv."""
    masks_path, _ = write_truths(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        args.out_dir,
    )
    stage_log.info("truth masks of the used train items: %s", masks_path)
