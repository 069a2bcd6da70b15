"""DICOM series: the synthetic generator, series metadata in ingest, canonical orientation,
series-grouped folds and 2.5D inputs (segflow.formats.dicom_series, segflow.data.demo_dicom)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import TINY_EXPERIMENT
from helpers import naive_encode

from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.demo_dicom import (
    ORIENTATIONS,
    DicomDemoOptions,
    generate_dicom_series,
    write_dicom_slice,
)
from segflow.data.folds import FoldOptions, make_folds
from segflow.data.ingest import IngestOptions, ingest
from segflow.data.preprocess import PreprocessOptions, context_plan, preprocess
from segflow.data.preprocess_test import preprocess_test
from segflow.formats.dicom_series import (
    canonical_orientation,
    context_weights,
    read_slice_geometry,
)
from segflow.formats.imageio import DicomWindow, apply_orientation, decode_image, undo_orientation
from segflow.formats.labels import read_label
from segflow.model.metrics import score_oof, series_scores
from segflow.model.submit import (
    SubmissionOptions,
    known_test_labels,
    stored_orientations,
    submission_frame,
)

SMALL = DicomDemoOptions(seed=3, n_series=3, n_test_series=1, n_slices=8, size=16, flip_every=2)


@pytest.fixture(scope="module")
def series_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dicom_series")
    return root, generate_dicom_series(root, SMALL)


def _options(root: Path, **extra: object) -> IngestOptions:
    return IngestOptions(
        train_images=str(root / "train" / "images"),
        train_masks=str(root / "train" / "masks"),
        test_images=str(root / "test" / "images"),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def manifest(series_data: tuple[Path, dict]) -> pd.DataFrame:
    root, _ = series_data
    frame, _ = ingest(_options(root, dicom_series=True, dicom_orientation=True))
    return frame


# --------------------------------------------------------------------------- generator


def test_generator_writes_valid_series(series_data: tuple[Path, dict]) -> None:
    root, truth = series_data
    assert [s["storage"] for s in truth["series"]] == [
        "canonical",
        "mirrored",
        "canonical",
        "transposed",
    ]
    first = truth["series"][0]
    for item_id in first["ids"]:
        dataset = pydicom.dcmread(root / "train" / "images" / f"{item_id}.dcm")
        assert dataset.SOPClassUID == pydicom.uid.CTImageStorage
        assert dataset.SeriesInstanceUID == first["series_uid"]
        assert [float(v) for v in dataset.ImageOrientationPatient] == list(
            ORIENTATIONS["canonical"]
        )
        assert len(dataset.ImagePositionPatient) == 3
        assert float(dataset.RescaleIntercept) == -1024.0
        assert dataset.pixel_array.shape == (16, 16)
        assert (root / "train" / "masks" / f"{item_id}.png").is_file()
    gaps = np.diff(first["positions"])
    assert gaps.min() != pytest.approx(gaps.max())  # uneven spacing is planted
    assert sorted(first["ids"]) != first["ids"]  # file names do not follow the slice order
    assert json.loads((root / "series.json").read_text())["series"][0]["ids"] == first["ids"]
    assert max(first["coverage"]) > 0.05  # the ellipsoid is there


# --------------------------------------------------------------------------- ingest


def test_ingest_records_series_and_orders_by_position(
    series_data: tuple[Path, dict], manifest: pd.DataFrame
) -> None:
    _, truth = series_data
    by_id = manifest.set_index("id")
    for series in truth["series"]:
        rows = by_id.loc[series["ids"]]
        assert set(rows["series_uid"]) == {series["series_uid"]}
        # The truth lists ids in slice order: their positions along the normal are monotonic
        # (increasing, or decreasing for the transposed series whose normal points to -z).
        steps = np.diff(rows["slice_position"].to_numpy())
        assert (steps > 0).all() or (steps < 0).all()
        assert np.allclose(np.abs(steps), np.diff(series["positions"]), atol=1e-3)
    turns = {s["storage"]: by_id.loc[s["ids"][0], "slice_orientation"] for s in truth["series"]}
    assert turns == {"canonical": 1, "mirrored": 2, "transposed": 5}


def test_ingest_without_the_options_adds_no_columns(series_data: tuple[Path, dict]) -> None:
    root, _ = series_data
    frame, summary = ingest(_options(root))
    assert not {"series_uid", "slice_position", "slice_orientation"} & set(frame.columns)
    assert "dicom_series" not in summary


def test_missing_series_uid_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    write_dicom_slice(path, np.zeros((8, 8)), "", "1.2.3.4", (0.0, 0.0, 0.0))
    with pytest.raises(SegflowError, match=r"a\.dcm: DICOM file has no SeriesInstanceUID"):
        read_slice_geometry(path)
    write_dicom_slice(path, np.zeros((8, 8)), "1.2.3", "1.2.3.4", None)
    with pytest.raises(SegflowError, match="no ImagePositionPatient"):
        read_slice_geometry(path)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(("storage", "code"), [("mirrored", 2), ("transposed", 5)])
def test_turned_slice_equals_canonical_after_orientation(
    tmp_path: Path, storage: str, code: int
) -> None:
    rng = np.random.default_rng(0)
    canonical = rng.uniform(-150, 200, size=(12, 10))
    mask = np.zeros((12, 10), dtype=np.uint8)
    mask[2:5, 1:4] = 255  # off-centre: any flip or transpose moves it
    stored = canonical[:, ::-1] if storage == "mirrored" else canonical.T
    stored_mask = mask[:, ::-1] if storage == "mirrored" else mask.T
    write_dicom_slice(tmp_path / "c.dcm", canonical, "1.2", "1.2.1", (0, 0, 0))
    write_dicom_slice(tmp_path / "t.dcm", stored, "1.2", "1.2.2", (0, 0, 1), ORIENTATIONS[storage])
    import cv2

    cv2.imwrite(str(tmp_path / "t.png"), np.ascontiguousarray(stored_mask))
    on = DicomWindow(orientation=True)
    reference = decode_image(tmp_path / "c.dcm", on).pixels
    turned = decode_image(tmp_path / "t.dcm", on)
    assert turned.orientation == code
    assert np.array_equal(turned.pixels, reference)
    # Without the option the stored pixels differ from the canonical ones.
    raw = decode_image(tmp_path / "t.dcm").pixels
    assert raw.shape != reference.shape or not np.array_equal(raw, reference)
    label = read_label(str(tmp_path / "t.png"), None, (12, 10), 1, "t", orientation=code)
    assert np.array_equal(label, (mask > 0).astype(np.uint8))


@pytest.mark.parametrize("storage", ["mirrored", "transposed"])
def test_submission_is_on_each_test_file_stored_grid(tmp_path: Path, storage: str) -> None:
    """A turned test slice's submission RLE (its prediction, and the train label a leak copies)
    numbers the file's stored pixels: the canonical masks are turned back before encoding."""
    import cv2

    rng = np.random.default_rng(1)
    turn = {"mirrored": 2, "transposed": 5}[storage]
    canonical = [rng.uniform(-150, 200, size=(12, 10)) for _ in range(2)]
    truth = np.zeros((2, 12, 10), dtype=np.uint8)
    truth[0, 2:5, 1:4] = 1  # off-centre: any flip or transpose moves them
    truth[1, 7:11, 6:9] = 1

    def as_stored(pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(pixels[:, ::-1] if storage == "mirrored" else pixels.T)

    # Train: slice 0 stored canonically. Test: a copy of it stored turned (a leak), and
    # slice 1 stored turned (predicted).
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    write_dicom_slice(tmp_path / "train" / "images" / "a.dcm", canonical[0], "1.2", "1.2.1", None)
    cv2.imwrite(str(tmp_path / "train" / "masks" / "a.png"), truth[0] * np.uint8(255))
    for name, index in (("leak", 0), ("pred", 1)):
        write_dicom_slice(
            tmp_path / "test" / "images" / f"{name}.dcm",
            as_stored(canonical[index]),
            "1.3",
            f"1.3.{index}",
            None,
            ORIENTATIONS[storage],
        )
    options = _options(tmp_path, dicom_orientation=True)
    train, _ = ingest(options, split="train")
    test, _ = ingest(options, split="test", train_ids=frozenset(train["id"]))
    orientations = stored_orientations(test)
    assert orientations == {"leak": turn, "pred": turn}
    leaks = pd.DataFrame({"id": ["leak"], "split": ["test"], "leak_train_ids": ["a"]})
    known = known_test_labels(train, leaks)
    assert np.array_equal(known["leak"], truth[0])  # the train label, canonical
    predictions = {"leak": np.zeros((12, 10), np.uint8), "pred": truth[1]}
    frame = submission_frame(predictions, SubmissionOptions(), known, orientations=orientations)
    written = dict(zip(frame["id"], frame["rle_mask"], strict=True))
    expected = {
        "leak": naive_encode(as_stored(truth[0])),
        "pred": naive_encode(as_stored(truth[1])),
    }
    assert written == expected
    # Without the turn back, both rows would number the canonical pixels instead.
    unturned = submission_frame(predictions, SubmissionOptions(), known)
    assert not set(unturned["rle_mask"]) & set(expected.values())
    # Instance rows are turned the same way.
    instances = submission_frame(
        predictions, SubmissionOptions(instances=True), known, orientations=orientations
    )
    assert dict(zip(instances["id"], instances["rle_mask"], strict=True)) == expected


def test_undo_orientation_inverts_every_code() -> None:
    pixels = np.arange(12).reshape(3, 4)
    for code in range(1, 9):
        turned = apply_orientation(pixels, code)
        assert np.array_equal(undo_orientation(turned, code), pixels)


def test_canonical_orientation_codes() -> None:
    x, y, z = np.eye(3)
    assert canonical_orientation(x, y) == 1
    assert canonical_orientation(-x, y) == 2
    assert canonical_orientation(-x, -y) == 3
    assert canonical_orientation(x, -y) == 4
    assert canonical_orientation(y, x) == 5
    assert canonical_orientation(x, z) == 1  # coronal: columns along x, rows along z


# --------------------------------------------------------------------------- folds


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_folds_never_split_a_series(manifest: pd.DataFrame) -> None:
    train = manifest[manifest["split"] == "train"]
    items, _ = find_duplicates(train, DedupOptions())
    folds, _ = make_folds(train, items, FoldOptions(n_folds=3, seed=0))
    merged = folds.merge(train[["id", "series_uid"]], on="id")
    assert (merged.groupby("series_uid")["fold"].nunique() == 1).all()
    assert merged["fold"].nunique() == 3
    # Without series columns the same slices are split across folds (the grouping matters).
    plain, _ = make_folds(train.drop(columns="series_uid"), items, FoldOptions(n_folds=3, seed=0))
    split = plain.merge(train[["id", "series_uid"]], on="id")
    assert (split.groupby("series_uid")["fold"].nunique() > 1).any()


# --------------------------------------------------------------------------- 2.5D


def test_context_weights_interpolate_and_replicate_edges() -> None:
    positions = np.array([0.0, 1.0, 3.0, 4.0])
    # Channels sample z - 2, z, z + 2: between slices linearly, beyond the ends the edge slice.
    assert context_weights(positions, 1, 2.0) == [
        [(0, 0, 0.0), (0, 0, 0.0), (1, 2, 0.5)],
        [(0, 0, 0.0), (1, 1, 0.0), (2, 2, 0.0)],
        [(1, 1, 0.0), (2, 2, 0.0), (3, 3, 0.0)],
        [(1, 2, 0.5), (3, 3, 0.0), (3, 3, 0.0)],
    ]


def test_preprocess_stacks_interpolated_neighbours(
    tmp_path: Path, series_data: tuple[Path, dict], manifest: pd.DataFrame
) -> None:
    _, truth = series_data
    train = manifest[manifest["split"] == "train"]
    items, _ = find_duplicates(train, DedupOptions())
    flat = preprocess(train, items, PreprocessOptions(), tmp_path / "flat")
    stats = preprocess(train, items, PreprocessOptions(context_slices=1), tmp_path / "ctx")
    assert flat["channels"] == 1 and stats["channels"] == 3
    single = np.load(tmp_path / "flat" / "train_images.npy")[..., 0].astype(np.float64)
    stacked = np.load(tmp_path / "ctx" / "train_images.npy")
    index = pd.read_parquet(tmp_path / "ctx" / "index.parquet").set_index("id")["row"]
    assert np.array_equal(stacked[..., 1], single)  # the centre channel is the slice itself
    assert np.array_equal(
        np.load(tmp_path / "ctx" / "train_masks.npy"),
        np.load(tmp_path / "flat" / "train_masks.npy"),
    )
    series = truth["series"][0]
    positions = np.asarray(series["positions"])
    spacing = float(np.median(np.diff(positions)))
    ids = series["ids"]
    i = 3
    target = positions[i] + spacing  # channel 2 of slice i samples one spacing above it
    upper = int(np.searchsorted(positions, target))
    t = (target - positions[upper - 1]) / (positions[upper] - positions[upper - 1])
    expected = (1 - t) * single[index[ids[upper - 1]]] + t * single[index[ids[upper]]]
    assert np.abs(stacked[index[ids[i]], ..., 2] - expected).max() <= 0.5 + 1e-6
    # The neighbour is not the slice itself: with k = 0 the channel would not exist at all,
    # and it differs from the centre wherever the ellipsoid's cross-section changes.
    assert not np.array_equal(stacked[index[ids[i]], ..., 2], stacked[index[ids[i]], ..., 1])
    # The first slice's lower neighbour is replicated from itself.
    assert np.array_equal(stacked[index[ids[0]], ..., 0], stacked[index[ids[0]], ..., 1])
    # Test series are stacked the same way.
    test = manifest[manifest["split"] == "test"]
    assert preprocess_test(test, stats, tmp_path / "ctx") == len(test)
    assert np.load(tmp_path / "ctx" / "test_images.npy").shape[-1] == 3


def test_context_bad_input_is_one_clear_line(manifest: pd.DataFrame) -> None:
    train = manifest[manifest["split"] == "train"]
    ids = train["id"].tolist()
    with pytest.raises(SegflowError, match=r"context_slices = 9 but series .* has only 8 slices"):
        context_plan(train, ids, PreprocessOptions(context_slices=9))
    with pytest.raises(SegflowError, match=r"set data\.dicom_series: true"):
        context_plan(train.drop(columns="series_uid"), ids, PreprocessOptions(context_slices=1))
    gap = train.copy()
    series = gap["series_uid"] == gap["series_uid"].iloc[0]
    last = gap.loc[series, "slice_position"].idxmax()
    gap.loc[last, "slice_position"] += 100.0  # a missing run of slices
    with pytest.raises(SegflowError, match="inconsistent slice spacing"):
        context_plan(gap, ids, PreprocessOptions(context_slices=1))


# --------------------------------------------------------------------------- per-series score


def test_oof_scores_each_series_as_one_volume() -> None:
    """Series A: slice Dices 2/3 and 1, one 3D Dice of 8/10; series B: a missed slice and an
    empty one (per-slice mean 0.5), 3D Dice 0. The summary's mean over series: 0.4."""
    truth = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0, :2, :2] = 1  # A: 4 true pixels, 2 of them predicted
    pred[0, 0, :2] = 1
    truth[1, 3, :2] = pred[1, 3, :2] = 1  # A: 2 pixels, exact
    truth[2, 1:3, 1:3] = 1  # B: 4 true pixels, none predicted; slice 3 empty in both
    series = ["A", "A", "B", "B"]
    table = series_scores(pred, truth, series)
    assert table["series_uid"].tolist() == ["A", "B"]
    assert table["n_slices"].tolist() == [2, 2]
    assert np.allclose(table["dice"], [0.8, 0.0])
    probs = pred[:, None].astype(np.float32)
    folds = np.array([0, 1, 0, 1])
    _, summary = score_oof(probs, truth, folds, series=series)
    assert summary["series_dice"] == pytest.approx(0.4)
    assert summary["dice"] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)  # per slice: unchanged
    assert [(r["series_uid"], r["n_slices"]) for r in summary["per_series"]] == [
        ("A", 2),
        ("B", 2),
    ]
    json.dumps(summary)  # JSON-ready
    _, plain = score_oof(probs, truth, folds)
    assert "series_dice" not in plain and "per_series" not in plain
    with pytest.raises(ValueError, match="3 series names for 4 slices"):
        series_scores(pred, truth, series[:3])


# --------------------------------------------------------------------------- workflow

# The DICOM options through the whole workflow, the smallest run the other workflow tests use:
# 3 train series of 8 slices (16 x 16), one test series stored transposed, a 2.5D input of
# 3 channels, a three-level Unet for 1 epoch on one holdout fold of 2, no TTA, no stacking.
DICOM_RUN = {
    "demo": {"enabled": False},
    "data": {
        "train_images": "data/train/images",
        "train_masks": "data/train/masks",
        "test_images": "data/test/images",
        "mask_source": "folder",
        "rle_csv": None,
        "metadata_csv": None,
        "dicom_series": True,
        "dicom_orientation": True,
    },
    "preprocess": {"height": 16, "width": 16, "clahe": False, "context_slices": 1},
    "folds": {"n_folds": 2, "train_folds": [0]},
    "run_experiments": ["tiny"],
    "experiments": {"tiny": TINY_EXPERIMENT},
    "pseudo": {"rounds": 0},
    "stack": {"enabled": False},
    "predict": {"tta": "none"},
    "postprocess": {
        "thresholds": [0.5],
        "min_areas": [0],
        "fill_holes_options": [False],
        "gates": [0.5],
    },
}


def _plant_turned_leak(root: Path, truth: dict) -> tuple[str, np.ndarray]:
    """Copy the largest mask's train slice of the first (canonical) series into the test folder
    stored transposed, as one more slice of the test series: dedup finds it (same canonical
    pixels), and its leak-copied label must come out on the copy's transposed grid.

    Returns:
        (its id, its mask on its stored grid, {0, 1}).
    """
    import cv2

    first, test = truth["series"][0], truth["series"][-1]
    source = max(first["ids"], key=lambda i: first["coverage"][first["ids"].index(i)])
    mask = (cv2.imread(str(root / "train" / "masks" / f"{source}.png"), 0) > 0).astype(np.uint8)
    dataset = pydicom.dcmread(root / "train" / "images" / f"{source}.dcm")
    dataset.PixelData = np.ascontiguousarray(dataset.pixel_array.T).astype("<i2").tobytes()
    dataset.ImageOrientationPatient = [f"{v:g}" for v in ORIENTATIONS["transposed"]]
    dataset.SeriesInstanceUID = test["series_uid"]
    dataset.ImagePositionPatient = ["0", "0", f"{test['positions'][-1] + 2.0:.4f}"]
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.99"
    dataset.save_as(str(root / "test" / "images" / "leak.dcm"), enforce_file_format=True)
    return "leak", np.ascontiguousarray(mask.T)


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, np.ndarray]:
    """The workflow run once on a small DICOM series set with a planted transposed leak."""
    from conftest import copy_workflow, run_snakemake
    from test_workflow import write_config

    workdir = copy_workflow(tmp_path_factory.mktemp("dicom_workflow"))
    truth = generate_dicom_series(workdir / "data", SMALL)
    _, leak_mask = _plant_turned_leak(workdir / "data", truth)
    config = write_config(workdir, "dicom.yaml", DICOM_RUN)
    run_snakemake(workdir, "results/final/submission.csv", "--configfile", config)
    return workdir, truth, leak_mask


@pytest.mark.workflow
def test_workflow_submits_dicom_series_per_slice_on_the_stored_grid(
    dicom_run: tuple[Path, dict, np.ndarray],
) -> None:
    workdir, truth, leak_mask = dicom_run
    results = workdir / "results"
    test_series = truth["series"][-1]
    assert test_series["split"] == "test" and test_series["storage"] == "transposed"
    manifest = pd.read_parquet(results / "ingest" / "test_manifest.parquet")
    assert set(manifest["slice_orientation"]) == {5}  # the whole test set is stored transposed
    assert manifest["series_uid"].nunique() == 1
    stats = json.loads((results / "preprocess" / "stats.json").read_text())
    assert len(stats["train_mean"]) == 3  # 2.5D: the slice and one neighbour on each side
    submission = pd.read_csv(results / "final" / "submission.csv", dtype=str, keep_default_na=False)
    # One row per slice, named by the slice's file.
    assert sorted(submission["id"]) == sorted([*test_series["ids"], "leak"])
    written = dict(zip(submission["id"], submission["rle_mask"], strict=True))
    # The leak's train label, canonical in the pipeline, numbers the copy's transposed pixels.
    assert not np.array_equal(leak_mask, leak_mask.T)
    assert written["leak"] == naive_encode(leak_mask)
    assert written["leak"] != naive_encode(np.ascontiguousarray(leak_mask.T))
    # The OOF metrics score each validation series as one volume too.
    metrics = json.loads((results / "oof" / "tiny" / "round0" / "metrics.json").read_text())
    assert 0.0 <= metrics["series_dice"] <= 1.0
    assert {row["n_slices"] for row in metrics["per_series"]} == {8}
