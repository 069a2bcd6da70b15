"""Tests for packed multi-label masks (segflow.formats.labels) and their one decoder of manifest columns.

Expected values are built bit by bit here with plain Python/numpy, never with the packing code.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import naive_encode

from segflow.core.errors import SegflowError
from segflow.formats.imageio import mask_md5
from segflow.formats.labels import (
    CLASS_SEPARATOR,
    label_dtype,
    label_md5,
    manifest_classes,
    pack_labels,
    read_label,
    unpack_labels,
)
from segflow.model.submit import train_label


def _planes(n_classes: int, shape: tuple[int, int] = (5, 7), seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n_classes, *shape)) < 0.4).astype(np.uint8)


def _write_mask(path: Path, mask: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask * 255)
    return str(path)


@pytest.mark.parametrize(
    ("n_classes", "dtype"),
    [
        (1, np.uint8),
        (8, np.uint8),
        (9, np.uint16),
        (16, np.uint16),
        (17, np.uint32),
        (32, np.uint32),
    ],
)
def test_label_dtype_has_one_bit_per_class(n_classes: int, dtype: type) -> None:
    assert label_dtype(n_classes) == np.dtype(dtype)


@pytest.mark.parametrize("n_classes", [0, 33, 100])
def test_label_dtype_outside_1_to_32_classes_is_an_error(n_classes: int) -> None:
    with pytest.raises(SegflowError, match="32" if n_classes else "at least 1"):
        label_dtype(n_classes)


@pytest.mark.parametrize("n_classes", [1, 3, 8, 9, 16, 17, 32])
def test_pack_unpack_round_trip(n_classes: int) -> None:
    planes = _planes(n_classes, seed=n_classes)
    packed = pack_labels(planes.astype(bool))
    assert packed.shape == (5, 7) and packed.dtype == label_dtype(n_classes)
    expected = sum(int(planes[k, 2, 3]) << k for k in range(n_classes))
    assert int(packed[2, 3]) == expected
    unpacked = unpack_labels(packed, n_classes)
    assert unpacked.shape == (n_classes, 5, 7) and unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, planes)


def test_unpack_keeps_leading_axes() -> None:
    batch = np.stack([pack_labels(_planes(9, seed=s)) for s in range(4)])
    unpacked = unpack_labels(batch, 9)
    assert unpacked.shape == (4, 9, 5, 7)
    for index in range(4):
        np.testing.assert_array_equal(unpacked[index], _planes(9, seed=index))


def test_one_class_is_the_binary_mask_unchanged() -> None:
    mask = _planes(1)[0]
    packed = pack_labels(mask[None])
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, mask)
    assert label_md5(mask, 1) == mask_md5(mask)


def test_unpack_rejects_bits_beyond_the_classes() -> None:
    with pytest.raises(SegflowError, match="beyond its 2 classes"):
        unpack_labels(np.array([[4]], dtype=np.uint8), 2)


def test_label_md5_tells_classes_apart() -> None:
    region = np.zeros((4, 4), np.uint8)
    region[1:3, 1:3] = 1
    as_first = pack_labels(np.stack([region, 0 * region]))
    as_second = pack_labels(np.stack([0 * region, region]))
    assert label_md5(as_first, 2) != label_md5(as_second, 2)
    assert label_md5(as_first, 2) == label_md5(as_first.copy(), 2)


def test_read_label_binary_columns_as_before(tmp_path: Path) -> None:
    mask = _planes(1)[0]
    path = _write_mask(tmp_path / "a|b.png", mask)  # a '|' in a binary file name is no separator
    np.testing.assert_array_equal(read_label(path, None, (5, 7), 1, "a.png"), mask)
    from_rle = read_label(None, naive_encode(mask), (5, 7), 1, "a.png")
    assert from_rle.dtype == np.uint8
    np.testing.assert_array_equal(from_rle, mask)
    np.testing.assert_array_equal(read_label(None, None, (5, 7), 1, "a.png"), 0 * mask)


def test_read_label_multilabel_rle_and_paths(tmp_path: Path) -> None:
    planes = _planes(3)
    planes[1] = 0  # an empty class: "" in both columns
    rle = CLASS_SEPARATOR.join(naive_encode(plane) for plane in planes)
    assert rle.split(CLASS_SEPARATOR)[1] == ""
    paths = CLASS_SEPARATOR.join(
        "" if k == 1 else _write_mask(tmp_path / f"c{k}" / "a.png", planes[k]) for k in range(3)
    )
    for label in (
        read_label(None, rle, (5, 7), 3, "a.png"),
        read_label(paths, None, (5, 7), 3, "a.png"),
    ):
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(unpack_labels(label, 3), planes)


def test_read_label_errors_name_the_item_or_file(tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match=r"a\.png: manifest mask_rle has 2 '\|'-separated parts"):
        read_label(None, "1 2|", (5, 7), 3, "a.png")
    with pytest.raises(SegflowError, match=r"a\.png: manifest mask_rle \(class 1\): run"):
        read_label(None, "|99 9|", (5, 7), 3, "a.png")
    wrong = _write_mask(tmp_path / "big.png", np.ones((6, 7), np.uint8))
    with pytest.raises(SegflowError, match=r"big\.png: mask is 7x6 but its image a\.png is 7x5"):
        read_label(f"{wrong}||", None, (5, 7), 3, "a.png")


def test_manifest_classes() -> None:
    binary = pd.DataFrame({"id": ["a"]})
    assert manifest_classes(binary) is None
    labelled = binary.assign(mask_classes="x|y")
    assert manifest_classes(labelled) == ("x", "y")
    mixed = pd.DataFrame({"id": ["a", "b"], "mask_classes": ["x|y", "x"]})
    with pytest.raises(SegflowError, match="rerun ingest"):
        manifest_classes(mixed)


def test_train_label_unions_per_class() -> None:
    first, second = _planes(2, seed=1), _planes(2, seed=2)
    manifest = pd.DataFrame(
        {
            "id": ["p", "q"],
            "image_path": ["/p.png", "/q.png"],
            "height": [5, 5],
            "width": [7, 7],
            "mask_path": [None, None],
            "mask_rle": [CLASS_SEPARATOR.join(map(naive_encode, m)) for m in (first, second)],
        }
    )
    label = train_label(manifest, ["p", "q"], 2)
    np.testing.assert_array_equal(unpack_labels(label, 2), first | second)
    np.testing.assert_array_equal(train_label(manifest, ["p"], 2), pack_labels(first))
