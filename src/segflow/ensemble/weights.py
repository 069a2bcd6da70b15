"""Ensembling of several experiments' probabilities: weighted blends and OOF-tuned weights.

Every experiment contributes float16 probabilities of shape (N, K, H, W), row-aligned to the
same id table (the caller aligns them). :func:`blend` is the weighted mean, computed in chunks of
images so memory-mapped inputs are never loaded whole; :func:`blend_nonempty` does the same for
the aux-head non-empty probabilities; :func:`vote` is the hard majority vote (``ensemble.mode:
vote``); :func:`tune_weights` searches the weight simplex for the blend with the best
out-of-fold score; :func:`blend_predictions` and :func:`vote_predictions` apply them to whole
predictions (probabilities, aux-head gates and MC-dropout maps).

A blend is computed as ``w_0 * p_0 + w_1 * p_1 + ...`` in float32, in experiment order, with the
weights normalised to sum 1, then rounded to float16. :func:`tune_weights` scores exactly that
float16 blend, so a tuned score is reproduced by thresholding :func:`blend`'s output.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segflow.artifacts.predictions import (
    Prediction,
    nonempty_probs,
    with_gates,
    without_gates,
)
from segflow.artifacts.truths import class_truths
from segflow.core.errors import SegflowError
from segflow.model.metrics import METRIC_NAMES, scores_from_counts

log = logging.getLogger(__name__)

# Largest weight grid searched exhaustively; beyond it tune_weights uses coordinate ascent.
MAX_GRID_POINTS = 2000
# Images are evaluated in chunks of about this many pixels per experiment and class.
_CHUNK_PIXELS = 1 << 21
# Pixels whose every experiment is this far below the lowest threshold (above the highest) are
# background (foreground) in every blend: a convex combination stays within the experiments'
# range up to float32 rounding, and float16 rounding moves a value <= 1 by at most 2**-12.
_SURE_MARGIN = 1e-3
# Contested pixels are kept in memory between evaluation passes up to this many bytes.
_CACHE_BYTES = 512 << 20
# Per-image counts of one batch of weight vectors are bounded by this many bytes.
_BATCH_BYTES = 64 << 20
# Scores closer than this are ties (means of equal per-image scores summed in another order).
_TIE_DECIMALS = 12


def _check_probs(probs: Sequence[np.ndarray]) -> tuple[int, int, int, int]:
    """The common (N, K, H, W) shape of the experiments' probabilities."""
    if isinstance(probs, np.ndarray) or len(probs) == 0:
        raise SegflowError("ensemble: give a list of at least one experiment's probabilities")
    shape = tuple(np.shape(probs[0]))
    if len(shape) != 4:
        raise SegflowError(f"ensemble: probabilities must have shape (N, K, H, W), got {shape}")
    for index, array in enumerate(probs):
        if tuple(np.shape(array)) != shape:
            raise SegflowError(
                f"ensemble: experiment {index} has probabilities of shape {np.shape(array)}, "
                f"experiment 0 has {shape}; every experiment must predict the same images"
            )
    n_images, n_classes, height, width = shape
    return n_images, n_classes, height, width


def _normalised_weights(weights: Sequence[float] | np.ndarray, n_experiments: int) -> np.ndarray:
    """Weights as float64 summing to 1.

    Raises:
        SegflowError: wrong count, a negative or non-finite weight, or all weights zero.
    """
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (n_experiments,):
        raise SegflowError(
            f"ensemble.weights: {values.size} weights for {n_experiments} experiments"
        )
    if not np.isfinite(values).all() or (values < 0).any():
        raise SegflowError(f"ensemble.weights must be finite and >= 0, got {values.tolist()}")
    total = values.sum()
    if total <= 0:
        raise SegflowError("ensemble.weights are all zero; give at least one positive weight")
    return values / total


def _weighted_sum(planes: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_e weights[..., e] * planes[e]`` in float32, accumulated in experiment order.

    The one place blends are computed, so :func:`blend` and :func:`tune_weights` round alike.
    Leaving out an experiment of weight 0 changes nothing: it adds +0.

    Args:
        planes: one float32 array per experiment, all of one shape S.
        weights: float32 weights, (E,) for one blend or (B, E) for B blends at once.

    Returns:
        float32 blend(s).

    Shape:
        output: S for (E,) weights, (B, *S) for (B, E) weights.
    """
    spread = (Ellipsis,) + (None,) * planes[0].ndim  # weights[..., e] over the plane's axes
    # The first product is the running total (0 + x is x), so it is written in place.
    total = np.multiply(weights[..., 0][spread], planes[0], dtype=np.float32)
    scratch = np.empty_like(total)
    for index in range(1, len(planes)):
        np.multiply(weights[..., index][spread], planes[index], out=scratch)
        np.add(total, scratch, out=total)
    return total


def blend(
    probs: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Weighted mean of several experiments' probabilities.

    Args:
        probs: one probability array per experiment (float16; memmaps are read a chunk at a
            time), row-aligned to one id table.
        weights: one weight >= 0 per experiment, not all zero; normalised to sum 1. Experiments
            of weight 0 are not read.
        chunk: images blended at a time (bounds the float32 working memory).

    Returns:
        The blend, float16.

    Shape:
        probs[e]: (N, K, H, W); weights: (E,); output: (N, K, H, W).

    Raises:
        SegflowError: no experiments, shapes that differ, bad weights or chunk.
    """
    shape = _check_probs(probs)
    weights32 = _normalised_weights(weights, len(probs)).astype(np.float32)
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise SegflowError(f"ensemble.chunk must be an integer >= 1, got {chunk!r}")
    used = np.flatnonzero(weights32)
    out = np.empty(shape, dtype=np.float16)
    for start in range(0, shape[0], chunk):
        rows = slice(start, min(start + chunk, shape[0]))
        planes = [np.asarray(probs[e][rows], dtype=np.float32) for e in used]
        out[rows] = _weighted_sum(planes, weights32[used])
    return out


VOTE_THRESHOLD = 0.5
ENSEMBLE_MODES = ("mean", "vote")


def vote(
    probs: Sequence[np.ndarray], threshold: float = VOTE_THRESHOLD, chunk: int = 256
) -> np.ndarray:
    """Hard majority voting: per pixel, the share of experiments whose mask covers it.

    Each experiment's mask is its probability > ``threshold`` (foreground as
    :func:`segflow.model.postprocess.apply_postprocess` thresholds), every experiment one vote.
    The result is the vote share k / E, so thresholding it at 0.5 gives the strict majority
    (ties - half the votes with an even E - are background) and the post-processing tuner
    may pick another count (threshold 0.3 on three experiments: at least one vote).

    Args:
        probs: one probability array per experiment (float16; memmaps are read a chunk at a
            time), row-aligned to one id table.
        threshold: each experiment's binarisation threshold, in (0, 1).
        chunk: images voted at a time.

    Returns:
        The vote shares, float16.

    Shape:
        probs[e]: (N, K, H, W); output: (N, K, H, W).

    Raises:
        SegflowError: no experiments, shapes that differ, a bad threshold or chunk.
    """
    shape = _check_probs(probs)
    if not 0 < threshold < 1:
        raise SegflowError(f"ensemble vote threshold must be in (0, 1), got {threshold!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise SegflowError(f"ensemble.chunk must be an integer >= 1, got {chunk!r}")
    cut = np.float32(threshold)
    out = np.empty(shape, dtype=np.float16)
    for start in range(0, shape[0], chunk):
        rows = slice(start, min(start + chunk, shape[0]))
        votes = np.zeros((rows.stop - rows.start, *shape[1:]), dtype=np.int32)
        for array in probs:
            votes += np.asarray(array[rows], dtype=np.float32) > cut
        out[rows] = votes.astype(np.float32) / np.float32(len(probs))
    return out


def blend_nonempty(
    nonempty: Sequence[np.ndarray | None], weights: Sequence[float] | np.ndarray
) -> np.ndarray | None:
    """Weighted mean of the aux-head non-empty probabilities of the experiments that have them.

    The weights of the experiments with an aux head are renormalised among themselves, so the
    result is a probability even when only some experiments have one.

    Args:
        nonempty: per experiment, its (N, K) non-empty probabilities
            (:func:`segflow.artifacts.predictions.nonempty_probs`), or None without an aux head.
        weights: the blend's weights, one per experiment (as given to :func:`blend`).

    Returns:
        float32 non-empty probabilities, or None when no experiment of positive weight has an
        aux head.

    Shape:
        nonempty[e]: (N, K); weights: (E,); output: (N, K).

    Raises:
        SegflowError: bad weights, or aux-head arrays of different shapes.
    """
    normalised = _normalised_weights(weights, len(nonempty))
    present = [e for e, array in enumerate(nonempty) if array is not None and normalised[e] > 0]
    if not present:
        return None
    arrays = [np.asarray(nonempty[e], dtype=np.float32) for e in present]
    for e, array in zip(present, arrays, strict=True):
        if array.ndim != 2 or array.shape != arrays[0].shape:
            raise SegflowError(
                f"ensemble: experiment {e} has non-empty probabilities of shape {array.shape}, "
                f"expected (N, K) {arrays[0].shape}"
            )
    renormalised = normalised[present] / normalised[present].sum()
    return _weighted_sum(arrays, renormalised.astype(np.float32))


def _blend_uncertainty(
    predictions: Sequence[Prediction], weights: Sequence[float] | np.ndarray
) -> np.ndarray | None:
    """The weighted mean of the experiments' MC-dropout maps when every one has a map."""
    maps = [p.uncertainty for p in predictions if p.uncertainty is not None]
    if not maps or len(maps) != len(predictions):
        return None
    return blend(maps, weights)


def blend_predictions(
    predictions: Sequence[Prediction], weights: Sequence[float] | np.ndarray, n_classes: int
) -> Prediction:
    """The experiments' row-aligned predictions blended with ``weights``: probabilities by
    :func:`blend`, aux-head gates by
    :func:`blend_nonempty`, MC-dropout maps (when every experiment
    has one) by the same weighted mean.

    Returns:
        The blend (float16 probabilities; gate columns when any weighted experiment has them).
    """
    ids = without_gates(predictions[0].ids)
    heads = [nonempty_probs(p.ids, n_classes) for p in predictions]
    gate = blend_nonempty(heads, weights)
    if gate is not None:
        ids = with_gates(ids, gate)
    return Prediction(
        ids,
        blend([p.probs for p in predictions], weights),
        _blend_uncertainty(predictions, weights),
    )


def vote_predictions(predictions: Sequence[Prediction], n_classes: int) -> Prediction:
    """The experiments' row-aligned predictions merged by majority vote
    (:func:`vote`); gates and MC-dropout maps by their plain mean.

    Returns:
        The vote shares as float16 "probabilities" (gate columns when any experiment has them).
    """
    weights = np.ones(len(predictions))
    ids = without_gates(predictions[0].ids)
    gate = blend_nonempty([nonempty_probs(p.ids, n_classes) for p in predictions], weights)
    if gate is not None:
        ids = with_gates(ids, gate)
    return Prediction(
        ids, vote([p.probs for p in predictions]), _blend_uncertainty(predictions, weights)
    )


def _float16_cut(threshold: np.float32) -> np.float32:
    """The float32 cut ``c`` with ``float16(x) > threshold`` exactly when ``x > c``.

    A blend is rounded to float16 before it is thresholded; comparing the float32 blend with
    this cut gives the same answer without the rounding pass. Let ``low`` be the largest float16
    <= threshold and ``high`` the next float16: float16(x) > threshold iff x rounds to ``high``
    or above, i.e. x is above their midpoint, or equal to it when round-half-to-even picks
    ``high`` (the midpoint is exact in float32).
    """
    low = np.float16(threshold)
    if np.float32(low) > threshold:
        low = np.nextafter(low, np.float16(-np.inf))
    high = np.nextafter(low, np.float16(np.inf))
    midpoint = (np.float32(low) + np.float32(high)) / np.float32(2)
    high_is_even = int(np.array(high).view(np.uint16)) % 2 == 0
    return np.nextafter(midpoint, np.float32(-np.inf)) if high_is_even else midpoint


@dataclass(frozen=True)
class _Contested:
    """One chunk of images of one class, reduced to the pixels whose side depends on the blend.

    Shape:
        values: (E, C) float32, the C contested pixels' probabilities per experiment, true
        pixels first (the first ``n_true``); image: (C,) chunk-local image index of each;
        sure_area, sure_hits: (n,) per image, pixels foreground in every blend (and also true).
    """

    rows: slice
    class_index: int
    values: np.ndarray
    image: np.ndarray
    n_true: int
    sure_area: np.ndarray
    sure_hits: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(
            array.nbytes for array in (self.values, self.image, self.sure_area, self.sure_hits)
        )


class _OofScorer:
    """Scores blends of OOF probabilities: mean per-image metric per class and threshold.

    Most pixels are far from every threshold in every experiment, and then in every blend too,
    so one pass sorts pixels into sure background, sure foreground (counted once) and contested
    ones; a blend is then evaluated on the contested pixels only. The contested pixels are kept
    between passes while they fit in :data:`_CACHE_BYTES`, else recomputed on every pass.
    """

    def __init__(
        self,
        probs: Sequence[np.ndarray],
        truths: np.ndarray,
        thresholds: np.ndarray,
        metric: str,
    ) -> None:
        self.probs = probs
        self.truths = truths
        self.n_images, self.n_classes, height, width = np.shape(probs[0])
        self.cuts = thresholds.astype(np.float32)  # tune_classes compares in float32 too
        self.float32_cuts = [_float16_cut(cut) for cut in self.cuts]
        self.metric = metric
        self.chunk = max(1, _CHUNK_PIXELS // max(1, height * width))
        self.truth_area = np.zeros((self.n_classes, self.n_images), dtype=np.int64)
        cache: list[_Contested] | None = []
        cached_bytes = 0
        for part, truth_area in self._contested_parts():
            self.truth_area[part.class_index, part.rows] = truth_area
            if cache is not None:
                cache.append(part)
                cached_bytes += part.nbytes
                if cached_bytes > _CACHE_BYTES:
                    cache = None
        self.cache = cache

    def _contested_parts(self) -> Iterator[tuple[_Contested, np.ndarray]]:
        """(contested pixels, true area per image) of every chunk and class."""
        low = self.cuts[0] - np.float32(_SURE_MARGIN)
        high = self.cuts[-1] + np.float32(_SURE_MARGIN)
        for start in range(0, self.n_images, self.chunk):
            rows = slice(start, min(start + self.chunk, self.n_images))
            packed = np.asarray(self.truths[rows])
            for k in range(self.n_classes):
                stack = np.stack([np.asarray(p[rows, k], dtype=np.float32) for p in self.probs])
                stack = stack.reshape(len(self.probs), stack.shape[1], -1)
                truth = class_truths(packed, k).reshape(stack.shape[1], -1)
                sure_fg = stack.min(axis=0) > high
                contested = ~sure_fg & ~(stack.max(axis=0) < low)  # NaN stays contested
                image, pixel = np.nonzero(contested)
                is_true = truth[image, pixel]
                # True pixels first: their counts are then a prefix, not a gather, per blend.
                order = np.argsort(~is_true, kind="stable")
                image, pixel = image[order], pixel[order]
                part = _Contested(
                    rows=rows,
                    class_index=k,
                    values=stack[:, image, pixel],
                    image=image.astype(np.int32),
                    n_true=int(np.count_nonzero(is_true)),
                    sure_area=np.count_nonzero(sure_fg, axis=1),
                    sure_hits=np.count_nonzero(sure_fg & truth, axis=1),
                )
                yield part, np.count_nonzero(truth, axis=1)

    def _parts(self) -> Iterator[_Contested]:
        if self.cache is not None:
            yield from self.cache
        else:
            for part, _ in self._contested_parts():
                yield part

    def _counts(self, part: _Contested, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (intersection, predicted area) of each blend at each threshold.

        Shape:
            weights: (B, E); outputs: (B, T, n) for the part's n images.
        """
        n_blends, n_levels = weights.shape[0], self.cuts.size + 1
        n = part.sure_area.size
        blended = _weighted_sum(list(part.values), weights)
        # Level of a pixel = how many thresholds its float16-rounded blend exceeds.
        level = np.zeros(blended.shape, dtype=np.uint8)
        for cut in self.float32_cuts:
            level += blended > cut
        image_bin = part.image.astype(np.int64) * n_levels
        hits = np.empty((n_blends, n, n_levels), dtype=np.int64)
        area = np.empty((n_blends, n, n_levels), dtype=np.int64)
        for index in range(n_blends):
            bins = image_bin + level[index]
            area[index] = np.bincount(bins, minlength=n * n_levels).reshape(n, n_levels)
            # True pixels come first in a part (see _contested_parts).
            hits[index] = np.bincount(bins[: part.n_true], minlength=n * n_levels).reshape(
                n, n_levels
            )
        # Pixels above threshold j = pixels at levels j + 1 and beyond.
        above = [np.cumsum(counts[..., ::-1], axis=-1)[..., -2::-1] for counts in (hits, area)]
        hits = above[0].transpose(0, 2, 1) + part.sure_hits
        area = above[1].transpose(0, 2, 1) + part.sure_area
        return hits, area

    def scores(self, weights: np.ndarray) -> np.ndarray:
        """Mean per-image metric of each blend, per class and threshold.

        Shape:
            weights: (B, E), each row as given to :func:`blend`; output: (B, K, T) float64.
        """
        n_thresholds = self.cuts.size
        per_blend = self.n_classes * n_thresholds * max(1, self.n_images) * 16
        batch = max(1, _BATCH_BYTES // per_blend)
        result = np.empty((len(weights), self.n_classes, n_thresholds))
        for first in range(0, len(weights), batch):
            # Normalised as blend() normalises them, so the scored blend is blend()'s output.
            chunk_weights = np.array(
                [_normalised_weights(row, row.size) for row in weights[first : first + batch]],
                dtype=np.float32,
            )
            shape = (len(chunk_weights), self.n_classes, n_thresholds, self.n_images)
            hits = np.zeros(shape, dtype=np.int64)
            area = np.zeros(shape, dtype=np.int64)
            for part in self._parts():
                # Sub-batches keep the (blends x contested pixels) arrays near 4M elements.
                step = max(1, (1 << 22) // max(1, part.image.size))
                for sub in range(0, len(chunk_weights), step):
                    blends = slice(sub, sub + step)
                    part_hits, part_area = self._counts(part, chunk_weights[blends])
                    hits[blends, part.class_index, :, part.rows] = part_hits
                    area[blends, part.class_index, :, part.rows] = part_area
            truth_area = np.broadcast_to(self.truth_area[None, :, None, :], shape)
            per_image = scores_from_counts(
                self.metric, hits.ravel(), area.ravel(), truth_area.ravel()
            )
            result[first : first + batch] = per_image.reshape(shape).mean(axis=-1)
        return result


def _simplex_grid(n_experiments: int, n_steps: int) -> np.ndarray:
    """Every weight vector whose components are multiples of 1 / n_steps summing to 1.

    Stars and bars: E - 1 bars among n_steps + E - 1 slots split the steps into E parts.

    Shape:
        output: (comb(n_steps + E - 1, E - 1), E) float64.
    """
    slots = n_steps + n_experiments - 1
    rows = []
    for bars in itertools.combinations(range(slots), n_experiments - 1):
        edges = np.array([-1, *bars, slots])
        rows.append(np.diff(edges) - 1)
    return np.array(rows, dtype=np.float64).reshape(-1, n_experiments) / n_steps


def _n_steps(step: float) -> int:
    if isinstance(step, bool) or not isinstance(step, int | float | np.integer | np.floating):
        raise SegflowError(f"ensemble.step must be a number in (0, 1], got {step!r}")
    if not 0 < step <= 1:
        raise SegflowError(f"ensemble.step must be in (0, 1], got {step}")
    n_steps = round(1 / step)
    if abs(n_steps * step - 1) > 1e-9:
        raise SegflowError(f"ensemble.step must divide 1 (e.g. 0.1, 0.05, 0.25), got {step}")
    return n_steps


def _thresholds(thresholds: Sequence[float]) -> np.ndarray:
    if isinstance(thresholds, str | bytes) or not isinstance(thresholds, Sequence | np.ndarray):
        raise SegflowError(f"ensemble.thresholds must be a list, got {thresholds!r}")
    values = []
    for value in thresholds:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise SegflowError(f"ensemble.thresholds must be numbers in (0, 1), got {value!r}")
        if not 0 < value < 1:
            raise SegflowError(f"ensemble.thresholds must be in (0, 1), got {value}")
        values.append(float(value))
    if not values:
        raise SegflowError("ensemble.thresholds is empty; give at least one threshold")
    return np.array(sorted(set(values)))


class _Search:
    """Every weight vector scored so far, and the best one (ties: closest to the plain mean)."""

    def __init__(self, scorer: _OofScorer, n_experiments: int) -> None:
        self.scorer = scorer
        self.mean = np.full(n_experiments, 1.0 / n_experiments)
        self.weights: list[np.ndarray] = []
        self.per_threshold: list[np.ndarray] = []  # (K, T) per weight vector
        self.seen: dict[tuple[float, ...], int] = {}

    @staticmethod
    def key(weights: np.ndarray) -> tuple[float, ...]:
        return tuple(np.round(weights, _TIE_DECIMALS).tolist())

    def score(self, candidates: np.ndarray) -> list[int]:
        """Score the candidates not scored yet; their indices into the record."""
        new = []
        for weights in candidates:
            if self.key(weights) not in self.seen:
                self.seen[self.key(weights)] = len(self.weights) + len(new)
                new.append(weights)
        if new:
            self.per_threshold.extend(self.scorer.scores(np.array(new)))
            self.weights.extend(new)
        return [self.seen[self.key(weights)] for weights in candidates]

    def total(self, index: int) -> float:
        """Mean over classes of the best-over-thresholds score."""
        return float(self.per_threshold[index].max(axis=1).mean())

    def best(self, indices: Sequence[int]) -> int:
        """The best-scoring index; ties go to the weights closest to the plain mean."""

        def order(index: int) -> tuple[float, float, tuple[float, ...]]:
            distance = float(np.linalg.norm(self.weights[index] - self.mean))
            weights = self.key(self.weights[index])
            return (-round(self.total(index), _TIE_DECIMALS), round(distance, 12), weights)

        return min(indices, key=order)


def _coordinate_ascent(search: _Search, step: float, start: int, max_rounds: int = 1000) -> int:
    """Hill-climb from a weight vector: each round tries moving ``step`` of weight (or all an
    experiment has left, if less) from one experiment to another, for every ordered pair, and
    takes the best move; stops when no move improves the score.

    Returns:
        index of the local optimum in the search record.
    """
    current = start
    n_experiments = search.weights[start].size
    for _ in range(max_rounds):
        weights = search.weights[current]
        moves = []
        for source, target in itertools.permutations(range(n_experiments), 2):
            amount = min(step, weights[source])
            if amount <= 1e-12:
                continue
            moved = weights.copy()
            moved[source] = max(0.0, moved[source] - amount)
            moved[target] += amount
            moves.append(moved / moved.sum())
        if not moves:
            break
        candidate = search.best(search.score(np.array(moves)))
        if round(search.total(candidate), _TIE_DECIMALS) <= round(
            search.total(current), _TIE_DECIMALS
        ):
            break
        current = candidate
    return current


def tune_weights(
    probs: Sequence[np.ndarray],
    truths_packed: np.ndarray,
    classes: Sequence[str],
    metric: str = "kaggle",
    step: float = 0.1,
    thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7),
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Search blend weights that maximise the out-of-fold score.

    The score of a weight vector is the mean over classes of the best, over ``thresholds``, mean
    per-image ``metric`` of its :func:`blend` thresholded at that value (foreground where
    probability > threshold, as :func:`segflow.model.postprocess.apply_postprocess`), so blends are
    not judged at one arbitrary threshold; no other post-processing is applied.

    Candidates: every vector on the simplex grid (components multiples of ``step``, summing to
    1), each experiment alone and the plain mean. When the grid has more than
    :data:`MAX_GRID_POINTS` points (e.g. 6 experiments at step 0.1: 3003), coordinate ascent
    replaces it: starting from the plain mean, repeatedly move ``step`` of weight from one
    experiment to another where that improves the score most (a local optimum, not the grid's
    global one). Either way the tuned blend scores at least as well as the plain mean and every
    single experiment. Scores equal to 12 decimals are ties, broken toward the weights closest
    (Euclidean) to the plain mean.

    Args:
        probs: OOF probabilities of each experiment, row-aligned (memmaps welcome).
        truths_packed: packed label masks (bit k = class k).
        classes: class names in bit order.
        metric: ``"dice"``, ``"iou"`` or ``"kaggle"``.
        step: grid spacing of the weights; must divide 1.
        thresholds: candidate thresholds, each in (0, 1).
        names: experiment names for the table (default ``exp0``, ``exp1``, ...).

    Returns:
        (weights, table). ``weights``: the tuned weights, summing to 1. ``table``: one row per
        candidate kind, ``single:<name>`` for each experiment, ``mean`` and ``tuned``, with
        columns kind, ``w_<name>`` per experiment, score, threshold (the best threshold; with
        several classes a JSON object of each class's best threshold).

    Shape:
        probs[e]: (N, K, H, W); truths_packed: (N, H, W); weights: (E,).

    Raises:
        SegflowError: inconsistent shapes, names or classes, unknown metric, bad step or
            thresholds.
    """
    names = _check_tuning_inputs(probs, truths_packed, classes, metric, names)
    n_experiments = len(probs)
    n_steps = _n_steps(step)
    grid_thresholds = _thresholds(thresholds)

    scorer = _OofScorer(probs, truths_packed, grid_thresholds, metric)
    search = _Search(scorer, n_experiments)
    singles = search.score(np.eye(n_experiments))
    (mean,) = search.score(search.mean[None])
    method = _search_blends(search, n_experiments, n_steps, mean)
    tuned = search.best(range(len(search.weights)))
    log.info(
        "ensemble weights: %s, %d blends scored; tuned %s = %.6f (mean %.6f)",
        method,
        len(search.weights),
        search.weights[tuned].round(4).tolist(),
        search.total(tuned),
        search.total(mean),
    )
    kinds = [*(f"single:{name}" for name in names), "mean", "tuned"]
    table = _weights_table(
        search,
        dict(zip(kinds, [*singles, mean, tuned], strict=True)),
        names,
        classes,
        grid_thresholds,
    )
    return search.weights[tuned].copy(), table


def _search_blends(search: _Search, n_experiments: int, n_steps: int, mean: int) -> str:
    """Score the simplex grid, or climb from the plain mean (index ``mean`` in ``search``)
    when the grid has more than :data:`MAX_GRID_POINTS` points; returns the method's name."""
    n_grid = math.comb(n_steps + n_experiments - 1, n_experiments - 1)
    if n_grid <= MAX_GRID_POINTS:
        search.score(_simplex_grid(n_experiments, n_steps))
        return f"grid of {n_grid} points"
    _coordinate_ascent(search, 1.0 / n_steps, mean)
    return f"coordinate ascent ({n_grid} grid points is too many)"


def _check_tuning_inputs(
    probs: Sequence[np.ndarray],
    truths_packed: np.ndarray,
    classes: Sequence[str],
    metric: str,
    names: Sequence[str] | None,
) -> list[str]:
    """:func:`tune_weights`' input checks; returns the experiment names (default exp0, ...).

    Raises:
        SegflowError: naming the inconsistent input.
    """
    n_images, n_classes, height, width = _check_probs(probs)
    n_experiments = len(probs)
    names = [f"exp{e}" for e in range(n_experiments)] if names is None else list(names)
    if len(names) != n_experiments or len(set(names)) != n_experiments:
        raise SegflowError(f"ensemble: need {n_experiments} distinct experiment names, got {names}")
    if len(classes) != n_classes:
        raise SegflowError(
            f"ensemble: probabilities hold {n_classes} classes but {len(classes)} class names "
            f"were given ({', '.join(classes)})"
        )
    if np.shape(truths_packed) != (n_images, height, width):
        raise SegflowError(
            f"ensemble: true masks of shape {np.shape(truths_packed)} do not match the "
            f"probabilities' images {(n_images, height, width)}"
        )
    if n_images == 0:
        raise SegflowError("ensemble: cannot tune weights on zero images")
    if metric not in METRIC_NAMES:
        raise SegflowError(
            f"ensemble.metric: unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}"
        )
    return names


def _weights_table(
    search: _Search,
    rows_of: dict[str, int],
    names: Sequence[str],
    classes: Sequence[str],
    grid_thresholds: np.ndarray,
) -> pd.DataFrame:
    """:func:`tune_weights`' table: one row per candidate kind (``rows_of``: kind -> index of
    its weights in ``search``), its weights, score and best threshold(s)."""
    n_classes = len(classes)
    rows = []
    for kind, index in rows_of.items():
        per_threshold = np.round(search.per_threshold[index], _TIE_DECIMALS)
        best = grid_thresholds[per_threshold.argmax(axis=1)]  # ties: the lower threshold
        threshold: float | str = (
            float(best[0])
            if n_classes == 1
            else json.dumps(dict(zip(classes, best.tolist(), strict=True)))
        )
        rows.append(
            {
                "kind": kind,
                **{
                    f"w_{name}": float(w)
                    for name, w in zip(names, search.weights[index], strict=True)
                },
                "score": search.total(index),
                "threshold": threshold,
            }
        )
    return pd.DataFrame(rows)
