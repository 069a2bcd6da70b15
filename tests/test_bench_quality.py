"""benchmarks/bench_quality.py: the held-out split, submission decoding, the reference's choices."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT

from segflow.model.models import ModelSpec
from segflow.model.submit import SubmissionOptions, submission_frame, write_submission

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
bench = importlib.import_module("bench_quality")


# ------------------------------------------------------------------------------ split


def _planted_groups() -> dict[str, str]:
    """103 ids: groups of 7, 5, 5, 3, 3, 3 and 2 (x5), the rest singletons."""
    sizes = [7, 5, 5, 3, 3, 3, 2, 2, 2, 2, 2] + [1] * 66
    groups, index = {}, 0
    for number, size in enumerate(sizes):
        for _ in range(size):
            groups[f"img{index:03d}"] = f"group{number:02d}"
            index += 1
    return groups


def test_split_keeps_groups_whole_is_seeded_and_holds_out_the_share() -> None:
    groups = _planted_groups()
    kept, held = bench.split_by_group(groups, 0.2, seed=7)
    assert sorted(kept + held) == sorted(groups) and not set(kept) & set(held)
    assert len(held) == round(0.2 * len(groups))  # small groups remain: exact
    held_groups = {groups[i] for i in held}
    assert not held_groups & {groups[i] for i in kept}  # no group straddles
    assert bench.split_by_group(groups, 0.2, seed=7) == (kept, held)
    seeds = {tuple(bench.split_by_group(groups, 0.2, seed=s)[1]) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    # Some seed must hold out a multi-image group, or the test would not test grouping.
    assert any(len({groups[i] for i in held_ids}) < len(held_ids) for held_ids in map(list, seeds))


def test_split_refuses_a_share_that_leaves_nothing() -> None:
    with pytest.raises(bench.BenchError):
        bench.split_by_group({"a": "1", "b": "2"}, 0.1, seed=0)


def test_image_groups_join_exact_and_near_copies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    base = (128 + 60 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.uint8)
    other = (128 + 60 * np.cos(xx / 5.0 + yy / 3.0)).astype(np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), base)
    cv2.imwrite(str(tmp_path / "b.png"), base, [cv2.IMWRITE_PNG_COMPRESSION, 0])  # re-encoded
    cv2.imwrite(str(tmp_path / "c.png"), np.repeat(base[:, :, None], 3, axis=2))  # RGB, gray
    cv2.imwrite(str(tmp_path / "d.png"), noisy)  # near copy
    cv2.imwrite(str(tmp_path / "e.png"), other)
    images = {p.stem: p for p in tmp_path.glob("*.png")}
    groups = bench.image_groups(images, near_max_distance=4)
    assert groups["a"] == groups["b"] == groups["c"] == groups["d"] != groups["e"]
    exact_only = bench.image_groups(images, near_max_distance=0)
    assert exact_only["a"] == exact_only["c"]


# ------------------------------------------------------------------------------ submission


def test_submission_decoding_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    masks = {
        "a1": (rng.random((101, 101)) > 0.7).astype(np.uint8),
        "b2": np.zeros((101, 101), np.uint8),
        "c3": (rng.random((40, 72)) > 0.5).astype(np.uint8),
    }
    shapes = {k: v.shape for k, v in masks.items()}
    options = SubmissionOptions(
        id_column="ImageId", rle_column="EncodedPixels", rle_order="row", empty_rle="-1"
    )
    path = tmp_path / "submission.csv"
    # Ids written as file names (id_style filename) are matched by their stem.
    write_submission(
        path, submission_frame(masks, options, id_names={k: f"{k}.png" for k in masks})
    )
    decoded = bench.read_submission(path, shapes, "ImageId", "EncodedPixels", "row", 1)
    assert set(decoded) == set(masks)
    for key, mask in masks.items():
        np.testing.assert_array_equal(decoded[key], mask)
    # The wrong order decodes other masks: the convention is really applied.
    column = bench.read_submission(path, shapes, "ImageId", "EncodedPixels", "column", 1)
    assert not np.array_equal(column["a1"], masks["a1"])
    with pytest.raises(bench.BenchError, match="no row"):
        bench.read_submission(path, {**shapes, "d4": (8, 8)}, "ImageId", "EncodedPixels", "row")
    with pytest.raises(bench.BenchError, match="not a held-out image"):
        bench.read_submission(path, {"a1": (101, 101)}, "ImageId", "EncodedPixels", "row")


# ------------------------------------------------------------------------------ reference


def _planted_probs(best: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks whose probability is ``best + 0.03`` inside the object and ``best - 0.03`` on a
    ring around it: only a threshold in (best - 0.03, best + 0.03) gives the object exactly."""
    truth = np.zeros((32, 32), np.uint8)
    truth[8:24, 8:24] = 1
    ring = np.zeros_like(truth)
    ring[2:30, 2:30] = 1
    prob = np.where(truth, best + 0.03, np.where(ring, best - 0.03, 0.01)).astype(np.float32)
    return [prob, prob.copy()], [truth, truth.copy()]


def test_choose_threshold_finds_the_planted_threshold() -> None:
    val_probs, val_truth = _planted_probs(0.65)
    other_probs, other_truth = _planted_probs(0.35)
    assert bench.choose_threshold(val_probs, val_truth) == (0.65, 1.0)
    assert bench.choose_threshold(other_probs, other_truth) == (0.35, 1.0)


def _write_set(root: Path, ids: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    for item_id in ids:
        mask = np.zeros((40, 40), np.uint8)
        y, x = rng.integers(4, 24, 2)
        mask[y : y + 12, x : x + 12] = 1
        image = (rng.integers(0, 60, (40, 40)) + 150 * mask).astype(np.uint8)
        cv2.imwrite(str(root / "train" / "images" / f"{item_id}.png"), image)
        cv2.imwrite(str(root / "train" / "masks" / f"{item_id}.png"), mask * 255)


def test_reference_picks_its_threshold_on_its_validation_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"i{k}" for k in range(14)]
    _write_set(tmp_path, ids, seed=2)
    data = bench.LabelledSet.open(tmp_path, "planted")
    train, val, held = ids[:8], ids[8:11], ids[11:]
    calls = []

    def spy(probs, truths, thresholds=bench.REFERENCE_THRESHOLDS):
        calls.append([t.copy() for t in truths])
        return 0.65, 0.5

    monkeypatch.setattr(bench, "choose_threshold", spy)
    spec = bench.ReferenceSpec(
        model=ModelSpec(arch="Unet", encoder="resnet18", in_channels=1),
        seed=0,
        height=32,
        width=32,
        batch_size=4,
        lr=1e-3,
        budget_s=600,
        max_epochs=1,
        device="cpu",
    )
    result = bench.train_reference(
        data.subset(train), data.subset(val), {i: data.images[i] for i in held}, spec, 1
    )
    val_truth = [data.mask(i, (40, 40)) for i in sorted(val)]
    assert len(calls) == 1 and len(calls[0]) == len(val)  # one validation per epoch
    for seen, expected in zip(calls[0], val_truth, strict=True):
        np.testing.assert_array_equal(seen, expected)
    assert result.threshold == 0.65 and result.val_score == 0.5
    assert result.epochs == 1 and result.best_epoch == 1 and result.steps == 2
    assert sorted(result.heldout) == held
    assert all(mask.shape == (40, 40) for mask in result.heldout.values())  # original size


def test_reference_stops_when_its_budget_is_used(tmp_path: Path) -> None:
    ids = [f"i{k}" for k in range(12)]
    _write_set(tmp_path, ids, seed=3)
    data = bench.LabelledSet.open(tmp_path, "planted")
    ticks = iter(range(0, 10_000, 10))  # every clock reading is 10 s later

    spec = bench.ReferenceSpec(
        model=ModelSpec(arch="Unet", encoder="resnet18", in_channels=1),
        seed=0,
        height=32,
        width=32,
        batch_size=2,
        lr=1e-3,
        budget_s=25,
        device="cpu",
    )
    result = bench.train_reference(
        data.subset(ids[:8]),
        data.subset(ids[8:10]),
        {i: data.images[i] for i in ids[10:]},
        spec,
        1,
        clock=lambda: float(next(ticks)),
    )
    # start 0, 1st batch unchecked, check at 10 (< 25: train), check at 20, at 30: stop.
    assert result.steps == 3 and result.epochs == 1 and result.history[0]["partial"] == 1.0


# ------------------------------------------------------------------------------ config


def test_variant_parsing_keeps_list_values() -> None:
    variant = bench.parse_variant(
        "short=experiments.u.train.epochs=3,postprocess.thresholds=[0.4, 0.5],stack.enabled=false"
    )
    assert variant.name == "short"
    assert variant.overrides == {
        "experiments": {"u": {"train": {"epochs": 3}}},
        "postprocess": {"thresholds": [0.4, 0.5]},
        "stack": {"enabled": False},
    }
    with pytest.raises(bench.BenchError):
        bench.parse_variant("no-overrides")


def test_pipeline_config_replaces_data_and_results(tmp_path: Path) -> None:
    data = bench.PipelineData(
        tmp_path / "train/images",
        tmp_path / "test/images",
        "rle_csv",
        None,
        tmp_path / "t.csv",
        None,
    )
    recipe = {"demo": {"enabled": True}, "data": {"train_images": "x", "rle_order": "row"}}
    config = bench.pipeline_config(recipe, data, tmp_path / "res", {"folds": {"n_folds": 2}}, None)
    assert config["demo"]["enabled"] is False and config["results_dir"] == str(tmp_path / "res")
    assert config["data"]["train_images"] == str(tmp_path / "train/images")
    assert config["data"]["rle_order"] == "column" and config["data"]["train_masks"] is None
    assert config["folds"] == {"n_folds": 2} and "budget" not in config
    assert bench.pipeline_config(recipe, data, tmp_path, {}, 5.0)["budget"] == {"minutes": 5.0}


def test_budget_key_is_detected_from_the_schema(tmp_path: Path) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text("properties:\n  results_dir: {type: string}\n")
    assert not bench.schema_has_budget(schema)
    schema.write_text("properties:\n  budget:\n    properties:\n      minutes: {type: number}\n")
    assert bench.schema_has_budget(schema)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.workflow
@pytest.mark.slow
def test_tiny_run_writes_the_table(tmp_path: Path) -> None:
    """The demo recipe (config/config.yaml, which the workflow reads first anyway) with one
    trained fold of --tiny's two (folds.train_folds): the pipeline's OOF is fold 0's."""
    out = tmp_path / "quality"
    script = REPO_ROOT / "benchmarks" / "bench_quality.py"
    recipe = tmp_path / "recipe.yaml"
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    config["folds"]["train_folds"] = [0]
    recipe.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--tiny",
            "--config",
            str(recipe),
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["system"]: row for row in report["rows"]}
    assert list(rows) == ["pipeline", "plain reference", "all empty"]
    assert report["n_heldout"] == round(0.2 * report["n_images"]) == 12
    for name in ("pipeline", "plain reference"):
        assert 0 <= rows[name]["heldout"] <= 1 and 0 <= rows[name]["oof"] <= 1
        assert rows[name]["wall_s"] > 0
    assert 0 < rows["all empty"]["heldout"] < 1  # the demo has empty and non-empty masks
    assert "| plain reference |" in out.with_suffix(".md").read_text()
    # The pipeline never saw a held-out image as training data.
    work = tmp_path / "work" / "pipeline-data"
    train_ids = {p.stem for p in (work / "train" / "images").iterdir()}
    assert not train_ids & set(report["heldout_ids"])
    assert {p.stem for p in (work / "test" / "images").iterdir()} == set(report["heldout_ids"])
