"""Training losses: a weighted sum of named terms on mask logits, with optional OHEM.

Terms (:data:`LOSSES`): ``bce`` (torch ``BCEWithLogitsLoss``) and the smp losses ``dice``,
``jaccard``, ``lovasz`` (hinge), ``focal`` and ``tversky``, all on logits, in smp's ``binary``
mode (one mask channel) or ``multilabel`` mode (C independent mask channels). The config gives
each term a weight, e.g. ``{"bce": 1.0, "dice": 1.0}``, or a weight and options of that term,
e.g. ``{"bce": {"weight": 1.0, "pos_weight": 3.0}}`` (:data:`TERM_OPTIONS` lists them); the
loss is the weighted sum and the unweighted value of every term is kept for logging
(:attr:`WeightedLoss.last_terms`).

Online hard example mining (``ohem_fraction``) keeps only the hardest fraction of pixels of the
batch in the *pixel-wise* terms (bce, focal): their per-pixel losses (with their options, e.g.
bce's ``pos_weight``) are averaged over the top ``ohem_count(n, fraction)`` values instead of all
``n``. Region terms (dice, jaccard, lovasz, tversky) are a single ratio or ranking over the whole
mask, so they have no per-pixel value to select from and always see every pixel.

Tversky's score is ``TP / (TP + alpha FP + beta FN)``: ``alpha`` weighs false positives,
``beta`` false negatives. At alpha = beta = 0.5 it is Dice, so segflow's default is
alpha = 0.3, beta = 0.7 (Salehi et al. 2017, common Kaggle practice: missed mask pixels cost
more than extra ones), not smp's 0.5/0.5 (:data:`TERM_DEFAULTS`).

Note (smp): dice, jaccard and tversky score a channel 0 when its target is empty in the whole
batch (the overlap ratio is undefined there), so pair them with a pixel-wise term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from segflow.core.errors import SegflowError

LOSSES: dict[str, type[nn.Module]] = {
    "bce": nn.BCEWithLogitsLoss,
    "dice": smp.losses.DiceLoss,
    "jaccard": smp.losses.JaccardLoss,
    "lovasz": smp.losses.LovaszLoss,
    "focal": smp.losses.FocalLoss,
    "tversky": smp.losses.TverskyLoss,
}
PIXELWISE = ("bce", "focal")
MODES = ("binary", "multilabel")

# A loss config: term name -> weight, or -> {"weight": w, <option>: value, ...}.
LossConfig = Mapping[str, Any]


@dataclass(frozen=True)
class TermOption:
    """One constructor option of a loss term: its check and what it must be (for errors)."""

    check: Callable[[Any], bool]
    requirement: str


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


_BOOL = TermOption(lambda v: isinstance(v, bool), "true or false")
_NON_NEGATIVE = TermOption(lambda v: _is_number(v) and v >= 0, "a number >= 0")
_POSITIVE = TermOption(lambda v: _is_number(v) and v > 0, "a number > 0")
_UNIT = TermOption(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
_POSITIVE_PER_CLASS = TermOption(
    lambda v: (
        _POSITIVE.check(v)
        or (isinstance(v, list | tuple) and len(v) > 0 and all(_POSITIVE.check(x) for x in v))
    ),
    "a number > 0, or a list of them (one per class)",
)

# The options a term accepts in the config (smp / torch constructor keywords of the same name).
# mode, from_logits and reduction are set by build_loss.
TERM_OPTIONS: dict[str, dict[str, TermOption]] = {
    "bce": {"pos_weight": _POSITIVE_PER_CLASS},
    "dice": {"log_loss": _BOOL, "smooth": _NON_NEGATIVE},
    "jaccard": {"log_loss": _BOOL, "smooth": _NON_NEGATIVE},
    "lovasz": {"per_image": _BOOL},
    "focal": {"gamma": _NON_NEGATIVE, "alpha": _UNIT},
    "tversky": {
        "alpha": _NON_NEGATIVE,
        "beta": _NON_NEGATIVE,
        "gamma": _POSITIVE,
        "log_loss": _BOOL,
        "smooth": _NON_NEGATIVE,
    },
}

# Where segflow's default of an option differs from the library's. parse_loss writes these into
# the canonical form, so the resume hash and metrics.json hold the values a model trained with.
TERM_DEFAULTS: dict[str, dict[str, Any]] = {"tversky": {"alpha": 0.3, "beta": 0.7}}


class WeightedLoss(nn.Module):
    """``sum(weight[name] * term[name](logits, target))`` over the configured terms.

    Build it with :func:`build_loss`. ``forward`` returns the total (a scalar tensor with a
    graph); :attr:`last_terms` then holds each term's unweighted value.

    Shape:
        logits: (N, C, H, W) float, any dtype (computed in float32); target: the same shape with
        values in {0, 1} (any dtype), or (N, H, W) in binary mode; output: scalar.
    """

    def __init__(
        self,
        terms: Mapping[str, nn.Module],
        weights: Mapping[str, float],
        mode: str,
        elementwise: frozenset[str],
        ohem_fraction: float | None,
    ) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self.mode = mode
        self.elementwise = elementwise
        self.ohem_fraction = ohem_fraction
        self._last: dict[str, Tensor] = {}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # Reductions over many pixels and the lovasz sort lose precision in float16 (AMP).
        logits = logits.float()
        if self.mode == "binary" and target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape != logits.shape:
            raise ValueError(
                f"loss: target shape {tuple(target.shape)} does not match logits "
                f"{tuple(logits.shape)}"
            )
        target = target.float()
        total = logits.new_zeros(())
        last: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            weight = self.weights[name]
            # A zero weight logs the term without training on it: no graph needed.
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                value = term(logits, target)
                if name in self.elementwise:
                    value = self._reduce_pixels(value)
            last[name] = value.detach()
            if weight > 0:
                total = total + weight * value
        self._last = last
        return total

    def _reduce_pixels(self, losses: Tensor) -> Tensor:
        """Mean of per-pixel losses, or of the hardest ``ohem_fraction`` of them."""
        flat = losses.reshape(-1)
        if self.ohem_fraction is None:
            return flat.mean()
        k = ohem_count(flat.numel(), self.ohem_fraction)
        return flat.topk(k, sorted=False).values.mean()

    @property
    def last_terms(self) -> dict[str, float]:
        """Unweighted value of every term in the last ``forward`` (empty before the first)."""
        return {name: float(value) for name, value in self._last.items()}


def ohem_count(n_pixels: int, fraction: float) -> int:
    """How many of ``n_pixels`` per-pixel losses OHEM keeps: ``round(fraction * n)``, at least 1."""
    return max(1, min(n_pixels, round(fraction * n_pixels)))


def parse_loss(
    loss: Any, key: str = "loss", classes: int | None = None
) -> dict[str, float | dict[str, Any]]:
    """Validate a loss config and return its canonical form.

    Args:
        loss: term name (a key of :data:`LOSSES`) -> weight >= 0, or -> a mapping
            ``{"weight": w, <option>: value, ...}`` with options of :data:`TERM_OPTIONS`. At
            least one weight must be > 0.
        key: the config key of ``loss``, for error messages (e.g. ``experiments.fpn.loss``).
        classes: the number of mask channels, if known: a per-class ``pos_weight`` list must
            have this length.

    Returns:
        Term name -> weight as a float when the term has no options, else
        ``{"weight": float, <option>: value}`` (numbers as floats) with the options of
        :data:`TERM_DEFAULTS` filled in: equal configs give equal mappings, so ``{bce: 1}`` and
        ``{bce: {weight: 1.0}}`` hash alike, and so do ``{tversky: 1}`` and ``{tversky:
        {weight: 1, alpha: 0.3, beta: 0.7}}``.

    Raises:
        SegflowError: one line naming the offending key (``<key>.<term>.<option>``), for an
            unknown term or option (listing the valid ones) or a bad weight or value.
    """
    if not isinstance(loss, Mapping) or not loss:
        raise SegflowError(f"{key}: give at least one term with a weight, e.g. {{bce: 1.0}}")
    parsed: dict[str, float | dict[str, Any]] = {}
    for name, value in loss.items():
        if name not in LOSSES:
            raise SegflowError(f"{key}: unknown loss term {name!r}; valid: {', '.join(LOSSES)}")
        parsed[name] = _parse_term(name, value, f"{key}.{name}", classes)
    if not any(_weight_of(value) > 0 for value in parsed.values()):
        raise SegflowError(f"{key}: every weight is 0; give at least one term a positive weight")
    return parsed


def _parse_term(name: str, value: Any, key: str, classes: int | None) -> float | dict[str, Any]:
    if not isinstance(value, Mapping):
        weight = _check_weight(value, key)
        return {"weight": weight, **TERM_DEFAULTS[name]} if name in TERM_DEFAULTS else weight
    valid = ("weight", *TERM_OPTIONS[name])
    for option in value:
        if option not in valid:
            raise SegflowError(
                f"{key}.{option}: unknown option; valid for {name}: {', '.join(valid)}"
            )
    if "weight" not in value:
        raise SegflowError(f"{key}.weight: missing; a term given as a mapping needs its weight")
    parsed: dict[str, Any] = {"weight": _check_weight(value["weight"], key)}
    parsed.update(TERM_DEFAULTS.get(name, {}))
    for option, spec in TERM_OPTIONS[name].items():
        if option not in value:
            continue
        given = value[option]
        if not spec.check(given):
            raise SegflowError(f"{key}.{option}: must be {spec.requirement}, got {given!r}")
        parsed[option] = _canonical(given)
    pos_weight = parsed.get("pos_weight")
    if isinstance(pos_weight, list) and classes is not None and len(pos_weight) != classes:
        raise SegflowError(
            f"{key}.pos_weight: {len(pos_weight)} values for {classes} mask class(es); "
            "give one number, or one per class"
        )
    if name == "tversky" and parsed["alpha"] + parsed["beta"] == 0:
        raise SegflowError(
            f"{key}.beta: alpha + beta must be > 0, got alpha 0 and beta 0 (the loss would be "
            "constant)"
        )
    return parsed if len(parsed) > 1 else parsed["weight"]


def _check_weight(weight: Any, key: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise SegflowError(
            f"{key}: weight must be a number, got {weight!r} (give w or {{weight: w, <option>: v}})"
        )
    if not math.isfinite(weight) or weight < 0:
        raise SegflowError(f"{key}: weight must be finite and >= 0, got {weight!r}")
    return float(weight)


def _canonical(value: Any) -> Any:
    """Numbers as floats (1 and 1.0 hash alike), lists as lists, booleans as they are."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list | tuple):
        return [float(x) for x in value]
    return float(value)


def _weight_of(term: float | Mapping[str, Any]) -> float:
    return term["weight"] if isinstance(term, Mapping) else term


def build_loss(
    loss: LossConfig,
    mode: str = "binary",
    ohem_fraction: float | None = None,
) -> WeightedLoss:
    """The weighted sum of the configured loss terms (config section ``loss``).

    Args:
        loss: term name (a key of :data:`LOSSES`) -> weight >= 0, or -> ``{"weight": w,
            <option>: value}`` with the term's options of :data:`TERM_OPTIONS`, e.g.
            ``{"bce": {"weight": 1, "pos_weight": 3.0}, "lovasz": {"weight": 1, "per_image":
            True}}`` (see :func:`parse_loss`). At least one weight > 0; a term with weight 0 is
            computed for :attr:`WeightedLoss.last_terms` but not trained on.
        mode: ``"binary"`` (one mask channel) or ``"multilabel"`` (C independent channels).
        ohem_fraction: in (0, 1]: the pixel-wise terms (bce, focal) average only the hardest
            fraction of the batch's pixels (all channels pooled); None averages all. Region terms
            (dice, jaccard, lovasz, tversky) are not affected.

    Returns:
        The loss module; call it as ``loss(logits, target)``.

    Raises:
        KeyError: unknown term name (the message lists the valid names).
        SegflowError: empty or invalid weights or options, unknown mode, bad ``ohem_fraction``.
    """
    if isinstance(loss, Mapping):
        for name in loss:
            if name not in LOSSES:
                raise KeyError(f"loss: unknown loss term {name!r}; valid: {', '.join(LOSSES)}")
    if mode not in MODES:
        raise SegflowError(f"loss.mode: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    parsed = parse_loss(loss, "loss", classes=1 if mode == "binary" else None)
    if ohem_fraction is not None:
        if isinstance(ohem_fraction, bool) or not 0 < ohem_fraction <= 1:
            raise SegflowError(f"loss.ohem_fraction must be in (0, 1], got {ohem_fraction!r}")
        if not any(name in PIXELWISE for name in parsed):
            raise SegflowError(
                "loss.ohem_fraction applies to the pixel-wise terms "
                f"({', '.join(PIXELWISE)}) but none of them has a weight"
            )

    terms: dict[str, nn.Module] = {}
    weights: dict[str, float] = {}
    for name, term in parsed.items():
        options = dict(term) if isinstance(term, Mapping) else {"weight": term}
        weights[name] = options.pop("weight")
        terms[name] = _make_term(name, mode, options)
    elementwise = frozenset(name for name in parsed if name in PIXELWISE)
    return WeightedLoss(terms, weights, mode, elementwise, ohem_fraction)


def _make_term(name: str, mode: str, options: dict[str, Any]) -> nn.Module:
    """The module of one term; pixel-wise terms (:data:`PIXELWISE`) return per-pixel losses."""
    if name == "bce":
        if "pos_weight" in options:
            # One value per class must broadcast over (N, C, H, W), i.e. have shape (C, 1, 1);
            # torch would broadcast a plain (C,) tensor against the width instead.
            pos_weight = torch.as_tensor(options["pos_weight"], dtype=torch.float32)
            options["pos_weight"] = pos_weight.reshape(-1, 1, 1)
        return nn.BCEWithLogitsLoss(reduction="none", **options)
    if name == "focal":
        # smp's binary mode on the flattened tensor gives one focal value per pixel and channel;
        # its mean equals the multilabel mode's mean of per-class means (equal class sizes).
        return smp.losses.FocalLoss(mode="binary", from_logits=True, reduction="none", **options)
    return LOSSES[name](mode=mode, from_logits=True, **options)
