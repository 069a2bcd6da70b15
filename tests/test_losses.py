"""Tests for the weighted loss terms and OHEM (segflow.losses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segflow.errors import SegflowError
from segflow.losses import LOSSES, PIXELWISE, build_loss, ohem_count

CONFIDENT = 20.0  # logit magnitude that is "certain" for every term (lovasz needs > 1)


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _target(channels: int = 1, size: int = 16) -> torch.Tensor:
    """A (2, C, size, size) {0, 1} target with both classes present in every channel."""
    target = (torch.rand(2, channels, size, size) > 0.6).float()
    target[:, :, 0, 0], target[:, :, 0, 1] = 1.0, 0.0
    return target


def _perfect(target: torch.Tensor) -> torch.Tensor:
    return (2 * target - 1) * CONFIDENT


# --------------------------------------------------------------------------- each term


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_term_is_zero_when_right_and_large_when_inverted(name: str, mode: str) -> None:
    target = _target(channels=1 if mode == "binary" else 3)
    loss = build_loss({name: 1.0}, mode=mode)
    perfect = loss(_perfect(target), target)
    uncertain = loss(torch.zeros_like(target), target)
    inverted = loss(-_perfect(target), target)
    assert 0 <= perfect.item() < 1e-4
    assert inverted.item() > 0.9  # region terms saturate at 1, pixel-wise ones grow with |logit|
    assert perfect.item() < uncertain.item() < inverted.item()
    assert loss.last_terms == {name: pytest.approx(inverted.item())}


@pytest.mark.parametrize("name", list(LOSSES))
def test_term_is_non_negative_on_random_logits(name: str) -> None:
    loss = build_loss({name: 1.0})
    for _ in range(3):
        assert loss(torch.randn(2, 1, 16, 16) * 3, _target()).item() >= 0


def test_terms_match_their_definitions() -> None:
    logits, target = torch.randn(2, 1, 16, 16), _target()
    loss = build_loss({"bce": 1.0, "dice": 1.0})
    loss(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1 - 2 * (prob * target).sum() / (prob.sum() + target.sum())
    assert loss.last_terms["bce"] == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-5
    )
    assert loss.last_terms["dice"] == pytest.approx(dice.item(), rel=1e-4)


def test_weighted_sum_equals_the_manual_sum_and_gradients_flow() -> None:
    weights = {"bce": 0.5, "dice": 1.0, "jaccard": 0.25, "lovasz": 2.0, "focal": 3.0, "tversky": 1}
    loss = build_loss(weights)
    logits, target = torch.randn(2, 1, 16, 16, requires_grad=True), _target()
    total = loss(logits, target)
    terms = loss.last_terms
    assert set(terms) == set(weights)
    assert total.item() == pytest.approx(sum(weights[n] * terms[n] for n in weights), rel=1e-5)
    # Each term on its own agrees with its value inside the sum.
    for name in weights:
        alone = build_loss({name: 1.0})(logits.detach(), target)
        assert alone.item() == pytest.approx(terms[name], rel=1e-5), name
    total.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_zero_weight_term_is_logged_but_not_trained_on() -> None:
    loss = build_loss({"bce": 0.0, "dice": 1.0})
    logits, target = torch.randn(2, 1, 16, 16, requires_grad=True), _target()
    total = loss(logits, target)
    assert loss.last_terms["bce"] > 0
    assert total.item() == pytest.approx(loss.last_terms["dice"])
    total.backward()
    dice_only = logits.detach().clone().requires_grad_()
    build_loss({"dice": 1.0})(dice_only, target).backward()
    assert torch.allclose(logits.grad, dice_only.grad)


def test_multilabel_mode() -> None:
    target = _target(channels=3)
    loss = build_loss({name: 1.0 for name in LOSSES}, mode="multilabel")
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss(logits, target).backward()
    assert logits.grad.shape == (2, 3, 16, 16)
    # Per-channel terms: a perfect channel 0 lowers dice versus a wrong one.
    better = logits.detach().clone()
    better[:, 0] = _perfect(target)[:, 0]
    loss(better, target)
    improved = loss.last_terms["dice"]
    loss(logits.detach(), target)
    assert improved < loss.last_terms["dice"]


def test_binary_target_without_channel_axis_and_dtypes() -> None:
    loss = build_loss({"bce": 1.0, "dice": 1.0})
    logits, target = torch.randn(2, 1, 16, 16), _target()
    expected = loss(logits, target).item()
    assert loss(logits, target[:, 0].to(torch.uint8)).item() == pytest.approx(expected)
    assert loss(logits.half(), target.bool()).item() == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ValueError, match="does not match"):
        loss(logits, target[:, :, :8])


def test_bce_pos_weight_per_class_broadcasts_over_channels() -> None:
    target = _target(channels=3)
    logits = torch.randn(2, 3, 16, 16)
    loss = build_loss({"bce": 1.0}, mode="multilabel", bce={"pos_weight": [1.0, 2.0, 4.0]})
    pos_weight = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)
    expected = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_term_options_are_passed() -> None:
    logits, target = torch.randn(2, 1, 16, 16), _target()
    gamma2 = build_loss({"focal": 1.0})(logits, target)
    gamma0 = build_loss({"focal": 1.0}, focal={"gamma": 0.0})(logits, target)
    # gamma 0 is plain BCE, which is never below the focal-weighted value.
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert gamma0.item() == pytest.approx(bce.item(), rel=1e-5)
    assert gamma2.item() < gamma0.item()


# --------------------------------------------------------------------------- OHEM


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_ohem_bce_keeps_the_hardest_pixels(fraction: float) -> None:
    logits, target = torch.randn(2, 1, 16, 16) * 2, _target()
    loss = build_loss({"bce": 1.0}, ohem_fraction=fraction)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten()
    k = round(fraction * per_pixel.numel())
    assert ohem_count(per_pixel.numel(), fraction) == k
    expected = per_pixel.sort(descending=True).values[:k].mean()
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    if fraction < 1:
        assert expected > per_pixel.mean()


def test_ohem_gradient_reaches_only_the_kept_pixels() -> None:
    logits = (torch.randn(2, 1, 16, 16) * 2).requires_grad_()
    target = _target()
    build_loss({"bce": 1.0}, ohem_fraction=0.25).forward(logits, target).backward()
    assert int((logits.grad != 0).sum()) == ohem_count(logits.numel(), 0.25) == 128


def test_ohem_applies_to_focal_but_not_to_region_terms() -> None:
    logits, target = torch.randn(2, 3, 16, 16), _target(channels=3)
    plain = build_loss({"focal": 1.0, "dice": 1.0}, mode="multilabel")
    mined = build_loss({"focal": 1.0, "dice": 1.0}, mode="multilabel", ohem_fraction=0.1)
    plain(logits, target)
    mined(logits, target)
    assert mined.last_terms["dice"] == pytest.approx(plain.last_terms["dice"])
    assert mined.last_terms["focal"] > 2 * plain.last_terms["focal"]
    per_pixel = build_loss({"focal": 1.0}, mode="multilabel").terms["focal"](logits, target)
    k = ohem_count(per_pixel.numel(), 0.1)
    expected = per_pixel.flatten().topk(k).values.mean()
    assert mined.last_terms["focal"] == pytest.approx(expected.item(), rel=1e-5)
    # Without OHEM the element-wise focal equals smp's multilabel focal (mean of class means).
    import segmentation_models_pytorch as smp

    reference = smp.losses.FocalLoss(mode="multilabel")(logits, target)
    assert plain.last_terms["focal"] == pytest.approx(reference.item(), rel=1e-5)


def test_ohem_count_edges() -> None:
    assert ohem_count(10, 0.01) == 1
    assert ohem_count(10, 1.0) == 10
    assert ohem_count(1000, 0.3) == 300


# --------------------------------------------------------------------------- errors


def test_unknown_term_lists_the_names() -> None:
    with pytest.raises(KeyError, match="unknown loss term 'dise'") as info:
        build_loss({"dise": 1.0})
    for name in LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ({}, "loss: give at least one term"),
        ({"bce": -1.0}, r"loss\.bce: weight must be finite and >= 0"),
        ({"bce": float("nan")}, r"loss\.bce: weight must be finite"),
        ({"bce": "1"}, r"loss\.bce: weight must be a number"),
        ({"bce": 0.0, "dice": 0}, "every weight is 0"),
    ],
)
def test_bad_weights(weights: dict, pattern: str) -> None:
    with pytest.raises(SegflowError, match=pattern):
        build_loss(weights)


def test_bad_mode_options_and_ohem() -> None:
    with pytest.raises(SegflowError, match=r"loss\.mode: unknown mode 'multiclass'"):
        build_loss({"dice": 1.0}, mode="multiclass")
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(SegflowError, match=r"loss\.ohem_fraction must be in \(0, 1\]"):
            build_loss({"bce": 1.0}, ohem_fraction=fraction)
    with pytest.raises(SegflowError, match=r"loss\.ohem_fraction applies to the pixel-wise"):
        build_loss({"dice": 1.0, "lovasz": 1.0}, ohem_fraction=0.5)
    with pytest.raises(SegflowError, match=r"loss\.focal: options given for a term"):
        build_loss({"bce": 1.0}, focal={"gamma": 1.0})
    with pytest.raises(SegflowError, match=r"loss\.dice\.mode: set by segflow"):
        build_loss({"dice": 1.0}, dice={"mode": "multiclass"})
    with pytest.raises(SegflowError, match=r"loss\.dice: invalid options"):
        build_loss({"dice": 1.0}, dice={"smoth": 1.0})
    with pytest.raises(SegflowError, match=r"loss\.focal\.class_weights"):
        build_loss(
            {"focal": 1.0}, mode="multilabel", ohem_fraction=0.5, focal={"class_weights": [1, 2]}
        )


def test_pixelwise_names_are_registered() -> None:
    assert set(PIXELWISE) <= set(LOSSES)
    assert build_loss({"bce": 1.0}).last_terms == {}
