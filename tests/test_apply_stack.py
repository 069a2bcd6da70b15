"""segflow apply-stack: the models segflow stack fitted on OOF, loaded from their native files
and applied to the test side (issue 16: a test-set change refits nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_stack import stack_data

from segflow.artifacts.predictions import Prediction, nonempty_probs
from segflow.core.errors import SegflowError
from segflow.ensemble.stacking.apply_stack import (
    apply_stack_models,
    load_stack_models,
    model_files,
    stack_setup,
)
from segflow.ensemble.stacking.features import image_features
from segflow.ensemble.stacking.learners import load_classifier
from segflow.ensemble.stacking.stack import StackOptions, run_stack
from segflow.ensemble.stacking.threshold import THRESHOLD_LIMITS, load_regressor


def _fit(stacker: str, folder: Path, **options: Any) -> tuple[dict[str, Any], Path]:
    data = stack_data(stacker == "gate")
    stack_dir = folder / "stack"
    run_stack(data["inputs"], StackOptions(**options), stacker, stack_dir, folder / "oof")
    return data, stack_dir


def _apply(data: dict[str, Any], stack_dir: Path, stacker: str, rows: slice = slice(None)):
    backend, threshold_target, blobs = stack_setup(stack_dir, stacker)
    models = load_stack_models(stack_dir, stacker, backend, threshold_target, 1, blobs)

    def part(prediction: Prediction | None) -> Prediction | None:
        if prediction is None:
            return None
        return Prediction(prediction.ids.iloc[rows].reset_index(drop=True), prediction.probs[rows])

    metadata = data["test_metadata"].iloc[rows].reset_index(drop=True)
    return apply_stack_models(
        models,
        data["inputs"].names,
        [part(p) for p in data["test"]],
        part(data["base_test"]),
        data["test_images"][rows],
        metadata if stacker == "gate" else None,
    )


@pytest.mark.parametrize("backend", ["lightgbm", "catboost"])
def test_the_gate_applies_its_saved_models_to_the_test_side(tmp_path: Path, backend: str) -> None:
    data, stack_dir = _fit("gate", tmp_path, backend=backend, threshold_target=True)
    suffix = ".txt" if backend == "lightgbm" else ".cbm"
    files = model_files("gate", backend, True, 1)
    assert files == [f"class_0/gate_model{suffix}", f"class_0/threshold_model{suffix}"]
    assert all((stack_dir / name).is_file() for name in files)
    prediction, features = _apply(data, stack_dir, "gate")
    test_maps = {
        n: np.asarray(p.probs[:, 0], np.float32) for n, p in zip("ab", data["test"], strict=True)
    }
    expected = image_features(test_maps, data["test_images"], data["test_metadata"])
    pd.testing.assert_frame_equal(features[0], expected)
    gate = load_classifier(stack_dir / files[0]).predict_proba(expected).astype(np.float32)
    np.testing.assert_array_equal(nonempty_probs(prediction.ids, 1)[:, 0], gate)
    # The probabilities are the ensemble's, recalibrated to each image's predicted threshold.
    thresholds = np.clip(
        load_regressor(stack_dir / files[1]).predict_proba(expected), *THRESHOLD_LIMITS
    )
    base = data["base_test"].probs[:, 0].astype(np.float32)
    for image in range(len(base)):
        same = (prediction.probs[image, 0] > 0.5) == (base[image] > thresholds[image])
        assert same.mean() > 0.97  # float16 rounding at the threshold


@pytest.mark.parametrize("stacker", ["gate", "pixel"])
def test_batches_give_the_rows_of_the_whole_set(tmp_path: Path, stacker: str) -> None:
    """predict-bundle applies the models a batch at a time: every row must be its own."""
    data, stack_dir = _fit(stacker, tmp_path, pixels_per_image=16)
    whole, _ = _apply(data, stack_dir, stacker)
    first, _ = _apply(data, stack_dir, stacker, slice(0, 4))
    rest, _ = _apply(data, stack_dir, stacker, slice(4, None))
    np.testing.assert_array_equal(np.concatenate([first.probs, rest.probs]), whole.probs)
    pd.testing.assert_frame_equal(
        pd.concat([first.ids, rest.ids], ignore_index=True), whole.ids, check_dtype=False
    )
    if stacker == "gate":  # without threshold_target: the ensemble's maps, gated
        np.testing.assert_array_equal(whole.probs, data["base_test"].probs)
        assert list(whole.ids.columns) == ["id", "orig_height", "orig_width", "nonempty_prob_0"]
    else:
        assert list(whole.ids.columns) == ["id", "orig_height", "orig_width"]
        assert whole.probs.shape == data["test"][0].probs.shape and whole.probs.dtype == np.float16


def test_apply_refuses_what_the_fit_did_not_make(tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match=r"summary_gate\.json does not exist \(run stack"):
        stack_setup(tmp_path, "gate")
    data, stack_dir = _fit("gate", tmp_path)
    backend, threshold_target, blobs = stack_setup(stack_dir, "gate")
    assert (backend, threshold_target, blobs) == ("lightgbm", False, {})
    with pytest.raises(SegflowError, match=r"threshold_model\.txt does not exist"):
        load_stack_models(stack_dir, "gate", backend, True, 1)
    models = load_stack_models(stack_dir, "gate", backend, False, 1)
    assert models.meta_columns() == ["meta_depth"]
    with pytest.raises(SegflowError, match="gates the ensemble"):
        apply_stack_models(models, ["a", "b"], data["test"], None, data["test_images"], None)
    # Features without the metadata the gate was fitted with: refused, not guessed.
    with pytest.raises(SegflowError, match=r"missing \['meta_depth'\]"):
        apply_stack_models(
            models, ["a", "b"], data["test"], data["base_test"], data["test_images"], None
        )
    summary = stack_dir / "summary_gate.json"
    summary.write_text(json.dumps({"backend": "xgboost", "options": {}}))
    with pytest.raises(SegflowError, match="unknown backend 'xgboost'"):
        stack_setup(stack_dir, "gate")


def test_a_gate_fitted_with_blob_features_applies_them_to_the_test_side(tmp_path: Path) -> None:
    """stack.blob_sigmas: the fit records the blob options, apply-stack reads them back and
    computes the same DoG blob columns on the test images (else the features would differ)."""
    data, stack_dir = _fit("gate", tmp_path, blob_sigmas=[1.0, 2.0], blob_threshold=0.05)
    _, _, blobs = stack_setup(stack_dir, "gate")
    assert blobs == {"blob_sigmas": (1.0, 2.0), "blob_threshold": 0.05}
    _, features = _apply(data, stack_dir, "gate")
    assert "image__blob_count" in features[0].columns
    test_maps = {
        n: np.asarray(p.probs[:, 0], np.float32) for n, p in zip("ab", data["test"], strict=True)
    }
    expected = image_features(test_maps, data["test_images"], data["test_metadata"], **blobs)
    pd.testing.assert_frame_equal(features[0], expected)
