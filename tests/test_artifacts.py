"""The contracts between stages (segflow.artifacts): each format's reader reads what its writer
wrote, refuses what it cannot read with one named error, and paths follow the results layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segflow.artifacts import arrays, image_scores, layout, predictions
from segflow.artifacts.tables import read_folds, read_table
from segflow.core.errors import SegflowError


def test_stats_and_index_round_trip_and_refusals(tmp_path: Path) -> None:
    stats = {"height": 4, "width": 5, "channels": 1, "dtype": "uint8", "train_mean": [0.5]}
    stats |= {"train_std": [0.2], "classes": ["a", "b"], "multilabel": True}
    arrays.write_stats(tmp_path, stats)
    index = pd.DataFrame({"id": ["x"], "split": ["train"], "row": [0]})
    test_index = pd.DataFrame({"id": ["y"], "split": ["test"], "row": [0]})
    arrays.write_index(tmp_path, index)
    arrays.write_index(tmp_path, test_index, split="test")
    assert (tmp_path / "test_index.parquet").is_file()
    pd.testing.assert_frame_equal(arrays.read_index(tmp_path, split="test"), test_index)
    assert arrays.read_stats(tmp_path, required=arrays.STATS_KEYS) == stats
    assert arrays.read_stats(tmp_path / "stats.json") == stats  # the file or its folder
    assert arrays.read_classes(tmp_path) == (["a", "b"], True)
    assert arrays.image_size(stats) == (4, 5)
    pd.testing.assert_frame_equal(arrays.read_index(tmp_path, check=True), index)
    assert arrays.split_rows(test_index, "test", pd.Series(["y"])).tolist() == [0]
    assert arrays.classes_of({}) == ["mask"]  # binary data

    with pytest.raises(SegflowError, match=r"stats\.json does not exist \(run preprocess"):
        arrays.read_stats(tmp_path / "missing")
    (tmp_path / "stats.json").write_text("{")
    with pytest.raises(SegflowError, match="is not valid JSON"):
        arrays.read_stats(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"height": 4}))
    with pytest.raises(SegflowError, match=r"missing key\(s\) width"):
        arrays.read_stats(tmp_path, required=arrays.STATS_KEYS)
    arrays.write_index(tmp_path, index.drop(columns="row"))
    with pytest.raises(SegflowError, match="missing column 'row'"):
        arrays.read_index(tmp_path, check=True)


def test_prediction_and_oof_folders_round_trip(tmp_path: Path) -> None:
    ids = pd.DataFrame({"id": ["001", "002"], "orig_height": [2, 2], "orig_width": [3, 3]})
    probs = np.random.default_rng(0).random((2, 1, 2, 3)).astype(np.float32)
    gated = predictions.with_gates(ids, np.array([[0.25], [0.75]]))
    assert predictions.nonempty_column(0) in gated.columns
    predictions.write_prediction(tmp_path / "fold0", gated, probs)
    read = predictions.read_prediction(tmp_path / "fold0")
    assert read.ids["id"].tolist() == ["001", "002"]  # ids stay text
    assert read.probs.dtype == np.float16
    np.testing.assert_allclose(predictions.nonempty_probs(read.ids, 1)[:, 0], [0.25, 0.75])
    assert predictions.nonempty_probs(predictions.without_gates(read.ids), 1) is None

    predictions.write_prediction(tmp_path / "fold1", ids, probs)  # no gate in this fold
    merged = predictions.read_fold_predictions([tmp_path / "fold0", tmp_path / "fold1"], "mean")
    assert predictions.nonempty_probs(merged.ids, 1) is None  # averaged only when all have it
    np.testing.assert_allclose(merged.probs, probs, atol=1e-3)

    predictions.write_oof(tmp_path / "oof", ids.assign(fold=[0, 1]), probs)
    oof = predictions.read_oof(tmp_path / "oof")
    assert oof.ids["fold"].tolist() == [0, 1] and oof.probs.shape == probs.shape
    with pytest.raises(SegflowError, match=r"oof_ids\.csv does not exist \(run evaluate-oof"):
        predictions.read_oof(tmp_path / "nothing")
    with pytest.raises(KeyError, match="unknown fold merge"):
        predictions.merge_folds([probs], "median")


def test_layout_paths_and_their_inverse(tmp_path: Path) -> None:
    oof_dir = layout.candidate_dir(tmp_path, "oof", "ensemble", 2)
    assert oof_dir == tmp_path / "oof" / "ensemble" / "round2"
    assert layout.candidate_of(oof_dir) == (tmp_path, "ensemble", 2)
    assert layout.submission_csv(tmp_path, "unet", 0) == (
        tmp_path / "submission" / "unet" / "round0" / "submission.csv"
    )
    assert layout.postprocess_params(tmp_path, "unet", 1).parent.name == "round1"
    with pytest.raises(ValueError, match="is not an oof/<name>/round<r> folder"):
        layout.candidate_of(tmp_path / "test" / "ensemble" / "round0")
    with pytest.raises(KeyError, match="unknown candidate folder"):
        layout.candidate_dir(tmp_path, "models", "unet", 0)


def test_tables_name_the_missing_stage(tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match=r"manifest .* does not exist \(run the earlier stage"):
        read_table(tmp_path / "manifest.parquet", "manifest")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(SegflowError, match="is not a readable Parquet file"):
        read_table(tmp_path / "bad.parquet", "dedup items")
    (tmp_path / "folds.csv").write_text("id,fold\n007,1\n")
    assert read_folds(tmp_path / "folds.csv")["id"].tolist() == ["007"]


def test_image_scores_round_trip_and_refusals(tmp_path: Path) -> None:
    constants = {
        "all_empty": np.array([1.0, 0.0, 0.25]),
        "all_foreground": np.array([0.0, 0.5, 0.1]),
    }
    tuned = np.array([0.9, 1 / 3, 0.1 + 0.2])
    image_scores.write_image_scores(tmp_path, ["a", "b", "c"], tuned, constants)
    read_tuned, read_constants = image_scores.read_image_scores(tmp_path)
    assert read_tuned.tobytes() == tuned.tobytes()  # exact: choose's means are the tuner's
    assert list(read_constants) == list(image_scores.CONSTANTS)
    for name, values in constants.items():
        assert read_constants[name].tobytes() == values.tobytes()
    with pytest.raises(SegflowError, match="one value per image"):
        image_scores.write_image_scores(tmp_path, ["a", "b"], tuned, constants)
    with pytest.raises(SegflowError, match="'all_foreground'"):
        image_scores.write_image_scores(tmp_path, ["a"], tuned[:1], {"all_empty": tuned[:1]})
    with pytest.raises(SegflowError, match="run tune-postprocess first"):
        image_scores.read_image_scores(tmp_path / "nowhere")
    pd.DataFrame({"id": ["a"], "tuned": [1.0]}).to_parquet(
        tmp_path / image_scores.IMAGE_SCORES_FILE
    )
    with pytest.raises(SegflowError, match="lacks the columns all_empty, all_foreground"):
        image_scores.read_image_scores(tmp_path)
