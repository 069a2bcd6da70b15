"""segflow's own loss terms (beyond torch's BCE and smp's losses), on mask logits.

Every term takes ``logits`` (N, C, H, W) and ``target`` (N, C, H, W) in [0, 1] and works on
``p = sigmoid(logits)`` per channel, so one mask channel (binary) and C independent channels
(multilabel) are handled alike. The distance-based terms also take ``distances`` (N, 2, C, H, W):
the target's inside and outside Euclidean distance maps in pixels
(:func:`segflow.model.distances.mask_distances`; both 0 on a plane with no boundary).
:mod:`segflow.model.training.losses` combines them into the configured weighted sum.

Pixel-wise terms (``mse``, ``smooth_l1``, ``distance_bce``) return one loss per element (the
weighted sum averages them, or OHEM their hardest share); the others return a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segflow.model.distances import batch_distances


def _has_boundary(distances: Tensor) -> Tensor:
    """(N, C, 1, 1) float: 1 where the target plane has a boundary (some distance > 0)."""
    return (distances.flatten(3).amax(dim=(1, 3)) > 0).float()[..., None, None]


def signed_distance(target: Tensor, distances: Tensor) -> Tensor:
    """Kervadec et al.'s signed distance map of the target (their ``one_hot2dist``).

    Args:
        target: (N, C, H, W) in [0, 1] (mask where > 0.5).
        distances: (N, 2, C, H, W) inside and outside distance maps of ``target``.

    Returns:
        (N, C, H, W): the outside distance at background pixels, ``-(inside - 1)`` at mask
        pixels (0 on the inner boundary, negative deeper in); 0 on planes with no boundary.
    """
    inside, outside = distances[:, 0], distances[:, 1]
    mask = (target > 0.5).float()
    return (outside * (1 - mask) - (inside - 1) * mask) * _has_boundary(distances)


def boundary_distance(distances: Tensor) -> Tensor:
    """Unsigned distance to the boundary: ``inside + outside`` (0 on planes with no boundary).

    Shape:
        distances (N, 2, C, H, W) -> (N, C, H, W).
    """
    return distances[:, 0] + distances[:, 1]


class BoundaryLoss(nn.Module):
    """Boundary loss (Kervadec et al. 2019): ``mean(p * phi)``, phi the target's signed distance.

    Mask pixels have phi <= 0 and background pixels phi >= 1, so the loss falls as probability
    moves into the mask and out of the background, most for pixels far from the boundary. It
    is 0 on planes with no boundary (an empty or full target), so pair it with a regional term
    (bce, dice); it may be ramped in (``ramp_epochs``).

    Shape:
        logits, target: (N, C, H, W); distances: (N, 2, C, H, W); output: scalar.
    """

    def forward(self, logits: Tensor, target: Tensor, distances: Tensor) -> Tensor:
        return (torch.sigmoid(logits) * signed_distance(target, distances)).mean()


class HausdorffDTLoss(nn.Module):
    """Hausdorff-distance loss, distance-transform form (Karimi & Salcudean 2019, eq. 8).

    ``mean((p - g)^2 * (d_g^alpha + d_p^alpha))``: ``d_g`` is the distance to the target's
    boundary, ``d_p`` the distance to the boundary of the current prediction ``p > 0.5``,
    recomputed every batch on the CPU without gradient (it depends on the prediction, so it
    cannot be stored). Errors far from either boundary cost most.

    Args:
        alpha: the power of the distances (default 2, the paper's).

    Shape:
        logits, target: (N, C, H, W); distances: (N, 2, C, H, W); output: scalar.
    """

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, logits: Tensor, target: Tensor, distances: Tensor) -> Tensor:
        prob = torch.sigmoid(logits)
        with torch.no_grad():
            predicted = boundary_distance(batch_distances(prob > 0.5))
        weight = boundary_distance(distances) ** self.alpha + predicted**self.alpha
        return ((prob - target) ** 2 * weight).mean()


class ActiveContourLoss(nn.Module):
    """Active-contour loss (Chen et al. 2019): ``length + lambda * region``.

    ``length`` sums ``sqrt(dx^2 + dy^2 + eps)`` over the finite differences of ``p`` (the
    paper's crop: both differences on the (H - 2, W - 2) interior); ``region`` sums
    ``p (g - 1)^2 + (1 - p) g^2`` (the inside constant c1 = 1, the outside one c2 = 0). Both
    sums are divided by the element count N C H W, so the value does not grow with the image
    size; their ratio, hence ``lambda``, is the paper's.

    Args:
        lambda_: weight of the region term (config ``lambda``; default 1, the paper's).
        eps: added under the square root (the paper's 1e-8) so its gradient is finite at 0.

    Shape:
        logits, target: (N, C, H, W) with H, W >= 3; output: scalar.
    """

    def __init__(self, lambda_: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.lambda_ = float(lambda_)
        self.eps = float(eps)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[-2] < 3 or logits.shape[-1] < 3:
            raise ValueError(
                f"loss.active_contour: needs masks of at least 3 x 3 pixels, got "
                f"{tuple(logits.shape[-2:])}"
            )
        prob = torch.sigmoid(logits)
        dx = prob[..., 1:, :] - prob[..., :-1, :]
        dy = prob[..., :, 1:] - prob[..., :, :-1]
        squared = dx[..., 1:, :-2] ** 2 + dy[..., :-2, 1:] ** 2
        length = torch.sqrt(squared.abs() + self.eps).sum()
        region = (prob * (target - 1) ** 2).sum() + ((1 - prob) * target**2).sum()
        return (length + self.lambda_ * region) / prob.numel()


class SensitivitySpecificityLoss(nn.Module):
    """Sensitivity-specificity loss (Brosch et al. 2015), per channel over the batch.

    ``r * sum((g - p)^2 g) / sum(g) + (1 - r) * sum((g - p)^2 (1 - g)) / sum(1 - g)``, the mean
    over channels: the squared error on the mask pixels and on the background pixels, each
    normalised by its own pixel count, so a small mask is not drowned by the background. A
    channel without mask (or background) pixels in the batch contributes 0 to that part.

    Args:
        r: weight of the mask (sensitivity) part, in [0, 1] (default 0.05).

    Shape:
        logits, target: (N, C, H, W); output: scalar.
    """

    def __init__(self, r: float = 0.05) -> None:
        super().__init__()
        self.r = float(r)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        squared = (target - torch.sigmoid(logits)) ** 2
        dims = (0, 2, 3)
        positives, negatives = target.sum(dims), (1 - target).sum(dims)
        sensitivity = (squared * target).sum(dims) / positives.clamp_min(1e-6)
        specificity = (squared * (1 - target)).sum(dims) / negatives.clamp_min(1e-6)
        return (self.r * sensitivity + (1 - self.r) * specificity).mean()


class PositiveDiceLoss(nn.Module):
    """Soft Dice loss on the positive images only, per image and channel.

    ``1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)`` for every (image, channel) whose
    target is not empty, averaged over those; empty targets are left to another term (their
    Dice is undefined, and Kaggle's per-image metrics score them apart). A batch with no
    positive (image, channel) gives 0 (with a graph, so it can still be summed and backpropagated).

    Args:
        smooth: added to numerator and denominator (default 0).

    Shape:
        logits, target: (N, C, H, W); output: scalar.
    """

    def __init__(self, smooth: float = 0.0) -> None:
        super().__init__()
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        prob = torch.sigmoid(logits).flatten(2)
        truth = target.flatten(2)
        positive = truth.sum(2) > 0
        if not bool(positive.any()):
            return logits.sum() * 0.0
        score = (2 * (prob * truth).sum(2) + self.smooth) / (
            prob.sum(2) + truth.sum(2) + self.smooth
        )
        return (1 - score)[positive].mean()


class ProbabilityMSELoss(nn.Module):
    """Squared error of the probability, per element: ``(p - g)^2``.

    Shape:
        logits, target: (N, C, H, W); output: (N, C, H, W).
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return (torch.sigmoid(logits) - target) ** 2


class ProbabilitySmoothL1Loss(nn.Module):
    """Smooth L1 (Huber) of the probability, per element: torch's ``smooth_l1_loss(p, g)``.

    ``0.5 (p - g)^2 / beta`` where ``|p - g| < beta``, else ``|p - g| - 0.5 beta``. On
    probabilities ``|p - g| <= 1``, so a ``beta >= 1`` (torch's default 1) would be half the
    squared error: segflow's default is 0.1.

    Args:
        beta: where the quadratic part ends (> 0).

    Shape:
        logits, target: (N, C, H, W); output: (N, C, H, W).
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(torch.sigmoid(logits), target, reduction="none", beta=self.beta)


def boundary_weight(target: Tensor, distances: Tensor) -> Tensor:
    """The distance penalty of the distance-penalised cross-entropy (Caliva et al. 2019, as in
    Ma's SegLoss ``DistPenalizedCE``): per plane, ``(max - d) / max`` of the inside distance at
    mask pixels and of the outside distance at background pixels, so about 1 next to the
    boundary and 0 at the farthest pixel; 0 on planes with no boundary.

    Args:
        target: (N, C, H, W) in [0, 1] (mask where > 0.5).
        distances: (N, 2, C, H, W) inside and outside distance maps.

    Returns:
        (N, C, H, W) in [0, 1).
    """
    mask = (target > 0.5).float()
    out = torch.zeros_like(mask)
    for side, where in ((distances[:, 0], mask), (distances[:, 1], 1 - mask)):
        largest = side.flatten(2).amax(dim=2)[..., None, None]
        out = out + torch.where(largest > 0, (largest - side) / largest.clamp_min(1e-6), 0) * where
    return out


class DistancePenalisedBCELoss(nn.Module):
    """Distance-penalised BCE, per element: ``BCE(logits, g) * (1 + w)``.

    ``w`` is :func:`boundary_weight`: pixels next to the target's boundary weigh about twice
    those farthest from it (and 1 on planes with no boundary: plain BCE).

    Shape:
        logits, target: (N, C, H, W); distances: (N, 2, C, H, W); output: (N, C, H, W).
    """

    def forward(self, logits: Tensor, target: Tensor, distances: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return bce * (1 + boundary_weight(target, distances))


# The terms built by segflow (not smp or torch): config name -> class.
TERMS: dict[str, type[nn.Module]] = {
    "boundary": BoundaryLoss,
    "hausdorff": HausdorffDTLoss,
    "active_contour": ActiveContourLoss,
    "sens_spec": SensitivitySpecificityLoss,
    "dice_positive": PositiveDiceLoss,
    "mse": ProbabilityMSELoss,
    "smooth_l1": ProbabilitySmoothL1Loss,
    "distance_bce": DistancePenalisedBCELoss,
}
