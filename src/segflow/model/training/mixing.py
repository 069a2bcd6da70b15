"""Mixup and CutMix of training batches, the masks mixed exactly as the images.

Applied per batch on the training device, after loading and augmentation
(``train.mixup_prob``/``mixup_alpha``, ``train.cutmix_prob``/``cutmix_alpha``). One uniform draw
per batch picks mixup (probability ``mixup_prob``), cutmix (``cutmix_prob``) or nothing; each
image is then mixed with the image at its place in a random permutation of the batch:

- mixup: ``image = lam * image + (1 - lam) * partner`` and the mask alike with the *same*
  ``lam ~ Beta(mixup_alpha, mixup_alpha)``: the masks become soft targets (BCE, dice, jaccard,
  focal and tversky take them; lovasz does not, so mixup with a lovasz term is refused);
- cutmix: one box of about ``1 - lam`` of the area (``lam ~ Beta(cutmix_alpha, cutmix_alpha)``)
  is pasted from the partner into image and mask alike; masks stay hard.

The aux head's target (the max of each mask plane) follows the mixed mask; a pseudo-labelled
image keeps its own loss weight. Every draw comes from a generator seeded by (seed, epoch,
batch) alone, so a batch is mixed the same whether the run was resumed or not, with any number
of loader workers, and never touches the global generators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segflow.core.errors import SegflowError
from segflow.model.training.train_options import TrainOptions

# The loss terms that read the masks' distance maps (segflow.model.training.losses.DISTANCE_TERMS;
# not imported from there: losses imports smp, which mixing does not need).
DISTANCE_TERMS = ("boundary", "hausdorff", "distance_bce")

MIX_KINDS = ("none", "mixup", "cutmix")
# Keeps these draws apart from every other generator seeded from (seed, epoch, ...).
_STREAM = 0x6D6978


@dataclass(frozen=True)
class MixDraw:
    """What one batch gets.

    Attributes:
        kind: a :data:`MIX_KINDS` name.
        lam: mixup's weight of each image itself; cutmix's share of the area left unpasted.
        permutation: the partner of each image (its index in the batch); empty for ``none``.
        box: cutmix's pasted box ``(top, bottom, left, right)`` (half-open), else None.
    """

    kind: str
    lam: float
    permutation: np.ndarray
    box: tuple[int, int, int, int] | None = None


def mixing_enabled(options: TrainOptions) -> bool:
    """Whether ``options`` mix any batch."""
    return options.mixup_prob > 0 or options.cutmix_prob > 0


def check_mixing_loss(options: TrainOptions, loss_weights: Mapping[str, Any]) -> None:
    """Refuse mixup with a lovasz term (its soft masks are not lovasz targets), and any mixing
    with a distance-based term (the distance maps are those of the unmixed masks).

    Raises:
        SegflowError: one line naming ``train.mixup_prob`` or ``train.cutmix_prob``.
    """

    def weight(name: str) -> float:
        term = loss_weights.get(name, 0.0)  # a weight, or {"weight": w, <option>: value}
        return float(term.get("weight", 0.0) if isinstance(term, Mapping) else term)

    if options.mixup_prob > 0 and weight("lovasz") > 0:
        raise SegflowError(
            "train.mixup_prob: mixup makes soft masks, which the lovasz loss does not take; "
            "drop lovasz from the loss or set mixup_prob: 0 (cutmix keeps masks hard)"
        )
    # Any configured distance term, even at weight 0 (it is still computed for the log).
    distance_terms = [name for name in DISTANCE_TERMS if name in loss_weights]
    for key in ("mixup_prob", "cutmix_prob"):
        if getattr(options, key) > 0 and distance_terms:
            raise SegflowError(
                f"train.{key}: the {', '.join(distance_terms)} loss term(s) use distance maps of "
                f"the unmixed masks, which mixing would make wrong; drop them or set {key}: 0"
            )


def draw_mix(
    options: TrainOptions, batch_size: int, height: int, width: int, epoch: int, batch: int
) -> MixDraw:
    """The mix of batch ``batch`` of ``epoch``: a function of (seed, epoch, batch) alone.

    Args:
        options: training options (seed, mixup_prob/alpha, cutmix_prob/alpha).
        batch_size: images in the batch.
        height, width: the batch's spatial size.
        epoch: the epoch (1-based).
        batch: the batch within the epoch (1-based).

    Returns:
        The draw; ``kind`` ``none`` when the batch is left alone.
    """
    rng = np.random.default_rng([options.seed, epoch, batch, _STREAM])
    choice = rng.random()
    if choice < options.mixup_prob:
        lam = float(rng.beta(options.mixup_alpha, options.mixup_alpha))
        return MixDraw("mixup", lam, rng.permutation(batch_size))
    if choice < options.mixup_prob + options.cutmix_prob:
        lam = float(rng.beta(options.cutmix_alpha, options.cutmix_alpha))
        permutation = rng.permutation(batch_size)
        return MixDraw("cutmix", lam, permutation, _cut_box(rng, lam, height, width))
    return MixDraw("none", 1.0, np.arange(0))


def _cut_box(
    rng: np.random.Generator, lam: float, height: int, width: int
) -> tuple[int, int, int, int]:
    """A box of about ``1 - lam`` of the area around a uniform centre, clipped to the image
    (the CutMix paper's rule)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return top, bottom, left, right


def mixup(
    images: torch.Tensor, masks: torch.Tensor, lam: float, permutation: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image and its mask with its partner's, by the same weight ``lam``.

    Shape:
        images: (N, C, H, W); masks: (N, K, H, W); outputs: the same.
    """
    index = torch.as_tensor(permutation, dtype=torch.long, device=images.device)
    return (
        lam * images + (1.0 - lam) * images[index],
        lam * masks + (1.0 - lam) * masks[index],
    )


def cutmix(
    images: torch.Tensor,
    masks: torch.Tensor,
    box: tuple[int, int, int, int],
    permutation: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the partner's ``box`` into each image and, at the same place, into its mask.

    Shape:
        images: (N, C, H, W); masks: (N, K, H, W); outputs: the same.
    """
    top, bottom, left, right = box
    index = torch.as_tensor(permutation, dtype=torch.long, device=images.device)
    images, masks = images.clone(), masks.clone()  # the loader's tensors stay as loaded
    images[:, :, top:bottom, left:right] = images[index, :, top:bottom, left:right]
    masks[:, :, top:bottom, left:right] = masks[index, :, top:bottom, left:right]
    return images, masks


def mix_batch(
    images: torch.Tensor, masks: torch.Tensor, options: TrainOptions, epoch: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor, MixDraw]:
    """Mixup, cutmix or neither for one training batch (see the module docstring).

    Args:
        images: the batch's images on the training device.
        masks: their masks (hard or soft).
        options: training options.
        epoch: the epoch (1-based).
        batch: the batch within the epoch (1-based).

    Returns:
        (images, masks, the draw); the inputs themselves when the batch is not mixed.

    Shape:
        images: (N, C, H, W); masks: (N, K, H, W); outputs: the same.
    """
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise SegflowError(
            f"mix_batch: images {tuple(images.shape)} and masks {tuple(masks.shape)} differ"
        )
    draw = draw_mix(options, images.shape[0], *images.shape[-2:], epoch, batch)
    if draw.kind == "mixup":
        images, masks = mixup(images, masks, draw.lam, draw.permutation)
    elif draw.kind == "cutmix" and draw.box is not None:
        images, masks = cutmix(images, masks, draw.box, draw.permutation)
    return images, masks, draw
