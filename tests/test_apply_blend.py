"""segflow apply-blend: blend's weights (tuned on OOF, weights.json) on the test predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segflow.artifacts.predictions import Prediction, nonempty_probs
from segflow.core.errors import SegflowError
from segflow.ensemble.apply_blend import apply_blend
from segflow.ensemble.blend import BlendWeights, read_blend_weights
from segflow.ensemble.weights import blend_predictions


def _predictions() -> list[Prediction]:
    rng = np.random.default_rng(3)
    ids = pd.DataFrame({"id": ["a", "b", "c"], "orig_height": 4, "orig_width": 4})
    gated = ids.assign(nonempty_prob_0=[0.2, 0.9, 0.5])
    return [
        Prediction(ids, rng.random((3, 1, 4, 4)).astype(np.float16)),
        Prediction(gated, rng.random((3, 1, 4, 4)).astype(np.float16)),
    ]


def test_the_weights_file_round_trips_to_the_blend(tmp_path: Path) -> None:
    path = tmp_path / "weights.json"
    # weights.json sorts its keys; table.csv keeps the blend's order (y before x here).
    path.write_text(json.dumps({"metric": "kaggle", "weights": {"x": 0.3, "y": 0.7}}))
    (tmp_path / "table.csv").write_text("kind,w_y,w_x,score\ntuned,0.7,0.3,0.5\n")
    weights = read_blend_weights(path)
    assert weights.weights == {"x": 0.3, "y": 0.7} and list(weights.weights) == ["y", "x"]
    assert weights.mode == "mean"
    test = _predictions()
    blended = apply_blend(["x", "y"], test, weights, 1)
    expected = blend_predictions(test, [0.3, 0.7], 1)
    np.testing.assert_array_equal(blended.probs, expected.probs)
    pd.testing.assert_frame_equal(blended.ids, expected.ids)
    # Only y has an aux gate: the blend's gate is y's.
    np.testing.assert_allclose(nonempty_probs(blended.ids, 1)[:, 0], [0.2, 0.9, 0.5])


def test_weights_of_other_experiments_or_a_bad_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match="for y, z, the test predictions for x, y; rerun"):
        apply_blend(["x", "y"], _predictions(), BlendWeights({"y": 0.5, "z": 0.5}, "mean"), 1)
    with pytest.raises(SegflowError, match=r"does not exist \(run blend first"):
        read_blend_weights(tmp_path / "missing.json")
    bad = tmp_path / "weights.json"
    bad.write_text(json.dumps({"weights": ["x"]}))
    with pytest.raises(SegflowError, match=r"table\.csv does not exist \(run blend first"):
        read_blend_weights(bad)
    (tmp_path / "table.csv").write_text("kind,w_x,score\n")
    with pytest.raises(SegflowError, match=r"not a weights\.json of segflow blend"):
        read_blend_weights(bad)
    bad.write_text(json.dumps({"weights": {"x": 1.0, "y": 0.0}}))
    with pytest.raises(SegflowError, match=r"table\.csv weighs x, weights\.json x, y; rerun"):
        read_blend_weights(bad)


def test_a_vote_blend_is_applied_as_a_vote(tmp_path: Path) -> None:
    from segflow.ensemble.weights import vote_predictions

    path = tmp_path / "weights.json"
    weights = {"x": 0.5, "y": 0.5}
    path.write_text(json.dumps({"metric": "kaggle", "weights": weights, "mode": "vote"}))
    (tmp_path / "table.csv").write_text("kind,w_x,w_y,score,threshold\nvote,0.5,0.5,0.4,0.5\n")
    blend = read_blend_weights(path)
    assert blend.mode == "vote"
    test = _predictions()
    blended = apply_blend(["x", "y"], test, blend, 1)
    np.testing.assert_array_equal(blended.probs, vote_predictions(test, 1).probs)
    mean = apply_blend(["x", "y"], test, BlendWeights(weights, "mean"), 1)
    assert not np.array_equal(blended.probs, mean.probs)
    path.write_text(json.dumps({"weights": weights, "mode": "median"}))
    with pytest.raises(SegflowError, match="unknown ensemble mode 'median'"):
        read_blend_weights(path)
