"""Tests for the training augmentation pipelines (segflow.model.training.augment)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest

from segflow.core.errors import SegflowError
from segflow.model.training import augment
from segflow.model.training.augment import (
    PRESETS,
    AugmentPhase,
    augment_phases,
    build_augmentation,
    build_augmentation_schedule,
    is_phase_list,
)

# albumentations itself is imported through segflow.model.training.augment, which first disables its PyPI
# update check (a module-level ``import albumentations`` here would be sorted before it).
A = augment.A

RUNS = 16  # enough calls to hit every D4 element with overwhelming probability


def _blocky_mask(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """An asymmetric {0, 1} mask of 8x8 blocks: every flip or rotation of it is different."""
    rng = np.random.default_rng(seed)
    blocks = (rng.random((height // 8, width // 8)) > 0.5).astype(np.uint8)
    blocks[0, 0], blocks[0, -1], blocks[-1, 0], blocks[-1, -1] = 1, 0, 0, 0
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def _image_of(mask: np.ndarray, channels: int) -> np.ndarray:
    return np.repeat((mask * 255)[..., None], channels, axis=2)


def _names(transform: Any) -> list[str]:
    """Class names of every transform in a (nested) pipeline."""
    names = [type(transform).__name__]
    for child in getattr(transform, "transforms", []):
        names += _names(child)
    return names


def test_update_check_disabled() -> None:
    assert os.environ.get("NO_ALBUMENTATIONS_UPDATE") == "1"


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_shapes_dtypes_and_a_binary_mask(preset: str, channels: int) -> None:
    aug = build_augmentation(preset, 64, 64, channels=channels)
    if preset == "none":
        assert aug is None
        return
    rng = np.random.default_rng(1)
    mask = _blocky_mask()
    image = rng.integers(0, 256, (64, 64, channels), dtype=np.uint8)
    changed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. HueSaturationValue on a gray image would warn
        for _ in range(RUNS):
            out = aug(image=image, mask=mask)
            assert out["image"].shape == (64, 64, channels)
            assert out["image"].dtype == np.uint8
            assert out["mask"].shape == (64, 64)
            assert out["mask"].dtype == np.uint8
            assert set(np.unique(out["mask"])) <= {0, 1}
            changed += not np.array_equal(out["image"], image)
    assert changed >= RUNS // 2


def test_heavy_colour_transforms_only_for_three_channels() -> None:
    gray = _names(build_augmentation("heavy", 64, 64, channels=1))
    rgb = _names(build_augmentation("heavy", 64, 64, channels=3))
    assert "HueSaturationValue" not in gray
    assert "HueSaturationValue" in rgb
    for names in (gray, rgb):
        for expected in ("D4", "Affine", "OneOf", "ElasticTransform", "GridDistortion"):
            assert expected in names
        assert "RandomBrightnessContrast" in names and "GaussNoise" in names


@pytest.mark.parametrize("channels", [1, 3])
def test_d4_moves_image_and_mask_together(channels: int) -> None:
    mask = _blocky_mask()
    image = _image_of(mask, channels)
    aug = build_augmentation("d4", 64, 64, channels=channels)
    seen = set()
    for _ in range(RUNS * 2):
        out = aug(image=image, mask=mask)
        for channel in range(channels):
            assert np.array_equal(out["image"][..., channel], out["mask"] * 255)
        seen.add(out["mask"].tobytes())
    assert len(seen) >= 5  # the 8 dihedral images of an asymmetric mask are all different
    dihedral = {np.rot90(m, k).tobytes() for m in (mask, mask.T) for k in range(4)}
    assert seen <= dihedral


def test_heavy_moves_image_and_mask_together() -> None:
    mask = _blocky_mask(seed=3)
    image = _image_of(mask, 1)
    aug = build_augmentation("heavy", 64, 64, channels=1)
    for _ in range(RUNS):
        out = aug(image=image, mask=mask)
        # Intensity changes (±20 %, noise) keep 0 and 255 on their side of 128; only pixels that
        # geometric interpolation blends at block edges may disagree.
        agreement = ((out["image"][..., 0] >= 128) == (out["mask"] == 1)).mean()
        assert agreement > 0.95


def test_d4_on_non_square_images_keeps_the_shape() -> None:
    mask = _blocky_mask(64, 96)
    image = _image_of(mask, 1)
    for preset in ("d4", "heavy"):
        aug = build_augmentation(preset, 64, 96, channels=1)
        assert "D4" not in _names(aug)
        for _ in range(RUNS):
            out = aug(image=image, mask=mask)
            assert out["image"].shape == (64, 96, 1) and out["mask"].shape == (64, 96)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(KeyError, match="unknown preset 'd8'") as info:
        build_augmentation("d8", 64, 64)
    for name in PRESETS:
        assert name in str(info.value)


# --------------------------------------------------------------------------- crop


@pytest.mark.parametrize("preset", [*PRESETS, None])
def test_crop_gives_the_crop_size(preset: str | None) -> None:
    mask = _blocky_mask()
    image = _image_of(mask, 3)
    aug = build_augmentation(preset, 64, 64, crop=(32, 48), channels=3)
    assert _names(aug)[1] == "RandomCrop"  # first, before any other transform
    for _ in range(RUNS):
        out = aug(image=image, mask=mask)
        assert out["image"].shape == (32, 48, 3) and out["mask"].shape == (32, 48)
        if preset in ("none", None):
            assert np.array_equal(out["image"][..., 0], out["mask"] * 255)


def test_square_crop_of_non_square_images_uses_d4() -> None:
    aug = build_augmentation("d4", 64, 96, crop=(48, 48))
    assert "D4" in _names(aug)
    out = aug(image=np.zeros((64, 96, 1), np.uint8), mask=np.zeros((64, 96), np.uint8))
    assert out["image"].shape == (48, 48, 1)


@pytest.mark.parametrize("crop", [(65, 32), (32, 0), (32,), "32x32", (32.0, 32)])
def test_bad_crop(crop: Any) -> None:
    with pytest.raises(SegflowError, match=r"augment\.crop"):
        build_augmentation("d4", 64, 64, crop=crop)


# --------------------------------------------------------------------------- lists


def test_list_with_horizontal_flip() -> None:
    mask = _blocky_mask()
    image = _image_of(mask, 1)
    aug = build_augmentation([{"name": "HorizontalFlip", "params": {"p": 1.0}}], 64, 64)
    out = aug(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask[:, ::-1])
    assert np.array_equal(out["image"][..., 0], out["mask"] * 255)


def test_list_entries_in_order_and_params_optional() -> None:
    aug = build_augmentation(
        [{"name": "VerticalFlip", "params": {"p": 1.0}}, {"name": "Transpose", "params": None}],
        64,
        64,
        crop=(64, 64),
    )
    assert _names(aug) == ["Compose", "RandomCrop", "VerticalFlip", "Transpose"]
    assert aug.transforms[2].p == 0.5  # albumentations default


def test_empty_list_without_crop_is_none() -> None:
    assert build_augmentation([], 64, 64) is None


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        ([{"name": "D4"}, {"name": "Blur"}, {"name": "Foo"}], r"augment\[2\]: unknown .* 'Foo'$"),
        ([{"name": "Horizontalflip"}], r"augment\[0\]: .*did you mean HorizontalFlip"),
        ([{"name": "Compose"}], r"augment\[0\]: unknown albumentations transform 'Compose'"),
        ([{"name": "HorizontalFlip", "params": {"q": 1}}], r"augment\[0\]: .*no parameter.*'q'"),
        ([{"name": "HorizontalFlip", "params": {"p": 3}}], r"augment\[0\]: invalid params"),
        ([{"name": "HorizontalFlip", "params": [1]}], r"augment\[0\]: params must be a mapping"),
        ([{"name": "HorizontalFlip", "prams": {}}], r"augment\[0\]: unknown key"),
        (["HorizontalFlip"], r"augment\[0\]: expected"),
    ],
)
def test_bad_list_entries(entries: list, pattern: str) -> None:
    with pytest.raises(SegflowError, match=pattern):
        build_augmentation(entries, 64, 64)


def test_bad_spec_type_and_sizes() -> None:
    with pytest.raises(SegflowError, match="expected a preset name"):
        build_augmentation(3, 64, 64)  # type: ignore[arg-type]
    with pytest.raises(SegflowError, match="channels must be"):
        build_augmentation("d4", 64, 64, channels=0)


# --------------------------------------------------------------------------- serialized


def test_serialized_dict_round_trip() -> None:
    original = build_augmentation("heavy", 64, 64, channels=3)
    serialized = A.to_dict(original)
    rebuilt = build_augmentation(serialized, 64, 64)
    assert A.to_dict(rebuilt.transforms[0]) == serialized
    mask = _blocky_mask()
    out = rebuilt(image=_image_of(mask, 3), mask=mask)
    assert out["image"].shape == (64, 64, 3) and set(np.unique(out["mask"])) <= {0, 1}

    with_crop = build_augmentation(serialized, 64, 64, crop=(32, 32))
    assert _names(with_crop)[:3] == ["Compose", "RandomCrop", "Compose"]
    assert with_crop(image=_image_of(mask, 3), mask=mask)["mask"].shape == (32, 32)


def test_serialized_dict_of_a_single_flip_is_applied() -> None:
    serialized = A.to_dict(A.HorizontalFlip(p=1.0))
    aug = build_augmentation(serialized, 64, 64)
    mask = _blocky_mask()
    assert np.array_equal(aug(image=_image_of(mask, 1), mask=mask)["mask"], mask[:, ::-1])


def test_bad_serialized_dicts() -> None:
    with pytest.raises(SegflowError, match="'transform' key"):
        build_augmentation({"name": "HorizontalFlip"}, 64, 64)
    bad = {"__version__": "2.0.8", "transform": {"__class_fullname__": "NoSuchTransform", "p": 1}}
    with pytest.raises(SegflowError, match="invalid serialized albumentations pipeline"):
        build_augmentation(bad, 64, 64)


# --------------------------------------------------------------------------- phases

PHASES = [
    {"until_epoch": 2, "augment": "none"},
    {"until_epoch": 6, "augment": "d4"},
    {"augment": "heavy"},
]


def test_phases_cover_every_epoch_up_to_and_including_until_epoch() -> None:
    schedule = build_augmentation_schedule(PHASES, 64, 64, channels=1)
    assert [schedule.index_for(epoch) for epoch in range(1, 10)] == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert schedule.transform_for(2) is None  # none: the input unchanged
    assert _names(schedule.transform_for(3)) == ["Compose", "D4"]
    assert "Affine" in _names(schedule.transform_for(1000))
    mask = _blocky_mask()
    # A crop applies in every phase, "none" included.
    cropped = build_augmentation_schedule(PHASES, 64, 64, crop=(32, 32), channels=1)
    assert all(
        t(image=_image_of(mask, 1), mask=mask)["mask"].shape == (32, 32) for t in cropped.transforms
    )


def test_a_plain_spec_is_one_open_ended_phase() -> None:
    for spec in ("d4", [{"name": "D4"}], A.to_dict(A.HorizontalFlip(p=1.0)), None):
        assert not is_phase_list(spec)
        assert augment_phases(spec) == (AugmentPhase(None, spec),)
    schedule = build_augmentation_schedule("d4", 64, 64)
    assert schedule.index_for(1) == schedule.index_for(500) == 0
    assert _names(schedule.transforms[0]) == ["Compose", "D4"]
    with pytest.raises(SegflowError, match="phases"):
        build_augmentation(PHASES, 64, 64)


@pytest.mark.parametrize(
    ("phases", "pattern"),
    [
        (
            [{"until_epoch": 2, "augment": "d4"}, {"until_epoch": 4, "augment": "none"}],
            r"^augment\[1\]\.until_epoch: the last phase runs to the end",
        ),
        (
            [{"augment": "none"}, {"augment": "d4"}],
            r"^augment\[0\]\.until_epoch must be an integer >= 1",
        ),
        (
            [{"until_epoch": 0, "augment": "none"}, {"augment": "d4"}],
            r"^augment\[0\]\.until_epoch must be .*got 0",
        ),
        (
            [{"until_epoch": True, "augment": "none"}, {"augment": "d4"}],
            r"^augment\[0\]\.until_epoch must be .*got True",
        ),
        (
            [
                {"until_epoch": 3, "augment": "none"},
                {"until_epoch": 3, "augment": "d4"},
                {"augment": "heavy"},
            ],
            r"^augment\[1\]\.until_epoch 3 must be greater than the previous phase's 3$",
        ),
        (
            [{"until_epoch": 2, "augment": "none"}, {"name": "D4"}],
            r"^augment\[1\]: expected a phase",
        ),
        (
            [{"until_epoch": 2, "augment": "none", "p": 1}, {"augment": "d4"}],
            r"^augment\[0\]: unknown key\(s\) \['p'\]",
        ),
        (
            [{"until_epoch": 2, "augment": [{"augment": "d4"}]}, {"augment": "d4"}],
            r"^augment\[0\]\.augment: phases cannot nest$",
        ),
        (
            [{"until_epoch": 2, "augment": [{"name": "Foo"}]}, {"augment": "d4"}],
            r"^augment\[0\]\.augment\[0\]: unknown albumentations transform 'Foo'$",
        ),
    ],
)
def test_bad_phases_fail_in_one_line_naming_the_phase(phases: list, pattern: str) -> None:
    with pytest.raises(SegflowError, match=pattern) as error:
        build_augmentation_schedule(phases, 64, 64)
    assert "\n" not in str(error.value)


def test_unknown_preset_in_a_phase_names_the_phase() -> None:
    with pytest.raises(KeyError, match=r"augment\[1\]\.augment: unknown preset 'd8'"):
        build_augmentation_schedule([{"until_epoch": 1, "augment": "d4"}, {"augment": "d8"}], 8, 8)
