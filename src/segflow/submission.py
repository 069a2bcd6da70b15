"""Submission: Kaggle CSV of RLE masks, with labels of test images that duplicate train images.

The RLE uses the same convention as the competition's input (column-major, 1-indexed by
default), and every written string is decoded back and compared with its mask before the
file is written, so a submission can never silently disagree with the predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.atomic import write_csv
from segflow.errors import SegflowError
from segflow.imageio import read_mask
from segflow.options import option
from segflow.rle import RLE_ORDERS, rle_decode, rle_encode


@dataclass(frozen=True)
class SubmissionOptions:
    """Format of the submission file (config section ``submission``)."""

    id_column: str = option("id", "id column name in the submission CSV")
    rle_column: str = option("rle_mask", "RLE column name in the submission CSV")
    rle_order: str = option("column", "pixel numbering of the RLE", RLE_ORDERS)
    rle_start: int = option(1, "index of the first pixel (Kaggle: 1)")
    copy_train_labels: bool = option(
        True, "give test images that dedup found identical to a train image that train label"
    )
    empty_rle: str = option("", "what an empty mask is written as ('' for TGS, '-1' for SIIM)")
    instances: bool = option(
        False, "one RLE row per object (connected component), as DSB-style competitions score"
    )
    split_touching: bool = option(
        False, "with instances: split touching objects by a watershed on the distance transform"
    )


def instance_masks(mask: np.ndarray, split_touching: bool = False) -> list[np.ndarray]:
    """Split a binary mask into one uint8 mask per object (8-connected, optionally watershed).

    Shape:
        mask: (H, W); output: K masks of (H, W).
    """
    from segflow.postprocess import label_instances

    labels = label_instances(mask, split_touching=split_touching)
    return [(labels == label).astype(np.uint8) for label in range(1, int(labels.max()) + 1)]


def train_label(manifest: pd.DataFrame, train_ids: Iterable[str]) -> np.ndarray:
    """The union of the original-resolution masks of ``train_ids`` (one id: its own mask).

    Shape:
        output: (H, W) uint8 {0, 1}.
    """
    rows = manifest.set_index("id").loc[list(train_ids)]
    shape = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
    mask = np.zeros(shape, dtype=np.uint8)
    for row in rows.itertuples():
        part = (
            read_mask(row.mask_path)
            if isinstance(row.mask_path, str)
            else rle_decode(row.mask_rle, shape, where=f"manifest mask_rle of {row.Index}")
        )
        mask |= part
    return mask


def known_test_labels(manifest: pd.DataFrame, dedup_items: pd.DataFrame) -> dict[str, np.ndarray]:
    """Test id -> train label for test images identical to usable train images (dedup's leaks).

    Members of a duplicate group whose masks agree share one mask; a group resolved by the
    ``union`` policy gives the union, matching what the model was trained on.
    """
    leaks = dedup_items[dedup_items["split"].eq("test") & dedup_items["leak_train_ids"].notna()]
    return {
        row.id: train_label(manifest, str(row.leak_train_ids).split(";"))
        for row in leaks.itertuples()
    }


def submission_frame(
    masks: Mapping[str, np.ndarray | list[np.ndarray]],
    options: SubmissionOptions,
    known_labels: Mapping[str, np.ndarray | list[np.ndarray]] | None = None,
) -> pd.DataFrame:
    """Build the submission table, one row per id (or per instance when a list is given).

    Args:
        masks: test id -> (H, W) binary mask at the original resolution, or a list of instance
            masks (one RLE row each, DSB-style); an empty list gives one empty row.
        options: column names and RLE convention.
        known_labels: test id -> label that replaces the prediction (``copy_train_labels``).

    Returns:
        DataFrame with the two configured columns, sorted by id (instance rows in given order).

    Raises:
        SegflowError: an RLE string that does not decode back to its mask (a bug, not bad input).
    """
    if options.rle_order not in RLE_ORDERS:
        raise SegflowError(f"unknown submission.rle_order {options.rle_order!r}")
    rows: list[tuple[str, str]] = []
    for item_id in sorted(masks):
        if options.copy_train_labels and known_labels and item_id in known_labels:
            prediction: np.ndarray | list[np.ndarray] = known_labels[item_id]
        else:
            prediction = masks[item_id]
        instances = prediction if isinstance(prediction, list) else [prediction]
        if not instances:
            rows.append((item_id, options.empty_rle))
        for mask in instances:
            rows.append((item_id, _checked_rle(item_id, mask, options)))
    return pd.DataFrame(rows, columns=[options.id_column, options.rle_column])


def _checked_rle(item_id: str, mask: np.ndarray, options: SubmissionOptions) -> str:
    rle = rle_encode(mask, order=options.rle_order, start=options.rle_start)  # type: ignore[arg-type]
    decoded = rle_decode(rle, mask.shape, order=options.rle_order, start=options.rle_start)  # type: ignore[arg-type]
    if not np.array_equal(decoded, mask != 0):
        raise SegflowError(f"submission RLE of {item_id} does not decode back to its mask")
    return rle if rle else options.empty_rle


def write_submission(path: str | Path, frame: pd.DataFrame) -> None:
    """Write the submission CSV atomically."""
    write_csv(path, frame)
