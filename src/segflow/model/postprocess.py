"""Post-processing of predicted probabilities: threshold, drop small objects, fill holes.

:func:`apply_postprocess` turns probabilities into a binary mask; :func:`tune_postprocess` picks
its parameters by exhaustive grid search on out-of-fold predictions; :func:`label_instances`
splits a binary mask into objects for competitions that score instances (DSB 2018: one RLE row
per object).

Connected components are 8-connected (a diagonal step joins two pixels); holes are background
regions, 4-connected, that do not reach the image border — the dual connectivity, so a diagonal
gap in an object's outline does not close a hole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from segflow.core.errors import SegflowError
from segflow.core.options import option
from segflow.model.metrics import METRIC_NAMES, instance_precision_iou, scores_from_counts

# Images are labelled in chunks of at most this many pixels (bounds the int32 label memory).
_CHUNK_PIXELS = 1 << 22
# Gaussian smoothing (pixels) of the distance transform before looking for object centres.
_DISTANCE_SIGMA = 1.0
# Grid scores closer than this are ties (means of equal per-image scores summed in another order).
_TIE_DECIMALS = 12


@dataclass(frozen=True)
class PostprocessParams:
    """How probabilities become a mask (config section ``postprocess``)."""

    threshold: float = option(0.5, "foreground where probability > threshold, in (0, 1)")
    min_area: int = option(0, "remove 8-connected objects of fewer pixels (0: keep all)")
    fill_holes: bool = option(False, "fill background regions enclosed by an object")
    gate: float = option(
        0.0, "empty the mask when the aux head's non-empty probability is below this (0: off)"
    )

    def __post_init__(self) -> None:
        _check_threshold(self.threshold, "postprocess.threshold")
        _check_min_area(self.min_area, "postprocess.min_area")
        _check_bool(self.fill_holes, "postprocess.fill_holes")
        _check_gate(self.gate, "postprocess.gate")


def _check_threshold(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise SegflowError(f"{key} must be a number in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise SegflowError(f"{key} must be in (0, 1), got {value!r}")


def _check_gate(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise SegflowError(f"{key} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise SegflowError(f"{key} must be in [0, 1), got {value!r}")


def _check_min_area(value: Any, key: str) -> None:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise SegflowError(f"{key} must be an integer >= 0, got {value!r}")
    if value < 0:
        raise SegflowError(f"{key} must be >= 0, got {value}")


def _check_bool(value: Any, key: str) -> None:
    if not isinstance(value, bool | np.bool_):
        raise SegflowError(f"{key} must be true or false, got {value!r}")


def _chunks(n_images: int, pixels_per_image: int) -> list[slice]:
    size = max(1, _CHUNK_PIXELS // max(1, pixels_per_image))
    return [slice(start, min(start + size, n_images)) for start in range(0, n_images, size)]


class _Framed:
    """A batch of images laid out as one tall uint8 image, so one OpenCV call labels them all.

    Image i sits at rows ``1 + i * (H + 1)`` onwards, columns 1..W; every other pixel (a row
    between images and a frame around everything) is background. So no 8-connected object spans
    two images, and every image's border-touching background joins one *outer* background region,
    which makes "is a hole" simply "is a background region other than the outer one".

    Shape:
        pixels: (N * (H + 1) + 1, W + 2); interior(pixels): (N, H, W).
    """

    def __init__(self, n: int, height: int, width: int) -> None:
        self.n, self.height, self.width = n, height, width
        self.pixels = np.zeros((n * (height + 1) + 1, width + 2), dtype=np.uint8)

    def interior(self, array: np.ndarray) -> np.ndarray:
        """The (N, H, W) view of the images inside a framed array."""
        return array[1:].reshape(self.n, self.height + 1, self.width + 2)[:, : self.height, 1:-1]

    def image_of_row(self, row: np.ndarray) -> np.ndarray:
        """Index of the image that a framed row belongs to (rows inside images only)."""
        return (row - 1) // (self.height + 1)


def _label(pixels: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, stats) of the non-zero pixels' components; label 0 is the zero pixels."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        pixels, connectivity=connectivity, ltype=cv2.CV_32S
    )
    return labels, stats


def _filled(mask: np.ndarray) -> np.ndarray:
    """Fill holes: foreground plus every 4-connected background region but the outer one.

    Equals :func:`scipy.ndimage.binary_fill_holes` of each image (tests check it), in one
    connected-components pass over the batch instead of an iterated dilation.
    """
    background = (mask == 0).view(np.uint8)
    _, labels = cv2.connectedComponents(background, connectivity=4, ltype=cv2.CV_32S)
    return labels != labels[0, 0]  # fg pixels are label 0, the outer region is labels[0, 0]


def apply_postprocess(
    prob: np.ndarray, params: PostprocessParams, nonempty: np.ndarray | None = None
) -> np.ndarray:
    """Threshold probabilities, remove small objects, optionally fill holes — in that order;
    then empty the masks of images the aux head calls empty (``params.gate``).

    Args:
        prob: foreground probabilities.
        params: threshold (foreground where prob > threshold), min_area (8-connected objects of
            fewer pixels are removed) and fill_holes (4-connected background regions that do not
            reach the image border become foreground), gate (see ``nonempty``).
        nonempty: per image, the aux head's probability that the mask is non-empty; images
            below ``params.gate`` get an empty mask. None (no aux head) disables the gate.

    Returns:
        uint8 mask with values {0, 1}.

    Shape:
        prob and output: (H, W) or (N, H, W); nonempty: () or (N,).
    """
    prob = np.asarray(prob)
    if prob.ndim not in (2, 3):
        raise ValueError(f"apply_postprocess expects (H, W) or (N, H, W), got shape {prob.shape}")
    batch = prob[None] if prob.ndim == 2 else prob
    n, height, width = batch.shape
    out = np.empty(batch.shape, dtype=np.uint8)
    for chunk in _chunks(n, height * width):
        framed = _Framed(batch[chunk].shape[0], height, width)
        np.greater(batch[chunk], params.threshold, out=framed.interior(framed.pixels.view(bool)))
        mask = framed.pixels
        if params.min_area > 1:  # every object has at least 1 pixel
            labels, stats = _label(mask, 8)
            keep = stats[:, cv2.CC_STAT_AREA] >= params.min_area
            keep[0] = False
            mask = keep[labels].view(np.uint8)
        if params.fill_holes:
            mask = _filled(mask).view(np.uint8)
        out[chunk] = framed.interior(mask)
    if nonempty is not None and params.gate > 0:
        out[np.asarray(nonempty, dtype=np.float32).reshape(n) < params.gate] = 0
    return out[0] if prob.ndim == 2 else out


def _top_row_pixels(
    labels: np.ndarray, stats: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, ...]:
    """(id, flat position) of every pixel in the top row of each component in ``ids``.

    Scans only each component's bounding-box top row (from the OpenCV stats), not the image.
    """
    top = stats[ids, cv2.CC_STAT_TOP].astype(np.int64)
    left = stats[ids, cv2.CC_STAT_LEFT].astype(np.int64)
    width = stats[ids, cv2.CC_STAT_WIDTH].astype(np.int64)
    owner = np.repeat(ids, width)
    offset = np.arange(owner.size) - np.repeat(np.cumsum(width) - width, width)
    position = np.repeat(top * labels.shape[1] + left, width) + offset
    on_component = labels.ravel()[position] == owner
    return owner[on_component], position[on_component]


def _max_over_ancestors(value: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """max(value) over each node and its ancestors in a forest whose roots are their own parent.

    Pointer jumping: after round k each node has seen its 2**k nearest ancestors, so the number
    of vectorised rounds is the log of the depth.
    """
    value = value.copy()
    ancestor = parent.copy()
    for _ in range(64):
        np.maximum(value, value[ancestor], out=value)
        next_ancestor = ancestor[ancestor]
        if np.array_equal(next_ancestor, ancestor):
            return value
        ancestor = next_ancestor
    raise RuntimeError("component tree has a cycle")  # unreachable: parents enclose children


def _grid_counts(
    prob: np.ndarray,
    truth: np.ndarray,
    thresholds: list[float],
    min_areas: list[int],
    fill_options: list[bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (intersection, predicted area) at every grid point, for one chunk of images.

    Objects are labelled once per threshold; every min_area then only selects objects by size.
    Without hole filling, a min_area keeps the objects of area >= min_area.

    With hole filling (after removal), the result is derived from the *inclusion tree*: with
    8-connected objects and 4-connected background, objects and background regions form a tree
    (Rosenfeld), rooted at the outer background, in which each region's parent is the one that
    encloses it. A pixel of ``fill_holes(kept objects)`` is one whose region is a kept object or
    lies inside one, i.e. whose region has an object ancestor-or-self of area >= min_area: the
    largest such area, per region, is one max over ancestors. The parent of a region is the
    region just above any pixel of its top row (nothing of the region or of its own holes can be
    above its top row).

    Shape:
        prob, truth: (N, H, W); outputs: (len(thresholds), len(min_areas), len(fill_options), N).
    """
    n, height, width = prob.shape
    # Images entirely below (or above) a threshold need no labelling: empty (or one object).
    # A NaN is background, as in apply_postprocess: fmax skips it, min propagates it (not full).
    image_max = np.fmax.reduce(prob.reshape(n, -1), axis=1)
    image_min = prob.reshape(n, -1).min(axis=1)
    truth_area = np.count_nonzero(truth, axis=(1, 2))
    # Truth pixels as positions in a framed layout of the whole chunk, moved per threshold to
    # the layout of the images that are labelled (image i in slot j: shifted by j - i slots).
    everything = _Framed(n, height, width)
    truth_framed = np.zeros(everything.pixels.shape, dtype=bool)
    everything.interior(truth_framed)[...] = truth
    truth_position = np.flatnonzero(truth_framed)
    truth_image = everything.image_of_row(truth_position // everything.pixels.shape[1])
    slot_size = (height + 1) * (width + 2)
    shape = (len(thresholds), len(min_areas), len(fill_options), n)
    intersection = np.zeros(shape, dtype=np.int64)
    pred_area = np.zeros(shape, dtype=np.int64)

    def per_image(selected: np.ndarray, image: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.bincount(image[selected], weights=weights[selected], minlength=n)

    for t_index, threshold in enumerate(thresholds):
        full = image_min > threshold
        mixed = np.flatnonzero((image_max > threshold) & ~full)
        framed = _Framed(mixed.size, height, width)
        np.greater(prob[mixed], threshold, out=framed.interior(framed.pixels.view(bool)))
        slot = np.full(n, -1)
        slot[mixed] = np.arange(mixed.size)
        on_mixed = slot[truth_image] >= 0
        positions = truth_position[on_mixed] + slot_size * (
            slot[truth_image[on_mixed]] - truth_image[on_mixed]
        )
        labels, stats = _label(framed.pixels, 8)
        area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
        area[0] = 0  # label 0 is the background
        # Slot -> image; the background's row -1 lands on the appended 0 (never selected).
        image = np.append(mixed, 0)[framed.image_of_row(stats[:, cv2.CC_STAT_TOP])]
        hits = np.bincount(labels.ravel()[positions], minlength=area.size)
        if True in fill_options:
            tree = _inclusion_tree(framed, labels, stats, hits, positions)
            node_max, node_area, node_hits, node_slot = tree
            node_image = np.append(mixed, 0)[node_slot]
        for m_index, min_area in enumerate(min_areas):
            keep = area >= min_area
            keep[0] = False
            full_kept = full if height * width >= min_area else np.zeros(n, dtype=bool)
            for f_index, fill in enumerate(fill_options):
                if fill:
                    inside = node_max >= max(min_area, 1)
                    hit_count = per_image(inside, node_image, node_hits)
                    area_count = per_image(inside, node_image, node_area)
                else:
                    hit_count = per_image(keep, image, hits)
                    area_count = per_image(keep, image, area)
                intersection[t_index, m_index, f_index] = hit_count + truth_area * full_kept
                pred_area[t_index, m_index, f_index] = area_count + height * width * full_kept
    return intersection, pred_area


def _inclusion_tree(
    framed: _Framed,
    labels: np.ndarray,
    stats: np.ndarray,
    hits: np.ndarray,
    truth_position: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Regions of a thresholded batch as tree nodes: (max object area over ancestors-or-self,
    area, truth pixels, slot of the image) per node. Nodes 1..K are the objects (their labels),
    K + b the background region b >= 1; node 0 and the outer background have max 0, so they are
    never selected, and slot -1.
    """
    n_objects = stats.shape[0] - 1
    columns = labels.shape[1]
    background = (framed.pixels == 0).view(np.uint8)
    bg_labels, bg_stats = _label(background, 4)
    outer = int(bg_labels[0, 0])
    n_nodes = n_objects + bg_stats.shape[0]
    parent = np.arange(n_nodes)
    # An object's parent is background: the region above its top row.
    owner, position = _top_row_pixels(labels, stats, np.arange(1, n_objects + 1))
    parent[owner] = n_objects + bg_labels.ravel()[position - columns]
    # A hole's parent is an object: the object above its top row.
    holes = np.arange(1, bg_stats.shape[0])
    owner, position = _top_row_pixels(bg_labels, bg_stats, holes[holes != outer])
    parent[n_objects + owner] = labels.ravel()[position - columns]
    object_area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    object_area[0] = 0
    own = np.zeros(n_nodes, dtype=np.int64)
    own[: n_objects + 1] = object_area
    node_max = _max_over_ancestors(own, parent)
    bg_area = bg_stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    node_area = np.concatenate((object_area, bg_area))
    node_hits = np.concatenate(
        (
            hits,
            np.bincount(bg_labels.ravel()[truth_position], minlength=bg_stats.shape[0])[1:],
        )
    )
    node_slot = framed.image_of_row(
        np.concatenate((stats[:, cv2.CC_STAT_TOP], bg_stats[1:, cv2.CC_STAT_TOP]))
    )
    return node_max, node_area, node_hits, node_slot


def tune_postprocess(
    probs: np.ndarray,
    truths: np.ndarray,
    thresholds: Sequence[float],
    min_areas: Sequence[int],
    fill_holes_options: Sequence[bool] = (False,),
    metric: str = "kaggle",
    nonempty: np.ndarray | None = None,
    gates: Sequence[float] = (),
) -> tuple[PostprocessParams, pd.DataFrame]:
    """Grid-search the post-processing that maximises the mean per-image ``metric``.

    Every combination of threshold, min_area and fill_holes is scored exactly as
    :func:`apply_postprocess` followed by :func:`segflow.model.metrics.per_image_scores` would score it,
    but connected components are computed once per threshold and image (see ``_grid_counts``).
    Duplicate grid values are scored once.

    Args:
        probs: out-of-fold foreground probabilities.
        truths: the true masks, bool or 0/1.
        thresholds: candidate thresholds, each in (0, 1).
        min_areas: candidate minimum object areas in pixels, each >= 0.
        fill_holes_options: candidate fill_holes values.
        metric: ``"dice"``, ``"iou"`` or ``"kaggle"``.
        nonempty: the aux head's per-image non-empty probabilities, or None (no aux head).
        gates: candidate gates in [0, 1) (used with ``nonempty``); 0, no gate, is always tried.

    Returns:
        (best, grid): grid has columns threshold, min_area, fill_holes, gate, score (mean over
        the images), one row per grid point, best first. Scores equal to 12 decimals are ties,
        broken toward the lower threshold, then the smaller min_area, then no hole filling,
        then the lower gate, so the choice is deterministic and prefers the least aggressive
        post-processing.

    Shape:
        probs, truths: (N, H, W); nonempty: (N,).
    """
    if metric not in METRIC_NAMES:
        raise SegflowError(
            f"postprocess.metric: unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}"
        )
    grid_t = _validated_grid(thresholds, "postprocess.thresholds", _check_threshold)
    grid_m = _validated_grid(min_areas, "postprocess.min_areas", _check_min_area)
    grid_f = _validated_grid(fill_holes_options, "postprocess.fill_holes_options", _check_bool)
    grid_g = [0.0]
    if nonempty is not None:
        grid_g = _validated_grid([0.0, *gates], "postprocess.gates", _check_gate)
        nonempty = np.asarray(nonempty, dtype=np.float32)
        if nonempty.shape != (len(probs),):
            raise ValueError(f"nonempty must have shape ({len(probs)},), got {nonempty.shape}")
    probs = np.asarray(probs)
    truths = np.asarray(truths)
    if probs.ndim != 3 or probs.shape != truths.shape:
        raise ValueError(
            f"probs and truths must both have shape (N, H, W), got {probs.shape} and {truths.shape}"
        )
    if probs.shape[0] == 0:
        raise SegflowError("cannot tune post-processing on zero images")
    if probs.size == 0:
        raise ValueError(f"images of shape {probs.shape[1:]} have no pixels")
    truths = truths != 0
    n, height, width = probs.shape
    shape = (len(grid_t), len(grid_m), len(grid_f), n)
    intersection = np.empty(shape, dtype=np.int64)
    pred_area = np.empty(shape, dtype=np.int64)
    for chunk in _chunks(n, height * width):
        intersection[..., chunk], pred_area[..., chunk] = _grid_counts(
            probs[chunk], truths[chunk], grid_t, grid_m, grid_f
        )
    truth_area = np.count_nonzero(truths, axis=(1, 2))
    rows = []
    for gate in grid_g:
        # A gated image predicts nothing: no intersection, no predicted area.
        kept = np.ones(n, dtype=bool) if nonempty is None else ~(nonempty < gate)
        for index in np.ndindex(*shape[:3]):
            scores = scores_from_counts(
                metric, intersection[index] * kept, pred_area[index] * kept, truth_area
            )
            t_index, m_index, f_index = index
            rows.append(
                (grid_t[t_index], grid_m[m_index], grid_f[f_index], gate, float(scores.mean()))
            )
    grid = pd.DataFrame(rows, columns=["threshold", "min_area", "fill_holes", "gate", "score"])
    order = np.lexsort(
        (
            grid["gate"].to_numpy(),
            grid["fill_holes"].to_numpy(),
            grid["min_area"].to_numpy(),
            grid["threshold"].to_numpy(),
            -grid["score"].round(_TIE_DECIMALS).to_numpy(),
        )
    )
    grid = grid.iloc[order].reset_index(drop=True)
    best = grid.iloc[0]
    params = PostprocessParams(
        threshold=float(best["threshold"]),
        min_area=int(best["min_area"]),
        fill_holes=bool(best["fill_holes"]),
        gate=float(best["gate"]),
    )
    return params, grid


def _validated_grid(values: Sequence[Any], key: str, check: Any) -> list[Any]:
    """Sorted distinct grid values, each validated; the key names the config entry."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise SegflowError(f"{key} must be a list, got {values!r}")
    if len(values) == 0:
        raise SegflowError(f"{key} is empty; give at least one value")
    for value in values:
        check(value, key)
    return sorted({value.item() if isinstance(value, np.generic) else value for value in values})


@dataclass(frozen=True)
class WatershedParams:
    """How touching objects are split (``submission.split_touching``; tuned on the OOF by
    tune-postprocess from ``postprocess.min_distances`` and ``postprocess.compactnesses``)."""

    min_distance: int = option(3, "least distance in pixels between two objects' centres")
    compactness: float = option(
        0.0, "compact watershed's compactness (skimage): 0 classic, larger: rounder basins"
    )

    def __post_init__(self) -> None:
        _check_min_distance(self.min_distance, "postprocess.min_distance")
        _check_compactness(self.compactness, "postprocess.compactness")


def _check_min_distance(value: Any, key: str) -> None:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise SegflowError(f"{key} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise SegflowError(f"{key} must be >= 1, got {value}")


def _check_compactness(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise SegflowError(f"{key} must be a number >= 0, got {value!r}")
    if not 0.0 <= float(value) < float("inf"):
        raise SegflowError(f"{key} must be a finite number >= 0, got {value!r}")


def label_instances(
    mask: np.ndarray,
    split_touching: bool = False,
    min_distance: int = 3,
    compactness: float = 0.0,
) -> np.ndarray:
    """Label the objects of a binary mask, optionally splitting touching objects.

    Without splitting, objects are the 8-connected components. With ``split_touching``, each
    component is split by a watershed of its (slightly smoothed) distance transform, one basin
    per distance peak (:func:`skimage.feature.peak_local_max`, peaks at least ``min_distance``
    pixels apart, peaks on one plateau merged): two round objects joined by a neck become two.
    Larger ``min_distance`` splits less; elongated or irregular objects can still be over-split,
    and strongly overlapping ones left joined (on tilted ellipses and pairs of discs overlapping
    by a fifth of their radii, about 95 % of each come out right at the default).
    ``compactness`` > 0 makes it skimage's compact watershed (basins grow rounder, cutting
    closer to the straight line between two centres); 0 is the classic watershed.

    Args:
        mask: binary mask; any non-zero pixel is foreground.
        split_touching: split components with a distance-transform watershed.
        min_distance: minimum distance in pixels between two objects' centres when splitting.
        compactness: the watershed's compactness, >= 0.

    Returns:
        int32 labels: 0 background, objects numbered 1..K.

    Shape:
        mask and output: (H, W).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"label_instances expects a 2-D mask, got shape {mask.shape}")
    params = WatershedParams(min_distance, compactness)
    binary = (mask != 0).astype(np.uint8)
    _, components = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    if not split_touching or not binary.any():
        return components
    return _watershed_split(binary, components, _smoothed_distance(binary), params)


def _smoothed_distance(binary: np.ndarray) -> np.ndarray:
    """The distance transform of a non-empty uint8 mask, smoothed inside the mask only.

    Smoothed a little so that the zigzag of a rasterised outline (a tilted ellipse) does not
    raise several peaks along one object's axis.
    """
    distance = ndimage.gaussian_filter(
        ndimage.distance_transform_edt(binary), _DISTANCE_SIGMA, mode="constant"
    )
    distance[binary == 0] = 0  # no smoothing leak: every peak is a local max of its own object
    return distance


def _watershed_split(
    binary: np.ndarray, components: np.ndarray, distance: np.ndarray, params: WatershedParams
) -> np.ndarray:
    """Split the components of a non-empty mask with a watershed of ``distance``
    (:func:`label_instances` with ``split_touching``)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    peaks = tuple(
        peak_local_max(
            distance, min_distance=params.min_distance, labels=components, exclude_border=False
        ).T
    )
    # Peaks on one connected plateau of local maxima (the ridge of a rectangle, say) are one
    # object's centre: give them one marker, or a bar would be cut into min_distance pieces.
    plateau = (distance == ndimage.maximum_filter(distance, size=3)) & (binary != 0)
    _, plateau_labels = cv2.connectedComponents(
        plateau.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    seeds = np.unique(plateau_labels[peaks])
    marker_of_plateau = np.zeros(int(plateau_labels.max()) + 1, dtype=np.int32)
    marker_of_plateau[seeds] = np.arange(1, seeds.size + 1, dtype=np.int32)
    markers = np.zeros(binary.shape, dtype=np.int32)
    markers[peaks] = marker_of_plateau[plateau_labels[peaks]]
    # 8-connected flooding, as the components are: a diagonal step stays in its object.
    labels = watershed(
        -distance,
        markers,
        mask=binary != 0,
        connectivity=2,
        compactness=float(params.compactness),
    ).astype(np.int32)
    # A component without a peak (too small for peak_local_max) gets no basin; keep it whole.
    unreached = (binary != 0) & (labels == 0)
    if unreached.any():
        _, rest = cv2.connectedComponents(
            unreached.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        labels[rest > 0] = rest[rest > 0] + seeds.size
    return labels


def tune_watershed(
    masks: np.ndarray,
    true_instances: Sequence[np.ndarray],
    min_distances: Sequence[int],
    compactnesses: Sequence[float],
) -> tuple[WatershedParams, pd.DataFrame, float]:
    """Grid-search the watershed that splits touching objects, by the instance metric.

    Each grid point labels every mask with :func:`label_instances` (``split_touching``) and is
    scored by the mean over the images of
    :func:`segflow.model.metrics.instance_precision_iou` (DSB 2018) against the true objects.
    The distance transform is computed once per image, the peaks once per min_distance.

    Args:
        masks: post-processed OOF masks (any non-zero pixel is foreground).
        true_instances: per image, the true objects as a label image (0 background).
        min_distances: candidate marker distances, each an integer >= 1.
        compactnesses: candidate compactnesses, each >= 0 (0: classic watershed).

    Returns:
        (best, grid, unsplit): grid has columns min_distance, compactness, score, best first;
        scores equal to 12 decimals are ties, broken toward the smaller compactness, then the
        larger min_distance (the least splitting). unsplit is the mean score of the 8-connected
        components, no splitting.

    Shape:
        masks: (N, H, W); true_instances: N label images of the masks' (H, W).
    """
    grid_d = _validated_grid(min_distances, "postprocess.min_distances", _check_min_distance)
    grid_c = _validated_grid(compactnesses, "postprocess.compactnesses", _check_compactness)
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(true_instances) != len(masks):
        raise ValueError(
            f"masks must be (N, H, W) with one truth each, got {masks.shape} and "
            f"{len(true_instances)} truths"
        )
    if len(masks) == 0:
        raise SegflowError("cannot tune the watershed on zero images")
    scores = np.zeros((len(grid_d), len(grid_c)))
    unsplit = 0.0
    for mask, truth in zip(masks, true_instances, strict=True):
        binary = (mask != 0).astype(np.uint8)
        _, components = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
        plain = instance_precision_iou(components, truth)
        unsplit += plain
        if not binary.any():
            scores += plain
            continue
        distance = _smoothed_distance(binary)
        for d_index, c_index in np.ndindex(*scores.shape):
            params = WatershedParams(grid_d[d_index], grid_c[c_index])
            labels = _watershed_split(binary, components, distance, params)
            scores[d_index, c_index] += instance_precision_iou(labels, truth)
    rows = [
        (grid_d[d], float(grid_c[c]), float(scores[d, c] / len(masks)))
        for d, c in np.ndindex(*scores.shape)
    ]
    grid = pd.DataFrame(rows, columns=["min_distance", "compactness", "score"])
    order = np.lexsort(
        (
            -grid["min_distance"].to_numpy(),
            grid["compactness"].to_numpy(),
            -grid["score"].round(_TIE_DECIMALS).to_numpy(),
        )
    )
    grid = grid.iloc[order].reset_index(drop=True)
    best = WatershedParams(int(grid["min_distance"].iloc[0]), float(grid["compactness"].iloc[0]))
    return best, grid, unsplit / len(masks)


def tune_classes(
    probs: np.ndarray,
    truths: np.ndarray,
    classes: Sequence[str],
    thresholds: Sequence[float],
    min_areas: Sequence[int],
    fill_holes_options: Sequence[bool] = (False,),
    metric: str = "kaggle",
    nonempty: np.ndarray | None = None,
    gates: Sequence[float] = (),
) -> tuple[list[PostprocessParams], pd.DataFrame, dict[str, Any]]:
    """:func:`tune_postprocess` for each class on its own (the metric is a mean over classes,
    so the per-class optima are the joint optimum).

    Args:
        probs: OOF probabilities, one map per class.
        truths: packed label masks (bit k = class k; binary masks are {0, 1}).
        classes: class names in bit order.
        thresholds, min_areas, fill_holes_options, metric, gates: the grid, as in
            :func:`tune_postprocess`.
        nonempty: the aux head's non-empty probabilities per image and class, or None.

    Returns:
        (best parameters per class, the whole grid with a ``class`` column, JSON-ready summary
        with ``metric``, ``score`` and ``score_at_0.5`` (means over classes) and ``classes``:
        one record per class with its parameters and scores).

    Shape:
        probs: (N, K, H, W); truths: (N, H, W); nonempty: (N, K).
    """
    if probs.ndim != 4 or probs.shape[1] != len(classes):
        raise SegflowError(
            f"probabilities of shape {probs.shape} do not hold one map per class ({len(classes)})"
        )
    truths = np.asarray(truths)
    best_params, grids, records = [], [], []
    for k, name in enumerate(classes):
        params, grid = tune_postprocess(
            np.asarray(probs[:, k], dtype=np.float32),
            (truths >> k) & 1,
            thresholds,
            min_areas,
            fill_holes_options,
            metric,
            None if nonempty is None else nonempty[:, k],
            gates,
        )
        plain = grid[
            (grid["threshold"] == 0.5)
            & (grid["min_area"] == 0)
            & ~grid["fill_holes"]
            & (grid["gate"] == 0)
        ]["score"]
        best_params.append(params)
        grids.append(grid.assign(**{"class": name}))
        records.append(
            {
                "class": name,
                **dataclasses.asdict(params),
                "score": float(grid["score"].iloc[0]),
                "score_at_0.5": float(plain.iloc[0]) if len(plain) else None,
            }
        )
    defaults = [r["score_at_0.5"] for r in records]
    summary = {
        "metric": metric,
        "score": float(np.mean([r["score"] for r in records])),
        "score_at_0.5": None if None in defaults else float(np.mean(defaults)),
        "classes": records,
    }
    grid = pd.concat(grids, ignore_index=True)
    return best_params, grid[["class", *[c for c in grid.columns if c != "class"]]], summary


def params_from_summary(summary: dict[str, Any], classes: Sequence[str]) -> list[PostprocessParams]:
    """The per-class parameters of a :func:`tune_classes` summary (``params.json``), in the
    order of ``classes``.

    Raises:
        SegflowError: the summary's classes are not ``classes``.
    """
    records = summary.get("classes")
    if not isinstance(records, list) or [r.get("class") for r in records] != list(classes):
        found = [r.get("class") for r in records] if isinstance(records, list) else records
        raise SegflowError(
            f"post-processing parameters are for classes {found}, the data has {list(classes)}"
        )
    fields = [f.name for f in dataclasses.fields(PostprocessParams)]
    return [PostprocessParams(**{name: record[name] for name in fields}) for record in records]


def apply_classes(
    probs: np.ndarray, params: Sequence[PostprocessParams], nonempty: np.ndarray | None = None
) -> np.ndarray:
    """:func:`apply_postprocess` per class with its own parameters.

    Shape:
        probs: (N, K, H, W); nonempty: (N, K); output: (N, K, H, W) uint8 {0, 1}.
    """
    if probs.ndim != 4 or probs.shape[1] != len(params):
        raise SegflowError(f"probabilities of shape {probs.shape} but {len(params)} classes")
    return np.stack(
        [
            apply_postprocess(
                np.asarray(probs[:, k], dtype=np.float32),
                class_params,
                None if nonempty is None else nonempty[:, k],
            )
            for k, class_params in enumerate(params)
        ],
        axis=1,
    )


WATERSHED_KEY = "watershed"
"""Key of a class record of ``params.json`` holding its tuned :class:`WatershedParams`."""


def watershed_from_summary(
    summary: dict[str, Any], classes: Sequence[str]
) -> list[WatershedParams] | None:
    """The per-class watershed parameters tune-postprocess chose (instance mode with
    ``split_touching``), in the order of ``classes``; None when it tuned none.

    Raises:
        SegflowError: the summary's classes are not ``classes``, or only some have parameters.
    """
    params_from_summary(summary, classes)  # checks the classes
    records = summary["classes"]
    tuned = [WATERSHED_KEY in record for record in records]
    if not any(tuned):
        return None
    if not all(tuned):
        raise SegflowError("post-processing parameters tune the watershed of some classes only")
    fields = [f.name for f in dataclasses.fields(WatershedParams)]
    return [
        WatershedParams(**{name: record[WATERSHED_KEY][name] for name in fields})
        for record in records
    ]
