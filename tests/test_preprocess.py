"""Tests for image preparation (segflow.data.preprocess).

Expected arrays are recomputed here independently, with cv2/numpy on the files written by the
tests, never read back from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import write_label_dataset

from segflow.artifacts.truths import load_mask, mask_sources
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.ingest import IngestOptions, ingest
from segflow.data.preprocess import (
    PreprocessOptions,
    apply_clahe,
    convert_channels,
    dark_channel,
    dehaze,
    resize_image,
    resize_mask,
    to_uint8,
)
from segflow.data.preprocess import preprocess as preprocess_train
from segflow.data.preprocess_test import preprocess_test
from segflow.formats.labels import label_dtype, unpack_labels

OUTPUTS = (
    "index.parquet",
    "stats.json",
    "test_images.npy",
    "test_index.parquet",
    "train_images.npy",
    "train_masks.npy",
)


def preprocess(manifest: pd.DataFrame, items: pd.DataFrame, options, out_dir, **kwargs) -> dict:
    """Both sides as the workflow runs them: the train arrays, then the test images prepared
    from the train stats (``n_test`` added to the returned stats)."""
    stats = preprocess_train(manifest, items, options, out_dir, **kwargs)
    n_test = preprocess_test(manifest, stats, out_dir, **kwargs)
    return {**stats, "n_test": n_test}


# --------------------------------------------------------------------------- unit: channels


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, computed by hand in float."""
    weights = np.array([0.299, 0.587, 0.114])
    return rgb[..., :3].astype(np.float64) @ weights


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_convert_channels_gray(dtype: type) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, np.iinfo(dtype).max, (7, 5), dtype=dtype)
    three = convert_channels(gray, 3)
    assert three.shape == (7, 5, 3) and three.dtype == dtype
    for channel in range(3):
        np.testing.assert_array_equal(three[:, :, channel], gray)
    one = convert_channels(gray, 1)
    assert one.shape == (7, 5, 1) and one.dtype == dtype
    np.testing.assert_array_equal(one[:, :, 0], gray)
    # An explicit single channel axis is gray too.
    np.testing.assert_array_equal(convert_channels(gray[:, :, None], 3), three)
    np.testing.assert_array_equal(convert_channels(gray[:, :, None], 1), one)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_convert_channels_colour(dtype: type) -> None:
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    rgb = rng.integers(0, top, (6, 9, 3), dtype=dtype)
    kept = convert_channels(rgb, 3)
    assert kept.shape == (6, 9, 3)
    np.testing.assert_array_equal(kept, rgb)
    gray = convert_channels(rgb, 1)
    assert gray.shape == (6, 9, 1) and gray.dtype == dtype
    # Luma with R, G, B weights (not B, G, R): within fixed-point rounding of the exact value.
    tolerance = 1 if dtype == np.uint8 else 2
    assert np.abs(gray[:, :, 0].astype(np.float64) - _luma(rgb)).max() <= tolerance
    swapped = np.abs(gray[:, :, 0].astype(np.float64) - _luma(rgb[:, :, ::-1])).max()
    assert swapped > 10 * tolerance

    alpha = rng.integers(0, top, (6, 9, 1), dtype=dtype)
    rgba = np.concatenate([rgb, alpha], axis=2)
    np.testing.assert_array_equal(convert_channels(rgba, 3), rgb)
    np.testing.assert_array_equal(convert_channels(rgba, 1), gray)


# --------------------------------------------------------------------------- unit: bit depth


def test_to_uint8_full_range_rounding() -> None:
    values = np.arange(65536, dtype=np.uint16)
    converted = to_uint8(values)
    assert converted.dtype == np.uint8
    assert converted[0] == 0 and converted[65535] == 255
    k = np.arange(256)
    np.testing.assert_array_equal(to_uint8((257 * k).astype(np.uint16)), k)
    # Nearest 8-bit level of x / 257 (x / 257 is never exactly halfway for integer x).
    np.testing.assert_array_equal(converted, np.rint(values / 257.0).astype(np.uint8))


def test_to_uint8_passes_8_bit_through() -> None:
    image = np.random.default_rng(2).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(image), image)
    assert to_uint8(image).dtype == np.uint8


# --------------------------------------------------------------------------- unit: CLAHE


def _low_contrast(dtype: type, channels: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    # 16-bit: the same narrow band of the range, but with 16-bit resolution (as real data has).
    scale = 1 if dtype == np.uint8 else 257
    base = cv2.GaussianBlur(rng.uniform(100, 116, (64, 64)), (0, 0), 2.0)
    image = np.rint(base * scale).astype(dtype)
    if channels == 3:
        return np.stack([image, image, image], axis=2)
    return image[:, :, None]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_clahe_shape_dtype_and_contrast(dtype: type, channels: int) -> None:
    image = _low_contrast(dtype, channels)
    out = apply_clahe(image, clip_limit=4.0, tile_grid=4)
    assert out.shape == image.shape and out.dtype == image.dtype
    before = int(image.max()) - int(image.min())
    after = int(out.max()) - int(out.min())
    assert after > 2 * before
    assert out.std() > 2 * image.std()
    if channels == 3:
        # Gray content stays gray (within YCrCb round-trip rounding).
        assert np.abs(out[:, :, 0].astype(int) - out[:, :, 2].astype(int)).max() <= 2 * (
            1 if dtype == np.uint8 else 257
        )


def test_apply_clahe_matches_opencv_on_gray() -> None:
    image = _low_contrast(np.uint8, 1)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image[:, :, 0])
    np.testing.assert_array_equal(apply_clahe(image, 2.0, 8)[:, :, 0], expected)


# --------------------------------------------------------------------------- unit: resize


def test_resize_image_interpolation_choice() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    shrunk = resize_image(image, 7, 11)
    assert shrunk.shape == (7, 11, 3)
    area = cv2.resize(image, (11, 7), interpolation=cv2.INTER_AREA)
    linear = cv2.resize(image, (11, 7), interpolation=cv2.INTER_LINEAR)
    assert not np.array_equal(area, linear)  # the check below can tell them apart
    np.testing.assert_array_equal(shrunk, area)

    enlarged = resize_image(image, 33, 41)
    assert enlarged.shape == (33, 41, 3)
    np.testing.assert_array_equal(
        enlarged, cv2.resize(image, (41, 33), interpolation=cv2.INTER_LINEAR)
    )
    assert not np.array_equal(enlarged, cv2.resize(image, (41, 33), interpolation=cv2.INTER_AREA))
    cubic = resize_image(image, 7, 11, interpolation="cubic")
    np.testing.assert_array_equal(cubic, cv2.resize(image, (11, 7), interpolation=cv2.INTER_CUBIC))
    np.testing.assert_array_equal(resize_image(image, 20, 30), image)


@pytest.mark.parametrize("size", [(5, 8), (40, 50), (20, 30)])
def test_resize_image_keeps_single_channel_axis(size: tuple[int, int]) -> None:
    image = np.random.default_rng(5).integers(0, 65536, (20, 30, 1), dtype=np.uint16)
    out = resize_image(image, *size)
    assert out.shape == (*size, 1) and out.dtype == np.uint16


@pytest.mark.parametrize("size", [(5, 8), (41, 57), (13, 60)])
def test_resize_mask_stays_binary(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(6)
    mask = (cv2.GaussianBlur(rng.random((20, 30)), (0, 0), 2.0) > 0.5).astype(np.uint8)
    assert 0 < mask.mean() < 1
    out = resize_mask(mask, *size)
    assert out.shape == size and out.dtype == np.uint8
    assert set(np.unique(out).tolist()) <= {0, 1}
    np.testing.assert_array_equal(
        out, cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    )


# --------------------------------------------------------------------------- dataset helpers


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _write_dataset(
    root: Path,
    train: dict[str, tuple[np.ndarray, np.ndarray]],
    test: dict[str, np.ndarray] | None = None,
) -> IngestOptions:
    """Images are given in cv2 order (BGR for colour); masks as {0, 1}."""
    for item_id, (image, mask) in train.items():
        _write_png(root / "train/images" / f"{item_id}.png", image)
        _write_png(root / "train/masks" / f"{item_id}.png", mask.astype(np.uint8) * 255)
    for item_id, image in (test or {}).items():
        _write_png(root / "test/images" / f"{item_id}.png", image)
    return IngestOptions(
        train_images=str(root / "train/images"),
        test_images=str(root / "test/images") if test else None,
        train_masks=str(root / "train/masks"),
    )


def _ingest_and_dedup(
    options: IngestOptions, dedup: DedupOptions | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest, _ = ingest(options)
    items, _ = find_duplicates(manifest, dedup or DedupOptions())
    return manifest, items


def _random_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return (rng.random(shape) < 0.4).astype(np.uint8)


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


def _tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp*"))


@pytest.fixture(scope="module")
def gray_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Gray 12x10 dataset: 6 train (c1/c2: same picture, different masks) and 3 test images."""
    rng = np.random.default_rng(10)
    root = tmp_path_factory.mktemp("gray")
    shape = (12, 10)
    images = {k: rng.integers(0, 256, shape, dtype=np.uint8) for k in ("a", "b", "c", "d", "e")}
    masks = {k: _random_mask(rng, shape) for k in ("a", "b", "c1", "c2", "d", "e")}
    masks["e"][:] = 0
    train = {
        "a": (images["a"], masks["a"]),
        "b": (images["b"], masks["b"]),
        "c1": (images["c"], masks["c1"]),
        "c2": (images["c"], masks["c2"]),
        "d": (images["d"], masks["d"]),
        "e": (images["e"], masks["e"]),
    }
    test = {f"t{i}": rng.integers(0, 256, shape, dtype=np.uint8) for i in range(1, 4)}
    options = _write_dataset(root, train, test)
    return {"root": root, "options": options, "train": train, "test": test}


# --------------------------------------------------------------------------- end to end


def test_preprocess_outputs_gray(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"])
    stats = preprocess(manifest, items, PreprocessOptions(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUTS)

    train_images = np.load(tmp_path / "train_images.npy")
    train_masks = np.load(tmp_path / "train_masks.npy")
    test_images = np.load(tmp_path / "test_images.npy")
    # c1/c2 conflict and are dropped by the default policy.
    assert train_images.shape == (4, 12, 10, 1) and train_images.dtype == np.uint8
    assert train_masks.shape == (4, 12, 10) and train_masks.dtype == np.uint8
    assert test_images.shape == (3, 12, 10, 1) and test_images.dtype == np.uint8
    assert set(np.unique(train_masks).tolist()) == {0, 1}

    index = pd.concat(
        [pd.read_parquet(tmp_path / name) for name in ("index.parquet", "test_index.parquet")]
    )
    assert list(index.columns) == ["id", "split", "row", "orig_height", "orig_width"]
    assert index["id"].tolist() == ["a", "b", "d", "e", "t1", "t2", "t3"]
    assert (index["orig_height"] == 12).all() and (index["orig_width"] == 10).all()
    for row in index.itertuples():
        if row.split == "train":
            image, mask = gray_data["train"][row.id]
            np.testing.assert_array_equal(train_images[row.row, :, :, 0], image)
            np.testing.assert_array_equal(train_masks[row.row], mask)
        else:
            np.testing.assert_array_equal(test_images[row.row, :, :, 0], gray_data["test"][row.id])

    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert "n_test" not in on_disk  # the train side's stats know nothing of the test set
    assert on_disk == json.loads(json.dumps({k: v for k, v in stats.items() if k != "n_test"}))
    scaled = train_images.astype(np.float64) / 255.0
    assert stats["n_train"] == 4 and stats["n_test"] == 3
    assert (stats["height"], stats["width"], stats["channels"]) == (12, 10, 1)
    assert stats["dtype"] == "uint8"
    assert stats["train_mean"] == pytest.approx([scaled.mean()], abs=1e-6)
    assert stats["train_std"] == pytest.approx([scaled.std()], abs=1e-6)
    expected_coverage = np.mean([gray_data["train"][k][1].mean() for k in ("a", "b", "d", "e")])
    assert stats["train_mask_coverage"] == pytest.approx(expected_coverage, abs=1e-6)


def _hazy_scene(channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(clear, hazy) uint8 images: a textured scene under a sky, seen through uniform haze
    I = J t + A (1 - t), t = 0.4, A = 230 (the haze model the dark channel prior inverts)."""
    rng = np.random.default_rng(4)
    clear = rng.integers(0, 100, (48, 64, channels)).astype(np.float64)
    clear[20:36, 20:40] += 80  # an object
    clear[8::5] = 0  # dark rows below the sky: every 7 x 7 patch there holds a dark pixel
    clear[-1] = 0
    clear[:8] = 230  # the sky: haze only, the atmospheric light
    hazy = clear * 0.4 + 230 * 0.6
    return clear.astype(np.uint8), np.rint(hazy).astype(np.uint8)


def _contrast(image: np.ndarray) -> float:
    return float(image.astype(np.float64).std())


@pytest.mark.parametrize("channels", [1, 3])
def test_dehaze_restores_the_contrast_of_a_hazy_image(channels: int) -> None:
    clear, hazy = _hazy_scene(channels)
    dehazed = dehaze(hazy, omega=1.0, t0=0.1, patch=7)
    assert dehazed.shape == hazy.shape and dehazed.dtype == np.uint8
    assert _contrast(hazy) < 0.5 * _contrast(clear)
    assert _contrast(dehazed) > 2 * _contrast(hazy)  # the haze is gone ...
    assert np.abs(dehazed.astype(int) - clear.astype(int)).mean() < 12  # ... and the scene is back
    # omega < 1 keeps some haze: less contrast than the full removal, more than the input.
    partial = dehaze(hazy, omega=0.5, t0=0.1, patch=7)
    assert _contrast(hazy) < _contrast(partial) < _contrast(dehazed)


def test_dehaze_uint16_and_dark_channel() -> None:
    _, hazy = _hazy_scene()
    wide = hazy.astype(np.uint16) * 257
    dehazed = dehaze(wide, patch=7)
    assert dehazed.dtype == np.uint16 and _contrast(dehazed) > 2 * _contrast(wide)
    pixels = np.full((5, 5, 3), 0.8, np.float32)
    pixels[2, 2, 1] = 0.1  # one dark value in one channel darkens its 3 x 3 neighbourhood
    dark = dark_channel(pixels, 3)
    assert dark[1:4, 1:4].max() == pytest.approx(0.1) and dark[0, 0] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("values", "key"),
    [({"omega": 0}, "dehaze_omega"), ({"t0": 1.0}, "dehaze_t0"), ({"patch": 0}, "dehaze_patch")],
)
def test_dehaze_refuses_options_out_of_range(values: dict, key: str) -> None:
    with pytest.raises(SegflowError, match=key):
        dehaze(np.zeros((4, 4, 1), np.uint8), **values)


def test_dehaze_option_reaches_train_and_test_arrays_alike(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"])
    plain = preprocess(manifest, items, PreprocessOptions(), tmp_path / "plain")
    options = PreprocessOptions(dehaze=True, dehaze_patch=3)
    hazy = preprocess(manifest, items, options, tmp_path / "dehazed")
    assert "dehaze" not in plain["options"]  # default: stats.json as before the option existed
    assert hazy["options"]["dehaze"] is True and hazy["options"]["dehaze_patch"] == 3
    for split in ("train", "test"):
        before = np.load(tmp_path / "plain" / f"{split}_images.npy")
        after = np.load(tmp_path / "dehazed" / f"{split}_images.npy")
        assert not np.array_equal(before, after)
        for row in range(len(before)):  # test images get exactly what train images get
            np.testing.assert_array_equal(after[row], dehaze(before[row], 0.95, 0.1, 3))
    with pytest.raises(SegflowError, match="dehaze_t0"):
        preprocess(manifest, items, PreprocessOptions(dehaze=True, dehaze_t0=0), tmp_path / "x")


def test_preprocess_arrays_are_memory_mappable(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"])
    preprocess(manifest, items, PreprocessOptions(), tmp_path)
    for name, ndim in (("train_images", 4), ("train_masks", 3), ("test_images", 4)):
        array = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert isinstance(array, np.memmap)
        assert array.ndim == ndim
        assert not array.flags.writeable
    np.testing.assert_array_equal(
        np.load(tmp_path / "train_images.npy", mmap_mode="r")[1, :, :, 0],
        gray_data["train"]["b"][0],
    )


def test_union_policy_gives_union_mask(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"], DedupOptions(conflict_policy="union"))
    stats = preprocess(manifest, items, PreprocessOptions(), tmp_path)
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    masks = np.load(tmp_path / "train_masks.npy")
    images = np.load(tmp_path / "train_images.npy")
    assert stats["n_train"] == 6
    union = gray_data["train"]["c1"][1] | gray_data["train"]["c2"][1]
    assert union.sum() > max(gray_data["train"]["c1"][1].sum(), gray_data["train"]["c2"][1].sum())
    for item_id in ("c1", "c2"):
        row = index.loc[item_id, "row"]
        np.testing.assert_array_equal(masks[row], union)
        np.testing.assert_array_equal(images[row, :, :, 0], gray_data["train"]["c1"][0])
    # Items outside the conflicting group keep their own mask.
    np.testing.assert_array_equal(masks[index.loc["a", "row"]], gray_data["train"]["a"][1])


def test_majority_and_representative_policies(gray_data: dict, tmp_path: Path) -> None:
    # c1/c2 is a one-vs-one tie: both dropped under "majority" too.
    manifest, items = _ingest_and_dedup(
        gray_data["options"], DedupOptions(conflict_policy="majority")
    )
    preprocess(manifest, items, PreprocessOptions(), tmp_path / "majority")
    ids = pd.read_parquet(tmp_path / "majority/index.parquet")["id"].tolist()
    assert ids == ["a", "b", "d", "e"]

    manifest, items = _ingest_and_dedup(
        gray_data["options"], DedupOptions(conflict_policy="union", train_members="representative")
    )
    preprocess(manifest, items, PreprocessOptions(), tmp_path / "rep")
    index = pd.read_parquet(tmp_path / "rep/index.parquet").set_index("id")
    assert "c2" not in index.index
    masks = np.load(tmp_path / "rep/train_masks.npy")
    union = gray_data["train"]["c1"][1] | gray_data["train"]["c2"][1]
    np.testing.assert_array_equal(masks[index.loc["c1", "row"]], union)


def test_all_train_dropped_is_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    options = _write_dataset(
        tmp_path / "data",
        {"x": (image, _random_mask(rng, (8, 8))), "y": (image, _random_mask(rng, (8, 8)))},
    )
    manifest, items = _ingest_and_dedup(options)
    assert not items["use_for_training"].any()
    with pytest.raises(SegflowError, match="no train items"):
        preprocess(manifest, items, PreprocessOptions(), tmp_path / "out")


def test_no_test_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    train = {
        f"i{k}": (rng.integers(0, 256, (9, 7), dtype=np.uint8), _random_mask(rng, (9, 7)))
        for k in range(3)
    }
    manifest, items = _ingest_and_dedup(_write_dataset(tmp_path / "data", train))
    stats = preprocess(manifest, items, PreprocessOptions(), tmp_path / "out")
    assert stats["n_test"] == 0
    assert np.load(tmp_path / "out/test_images.npy").shape == (0, 9, 7, 1)
    assert np.load(tmp_path / "out/train_images.npy").shape == (3, 9, 7, 1)


# --------------------------------------------------------------------------- channels and size


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Colour 16x20 train images (BGR on disk), a gray train image and a gray test image."""
    rng = np.random.default_rng(20)
    root = tmp_path_factory.mktemp("colour")
    shape = (16, 20)
    train = {
        f"rgb{k}": (rng.integers(0, 256, (*shape, 3), dtype=np.uint8), _random_mask(rng, shape))
        for k in range(3)
    }
    train["gray"] = (rng.integers(0, 256, shape, dtype=np.uint8), _random_mask(rng, shape))
    test = {"tg": rng.integers(0, 256, shape, dtype=np.uint8)}
    return {"options": _write_dataset(root, train, test), "train": train, "test": test}


def test_channels_auto_is_three_when_any_image_has_colour(
    colour_data: dict, tmp_path: Path
) -> None:
    manifest, items = _ingest_and_dedup(colour_data["options"])
    stats = preprocess(manifest, items, PreprocessOptions(), tmp_path)
    assert stats["channels"] == 3
    assert len(stats["train_mean"]) == 3 and len(stats["train_std"]) == 3
    images = np.load(tmp_path / "train_images.npy")
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    bgr = colour_data["train"]["rgb1"][0]
    np.testing.assert_array_equal(images[index.loc["rgb1", "row"]], bgr[:, :, ::-1])  # RGB order
    gray = images[index.loc["gray", "row"]]
    for channel in range(3):
        np.testing.assert_array_equal(gray[:, :, channel], colour_data["train"]["gray"][0])
    test = np.load(tmp_path / "test_images.npy")
    assert test.shape == (1, 16, 20, 3)
    scaled = images.astype(np.float64) / 255.0
    assert stats["train_mean"] == pytest.approx(scaled.mean(axis=(0, 1, 2)).tolist(), abs=1e-6)
    assert stats["train_std"] == pytest.approx(scaled.std(axis=(0, 1, 2)).tolist(), abs=1e-6)


def test_channels_auto_is_one_for_gray_data(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"])
    assert preprocess(manifest, items, PreprocessOptions(), tmp_path)["channels"] == 1


def test_the_train_images_alone_decide_auto_channels(tmp_path: Path) -> None:
    """A colour test image among gray train images is converted to the train arrays' one
    channel: the test set never changes the train arrays (nor, so, any model)."""
    rng = np.random.default_rng(21)
    train = {"g": (rng.integers(0, 256, (6, 6), dtype=np.uint8), _random_mask(rng, (6, 6)))}
    test = {"c": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)}
    manifest, items = _ingest_and_dedup(_write_dataset(tmp_path / "data", train, test))
    assert preprocess(manifest, items, PreprocessOptions(), tmp_path / "out")["channels"] == 1
    assert np.load(tmp_path / "out" / "test_images.npy").shape == (1, 6, 6, 1)


def test_reprepared_image_matches_cv2(colour_data: dict, tmp_path: Path) -> None:
    """Colour -> 1 channel, CLAHE, shrink: redo it with cv2 from the file and compare."""
    manifest, items = _ingest_and_dedup(colour_data["options"])
    options = PreprocessOptions(height=8, width=12, channels="1", clahe=True, clahe_tile_grid=2)
    stats = preprocess(manifest, items, options, tmp_path)
    assert (stats["height"], stats["width"], stats["channels"]) == (8, 12, 1)
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    images = np.load(tmp_path / "train_images.npy")
    masks = np.load(tmp_path / "train_masks.npy")

    bgr, mask = colour_data["train"]["rgb2"]
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    equalised = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(2, 2)).apply(gray)
    expected = cv2.resize(equalised, (12, 8), interpolation=cv2.INTER_AREA)
    row = index.loc["rgb2", "row"]
    np.testing.assert_array_equal(images[row, :, :, 0], expected)
    np.testing.assert_array_equal(
        masks[row], cv2.resize(mask, (12, 8), interpolation=cv2.INTER_NEAREST)
    )
    assert set(np.unique(masks).tolist()) <= {0, 1}
    assert (index["orig_height"] == 16).all() and (index["orig_width"] == 20).all()


def test_enlarging_uses_linear(colour_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(colour_data["options"])
    preprocess(manifest, items, PreprocessOptions(height=24, width=30), tmp_path)
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    images = np.load(tmp_path / "train_images.npy")
    rgb = colour_data["train"]["rgb0"][0][:, :, ::-1]
    expected = cv2.resize(np.ascontiguousarray(rgb), (30, 24), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(images[index.loc["rgb0", "row"]], expected)
    test = np.load(tmp_path / "test_images.npy")
    expected_test = cv2.resize(colour_data["test"]["tg"], (30, 24), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(test[0, :, :, 1], expected_test)


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(30)
    root = tmp_path_factory.mktemp("mixed")
    train = {
        "big": (rng.integers(0, 256, (20, 16), dtype=np.uint8), _random_mask(rng, (20, 16))),
        "small": (rng.integers(0, 256, (10, 8), dtype=np.uint8), _random_mask(rng, (10, 8))),
    }
    return {"options": _write_dataset(root, train), "train": train}


def test_mixed_sizes_without_size_is_an_error(mixed_sizes: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(mixed_sizes["options"])
    with pytest.raises(SegflowError) as error:
        preprocess(manifest, items, PreprocessOptions(), tmp_path)
    message = str(error.value)
    assert "16x20" in message and "8x10" in message  # width x height
    assert "preprocess.height" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("options", [PreprocessOptions(height=10), PreprocessOptions(width=8)])
def test_only_one_of_height_and_width_is_an_error(
    mixed_sizes: dict, tmp_path: Path, options: PreprocessOptions
) -> None:
    manifest, items = _ingest_and_dedup(mixed_sizes["options"])
    with pytest.raises(SegflowError, match=r"both preprocess\.height and preprocess\.width"):
        preprocess(manifest, items, options, tmp_path)


def test_invalid_size_and_channels(mixed_sizes: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(mixed_sizes["options"])
    with pytest.raises(SegflowError, match="positive"):
        preprocess(manifest, items, PreprocessOptions(height=0, width=8), tmp_path)
    with pytest.raises(SegflowError, match=r"preprocess\.channels"):
        preprocess(manifest, items, PreprocessOptions(height=8, width=8, channels="2"), tmp_path)


def test_mixed_sizes_with_size(mixed_sizes: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(mixed_sizes["options"])
    preprocess(manifest, items, PreprocessOptions(height=10, width=8), tmp_path)
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    assert index.loc["big", ["orig_height", "orig_width"]].tolist() == [20, 16]
    assert index.loc["small", ["orig_height", "orig_width"]].tolist() == [10, 8]
    images = np.load(tmp_path / "train_images.npy")
    masks = np.load(tmp_path / "train_masks.npy")
    big_image, big_mask = mixed_sizes["train"]["big"]
    row = index.loc["big", "row"]
    np.testing.assert_array_equal(
        images[row, :, :, 0], cv2.resize(big_image, (8, 10), interpolation=cv2.INTER_AREA)
    )
    np.testing.assert_array_equal(
        masks[row], cv2.resize(big_mask, (8, 10), interpolation=cv2.INTER_NEAREST)
    )
    row = index.loc["small", "row"]
    np.testing.assert_array_equal(images[row, :, :, 0], mixed_sizes["train"]["small"][0])
    np.testing.assert_array_equal(masks[row], mixed_sizes["train"]["small"][1])


# --------------------------------------------------------------------------- bit depth


@pytest.fixture(scope="module")
def deep_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 16-bit gray train image among 8-bit ones (and an 8-bit test image)."""
    rng = np.random.default_rng(40)
    root = tmp_path_factory.mktemp("deep")
    shape = (8, 9)
    train = {
        "deep": (rng.integers(0, 65536, shape, dtype=np.uint16), _random_mask(rng, shape)),
        "flat": (rng.integers(0, 256, shape, dtype=np.uint8), _random_mask(rng, shape)),
    }
    test = {"t": rng.integers(0, 256, shape, dtype=np.uint8)}
    return {"options": _write_dataset(root, train, test), "train": train, "test": test}


def test_sixteen_bit_kept(deep_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(deep_data["options"])
    stats = preprocess(manifest, items, PreprocessOptions(to_uint8=False), tmp_path)
    assert stats["dtype"] == "uint16"
    images = np.load(tmp_path / "train_images.npy")
    assert images.dtype == np.uint16
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    deep = deep_data["train"]["deep"][0]
    flat = deep_data["train"]["flat"][0]
    np.testing.assert_array_equal(images[index.loc["deep", "row"], :, :, 0], deep)
    np.testing.assert_array_equal(
        images[index.loc["flat", "row"], :, :, 0], flat.astype(np.uint16) * 257
    )
    test = np.load(tmp_path / "test_images.npy")
    assert test.dtype == np.uint16
    np.testing.assert_array_equal(test[0, :, :, 0], deep_data["test"]["t"].astype(np.uint16) * 257)
    scaled = images.astype(np.float64) / 65535.0
    assert stats["train_mean"] == pytest.approx([scaled.mean()], abs=1e-6)
    assert stats["train_std"] == pytest.approx([scaled.std()], abs=1e-6)


def test_sixteen_bit_to_uint8(deep_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(deep_data["options"])
    stats = preprocess(manifest, items, PreprocessOptions(), tmp_path)
    assert stats["dtype"] == "uint8"
    images = np.load(tmp_path / "train_images.npy")
    assert images.dtype == np.uint8
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("id")
    deep = deep_data["train"]["deep"][0]
    np.testing.assert_array_equal(
        images[index.loc["deep", "row"], :, :, 0], np.rint(deep / 257.0).astype(np.uint8)
    )
    np.testing.assert_array_equal(
        images[index.loc["flat", "row"], :, :, 0], deep_data["train"]["flat"][0]
    )


def test_eight_bit_data_with_to_uint8_false_stays_uint8(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"])
    stats = preprocess(manifest, items, PreprocessOptions(to_uint8=False), tmp_path)
    assert stats["dtype"] == "uint8"
    assert np.load(tmp_path / "train_images.npy").dtype == np.uint8


# --------------------------------------------------------------------------- multi-label masks


def _labelled_train(n_classes: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gray 12x10 images with ``n_classes`` random class masks; c1/c2 share one picture."""
    rng = np.random.default_rng(seed)
    shape = (12, 10)
    picture = rng.integers(0, 256, shape, dtype=np.uint8)
    train = {
        item_id: (
            picture if item_id.startswith("c") else rng.integers(0, 256, shape, dtype=np.uint8),
            (rng.random((n_classes, *shape)) < 0.3).astype(np.uint8),
        )
        for item_id in ("a", "b", "c1", "c2")
    }
    train["b"][1][0] = 0  # an absent class
    return train


@pytest.mark.parametrize(("n_classes", "source"), [(3, "rle_csv"), (9, "folder"), (17, "rle_csv")])
def test_multilabel_masks_are_packed_and_resized_per_class(
    tmp_path: Path, n_classes: int, source: str
) -> None:
    classes = tuple(f"k{k}" for k in range(n_classes))
    train = _labelled_train(n_classes, seed=n_classes)
    options = write_label_dataset(tmp_path / "data", train, classes, source)
    manifest, items = _ingest_and_dedup(options, DedupOptions(conflict_policy="union"))
    stats = preprocess(manifest, items, PreprocessOptions(height=7, width=9), tmp_path / "out")

    masks = np.load(tmp_path / "out/train_masks.npy")
    assert masks.shape == (4, 7, 9) and masks.dtype == label_dtype(n_classes)
    index = pd.read_parquet(tmp_path / "out/index.parquet").set_index("id")
    union = train["c1"][1] | train["c2"][1]  # the union policy unions class by class
    expected = {"a": train["a"][1], "b": train["b"][1], "c1": union, "c2": union}
    any_class = 0
    for item_id, planes in expected.items():
        resized = np.stack([cv2.resize(p, (9, 7), interpolation=cv2.INTER_NEAREST) for p in planes])
        np.testing.assert_array_equal(
            unpack_labels(masks[index.loc[item_id, "row"]], n_classes), resized
        )
        any_class += int(resized.any(axis=0).sum())
    assert stats["classes"] == list(classes) and stats["multilabel"] is True
    assert stats["train_mask_coverage"] == pytest.approx(any_class / (4 * 7 * 9), abs=1e-6)
    on_disk = json.loads((tmp_path / "out/stats.json").read_text())
    assert on_disk["classes"] == list(classes) and on_disk["multilabel"] is True


def test_binary_stats_name_one_class(gray_data: dict, tmp_path: Path) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"])
    stats = preprocess(manifest, items, PreprocessOptions(), tmp_path)
    assert stats["classes"] == ["mask"] and stats["multilabel"] is False
    assert np.load(tmp_path / "train_masks.npy").dtype == np.uint8


def test_load_mask_keeps_binary_callers_working(gray_data: dict) -> None:
    manifest, items = _ingest_and_dedup(gray_data["options"], DedupOptions(conflict_policy="union"))
    sources = mask_sources(manifest, items)
    mask = load_mask(sources["c1"], (12, 10))  # the call evaluate.original_truths makes
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, gray_data["train"]["c1"][1] | gray_data["train"]["c2"][1])


# --------------------------------------------------------------------------- workers, atomicity


def _many(root: Path, n_train: int = 70, n_test: int = 66) -> IngestOptions:
    """More items than one chunk (64), so workers > 1 really run in several processes."""
    rng = np.random.default_rng(50)
    train = {
        f"tr{k:03d}": (rng.integers(0, 256, (8, 6), dtype=np.uint8), _random_mask(rng, (8, 6)))
        for k in range(n_train)
    }
    test = {f"te{k:03d}": rng.integers(0, 256, (8, 6), dtype=np.uint8) for k in range(n_test)}
    return _write_dataset(root, train, test)


@pytest.fixture(scope="module")
def many_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _ingest_and_dedup(_many(tmp_path_factory.mktemp("many")))


def test_two_workers_give_identical_bytes(
    many_data: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    manifest, items = many_data
    options = PreprocessOptions(height=6, width=5, clahe=True)
    one = preprocess(manifest, items, options, tmp_path / "one", workers=1)
    two = preprocess(manifest, items, options, tmp_path / "two", workers=2)
    assert one == two
    assert one["n_train"] == 70 and one["n_test"] == 66
    for name in ("train_images.npy", "train_masks.npy", "test_images.npy", "stats.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "one/index.parquet"),
        pd.read_parquet(tmp_path / "two/index.parquet"),
    )
    # Not trivially equal: rows really differ from each other.
    images = np.load(tmp_path / "two/train_images.npy")
    assert len({images[k].tobytes() for k in range(len(images))}) == 70


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("split", ["train", "test"])
def test_failure_leaves_no_partial_outputs(tmp_path: Path, workers: int, split: str) -> None:
    options = _many(tmp_path / "data")
    manifest, items = _ingest_and_dedup(options)
    # Corrupt one image *after* ingest validated it, late in the split (second chunk).
    victim = manifest[manifest["split"] == split].sort_values("id").iloc[-1]
    Path(victim["image_path"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png any more")
    out = tmp_path / "out"
    with pytest.raises(SegflowError, match=victim["id"]):
        preprocess(manifest, items, PreprocessOptions(), out, workers=workers)
    # A failed stage writes none of its files (the test stage runs after the train one).
    written = {"train": set(), "test": {"index.parquet", "stats.json", "train_images.npy"}}
    written["test"] |= {"train_masks.npy"}
    assert {p.name for p in out.iterdir()} == written[split]
    assert _tmp_leftovers(out) == []


def test_failed_rerun_keeps_previous_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(60)
    train = {
        f"i{k}": (rng.integers(0, 256, (6, 6), dtype=np.uint8), _random_mask(rng, (6, 6)))
        for k in range(4)
    }
    options = _write_dataset(tmp_path / "data", train)
    manifest, items = _ingest_and_dedup(options)
    out = tmp_path / "out"
    preprocess(manifest, items, PreprocessOptions(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.copy(tmp_path / "data/train/masks/i0.png", tmp_path / "data/train/images/i2.png")
    Path(manifest.loc[manifest["id"] == "i3", "image_path"].iloc[0]).write_bytes(b"")
    with pytest.raises(SegflowError, match="i3"):
        preprocess(manifest, items, PreprocessOptions(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _tmp_leftovers(out) == []


# --------------------------------------------------------------------------- demo dataset


def test_demo_rle_and_folder_masks_agree(demo_dataset: Path, tmp_path: Path) -> None:
    """Masks from the RLE CSV (decoded in preprocess) equal the mask PNGs, union included."""
    common = {
        "train_images": str(demo_dataset / "train/images"),
        "test_images": str(demo_dataset / "test/images"),
    }
    outputs = {}
    for source in ("folder", "rle_csv"):
        options = IngestOptions(
            **common,
            mask_source=source,
            train_masks=str(demo_dataset / "train/masks") if source == "folder" else None,
            rle_csv=str(demo_dataset / "train.csv") if source == "rle_csv" else None,
            rle_column="rle_mask",
        )
        manifest, items = _ingest_and_dedup(options, DedupOptions(conflict_policy="union"))
        preprocess(manifest, items, PreprocessOptions(height=64, width=64), tmp_path / source)
        outputs[source] = np.load(tmp_path / source / "train_masks.npy")
    truth = json.loads((demo_dataset / "planted_duplicates.json").read_text())
    assert len(outputs["folder"]) == truth["n_train"]
    np.testing.assert_array_equal(outputs["folder"], outputs["rle_csv"])

    index = pd.read_parquet(tmp_path / "folder/index.parquet").set_index("id")
    conflict = truth["conflicting_mask_group"]
    union = np.zeros((101, 101), np.uint8)
    for item_id in conflict:
        union |= (_read(demo_dataset / "train/masks" / f"{item_id}.png") > 0).astype(np.uint8)
    expected = cv2.resize(union, (64, 64), interpolation=cv2.INTER_NEAREST)
    for item_id in conflict:
        np.testing.assert_array_equal(outputs["folder"][index.loc[item_id, "row"]], expected)
