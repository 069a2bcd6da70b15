"""The second-level (stacking) layer: features, backends, honest cross-fitting, gate, blender."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, ClassVar, Self

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from segflow.artifacts.predictions import Prediction
from segflow.core.errors import SegflowError
from segflow.ensemble.stacking import learners as stacking
from segflow.ensemble.stacking.features import (
    image_features,
    iter_pixel_features,
    pixel_feature_names,
    sample_pixels,
    sample_weights,
    sampled_pixel_features,
)
from segflow.ensemble.stacking.learners import (
    apply_pixel_blender,
    cross_fit,
    fit_gate,
    fit_pixel_blender,
    load_classifier,
    make_classifier,
    nonempty_images,
    write_blender_artifacts,
    write_gate_artifacts,
)
from segflow.ensemble.stacking.stack import (
    StackInputs,
    StackOptions,
    _base_oof,
    load_stack_inputs,
    run_stack,
)
from segflow.model.metrics import dice_scores
from segflow.model.postprocess import apply_postprocess, tune_postprocess

BACKEND_NAMES = ["lightgbm", "catboost"]
# Fewer, faster trees than the defaults where a test only needs a working model.
QUICK = {
    "lightgbm": {"num_iterations": 40, "learning_rate": 0.2, "num_threads": 1},
    "catboost": {"iterations": 40, "learning_rate": 0.2, "thread_count": 1},
}


def _quick(backend: str, **overrides: Any) -> dict[str, Any]:
    return {**QUICK[backend], **overrides}


def _toy_table(n: int = 120, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """x0 decides the target (with a little noise); x1 is noise with missing values."""
    rng = np.random.default_rng(seed)
    features = pd.DataFrame({"x0": rng.normal(size=n), "x1": rng.normal(size=n)})
    features.loc[rng.random(n) < 0.2, "x1"] = np.nan
    target = (features["x0"] + 0.3 * rng.normal(size=n) > 0).to_numpy(dtype=np.int64)
    return features, target


# --- image features -------------------------------------------------------------------------


def test_image_features_on_hand_computable_maps() -> None:
    maps = np.full((3, 4, 5), 0.1, dtype=np.float16)
    maps[0, 0, 0] = 0.9  # a corner pixel: touches the border
    maps[0, 2, 2:4] = 0.6  # a separate 2-pixel object inside
    maps[1, 1, 1] = maps[1, 2, 2] = 0.8  # diagonal neighbours: ONE 8-connected object
    maps[2] = 0.0  # nothing above 0.5
    images = np.zeros((3, 2, 2, 1), dtype=np.uint8)
    images[0] = [[[0], [255]], [[255], [255]]]  # first channel: 0, 1, 1, 1 after scaling
    metadata = pd.DataFrame({"id": ["a", "b", "c"], "meta_depth": [10.0, np.nan, 30.0]})

    features = image_features({"exp": maps}, images, metadata)

    row0, row1, row2 = (features.iloc[i] for i in range(3))
    approx = lambda value: pytest.approx(value, abs=2e-3)  # noqa: E731 - float16 inputs
    assert row0["exp__area_gt0.3"] == approx(3 / 20)
    assert row0["exp__area_gt0.5"] == approx(3 / 20)
    assert row0["exp__area_gt0.7"] == approx(1 / 20)
    assert row0["exp__prob_max"] == approx(0.9)
    assert row0["exp__prob_mean"] == approx((0.9 + 2 * 0.6 + 17 * 0.1) / 20)
    assert row0["exp__prob_mean_in_mask"] == approx((0.9 + 2 * 0.6) / 3)
    assert row0["exp__components"] == 2
    assert row0["exp__largest_component_area"] == approx(2 / 20)
    assert row0["exp__border_contact"] == approx(1 / 14)  # 14 border pixels in a 4x5 map
    assert row1["exp__components"] == 1
    assert row1["exp__largest_component_area"] == approx(2 / 20)
    assert row1["exp__border_contact"] == 0
    assert row2["exp__components"] == 0
    assert np.isnan(row2["exp__prob_mean_in_mask"])
    assert row0["image__mean"] == approx(0.75)
    assert row0["image__std"] == approx(np.std([0, 1, 1, 1]))
    assert row1["image__p90"] == 0
    assert "id" not in features.columns  # non-meta metadata is ignored
    np.testing.assert_array_equal(features["meta_depth"], [10.0, np.nan, 30.0])


def test_image_features_do_not_depend_on_chunking() -> None:
    rng = np.random.default_rng(1)
    maps = {"a": rng.random((7, 6, 6)).astype(np.float16), "b": rng.random((7, 6, 6))}
    images = rng.integers(0, 65535, (7, 9, 9, 2), dtype=np.uint16)
    whole = image_features(maps, images)
    pd.testing.assert_frame_equal(image_features(maps, images, chunk_images=2), whole)


def test_image_features_count_planted_blobs() -> None:
    """stack.blob_sigmas adds DoG blob counts and sizes of each image to the gate's features."""
    images = np.full((2, 64, 64, 1), 20, np.uint8)
    for row, col, radius in ((12, 12, 3), (16, 44, 5), (46, 24, 7)):
        cv2.circle(images[0], (col, row), radius, 220, thickness=-1)
    maps = {"a": np.zeros((2, 8, 8), np.float32)}
    features = image_features(maps, images, blob_sigmas=(1, 2, 4, 8), blob_threshold=0.2)
    assert features["image__blob_count"].tolist() == [3.0, 0.0]
    assert features.loc[0, "image__blob_area_max"] > features.loc[0, "image__blob_area_mean"] > 0
    assert features.loc[1, "image__blob_area_max"] == 0
    without = image_features(maps, images)
    assert "image__blob_count" not in without
    pd.testing.assert_frame_equal(features[list(without.columns)], without)
    chunked = image_features(maps, images, chunk_images=1, blob_sigmas=(1, 2, 4, 8))
    pd.testing.assert_frame_equal(chunked, image_features(maps, images, blob_sigmas=(1, 2, 4, 8)))


def test_gate_with_blob_features_records_them(tmp_path) -> None:
    summary = _run("gate", tmp_path / "blobs", True, blob_sigmas=[1, 2, 4])
    assert list(summary["options"]["blob_sigmas"]) == [1.0, 2.0, 4.0]
    features = pd.read_parquet(tmp_path / "blobs" / "stack" / "class_0" / "features_oof.parquet")
    assert {"image__blob_count", "image__blob_area_mean", "image__blob_area_max"} <= set(
        features.columns
    )
    with pytest.raises(SegflowError, match=r"stack\.blob_sigmas"):
        StackOptions(blob_sigmas=[2, 1])
    with pytest.raises(SegflowError, match=r"stack\.blob_threshold"):
        StackOptions(blob_threshold=0)


# --- backends ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backends_share_one_interface_and_round_trip(backend: str, tmp_path) -> None:
    features, target = _toy_table()
    model = make_classifier(backend, _quick(backend), seed=3).fit(features, target)
    again = make_classifier(backend, _quick(backend), seed=3).fit(features, target)

    prediction = model.predict_proba(features)
    assert prediction.shape == (len(features),) and prediction.dtype == np.float64
    assert ((prediction >= 0) & (prediction <= 1)).all()
    assert roc_auc_score(target, prediction) > 0.9
    np.testing.assert_array_equal(again.predict_proba(features), prediction)  # deterministic
    # Column order does not matter; names do.
    np.testing.assert_array_equal(model.predict_proba(features[["x1", "x0"]]), prediction)
    importances = model.feature_importances()
    assert list(importances.index) == ["x0", "x1"]
    assert importances.sum() == pytest.approx(1.0) and importances.idxmax() == "x0"

    path = model.save(tmp_path / f"model{model.suffix}")
    for loaded in (load_classifier(path), type(model).load(path)):
        assert loaded.backend == backend and loaded.feature_names == ["x0", "x1"]
        np.testing.assert_array_equal(loaded.predict_proba(features), prediction)
    assert list(tmp_path.iterdir()) == [path]  # atomic write left no temporary behind
    with pytest.raises(SegflowError, match="saved as"):
        model.save(tmp_path / "model.bin")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("constant", [0, 1])
def test_constant_target_predicts_that_constant(backend: str, constant: int, tmp_path) -> None:
    features, _ = _toy_table(30)
    model = make_classifier(backend, _quick(backend)).fit(features, np.full(30, constant))
    np.testing.assert_allclose(model.predict_proba(features), constant, atol=1e-9)
    assert (model.feature_importances() == 0).all()
    loaded = load_classifier(model.save(tmp_path / f"m{model.suffix}"))
    np.testing.assert_allclose(loaded.predict_proba(features), constant, atol=1e-9)
    assert (loaded.feature_importances() == 0).all()


# --- honest cross-fitting -------------------------------------------------------------------

# Enough capacity to memorise rows (what a leaky cross-fit would exploit).
MEMORISING = {
    "lightgbm": {
        "num_iterations": 150,
        "learning_rate": 0.3,
        "num_leaves": 63,
        "min_data_in_leaf": 1,
        "min_sum_hessian_in_leaf": 1e-6,
        "min_data_in_bin": 1,
        "num_threads": 1,
    },
    "catboost": {"iterations": 150, "learning_rate": 0.5, "depth": 6, "thread_count": 1},
}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_cross_fit_leakage_probe(backend: str) -> None:
    # The target is a coin flip per row; the only feature is a row-unique random id. The id tells
    # the target only to a model that saw that very row (a lookup table), never to one that did
    # not, so an honest OOF scores chance while in-sample prediction is near perfect.
    rng = np.random.default_rng(7)
    n = 200
    target = rng.integers(0, 2, n)
    features = pd.DataFrame({"row_key": rng.permutation(n) / n})
    folds = np.arange(n) % 5

    oof, final_model, fold_models = cross_fit(
        features, target, folds, backend, MEMORISING[backend], seed=0
    )

    in_sample_auc = roc_auc_score(target, final_model.predict_proba(features))
    assert in_sample_auc > 0.95  # the probe works: seeing a row reveals its target
    assert abs(roc_auc_score(target, oof) - 0.5) < 0.15  # honest: chance level
    assert sorted(fold_models) == [0, 1, 2, 3, 4]


class _RecordingClassifier:
    """A stand-in backend that remembers which ``row_id`` values it was trained on and predicts
    1 exactly for those: any leak of a row into its own fold's model shows up as a 1."""

    backend: ClassVar[str] = "recording"
    suffix: ClassVar[str] = ".rec"

    def __init__(self, params: Any = None, seed: int = 0) -> None:
        self.seen: set[float] = set()
        self.feature_names: list[str] = []
        self.key = (params or {}).get("key", "row_id")

    def fit(self, features: pd.DataFrame, target: np.ndarray, sample_weight: Any = None) -> Self:
        self.feature_names = list(features.columns)
        self.seen = set(np.round(features[self.key].to_numpy(), 6).tolist())
        return self

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        keys = np.round(features[self.key].to_numpy(), 6)
        return np.isin(keys, list(self.seen)).astype(np.float64)

    def feature_importances(self) -> pd.Series:
        return pd.Series(1.0 / len(self.feature_names), index=self.feature_names)


def test_cross_fit_predicts_each_fold_with_a_model_that_never_saw_it(monkeypatch) -> None:
    monkeypatch.setitem(stacking.BACKENDS, "recording", _RecordingClassifier)
    rng = np.random.default_rng(0)
    n = 60
    features = pd.DataFrame({"row_id": np.arange(n, dtype=float), "x": rng.normal(size=n)})
    folds = rng.integers(0, 4, n)

    oof, final_model, fold_models = cross_fit(features, rng.integers(0, 2, n), folds, "recording")

    np.testing.assert_array_equal(oof, 0.0)  # no row was predicted by a model that saw it
    for fold, model in fold_models.items():
        assert model.seen == set(np.flatnonzero(folds != fold).astype(float).tolist())
    assert final_model.predict_proba(features).min() == 1.0  # the final model saw every row


# --- image-level gate -------------------------------------------------------------------------


def _planted_gate_data(n: int = 200) -> tuple[dict[str, np.ndarray], np.ndarray, pd.DataFrame]:
    """Maps are the same kind of noise everywhere; only meta_depth > 500 says "non-empty"."""
    rng = np.random.default_rng(11)
    maps = {"a": rng.random((n, 8, 8)).astype(np.float16), "b": rng.random((n, 8, 8))}
    depth = rng.uniform(0, 1000, n)
    nonempty = depth > 500
    # The true mask is where the first model says so, but only on deep images.
    truths = (maps["a"] > 0.5) & nonempty[:, None, None]
    metadata = pd.DataFrame({"meta_depth": depth, "meta_noise": rng.normal(size=n)})
    return maps, truths, metadata


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gate_finds_the_planted_metadata_feature(backend: str) -> None:
    maps, truths, metadata = _planted_gate_data()
    features = image_features(maps, None, metadata)
    folds = np.arange(len(truths)) % 5

    gate = fit_gate(features, nonempty_images(truths), folds, backend, _quick(backend), seed=0)

    assert gate.auc > 0.95
    assert gate.importances.index[0] == "meta_depth"
    assert gate.nonempty_prob.shape == (len(truths),)
    np.testing.assert_array_equal(gate.truth_nonempty, truths.any(axis=(1, 2)))
    # The OOF probability plugs straight into the existing gate search, which now uses it.
    best, _ = tune_postprocess(
        maps["a"].astype(np.float32), truths, [0.5], [0], nonempty=gate.nonempty_prob, gates=[0.5]
    )
    assert best.gate == 0.5
    ungated = dice_scores(maps["a"] > 0.5, truths).mean()
    gated = apply_postprocess(maps["a"].astype(np.float32), best, gate.nonempty_prob)
    assert dice_scores(gated, truths).mean() > ungated + 0.3


def test_gate_artifacts(tmp_path) -> None:
    maps, truths, metadata = _planted_gate_data(60)
    features = image_features(maps, None, metadata)
    folds = np.arange(60) % 3
    gate = fit_gate(features, nonempty_images(truths), folds, "lightgbm", _quick("lightgbm"))
    ids = [f"img{i:03d}" for i in range(60)]

    paths = write_gate_artifacts(gate, tmp_path, ids)

    oof = pd.read_csv(paths["oof"])
    assert list(oof["id"]) == ids
    np.testing.assert_allclose(oof["nonempty_prob"], gate.nonempty_prob)
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["backend"] == "lightgbm" and metrics["auc"] == pytest.approx(gate.auc)
    assert sorted(metrics["folds"]) == ["0", "1", "2"]
    model = load_classifier(paths["model"])
    np.testing.assert_array_equal(
        model.predict_proba(features), gate.final_model.predict_proba(features)
    )
    with pytest.raises(SegflowError, match="ids"):
        write_gate_artifacts(gate, tmp_path, ids[:-1])


# --- pixel features and blender --------------------------------------------------------------


def test_sample_pixels_is_stratified_and_seeded() -> None:
    rng = np.random.default_rng(2)
    truth = np.zeros((3, 10, 10), dtype=bool)
    truth[0, :3, :3] = True  # 9 positives
    truth[2] = rng.random((10, 10)) < 0.5

    rows, ys, xs = sample_pixels(truth, 20, seed=5)

    labels = truth[rows, ys, xs]
    assert (labels[rows == 0]).sum() == 9 and (rows == 0).sum() == 20  # scarce: all positives
    assert not labels[rows == 1].any() and (rows == 1).sum() == 20  # empty image: negatives
    assert labels[rows == 2].sum() == 10 and (rows == 2).sum() == 20  # balanced
    assert len(set(zip(rows, ys, xs, strict=True))) == len(rows)  # without replacement
    again = sample_pixels(truth, 20, seed=5)
    for first, second in zip((rows, ys, xs), again, strict=True):
        np.testing.assert_array_equal(first, second)
    # An image's sample does not depend on the images after it.
    alone = sample_pixels(truth[:2], 20, seed=5)
    np.testing.assert_array_equal(alone[1], ys[rows < 2])
    assert not np.array_equal(sample_pixels(truth, 20, seed=6)[1], ys)


def test_pixel_features_of_a_sample_match_whole_images() -> None:
    rng = np.random.default_rng(3)
    maps = {"a": rng.random((4, 6, 7)).astype(np.float16), "b": rng.random((4, 6, 7))}
    images = rng.integers(0, 255, (4, 12, 14, 3), dtype=np.uint8)
    names = pixel_feature_names(["a", "b"], with_images=True)
    whole = pd.concat(frame for _, frame in iter_pixel_features(maps, images, chunk_images=3))
    assert list(whole.columns) == names and len(whole) == 4 * 6 * 7
    rows, ys, xs = np.array([0, 2, 3, 3]), np.array([0, 5, 2, 0]), np.array([0, 6, 3, 6])

    sampled = sampled_pixel_features(maps, images, rows, ys, xs, chunk_images=1)

    flat = rows * 42 + ys * 7 + xs
    np.testing.assert_array_equal(sampled.to_numpy(), whole.to_numpy()[flat])
    pixel = sampled.iloc[1]  # image 2, bottom-right corner
    window = maps["b"][2, 4:, 5:]  # the part of the 3x3 window inside the image
    assert pixel["b__max3"] == pytest.approx(window.max())
    assert pixel["pos_y"] == pytest.approx(5.5 / 6) and pixel["pos_x"] == pytest.approx(6.5 / 7)


def _planted_blend_data(n: int = 40) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Truth is "a > 0.5 unless b > 0.5": no threshold of a, of b or of their mean says that."""
    rng = np.random.default_rng(4)
    maps = {"a": rng.random((n, 12, 12)).astype(np.float16), "b": rng.random((n, 12, 12))}
    return maps, (maps["a"] > 0.5) & ~(maps["b"] > 0.5)


def test_pixel_blender_learns_a_rule_no_single_map_or_mean_can() -> None:
    maps, truth = _planted_blend_data()
    folds = np.arange(len(truth)) % 4

    result = fit_pixel_blender(
        maps, truth, folds, None, "lightgbm", _quick("lightgbm"), seed=0, pixels_per_image=64
    )

    assert result.oof_probs.dtype == np.float16 and result.oof_probs.shape == truth.shape
    blended = dice_scores(result.oof_probs > 0.5, truth).mean()
    mean_map = (maps["a"].astype(np.float32) + maps["b"]) / 2
    baselines = [dice_scores(m > 0.5, truth).mean() for m in (maps["a"], maps["b"], mean_map)]
    assert blended > 0.95 and blended > max(baselines) + 0.2
    assert result.scores.loc["blend", "dice"] == pytest.approx(blended)
    assert result.n_samples == len(truth) * 64
    # Chunked prediction equals one big call.
    one_call = apply_pixel_blender(result.final_model, maps, chunk_images=len(truth))
    np.testing.assert_array_equal(
        apply_pixel_blender(result.final_model, maps, chunk_images=3), one_call
    )


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_pixel_blender_backends_and_artifacts(backend: str, tmp_path) -> None:
    maps, truth = _planted_blend_data(12)
    images = np.random.default_rng(5).integers(0, 255, (12, 6, 6, 1), dtype=np.uint8)
    result = fit_pixel_blender(
        maps, truth, np.arange(12) % 3, images, backend, _quick(backend), pixels_per_image=32
    )
    assert "image__intensity" in result.importances.index

    paths = write_blender_artifacts(result, tmp_path)

    np.testing.assert_array_equal(np.load(paths["oof_probs"]), result.oof_probs)
    model = load_classifier(paths["model"])
    np.testing.assert_array_equal(
        apply_pixel_blender(model, maps, images, rows=[3, 1]),
        apply_pixel_blender(result.final_model, maps, images)[[3, 1]],
    )
    assert json.loads(paths["metrics"].read_text())["n_samples"] == result.n_samples


def test_pixel_blender_predicts_each_fold_with_a_model_that_never_saw_it(monkeypatch) -> None:
    # Every image's map is one image-unique value, so the "a__prob" feature names the image the
    # pixel came from; the recording backend predicts 1 exactly for images it was trained on.
    monkeypatch.setitem(stacking.BACKENDS, "recording", _RecordingClassifier)
    n = 10
    maps = {"a": np.repeat(np.linspace(0.1, 0.9, n), 25).reshape(n, 5, 5)}
    truth = np.random.default_rng(6).random((n, 5, 5)) < 0.5
    folds = np.arange(n) % 3

    result = fit_pixel_blender(
        maps, truth, folds, None, "recording", {"key": "a__prob"}, pixels_per_image=8
    )

    np.testing.assert_array_equal(result.oof_probs, 0.0)
    assert (apply_pixel_blender(result.final_model, maps) == 1.0).all()


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors() -> None:
    features, target = _toy_table(20)
    maps = {"a": np.zeros((4, 5, 5), dtype=np.float32)}
    with pytest.raises(KeyError, match="lightgbm, catboost"):
        make_classifier("xgboost")
    with pytest.raises(KeyError, match="xgboost"):
        cross_fit(features, target, np.arange(20) % 2, "xgboost")
    with pytest.raises(SegflowError, match="shape"):
        image_features({"a": maps["a"], "b": np.zeros((4, 5, 6), dtype=np.float32)})
    with pytest.raises(SegflowError, match="metadata has 3 rows"):
        image_features(maps, metadata=pd.DataFrame({"meta_depth": [1.0, 2.0, 3.0]}))
    with pytest.raises(SegflowError, match="'meta_site' is not numeric"):
        image_features(maps, metadata=pd.DataFrame({"meta_site": list("abcd")}))
    with pytest.raises(SegflowError, match="images has 2 images"):
        image_features(maps, np.zeros((2, 5, 5, 1), dtype=np.uint8))
    with pytest.raises(SegflowError, match="'colour' is not numeric"):
        make_classifier("lightgbm").fit(features.assign(colour="red"), target)
    with pytest.raises(SegflowError, match="target must have shape"):
        make_classifier("catboost").fit(features, target[:-1])
    with pytest.raises(SegflowError, match="0/1"):
        make_classifier("lightgbm").fit(features, target * 2)
    with pytest.raises(SegflowError, match="folds must have shape"):
        cross_fit(features, target, np.arange(19) % 2)
    with pytest.raises(SegflowError, match="two distinct folds"):
        cross_fit(features, target, np.zeros(20, dtype=int))
    model = make_classifier("lightgbm", _quick("lightgbm")).fit(features, target)
    with pytest.raises(SegflowError, match=r"missing \['x1'\]"):
        model.predict_proba(features[["x0"]])
    with pytest.raises(SegflowError, match="not fitted"):
        make_classifier("catboost").predict_proba(features)
    with pytest.raises(SegflowError, match="class_truths"):
        fit_pixel_blender(maps, np.full((4, 5, 5), 3, dtype=np.uint8), np.arange(4) % 2)
    with pytest.raises(SegflowError, match="truth_plane has shape"):
        fit_pixel_blender(maps, np.zeros((4, 5, 6), dtype=bool), np.arange(4) % 2)
    with pytest.raises(SegflowError, match="characters"):
        image_features({"exp a": maps["a"]})


def test_pixel_blender_probabilities_return_to_the_images_base_rate() -> None:
    # The sample is half positives; the images are 10% positive. With uninformative maps the
    # blend can only learn the base rate, and must report the images' rate, not the sample's.
    rng = np.random.default_rng(11)
    maps = {"a": rng.random((60, 12, 12)).astype(np.float32)}
    truth = rng.random((60, 12, 12)) < 0.1
    result = fit_pixel_blender(maps, truth, np.arange(60) % 3, pixels_per_image=64)
    assert float(np.mean(result.oof_probs, dtype=np.float64)) == pytest.approx(0.1, abs=0.03)


def test_sample_weights_give_back_each_images_class_balance() -> None:
    truth = np.zeros((2, 10, 10), dtype=bool)
    truth[0, :2] = True  # 20 positives, 80 negatives
    rows, ys, xs = sample_pixels(truth, 10, seed=0)  # image 0: 5 + 5, image 1: 10 negatives
    weights = sample_weights(truth, rows, ys, xs)
    label = truth[rows, ys, xs]
    per_pixel = weights * 200 / len(weights)  # undo the mean-1 normalisation (200 pixels)
    assert per_pixel[(rows == 0) & label].sum() == pytest.approx(20)
    assert per_pixel[(rows == 0) & ~label].sum() == pytest.approx(80)
    assert per_pixel[rows == 1].sum() == pytest.approx(100)
    assert weights.mean() == pytest.approx(1.0)


# --- the stage: one job per stacked candidate -------------------------------------------------


def stack_data(with_base: bool, n: int = 24) -> dict[str, Any]:
    """Two experiments' OOF and test maps of ``n`` 12x12 images (one class, 3 folds), the
    ensemble's mean (with an aux gate column) when ``with_base``, images and metadata: the
    fit's :class:`StackInputs` (``inputs``) and the test side apply-stack reads."""
    rng = np.random.default_rng(7)
    truths = np.zeros((n, 12, 12), np.uint8)
    for i in range(n):
        if i % 3:
            truths[i, 2 : 5 + i % 7, 3:9] = 1

    def maps(noise: float, rows: int) -> np.ndarray:
        base = truths[:rows] if rows == n else truths[rows - 1 :: -1][:rows]
        return np.clip(base * 0.6 + rng.random((rows, 12, 12)) * noise, 0, 1)[:, None]

    def ids(prefix: str, rows: int, folds: bool) -> pd.DataFrame:
        frame = pd.DataFrame(
            {"id": [f"{prefix}{i:02d}" for i in range(rows)], "orig_height": 12, "orig_width": 12}
        )
        if folds:
            frame["fold"] = np.arange(rows) % 3
        frame["nonempty_prob_0"] = rng.random(rows)
        return frame

    oof_ids, test_ids = ids("img", n, True), ids("t", 10, False)
    oof = [Prediction(oof_ids, maps(0.5, n).astype(np.float16)) for _ in range(2)]
    test = [Prediction(test_ids, maps(0.5, 10).astype(np.float16)) for _ in range(2)]

    def mean(predictions: list[Prediction]) -> Prediction:
        probs = np.mean([p.probs.astype(np.float32) for p in predictions], axis=0)
        return Prediction(predictions[0].ids, probs.astype(np.float16))

    inputs = StackInputs(
        names=["a", "b"],
        oof=oof,
        base_oof=mean(oof) if with_base else None,
        truths=truths,
        folds=oof_ids[["id", "fold"]],
        classes=["mask"],
        train_images=rng.integers(0, 255, (n, 12, 12, 1), dtype=np.uint8),
        train_metadata=pd.DataFrame({"meta_depth": rng.random(n)}),
    )
    return {
        "inputs": inputs,
        "test": test,
        "base_test": mean(test) if with_base else None,
        "test_images": rng.integers(0, 255, (10, 12, 12, 1), dtype=np.uint8),
        "test_metadata": pd.DataFrame({"meta_depth": rng.random(10)}),
    }


def _stack_inputs(with_base: bool, n: int = 24) -> StackInputs:
    return stack_data(with_base, n)["inputs"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _run(stacker: str, out: Path, with_base: bool, **options: Any) -> dict[str, Any]:
    candidate = out / "candidate"
    return run_stack(
        _stack_inputs(with_base),
        StackOptions(**options),
        stacker,
        out / "stack",
        candidate / "oof",
    )


def test_gate_and_pixel_jobs_share_the_class_folders_without_sharing_a_file(tmp_path) -> None:
    gate = _run("gate", tmp_path / "gate", True, threshold_target=True)
    pixel = _run("pixel", tmp_path / "pixel", False, pixels_per_image=16)
    gate_files = _files(tmp_path / "gate" / "stack")
    pixel_files = _files(tmp_path / "pixel" / "stack")
    assert not set(gate_files) & set(pixel_files)
    assert {"class_0/features_oof.parquet", "class_0/gate_model.txt", "summary_gate.json"} <= set(
        gate_files
    )
    assert "class_0/threshold_model.txt" in gate_files
    assert "summary_pixel.json" in pixel_files
    assert all(
        name.startswith("class_0/blender_") for name in set(pixel_files) - {"summary_pixel.json"}
    )
    # Each summary records the options its candidate reads, and only those.
    assert gate["options"] == {"backend": "lightgbm", "seed": 0, "threshold_target": True}
    assert pixel["options"] == {"backend": "lightgbm", "seed": 0, "pixels_per_image": 16}
    assert set(gate["candidates"]) == {"stack_gate"} and set(pixel["candidates"]) == {"stack_pixel"}
    assert set(gate["classes"]["mask"]) == {"gate", "threshold"}
    assert set(pixel["classes"]["mask"]) == {"blender"}
    # The gate's candidate carries its gate; the blender's carries none (as the ensemble's ids).
    gate_ids = pd.read_csv(tmp_path / "gate" / "candidate" / "oof" / "oof_ids.csv")
    pixel_ids = pd.read_csv(tmp_path / "pixel" / "candidate" / "oof" / "oof_ids.csv")
    assert "nonempty_prob_0" in gate_ids and "nonempty_prob_0" not in pixel_ids
    assert list(pixel_ids.columns) == ["id", "orig_height", "orig_width", "fold"]
    assert np.load(tmp_path / "pixel" / "candidate" / "oof" / "oof_probs.npy").shape == (
        24,
        1,
        12,
        12,
    )


@pytest.mark.parametrize(
    ("stacker", "with_base", "other"),
    [("gate", True, {"pixels_per_image": 8}), ("pixel", False, {"threshold_target": True})],
)
def test_a_stacker_ignores_the_other_candidates_options(
    stacker: str, with_base: bool, other: dict[str, Any], tmp_path
) -> None:
    _run(stacker, tmp_path / "default", with_base)
    _run(stacker, tmp_path / "other", with_base, **other)
    assert _files(tmp_path / "other") == _files(tmp_path / "default")
    # ... but not its own: the seed changes what it samples and fits.
    _run(stacker, tmp_path / "seed", with_base, seed=3)
    assert _files(tmp_path / "seed") != _files(tmp_path / "default")


def test_stacker_choice_and_base_predictions_are_checked(tmp_path) -> None:
    with pytest.raises(SegflowError, match="gates the ensemble"):
        _run("gate", tmp_path, False)
    with pytest.raises(KeyError, match="valid: gate, pixel"):
        _run("blend", tmp_path, True)
    with pytest.raises(KeyError, match="valid: gate, pixel"):
        StackOptions().of("both")
    inputs = _stack_inputs(True)
    with pytest.raises(SegflowError, match="cover different ids"):
        load_stack_inputs(
            inputs.names,
            inputs.oof,
            Prediction(inputs.oof[0].ids.iloc[::-1].reset_index(drop=True), inputs.oof[0].probs),
            inputs.truths,
            inputs.folds,
            inputs.classes,
            tmp_path,
            pd.DataFrame(),
        )
    for candidate, base, message in (
        ("pixel", "x", "drop --base-oof-dir"),
        ("gate", None, "needs --base-oof-dir"),
    ):
        with pytest.raises(SegflowError, match=message):
            _base_oof(argparse.Namespace(candidate=candidate, base_oof_dir=base))
