"""truth-masks: the used train items' label masks, decoded once, read back by the OOF stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segflow.artifacts.truths import (
    IDS_FILE,
    MASKS_FILE,
    original_truths,
    read_truth_masks,
    write_truth_masks,
)
from segflow.cli import main
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.truth_masks import used_train_ids


def test_the_array_holds_what_the_manifest_decodes(
    demo_manifest: pd.DataFrame, tmp_path: Path
) -> None:
    items, _ = find_duplicates(demo_manifest, DedupOptions(conflict_policy="union"))
    manifest_path, items_path = tmp_path / "manifest.parquet", tmp_path / "items.parquet"
    demo_manifest.to_parquet(manifest_path)
    items.to_parquet(items_path)
    out = tmp_path / "truths"
    args = ["--manifest", str(manifest_path), "--dedup-items", str(items_path)]
    assert main(["truth-masks", *args, "--out-dir", str(out)]) == 0
    ids = used_train_ids(items)
    assert pd.read_csv(out / IDS_FILE, dtype={"id": str})["id"].tolist() == ids
    # Any subset, in any order, byte for byte what the OOF stages decoded themselves.
    some = ids[::-3]
    expected = original_truths(demo_manifest, items, some)
    read = read_truth_masks(out, some)
    assert read.dtype == expected.dtype and read.tobytes() == expected.tobytes()
    assert read_truth_masks(out / MASKS_FILE, some[:2]).tobytes() == expected[:2].tobytes()
    assert items["train_action"].eq("union").any()  # the conflict's union mask is read


def test_refusals(tmp_path: Path) -> None:
    masks = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(SegflowError, match="3 ids for masks of shape"):
        write_truth_masks(tmp_path, ["a", "b", "c"], masks)
    with pytest.raises(SegflowError, match="repeated"):
        write_truth_masks(tmp_path, ["a", "a"], masks)
    with pytest.raises(SegflowError, match="run truth-masks first"):
        read_truth_masks(tmp_path, ["a"])
    write_truth_masks(tmp_path, ["a", "b"], masks)
    with pytest.raises(SegflowError, match="no truth mask for id 'c'"):
        read_truth_masks(tmp_path, ["b", "c"])
    (tmp_path / IDS_FILE).write_text("id\na\n")
    with pytest.raises(SegflowError, match="rerun truth-masks"):
        read_truth_masks(tmp_path, ["a"])
    items = pd.DataFrame({"id": ["a"], "split": ["train"], "use_for_training": [False]})
    with pytest.raises(SegflowError, match="no train items left"):
        used_train_ids(items)
