"""Tests for the watershed tuning of touching objects (issue 18): label_instances' compactness,
tune_watershed on a planted OOF case scored by the DSB instance metric, the true objects of an
RLE CSV, the tune-postprocess stage writing the choice to params.json and submit applying it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segflow.artifacts.predictions import write_oof
from segflow.artifacts.tables import ID_STYLE_KEY
from segflow.artifacts.truths import instance_truths, object_rles_of, write_truth_masks
from segflow.core.errors import SegflowError
from segflow.formats.rle import rle_encode
from segflow.model import tune_postprocess as stage
from segflow.model.metrics import instance_precision_iou
from segflow.model.postprocess import (
    WatershedParams,
    label_instances,
    tune_watershed,
    watershed_from_summary,
)
from segflow.model.submit import SubmissionOptions, submission_frame


def _touching_pair(
    shape: tuple[int, int],
    centre_a: tuple[int, int],
    radius_a: int,
    centre_b: tuple[int, int],
    radius_b: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(union mask, true labels) of two overlapping discs; a shared pixel goes to the disc it
    lies deeper in (relative to its radius)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    dist_a = np.hypot(rows - centre_a[0], cols - centre_a[1])
    dist_b = np.hypot(rows - centre_b[0], cols - centre_b[1])
    in_a, in_b = dist_a <= radius_a, dist_b <= radius_b
    truth = np.zeros(shape, dtype=np.int32)
    truth[in_a] = 1
    truth[in_b & ~in_a] = 2
    both = in_a & in_b
    truth[both] = np.where(dist_a[both] / radius_a <= dist_b[both] / radius_b, 1, 2)
    return (in_a | in_b).astype(np.uint8), truth


def _planted() -> tuple[np.ndarray, list[np.ndarray]]:
    """Six images of two touching discs (radii 10-12 and 6-8, overlapping by 3 px) that the
    truth holds as two objects each."""
    masks, truths = [], []
    for i in range(6):
        radius_a, radius_b = 10 + i % 3, 6 + 2 * (i % 2)
        mask, truth = _touching_pair(
            (48, 64), (24, 18), radius_a, (24 + i % 2, 18 + radius_a + radius_b - 3), radius_b
        )
        masks.append(mask)
        truths.append(truth)
    return np.stack(masks), truths


def _mean_score(masks: np.ndarray, truths: list[np.ndarray], **kwargs: object) -> float:
    return float(
        np.mean(
            [
                instance_precision_iou(label_instances(m, **kwargs), t)  # type: ignore[arg-type]
                for m, t in zip(masks, truths, strict=True)
            ]
        )
    )


# --------------------------------------------------------------------------- tune_watershed


def test_tuning_splits_planted_touching_discs_and_raises_the_instance_metric() -> None:
    masks, truths = _planted()
    best, grid, unsplit = tune_watershed(masks, truths, [30, 3, 12, 5], [1.0, 0.0])
    # Unsplit, each image is one object matching neither disc: the metric is low.
    assert unsplit == pytest.approx(_mean_score(masks, truths))
    assert unsplit < 0.3
    # The marker distance that keeps the discs joined (30, 12) scores as unsplit; 3 and 5 split
    # them, compactness 1 cuts the larger disc (a straighter cut than the neck's).
    assert best == WatershedParams(min_distance=5, compactness=0.0)  # ties: the larger distance
    score = grid["score"].iloc[0]
    assert score > 0.9 > unsplit + 0.6
    assert score == pytest.approx(_mean_score(masks, truths, split_touching=True, min_distance=5))
    scores = grid.set_index(["min_distance", "compactness"])["score"]
    assert scores[(30, 0.0)] == pytest.approx(unsplit)
    assert scores[(3, 0.0)] == pytest.approx(score)
    assert scores[(5, 1.0)] < score - 0.1
    assert len(grid) == 8 and grid["score"].is_monotonic_decreasing


def test_compactness_changes_the_cut() -> None:
    masks, truths = _planted()
    classic = label_instances(masks[0], split_touching=True, compactness=0.0)
    compact = label_instances(masks[0], split_touching=True, compactness=1.0)
    assert classic.max() == compact.max() == 2
    assert not np.array_equal(classic, compact)
    assert instance_precision_iou(compact, truths[0]) < instance_precision_iou(classic, truths[0])


def test_bad_watershed_values_name_their_key() -> None:
    masks, truths = _planted()
    cases = [
        ({"min_distances": [0], "compactnesses": [0]}, r"postprocess\.min_distances must be >= 1"),
        ({"min_distances": [2.5], "compactnesses": [0]}, r"postprocess\.min_distances must be an"),
        ({"min_distances": [3], "compactnesses": [-1]}, r"postprocess\.compactnesses must be a"),
        ({"min_distances": [3], "compactnesses": [float("nan")]}, r"postprocess\.compactnesses"),
        ({"min_distances": [], "compactnesses": [0]}, r"postprocess\.min_distances is empty"),
        ({"min_distances": [3], "compactnesses": [True]}, r"postprocess\.compactnesses"),
    ]
    for grids, message in cases:
        with pytest.raises(SegflowError, match=message):
            tune_watershed(masks, truths, **grids)  # type: ignore[arg-type]
    with pytest.raises(SegflowError, match=r"postprocess\.compactness must be"):
        label_instances(masks[0], split_touching=True, compactness=-0.5)
    with pytest.raises(SegflowError, match="zero images"):
        tune_watershed(masks[:0], [], [3], [0])


# --------------------------------------------------------------------------- true objects


def test_true_objects_from_rle_rows_keep_touching_objects_apart(tmp_path: Path) -> None:
    mask, truth = _touching_pair((20, 30), (10, 9), 6, (10, 19), 5)
    csv = tmp_path / "train.csv"
    rows = [("a.png", rle_encode(truth == k)) for k in (1, 2)] + [("b.png", "")]
    pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]).to_csv(csv, index=False)
    manifest = pd.DataFrame({"id": ["a", "b"], "image_path": ["/d/a.png", "/d/b.png"]})
    items = pd.DataFrame(
        {"id": ["a", "b"], "split": "train", "exact_group": [0, 1], "train_action": "keep"}
    )
    manifest.attrs = {ID_STYLE_KEY: "filename"}  # the CSV names images with their extension
    rles = object_rles_of(str(csv), "ImageId", "EncodedPixels", manifest, items)
    assert [len(rles["a"]), len(rles["b"])] == [2, 0]
    truths = np.stack([mask, np.zeros_like(mask)])
    objects = instance_truths(truths, ["a", "b"], rles)
    assert np.array_equal(objects[0], truth)  # two objects, though they touch
    assert objects[1].max() == 0
    # Without the rows, the objects are the truth's components: the pair is one.
    assert instance_truths(truths, ["a", "b"])[0].max() == 1
    with pytest.raises(SegflowError, match="no column 'Encoded'"):
        object_rles_of(str(csv), "ImageId", "Encoded", manifest, items)


# --------------------------------------------------------------------------- the stage, submit


def _stage_inputs(tmp_path: Path) -> argparse.Namespace:
    """An OOF folder of the planted masks as probabilities (0.9 in, 0.1 out), their manifest,
    dedup items and stats, and an RLE CSV with one row per disc."""
    masks, truths = _planted()
    ids = [f"img{i}" for i in range(len(masks))]
    probs = np.where(masks > 0, 0.9, 0.1)[:, None].astype(np.float16)
    oof_dir = tmp_path / "oof"
    write_oof(oof_dir, pd.DataFrame({"id": ids, "fold": 0}), probs)
    shape = masks.shape[1:]
    manifest = pd.DataFrame(
        {
            "id": ids,
            "image_path": [f"/d/{i}.png" for i in ids],
            "height": shape[0],
            "width": shape[1],
            "mask_path": None,
            "mask_rle": [rle_encode(m) for m in masks],
        }
    )
    manifest.to_parquet(tmp_path / "manifest.parquet")
    pd.DataFrame(
        {
            "id": ids,
            "split": "train",
            "exact_group": range(len(ids)),
            "train_action": "keep",
            "use_for_training": True,
        }
    ).to_parquet(tmp_path / "items.parquet")
    (tmp_path / "stats.json").write_text(json.dumps({}))
    write_truth_masks(tmp_path / "truths", ids, (masks > 0).astype(np.uint8))
    rows = [(i, rle_encode(t == k)) for i, t in zip(ids, truths, strict=True) for k in (1, 2)]
    pd.DataFrame(rows, columns=["id", "rle_mask"]).to_csv(tmp_path / "rles.csv", index=False)
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return parser.parse_args(
        [
            "--oof-dir", str(oof_dir), "--stats", str(tmp_path / "stats.json"),
            "--manifest", str(tmp_path / "manifest.parquet"),
            "--dedup-items", str(tmp_path / "items.parquet"),
            "--truths", str(tmp_path / "truths" / "masks.npy"),
            "--thresholds", "0.5", "--min-areas", "0", "--out-dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip


def test_stage_writes_the_tuned_watershed_only_when_asked(tmp_path: Path) -> None:
    args = _stage_inputs(tmp_path)
    stage.run(args)
    plain = json.loads((tmp_path / "out" / "params.json").read_text())
    assert "watershed" not in plain["classes"][0]
    assert "min_distances" not in json.dumps(plain)
    assert watershed_from_summary(plain, ["mask"]) is None
    args.min_distances, args.compactnesses = [30, 3], [0.0, 1.0]
    args.object_rle_csv = str(tmp_path / "rles.csv")
    stage.run(args)
    tuned = json.loads((tmp_path / "out" / "params.json").read_text())
    record = tuned["classes"][0]["watershed"]
    assert (record["min_distance"], record["compactness"]) == (3, 0.0)
    assert record["score"] > 0.9 and record["score_unsplit"] < 0.3
    assert watershed_from_summary(tuned, ["mask"]) == [WatershedParams(3, 0.0)]
    # Without the CSV the true objects are the truth's components (each pair one object):
    # splitting only hurts, so the distance that never splits wins.
    args.object_rle_csv = None
    stage.run(args)
    joined = json.loads((tmp_path / "out" / "params.json").read_text())["classes"][0]
    assert joined["watershed"]["min_distance"] == 30
    args.compactnesses = None
    with pytest.raises(SegflowError, match="--min-distances and --compactnesses"):
        stage.run(args)


def test_submit_applies_the_tuned_watershed() -> None:
    masks, _ = _planted()
    options = SubmissionOptions(instances=True, split_touching=True)
    predictions = {"x": masks[0]}
    default = submission_frame(predictions, options)
    assert len(default) == 2  # the default min_distance (3) splits the pair
    joined = submission_frame(predictions, options, watershed=[WatershedParams(30, 0.0)])
    assert len(joined) == 1
    compact = submission_frame(predictions, options, watershed=[WatershedParams(3, 1.0)])
    assert len(compact) == 2 and not compact.equals(default)
    summary = {"classes": [{"class": "mask", "threshold": 0.5, "min_area": 0,
                            "fill_holes": False, "gate": 0.0}]}  # fmt: skip
    summary["classes"].append(dict(summary["classes"][0], **{"class": "other"}))
    summary["classes"][0]["watershed"] = {"min_distance": 30, "compactness": 0.0}
    with pytest.raises(SegflowError, match="some classes only"):
        watershed_from_summary(summary, ["mask", "other"])
    summary["classes"][1]["watershed"] = {"min_distance": 0, "compactness": 0.0}
    with pytest.raises(SegflowError, match=r"postprocess\.min_distance must be >= 1"):
        watershed_from_summary(summary, ["mask", "other"])
