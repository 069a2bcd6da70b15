"""Tests for the weighted loss terms and OHEM (segflow.model.training.losses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from segflow.core.errors import SegflowError
from segflow.model.training.losses import (
    LOSSES,
    PIXELWISE,
    TERM_DEFAULTS,
    TERM_OPTIONS,
    build_loss,
    ohem_count,
    parse_loss,
)

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
    assert TERM_DEFAULTS == {"tversky": {"alpha": 0.3, "beta": 0.7}}
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
