"""Tests for test-time augmentation (segflow.model.inference.tta): the D4 group and the merged prediction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from segflow.core.errors import SegflowError
from segflow.model.inference.tta import (
    D4,
    GMEAN_EPS,
    MERGES,
    TTA_MODES,
    Dihedral,
    get_transform,
    get_tta,
    predict_with_tta,
)

torch.set_num_threads(1)

SHAPES = [(2, 3, 5, 5), (2, 3, 4, 7), (1, 1, 6, 3), (1, 2, 1, 4)]


def _random(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class CountingPredictor:
    """Wraps a predictor and records the batch shape of every call."""

    def __init__(self, function) -> None:
        self.function = function
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: Tensor) -> Tensor:
        self.shapes.append(tuple(batch.shape))
        return self.function(batch)


def _column_ramp(batch: Tensor) -> Tensor:
    """Not equivariant: adds (column index)^2 of the batch it is given."""
    width = batch.shape[-1]
    return batch + torch.arange(width, dtype=batch.dtype) ** 2


# --------------------------------------------------------------------------- the group D4


def test_d4_names_and_registry() -> None:
    names = [t.name for t in D4]
    assert names == [
        "identity",
        "hflip",
        "vflip",
        "rot90",
        "rot180",
        "rot270",
        "transpose",
        "transverse",
    ]
    assert all(get_transform(name).name == name for name in names)
    with pytest.raises(KeyError, match="valid transforms: identity, hflip"):
        get_transform("rot45")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transform", D4, ids=lambda t: t.name)
def test_inverse_undoes_forward_exactly(transform: Dihedral, shape: tuple[int, ...]) -> None:
    x = _random(shape)
    y = transform.forward(x)
    h, w = shape[-2:]
    assert y.shape == (*shape[:-2], *transform.output_size(h, w))
    assert torch.equal(transform.inverse(y), x)
    assert torch.equal(transform.forward(transform.inverse(y)), y)


def test_transforms_match_their_definitions() -> None:
    x = torch.arange(6.0).reshape(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    expected = {
        "identity": [[0, 1, 2], [3, 4, 5]],
        "hflip": [[2, 1, 0], [5, 4, 3]],
        "vflip": [[3, 4, 5], [0, 1, 2]],
        "rot90": [[2, 5], [1, 4], [0, 3]],  # counter-clockwise
        "rot180": [[5, 4, 3], [2, 1, 0]],
        "rot270": [[3, 0], [4, 1], [5, 2]],
        "transpose": [[0, 3], [1, 4], [2, 5]],
        "transverse": [[5, 2], [4, 1], [3, 0]],
    }
    for transform in D4:
        assert transform.forward(x)[0, 0].tolist() == expected[transform.name], transform.name


def test_transforms_are_pairwise_distinct() -> None:
    x = _random((1, 2, 6, 6))
    images = [t.forward(x) for t in D4]
    for a, b in itertools.combinations(range(len(D4)), 2):
        assert not torch.equal(images[a], images[b]), (D4[a].name, D4[b].name)


def _element(x: Tensor, y: Tensor) -> str:
    """The one transform mapping x to y (x with distinct pixels, so it is unique)."""
    matches = [t.name for t in D4 if torch.equal(t.forward(x), y)]
    assert len(matches) == 1, matches
    return matches[0]


def test_composition_table_closes_into_a_group() -> None:
    x = torch.randperm(49).float().reshape(1, 1, 7, 7)  # all pixels distinct
    table = {(a.name, b.name): _element(x, a.forward(b.forward(x))) for a in D4 for b in D4}
    # Latin square: every row and column of the Cayley table is a permutation of D4.
    for t in D4:
        assert sorted(table[t.name, u.name] for u in D4) == sorted(u.name for u in D4)
        assert sorted(table[u.name, t.name] for u in D4) == sorted(u.name for u in D4)
    assert table["rot90", "rot90"] == "rot180"
    assert table["rot90", "rot270"] == "identity"
    assert table["hflip", "vflip"] == "rot180"
    assert table["rot180", "transpose"] == "transverse"
    assert table["hflip", "rot90"] != table["rot90", "hflip"]  # not abelian
    # inverse is the group inverse: composing it with forward gives the identity element.
    for t in D4:
        assert _element(x, t.inverse(t.forward(x))) == "identity"
        assert t.inverse(x).shape == x.shape and _element(x, t.forward(t.inverse(x))) == "identity"


# --------------------------------------------------------------------------- modes


def test_modes_and_unknown_mode() -> None:
    assert [t.name for t in get_tta("none")] == ["identity"]
    assert [t.name for t in get_tta("hflip")] == ["identity", "hflip"]
    assert [t.name for t in get_tta("vflip")] == ["identity", "vflip"]
    assert get_tta("d4") == D4
    with pytest.raises(KeyError, match="valid modes: none, hflip, vflip, d4"):
        get_tta("flips")


def test_unknown_merge_and_bad_images() -> None:
    x = _random((1, 1, 4, 4))
    with pytest.raises(KeyError, match="valid merges: mean, gmean"):
        predict_with_tta(torch.sigmoid, x, "d4", merge="max")
    with pytest.raises(KeyError, match="valid modes"):
        predict_with_tta(torch.sigmoid, x, "rot")
    with pytest.raises(SegflowError, match=r"\(N, C, H, W\)"):
        predict_with_tta(torch.sigmoid, x[0], "d4")


def test_predictor_of_the_wrong_size_is_reported() -> None:
    x = _random((2, 1, 8, 8))
    with pytest.raises(SegflowError, match="input resolution"):
        predict_with_tta(lambda b: b[..., ::2, ::2], x, "hflip")
    with pytest.raises(SegflowError, match="input resolution"):
        predict_with_tta(lambda b: b[:1], x, "hflip")


# --------------------------------------------------------------------------- predict_with_tta


def _conv_predictor(in_channels: int, out_channels: int):
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size=1)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(1))
    return lambda batch: torch.sigmoid(conv(batch))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 3, 5, 9)])
@pytest.mark.parametrize("mode", list(TTA_MODES))
@pytest.mark.parametrize("merge", MERGES)
def test_equivariant_predictor_is_unchanged(shape, mode: str, merge: str) -> None:
    x = _random(shape)
    for predict in (torch.sigmoid, _conv_predictor(shape[1], 2)):
        with torch.inference_mode():
            expected = predict(x)
            merged = predict_with_tta(predict, x, mode, merge)
        assert merged.shape == expected.shape
        torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 1, 6, 6), (1, 2, 4, 7)])
def test_d4_of_non_equivariant_predictor_by_hand(shape) -> None:
    x = _random(shape)
    h, w = shape[-2:]
    # Each orientation of the column ramp, mapped back, runs along columns or rows, forwards or
    # backwards; d4 has each of the four twice: identity/vflip, hflip/rot180 on the columns,
    # the four axis-swapping ones on the rows (whose ramp has length h).
    cols = torch.arange(w, dtype=x.dtype) ** 2
    rows = (torch.arange(h, dtype=x.dtype) ** 2)[:, None]
    expected = x + (2 * (cols + cols.flip(0)) + 2 * (rows + rows.flip(0))) / 8
    torch.testing.assert_close(predict_with_tta(_column_ramp, x, "d4"), expected)
    # The same, written as the definition: the mean of inverse(predict(forward(x))).
    definition = torch.stack([t.inverse(_column_ramp(t.forward(x))) for t in D4]).mean(0)
    torch.testing.assert_close(predict_with_tta(_column_ramp, x, "d4"), definition)
    # Flips only: hflip averages the ramp with its mirror, vflip does not touch columns.
    torch.testing.assert_close(
        predict_with_tta(_column_ramp, x, "hflip"), x + (cols + cols.flip(0)) / 2
    )
    torch.testing.assert_close(predict_with_tta(_column_ramp, x, "vflip"), x + cols)
    torch.testing.assert_close(predict_with_tta(_column_ramp, x, "none"), x + cols)


@pytest.mark.parametrize(
    ("shape", "calls"),
    [((3, 1, 8, 8), [(24, 1, 8, 8)]), ((3, 1, 4, 6), [(12, 1, 4, 6), (12, 1, 6, 4)])],
)
def test_d4_is_batched_by_output_shape(shape, calls) -> None:
    predict = CountingPredictor(_column_ramp)
    predict_with_tta(predict, _random(shape), "d4")
    assert predict.shapes == calls
    for mode in ("none", "hflip", "vflip"):
        predict = CountingPredictor(_column_ramp)
        predict_with_tta(predict, _random(shape), mode)
        assert predict.shapes == [(shape[0] * len(get_tta(mode)), *shape[1:])]


def test_batch_members_are_not_mixed_up() -> None:
    # Every image gets a different offset; the merge must keep image i's predictions together.
    x = _random((4, 1, 5, 3)) + torch.arange(4.0)[:, None, None, None] * 10
    merged = predict_with_tta(_column_ramp, x, "d4")
    for i in range(4):
        torch.testing.assert_close(
            merged[i : i + 1], predict_with_tta(_column_ramp, x[i : i + 1], "d4")
        )


def test_empty_batch() -> None:
    for mode in TTA_MODES:
        assert predict_with_tta(torch.sigmoid, torch.rand(0, 2, 4, 6), mode).shape == (0, 2, 4, 6)


def test_gmean_and_mean_on_known_values() -> None:
    ones = torch.ones(1, 1, 1, 2)
    # Identity copy predicts [0.1, 0.9]; the hflip copy, flipped back, predicts [0.9, 0.1].
    predict = lambda batch: batch * torch.tensor([0.1, 0.9])  # noqa: E731
    mean = predict_with_tta(predict, ones, "hflip", "mean")
    gmean = predict_with_tta(predict, ones, "hflip", "gmean")
    torch.testing.assert_close(mean, torch.full((1, 1, 1, 2), 0.5))
    torch.testing.assert_close(gmean, torch.full((1, 1, 1, 2), 0.3))
    assert torch.all(gmean <= mean)  # AM-GM
    # A zero probability is clamped: the merge stays finite and small, not NaN or 0.
    zero = lambda batch: batch * torch.tensor([0.0, 1.0])  # noqa: E731
    merged = predict_with_tta(zero, ones, "hflip", "gmean")
    torch.testing.assert_close(merged, torch.full((1, 1, 1, 2), math.sqrt(GMEAN_EPS)))
    torch.testing.assert_close(predict_with_tta(zero, ones, "hflip", "mean"), mean)


def test_inputs_and_dtype_are_preserved() -> None:
    x = _random((2, 1, 4, 6))
    before = x.clone()
    half = lambda batch: torch.sigmoid(batch).half()  # noqa: E731
    for merge in MERGES:
        merged = predict_with_tta(half, x, "d4", merge)
        assert merged.dtype == torch.float16
        torch.testing.assert_close(merged, torch.sigmoid(x).half(), atol=2e-3, rtol=0)
    assert torch.equal(x, before)


def test_model_state_untouched() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        predict_with_tta(lambda b: torch.sigmoid(model(b)), _random((2, 1, 6, 6)), "d4")
    assert not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
