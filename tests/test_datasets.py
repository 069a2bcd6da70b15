"""Tests for the memmap dataset, the balanced sampler and batch padding (segflow.model.datasets)."""

from __future__ import annotations

import pickle
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import BRIGHT, DARK_MAX, write_synthetic_arrays
from torch.utils.data import DataLoader

from segflow.core.errors import SegflowError
from segflow.formats.labels import label_dtype
from segflow.model.datasets import (
    MemmapDataset,
    SegmentationArrays,
    balanced_sampler,
    class_balance_weights,
    class_balanced_sampler,
    crop_to,
    pad_to_multiple,
)
from segflow.model.distances import mask_distances


@pytest.fixture()
def arrays_dir(tmp_path: Path) -> Path:
    return write_synthetic_arrays(tmp_path / "preprocess")


# --------------------------------------------------------------------------- SegmentationArrays


def test_arrays_open_reads_index_and_stats(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    assert (arrays.height, arrays.width, arrays.channels, arrays.dtype) == (32, 32, 1, "uint8")
    assert len(arrays.mean) == len(arrays.std) == 1
    assert arrays.rows_for(["img005", "img001"]).tolist() == [5, 1]
    assert arrays.rows_for(["test2"], split="test").tolist() == [2]
    assert arrays.empty_masks(np.array([7, 0, 5, 6])).tolist() == [False, True, True, False]


@pytest.mark.parametrize("name", ["train_images.npy", "train_masks.npy", "stats.json"])
def test_arrays_open_names_a_missing_file(arrays_dir: Path, name: str) -> None:
    (arrays_dir / name).unlink()
    with pytest.raises(SegflowError, match=name):
        SegmentationArrays.open(arrays_dir)


def test_arrays_open_rejects_inconsistent_files(arrays_dir: Path) -> None:
    np.save(arrays_dir / "train_masks.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(SegflowError, match=r"train_masks\.npy: shape"):
        SegmentationArrays.open(arrays_dir)


def test_rows_for_unknown_id_names_the_source(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    with pytest.raises(SegflowError, match=r"folds\.csv: 1 id\(s\).*nope"):
        arrays.rows_for(["img001", "nope"], where="folds.csv")


# --------------------------------------------------------------------------- MemmapDataset


@pytest.mark.parametrize(("dtype", "channels"), [("uint8", 1), ("uint16", 3)])
def test_dataset_shapes_dtypes_and_normalisation(tmp_path: Path, dtype: str, channels: int) -> None:
    root = write_synthetic_arrays(tmp_path, n=6, channels=channels, dtype=dtype, n_empty=2)
    arrays = SegmentationArrays.open(root)
    dataset = MemmapDataset(
        arrays.train_images_path,
        np.array([4, 1]),
        arrays.train_masks_path,
        mean=arrays.mean,
        std=arrays.std,
    )
    assert len(dataset) == 2
    sample = dataset[0]
    assert sample["row"] == 4
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (channels, 32, 32)
    assert sample["mask"].dtype == torch.float32 and sample["mask"].shape == (1, 32, 32)
    raw = np.load(root / "train_images.npy")[4].astype(np.float64)
    scale = 255.0 if dtype == "uint8" else 65535.0
    expected = (raw / scale - np.array(arrays.mean)) / np.array(arrays.std)
    np.testing.assert_allclose(sample["image"].numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(sample["mask"][0].numpy(), np.load(root / "train_masks.npy")[4])
    # Over the whole set the normalised pixels have mean ~0 and std ~1.
    everything = MemmapDataset(
        arrays.train_images_path, np.arange(6), mean=arrays.mean, std=arrays.std
    )
    stacked = torch.stack([everything[i]["image"] for i in range(6)])
    assert "mask" not in everything[0]
    assert abs(float(stacked.mean())) < 1e-3 and abs(float(stacked.std()) - 1) < 1e-2


def test_zero_std_channel_is_centred_not_divided_by_zero(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    dataset = MemmapDataset(arrays.train_images_path, np.arange(2), mean=[0.5], std=[0.0])
    assert torch.isfinite(dataset[0]["image"]).all()


def _raw_pixels(image: torch.Tensor, arrays: SegmentationArrays) -> np.ndarray:
    return (image.numpy() * arrays.std[0] + arrays.mean[0]) * 255.0


def test_transform_moves_image_and_mask_together(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    transform = A.Compose(
        [A.RandomCrop(16, 16), A.HorizontalFlip(p=0.5), A.RandomRotate90(p=1.0)], seed=1
    )
    dataset = MemmapDataset(
        arrays.train_images_path,
        np.arange(6, 24),
        arrays.train_masks_path,
        transform=transform,
        mean=arrays.mean,
        std=arrays.std,
    )
    moved = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (1, 16, 16) and sample["mask"].shape == (1, 16, 16)
        # Object pixels are exactly the bright ones: holds after any joint spatial transform.
        bright = _raw_pixels(sample["image"][0], arrays) > (BRIGHT + DARK_MAX) / 2
        np.testing.assert_array_equal(bright, sample["mask"][0].numpy().astype(bool))
        original = np.load(arrays.train_masks_path)[sample["row"]]
        moved += not np.array_equal(sample["mask"][0].numpy(), original[:16, :16])
    assert moved > 0


def test_seed_transform_makes_augmentation_reproducible(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    dataset = MemmapDataset(
        arrays.train_images_path,
        np.arange(24),
        arrays.train_masks_path,
        transform=A.Compose([A.RandomCrop(8, 8)]),
    )
    dataset.seed_transform(5)
    first = torch.stack([dataset[i]["image"] for i in range(24)])
    dataset.seed_transform(5)
    again = torch.stack([dataset[i]["image"] for i in range(24)])
    dataset.seed_transform(6)
    other = torch.stack([dataset[i]["image"] for i in range(24)])
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_dataset_opens_lazily_and_pickles_small(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    dataset = MemmapDataset(arrays.train_images_path, np.arange(24), arrays.train_masks_path)
    assert dataset._images is None  # nothing opened in __init__
    dataset[0]
    assert dataset._images is not None
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._images is None and len(pickle.dumps(dataset)) < 2000
    assert torch.equal(clone[3]["image"], dataset[3]["image"])


def test_dataset_in_worker_processes(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    dataset = MemmapDataset(arrays.train_images_path, np.arange(24), arrays.train_masks_path)
    loader = DataLoader(dataset, batch_size=8, num_workers=2)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(8, 1, 32, 32)] * 3
    assert torch.cat([b["row"] for b in batches]).tolist() == list(range(24))


# --------------------------------------------------------------------------- balanced_sampler


def test_balanced_sampler_draws_the_requested_share() -> None:
    is_empty = np.zeros(200, dtype=bool)
    is_empty[:20] = True  # natural share 10 %
    sampler = balanced_sampler(is_empty, 0.5, num_samples=4000, seed=3)
    drawn = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(drawn) == 4000
    assert abs(is_empty[drawn].mean() - 0.5) < 0.03
    again = np.fromiter(iter(balanced_sampler(is_empty, 0.5, 4000, seed=3)), dtype=np.int64)
    np.testing.assert_array_equal(drawn, again)


def test_balanced_sampler_extremes_and_natural() -> None:
    is_empty = np.array([True, False, False, True, False])
    assert balanced_sampler(is_empty, None, 10, seed=0) is None
    none_empty = np.fromiter(iter(balanced_sampler(is_empty, 0.0, 500, seed=0)), dtype=np.int64)
    assert not is_empty[none_empty].any()
    all_empty = np.fromiter(iter(balanced_sampler(is_empty, 1.0, 500, seed=0)), dtype=np.int64)
    assert is_empty[all_empty].all()


@pytest.mark.parametrize(
    ("is_empty", "ratio"), [([True, False], 1.5), ([False, False], 0.3), ([True, True], 0.3)]
)
def test_balanced_sampler_rejects_impossible_ratios(is_empty: list[bool], ratio: float) -> None:
    with pytest.raises(SegflowError, match="empty_ratio"):
        balanced_sampler(np.array(is_empty), ratio, 10, seed=0)


# --------------------------------------------------------------------------- class balance


def _presence(n_common: int, n_rare: int, n_empty: int) -> np.ndarray:
    """Items holding class 0 (common), then class 1 (rare), then nothing."""
    presence = np.zeros((n_common + n_rare + n_empty, 3), dtype=bool)
    presence[:n_common, 0] = True
    presence[n_common : n_common + n_rare, 1] = True
    return presence  # class 2 never occurs


@pytest.mark.parametrize(("mode", "rare_share"), [("inverse", 0.45), ("sqrt", 0.225)])
def test_class_balance_draws_a_rare_class_more_often_than_its_frequency(
    mode: str, rare_share: float
) -> None:
    presence = _presence(n_common=162, n_rare=18, n_empty=20)  # rare class: 9 % of the items
    sampler = class_balanced_sampler(presence, mode, num_samples=8000, seed=5)
    drawn = np.fromiter(iter(sampler), dtype=np.int64)
    rare = presence[drawn, 1].mean()
    assert presence[:, 1].mean() == pytest.approx(0.09)
    # inverse: the non-empty 90 % split evenly between the two classes; sqrt: by sqrt(count)
    # (1 : 3), so 0.9 / 4.
    assert rare == pytest.approx(rare_share, abs=0.03)
    assert (~presence[drawn].any(axis=1)).mean() == pytest.approx(0.1, abs=0.02)
    again = np.fromiter(iter(class_balanced_sampler(presence, mode, 8000, seed=5)), np.int64)
    np.testing.assert_array_equal(drawn, again)
    other = np.fromiter(iter(class_balanced_sampler(presence, mode, 8000, seed=6)), np.int64)
    assert not np.array_equal(drawn, other)


def test_class_balance_weighs_an_image_by_its_rarest_class_and_keeps_empty_ratio() -> None:
    presence = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=bool)
    weights = class_balance_weights(presence, "inverse", empty_ratio=0.5)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[4] == pytest.approx(0.5)  # the one empty image
    # class 0 in 4 images (1/4), class 1 in 1 (1): the image holding both weighs as class 1.
    np.testing.assert_allclose(weights[:4] / weights[0], [1, 1, 1, 4])


@pytest.mark.parametrize(
    ("presence", "mode", "ratio", "message"),
    [
        (np.ones((4, 1), dtype=bool), "sqrt", None, "multi-label"),
        (np.zeros((4, 2), dtype=bool), "sqrt", None, "no training mask"),
        (np.ones((4, 2), dtype=bool), "log", None, "class_balance"),
        (np.ones((4, 2), dtype=bool), "sqrt", 0.3, "no empty masks"),
        (_presence(3, 1, 1), "inverse", 1.0, "empty_ratio 1"),
    ],
)
def test_class_balance_refuses_what_it_cannot_do(
    presence: np.ndarray, mode: str, ratio: float | None, message: str
) -> None:
    with pytest.raises(SegflowError, match=message):
        class_balance_weights(presence, mode, ratio)


def test_class_presence_reads_the_packed_bits(arrays_dir: Path) -> None:
    masks = np.zeros((3, 4, 4), dtype=np.uint8)
    masks[0, 1, 1] = 0b101  # classes 0 and 2
    masks[1, 2, 3] = 0b010  # class 1
    np.save(arrays_dir / "train_masks.npy", masks)
    arrays = SegmentationArrays(arrays_dir, pd.DataFrame(), {"classes": ["a", "b", "c"]})
    np.testing.assert_array_equal(
        arrays.class_presence(np.array([2, 0, 1]), chunk=2),
        [[False, False, False], [True, False, True], [False, True, False]],
    )


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize(
    ("shape", "divisor", "padded_hw"),
    [
        ((2, 3, 101, 101), 32, (128, 128)),
        ((1, 1, 64, 48), 32, (64, 64)),
        ((1, 2, 5, 7), 32, (32, 32)),  # pads larger than the image: several reflections
        ((1, 1, 1, 3), 4, (4, 4)),  # height 1 cannot reflect: replicated
    ],
)
def test_pad_to_multiple_and_crop_round_trip(
    shape: tuple[int, ...], divisor: int, padded_hw: tuple[int, int]
) -> None:
    x = torch.randn(shape)
    padded, (pad_h, pad_w) = pad_to_multiple(x, divisor)
    assert padded.shape[-2:] == padded_hw
    assert (pad_h, pad_w) == (padded_hw[0] - shape[2], padded_hw[1] - shape[3])
    assert torch.equal(crop_to(padded, shape[2], shape[3]), x)


def test_pad_reflects_the_border() -> None:
    x = torch.arange(2 * 30 * 30, dtype=torch.float32).view(1, 2, 30, 30)
    padded, _ = pad_to_multiple(x, 16)
    assert torch.equal(padded[..., 30, :30], x[..., 28, :])  # row H mirrors row H - 2
    assert torch.equal(padded[..., :30, 31], x[..., :, 27])


@pytest.mark.parametrize("n_classes", [2, 20])
def test_packed_masks_unpack_to_class_planes_after_warping(tmp_path: Path, n_classes: int) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "arrays", n=8, size=32)
    squares = np.load(arrays_dir / "train_masks.npy").astype(label_dtype(n_classes))
    top = n_classes - 1  # the highest class: bit 19 needs uint32, which OpenCV cannot warp
    np.save(arrays_dir / "train_masks.npy", squares | (squares << top))
    arrays = SegmentationArrays.open(arrays_dir)
    warp = A.Compose([A.Affine(rotate=(30, 30), p=1.0)], seed=0)  # cv2 warpAffine, nearest
    dataset = MemmapDataset(
        arrays.train_images_path,
        np.arange(8),
        arrays.train_masks_path,
        transform=warp,
        n_classes=n_classes,
    )
    for i in range(len(dataset)):
        mask = dataset[i]["mask"]
        assert mask.shape == (n_classes, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask[0], mask[top]) and not mask[1:top].any()


def test_distance_maps_are_those_of_the_augmented_mask(arrays_dir: Path) -> None:
    """With distances, each item carries the distance maps of its mask *after* the crop and a
    scaling warp (which no stored map could follow: distances scale with the zoom)."""
    arrays = SegmentationArrays.open(arrays_dir)
    transform = A.Compose(
        [A.RandomCrop(20, 20), A.Affine(scale=(1.5, 1.5), rotate=(20, 20), p=1.0)], seed=3
    )
    dataset = MemmapDataset(
        arrays.train_images_path,
        np.arange(6, 24),
        arrays.train_masks_path,
        transform=transform,
        distances=True,
    )
    with_boundary = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        mask = sample["mask"].numpy()
        assert sample["distance"].shape == (2, 1, 20, 20)
        np.testing.assert_allclose(sample["distance"].numpy(), mask_distances(mask), atol=1e-5)
        with_boundary += bool(sample["distance"].any())
    assert with_boundary > 0
    assert (
        "distance"
        not in MemmapDataset(arrays.train_images_path, np.arange(2), arrays.train_masks_path)[0]
    )
    with pytest.raises(SegflowError, match="distance maps need masks"):
        MemmapDataset(arrays.train_images_path, np.arange(2), distances=True)
