"""The data stages through Snakemake on the real Kaggle TGS Salt data (skipped without ../shared)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, run_snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def tgs_run(tgs_salt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config/examples/tgs-salt.yaml, pointed at the fixture's copy of the data, run once."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tgs"))
    config = yaml.safe_load((workdir / "config" / "examples" / "tgs-salt.yaml").read_text())
    config["results_dir"] = "results"
    config["data"].update(
        train_images=str(tgs_salt / "train" / "images"),
        test_images=str(tgs_salt / "test" / "images"),
        train_masks=str(tgs_salt / "train" / "masks"),
        metadata_csv=str(tgs_salt / "depths.csv"),
    )
    (workdir / "tgs.yaml").write_text(yaml.safe_dump(config))
    # The data stages only: training on 3,200 images is far too slow for the test suite.
    targets = [
        "results/folds/folds.csv",
        "results/preprocess/stats.json",
        "results/preprocess/test_images.npy",
        "results/dedup/test_leaks.parquet",
    ]
    run_snakemake(workdir, *targets, "--configfile", "tgs.yaml")
    return workdir / "results"


def file_md5(path: str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def both_manifests(results: Path) -> pd.DataFrame:
    """The train and the test manifest (ingest_train, ingest_test) as one table."""
    return pd.concat(
        [
            pd.read_parquet(results / "ingest" / name)
            for name in ("manifest.parquet", "test_manifest.parquet")
        ],
        ignore_index=True,
    )


def test_ingest_reads_every_item_with_mixed_bit_depth_masks(tgs_run: Path) -> None:
    manifest = both_manifests(tgs_run)
    train = manifest[manifest["split"] == "train"]
    assert len(train) == 3200 and (manifest["split"] == "test").sum() == 3000
    assert manifest["is_gray"].all() and (manifest["channels"] == 3).all()
    assert manifest["meta_z"].notna().all()
    # ~39% of the masks are empty (8-bit files); the others are 16-bit 0/65535 files.
    assert 0.37 < (train["mask_coverage"] == 0).mean() < 0.41


def test_dedup_finds_the_identical_blank_images_within_and_across_splits(tgs_run: Path) -> None:
    manifest = both_manifests(tgs_run).set_index("id")
    # dedup groups the train set; the leaks stage links the test items to it.
    items = pd.concat(
        [
            pd.read_parquet(tgs_run / "dedup" / "items.parquet"),
            pd.read_parquet(tgs_run / "dedup" / "test_leaks.parquet"),
        ]
    ).set_index("id")
    summary = json.loads((tgs_run / "dedup" / "summary.json").read_text())
    leaks = json.loads((tgs_run / "dedup" / "test_leaks.json").read_text())
    # Independent check of the expectation: hash the files themselves.
    digests = manifest["image_path"].map(file_md5)
    counts = digests.groupby(manifest["split"]).value_counts()
    blank_digest = digests.value_counts().index[0]
    assert counts.loc[("train", blank_digest)] == 65 and counts.loc[("test", blank_digest)] == 73
    group = items[digests.loc[items.index] == blank_digest]
    assert group["exact_group"].nunique() == 1 and len(group) == 138
    assert summary["groups_with_train_duplicates"] >= 1
    assert leaks["test_items_in_test_duplicates"] >= 73
    assert leaks["groups_across_train_test"] >= 1
    assert leaks["test_items_with_train_label"] >= 73
    blank = manifest.loc[digests == blank_digest]
    assert (blank.loc[blank["split"] == "train", "mask_coverage"] == 0).all()


def test_folds_keep_the_blank_block_together_and_balance_empties(tgs_run: Path) -> None:
    folds = pd.read_csv(tgs_run / "folds" / "folds.csv", dtype={"id": str})
    items = pd.read_parquet(tgs_run / "dedup" / "items.parquet")
    largest = items[items["split"] == "train"]["exact_group"].value_counts().index[0]
    block = items[(items["exact_group"] == largest) & (items["split"] == "train")]["id"]
    assert folds.set_index("id").loc[block, "fold"].nunique() == 1
    assert len(folds) == 3200 and folds.groupby("group")["fold"].nunique().max() == 1
    empties = folds[folds["stratum"] == 0].groupby("fold").size()
    assert empties.max() - empties.min() <= 70  # the 65-image block must land somewhere


def test_preprocess_resizes_to_64_single_channel(tgs_run: Path) -> None:
    # tgs-salt.yaml (the CPU recipe) resizes 101 -> 64; the GPU recipe uses 128.
    images = np.load(tgs_run / "preprocess" / "train_images.npy", mmap_mode="r")
    masks = np.load(tgs_run / "preprocess" / "train_masks.npy", mmap_mode="r")
    assert images.shape == (3200, 64, 64, 1) and masks.shape == (3200, 64, 64)
    assert np.load(tgs_run / "preprocess" / "test_images.npy", mmap_mode="r").shape == (
        3000,
        64,
        64,
        1,
    )
