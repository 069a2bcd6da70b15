"""Pseudo-labelling policy: which test images become extra training data, and with what targets.

After round 0 the test predictions of round r (merged folds, optionally an ensemble) label the
test images of round r + 1. Only images the model is sure about are used: an image is
*uncertain* in proportion to its pixels with a probability strictly between
``uncertain_low`` and ``uncertain_high``, and is selected when that share is at most
``max_uncertain_share`` (and, with ``top_fraction``, when it is among the most confident of the
remaining candidates). With ``uncertainty: mc_dropout`` a pixel is uncertain instead when the
MC-dropout standard deviation of its probability (``predict.mc_dropout_passes``, the
``uncertainty.npy`` beside the test prediction) exceeds ``uncertain_std``. Test images that duplicate a train image are never selected: their
labels are already known (the submission copies them) and they would leak into validation.

This module is the policy only; training decides how the selected images are mixed in
(``max_pseudo_share``, ``pseudo_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.core.options import option
from segflow.formats.labels import label_dtype, pack_labels

PSEUDO_LABELS = ("hard", "soft")
UNCERTAINTY_RULES = ("band", "mc_dropout")
# Images are scored in chunks of about this many pixels (bounds the float32 working memory).
_CHUNK_PIXELS = 1 << 22
# top_fraction * candidates is rounded up, but not for float noise (0.3 * 10 = 3.0000000000000004).
_COUNT_TOLERANCE = 1e-9

SELECTED = "selected"
TOO_UNCERTAIN = "too uncertain"
BELOW_TOP_FRACTION = "below top fraction"
DUPLICATE_OF_TRAIN = "duplicate of train"


@dataclass(frozen=True)
class PseudoOptions:
    """Pseudo-labelling of test images (config section ``pseudo``)."""

    rounds: int = option(0, "pseudo-label rounds after round 0 (0: no pseudo-labelling)")
    labels: str = option(
        "hard", "targets: hard (post-processed masks) or soft (probabilities)", PSEUDO_LABELS
    )
    uncertain_low: float = option(
        0.2, "a pixel is uncertain when uncertain_low < probability < uncertain_high"
    )
    uncertain_high: float = option(
        0.8, "a pixel is uncertain when uncertain_low < probability < uncertain_high"
    )
    uncertainty: str = option(
        "band",
        "what makes a pixel uncertain: band (uncertain_low < p < uncertain_high) or mc_dropout "
        "(its MC-dropout standard deviation > uncertain_std)",
        UNCERTAINTY_RULES,
    )
    uncertain_std: float = option(
        0.1, "with uncertainty mc_dropout: a pixel is uncertain when its std exceeds this"
    )
    max_uncertain_share: float | None = option(
        0.05, "select an image only if at most this share of its pixels is uncertain (None: any)"
    )
    top_fraction: float | None = option(
        None, "then keep only this most confident fraction of the candidates (None: all)"
    )
    max_pseudo_share: float = option(
        0.3, "at most this share of the images drawn per epoch are pseudo-labelled, in [0, 1)"
    )
    pseudo_weight: float = option(
        1.0, "loss weight of pseudo-labelled images relative to real ones, >= 0"
    )

    def __post_init__(self) -> None:
        """Check every option.

        Raises:
            SegflowError: naming the first invalid option as ``pseudo.<name>``.
        """
        checks: list[tuple[str, bool, str]] = [
            ("rounds", _is_int(self.rounds) and self.rounds >= 0, "an integer >= 0"),
            ("labels", self.labels in PSEUDO_LABELS, f"one of {', '.join(PSEUDO_LABELS)}"),
            (
                "uncertain_low",
                _is_number(self.uncertain_low) and 0 <= self.uncertain_low < 1,
                "a number in [0, 1)",
            ),
            (
                "uncertain_high",
                _is_number(self.uncertain_high) and 0 < self.uncertain_high <= 1,
                "a number in (0, 1]",
            ),
            (
                "uncertainty",
                self.uncertainty in UNCERTAINTY_RULES,
                f"one of {', '.join(UNCERTAINTY_RULES)}",
            ),
            (
                "uncertain_std",
                _is_number(self.uncertain_std) and 0 <= self.uncertain_std < 0.5,
                "a number in [0, 0.5)",
            ),
            (
                "max_uncertain_share",
                self.max_uncertain_share is None
                or (_is_number(self.max_uncertain_share) and 0 <= self.max_uncertain_share <= 1),
                "a number in [0, 1] or null",
            ),
            (
                "top_fraction",
                self.top_fraction is None
                or (_is_number(self.top_fraction) and 0 < self.top_fraction <= 1),
                "a number in (0, 1] or null",
            ),
            (
                "max_pseudo_share",
                _is_number(self.max_pseudo_share) and 0 <= self.max_pseudo_share < 1,
                "a number in [0, 1)",
            ),
            (
                "pseudo_weight",
                _is_number(self.pseudo_weight)
                and math.isfinite(self.pseudo_weight)
                and self.pseudo_weight >= 0,
                "a finite number >= 0",
            ),
        ]
        for key, valid, expected in checks:
            if not valid:
                raise SegflowError(f"pseudo.{key} must be {expected}, got {getattr(self, key)!r}")
        if not self.uncertain_low < self.uncertain_high:
            raise SegflowError(
                f"pseudo.uncertain_low ({self.uncertain_low}) must be below "
                f"pseudo.uncertain_high ({self.uncertain_high})"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool | np.bool_)
        and not math.isnan(value)
    )


def _check_probs(probs: np.ndarray, name: str = "probs") -> tuple[int, int, int, int]:
    shape = tuple(np.shape(probs))
    if len(shape) != 4:
        raise SegflowError(f"pseudo: {name} must have shape (M, K, H, W), got {shape}")
    n_images, n_classes, height, width = shape
    return n_images, n_classes, height, width


def image_confidence(
    probs: np.ndarray,
    options: PseudoOptions | None = None,
    uncertainty: np.ndarray | None = None,
) -> pd.DataFrame:
    """How sure the predictions of each image are.

    Probabilities are compared in float32 (float16 values cast exactly), as post-processing
    thresholds them.

    Args:
        probs: test probabilities (float16; memmaps are read a chunk at a time).
        options: the uncertainty rule (``uncertainty``; ``uncertain_low``/``uncertain_high``
            for ``band``, ``uncertain_std`` for ``mc_dropout``); defaults if None.
        uncertainty: the MC-dropout standard deviations, row-aligned with ``probs``; required
            by ``uncertainty: mc_dropout``, ignored by ``band``.

    Returns:
        One row per image, in the order of ``probs``: ``uncertain_share``, the share of the
        image's pixels over all classes that are uncertain, and ``confidence``: under
        ``band`` 1 - mean(2 * min(p, 1 - p)) (1: every pixel is 0 or 1; 0: every pixel is
        0.5), under ``mc_dropout`` 1 - mean(2 * std) (1: the passes agree everywhere; a std
        never exceeds 0.5 for values in [0, 1]).

    Shape:
        probs, uncertainty: (M, K, H, W); output: M rows.

    Raises:
        SegflowError: ``mc_dropout`` without an uncertainty map, or one of another shape.
    """
    options = options or PseudoOptions()
    n_images, n_classes, height, width = _check_probs(probs)
    pixels = n_classes * height * width
    if pixels == 0:
        raise SegflowError(f"pseudo: images of shape {np.shape(probs)[1:]} have no pixels")
    mc = options.uncertainty == "mc_dropout"
    if mc:
        if uncertainty is None:
            raise SegflowError(
                "pseudo.uncertainty mc_dropout needs the test prediction's uncertainty.npy "
                "(set predict.mc_dropout_passes > 0)"
            )
        if tuple(np.shape(uncertainty)) != tuple(np.shape(probs)):
            raise SegflowError(
                f"pseudo: uncertainty of shape {np.shape(uncertainty)} does not match "
                f"probabilities {np.shape(probs)}"
            )
    low, high = np.float32(options.uncertain_low), np.float32(options.uncertain_high)
    max_std = np.float32(options.uncertain_std)
    uncertain = np.zeros(n_images, dtype=np.int64)
    doubt_sum = np.zeros(n_images, dtype=np.float64)
    chunk = max(1, _CHUNK_PIXELS // pixels)
    for start in range(0, n_images, chunk):
        rows = slice(start, min(start + chunk, n_images))
        if mc and uncertainty is not None:
            spread = np.asarray(uncertainty[rows], dtype=np.float32).reshape(-1, pixels)
            uncertain[rows] = np.count_nonzero(spread > max_std, axis=1)
            doubt_sum[rows] = (2 * spread).sum(axis=1, dtype=np.float64)
            continue
        values = np.asarray(probs[rows], dtype=np.float32).reshape(-1, pixels)
        uncertain[rows] = np.count_nonzero((values > low) & (values < high), axis=1)
        # 2 * min(p, 1 - p) is 0 for a certain pixel and 1 at p = 0.5; summed in float64.
        doubt_sum[rows] = (2 * np.minimum(values, 1 - values)).sum(axis=1, dtype=np.float64)
    return pd.DataFrame(
        {"uncertain_share": uncertain / pixels, "confidence": 1.0 - doubt_sum / pixels}
    )


def select_pseudo(
    ids: pd.DataFrame,
    probs: np.ndarray,
    options: PseudoOptions,
    excluded_ids: Collection[str],
    uncertainty: np.ndarray | None = None,
) -> pd.DataFrame:
    """Decide which test images are pseudo-labelled (the selection artifact).

    In this order: an image that duplicates a train image (``excluded_ids``) is never selected;
    an image whose uncertain share exceeds ``max_uncertain_share`` is too uncertain; of the rest
    (the candidates), with ``top_fraction``, only the ceil(top_fraction * candidates) most
    confident are kept, ties broken by id.

    Args:
        ids: the test id table row-aligned to ``probs`` (column ``id``).
        probs: the test probabilities the pseudo labels come from.
        options: the selection rule.
        excluded_ids: test ids that duplicate a train image (:func:`excluded_test_ids`); a
            mapping from test id to train ids (:func:`train_duplicates`) also names them in
            the reason.
        uncertainty: the MC-dropout standard deviations row-aligned with ``probs``
            (:func:`image_confidence`; needed by ``uncertainty: mc_dropout``).

    Returns:
        One row per test image, sorted by id: id, uncertain_share, confidence, selected (bool),
        reason (``selected``, ``duplicate of train <ids>``, ``too uncertain`` or
        ``below top fraction``).

    Shape:
        probs: (M, K, H, W); ids: M rows.

    Raises:
        SegflowError: no ``id`` column, duplicated ids, or ids and probabilities that differ in
            length.
    """
    n_images = _check_probs(probs)[0]
    if "id" not in ids.columns:
        raise SegflowError("pseudo: the test id table has no 'id' column")
    if len(ids) != n_images:
        raise SegflowError(f"pseudo: {len(ids)} test ids but probabilities for {n_images} images")
    id_values = ids["id"].astype(str)
    if id_values.duplicated().any():
        raise SegflowError(f"pseudo: test id {id_values[id_values.duplicated()].iloc[0]!r} repeats")
    table = image_confidence(probs, options, uncertainty)
    table.insert(0, "id", id_values.to_numpy())
    table = table.sort_values("id", kind="stable").reset_index(drop=True)

    reason = pd.Series(SELECTED, index=table.index, dtype=object)
    duplicate = table["id"].isin(set(excluded_ids))
    if isinstance(excluded_ids, Mapping):
        reason[duplicate] = [
            f"{DUPLICATE_OF_TRAIN} {excluded_ids[test_id]}" for test_id in table["id"][duplicate]
        ]
    else:
        reason[duplicate] = f"{DUPLICATE_OF_TRAIN} image"
    if options.max_uncertain_share is None:
        too_uncertain = pd.Series(False, index=table.index)
    else:
        too_uncertain = ~duplicate & (table["uncertain_share"] > options.max_uncertain_share)
    reason[too_uncertain] = TOO_UNCERTAIN
    candidates = table.index[~duplicate & ~too_uncertain]
    if options.top_fraction is not None and len(candidates):
        n_keep = math.ceil(options.top_fraction * len(candidates) - _COUNT_TOLERANCE)
        # Most confident first; the table is sorted by id, so a stable sort breaks ties by id.
        ranked = table.loc[candidates].sort_values("confidence", ascending=False, kind="stable")
        reason[ranked.index[n_keep:]] = BELOW_TOP_FRACTION
    table["selected"] = (reason == SELECTED).to_numpy()
    table["reason"] = reason.to_numpy()
    return table


def pseudo_targets(probs: np.ndarray, masks: np.ndarray, options: PseudoOptions) -> np.ndarray:
    """Training targets of the selected test images.

    Args:
        probs: the selected images' probabilities (soft targets come from these).
        masks: the selected images' post-processed per-class masks
            (:func:`segflow.model.postprocess.apply_classes`), any non-zero pixel on (hard targets).
        options: ``labels`` picks hard or soft targets.

    Returns:
        hard: packed label masks (bit k = class k) of :func:`segflow.formats.labels.label_dtype`
        (uint8 {0, 1} for binary data, uint8 for up to 8 classes); soft: float16 probabilities.

    Shape:
        probs, masks: (M, K, H, W); output: hard (M, H, W), soft (M, K, H, W).

    Raises:
        SegflowError: probabilities and masks of different shapes.
    """
    shape = _check_probs(probs)
    if tuple(np.shape(masks)) != shape:
        raise SegflowError(
            f"pseudo: masks of shape {np.shape(masks)} do not match probabilities {shape}"
        )
    n_images, n_classes, height, width = shape
    if options.labels == "soft":
        return np.asarray(probs, dtype=np.float16).copy()
    packed = np.empty((n_images, height, width), dtype=label_dtype(n_classes))
    chunk = max(1, _CHUNK_PIXELS // max(1, n_classes * height * width))
    for start in range(0, n_images, chunk):
        rows = slice(start, min(start + chunk, n_images))
        planes = np.asarray(masks[rows])
        # pack_labels packs one (K, H, W) stack: lay the chunk's images out as one tall image.
        tall = planes.transpose(1, 0, 2, 3).reshape(n_classes, -1, width)
        packed[rows] = pack_labels(tall).reshape(-1, height, width)
    return packed


def train_duplicates(dedup_items: pd.DataFrame) -> dict[str, str]:
    """Test ids with a known train duplicate, mapped to the train ids whose label applies.

    Args:
        dedup_items: the dedup items table (``dedup/items.parquet``); test rows with a non-null
            ``leak_train_ids`` duplicate a train image.

    Returns:
        test id -> ``;``-joined train ids.
    """
    missing = {"id", "split", "leak_train_ids"} - set(dedup_items.columns)
    if missing:
        raise SegflowError(
            f"pseudo: the dedup items table lacks column(s) {', '.join(sorted(missing))}; "
            "rerun dedup"
        )
    leaks = dedup_items[(dedup_items["split"] == "test") & dedup_items["leak_train_ids"].notna()]
    return dict(zip(leaks["id"].astype(str), leaks["leak_train_ids"].astype(str), strict=True))


def excluded_test_ids(dedup_items: pd.DataFrame) -> set[str]:
    """Test ids that duplicate a train image and so are never pseudo-labelled.

    Args:
        dedup_items: the dedup items table (``dedup/items.parquet``).

    Returns:
        The test ids with a non-null ``leak_train_ids``.
    """
    return set(train_duplicates(dedup_items))


def check_pseudo_uncertainty(pseudo: Mapping[str, Any], predict: Mapping[str, Any]) -> None:
    """The workflow's config check: ``pseudo.uncertainty: mc_dropout`` reads the MC-dropout
    spread that only ``predict.mc_dropout_passes`` > 0 writes.

    Args:
        pseudo: the config's ``pseudo`` section.
        predict: the config's ``predict`` section.

    Raises:
        SegflowError: one line naming both keys.
    """
    if pseudo.get("uncertainty", "band") == "mc_dropout" and not predict.get(
        "mc_dropout_passes", 0
    ):
        raise SegflowError(
            "pseudo.uncertainty: mc_dropout needs predict.mc_dropout_passes > 0 (the test "
            "predictions' uncertainty.npy); set it or use pseudo.uncertainty: band"
        )
