"""Ground truth at the original resolution, read from ingest's manifest and dedup's items.

The training labels the model learnt (a duplicate group resolved by the ``union`` policy
contributes the union of its members' masks), for preprocess, OOF scoring, post-processing,
blending, stacking and the report (the OOF stages read them through truth-masks' array,
:mod:`segflow.artifacts.truth_masks`). Masks are packed labels (bit k = class k; binary: uint8
{0, 1}; :mod:`segflow.formats.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.formats.labels import class_names, label_dtype, manifest_classes, read_label
from segflow.formats.manifest import data_roots, resolve_manifest_path


class MaskSource(NamedTuple):
    """One manifest item's mask columns (see :func:`segflow.formats.labels.read_label`)."""

    mask_path: str | None
    mask_rle: str | None
    where: str = "manifest item"  # names the item in error messages (its image path)


def load_mask(
    sources: tuple[MaskSource, ...], shape: tuple[int, int], n_classes: int = 1
) -> np.ndarray:
    """The union (per class: bitwise OR) of manifest masks at the original resolution.

    Args:
        sources: the manifest mask columns to union (see :func:`mask_sources`).
        shape: (height, width) of the image.
        n_classes: classes of the manifest (1 for binary masks).

    Returns:
        The packed label mask (bit k = class k); binary: uint8 {0, 1}.

    Shape:
        output: (H, W).
    """
    label = np.zeros(shape, dtype=label_dtype(n_classes))
    for source in sources:
        label |= read_label(source.mask_path, source.mask_rle, shape, n_classes, source.where)
    return label


def mask_sources(manifest: pd.DataFrame, items: pd.DataFrame) -> dict[str, tuple[MaskSource, ...]]:
    """id -> masks to union: its own, or every train member's for the 'union' policy (the
    packed labels are OR-ed, so the union is per class). Mask files are resolved and checked
    to lie in the manifest's data roots (:func:`segflow.formats.manifest.resolve_manifest_path`).

    Raises:
        SegflowError: a mask path leads outside the data roots ingest recorded.
    """
    by_id = manifest.set_index("id")
    roots = data_roots(manifest)
    n_classes = len(class_names(manifest_classes(manifest)))
    own = {
        item_id: (
            MaskSource(
                resolve_manifest_path(row.mask_path, "mask_path", item_id, roots, n_classes),
                row.mask_rle,
                row.image_path,
            ),
        )
        for item_id, row in by_id.loc[items.loc[items["split"] == "train", "id"]].iterrows()
    }
    train = items[items["split"] == "train"]
    group_members = train.groupby("exact_group")["id"].agg(list)
    sources = {}
    for row in train[train["use_for_training"]].itertuples():
        if row.train_action == "union":
            sources[row.id] = tuple(
                s for member in group_members[row.exact_group] for s in own[member]
            )
        else:
            sources[row.id] = own[row.id]
    return sources


def original_truths(
    manifest: pd.DataFrame,
    dedup_items: pd.DataFrame,
    ids: Sequence[str],
    n_classes: int = 1,
    sources: dict[str, tuple[MaskSource, ...]] | None = None,
) -> np.ndarray:
    """Training labels of ``ids`` at the original resolution, as the model was trained on them
    (the union mask for members of a group resolved by the ``union`` policy).

    Args:
        sources: :func:`mask_sources` of the manifest, when the caller reads labels in chunks
            (it resolves and checks every mask path, so build it once).

    Returns:
        Packed label masks: bit k is class k (binary: {0, 1}); see :mod:`segflow.formats.labels`.

    Shape:
        output: (len(ids), H, W); all images must share one size.
    """
    if sources is None:
        sources = mask_sources(manifest, dedup_items)
    sizes = manifest.set_index("id").loc[list(ids), ["height", "width"]]
    if len(sizes.drop_duplicates()) > 1:
        raise SegflowError("OOF scoring needs one original image size; these images differ")
    shape = (int(sizes["height"].iloc[0]), int(sizes["width"].iloc[0]))
    return np.stack([load_mask(sources[item_id], shape, n_classes) for item_id in ids])
