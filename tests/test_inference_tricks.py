"""Issue 18's inference options: multi-scale TTA, the TTA merge from config, MC-dropout and its
uncertainty map (segflow.model.inference, segflow.artifacts.predictions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from segflow.artifacts.predictions import (
    UNCERTAINTY,
    Prediction,
    merge_fold_predictions,
    read_prediction,
    write_prediction,
)
from segflow.core.errors import SegflowError
from segflow.model.inference.predict import (
    PredictOptions,
    predict_rows,
    predict_rows_uncertain,
)
from segflow.model.inference.tta import check_scales, predict_with_tta

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _size_dependent(batch: Tensor) -> Tensor:
    """Probability h / (h + 8) everywhere: a prediction that depends on the input's scale."""
    n, _, height, width = batch.shape
    return torch.full((n, 1, height, width), height / (height + 8.0))


def _ramp(batch: Tensor) -> Tensor:
    """Not flip-equivariant: probabilities rise along the columns of the batch it is given."""
    width = batch.shape[-1]
    ramp = (torch.arange(width, dtype=torch.float32) + 1) / (width + 1)
    return ramp.expand(batch.shape[0], 1, batch.shape[-2], width).clone()


# --------------------------------------------------------------------------- multi-scale TTA


def test_scales_change_a_scale_dependent_prediction_in_the_known_direction() -> None:
    images = torch.rand(2, 3, 16, 12)
    plain = predict_with_tta(_size_dependent, images)
    scaled = predict_with_tta(_size_dependent, images, scales=(0.5, 1.0, 1.5))
    assert scaled.shape == plain.shape == (2, 1, 16, 12)  # resized back exactly
    # Heights 8, 16, 24: the mean of 8/16, 16/24, 24/32, below the plain 16/24.
    expected = (8 / 16 + 16 / 24 + 24 / 32) / 3
    assert torch.allclose(scaled, torch.full_like(scaled, expected))
    assert torch.allclose(plain, torch.full_like(plain, 16 / 24))
    assert scaled.mean() < plain.mean()


def test_scales_with_flips_and_odd_sizes_come_back_at_the_input_size() -> None:
    images = torch.rand(1, 1, 7, 5)
    calls: list[tuple[int, ...]] = []

    def predict(batch: Tensor) -> Tensor:
        calls.append(tuple(batch.shape))
        return _ramp(batch)

    out = predict_with_tta(predict, images, "d4", scales=(0.75, 1.25))
    assert out.shape == (1, 1, 7, 5)
    # Per scale: the H x W and the W x H group (non-square), 4 copies each.
    assert calls == [(4, 1, 5, 4), (4, 1, 4, 5), (4, 1, 9, 6), (4, 1, 6, 9)]


def test_scale_one_alone_is_bit_identical_to_no_scales() -> None:
    images = torch.rand(2, 1, 9, 9)
    for mode in ("none", "hflip", "d4"):
        for merge in ("mean", "gmean"):
            plain = predict_with_tta(_ramp, images, mode, merge)
            assert torch.equal(plain, predict_with_tta(_ramp, images, mode, merge, (1.0,)))


@pytest.mark.parametrize("scales", [(), (0.0,), (-1.0,), (1.0, 1.0), (float("nan"),)])
def test_bad_scales_are_refused(scales: tuple[float, ...]) -> None:
    with pytest.raises(SegflowError, match=r"predict\.tta_scales"):
        check_scales(scales)


# --------------------------------------------------------------------------- predict_rows


class _RampNet(nn.Module):
    """A 'segmentation model' whose logits rise along the columns (not flip-invariant)."""

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[-1]
        return torch.linspace(-3.0, 3.0, width).expand(x.shape[0], 1, x.shape[-2], width).clone()


class _DropoutNet(nn.Module):
    """A 1x1 conv after a dropout layer, with a BatchNorm that must stay in eval mode."""

    def __init__(self, rate: float = 0.5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1)
        self.drop = nn.Dropout2d(rate)
        self.head = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.head.weight.fill_(2.0)
            self.head.bias.fill_(-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.norm(x).expand(-1, 4, -1, -1)).mean(1, keepdim=True))


def _images(n: int = 3, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def _rows(model: nn.Module, options: PredictOptions, images: np.ndarray | None = None):
    images = _images() if images is None else images
    rows = np.arange(len(images))
    return predict_rows_uncertain(model, images, rows, [0.5], [0.25], options, CPU, 1)


def test_tta_merge_from_the_options_reaches_the_merge() -> None:
    mean, _, _ = _rows(_RampNet(), PredictOptions(tta="hflip"))
    gmean, _, _ = _rows(_RampNet(), PredictOptions(tta="hflip", tta_merge="gmean"))
    # p and its mirror: the geometric mean is below the arithmetic one wherever they differ.
    assert (gmean <= mean + 1e-7).all() and (gmean < mean - 1e-4).any()


def test_mc_dropout_passes_differ_and_give_a_spread() -> None:
    model = _DropoutNet()
    plain, _, none = _rows(model, PredictOptions(batch_size=2))
    assert none is None
    probs, _, spread = _rows(model, PredictOptions(batch_size=2, mc_dropout_passes=8))
    assert spread is not None and spread.shape == probs.shape
    assert (spread > 0.01).mean() > 0.5  # the passes differ almost everywhere
    assert not np.allclose(probs, plain)
    # The layers are back as they were: eval mode, own rate; the BatchNorm never trained.
    assert not model.training and not model.drop.training and model.drop.p == 0.5
    assert torch.equal(model.norm.running_mean, torch.zeros(1))
    assert int(model.norm.num_batches_tracked) == 0


def test_mc_dropout_is_seeded_and_leaves_the_global_rng_alone() -> None:
    options = PredictOptions(batch_size=2, mc_dropout_passes=4, mc_dropout_seed=3)
    model = _DropoutNet()  # built first: its initialisation draws from the global RNG
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = _rows(model, options)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = _rows(_DropoutNet(), options)
    other = _rows(_DropoutNet(), PredictOptions(batch_size=2, mc_dropout_passes=4))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[2], second[2])
    assert not np.array_equal(first[2], other[2])


def test_mc_dropout_rate_overrides_the_model_rate() -> None:
    low = _rows(_DropoutNet(), PredictOptions(mc_dropout_passes=8, mc_dropout_rate=0.05))[2]
    high = _rows(_DropoutNet(), PredictOptions(mc_dropout_passes=8, mc_dropout_rate=0.9))[2]
    assert high.mean() > low.mean()


def test_mc_dropout_on_a_model_without_dropout_says_so() -> None:
    with pytest.raises(SegflowError, match="has no dropout layer"):
        _rows(_RampNet(), PredictOptions(mc_dropout_passes=2))


def test_defaults_off_predict_rows_is_unchanged() -> None:
    images = _images()
    rows = np.arange(len(images))
    options = PredictOptions(tta="hflip", batch_size=2)
    masks, nonempty = predict_rows(_DropoutNet(), images, rows, [0.5], [0.25], options, CPU, 1)
    again, _, spread = _rows(_DropoutNet(), options, images)
    assert spread is None and nonempty is None and np.array_equal(masks, again)


def test_options_from_yaml_lists_are_tuples() -> None:
    assert PredictOptions(tta_scales=[0.75, 1.0]).tta_scales == (0.75, 1.0)


# --------------------------------------------------------------------------- uncertainty.npy


def _prediction(value: float, spread: float | None) -> Prediction:
    ids = pd.DataFrame({"id": ["a", "b"], "orig_height": [4, 4], "orig_width": [4, 4]})
    probs = np.full((2, 1, 4, 4), value, np.float16)
    maps = None if spread is None else np.full((2, 1, 4, 4), spread, np.float16)
    return Prediction(ids, probs, maps)


def test_uncertainty_is_written_read_merged_and_a_stale_map_removed(tmp_path: Path) -> None:
    first = _prediction(0.5, 0.1)
    write_prediction(tmp_path, first.ids, first.probs, first.uncertainty)
    back = read_prediction(tmp_path)
    assert back.uncertainty is not None and np.array_equal(back.uncertainty, first.uncertainty)
    merged = merge_fold_predictions([back, _prediction(0.5, 0.3)], "mean")
    assert merged.uncertainty is not None and np.allclose(merged.uncertainty, 0.2, atol=1e-3)
    assert merge_fold_predictions([back, _prediction(0.5, None)], "mean").uncertainty is None
    write_prediction(tmp_path, first.ids, first.probs)  # MC-dropout switched off
    assert not (tmp_path / UNCERTAINTY).exists() and read_prediction(tmp_path).uncertainty is None
    with pytest.raises(SegflowError, match="differs from the probabilities"):
        write_prediction(tmp_path, first.ids, first.probs, first.probs[:1])
