"""Inference stages: OOF/test prediction at the original resolution, OOF assembly and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segflow.dedup import DedupOptions, find_duplicates
from segflow.errors import SegflowError
from segflow.evaluate import assemble_oof, original_truths, score_oof
from segflow.folds import FoldOptions, make_folds
from segflow.models import ModelSpec, build_model, save_checkpoint
from segflow.predict import PredictOptions, merge_folds, predict_split, write_prediction
from segflow.preprocess import PreprocessOptions, preprocess


@pytest.fixture(scope="module")
def prepared(demo_manifest: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo data through dedup, preprocess (64x64) and folds, plus an untrained tiny model."""
    root = tmp_path_factory.mktemp("predict")
    items, _ = find_duplicates(demo_manifest, DedupOptions())
    preprocess(demo_manifest, items, PreprocessOptions(height=64, width=64), root / "arrays")
    folds, _ = make_folds(demo_manifest, items, FoldOptions(n_folds=3))
    folds.to_csv(root / "folds.csv", index=False)
    torch.manual_seed(0)
    spec = ModelSpec(arch="Unet", encoder="resnet18", in_channels=1)
    save_checkpoint(root / "model.pt", build_model(spec), spec, {"mean": [0.5], "std": [0.25]})
    return {"root": root, "items": items, "folds": folds, "manifest": demo_manifest}


def test_oof_prediction_covers_exactly_the_validation_fold(prepared: dict) -> None:
    root, folds = prepared["root"], prepared["folds"]
    ids, probs = predict_split(
        root / "arrays",
        root / "model.pt",
        "train",
        PredictOptions(device="cpu"),
        1,
        root / "folds.csv",
    )
    assert sorted(ids["id"]) == sorted(folds.loc[folds["fold"] == 1, "id"])
    assert probs.dtype == np.float16 and probs.shape == (len(ids), 101, 101)  # original size
    assert probs.min() >= 0.0 and probs.max() <= 1.0


def test_test_prediction_with_tta_and_tiling(prepared: dict) -> None:
    root = prepared["root"]
    plain_ids, plain = predict_split(
        root / "arrays", root / "model.pt", "test", PredictOptions(device="cpu")
    )
    n_test = (prepared["manifest"]["split"] == "test").sum()
    assert len(plain_ids) == n_test and plain.shape == (n_test, 101, 101)
    _, d4 = predict_split(
        root / "arrays", root / "model.pt", "test", PredictOptions(tta="d4", device="cpu")
    )
    assert not np.array_equal(d4, plain)  # an untrained net is not rotation invariant
    _, tiled = predict_split(
        root / "arrays", root / "model.pt", "test", PredictOptions(tile=32, device="cpu")
    )
    assert tiled.shape == plain.shape and np.isfinite(tiled.astype(np.float32)).all()


def test_assemble_and_score_oof(prepared: dict, tmp_path: Path) -> None:
    folds, manifest, items = prepared["folds"], prepared["manifest"], prepared["items"]
    truths = original_truths(manifest, items, folds["id"])
    truth_by_id = dict(zip(folds["id"], truths, strict=True))
    dirs = []
    for fold in range(3):
        ids = folds.loc[folds["fold"] == fold, ["id"]].reset_index(drop=True)
        perfect = np.stack([truth_by_id[i] for i in ids["id"]]).astype(np.float16)
        write_prediction(tmp_path / f"fold{fold}", ids, perfect)
        dirs.append(tmp_path / f"fold{fold}")
    ids, probs = assemble_oof(dirs)
    assert ids["id"].tolist() == sorted(folds["id"])
    fold_of = folds.set_index("id").loc[ids["id"], "fold"].to_numpy()
    table, summary = score_oof(probs, original_truths(manifest, items, ids["id"]), fold_of)
    assert summary["kaggle"] == 1.0 and summary["dice"] == 1.0
    empty_share = np.mean([t.sum() == 0 for t in truths])
    assert summary["all_empty_baseline_kaggle"] == pytest.approx(empty_share)
    assert list(table["group"].astype(str)) == ["all", "0", "1", "2"]
    with pytest.raises(SegflowError, match="predicted by two folds"):
        assemble_oof([dirs[0], dirs[0]])


def test_fold_merges() -> None:
    a, b = np.full((1, 2, 2), 0.2), np.full((1, 2, 2), 0.8)
    assert merge_folds([a, b], "mean") == pytest.approx(np.full((1, 2, 2), 0.5))
    assert merge_folds([a, b], "gmean") == pytest.approx(np.full((1, 2, 2), 0.4))
    with pytest.raises(KeyError, match="valid: mean, gmean"):
        merge_folds([a], "median")
