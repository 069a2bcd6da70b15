"""Tests for the weighted loss terms and OHEM (segflow.model.training.losses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.ndimage import distance_transform_edt

from segflow.core.errors import SegflowError
from segflow.model.distances import batch_distances, mask_distances
from segflow.model.training.losses import (
    DISTANCE_TERMS,
    LOSSES,
    PIXELWISE,
    TERM_DEFAULTS,
    TERM_OPTIONS,
    WeightedLoss,
    build_loss,
    ohem_count,
    parse_loss,
)
from segflow.model.training.mixing import DISTANCE_TERMS as MIXING_DISTANCE_TERMS

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


def _call(loss: WeightedLoss, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss(logits, target)``, with the target's distance maps when a term needs them."""
    distances = batch_distances(target) if loss.needs_distances else None
    return loss(logits, target, distances)


# Terms that are not 0 at a right prediction: boundary is signed (mean of p x the signed distance,
# negative when right); active_contour keeps the length of the right mask's contour.
NOT_ZERO_WHEN_RIGHT = ("boundary", "active_contour")


# --------------------------------------------------------------------------- each term


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("name", [name for name in LOSSES if name not in NOT_ZERO_WHEN_RIGHT])
def test_term_is_zero_when_right_and_large_when_inverted(name: str, mode: str) -> None:
    target = _target(channels=1 if mode == "binary" else 3)
    loss = build_loss({name: 1.0}, mode=mode)
    perfect = _call(loss, _perfect(target), target)
    uncertain = _call(loss, torch.zeros_like(target), target)
    inverted = _call(loss, -_perfect(target), target)
    assert 0 <= perfect.item() < 1e-4
    assert inverted.item() > 0.9  # region terms saturate at 1, pixel-wise ones grow with |logit|
    assert perfect.item() < uncertain.item() < inverted.item()
    assert loss.last_terms == {name: pytest.approx(inverted.item())}


@pytest.mark.parametrize("name", [name for name in LOSSES if name != "boundary"])
def test_term_is_non_negative_on_random_logits(name: str) -> None:
    loss = build_loss({name: 1.0})
    for _ in range(3):
        assert _call(loss, torch.randn(2, 1, 16, 16) * 3, _target()).item() >= 0


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
    _call(loss, logits, target).backward()
    assert logits.grad.shape == (2, 3, 16, 16)
    assert torch.isfinite(logits.grad).all()
    # Per-channel terms: a perfect channel 0 lowers each term versus a wrong one.
    better = logits.detach().clone()
    better[:, 0] = _perfect(target)[:, 0]
    _call(loss, better, target)
    improved = loss.last_terms
    _call(loss, logits.detach(), target)
    for name in LOSSES:
        if name != "active_contour":  # a right mask's contour may be longer than noise's
            assert improved[name] < loss.last_terms[name], name


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
    loss = build_loss({"bce": {"weight": 1, "pos_weight": [1.0, 2.0, 4.0]}}, mode="multilabel")
    pos_weight = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)
    expected = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- term options


def test_short_form_is_unchanged_and_equals_a_mapping_without_options() -> None:
    logits, target = torch.randn(2, 1, 8, 8), _target(size=8)
    plain = F.binary_cross_entropy_with_logits(logits, target)
    assert build_loss({"bce": 1})(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)
    as_mapping = build_loss({"bce": {"weight": 1}})(logits, target)
    assert as_mapping.item() == pytest.approx(plain.item(), rel=1e-6)
    # One canonical form, so both hash alike (resume) and old configs keep their hash.
    assert parse_loss({"bce": 1}) == parse_loss({"bce": {"weight": 1}}) == {"bce": 1.0}
    assert parse_loss({"focal": {"weight": 2, "gamma": 1}}) == {
        "focal": {"weight": 2.0, "gamma": 1.0}
    }


def test_bce_pos_weight_is_the_weighted_log_likelihood() -> None:
    logits, target = torch.randn(2, 1, 8, 8), _target(size=8)
    loss = build_loss({"bce": {"weight": 2, "pos_weight": 3.0}})
    prob = torch.sigmoid(logits)
    direct = -(3.0 * target * prob.log() + (1 - target) * (1 - prob).log()).mean()
    assert loss(logits, target).item() == pytest.approx(2 * direct.item(), rel=1e-5)
    assert loss.last_terms["bce"] == pytest.approx(direct.item(), rel=1e-5)
    assert direct.item() > F.binary_cross_entropy_with_logits(logits, target).item() * 1.2


def test_ohem_keeps_the_hardest_pos_weighted_pixels() -> None:
    # The weight applies per pixel before mining: tripled positives are picked more often.
    logits, target = torch.randn(2, 1, 8, 8), _target(size=8)
    loss = build_loss({"bce": {"weight": 1, "pos_weight": 3.0}}, ohem_fraction=0.25)
    prob = torch.sigmoid(logits)
    per_pixel = -(3.0 * target * prob.log() + (1 - target) * (1 - prob).log()).flatten()
    expected = per_pixel.sort(descending=True).values[: ohem_count(128, 0.25)].mean()
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_gamma_and_alpha_follow_the_focal_formula() -> None:
    logits, target = torch.randn(2, 1, 8, 8) * 2, _target(size=8)
    prob = torch.sigmoid(logits)
    p_t = torch.where(target == 1, prob, 1 - prob)
    alpha_t = torch.where(target == 1, 0.25, 0.75)
    for gamma in (0.0, 1.0, 3.0):
        direct = -((1 - p_t) ** gamma * p_t.log()).mean()
        value = build_loss({"focal": {"weight": 1, "gamma": gamma}})(logits, target)
        assert value.item() == pytest.approx(direct.item(), rel=1e-4), gamma
        weighted = -(alpha_t * (1 - p_t) ** gamma * p_t.log()).mean()
        value = build_loss({"focal": {"weight": 1, "gamma": gamma, "alpha": 0.25}})(logits, target)
        assert value.item() == pytest.approx(weighted.item(), rel=1e-4), gamma
    # gamma 0 is plain BCE, which is never below the focal-weighted value (default gamma 2).
    gamma0 = build_loss({"focal": {"weight": 1, "gamma": 0}})(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert gamma0.item() == pytest.approx(bce.item(), rel=1e-5)
    assert build_loss({"focal": 1.0})(logits, target).item() < gamma0.item()


def test_tversky_alpha_beta_gamma_follow_the_tp_fp_fn_formula() -> None:
    logits, target = torch.randn(2, 1, 8, 8) * 2, _target(size=8)
    prob = torch.sigmoid(logits)
    tp = (prob * target).sum()
    fp = (prob * (1 - target)).sum()
    fn = ((1 - prob) * target).sum()
    for alpha, beta, gamma in ((0.3, 0.7, 1.0), (0.7, 0.3, 1.0), (0.3, 0.7, 0.75)):
        direct = (1 - tp / (tp + alpha * fp + beta * fn)) ** gamma
        options = {"weight": 1, "alpha": alpha, "beta": beta, "gamma": gamma}
        value = build_loss({"tversky": options})(logits, target)
        assert value.item() == pytest.approx(direct.item(), rel=1e-4), (alpha, beta, gamma)
    # alpha = beta = 0.5 is Dice; the default, 0.3/0.7, is not.
    dice = build_loss({"dice": 1})(logits, target).item()
    halves = build_loss({"tversky": {"weight": 1, "alpha": 0.5, "beta": 0.5}})(logits, target)
    assert halves.item() == pytest.approx(dice, rel=1e-5)
    default = build_loss({"tversky": 1})(logits, target)
    skewed = build_loss({"tversky": {"weight": 1, "alpha": 0.3, "beta": 0.7}})(logits, target)
    assert default.item() == pytest.approx(skewed.item(), rel=1e-6)
    assert abs(default.item() - dice) > 1e-3


def test_tversky_alpha_weighs_false_positives_and_beta_false_negatives() -> None:
    """On one mask, a prediction with extra pixels (FP) and one missing as many (FN): a larger
    alpha penalises the FP-heavy one more, a larger beta the FN-heavy one."""
    target = torch.zeros(1, 1, 4, 4)
    target[..., :3, :] = 1  # 12 mask pixels
    over, under = target.clone(), target.clone()
    over[..., 3, :] = 1  # the mask + 4 false positives (TP 12)
    under[..., 2, :] = 0  # the mask - 4 false negatives (TP 8)
    logits = {"fp": (2 * over - 1) * CONFIDENT, "fn": (2 * under - 1) * CONFIDENT}

    def loss(alpha: float, beta: float, kind: str) -> float:
        term = {"tversky": {"weight": 1, "alpha": alpha, "beta": beta}}
        return build_loss(term)(logits[kind], target).item()

    # Exact at these logits: 1 - 12 / (12 + 4 alpha) and 1 - 8 / (8 + 4 beta).
    assert loss(0.7, 0.3, "fp") == pytest.approx(1 - 12 / (12 + 4 * 0.7), rel=1e-5)
    assert loss(0.7, 0.3, "fn") == pytest.approx(1 - 8 / (8 + 4 * 0.3), rel=1e-5)
    assert loss(0.7, 0.3, "fp") > loss(0.3, 0.7, "fp")
    assert loss(0.3, 0.7, "fn") > loss(0.7, 0.3, "fn")
    # The default (alpha 0.3, beta 0.7) penalises missing pixels more than extra ones.
    default = {kind: build_loss({"tversky": 1})(logits[kind], target).item() for kind in logits}
    assert default["fn"] > default["fp"]
    assert default["fn"] == pytest.approx(loss(0.3, 0.7, "fn"), rel=1e-6)


def test_tversky_defaults_enter_the_canonical_form() -> None:
    """segflow's defaults differ from smp's, so they are written out: the resume hash and
    metrics.json say what the model trained with, and both spellings hash alike."""
    assert TERM_DEFAULTS == {"tversky": {"alpha": 0.3, "beta": 0.7}, "smooth_l1": {"beta": 0.1}}
    for name, defaults in TERM_DEFAULTS.items():
        assert set(defaults) <= set(TERM_OPTIONS[name]), name
        assert all(TERM_OPTIONS[name][k].check(v) for k, v in defaults.items()), name
    explicit = {"tversky": {"weight": 2.0, "alpha": 0.3, "beta": 0.7}}
    assert parse_loss({"tversky": 2}) == parse_loss({"tversky": {"weight": 2}}) == explicit
    assert parse_loss({"tversky": {"weight": 1, "beta": 0.9, "gamma": 0.75}}) == {
        "tversky": {"weight": 1.0, "alpha": 0.3, "beta": 0.9, "gamma": 0.75}
    }
    assert parse_loss(parse_loss({"tversky": 1})) == parse_loss({"tversky": 1})


@pytest.mark.parametrize("name", ["dice", "jaccard"])
def test_log_loss_and_smooth_follow_the_score_formula(name: str) -> None:
    logits, target = torch.randn(2, 1, 8, 8) * 2, _target(size=8)
    prob = torch.sigmoid(logits)
    intersection, total = (prob * target).sum(), (prob + target).sum()

    def score(smooth: float) -> torch.Tensor:
        # smp: (TP + smooth) / (TP + a FP + b FN + smooth), a = b = 1/2 (dice) or 1 (jaccard).
        if name == "dice":
            return (intersection + smooth) / (total / 2 + smooth)
        return (intersection + smooth) / (total - intersection + smooth)

    log_loss = build_loss({name: {"weight": 1, "log_loss": True}})(logits, target)
    assert log_loss.item() == pytest.approx(-score(0.0).log().item(), rel=1e-5)
    assert build_loss({name: 1})(logits, target).item() == pytest.approx(
        1 - score(0.0).item(), rel=1e-5
    )
    smoothed = build_loss({name: {"weight": 1, "smooth": 10.0}})(logits, target)
    assert smoothed.item() == pytest.approx(1 - score(10.0).item(), rel=1e-5)
    assert abs(smoothed.item() - (1 - score(0.0).item())) > 1e-3


def _lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of flattened pixels: sorted hinge errors dot the Jaccard loss increments."""
    logits, target = logits.flatten(), target.flatten()
    errors = 1 - logits * (2 * target - 1)
    errors, order = errors.sort(descending=True)
    labels = target[order]
    positives = labels.sum()
    jaccard = 1 - (positives - labels.cumsum(0)) / (positives + (1 - labels).cumsum(0))
    increments = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return (errors.clamp_min(0) * increments).sum()


def test_lovasz_per_image_is_the_mean_of_per_image_losses() -> None:
    # Planted: image 0 has a large mask predicted right, image 1 a small mask predicted wrong.
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, :, :4] = 1
    target[1, :, 0, 0] = 1
    logits = (2 * target - 1) * 2.0
    logits[1, :, 0, 0] = -1.0
    logits[1, :, 7, 7] = 0.5
    batch = build_loss({"lovasz": 1})(logits, target).item()
    per_image = build_loss({"lovasz": {"weight": 1, "per_image": True}})(logits, target).item()
    assert batch == pytest.approx(_lovasz_hinge(logits, target).item(), rel=1e-5)
    expected = (_lovasz_hinge(logits[0], target[0]) + _lovasz_hinge(logits[1], target[1])) / 2
    assert per_image == pytest.approx(expected.item(), rel=1e-5)
    # The batch loss dilutes image 1's error among image 0's many right pixels.
    assert per_image > 2 * batch


def test_each_term_option_is_registered_in_the_schema() -> None:
    schema_path = Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    loss = schema["properties"]["experiments"]["additionalProperties"]["properties"]["loss"]
    assert set(loss["properties"]) == set(LOSSES) == set(TERM_OPTIONS)
    for name, options in TERM_OPTIONS.items():
        assert list(loss["properties"][name]["properties"]) == ["weight", *options], name
    # The workflow's config check accepts both forms and names a misspelt option in one line.
    from segflow.core.config_check import check_config

    config = yaml.safe_load((schema_path.parents[2] / "config" / "config.yaml").read_text())
    experiment = config["experiments"]["unet_lite0"]
    experiment["loss"] = {"bce": {"weight": 1, "pos_weight": [3.0]}, "lovasz": 1}
    check_config(config, schema_path)
    experiment["loss"] = {"focal": {"weight": 1, "gama": 2}}
    with pytest.raises(
        SegflowError, match=r"unknown key experiments\.unet_lite0\.loss\.focal\.gama"
    ):
        check_config(config, schema_path)
    # An option the term does not have, with none close: the valid keys are listed.
    experiment["loss"] = {"dice": {"weight": 1, "per_image": True}}
    with pytest.raises(
        SegflowError,
        match=r"^invalid config: unknown key experiments\.unet_lite0\.loss\.dice\.per_image "
        r"\(valid: weight, log_loss, smooth\)$",
    ):
        check_config(config, schema_path)
    experiment["loss"] = {"bce": {"weight": 1, "pos_weight": 0}}
    with pytest.raises(SegflowError, match=r"experiments\.unet_lite0\.loss\.bce\.pos_weight: 0"):
        check_config(config, schema_path)


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


def test_unknown_option_names_the_key_and_lists_the_terms_options() -> None:
    with pytest.raises(SegflowError) as info:
        parse_loss({"dice": {"weight": 1, "smoth": 1.0}}, "experiments.fpn.loss")
    message = str(info.value)
    assert message == (
        "experiments.fpn.loss.dice.smoth: unknown option; valid for dice: weight, log_loss, smooth"
    )
    # Options segflow sets itself are not options of a term either.
    for name, option in (("dice", "mode"), ("bce", "reduction"), ("focal", "class_weights")):
        with pytest.raises(SegflowError, match=rf"^loss\.{name}\.{option}: unknown option; "):
            build_loss({name: {"weight": 1, option: 1}})


@pytest.mark.parametrize(
    ("term", "pattern"),
    [
        ({"bce": {"weight": -1}}, r"loss\.bce: weight must be finite and >= 0, got -1"),
        ({"bce": {"weight": "1"}}, r"loss\.bce: weight must be a number"),
        ({"bce": {"pos_weight": 2}}, r"loss\.bce\.weight: missing"),
        ({"bce": {"weight": 1, "pos_weight": 0}}, r"loss\.bce\.pos_weight: must be a number > 0"),
        ({"bce": {"weight": 1, "pos_weight": -2.0}}, r"loss\.bce\.pos_weight: must be"),
        ({"bce": {"weight": 1, "pos_weight": [1, 0]}}, r"loss\.bce\.pos_weight: must be"),
        ({"bce": {"weight": 1, "pos_weight": [1, 2]}}, r"2 values for 1 mask class"),
        ({"focal": {"weight": 1, "gamma": -0.5}}, r"loss\.focal\.gamma: must be a number >= 0"),
        ({"focal": {"weight": 1, "alpha": 1.5}}, r"loss\.focal\.alpha: must be a number in"),
        ({"lovasz": {"weight": 1, "per_image": "yes"}}, r"per_image: must be true or false"),
        ({"dice": {"weight": 1, "log_loss": 1}}, r"loss\.dice\.log_loss: must be true or false"),
        ({"jaccard": {"weight": 1, "smooth": -1}}, r"loss\.jaccard\.smooth: must be a number"),
        ({"tversky": {"weight": 1, "gamma": 0}}, r"loss\.tversky\.gamma: must be a number > 0"),
        ({"tversky": {"weight": 1, "alpha": 0, "beta": 0}}, r"loss\.tversky\.beta: alpha \+ beta"),
        ({"tversky": {"weight": 1, "alpha": -0.1}}, r"loss\.tversky\.alpha: must be a number >= 0"),
        ({"tversky": {"weight": 1, "beta": -1}}, r"loss\.tversky\.beta: must be a number >= 0"),
        ({"tversky": {"weight": 1, "beta": float("inf")}}, r"loss\.tversky\.beta: must be"),
    ],
)
def test_bad_option_values_give_one_line(term: dict, pattern: str) -> None:
    with pytest.raises(SegflowError, match=pattern) as info:
        build_loss(term)
    assert "\n" not in str(info.value)


def test_pixelwise_names_are_registered() -> None:
    assert set(PIXELWISE) <= set(LOSSES)
    assert build_loss({"bce": 1.0}).last_terms == {}


# --------------------------------------------------------------------------- segflow's own terms
# Each against a numpy reference of its formula on a small planted case (distances from scipy's
# exact EDT, independent of the OpenCV maps segflow computes), and a planted case whose value or
# gradient must move in the known direction (a no-op term would fail it).


def _edt(mask: np.ndarray) -> np.ndarray:
    """scipy's distance of each nonzero pixel to the nearest zero pixel (0 at zero pixels)."""
    return distance_transform_edt(mask).astype(np.float64)


def _np_sigmoid(logits: torch.Tensor) -> np.ndarray:
    return 1 / (1 + np.exp(-logits.double().numpy()))


def _planted() -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, target) of shape (2, 1, 12, 12): a square and an L-shaped mask, random logits."""
    target = torch.zeros(2, 1, 12, 12)
    target[0, 0, 3:8, 4:9] = 1
    target[1, 0, 2:10, 2:5] = 1
    target[1, 0, 7:10, 2:10] = 1
    return torch.randn(2, 1, 12, 12) * 2, target


def _signed_np(g: np.ndarray) -> np.ndarray:
    """Kervadec et al.'s one_hot2dist of one plane: outside distance, -(inside - 1) inside."""
    if not g.any() or g.all():
        return np.zeros(g.shape)
    return _edt(~g) * ~g - (_edt(g) - 1) * g


def _unsigned_np(g: np.ndarray) -> np.ndarray:
    if not g.any() or g.all():
        return np.zeros(g.shape)
    return _edt(g) + _edt(~g)


def test_distance_maps_match_scipy_and_are_zero_without_a_boundary() -> None:
    _, target = _planted()
    maps = mask_distances(target[1].numpy())
    g = target[1, 0].numpy().astype(bool)
    assert maps.shape == (2, 1, 12, 12) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[0, 0], _edt(g), atol=1e-4)
    np.testing.assert_allclose(maps[1, 0], _edt(~g), atol=1e-4)
    for plane in (np.zeros((1, 5, 5)), np.ones((1, 5, 5))):
        assert not mask_distances(plane).any()
    # Soft targets (pseudo-labels) are masks where > 0.5; batches keep their device and shape.
    np.testing.assert_array_equal(mask_distances(target[1].numpy() * 0.9), maps)
    assert batch_distances(target).shape == (2, 2, 1, 12, 12)


def test_boundary_matches_kervadec_and_moves_probability_by_distance() -> None:
    logits, target = _planted()
    loss = build_loss({"boundary": 1.0})
    value = _call(loss, logits, target).item()
    prob = _np_sigmoid(logits)
    phi = np.stack([_signed_np(t[0].numpy().astype(bool)) for t in target])[:, None]
    assert value == pytest.approx(float((prob * phi).mean()), rel=1e-5)
    # The gradient pushes probability out of the background, the more the farther from the mask,
    # and into the mask's interior (0 on its inner boundary).
    logits = torch.zeros(2, 1, 12, 12, requires_grad=True)
    _call(loss, logits, target).backward()
    grad = logits.grad[0, 0]
    assert grad[0, 0] > grad[2, 6] > 0  # far background > next to the mask
    assert grad[5, 6] < 0 and grad[3, 6] == 0  # mask centre; the inner boundary
    # A prediction on the mask beats the same square shifted away.
    right = _perfect(target)
    shifted = torch.roll(right, shifts=(3, 3), dims=(2, 3))
    assert _call(loss, right, target).item() < _call(loss, shifted, target).item()


def test_hausdorff_matches_karimi_and_weighs_errors_by_distance() -> None:
    logits, target = _planted()
    for alpha in (2.0, 1.0):
        loss = build_loss({"hausdorff": {"weight": 1, "alpha": alpha}})
        prob = _np_sigmoid(logits)
        g = target.numpy().astype(bool)
        d_g = np.stack([_unsigned_np(plane[0]) for plane in g])[:, None]
        d_p = np.stack([_unsigned_np(plane[0] > 0.5) for plane in prob])[:, None]
        expected = ((prob - target.numpy()) ** 2 * (d_g**alpha + d_p**alpha)).mean()
        assert _call(loss, logits, target).item() == pytest.approx(float(expected), rel=1e-5)
    # One false-positive pixel costs more far from the mask than next to it (BCE: the same).
    loss = build_loss({"hausdorff": 1.0})
    near, far = _perfect(target), _perfect(target)
    near[0, 0, 2, 6] = CONFIDENT
    far[0, 0, 11, 11] = CONFIDENT
    assert _call(loss, far, target).item() > 5 * _call(loss, near, target).item() > 0


def test_active_contour_matches_chen_and_penalises_a_ragged_contour() -> None:
    logits, target = _planted()
    for lam in (1.0, 3.0):
        loss = build_loss({"active_contour": {"weight": 1, "lambda": lam}})
        p, g = _np_sigmoid(logits), target.numpy().astype(np.float64)
        dx, dy = np.diff(p, axis=2), np.diff(p, axis=3)
        length = np.sqrt(dx[:, :, 1:, :-2] ** 2 + dy[:, :, :-2, 1:] ** 2 + 1e-8).sum()
        region = (p * (g - 1) ** 2).sum() + ((1 - p) * g**2).sum()
        expected = (length + lam * region) / p.size
        assert _call(loss, logits, target).item() == pytest.approx(float(expected), rel=1e-5)
    # Length alone (lambda 0): a checkerboard prediction's contour is longer than a square's.
    length_only = build_loss({"active_contour": {"weight": 1, "lambda": 0}})
    checker = (torch.arange(12)[:, None] + torch.arange(12)[None, :]) % 2
    ragged = (2 * checker.float() - 1).expand(2, 1, 12, 12) * CONFIDENT
    assert (
        _call(length_only, ragged, target).item()
        > 3 * _call(length_only, _perfect(target), target).item()
    )
    # The region term moves the value with the overlap: inverted costs more than right.
    loss = build_loss({"active_contour": 1.0})
    assert (
        _call(loss, -_perfect(target), target).item()
        > _call(loss, _perfect(target), target).item() + 0.5
    )


def test_sens_spec_matches_brosch_and_r_weighs_missed_mask_pixels() -> None:
    logits, target = _planted()
    prob, g = _np_sigmoid(logits), target.numpy().astype(np.float64)
    squared = (g - prob) ** 2
    for r in (0.05, 0.5, 1.0):
        expected = (
            r * (squared * g).sum() / g.sum() + (1 - r) * (squared * (1 - g)).sum() / (1 - g).sum()
        )
        value = _call(build_loss({"sens_spec": {"weight": 1, "r": r}}), logits, target).item()
        assert value == pytest.approx(float(expected), rel=1e-5), r
    assert parse_loss({"sens_spec": 1}) == {"sens_spec": 1.0}
    # Missing 4 mask pixels versus 4 false positives: a large r makes the misses cost more.
    missed, extra = _perfect(target), _perfect(target)
    missed[0, 0, 3, 4:8] = -CONFIDENT
    extra[0, 0, 0, 0:4] = CONFIDENT

    def ss(r: float, logits: torch.Tensor) -> float:
        return _call(build_loss({"sens_spec": {"weight": 1, "r": r}}), logits, target).item()

    assert ss(0.9, missed) > ss(0.9, extra) and ss(0.05, extra) > ss(0.05, missed)


def test_dice_positive_ignores_empty_images_and_matches_per_image_dice() -> None:
    logits, target = _planted()
    target[1] = 0  # image 1 empty
    loss = build_loss({"dice_positive": 1.0})
    prob = _np_sigmoid(logits)[0, 0]
    g = target[0, 0].numpy()
    expected = 1 - 2 * (prob * g).sum() / (prob.sum() + g.sum())
    assert _call(loss, logits, target).item() == pytest.approx(float(expected), rel=1e-5)
    smoothed = build_loss({"dice_positive": {"weight": 1, "smooth": 5.0}})
    expected = 1 - (2 * (prob * g).sum() + 5) / (prob.sum() + g.sum() + 5)
    assert _call(smoothed, logits, target).item() == pytest.approx(float(expected), rel=1e-5)
    # Predictions on the empty image do not move it; on the positive image they do.
    changed = logits.clone()
    changed[1] += 5
    assert _call(loss, changed, target).item() == pytest.approx(_call(loss, logits, target).item())
    changed[0] += 5
    assert abs(_call(loss, changed, target).item() - _call(loss, logits, target).item()) > 1e-3
    # A batch without any mask: 0, and backward still works.
    empty = torch.zeros_like(target)
    logits.requires_grad_()
    value = _call(loss, logits, empty)
    value.backward()
    assert value.item() == 0 and not logits.grad.any()


def test_mse_and_smooth_l1_on_probabilities() -> None:
    logits, target = _planted()
    error = np.abs(_np_sigmoid(logits) - target.numpy())
    mse = _call(build_loss({"mse": 1.0}), logits, target).item()
    assert mse == pytest.approx(float((error**2).mean()), rel=1e-5)
    for beta in (0.1, 0.3):
        huber = np.where(error < beta, 0.5 * error**2 / beta, error - 0.5 * beta).mean()
        value = _call(build_loss({"smooth_l1": {"weight": 1, "beta": beta}}), logits, target)
        assert value.item() == pytest.approx(float(huber), rel=1e-5), beta
    # The default (beta 0.1) is written out; torch's beta 1 would be half the MSE here.
    assert parse_loss({"smooth_l1": 1}) == {"smooth_l1": {"weight": 1.0, "beta": 0.1}}
    one = _call(build_loss({"smooth_l1": {"weight": 1, "beta": 1.0}}), logits, target).item()
    assert one == pytest.approx(mse / 2, rel=1e-5)
    default = _call(build_loss({"smooth_l1": 1.0}), logits, target).item()
    assert abs(default - mse / 2) > 1e-2
    # Pixel-wise: OHEM keeps the hardest pixels.
    mined = _call(build_loss({"mse": 1.0}, ohem_fraction=0.1), logits, target).item()
    assert mined > 2 * mse


def test_distance_bce_matches_the_penalty_map_and_weighs_boundary_errors_more() -> None:
    logits, target = _planted()
    loss = build_loss({"distance_bce": 1.0})
    weights = []
    for plane in target.numpy().astype(bool)[:, 0]:
        inside, outside = _edt(plane), _edt(~plane)
        weights.append(
            1
            + (inside.max() - inside) / inside.max() * plane
            + (outside.max() - outside) / outside.max() * ~plane
        )
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").double().numpy()
    expected = (bce * np.stack(weights)[:, None]).mean()
    assert _call(loss, logits, target).item() == pytest.approx(float(expected), rel=1e-5)
    # One wrong pixel next to the mask costs more than one in the far corner (BCE: the same).
    near, far = _perfect(target) / 2, _perfect(target) / 2
    near[0, 0, 2, 6] = 10.0
    far[0, 0, 11, 11] = 10.0
    plain = build_loss({"bce": 1.0})
    assert _call(plain, near, target).item() == pytest.approx(_call(plain, far, target).item())
    assert _call(loss, near, target).item() > 1.2 * _call(loss, far, target).item()


def test_distance_terms_need_the_maps_in_one_line() -> None:
    logits, target = _planted()
    loss = build_loss({"bce": 1.0, "boundary": 1.0, "distance_bce": 1.0})
    assert loss.needs_distances and not build_loss({"bce": 1.0, "mse": 1.0}).needs_distances
    with pytest.raises(ValueError, match=r"^loss: the boundary, distance_bce term\(s\) need") as e:
        loss(logits, target)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"distance maps of shape \(2, 1, 12, 12\), expected"):
        loss(logits, target, target)
    assert set(DISTANCE_TERMS) <= set(LOSSES) and set(PIXELWISE) <= set(LOSSES)
    assert MIXING_DISTANCE_TERMS == DISTANCE_TERMS


def test_multilabel_distance_terms_are_per_channel() -> None:
    """Two channels: each term equals the mean of its one-channel values (equal plane sizes)."""
    logits, target = _planted()
    both_logits = torch.cat([logits[:1], logits[1:]], dim=1)  # (1, 2, 12, 12)
    both_target = torch.cat([target[:1], target[1:]], dim=1)
    for name in ("boundary", "hausdorff", "distance_bce", "mse", "active_contour"):
        multi = build_loss({name: 1.0}, mode="multilabel")
        single = build_loss({name: 1.0})
        expected = np.mean(
            [_call(single, logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
        )
        assert _call(multi, both_logits, both_target).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- warm-up ramps


def test_ramp_goes_from_start_to_weight_and_changes_the_total() -> None:
    config = {"bce": 1.0, "boundary": {"weight": 2.0, "ramp_epochs": 4, "start_weight": 0.4}}
    loss = build_loss(config)
    assert [loss.weight_at("boundary", e) for e in (1, 2, 3, 5, 9)] == pytest.approx(
        [0.4, 0.8, 1.2, 2.0, 2.0]
    )
    assert loss.weight_at("bce", 1) == 1.0
    logits, target = _planted()
    totals = {}
    for epoch in (1, 5):
        loss.set_epoch(epoch)
        totals[epoch] = _call(loss, logits, target).item()
        terms = loss.last_terms
        assert totals[epoch] == pytest.approx(
            terms["bce"] + loss.weight_at("boundary") * terms["boundary"], rel=1e-5
        )
    assert totals[1] != pytest.approx(totals[5])
    # A ramp from 0: at epoch 1 the term is logged but gives no gradient.
    ramped = build_loss({"bce": 1.0, "hausdorff": {"weight": 1.0, "ramp_epochs": 2}})
    plain = build_loss({"bce": 1.0})
    grads = []
    for module in (ramped, plain):
        leaf = logits.clone().requires_grad_()
        _call(module, leaf, target).backward()
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1]) and ramped.last_terms["hausdorff"] > 0


def test_ramp_canonical_forms_and_errors() -> None:
    # No ramp (0) hashes like no option; a ramp fills in start_weight 0; epochs stay integers.
    assert parse_loss({"boundary": {"weight": 1, "ramp_epochs": 0}}) == {"boundary": 1.0}
    assert parse_loss({"bce": 1, "boundary": {"weight": 1, "ramp_epochs": 10}}) == {
        "bce": 1.0,
        "boundary": {"weight": 1.0, "ramp_epochs": 10, "start_weight": 0.0},
    }
    cases = [
        ({"boundary": {"weight": 1, "start_weight": 0.5}}, r"loss\.boundary\.start_weight: needs"),
        ({"boundary": {"weight": 1, "ramp_epochs": 1.5}}, r"ramp_epochs: must be an integer >= 0"),
        ({"boundary": {"weight": 1, "ramp_epochs": -1}}, r"ramp_epochs: must be an integer >= 0"),
        (
            {"dice": {"weight": 1, "ramp_epochs": 3}},
            r"^loss\.dice\.ramp_epochs: unknown option; valid for dice: weight, log_loss, smooth$",
        ),
        ({"boundary": {"weight": 1, "ramp_epochs": 3}}, r"every weight is 0 at epoch 1"),
        ({"hausdorff": {"weight": 1, "alpha": 0}}, r"loss\.hausdorff\.alpha: must be a number > 0"),
        ({"sens_spec": {"weight": 1, "r": 1.5}}, r"loss\.sens_spec\.r: must be a number in"),
        ({"active_contour": {"weight": 1, "lambda": -1}}, r"active_contour\.lambda: must be"),
        ({"smooth_l1": {"weight": 1, "beta": 0}}, r"loss\.smooth_l1\.beta: must be a number > 0"),
        ({"bose": 1}, r"valid: .*boundary, hausdorff, active_contour.*distance_bce"),
    ]
    for term, pattern in cases:
        with pytest.raises((SegflowError, KeyError), match=pattern) as info:
            build_loss(term)
        assert "\n" not in str(info.value)


def test_mixing_is_refused_with_distance_terms() -> None:
    from segflow.model.training.mixing import check_mixing_loss
    from segflow.model.training.train_options import TrainOptions

    check_mixing_loss(TrainOptions(), {"boundary": 1.0})
    check_mixing_loss(TrainOptions(cutmix_prob=0.5), {"bce": 1.0, "mse": 1.0})
    for key in ("mixup_prob", "cutmix_prob"):
        options = TrainOptions(**{key: 0.5})
        with pytest.raises(SegflowError, match=rf"^train\.{key}: the boundary loss term"):
            check_mixing_loss(options, {"bce": 1.0, "boundary": {"weight": 1.0}})
