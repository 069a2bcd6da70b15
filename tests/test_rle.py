"""Tests for Kaggle run-length encoding (segflow.formats.rle)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import naive_encode
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segflow.core.errors import SegflowError
from segflow.formats.rle import RLE_ORDERS, is_empty_rle, rle_decode, rle_encode

# 3x3 mask whose Kaggle RLE is written out by hand below.
#   column-major, 1-based pixel numbers:   row-major, 1-based pixel numbers:
#     1 4 7                                  1 2 3
#     2 5 8                                  4 5 6
#     3 6 9                                  7 8 9
HAND_MASK = np.array(
    [
        [0, 1, 1],
        [1, 1, 0],
        [0, 0, 1],
    ],
    dtype=np.uint8,
)
# Column-major foreground pixels: 2, 4, 5, 7, 9 -> runs (2,1) (4,2) (7,1) (9,1).
HAND_COLUMN_RLE = "2 1 4 2 7 1 9 1"
# Row-major foreground pixels: 2, 3, 4, 5, 9 -> runs (2,4) (9,1).
HAND_ROW_RLE = "2 4 9 1"

# Non-square 2x3 mask, so a transposed decode cannot pass by accident.
#   column-major numbering: 1 3 5      row-major numbering: 1 2 3
#                           2 4 6                           4 5 6
RECT_MASK = np.array(
    [
        [1, 0, 0],
        [1, 1, 0],
    ],
    dtype=np.uint8,
)
RECT_COLUMN_RLE = "1 2 4 1"  # pixels 1, 2, 4
RECT_ROW_RLE = "1 1 4 2"  # pixels 1, 4, 5


# --------------------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize(
    ("mask", "order", "start", "expected"),
    [
        (HAND_MASK, "column", 1, HAND_COLUMN_RLE),
        (HAND_MASK, "row", 1, HAND_ROW_RLE),
        (HAND_MASK, "column", 0, "1 1 3 2 6 1 8 1"),
        (HAND_MASK, "row", 0, "1 4 8 1"),
        (RECT_MASK, "column", 1, RECT_COLUMN_RLE),
        (RECT_MASK, "row", 1, RECT_ROW_RLE),
        (np.ones((2, 2), np.uint8), "column", 1, "1 4"),
        (np.ones((2, 2), np.uint8), "row", 0, "0 4"),
        (np.array([[0, 0, 0, 1]], np.uint8), "column", 1, "4 1"),
        (np.array([[1], [0], [1]], np.uint8), "row", 1, "1 1 3 1"),
    ],
)
def test_hand_computed_encode_and_decode(
    mask: np.ndarray, order: str, start: int, expected: str
) -> None:
    assert rle_encode(mask, order=order, start=start) == expected
    decoded = rle_decode(expected, mask.shape, order=order, start=start)
    assert decoded.dtype == np.uint8
    assert decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


def test_default_order_is_kaggle_column_major_one_based() -> None:
    assert rle_encode(HAND_MASK) == HAND_COLUMN_RLE
    np.testing.assert_array_equal(rle_decode(HAND_COLUMN_RLE, (3, 3)), HAND_MASK)


def test_column_and_row_orders_differ_on_non_symmetric_mask() -> None:
    # The column-major string decoded row-major gives the transposed picture, not the mask.
    wrong = rle_decode(HAND_COLUMN_RLE, (3, 3), order="row")
    assert not np.array_equal(wrong, HAND_MASK)
    np.testing.assert_array_equal(wrong, HAND_MASK.T)


def test_encode_treats_any_nonzero_value_as_foreground() -> None:
    mask = HAND_MASK.astype(np.uint16) * np.array([[7, 65535, 2]], dtype=np.uint16)
    assert rle_encode(mask) == HAND_COLUMN_RLE
    assert rle_encode(HAND_MASK.astype(bool)) == HAND_COLUMN_RLE
    assert rle_encode(HAND_MASK * 255) == HAND_COLUMN_RLE


def test_decode_accepts_unsorted_runs_and_extra_whitespace() -> None:
    assert np.array_equal(rle_decode("  9 1\t7 1 4 2\n 2 1 ", (3, 3)), HAND_MASK)


def test_adjacent_runs_are_not_an_overlap() -> None:
    decoded = rle_decode("1 2 3 2", (2, 3))
    assert decoded.ravel(order="F").tolist() == [1, 1, 1, 1, 0, 0]


def test_run_ending_exactly_at_last_pixel_is_valid() -> None:
    decoded = rle_decode("7 3", (3, 3))
    assert decoded.ravel(order="F").tolist() == [0] * 6 + [1] * 3
    assert rle_decode("0 9", (3, 3), start=0).all()


@pytest.mark.parametrize("empty", ["", " ", "  \t", "-1", " -1 ", None, math.nan, np.nan])
@pytest.mark.parametrize("order", RLE_ORDERS)
def test_empty_spellings_decode_to_empty_mask(empty: object, order: str) -> None:
    assert is_empty_rle(empty)
    decoded = rle_decode(empty, (4, 5), order=order)
    assert decoded.shape == (4, 5)
    assert decoded.dtype == np.uint8
    assert not decoded.any()


@pytest.mark.parametrize("not_empty", ["1 1", "0", "-2", "nan", 0.0, 1])
def test_non_empty_spellings_are_not_empty(not_empty: object) -> None:
    assert not is_empty_rle(not_empty)


@pytest.mark.parametrize("order", RLE_ORDERS)
@pytest.mark.parametrize("shape", [(3, 3), (1, 7), (7, 1), (0, 0)])
def test_encode_of_empty_mask_is_empty_string(order: str, shape: tuple[int, int]) -> None:
    assert rle_encode(np.zeros(shape, np.uint8), order=order) == ""


def test_encode_rejects_non_2d_masks() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros(4, np.uint8))


# --------------------------------------------------------------------------- property-based


def _masks() -> st.SearchStrategy[np.ndarray]:
    shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
    return shapes.flatmap(lambda shape: hnp.arrays(np.uint8, shape, elements=st.integers(0, 1)))


@settings(max_examples=150, deadline=None)
@given(mask=_masks(), order=st.sampled_from(RLE_ORDERS), start=st.sampled_from([0, 1]))
@example(mask=np.zeros((1, 9), np.uint8), order="column", start=1)
@example(mask=np.ones((9, 1), np.uint8), order="row", start=0)
@example(mask=np.ones((1, 1), np.uint8), order="column", start=1)
@example(mask=np.zeros((1, 1), np.uint8), order="row", start=1)
@example(mask=np.ones((13, 17), np.uint8), order="column", start=0)
@example(mask=np.eye(6, dtype=np.uint8), order="row", start=1)
def test_round_trip_matches_reference_encoder(mask: np.ndarray, order: str, start: int) -> None:
    encoded = rle_encode(mask, order=order, start=start)
    assert encoded == naive_encode(mask, order, start)
    decoded = rle_decode(encoded, mask.shape, order=order, start=start)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


@settings(max_examples=100, deadline=None)
@given(mask=_masks(), order=st.sampled_from(RLE_ORDERS), start=st.sampled_from([0, 1]))
def test_encoded_runs_are_sorted_disjoint_and_count_the_foreground(
    mask: np.ndarray, order: str, start: int
) -> None:
    encoded = rle_encode(mask, order=order, start=start)
    values = [int(token) for token in encoded.split()]
    starts, lengths = values[0::2], values[1::2]
    assert sum(lengths) == int(mask.sum())
    assert all(length > 0 for length in lengths)
    assert all(first >= start for first in starts)
    ends = [first + length for first, length in zip(starts, lengths, strict=True)]
    # Sorted and separated by at least one background pixel (maximal runs).
    assert all(nxt > end for end, nxt in zip(ends, starts[1:], strict=False))
    assert all(end <= mask.size + start for end in ends)


@settings(max_examples=60, deadline=None)
@given(
    mask=_masks().map(lambda m: m * np.uint8(200)),
    order=st.sampled_from(RLE_ORDERS),
)
def test_non_binary_foreground_round_trips_to_binary(mask: np.ndarray, order: str) -> None:
    decoded = rle_decode(rle_encode(mask, order=order), mask.shape, order=order)
    np.testing.assert_array_equal(decoded, (mask != 0).astype(np.uint8))


# --------------------------------------------------------------------------- errors

WHERE = "train.csv row 7 (id 'abc')"


@pytest.mark.parametrize(
    ("rle", "fragment"),
    [
        ("1 2 3", "odd number of RLE tokens (3)"),
        ("5", "odd number of RLE tokens (1)"),
        ("1 x", "'x' is not an integer"),
        ("1 2.5", "'2.5' is not an integer"),
        ("1e0 2", "'1e0' is not an integer"),
        ("1 --5", "'--5' is not an integer"),
        ("1 ²", "'²' is not an integer"),
        ("1 1_0", "'1_0' is not an integer"),
        ("0 2", "before pixel 1"),
        ("-3 2", "before pixel 1"),
        ("3 0", "run length 0 is not positive"),
        ("3 -2", "run length -2 is not positive"),
        ("8 3", "past the 3x3 image (9 pixels)"),
        ("1 1 10 1", "past the 3x3 image"),
        ("1 3 2 2", "runs overlap"),
        ("5 3 1 5", "runs overlap"),
        ("4 1 4 1", "runs overlap"),
        # Huge numbers must not overflow int64 into a wrapped, "valid" or IndexError-ing run.
        ("1 99999999999999999999999", "out of range"),
        ("-99999999999999999999999 1", "out of range"),
        ("9223372036854775807 9223372036854775807", "out of range"),
        ("5 9223372036854775807", "out of range"),
        ("1 1152921504606846976", "past the 3x3 image"),
    ],
)
def test_malformed_rle_raises_segflow_error_naming_the_source(rle: str, fragment: str) -> None:
    with pytest.raises(SegflowError) as info:
        rle_decode(rle, (3, 3), where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert fragment in message


def test_run_past_end_message_names_image_size_and_end_pixel() -> None:
    with pytest.raises(SegflowError) as info:
        rle_decode("1 2 30 5", (4, 8), where=WHERE)
    message = str(info.value)
    assert WHERE in message
    assert "'30 5'" in message
    assert "ends at pixel 34" in message
    assert "4x8 image (32 pixels)" in message


def test_start_zero_numbering_rejects_negative_and_accepts_zero() -> None:
    assert rle_decode("0 1", (2, 2), start=0)[0, 0] == 1
    with pytest.raises(SegflowError, match="before pixel 0"):
        rle_decode("-1 1", (2, 2), start=0, where=WHERE)
    with pytest.raises(SegflowError, match="past the 2x2 image"):
        rle_decode("3 2", (2, 2), start=0, where=WHERE)


@pytest.mark.parametrize("value", [5, 3.5, b"1 2", ["1", "2"]])
def test_non_string_rle_is_an_error(value: object) -> None:
    with pytest.raises(SegflowError, match="expected an RLE string") as info:
        rle_decode(value, (3, 3), where=WHERE)
    assert WHERE in str(info.value)


def test_default_where_is_used_in_messages() -> None:
    with pytest.raises(SegflowError, match=r"^RLE: "):
        rle_decode("1", (3, 3))


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_tgs_salt_csv_agrees_with_png_masks(tgs_salt) -> None:
    frame = pd.read_csv(tgs_salt / "train.csv", dtype=str, keep_default_na=False)
    assert len(frame) > 0
    n_non_empty = 0
    for item_id, rle in zip(frame["id"], frame["rle_mask"], strict=True):
        png = cv2.imread(str(tgs_salt / "train" / "masks" / f"{item_id}.png"), cv2.IMREAD_UNCHANGED)
        assert png is not None, item_id
        truth = png > 0
        decoded = rle_decode(rle, truth.shape, where=f"train.csv id {item_id}")
        assert np.array_equal(decoded.astype(bool), truth), item_id
        assert rle_encode(truth) == rle.strip(), item_id
        n_non_empty += bool(truth.any())
    # The data set has both empty and non-empty masks; make sure both kinds were compared.
    assert 0 < n_non_empty < len(frame)
