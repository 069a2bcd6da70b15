"""Training losses: a weighted sum of named terms on mask logits, with optional OHEM.

Terms (:data:`LOSSES`): ``bce`` (torch ``BCEWithLogitsLoss``) and the smp losses ``dice``,
``jaccard``, ``lovasz`` (hinge), ``focal`` and ``tversky``, all on logits, in smp's ``binary``
mode (one mask channel) or ``multilabel`` mode (C independent mask channels). The config gives
a weight per term, e.g. ``{"bce": 1.0, "dice": 1.0}``; the loss is the weighted sum and the
unweighted value of every term is kept for logging (:attr:`WeightedLoss.last_terms`).

Online hard example mining (``ohem_fraction``) keeps only the hardest fraction of pixels of the
batch in the *pixel-wise* terms (bce, focal): their per-pixel losses are averaged over the top
``ohem_count(n, fraction)`` values instead of all ``n``. Region terms (dice, jaccard, lovasz,
tversky) are a single ratio or ranking over the whole mask, so they have no per-pixel value to
select from and always see every pixel.

Note (smp): dice, jaccard and tversky score a channel 0 when its target is empty in the whole
batch (the overlap ratio is undefined there), so pair them with a pixel-wise term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from segflow.errors import SegflowError

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

# Set by build_loss itself: a term's options may not override them.
_FIXED_KWARGS = ("mode", "from_logits", "reduction")


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


def build_loss(
    weights: Mapping[str, float],
    mode: str = "binary",
    ohem_fraction: float | None = None,
    **loss_kwargs: Mapping[str, Any],
) -> WeightedLoss:
    """The weighted sum of the named loss terms (config section ``loss``).

    Args:
        weights: term name (a key of :data:`LOSSES`) -> weight >= 0; at least one > 0. A term
            with weight 0 is computed for :attr:`WeightedLoss.last_terms` but not trained on.
        mode: ``"binary"`` (one mask channel) or ``"multilabel"`` (C independent channels).
        ohem_fraction: in (0, 1]: the pixel-wise terms (bce, focal) average only the hardest
            fraction of the batch's pixels (all channels pooled); None averages all. Region terms
            (dice, jaccard, lovasz, tversky) are not affected.
        **loss_kwargs: per-term constructor options, keyed by term name, e.g.
            ``focal={"gamma": 3.0}``, ``bce={"pos_weight": 2.0}`` (a number, or one per class),
            ``lovasz={"per_image": True}``. ``mode``, ``from_logits`` and ``reduction`` are set
            here and may not be given.

    Returns:
        The loss module; call it as ``loss(logits, target)``.

    Raises:
        KeyError: unknown term name (the message lists the valid names).
        SegflowError: empty or invalid weights, unknown mode, bad ``ohem_fraction`` or options.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise SegflowError("loss: give at least one term with a weight, e.g. {'bce': 1.0}")
    for name in weights:
        if name not in LOSSES:
            raise KeyError(f"loss: unknown loss term {name!r}; valid: {', '.join(LOSSES)}")
    checked = {name: _check_weight(name, weight) for name, weight in weights.items()}
    if not any(weight > 0 for weight in checked.values()):
        raise SegflowError("loss: every weight is 0; give at least one term a positive weight")
    if mode not in MODES:
        raise SegflowError(f"loss.mode: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    for name, options in loss_kwargs.items():
        if name not in checked:
            raise SegflowError(f"loss.{name}: options given for a term that has no weight")
        if not isinstance(options, Mapping):
            raise SegflowError(f"loss.{name}: options must be a mapping of keyword arguments")
        for key in _FIXED_KWARGS:
            if key in options:
                raise SegflowError(f"loss.{name}.{key}: set by segflow, may not be given")
    if ohem_fraction is not None:
        if isinstance(ohem_fraction, bool) or not 0 < ohem_fraction <= 1:
            raise SegflowError(f"loss.ohem_fraction must be in (0, 1], got {ohem_fraction!r}")
        if not any(name in PIXELWISE for name in checked):
            raise SegflowError(
                "loss.ohem_fraction applies to the pixel-wise terms "
                f"({', '.join(PIXELWISE)}) but none of them has a weight"
            )

    terms: dict[str, nn.Module] = {}
    elementwise: set[str] = set()
    for name in checked:
        options = dict(loss_kwargs.get(name, {}))
        try:
            terms[name], is_elementwise = _make_term(name, mode, options)
        except (TypeError, ValueError) as exc:
            raise SegflowError(f"loss.{name}: invalid options {options}: {exc}") from exc
        if is_elementwise:
            elementwise.add(name)
    if ohem_fraction is not None and "focal" in checked and "focal" not in elementwise:
        raise SegflowError(
            "loss.focal.class_weights: cannot be combined with loss.ohem_fraction "
            "(class weights need smp's per-class reduction)"
        )
    return WeightedLoss(terms, checked, mode, frozenset(elementwise), ohem_fraction)


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise SegflowError(f"loss.{name}: weight must be a number, got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise SegflowError(f"loss.{name}: weight must be finite and >= 0, got {weight!r}")
    return float(weight)


def _make_term(name: str, mode: str, options: dict[str, Any]) -> tuple[nn.Module, bool]:
    """(term module, returns per-pixel losses?) for one configured term."""
    if name == "bce":
        if "pos_weight" in options and not isinstance(options["pos_weight"], Tensor):
            # One value per class must broadcast over (N, C, H, W), i.e. have shape (C, 1, 1);
            # torch would broadcast a plain (C,) tensor against the width instead.
            pos_weight = torch.as_tensor(options["pos_weight"], dtype=torch.float32)
            options["pos_weight"] = pos_weight.reshape(-1, 1, 1)
        return nn.BCEWithLogitsLoss(reduction="none", **options), True
    if name == "focal" and "class_weights" not in options:
        # smp's binary mode on the flattened tensor gives one focal value per pixel and channel;
        # its mean equals the multilabel mode's mean of per-class means (equal class sizes).
        return smp.losses.FocalLoss(
            mode="binary", from_logits=True, reduction="none", **options
        ), True
    return LOSSES[name](mode=mode, from_logits=True, **options), False
