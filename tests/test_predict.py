"""Inference stages: OOF/test prediction at the original resolution, OOF assembly and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import layout_probe_conv

from segflow.artifacts.predictions import merge_folds, nonempty_probs, write_prediction
from segflow.artifacts.truths import original_truths
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.folds import FoldOptions, make_folds
from segflow.data.preprocess import PreprocessOptions, preprocess
from segflow.data.preprocess_test import preprocess_test
from segflow.model.evaluate_oof import assemble_oof
from segflow.model.inference.predict import PredictOptions, predict_split
from segflow.model.metrics import score_oof
from segflow.model.models import ModelSpec, build_model, save_checkpoint


@pytest.fixture(scope="module")
def prepared(demo_manifest: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo data through dedup, preprocess (64x64) and folds, plus an untrained tiny model."""
    root = tmp_path_factory.mktemp("predict")
    items, _ = find_duplicates(demo_manifest, DedupOptions())
    stats = preprocess(
        demo_manifest, items, PreprocessOptions(height=64, width=64), root / "arrays"
    )
    preprocess_test(demo_manifest, stats, root / "arrays")
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
    assert probs.dtype == np.float16 and probs.shape == (len(ids), 1, 101, 101)  # original size
    assert probs.min() >= 0.0 and probs.max() <= 1.0


def test_test_prediction_with_tta_and_tiling(prepared: dict) -> None:
    root = prepared["root"]
    plain_ids, plain = predict_split(
        root / "arrays", root / "model.pt", "test", PredictOptions(device="cpu")
    )
    n_test = (prepared["manifest"]["split"] == "test").sum()
    assert len(plain_ids) == n_test and plain.shape == (n_test, 1, 101, 101)
    assert list(plain_ids.columns) == ["id", "orig_height", "orig_width"]  # no aux head
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
        perfect = np.stack([truth_by_id[i] for i in ids["id"]])[:, None].astype(np.float16)
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
    assert set(table["class"]) == {"mask"} and "per_class" not in summary
    with pytest.raises(SegflowError, match="predicted by two folds"):
        assemble_oof([dirs[0], dirs[0]])


def test_fold_merges() -> None:
    a, b = np.full((1, 2, 2), 0.2), np.full((1, 2, 2), 0.8)
    assert merge_folds([a, b], "mean") == pytest.approx(np.full((1, 2, 2), 0.5))
    assert merge_folds([a, b], "gmean") == pytest.approx(np.full((1, 2, 2), 0.4))
    with pytest.raises(KeyError, match="valid: mean, gmean"):
        merge_folds([a], "median")


def test_aux_head_nonempty_probability_is_averaged_over_tta(prepared: dict) -> None:
    root = prepared["root"]
    torch.manual_seed(1)
    spec = ModelSpec(arch="Unet", encoder="resnet18", in_channels=1, aux_head=True)
    model = build_model(spec)
    save_checkpoint(root / "aux.pt", model, spec, {"mean": [0.5], "std": [0.25]})
    ids, probs = predict_split(
        root / "arrays", root / "aux.pt", "test", PredictOptions(tta="d4", device="cpu")
    )
    gate = nonempty_probs(ids, 1)
    assert gate is not None and gate.shape == (len(ids), 1)
    # The same mean by hand for the first image: sigmoid of the label logit of each D4 copy.
    images = np.load(root / "arrays" / "test_images.npy", mmap_mode="r")
    row = int(pd.read_parquet(root / "arrays" / "test_index.parquet")["row"].iloc[0])
    x = (torch.from_numpy(images[row].astype(np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.25
    copies = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
    model.eval()
    with torch.no_grad():
        expected = torch.stack([torch.sigmoid(model(c)[1]) for c in copies]).mean()
    assert gate[0, 0] == pytest.approx(float(expected), abs=1e-5)
    _, tiled = predict_split(
        root / "arrays", root / "aux.pt", "test", PredictOptions(tile=32, device="cpu")
    )
    assert tiled.shape == probs.shape  # tiled runs predict masks, and no gate (tiles != images)


def test_multilabel_scores_average_over_classes() -> None:
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[0, :4] |= 1  # class 0 on images 0, 1
    truth[1, 2:] |= 1
    truth[2, :, :3] |= 2  # class 1 on image 2 only
    probs = np.zeros((4, 2, 8, 8), np.float16)
    probs[:, 0] = truth & 1  # class 0 perfect
    probs[2, 1, :, :3] = 1  # class 1 perfect on image 2 ...
    probs[3, 1, 0, 0] = 1  # ... and a false positive on the empty image 3
    table, summary = score_oof(probs, truth, np.array([0, 0, 1, 1]), ["a", "b"])
    per_class = {r["class"]: r["kaggle"] for r in summary["per_class"]}
    assert per_class == {"a": 1.0, "b": 0.75}
    assert summary["kaggle"] == pytest.approx(0.875)
    assert summary["all_empty_baseline_kaggle"] == pytest.approx((0.5 + 0.75) / 2)
    assert len(table) == 2 * 3  # (all, fold 0, fold 1) per class
    with pytest.raises(SegflowError, match="one map per class"):
        score_oof(probs[:, :1], truth, np.zeros(4), ["a", "b"])


class _OutOfMemoryAbove(torch.nn.Module):
    """A model that raises CUDA's out-of-memory error for batches larger than ``limit``."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.model(x)


def _tiny_aux_model() -> torch.nn.Module:
    """A seeded 1-channel Unet-mobilenet_v2 (depth 3) with the aux head, in eval mode."""
    torch.manual_seed(0)
    spec = ModelSpec(
        encoder="mobilenet_v2",
        in_channels=1,
        aux_head=True,
        extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    )
    return build_model(spec).eval()


def test_a_batch_out_of_device_memory_is_retried_at_half_size_with_the_same_output() -> None:
    from segflow.model.inference.predict import predict_rows_uncertain

    model = _tiny_aux_model()
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 1), dtype=np.uint8)
    rows = np.array([6, 0, 3, 1, 5, 2, 4])
    device = torch.device("cpu")

    def predict(net: torch.nn.Module, batch_size: int) -> tuple:
        options = PredictOptions(tta="hflip", batch_size=batch_size, device="cpu")
        return predict_rows_uncertain(net, images, rows, [0.5], [0.25], options, device)

    expected = predict(model, 2)
    failing = _OutOfMemoryAbove(model, limit=4)  # hflip TTA: one call on both copies
    got = predict(failing, 8)
    assert failing.sizes[:3] == [14, 8, 4]  # 7 and 4 rows fail; 2 for the rest
    assert max(failing.sizes[3:]) == 4
    for left, right in zip(got[:2], expected[:2], strict=True):
        assert left.tobytes() == right.tobytes()  # byte-identical on the CPU
    with pytest.raises(torch.OutOfMemoryError):
        predict(_OutOfMemoryAbove(model, limit=0), 4)  # still out of memory at 1: raised


def test_predict_amp_is_bf16_or_off_in_the_options_and_the_schema() -> None:
    import jsonschema
    import yaml
    from conftest import REPO_ROOT

    schema_path = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    predict = schema["properties"]["predict"]
    assert predict["properties"]["amp"]["enum"] == ["bf16", "float32"]
    assert PredictOptions().amp == predict["properties"]["amp"]["default"] == "bf16"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"amp": "fp16"}, predict)


def test_channels_last_prediction_matches_the_contiguous_one_and_is_the_default() -> None:
    from segflow.model.inference.predict import predict_rows_uncertain

    model = _tiny_aux_model()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    rows = np.arange(5)
    device = torch.device("cpu")

    def predict(channels_last: bool) -> tuple:
        options = PredictOptions(tta="hflip", device="cpu", channels_last=channels_last)
        return predict_rows_uncertain(model, images, rows, [0.5], [0.25], options, device)

    assert PredictOptions().channels_last is True
    nhwc = predict(True)
    conv = layout_probe_conv(model)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = predict(False)
    assert conv.weight.is_contiguous()
    np.testing.assert_allclose(nhwc[0], nchw[0], atol=1e-5)
    np.testing.assert_allclose(nhwc[1], nchw[1], atol=1e-5)
