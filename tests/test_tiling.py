"""Tests for tiled inference (segflow.model.inference.tiling): tile grid, blending weights, blended prediction."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from segflow.core.errors import SegflowError
from segflow.model.inference.tiling import TILE_WEIGHTS, predict_tiled, tile_positions, tile_weights
from segflow.model.inference.tta import predict_with_tta

torch.set_num_threads(1)


def _random(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _conv_predictor(in_channels: int, out_channels: int):
    """A 1x1 convolution + sigmoid: per pixel, hence translation-equivariant."""
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size=1)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(1))

    def predict(batch: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.sigmoid(conv(batch))

    return predict


# --------------------------------------------------------------------------- tile_positions


def _check_positions(size: int, tile: int, overlap: float) -> list[int]:
    positions = tile_positions(size, tile, overlap)
    assert positions[0] == 0
    assert all(isinstance(p, int) for p in positions)
    if size <= tile:
        assert positions == [0]
        return positions
    assert positions[-1] == size - tile  # flush with the end, so within bounds
    gaps = np.diff(positions)
    assert (gaps > 0).all()  # strictly increasing: no tile twice
    # Neighbours overlap by at least overlap * tile, or tile - 1 when that is more than a tile
    # step of one pixel allows.
    assert (tile - gaps >= min(overlap * tile, tile - 1) - 1e-9).all()
    covered = np.zeros(size, dtype=bool)
    for p in positions:
        covered[p : p + tile] = True
    assert covered.all()
    # The fewest tiles: one fewer could not keep the overlap with whole-pixel steps.
    max_step = math.floor(tile * (1 - overlap) + 1e-9)
    assert len(positions) == math.ceil((size - tile) / max(1, max_step)) + 1
    return positions


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 2000),
    tile=st.integers(1, 300),
    overlap=st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99]),
)
def test_positions_cover_within_bounds_with_overlap(size: int, tile: int, overlap: float) -> None:
    positions = _check_positions(size, tile, overlap)
    assert tile_positions(size, tile, overlap) == positions  # deterministic


def test_positions_by_hand() -> None:
    assert tile_positions(512, 128, 0.5) == [0, 64, 128, 192, 256, 320, 384]
    assert tile_positions(512, 128, 0.0) == [0, 128, 256, 384]
    assert tile_positions(300, 128, 0.0) == [0, 86, 172]  # evenly spread, last flush
    assert tile_positions(101, 128, 0.5) == [0]
    assert tile_positions(128, 128, 0.5) == [0]
    assert tile_positions(129, 128, 0.5) == [0, 1]
    assert tile_positions(np.int64(20), np.int64(10), 0.5) == [0, 5, 10]


@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [(10, 0, 0.5), (10, -3, 0.5), (10, 4, 1.0), (10, 4, -0.1), (0, 4, 0.5)],
)
def test_positions_reject_bad_arguments(size: int, tile: int, overlap: float) -> None:
    with pytest.raises(SegflowError):
        tile_positions(size, tile, overlap)


# --------------------------------------------------------------------------- tile_weights


@pytest.mark.parametrize("kind", list(TILE_WEIGHTS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 7), (16, 9), (128, 128)])
def test_weights_positive_with_maximum_at_the_centre(kind: str, shape: tuple[int, int]) -> None:
    weights = tile_weights(*shape, kind)
    assert weights.shape == shape and weights.dtype == torch.float32
    assert (weights > 0).all()
    h, w = shape
    assert weights[(h - 1) // 2, (w - 1) // 2] == weights.max() == 1
    assert weights[h // 2, w // 2] == 1
    # Symmetric, and (weakly) falling from the centre towards every border.
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.flip(1))
    half = weights[: (h + 1) // 2, : (w + 1) // 2]
    assert (half.diff(dim=0) >= 0).all() and (half.diff(dim=1) >= 0).all()
    if kind != "uniform" and min(shape) > 2:
        assert weights[0, 0] < weights[h // 2, w // 2]


def test_weights_by_hand() -> None:
    torch.testing.assert_close(
        tile_weights(3, 4, "pyramid"),
        torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 1.0, 1.0, 0.5], [0.5, 0.5, 0.5, 0.5]]),
    )
    gaussian = tile_weights(128, 128, "gaussian")
    # sigma = 128/8 = 16 around the centre 63.5 (between the two middle pixels).
    ratio = gaussian[63, 79] / gaussian[63, 63]
    expected = math.exp(-(15.5**2 - 0.5**2) / (2 * 16**2))
    assert ratio == pytest.approx(expected, rel=1e-5)
    assert gaussian[63, 64] == gaussian[64, 63] == gaussian[64, 64] == 1
    assert gaussian.min() > 0
    assert torch.equal(tile_weights(5, 5, "uniform"), torch.ones(5, 5))


def test_unknown_weighting() -> None:
    with pytest.raises(KeyError, match="valid weightings: gaussian, pyramid, uniform"):
        tile_weights(8, 8, "cosine")
    with pytest.raises(SegflowError, match="tile size"):
        tile_weights(0, 8, "gaussian")


# --------------------------------------------------------------------------- predict_tiled


@pytest.mark.parametrize(
    "size",
    [(64, 64), (32, 32), (10, 7), (1, 1), (50, 90), (100, 37), (33, 200)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
@pytest.mark.parametrize("weighting", list(TILE_WEIGHTS))
def test_equivariant_predictor_equals_full_image(size: tuple[int, int], weighting: str) -> None:
    image = _random((3, *size))
    predict = _conv_predictor(3, 2)
    expected = predict(image[None])[0]
    tiled = predict_tiled(predict, image, (32, 32), overlap=0.5, weighting=weighting, batch_size=4)
    assert tiled.shape == (2, *size)
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.9])
def test_equivariant_non_square_tile(overlap: float) -> None:
    image = _random((1, 45, 70))
    tiled = predict_tiled(torch.sigmoid, image, (16, 24), overlap=overlap)
    torch.testing.assert_close(tiled, torch.sigmoid(image), atol=1e-5, rtol=0)


def test_small_image_is_reflect_padded() -> None:
    # Padding is visible to the predictor: a 3x2 image, tile 8x8, padded by repeated reflection.
    image = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    seen: list[Tensor] = []

    def predict(batch: Tensor) -> Tensor:
        seen.append(batch.clone())
        return batch

    torch.testing.assert_close(predict_tiled(predict, image, (8, 8)), image)
    assert len(seen) == 1 and seen[0].shape == (1, 1, 8, 8)
    rows = [1.0, 3.0, 5.0, 3.0, 1.0, 3.0, 5.0, 3.0]  # first column, reflected with period 4
    assert seen[0][0, 0, :, 0].tolist() == rows
    assert seen[0][0, 0, 0].tolist() == [1.0, 2.0] * 4


def test_constant_per_tile_is_a_convex_combination() -> None:
    generator = torch.Generator().manual_seed(5)
    constants: list[float] = []

    def predict(batch: Tensor) -> Tensor:
        values = torch.rand(batch.shape[0], generator=generator) * 10 - 5
        constants.extend(values.tolist())
        return values[:, None, None, None].expand(-1, 1, *batch.shape[-2:]).clone()

    for weighting in TILE_WEIGHTS:
        constants.clear()
        result = predict_tiled(predict, _random((2, 100, 75)), (32, 32), 0.5, weighting)
        assert len(constants) == len(tile_positions(100, 32, 0.5)) * len(
            tile_positions(75, 32, 0.5)
        )
        assert result.min() >= min(constants) - 1e-5
        assert result.max() <= max(constants) + 1e-5
        assert len(torch.unique(result)) > len(constants)  # genuinely blended, not one tile wins


def test_batch_size_does_not_change_the_result() -> None:
    image = _random((2, 70, 90))
    calls: list[int] = []

    def predict(batch: Tensor) -> Tensor:
        calls.append(batch.shape[0])
        # Depends on the tile's position in the image (via its content), not on its batch.
        return torch.cat([batch.mean(1, keepdim=True) ** 2, batch[:, :1]], dim=1)

    results = []
    for batch_size in (1, 3, 8, 1000):
        calls.clear()
        results.append(predict_tiled(predict, image, (32, 32), 0.5, "gaussian", batch_size))
        n_tiles = len(tile_positions(70, 32, 0.5)) * len(tile_positions(90, 32, 0.5))
        assert calls == [min(batch_size, n_tiles - i) for i in range(0, n_tiles, batch_size)]
    for result in results[1:]:
        assert torch.equal(result, results[0])


def test_composes_with_tta() -> None:
    image = _random((3, 40, 56))
    predict = _conv_predictor(3, 1)
    tiled = predict_tiled(lambda b: predict_with_tta(predict, b, "d4"), image, (32, 32))
    torch.testing.assert_close(tiled, predict(image[None])[0], atol=1e-5, rtol=0)


def test_dtype_of_the_predictor_is_kept() -> None:
    image = _random((1, 40, 40))
    tiled = predict_tiled(lambda b: torch.sigmoid(b).half(), image, (16, 16))
    assert tiled.dtype == torch.float16
    torch.testing.assert_close(tiled, torch.sigmoid(image).half(), atol=2e-3, rtol=0)


def test_real_size_512_with_128_tiles_is_fast() -> None:
    # ISBI-2012-like: a 512x512 EM slice through a small conv net with a 128x128 input.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1)
    ).eval()
    image = _random((1, 512, 512))
    start = time.perf_counter()
    with torch.inference_mode():
        tiled = predict_tiled(lambda b: torch.sigmoid(net(b)), image, (128, 128), 0.5)
        full = torch.sigmoid(net(image[None]))[0]
    elapsed = time.perf_counter() - start
    assert tiled.shape == (1, 512, 512)
    assert elapsed < 5, f"512x512 tiled inference took {elapsed:.2f} s"
    # The 3x3 conv sees zero padding at tile borders, where the Gaussian weight is small: close
    # to the full prediction everywhere, equal away from the tile borders.
    difference = (tiled - full).abs()
    assert difference.max() < 0.05
    assert difference.median() < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": (0, 32)}, "tile size"),
        ({"tile": (32, -1)}, "tile size"),
        ({"tile": (32,)}, r"tile must be \(height, width\)"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.5}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_predict_tiled_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"tile": (32, 32), **kwargs}
    with pytest.raises(SegflowError, match=message):
        predict_tiled(torch.sigmoid, _random((1, 40, 40)), **arguments)


def test_predict_tiled_rejects_bad_image_and_predictor() -> None:
    with pytest.raises(SegflowError, match=r"\(C, H, W\)"):
        predict_tiled(torch.sigmoid, _random((1, 1, 40, 40)), (32, 32))
    with pytest.raises(SegflowError, match="input resolution"):
        predict_tiled(lambda b: b[..., ::2, ::2], _random((1, 40, 40)), (32, 32))
    with pytest.raises(SegflowError, match=r"\(B, K, 32, 32\)"):
        predict_tiled(lambda b: b[:1], _random((1, 40, 40)), (32, 32))
    with pytest.raises(KeyError, match="valid weightings"):
        predict_tiled(torch.sigmoid, _random((1, 40, 40)), (32, 32), weighting="hann")
