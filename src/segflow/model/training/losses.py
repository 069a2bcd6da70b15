"""Training losses: a weighted sum of named terms on mask logits, with optional OHEM.

Terms (:data:`LOSSES`): ``bce`` (torch ``BCEWithLogitsLoss``) and the smp losses ``dice``,
``jaccard``, ``lovasz`` (hinge), ``focal`` and ``tversky``, all on logits, in smp's ``binary``
mode (one mask channel) or ``multilabel`` mode (C independent mask channels). The config gives
each term a weight, e.g. ``{"bce": 1.0, "dice": 1.0}``, or a weight and options of that term,
e.g. ``{"bce": {"weight": 1.0, "pos_weight": 3.0}}`` (:data:`TERM_OPTIONS` lists them); the
loss is the weighted sum and the unweighted value of every term is kept for logging
(:attr:`WeightedLoss.last_terms`).

Online hard example mining (``ohem_fraction``) keeps only the hardest fraction of pixels of the
batch in the *pixel-wise* terms (:data:`PIXELWISE`: bce, focal, mse, smooth_l1, distance_bce):
their per-pixel losses (with their options, e.g. bce's ``pos_weight``) are averaged over the top
``ohem_count(n, fraction)`` values instead of all ``n``. The other terms are a single ratio or
ranking over the whole mask (dice, jaccard, lovasz, tversky, sens_spec, dice_positive,
active_contour) or signed per-pixel values whose mean is the loss (boundary, hausdorff), so they
always see every pixel.

Tversky's score is ``TP / (TP + alpha FP + beta FN)``: ``alpha`` weighs false positives,
``beta`` false negatives. At alpha = beta = 0.5 it is Dice, so segflow's default is
alpha = 0.3, beta = 0.7 (Salehi et al. 2017, common Kaggle practice: missed mask pixels cost
more than extra ones), not smp's 0.5/0.5 (:data:`TERM_DEFAULTS`).

Note (smp): dice, jaccard and tversky score a channel 0 when its target is empty in the whole
batch (the overlap ratio is undefined there), so pair them with a pixel-wise term.

segflow's own terms (:mod:`segflow.model.training.extra_losses`), on ``p = sigmoid(logits)``:
``boundary`` (Kervadec et al. 2019), ``hausdorff`` (Karimi & Salcudean 2019, distance-transform
form), ``active_contour`` (Chen et al. 2019), ``sens_spec`` (Brosch et al. 2015),
``dice_positive`` (soft Dice on the images whose mask is not empty), ``mse`` and ``smooth_l1`` on
probabilities, ``distance_bce`` (BCE weighted by 1 + a boundary-distance map). ``boundary``,
``hausdorff`` and ``distance_bce`` need the truth's distance maps (:data:`DISTANCE_TERMS`):
``forward`` then takes them as ``distances`` (:func:`segflow.model.distances.mask_distances`,
computed per training sample after its augmentation). ``boundary`` and ``hausdorff`` may be
ramped in (:data:`RAMPED`): ``{weight: w, ramp_epochs: R, start_weight: s}`` trains epoch ``e``
(1-based) with ``s + (w - s) * min(1, (e - 1) / R)``, so ``s`` (default 0) at epoch 1 and ``w``
from epoch ``R + 1`` on (Kervadec et al.: the boundary term alone, or too early, collapses to
empty predictions; it is brought in as the regional term's helper).
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
from segflow.model.training import extra_losses

LOSSES: dict[str, type[nn.Module]] = {
    "bce": nn.BCEWithLogitsLoss,
    "dice": smp.losses.DiceLoss,
    "jaccard": smp.losses.JaccardLoss,
    "lovasz": smp.losses.LovaszLoss,
    "focal": smp.losses.FocalLoss,
    "tversky": smp.losses.TverskyLoss,
    "boundary": extra_losses.BoundaryLoss,
    "hausdorff": extra_losses.HausdorffDTLoss,
    "active_contour": extra_losses.ActiveContourLoss,
    "sens_spec": extra_losses.SensitivitySpecificityLoss,
    "dice_positive": extra_losses.PositiveDiceLoss,
    "mse": extra_losses.ProbabilityMSELoss,
    "smooth_l1": extra_losses.ProbabilitySmoothL1Loss,
    "distance_bce": extra_losses.DistancePenalisedBCELoss,
}
# Terms with one loss per pixel (OHEM selects among them).
PIXELWISE = ("bce", "focal", "mse", "smooth_l1", "distance_bce")
# Terms that need the truth's distance maps (forward's ``distances``).
DISTANCE_TERMS = ("boundary", "hausdorff", "distance_bce")
# Terms whose weight may be ramped in over the first epochs (ramp_epochs, start_weight).
RAMPED = ("boundary", "hausdorff")
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
_COUNT = TermOption(
    lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0, "an integer >= 0"
)
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
    "boundary": {"ramp_epochs": _COUNT, "start_weight": _NON_NEGATIVE},
    "hausdorff": {"alpha": _POSITIVE, "ramp_epochs": _COUNT, "start_weight": _NON_NEGATIVE},
    "active_contour": {"lambda": _NON_NEGATIVE},
    "sens_spec": {"r": _UNIT},
    "dice_positive": {"smooth": _NON_NEGATIVE},
    "mse": {},
    "smooth_l1": {"beta": _POSITIVE},
    "distance_bce": {},
}

# Where segflow's default of an option differs from the library's. parse_loss writes these into
# the canonical form, so the resume hash and metrics.json hold the values a model trained with.
# smooth_l1: torch's beta 1 would make it half the MSE (|p - g| <= 1 on probabilities).
TERM_DEFAULTS: dict[str, dict[str, Any]] = {
    "tversky": {"alpha": 0.3, "beta": 0.7},
    "smooth_l1": {"beta": 0.1},
}


class WeightedLoss(nn.Module):
    """``sum(weight[name] * term[name](logits, target))`` over the configured terms.

    Build it with :func:`build_loss`. ``forward`` returns the total (a scalar tensor with a
    graph); :attr:`last_terms` then holds each term's unweighted value. Ramped terms
    (:data:`RAMPED`) use the weight of the epoch set with :meth:`set_epoch` (epoch 1 until then).

    Shape:
        logits: (N, C, H, W) float, any dtype (computed in float32); target: the same shape with
        values in {0, 1} (any dtype), or (N, H, W) in binary mode; distances (needed by
        :data:`DISTANCE_TERMS`): (N, 2, C, H, W), the inside and outside distance maps of the
        target (:func:`segflow.model.distances.mask_distances`); output: scalar.
    """

    def __init__(
        self,
        terms: Mapping[str, nn.Module],
        weights: Mapping[str, float],
        mode: str,
        elementwise: frozenset[str],
        ohem_fraction: float | None,
        ramps: Mapping[str, tuple[float, int]] | None = None,
    ) -> None:
        """Args:
        terms: term name -> module.
        weights: term name -> its (final) weight.
        mode: ``"binary"`` or ``"multilabel"``.
        elementwise: the terms whose modules return per-pixel losses (reduced here, with OHEM).
        ohem_fraction: hardest fraction of pixels kept in the element-wise terms; None: all.
        ramps: term name -> (start weight, ramp epochs > 0) for the ramped terms.
        """
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self.mode = mode
        self.elementwise = elementwise
        self.ohem_fraction = ohem_fraction
        self.ramps = dict(ramps or {})
        self.epoch = 1
        self._last: dict[str, Tensor] = {}

    @property
    def needs_distances(self) -> bool:
        """Whether ``forward`` needs the target's distance maps (a :data:`DISTANCE_TERMS` term)."""
        return any(name in DISTANCE_TERMS for name in self.terms)

    def set_epoch(self, epoch: int) -> None:
        """Use the weights of ``epoch`` (1-based) for the ramped terms from now on."""
        self.epoch = int(epoch)

    def weight_at(self, name: str, epoch: int | None = None) -> float:
        """The weight of term ``name`` at ``epoch`` (default: the epoch set by :meth:`set_epoch`).

        Args:
            name: a configured term.
            epoch: 1-based epoch, or None for the current one.

        Returns:
            ``start + (weight - start) * min(1, (epoch - 1) / ramp_epochs)`` for a ramped term,
            else its weight.
        """
        weight = self.weights[name]
        if name not in self.ramps:
            return weight
        start, epochs = self.ramps[name]
        done = min(1.0, max(0, (self.epoch if epoch is None else epoch) - 1) / epochs)
        return start + (weight - start) * done

    def forward(self, logits: Tensor, target: Tensor, distances: Tensor | None = None) -> Tensor:
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
        if self.needs_distances:
            distances = self._check_distances(logits, distances)
        total = logits.new_zeros(())
        last: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            weight = self.weight_at(name)
            # A zero weight logs the term without training on it: no graph needed.
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                if name in DISTANCE_TERMS:
                    value = term(logits, target, distances)
                else:
                    value = term(logits, target)
                if name in self.elementwise:
                    value = self._reduce_pixels(value)
            last[name] = value.detach()
            if weight > 0:
                total = total + weight * value
        self._last = last
        return total

    def _check_distances(self, logits: Tensor, distances: Tensor | None) -> Tensor:
        """The distance maps as float32, or one line saying what is missing or misshapen."""
        names = ", ".join(name for name in self.terms if name in DISTANCE_TERMS)
        if distances is None:
            raise ValueError(
                f"loss: the {names} term(s) need the target's distance maps (the dataset's "
                "'distance', MemmapDataset(distances=True)); none were given"
            )
        expected = (logits.shape[0], 2, *logits.shape[1:])
        if tuple(distances.shape) != expected:
            raise ValueError(
                f"loss: distance maps of shape {tuple(distances.shape)}, expected {expected} "
                "(inside and outside maps of each target plane)"
            )
        return distances.float()

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
    if not any(_first_weight(value) > 0 for value in parsed.values()):
        raise SegflowError(
            f"{key}: every weight is 0 at epoch 1 (the ramped terms start at start_weight); give "
            "an unramped term a positive weight, or a start_weight > 0"
        )
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
        parsed[option] = int(given) if option == "ramp_epochs" else _canonical(given)
    pos_weight = parsed.get("pos_weight")
    if isinstance(pos_weight, list) and classes is not None and len(pos_weight) != classes:
        raise SegflowError(
            f"{key}.pos_weight: {len(pos_weight)} values for {classes} mask class(es); "
            "give one number, or one per class"
        )
    if name in RAMPED:
        _canonical_ramp(parsed, key)
    if name == "tversky" and parsed["alpha"] + parsed["beta"] == 0:
        raise SegflowError(
            f"{key}.beta: alpha + beta must be > 0, got alpha 0 and beta 0 (the loss would be "
            "constant)"
        )
    return parsed if len(parsed) > 1 else parsed["weight"]


def _canonical_ramp(parsed: dict[str, Any], key: str) -> None:
    """Fill in ``start_weight`` 0 for a ramp, drop a ``ramp_epochs`` of 0 (no ramp: equal configs
    hash alike), and refuse a ``start_weight`` without a ramp."""
    if parsed.get("ramp_epochs", 0) > 0:
        parsed.setdefault("start_weight", 0.0)
        return
    if "start_weight" in parsed:
        raise SegflowError(
            f"{key}.start_weight: needs ramp_epochs > 0 (the epochs over which the weight goes "
            "from start_weight to weight)"
        )
    parsed.pop("ramp_epochs", None)


def _first_weight(term: float | Mapping[str, Any]) -> float:
    """The weight of a canonical term at epoch 1 (a ramp's start weight)."""
    if isinstance(term, Mapping) and term.get("ramp_epochs", 0) > 0:
        return float(term["start_weight"])
    return _weight_of(term)


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
        ohem_fraction: in (0, 1]: the pixel-wise terms (:data:`PIXELWISE`) average only the
            hardest fraction of the batch's pixels (all channels pooled); None averages all.
            The other terms are not affected.

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
    ramps: dict[str, tuple[float, int]] = {}
    for name, term in parsed.items():
        options = dict(term) if isinstance(term, Mapping) else {"weight": term}
        weights[name] = options.pop("weight")
        if "ramp_epochs" in options:
            ramps[name] = (options.pop("start_weight"), options.pop("ramp_epochs"))
        terms[name] = _make_term(name, mode, options)
    elementwise = frozenset(name for name in parsed if name in PIXELWISE)
    return WeightedLoss(terms, weights, mode, elementwise, ohem_fraction, ramps)


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
    if name in extra_losses.TERMS:
        # segflow's own terms work per channel: binary and multilabel alike.
        if "lambda" in options:
            options["lambda_"] = options.pop("lambda")
        return LOSSES[name](**options)
    return LOSSES[name](mode=mode, from_logits=True, **options)
