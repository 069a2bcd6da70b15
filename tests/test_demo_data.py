"""Tests for the synthetic demo dataset generator (segflow.data.demo_data)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from segflow.core.errors import SegflowError
from segflow.data import demo_data
from segflow.data.demo_data import DemoDataOptions, generate_demo_data
from segflow.formats.rle import rle_decode

SMALL = DemoDataOptions(n_train=60, n_test=20, height=48, width=48, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    truth = generate_demo_data(out, SMALL)
    return out, truth


def _ids(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.png"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_counts(small: tuple[Path, dict]) -> None:
    out, truth = small
    assert sorted(p.name for p in out.iterdir()) == [
        "contents.json",
        "metadata.csv",
        "planted_duplicates.json",
        "test",
        "train",
        "train.csv",
    ]
    # The content list: every other file's sha256 (what the workflow's demo stamp compares).
    listing = json.loads((out / "contents.json").read_text())
    tree = _tree(out)
    del tree["contents.json"]
    assert listing["files"] == {
        name: hashlib.sha256(data).hexdigest() for name, data in tree.items()
    }
    assert listing["generator"] == truth["options"]
    train_ids, test_ids = _ids(out / "train/images"), _ids(out / "test/images")
    assert len(train_ids) == SMALL.n_train == truth["n_train"]
    assert len(test_ids) == SMALL.n_test == truth["n_test"]
    assert _ids(out / "train/masks") == train_ids
    assert not set(train_ids) & set(test_ids)
    assert all(re.fullmatch(r"[0-9a-f]{10}", i) for i in train_ids + test_ids)
    assert json.loads((out / "planted_duplicates.json").read_text()) == truth


def test_images_and_masks(small: tuple[Path, dict]) -> None:
    out, _ = small
    for image_id in _ids(out / "train/images"):
        image = _read(out / "train/images" / f"{image_id}.png")
        mask = _read(out / "train/masks" / f"{image_id}.png")
        assert image.dtype == np.uint8 and image.shape == (SMALL.height, SMALL.width)
        assert mask.dtype == np.uint8 and mask.shape == image.shape
        assert set(np.unique(mask).tolist()) <= {0, 255}
    for image_id in _ids(out / "test/images"):
        assert _read(out / "test/images" / f"{image_id}.png").shape == (SMALL.height, SMALL.width)


def test_train_csv_decodes_to_mask_pngs(small: tuple[Path, dict]) -> None:
    out, truth = small
    frame = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["id", "rle_mask"]
    assert sorted(frame["id"]) == _ids(out / "train/images")
    n_empty = 0
    for image_id, rle in zip(frame["id"], frame["rle_mask"], strict=True):
        mask = _read(out / "train/masks" / f"{image_id}.png")
        decoded = rle_decode(rle, (SMALL.height, SMALL.width))
        np.testing.assert_array_equal(decoded * 255, mask)
        n_empty += rle == ""
    assert n_empty == truth["n_empty_train"]


def test_empty_fraction_close_to_requested(small: tuple[Path, dict]) -> None:
    _, truth = small
    assert abs(truth["n_empty_train"] / SMALL.n_train - SMALL.empty_fraction) < 0.08
    assert abs(truth["n_empty_test"] / SMALL.n_test - SMALL.empty_fraction) < 0.15


def test_metadata_covers_every_id_and_is_weakly_informative(small: tuple[Path, dict]) -> None:
    out, _ = small
    meta = pd.read_csv(out / "metadata.csv", dtype={"id": str})
    assert list(meta.columns) == ["id", "depth"]
    assert sorted(meta["id"]) == sorted(_ids(out / "train/images") + _ids(out / "test/images"))
    assert pd.api.types.is_numeric_dtype(meta["depth"])
    rle = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False).set_index("id")
    train = meta[meta["id"].isin(rle.index)].copy()
    train["empty"] = train["id"].map(rle["rle_mask"]) == ""
    by_empty = train.groupby("empty")["depth"]
    # Informative on average, but far from separating the classes.
    assert by_empty.mean()[False] > by_empty.mean()[True]
    assert by_empty.min()[False] < by_empty.max()[True]


def test_planted_duplicates_hold(small: tuple[Path, dict]) -> None:
    out, truth = small
    train_img, train_mask = out / "train/images", out / "train/masks"

    groups = truth["train_exact_byte_groups"]
    assert 2 <= len(groups) <= 3 and max(len(g) for g in groups) >= 3
    for group in groups:
        assert len({_md5(train_img / f"{i}.png") for i in group}) == 1
        assert len({_md5(train_mask / f"{i}.png") for i in group}) == 1

    [(a, b)] = truth["train_pixel_equal_byte_different"]
    assert _md5(train_img / f"{a}.png") != _md5(train_img / f"{b}.png")
    np.testing.assert_array_equal(_read(train_img / f"{a}.png"), _read(train_img / f"{b}.png"))
    np.testing.assert_array_equal(_read(train_mask / f"{a}.png"), _read(train_mask / f"{b}.png"))

    conflict = truth["conflicting_mask_group"]
    assert len(conflict) >= 3
    assert len({_md5(train_img / f"{i}.png") for i in conflict}) == 1
    masks = [_read(train_mask / f"{i}.png") for i in conflict]
    assert len({m.tobytes() for m in masks}) == len(masks)  # pairwise different
    assert sum(not m.any() for m in masks) >= 1 and sum(m.any() for m in masks) >= 2

    copies = truth["train_test_copies"]
    assert 3 <= len(copies) <= 5
    for train_id, test_id in copies:
        assert _md5(train_img / f"{train_id}.png") == _md5(out / "test/images" / f"{test_id}.png")

    planted = [*groups, [a, b], conflict, *copies]
    flat = [i for g in planted for i in g]
    assert len(flat) == len(set(flat)), "planted groups must not overlap"


def test_no_accidental_duplicates(small: tuple[Path, dict]) -> None:
    out, truth = small
    by_pixels: dict[bytes, set[str]] = defaultdict(set)
    for folder in (out / "train/images", out / "test/images"):
        for path in folder.glob("*.png"):
            by_pixels[_read(path).tobytes()].add(path.stem)
    found = sorted(sorted(g) for g in by_pixels.values() if len(g) > 1)
    planted = [
        *truth["train_exact_byte_groups"],
        *truth["train_pixel_equal_byte_different"],
        truth["conflicting_mask_group"],
        *truth["train_test_copies"],
    ]
    assert found == sorted(sorted(g) for g in planted)


def test_deterministic_for_same_seed(tmp_path: Path, small: tuple[Path, dict]) -> None:
    out, truth = small
    again = tmp_path / "again"
    assert generate_demo_data(again, SMALL) == truth
    assert _tree(again) == _tree(out)
    other = generate_demo_data(tmp_path / "other", DemoDataOptions(**{**vars(SMALL), "seed": 4}))
    assert other != truth
    assert _tree(tmp_path / "other") != _tree(out)


def test_rgb_images_have_colour(tmp_path: Path) -> None:
    options = DemoDataOptions(n_train=20, n_test=8, height=32, width=40, color="rgb", seed=1)
    out = tmp_path / "rgb"
    generate_demo_data(out, options)
    images = [_read(p) for p in sorted((out / "train/images").glob("*.png"))]
    assert all(im.shape == (32, 40, 3) for im in images)
    assert all(
        not (np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 1], im[..., 2]))
        for im in images
    )
    masks = [_read(p) for p in (out / "train/masks").glob("*.png")]
    assert all(m.shape == (32, 40) for m in masks)


def test_zero_empty_fraction_leaves_only_the_conflicting_empty_mask(tmp_path: Path) -> None:
    truth = generate_demo_data(
        tmp_path / "d",
        DemoDataOptions(n_train=20, n_test=8, height=24, width=24, empty_fraction=0.0),
    )
    # The conflicting-label group always carries one empty mask for a non-empty image.
    assert truth["n_empty_train"] == 1
    assert truth["n_empty_test"] == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_train": 19}, "n_train"),
        ({"n_train": 40.0}, "n_train"),
        ({"n_test": 3}, "n_test"),
        ({"height": 15}, "height"),
        ({"width": 8}, "width"),
        ({"color": "grey"}, "color"),
        ({"empty_fraction": 1.0}, "empty_fraction"),
        ({"empty_fraction": -0.1}, "empty_fraction"),
        ({"empty_fraction": float("nan")}, "empty_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_options_raise(tmp_path: Path, changes: dict, field: str) -> None:
    options = DemoDataOptions(**{**vars(SMALL), **changes})
    with pytest.raises(SegflowError, match=field):
        generate_demo_data(tmp_path / "bad", options)
    assert list(tmp_path.iterdir()) == []


def _fail_after(monkeypatch: pytest.MonkeyPatch, n_calls: int) -> None:
    real = demo_data._write_bytes
    calls = {"n": 0}

    def flaky(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(demo_data, "_write_bytes", flaky)


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_after(monkeypatch, 25)
    with pytest.raises(OSError, match="simulated"):
        generate_demo_data(tmp_path / "data", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    generate_demo_data(out, SMALL)
    before = _tree(out)
    _fail_after(monkeypatch, 25)
    with pytest.raises(OSError, match="simulated"):
        generate_demo_data(out, DemoDataOptions(**{**vars(SMALL), "seed": 9}))
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_rerun_replaces_previous_dataset(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate_demo_data(out, SMALL)
    (out / "stale.txt").write_text("old")
    options = DemoDataOptions(n_train=20, n_test=8, height=20, width=30, seed=5)
    truth = generate_demo_data(out, options)
    assert not (out / "stale.txt").exists()
    assert len(_ids(out / "train/images")) == truth["n_train"] == 20
    assert _read(next((out / "train/masks").glob("*.png"))).shape == (20, 30)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_to_replace_unrelated_paths(tmp_path: Path) -> None:
    unrelated = tmp_path / "precious"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(SegflowError, match="precious"):
        generate_demo_data(unrelated, SMALL)
    assert (unrelated / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SegflowError, match="not a directory"):
        generate_demo_data(a_file, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "precious"]


def test_empty_existing_directory_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    generate_demo_data(out, DemoDataOptions(n_train=20, n_test=8, height=16, width=16))
    assert len(_ids(out / "train/images")) == 20
