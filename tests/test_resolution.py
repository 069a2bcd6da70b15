"""The resolution lever: ``preprocess.resize_mode: pad`` (reflect-pad, crop back) and
``budget.sizes`` (the budget chooses the input size: ``segflow plan-resolution``).

Expected padding is computed with OpenCV's ``copyMakeBorder(BORDER_REFLECT_101)``, never with
the numpy padding the code uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, copy_workflow, planned_jobs, run_snakemake

from segflow.artifacts.predictions import Prediction
from segflow.artifacts.resolution import (
    from_original,
    index_offsets,
    pad_offsets,
    read_resolution,
    reflect_pad,
    score_window,
    to_original,
)
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.ingest import IngestOptions, ingest
from segflow.data.preprocess import PreprocessOptions, preprocess
from segflow.ensemble.pseudo import PseudoOptions
from segflow.ensemble.select_pseudo import select_pseudo_stage
from segflow.ensemble.stacking.rows import images_for
from segflow.model.budget import BudgetOptions, Measurement
from segflow.model.inference.predict import restore_resolution
from segflow.model.resolution_plan import (
    Candidate,
    ResolutionOptions,
    check_pad_candidates,
    check_resolution_config,
    estimate_sizes,
    parse_candidates,
    resolution_record,
)
from segflow.model.training.train_options import MIN_OPTIMIZER_STEPS


def _cv2_reflect(array: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 of a 2-D array (uint8 / float32)."""
    return cv2.copyMakeBorder(array, top, bottom, left, right, cv2.BORDER_REFLECT_101)


# --------------------------------------------------------------------------- padding and crop


def test_tgs_offsets_are_symmetric_with_the_odd_pixel_below_and_right() -> None:
    assert pad_offsets((101, 101), (128, 128)) == (13, 13)  # 13 above, 14 below
    assert pad_offsets((100, 90), (101, 96)) == (0, 3)
    assert pad_offsets((128, 128), (128, 128)) == (0, 0)


def test_an_image_larger_than_the_target_is_one_line_naming_it() -> None:
    with pytest.raises(SegflowError, match=r"^data/a\.png: 96x130 .*requires a target >= ") as e:
        pad_offsets((130, 96), (128, 128), "data/a.png")
    assert "\n" not in str(e.value)


def test_reflect_padding_mirrors_without_repeating_the_edge() -> None:
    row = np.array([[1, 2, 3, 4]], dtype=np.uint8)
    padded = reflect_pad(row, (1, 9), (0, 2))
    np.testing.assert_array_equal(padded[0], [3, 2, 1, 2, 3, 4, 3, 2, 1])  # dcb|abcd|cba

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (101, 101, 3), dtype=np.uint8)
    top, left = pad_offsets((101, 101), (128, 128))
    padded = reflect_pad(image, (128, 128), (top, left))
    assert padded.shape == (128, 128, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded, _cv2_reflect(image, top, 14, left, 14))


def test_masks_are_padded_like_their_images_in_every_label_dtype() -> None:
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.uint16, np.uint32):
        mask = rng.integers(0, 2**20 if dtype == np.uint32 else 200, (7, 5)).astype(dtype)
        padded = reflect_pad(mask, (12, 9), (2, 1))
        assert padded.dtype == dtype
        expected = _cv2_reflect(mask.astype(np.float64).astype(np.float32), 2, 3, 1, 3)
        np.testing.assert_array_equal(padded.astype(np.float64), expected.astype(np.float64))


def test_crop_of_padded_predictions_is_exactly_the_original_region() -> None:
    rng = np.random.default_rng(2)
    maps = rng.random((2, 101, 101)).astype(np.float32)  # K = 2 classes
    offsets = pad_offsets((101, 101), (128, 128))
    padded = reflect_pad(maps, (128, 128), offsets, channels_last=False)
    assert padded.shape == (2, 128, 128)
    np.testing.assert_array_equal(to_original(padded, (101, 101), offsets), maps)
    # Through predict's restore_resolution, with the offsets read from an index.
    index = pd.DataFrame({"id": ["a", "b"], "pad_top": [13, 13], "pad_left": [13, 13]})
    restored = restore_resolution(
        np.stack([padded, padded[::-1]]), [(101, 101)] * 2, index_offsets(index)
    )
    np.testing.assert_array_equal(restored[0], maps)
    np.testing.assert_array_equal(restored[1], maps[::-1])
    # Without pad columns (resize mode) the maps are resized bilinearly, as before.
    assert index_offsets(index[["id"]]) == [None, None]
    resized = restore_resolution(padded[None], [(101, 101)])[0]
    expected = cv2.resize(padded.transpose(1, 2, 0), (101, 101), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resized, expected.transpose(2, 0, 1))


def test_validation_scores_the_original_window_shared_by_the_fold() -> None:
    index = pd.DataFrame(
        {
            "id": ["a", "b", "c", "t"],
            "split": ["train", "train", "train", "test"],
            "row": [0, 1, 2, 0],
            "orig_height": [101, 101, 90, 101],
            "orig_width": [101, 101, 101, 101],
            "pad_top": [13, 13, 19, 13],
            "pad_left": [13, 13, 13, 13],
        }
    )
    assert score_window(index, [1, 0]) == (13, 13, 101, 101)
    assert score_window(index, [0, 2]) is None  # mixed sizes: the whole canvas
    assert score_window(index.drop(columns=["pad_top", "pad_left"]), [0, 1]) is None


# --------------------------------------------------------------------------- preprocess


def _dataset(root: Path, shape: tuple[int, int], n_train: int = 3) -> IngestOptions:
    rng = np.random.default_rng(3)
    for split, n in (("train", n_train), ("test", 2)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(
                str(root / split / "images" / f"{split}{i}.png"),
                rng.integers(0, 256, shape, dtype=np.uint8),
            )
            if split == "train":
                (root / "train" / "masks").mkdir(exist_ok=True)
                mask = (rng.random(shape) < 0.3).astype(np.uint8) * 255
                cv2.imwrite(str(root / "train" / "masks" / f"train{i}.png"), mask)
    return IngestOptions(
        train_images=str(root / "train/images"),
        test_images=str(root / "test/images"),
        train_masks=str(root / "train/masks"),
    )


def test_pad_mode_preprocess_reflects_images_and_masks_and_records_the_offsets(
    tmp_path: Path,
) -> None:
    options = _dataset(tmp_path / "data", (11, 9))
    manifest, _ = ingest(options)
    items, _ = find_duplicates(manifest, DedupOptions())
    stats = preprocess(
        manifest, items, PreprocessOptions(height=16, width=12, resize_mode="pad"), tmp_path / "out"
    )
    assert (stats["height"], stats["width"]) == (16, 12)
    assert stats["options"]["resize_mode"] == "pad"
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert (index["pad_top"] == 2).all() and (index["pad_left"] == 1).all()  # 2+3, 1+2
    images = np.load(tmp_path / "out" / "train_images.npy")
    masks = np.load(tmp_path / "out" / "train_masks.npy")
    for row in index[index["split"] == "train"].itertuples():
        image = cv2.imread(str(tmp_path / "data/train/images" / f"{row.id}.png"), 0)
        mask = cv2.imread(str(tmp_path / "data/train/masks" / f"{row.id}.png"), 0) > 0
        np.testing.assert_array_equal(images[row.row, :, :, 0], _cv2_reflect(image, 2, 3, 1, 2))
        np.testing.assert_array_equal(
            masks[row.row], _cv2_reflect(mask.astype(np.uint8), 2, 3, 1, 2)
        )
    # Resize mode (the default) writes the index without pad columns, as before.
    preprocess(manifest, items, PreprocessOptions(height=16, width=12), tmp_path / "resized")
    columns = pd.read_parquet(tmp_path / "resized" / "index.parquet").columns
    assert list(columns) == ["id", "split", "row", "orig_height", "orig_width"]


def test_pad_mode_refuses_a_target_smaller_than_an_image_before_writing(tmp_path: Path) -> None:
    manifest, _ = ingest(_dataset(tmp_path / "data", (11, 9), n_train=2))
    items, _ = find_duplicates(manifest, DedupOptions())
    with pytest.raises(SegflowError, match=r"train0\.png: 9x11 .*pad requires a target >= "):
        preprocess(
            manifest,
            items,
            PreprocessOptions(height=10, width=12, resize_mode="pad"),
            tmp_path / "o",
        )
    assert not list((tmp_path / "o").glob("*.npy"))


def test_stacking_reads_padded_images_cropped_to_the_original(tmp_path: Path) -> None:
    images = np.arange(2 * 6 * 5, dtype=np.uint8).reshape(2, 6, 5, 1)
    np.save(tmp_path / "train_images.npy", images)
    index = pd.DataFrame(
        {
            "id": ["a", "b"],
            "split": "train",
            "row": [0, 1],
            "orig_height": 3,
            "orig_width": 2,
            "pad_top": 1,
            "pad_left": 2,
        }
    )
    index.to_parquet(tmp_path / "index.parquet")
    cropped = images_for(tmp_path, "train", pd.Series(["b", "a"], name="id"))
    np.testing.assert_array_equal(cropped, images[[1, 0], 1:4, 2:4])


# --------------------------------------------------------------------------- pseudo-labels


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_pseudo_targets_are_reflect_padded_like_the_test_images(labels: str) -> None:
    probs = np.full((2, 1, 20, 17), 0.02, np.float16)
    probs[0, 0, 2:9, 0:6] = 0.97  # an object touching the left border: its mirror pads it
    ids = pd.DataFrame({"id": ["a", "b"], "orig_height": 20, "orig_width": 17})
    tuned = {
        "classes": [
            {"class": "mask", "threshold": 0.5, "min_area": 0, "fill_holes": False, "gate": 0.0}
        ]
    }
    items = pd.DataFrame({"id": ["a", "b"], "split": "test", "leak_train_ids": [None, None]})
    offsets = {"a": pad_offsets((20, 17), (24, 24)), "b": pad_offsets((20, 17), (24, 24))}
    assert offsets["a"] == (2, 3)
    selection, targets, _ = select_pseudo_stage(
        Prediction(ids, probs),
        tuned,
        ["mask"],
        items,
        PseudoOptions(labels=labels, max_uncertain_share=1.0),
        (24, 24),
        offsets,
    )
    assert selection.loc[selection["selected"], "id"].tolist() == ["a", "b"]
    if labels == "hard":
        truth = (probs[0, 0] > 0.5).astype(np.uint8)
        expected = _cv2_reflect(truth, 2, 2, 3, 4)
        assert targets.shape == (2, 24, 24)
        np.testing.assert_array_equal(targets[0], expected)
        assert targets[0, 4:11, 0:3].all()  # the mirror of the object left of the border
        # Resize mode (no offsets) resizes with nearest neighbours, as before.
        assert from_original(truth, (24, 24), None, True).shape == (24, 24)
    else:
        expected = _cv2_reflect(probs[0, 0].astype(np.float32), 2, 2, 3, 4)
        assert targets.shape == (2, 1, 24, 24) and targets.dtype == np.float16
        np.testing.assert_allclose(targets[0, 0].astype(np.float32), expected, atol=1e-3)


# --------------------------------------------------------------------------- the choice


def _measurement(step_seconds: float) -> Measurement:
    return Measurement(
        step_seconds=step_seconds,
        val_seconds_per_image=0.0,
        predict_seconds_per_image=0.0,
        setup_seconds=0.0,
        checkpoint_seconds=0.0,
        startup_seconds=0.0,
    )


# Planted timings: one step costs 0.05 s at 64 px, 0.1 s at 128 px, 1.5 s at 256 px.
STEP_SECONDS = {64: 0.05, 128: 0.1, 256: 1.5}
CANDIDATES = [Candidate(s, s, "resize") for s in (256, 64, 128)]  # any order


def _estimates(budget: BudgetOptions, configured_epochs: int = 10) -> list:
    # Two folds of 100 training items, batch 10: 10 steps per epoch; a 600 s budget (no
    # reserve) gives each of the two trainings 300 s: 600, 300 and 20 epochs.
    return estimate_sizes(
        CANDIDATES,
        {c: {"e": _measurement(STEP_SECONDS[c.height])} for c in CANDIDATES},
        budget,
        {"e": {}},
        {"e": configured_epochs},
        {"e": 10},
        [(100, 50), (100, 50)],
        n_test=0,
    )


def test_the_largest_size_whose_folds_keep_enough_steps_is_chosen() -> None:
    budget = BudgetOptions(minutes=10, reserve_share=0.0, cap_at_config_epochs=False)
    record = resolution_record(_estimates(budget), min_fold_steps=300)
    sizes = {s["height"]: s for s in record["sizes"]}
    assert sizes[256]["fewest_fold_steps"] == 200 and not sizes[256]["qualifies"]
    assert sizes[128]["fewest_fold_steps"] == 3000 and sizes[128]["qualifies"]
    assert sizes[64]["fewest_fold_steps"] == 6000
    assert record["chosen"] == [128, 128] and record["mode"] == "resize"
    assert record["warning"] is None and "256x256 resize" in record["reason"]
    # A lower threshold lets the largest through.
    assert resolution_record(_estimates(budget), min_fold_steps=200)["chosen"] == [256, 256]


def test_no_size_qualifies_gives_the_smallest_with_a_warning() -> None:
    # 15 s: 150, 75 and (infeasible) 10 steps.
    budget = BudgetOptions(minutes=0.25, reserve_share=0.0, cap_at_config_epochs=False)
    record = resolution_record(_estimates(budget), min_fold_steps=300)
    assert record["chosen"] == [64, 64]
    assert "no candidate size gives every fold 300" in record["warning"]


def test_folds_at_their_configured_epochs_are_not_short_of_budget() -> None:
    # Capped at train.epochs = 10 (100 steps) at every size: the budget does not limit them,
    # so the size does not cost steps and the largest is taken.
    budget = BudgetOptions(minutes=10, reserve_share=0.0)
    record = resolution_record(_estimates(budget, configured_epochs=10), min_fold_steps=300)
    assert record["chosen"] == [256, 256]
    assert all(t["capped"] for s in record["sizes"] for t in s["trainings"])


def test_equal_sizes_keep_their_list_order_and_a_pad_candidate_is_recorded() -> None:
    candidates = parse_candidates(
        [[128, 128], {"height": 128, "width": 128, "mode": "pad"}], "resize"
    )
    assert candidates == [Candidate(128, 128, "resize"), Candidate(128, 128, "pad")]
    budget = BudgetOptions(minutes=10, reserve_share=0.0, cap_at_config_epochs=False)
    estimates = estimate_sizes(
        candidates[::-1],
        {c: {"e": _measurement(0.1)} for c in candidates},
        budget,
        {"e": {}},
        {"e": 10},
        {"e": 10},
        [(100, 50), (100, 50)],
        n_test=0,
    )
    record = resolution_record(estimates, 300)
    assert (record["chosen"], record["mode"]) == ([128, 128], "pad")


def test_resolution_json_round_trip_and_bad_files(tmp_path: Path) -> None:
    budget = BudgetOptions(minutes=10, reserve_share=0.0, cap_at_config_epochs=False)
    path = tmp_path / "resolution.json"
    path.write_text(json.dumps(resolution_record(_estimates(budget), 300)))
    assert read_resolution(path) == (128, 128, "resize")
    path.write_text(json.dumps({"format": 1, "chosen": [128], "mode": "pad"}))
    with pytest.raises(SegflowError, match="'chosen' must be"):
        read_resolution(path)
    with pytest.raises(SegflowError, match="does not exist"):
        read_resolution(tmp_path / "absent.json")


def test_a_candidate_size_is_timed_on_random_arrays_of_that_size(tmp_path: Path) -> None:
    import torch

    from segflow.model.datasets import SegmentationArrays
    from segflow.model.experiment import parse_experiment
    from segflow.model.inference.predict import PredictOptions
    from segflow.model.resolution_measure import measure_at_size, write_random_arrays

    candidate = Candidate(40, 40, "pad")
    folds = write_random_arrays(tmp_path / "a", candidate, (37, 35), 1, 2, 5, 3, 2)
    arrays = SegmentationArrays.open(tmp_path / "a")
    assert (arrays.height, arrays.width) == (40, 40) and arrays.dtype == "uint8"
    assert index_offsets(arrays.index)[0] == pad_offsets((37, 35), (40, 40)) == (1, 2)
    assert pd.read_csv(folds)["fold"].tolist() == [1] * 5 + [0] * 3
    assert np.load(tmp_path / "a" / "train_masks.npy").max() <= 3  # two classes' bits

    tiny = {
        "model": {
            "encoder": "mobilenet_v2",
            "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        },
        "train": {"epochs": 2, "batch_size": 2},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = measure_at_size(
            parse_experiment("tiny", tiny, in_channels=1, classes=1),
            candidate,
            1,
            1,
            (37, 35),
            PredictOptions(batch_size=2),
            measure_steps=1,
            predict_threads=1,
            startup_seconds=0.5,
        )
    finally:
        torch.set_num_threads(threads)
    assert measured.step_seconds > 0 and measured.predict_seconds_per_image > 0
    assert measured.startup_seconds == 0.5


def test_plan_resolution_command_chooses_and_preprocess_follows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI wiring end to end on a tiny dataset: plan-resolution, then preprocess."""
    from segflow.cli import main
    from segflow.model import budget_measure

    monkeypatch.setattr(budget_measure, "process_startup_seconds", lambda: 0.0)
    manifest, _ = ingest(_dataset(tmp_path / "data", (11, 9), n_train=6))
    items, _ = find_duplicates(manifest, DedupOptions())
    manifest.to_parquet(tmp_path / "manifest.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    train_ids = sorted(manifest.loc[manifest["split"] == "train", "id"])
    folds = pd.DataFrame({"id": train_ids, "fold": [0, 1] * 3})
    folds.to_csv(tmp_path / "folds.csv", index=False)
    tiny = {
        "model": {
            "encoder": "mobilenet_v2",
            "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        },
        "train": {"epochs": 2, "batch_size": 2},
    }
    out = tmp_path / "resolution.json"
    sizes = [[16, 16], {"height": 24, "width": 24, "mode": "pad"}]
    main(
        [
            "plan-resolution",
            "--manifest", str(tmp_path / "manifest.parquet"),
            "--folds", str(tmp_path / "folds.csv"),
            "--sizes", json.dumps(sizes),
            "--min-fold-steps", "1",
            "--experiments", json.dumps({"tiny": tiny}),
            "--predict", json.dumps({"batch_size": 2}),
            "--minutes", "30",
            "--measure-steps", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert (record["chosen"], record["mode"]) == ([24, 24], "pad")  # both qualify: the larger
    assert [(s["height"], s["mode"]) for s in record["sizes"]] == [(16, "resize"), (24, "pad")]
    assert all(s["measured"]["tiny"]["step_seconds"] > 0 for s in record["sizes"])
    main(
        [
            "preprocess",
            "--manifest", str(tmp_path / "manifest.parquet"),
            "--dedup-items", str(tmp_path / "items.parquet"),
            "--height", "16",
            "--width", "16",
            "--resolution", str(out),
            "--out-dir", str(tmp_path / "arrays"),
        ]
    )  # fmt: skip
    stats = json.loads((tmp_path / "arrays" / "stats.json").read_text())
    assert (stats["height"], stats["width"], stats["options"]["resize_mode"]) == (24, 24, "pad")
    index = pd.read_parquet(tmp_path / "arrays" / "index.parquet")
    assert (index["pad_top"] == 6).all() and (index["pad_left"] == 7).all()  # 11x9 in 24x24


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"minutes": None, "sizes": [[128, 128]]}, "budget.sizes needs budget.minutes"),
        ({"minutes": 5, "sizes": [[128]]}, r"budget.sizes\[0\] must be \[height, width\]"),
        ({"minutes": 5, "sizes": [[128, 0]]}, r"budget.sizes\[0\]: height and width must be"),
        ({"minutes": 5, "sizes": [{"height": 9, "width": 9, "mode": "crop"}]}, "mode must be"),
        ({"minutes": 5, "sizes": [{"height": 9, "widht": 9}]}, "unknown key 'widht'"),
        ({"minutes": 5, "sizes": [[9, 9], [9, 9]]}, r"sizes\[1\]: 9x9 resize is listed twice"),
        ({"minutes": 5, "sizes": [], "min_fold_steps": 10}, "non-empty list or null"),
        ({"minutes": 5, "sizes": None, "min_fold_steps": 0}, "min_fold_steps must be"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(budget: dict, message: str) -> None:
    with pytest.raises(SegflowError, match=message) as error:
        check_resolution_config(budget, {"resize_mode": "resize"})
    assert "\n" not in str(error.value)


def test_a_pad_candidate_smaller_than_an_original_is_refused() -> None:
    manifest = pd.DataFrame(
        {"image_path": ["a.png", "b.png"], "height": [101, 101], "width": [101, 120]}
    )
    candidates = parse_candidates(
        [[96, 96], {"height": 128, "width": 110, "mode": "pad"}], "resize"
    )
    with pytest.raises(
        SegflowError, match=r"^budget.sizes\[1\]: pad 128x110 is smaller than b\.png"
    ):
        check_pad_candidates(candidates, manifest)
    # Resize candidates may be smaller; pad ones that hold every image pass.
    fits = [[96, 96], {"height": 128, "width": 128, "mode": "pad"}]
    check_pad_candidates(parse_candidates(fits, "resize"), manifest)
    with pytest.raises(SegflowError, match=r"sizes\[0\]: pad 96x96"):  # the default mode
        check_pad_candidates(parse_candidates(fits, "pad"), manifest)


def test_resolution_options_defaults_match_the_schema() -> None:
    schema = yaml.safe_load((REPO_ROOT / "workflow/schemas/config.schema.yaml").read_text())
    budget = schema["properties"]["budget"]["properties"]
    defaults = ResolutionOptions()
    assert budget["sizes"]["default"] is None is defaults.sizes
    assert budget["min_fold_steps"]["default"] == defaults.min_fold_steps == MIN_OPTIMIZER_STEPS
    preprocess_mode = schema["properties"]["preprocess"]["properties"]["resize_mode"]
    assert preprocess_mode["enum"] == ["resize", "pad"] and preprocess_mode["default"] == "resize"


# --------------------------------------------------------------------------- the workflow

SMALL = {
    "demo": {"n_train": 60, "n_test": 20, "seed": 5},
    "folds": {"n_folds": 2},
    "run_experiments": ["unet_lite0"],
    "experiments": {"unet_lite0": {"train": {"epochs": 1, "batch_size": 8}}},
    "pseudo": {"rounds": 0},
}


@pytest.mark.workflow
def test_plan_resolution_runs_before_preprocess_only_with_budget_sizes(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    off = {**SMALL, "budget": {"minutes": 20}}
    (workdir / "off.yaml").write_text(yaml.safe_dump(off))
    assert "plan_resolution" not in planned_jobs(workdir, "--configfile", "off.yaml")

    on = {**SMALL, "budget": {"minutes": 20, "sizes": [[64, 64], {"height": 96, "width": 96}]}}
    (workdir / "on.yaml").write_text(yaml.safe_dump(on))
    output = run_snakemake(workdir, "-n", "-p", "--configfile", "on.yaml").stdout
    blocks = {
        rule.group(1): block
        for block in re.split(r"^\[[^\]\n]*\]$", output, flags=re.M)
        if (rule := re.match(r"\s*(?:local)?rule (\w+):", block))
    }
    assert "plan_resolution" in blocks
    prep = blocks["preprocess_train"]
    assert re.search(r"^    input: .*results/budget/resolution\.json", prep, flags=re.M)
    assert "--resolution results/budget/resolution.json" in prep
    plan = blocks["plan_resolution"]
    assert "results/folds/folds.csv" in plan and "--sizes" in plan
    assert "--min-fold-steps 300" in plan and "plan-resolution" in plan
