"""Features for the second-level (stacking) models, for one class plane at a time.

The inputs are first-level out-of-fold probabilities: for each experiment ``e`` a float array
``(N, H, W)`` (one class plane of the ``(N, K, H, W)`` OOF array, e.g. ``probs[:, k]``), all
row-aligned to the same sorted id table, plus optionally the preprocessed images
``(N, h, w, C)`` (any size; uint8 or uint16) and per-image metadata (``meta_*`` columns of the
manifest).

* :func:`image_features`: one row per image, for the image-level gate
  (:func:`segflow.ensemble.stacking.learners.fit_gate`). Columns are ``<e>__<feature>`` per experiment,
  ``image__<statistic>`` for intensities (and, with ``blob_sigmas``, Difference-of-Gaussians
  blob counts and sizes, :mod:`segflow.data.blobs`) and the ``meta_*`` columns as given.
* :func:`pixel_feature_names`, :func:`sampled_pixel_features`, :func:`iter_pixel_features`: one
  row per pixel, for the pixel-level blender (:func:`segflow.ensemble.stacking.learners.fit_pixel_blender`): a
  sample of pixels for training (:func:`sample_pixels` draws it), whole images in chunks for
  prediction.

Every feature of an image is computed from that image alone (no statistic across images), so a
feature row does not depend on which other images are processed with it: features of a fold's
images are the same whether computed alone or with the whole set, and chunking never changes a
value. Memory is bounded by processing a chunk of images at a time.

A "mask" here is ``probability > MASK_THRESHOLD`` (strictly, as :mod:`segflow.model.postprocess`
thresholds); connected components are 8-connected, as in :mod:`segflow.model.postprocess`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.data.blobs import BLOB_FEATURES, DEFAULT_THRESHOLD, blob_features, check_sigmas

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
MASK_THRESHOLD = 0.5
META_PREFIX = "meta_"
# Separates an experiment name from its feature name in a column name.
SEPARATOR = "__"
IMAGE_PREFIX = "image"
# Local windows (pixels, square) of the pixel features' neighbourhood mean and max.
PIXEL_WINDOWS: tuple[int, ...] = (3, 7)
# Default chunk budgets: image features hold a few float32 planes of at most this many pixels
# (16 MiB each); pixel features hold every feature plane of a chunk, at most this many float32
# values (16 MiB, plus copies of that size as the feature table).
_IMAGE_CHUNK_PIXELS = 1 << 22
_PIXEL_CHUNK_VALUES = 1 << 22
# LightGBM rejects feature names with JSON special characters and rewrites whitespace; names
# containing these would fail (or silently change) only when a model is trained, so they are
# refused up front.
_FORBIDDEN_NAME_CHARACTERS = frozenset(',:"[]{} \t\n\r')


def check_name(name: object, what: str) -> str:
    """``name`` if it can be (part of) a feature name for both backends.

    Raises:
        SegflowError: not a non-empty string, or a character LightGBM cannot store.
    """
    if not isinstance(name, str) or not name:
        raise SegflowError(f"{what} must be a non-empty string, got {name!r}")
    bad = sorted(set(name) & _FORBIDDEN_NAME_CHARACTERS)
    if bad:
        raise SegflowError(f"{what} {name!r} contains characters a model cannot store: {bad}")
    return name


def check_feature_frame(features: object, what: str = "features") -> pd.DataFrame:
    """Validate a feature table: a DataFrame with unique, storable names and numeric columns.

    Bool columns count as numeric (0/1); NaN is allowed (both backends treat it as missing).

    Args:
        features: the candidate table.
        what: how error messages call it.

    Returns:
        The same table with a fresh positional index, columns as float64.

    Raises:
        SegflowError: not a DataFrame, no rows or columns, a duplicated or unstorable name, or a
            non-numeric column (the message names it).
    """
    if not isinstance(features, pd.DataFrame):
        raise SegflowError(f"{what} must be a pandas DataFrame, got {type(features).__name__}")
    if features.shape[1] == 0:
        raise SegflowError(f"{what} has no columns")
    if len(features) == 0:
        raise SegflowError(f"{what} has no rows")
    duplicated = features.columns[features.columns.duplicated()]
    if len(duplicated):
        raise SegflowError(f"{what}: duplicated column {duplicated[0]!r}")
    for column in features.columns:
        check_name(column, f"{what} column")
        dtype = features[column].dtype
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            raise SegflowError(
                f"{what} column {column!r} is not numeric (dtype {dtype}); encode it as numbers"
            )
    return features.astype(np.float64).reset_index(drop=True)


def _check_prob_maps(prob_maps: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """(N, H, W) shared by every experiment's probability maps."""
    if not isinstance(prob_maps, Mapping) or not prob_maps:
        raise SegflowError("prob_maps must map at least one experiment name to (N, H, W) maps")
    for name, maps in prob_maps.items():
        check_name(name, "experiment name")
        if SEPARATOR in name:
            raise SegflowError(f"experiment name {name!r} must not contain {SEPARATOR!r}")
        if not isinstance(maps, np.ndarray) or maps.ndim != 3:
            got = getattr(maps, "shape", type(maps).__name__)
            raise SegflowError(f"prob_maps[{name!r}] must be an (N, H, W) array, got {got}")
        if not np.issubdtype(maps.dtype, np.floating):
            raise SegflowError(f"prob_maps[{name!r}] must hold floats, got dtype {maps.dtype}")
    first = next(iter(prob_maps))
    shape = prob_maps[first].shape
    for name, maps in prob_maps.items():
        if maps.shape != shape:
            raise SegflowError(
                f"prob_maps[{name!r}] has shape {maps.shape}, but prob_maps[{first!r}] has {shape}"
            )
    if min(shape) == 0:
        raise SegflowError(f"prob_maps hold no pixels (shape {shape})")
    return shape[0], shape[1], shape[2]


def _check_images(images: np.ndarray | None, n_images: int) -> np.ndarray | None:
    """``images`` as (N, h, w, C) after checking length and dtype (3-D means one channel)."""
    if images is None:
        return None
    if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
        got = getattr(images, "shape", type(images).__name__)
        raise SegflowError(f"images must be an (N, h, w, C) or (N, h, w) array, got {got}")
    if images.dtype not in (np.uint8, np.uint16):
        raise SegflowError(f"images must be uint8 or uint16, got dtype {images.dtype}")
    if len(images) != n_images:
        raise SegflowError(f"images has {len(images)} images, but the prob maps have {n_images}")
    return images if images.ndim == 4 else images[..., None]


def _first_channel_unit(images: np.ndarray) -> np.ndarray:
    """First channel of (n, h, w, C) integer images, scaled to [0, 1], float32 (n, h, w)."""
    return images[..., 0].astype(np.float32) / np.float32(np.iinfo(images.dtype).max)


def chunk_size(chunk_images: int | None, values_per_image: int, budget: int) -> int:
    """``chunk_images`` if given (validated), else as many images as fit ``budget`` values."""
    if chunk_images is None:
        return max(1, budget // max(1, values_per_image))
    if isinstance(chunk_images, bool) or not isinstance(chunk_images, int | np.integer):
        raise SegflowError(f"chunk_images must be a positive integer, got {chunk_images!r}")
    if chunk_images < 1:
        raise SegflowError(f"chunk_images must be a positive integer, got {chunk_images}")
    return int(chunk_images)


def _threshold_label(threshold: float) -> str:
    return f"{threshold:g}"


def image_feature_names(
    experiments: Sequence[str],
    with_images: bool = False,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    with_blobs: bool = False,
) -> list[str]:
    """The columns :func:`image_features` produces, before the ``meta_*`` columns
    (``with_blobs``: it was given images and ``blob_sigmas``)."""
    per_experiment = [f"area_gt{_threshold_label(t)}" for t in thresholds] + [
        "prob_max",
        "prob_mean",
        "prob_mean_in_mask",
        "components",
        "largest_component_area",
        "border_contact",
    ]
    names = [f"{e}{SEPARATOR}{feature}" for e in experiments for feature in per_experiment]
    if with_images:
        names += [f"{IMAGE_PREFIX}{SEPARATOR}{s}" for s in ("mean", "std", "p10", "p90")]
        if with_blobs:
            names += [f"{IMAGE_PREFIX}{SEPARATOR}{s}" for s in BLOB_FEATURES]
    return names


def _border_positions(height: int, width: int) -> np.ndarray:
    border = np.zeros((height, width), dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    return border


def _component_stats(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: number of 8-connected components and the largest one's pixel count."""
    counts = np.zeros(len(masks), dtype=np.float64)
    largest = np.zeros(len(masks), dtype=np.float64)
    for index, mask in enumerate(masks):
        if not mask.any():  # skip OpenCV for the (common) empty mask
            continue
        n_labels, _, stats, _ = cv2.connectedComponentsWithStats(
            mask.view(np.uint8), connectivity=8
        )
        counts[index] = n_labels - 1  # label 0 is the background
        largest[index] = stats[1:, cv2.CC_STAT_AREA].max()
    return counts, largest


def _probability_features(
    probs: np.ndarray, thresholds: Sequence[float], border: np.ndarray
) -> np.ndarray:
    """Per-image features of one experiment, in :func:`image_feature_names` order.

    Shape:
        probs: (n, H, W) float32; border: (H, W) bool; output: (n, len(thresholds) + 6).
    """
    n, height, width = probs.shape
    flat = probs.reshape(n, height * width)
    columns = [np.count_nonzero(flat > t, axis=1) / flat.shape[1] for t in thresholds]
    mask = probs > MASK_THRESHOLD
    mask_flat = mask.reshape(n, -1)
    mask_area = np.count_nonzero(mask_flat, axis=1)
    inside_sum = np.where(mask_flat, flat, 0.0).sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # NaN when nothing is above 0.5: "no mask" is missing, not a mean probability of 0.
        mean_in_mask = np.where(mask_area > 0, inside_sum / mask_area, np.nan)
    counts, largest = _component_stats(mask)
    columns += [
        flat.max(axis=1),
        flat.mean(axis=1, dtype=np.float64),
        mean_in_mask,
        counts,
        largest / flat.shape[1],
        np.count_nonzero(mask[:, border], axis=1) / np.count_nonzero(border),
    ]
    return np.stack(columns, axis=1).astype(np.float64)


def _intensity_features(images: np.ndarray) -> np.ndarray:
    """Mean, std, 10th and 90th percentile of the first channel in [0, 1]; (n, 4)."""
    pixels = _first_channel_unit(images).reshape(len(images), -1)
    p10, p90 = np.percentile(pixels, [10, 90], axis=1)
    return np.stack(
        [pixels.mean(axis=1, dtype=np.float64), pixels.std(axis=1, dtype=np.float64), p10, p90],
        axis=1,
    )


def _metadata_columns(metadata: pd.DataFrame | None, n_images: int) -> pd.DataFrame | None:
    if metadata is None:
        return None
    if not isinstance(metadata, pd.DataFrame):
        raise SegflowError(f"metadata must be a pandas DataFrame, got {type(metadata).__name__}")
    if len(metadata) != n_images:
        raise SegflowError(f"metadata has {len(metadata)} rows, but the prob maps have {n_images}")
    columns = [c for c in metadata.columns if isinstance(c, str) and c.startswith(META_PREFIX)]
    if not columns:
        return None
    return check_feature_frame(metadata[columns], "metadata")


def image_features(
    prob_maps: Mapping[str, np.ndarray],
    images: np.ndarray | None = None,
    metadata: pd.DataFrame | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    chunk_images: int | None = None,
    blob_sigmas: Sequence[float] | None = None,
    blob_threshold: float = DEFAULT_THRESHOLD,
) -> pd.DataFrame:
    """Per-image features of one class plane, for the image-level gate.

    Per experiment ``e`` (columns ``e__<feature>``): ``area_gt<t>`` the fraction of pixels with
    probability > t for each threshold; ``prob_max`` and ``prob_mean``; ``prob_mean_in_mask``
    the mean probability over the pixels > 0.5 (NaN when there are none); ``components`` the
    number of 8-connected components of the > 0.5 mask and ``largest_component_area`` the
    largest one's area fraction; ``border_contact`` the fraction of border pixels (first and last
    row and column) > 0.5. With ``images``: ``image__mean``, ``image__std``, ``image__p10``,
    ``image__p90`` of the first channel scaled to [0, 1] (uint8 by 255, uint16 by 65535);
    with ``blob_sigmas`` too, ``image__blob_count``, ``image__blob_area_mean`` and
    ``image__blob_area_max``: the Difference-of-Gaussians blobs of that channel
    (:func:`segflow.data.blobs.blob_features`; areas as fractions of the image, 0 without blobs).
    ``metadata``'s ``meta_*`` columns follow as given (NaN allowed); its other columns (e.g.
    ``id``) are ignored, so manifest rows can be passed directly.

    Args:
        prob_maps: experiment name -> probabilities of this class, row-aligned across
            experiments (float16 memory maps are fine: a chunk at a time is read).
        images: the preprocessed images of the same rows, any size, or None.
        metadata: the same rows' metadata (positional: its index is ignored), or None.
        thresholds: the area-fraction thresholds, each in (0, 1).
        chunk_images: images per chunk; None: as many as fit 4 Mi pixels.
        blob_sigmas: increasing Gaussian sigmas (pixels of ``images``) of the blob features;
            None: no blob features (nor without ``images``).
        blob_threshold: the least DoG response of a blob (first channel in [0, 1]).

    Returns:
        One float64 row per image, columns :func:`image_feature_names` then ``meta_*``.

    Shape:
        prob_maps values: (N, H, W); images: (N, h, w, C) or (N, h, w); metadata: N rows;
        output: N rows.

    Raises:
        SegflowError: inconsistent shapes or lengths, a bad experiment name, threshold, image
            dtype or a non-numeric ``meta_*`` column (each named).
    """
    n_images, height, width = _check_prob_maps(prob_maps)
    images = _check_images(images, n_images)
    for threshold in thresholds:
        if isinstance(threshold, bool) or not 0.0 < float(threshold) < 1.0:
            raise SegflowError(f"image_features: thresholds must be in (0, 1), got {threshold!r}")
    meta = _metadata_columns(metadata, n_images)
    with_blobs = images is not None and blob_sigmas is not None
    if with_blobs:
        blob_sigmas = check_sigmas(blob_sigmas, "stack.blob_sigmas")
    names = image_feature_names(list(prob_maps), images is not None, thresholds, with_blobs)
    values = np.empty((n_images, len(names)), dtype=np.float64)
    border = _border_positions(height, width)
    step = chunk_size(chunk_images, height * width, _IMAGE_CHUNK_PIXELS)
    for start in range(0, n_images, step):
        stop = min(start + step, n_images)
        blocks = [
            _probability_features(
                np.asarray(maps[start:stop], dtype=np.float32), thresholds, border
            )
            for maps in prob_maps.values()
        ]
        if images is not None:
            chunk = np.asarray(images[start:stop])
            blocks.append(_intensity_features(chunk))
            if with_blobs:
                planes = _first_channel_unit(chunk)
                blocks.append(blob_features(planes, blob_sigmas, blob_threshold))
        values[start:stop] = np.concatenate(blocks, axis=1)
    frame = pd.DataFrame(values, columns=names)
    if meta is not None:
        clashes = sorted(set(meta.columns) & set(names))
        if clashes:
            raise SegflowError(f"metadata column {clashes[0]!r} clashes with a feature name")
        frame = pd.concat([frame, meta], axis=1)
    return frame


def sample_pixels(
    truth_plane: np.ndarray, pixels_per_image: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stratified, seeded sample of pixels of every image, for training the pixel blender.

    From each image up to ``pixels_per_image // 2`` positive (foreground) pixels are drawn and
    negatives fill the rest of its budget, so both classes are represented wherever the image
    has them (an empty image gives negatives only; a nearly full one mostly positives). Each
    image draws from its own generator seeded by ``(seed, row)``, so an image's sample does not
    depend on which other images are sampled with it.

    Args:
        truth_plane: one class's true masks, bool or 0/1 (e.g.
            ``truths.class_truths(packed, k)``).
        pixels_per_image: at most this many pixels per image (all pixels if fewer).
        seed: the sample's seed.

    Returns:
        ``(rows, ys, xs)``, int64, sorted by row then raster position.

    Shape:
        truth_plane: (N, H, W); every output: (n_samples,).

    Raises:
        SegflowError: not an (N, H, W) one-class plane, or a bad ``pixels_per_image``.
    """
    truth_plane = check_truth_plane(truth_plane)
    if isinstance(pixels_per_image, bool) or not isinstance(pixels_per_image, int | np.integer):
        raise SegflowError(f"pixels_per_image must be an integer >= 2, got {pixels_per_image!r}")
    if pixels_per_image < 2:
        raise SegflowError(f"pixels_per_image must be >= 2, got {pixels_per_image}")
    n_images, _, width = truth_plane.shape
    rows, flat_positions = [], []
    for row in range(n_images):
        truth = np.asarray(truth_plane[row]).reshape(-1) != 0
        positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
        n_positive = min(len(positives), pixels_per_image // 2)
        n_negative = min(len(negatives), pixels_per_image - n_positive)
        rng = np.random.default_rng((int(seed), row))
        chosen = np.sort(
            np.concatenate(
                [
                    rng.choice(positives, n_positive, replace=False),
                    rng.choice(negatives, n_negative, replace=False),
                ]
            )
        )
        rows.append(np.full(len(chosen), row, dtype=np.int64))
        flat_positions.append(chosen.astype(np.int64))
    flat = np.concatenate(flat_positions)
    return np.concatenate(rows), flat // width, flat % width


def sample_weights(
    truth_plane: np.ndarray, rows: np.ndarray, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Inverse-probability weights of a :func:`sample_pixels` sample, normalised to mean 1.

    A sampled pixel stands for every pixel of its class in its image: weight = (pixels of that
    class in the image) / (pixels of that class sampled from it). The weighted sample then has
    the images' own class balance, so a model fitted on it predicts calibrated probabilities
    although the sample itself is about half positives.

    Shape:
        truth_plane: (N, H, W); rows, ys, xs and output: (n_samples,).
    """
    truth_plane = check_truth_plane(truth_plane)
    label = np.asarray(truth_plane[rows, ys, xs]) != 0
    positives = np.count_nonzero(truth_plane.reshape(len(truth_plane), -1), axis=1)
    pixels = truth_plane.shape[1] * truth_plane.shape[2]
    in_image = np.where(label, positives[rows], pixels - positives[rows])
    key = rows * 2 + label  # (image, class) cells
    sampled = np.bincount(key, minlength=2 * len(truth_plane))[key]
    weights = in_image / sampled
    return weights / weights.mean()


def check_truth_plane(truth_plane: object) -> np.ndarray:
    """``truth_plane`` if it is one class's (N, H, W) masks, bool or 0/1.

    Raises:
        SegflowError: another shape, or values outside {0, 1} (packed multi-class labels).
    """
    if not isinstance(truth_plane, np.ndarray) or truth_plane.ndim != 3:
        got = getattr(truth_plane, "shape", type(truth_plane).__name__)
        raise SegflowError(f"truth_plane must be an (N, H, W) array, got {got}")
    if truth_plane.dtype != bool and np.asarray(truth_plane).max(initial=0) > 1:
        raise SegflowError(
            "truth_plane must be one class's masks (bool or 0/1); split packed labels with "
            "segflow.artifacts.truths.class_truths(packed, k)"
        )
    return truth_plane


def pixel_feature_names(experiments: Sequence[str], with_images: bool = False) -> list[str]:
    """The columns of the pixel features, in order.

    Per experiment ``e``: ``e__prob`` (the pixel's probability), ``e__mean3``/``e__max3`` and
    ``e__mean7``/``e__max7`` (mean and max over the 3x3 and 7x7 window centred on it); then
    ``pos_y``, ``pos_x`` (pixel centre / size, in (0, 1)); with images ``image__intensity``
    (first channel resized to the prob-map size, scaled to [0, 1]).
    """
    per_experiment = ["prob"] + [f"{kind}{w}" for w in PIXEL_WINDOWS for kind in ("mean", "max")]
    names = [f"{e}{SEPARATOR}{feature}" for e in experiments for feature in per_experiment]
    names += ["pos_y", "pos_x"]
    if with_images:
        names.append(f"{IMAGE_PREFIX}{SEPARATOR}intensity")
    return names


def _pixel_planes(
    prob_maps: Mapping[str, np.ndarray], images: np.ndarray | None, rows: np.ndarray
) -> np.ndarray:
    """Every pixel feature of the images ``rows`` as planes, float32 (n, F, H, W)."""
    first = next(iter(prob_maps.values()))
    _, height, width = first.shape
    n_features = len(pixel_feature_names(list(prob_maps), images is not None))
    planes = np.empty((len(rows), n_features, height, width), dtype=np.float32)
    feature = 0
    for maps in prob_maps.values():
        probs = np.asarray(maps[rows], dtype=np.float32)
        planes[:, feature] = probs
        for index, prob in enumerate(probs):
            for offset, window in enumerate(PIXEL_WINDOWS):
                kernel = np.ones((window, window), dtype=np.uint8)
                # Mirror the image at its border for the mean; the max ignores outside pixels
                # (OpenCV's default for dilate), so neither invents probability mass.
                planes[index, feature + 1 + 2 * offset] = cv2.blur(
                    prob, (window, window), borderType=cv2.BORDER_REFLECT_101
                )
                planes[index, feature + 2 + 2 * offset] = cv2.dilate(prob, kernel)
        feature += 1 + 2 * len(PIXEL_WINDOWS)
    planes[:, feature] = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    planes[:, feature + 1] = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
    if images is not None:
        intensity = _first_channel_unit(np.asarray(images[rows]))
        for index, plane in enumerate(intensity):
            if plane.shape != (height, width):
                # INTER_AREA averages when shrinking; it equals bilinear when enlarging.
                plane = cv2.resize(plane, (width, height), interpolation=cv2.INTER_AREA)
            planes[index, feature + 2] = plane
    return planes


def _check_pixel_inputs(
    prob_maps: Mapping[str, np.ndarray], images: np.ndarray | None
) -> tuple[int, int, int, np.ndarray | None]:
    n_images, height, width = _check_prob_maps(prob_maps)
    return n_images, height, width, _check_images(images, n_images)


def _check_rows(rows: np.ndarray | Sequence[int] | None, n_images: int, what: str) -> np.ndarray:
    if rows is None:
        return np.arange(n_images)
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise SegflowError(f"{what} must be a 1-D integer array")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_images):
        raise SegflowError(f"{what} must index images 0..{n_images - 1}")
    return rows.astype(np.int64)


def sampled_pixel_features(
    prob_maps: Mapping[str, np.ndarray],
    images: np.ndarray | None,
    rows: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    chunk_images: int | None = None,
) -> pd.DataFrame:
    """The pixel features of a sample of pixels (e.g. from :func:`sample_pixels`).

    Args:
        prob_maps: experiment name -> this class's probabilities, row-aligned.
        images: the preprocessed images of the same rows (any size), or None.
        rows, ys, xs: image row and pixel position of each sampled pixel.
        chunk_images: images whose feature planes are held at once; None: as many as fit
            4 Mi float32 values.

    Returns:
        One row per sampled pixel (same order), float32 columns :func:`pixel_feature_names`.

    Shape:
        prob_maps values: (N, H, W); images: (N, h, w, C); rows, ys, xs: (n,); output: n rows.

    Raises:
        SegflowError: inconsistent shapes, or positions outside the maps.
    """
    n_images, height, width, images = _check_pixel_inputs(prob_maps, images)
    rows = _check_rows(rows, n_images, "rows")
    ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
    if ys.shape != rows.shape or xs.shape != rows.shape:
        raise SegflowError(
            f"rows, ys and xs must have one length, got {len(rows)}, {len(ys)}, {len(xs)}"
        )
    if len(rows) and (ys.min() < 0 or ys.max() >= height or xs.min() < 0 or xs.max() >= width):
        raise SegflowError(f"pixel positions must lie inside the {height}x{width} maps")
    names = pixel_feature_names(list(prob_maps), images is not None)
    values = np.empty((len(rows), len(names)), dtype=np.float32)
    images_with_samples = np.unique(rows)
    step = chunk_size(chunk_images, height * width * len(names), _PIXEL_CHUNK_VALUES)
    for start in range(0, len(images_with_samples), step):
        chunk_rows = images_with_samples[start : start + step]
        planes = _pixel_planes(prob_maps, images, chunk_rows)
        selected = np.flatnonzero(np.isin(rows, chunk_rows))
        local = np.searchsorted(chunk_rows, rows[selected])
        # Advanced indices split by a slice: numpy puts the sample axis first -> (n_sel, F).
        values[selected] = planes[local, :, ys[selected], xs[selected]]
    return pd.DataFrame(values, columns=names)


def iter_pixel_features(
    prob_maps: Mapping[str, np.ndarray],
    images: np.ndarray | None = None,
    rows: np.ndarray | Sequence[int] | None = None,
    chunk_images: int | None = None,
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """The pixel features of every pixel of whole images, a chunk of images at a time.

    Args:
        prob_maps: experiment name -> this class's probabilities, row-aligned.
        images: the preprocessed images of the same rows (any size), or None.
        rows: the images to process (default: all), in the order given.
        chunk_images: images per chunk; None: as many as fit 4 Mi float32 feature values.

    Yields:
        ``(chunk_rows, features)``: the chunk's image rows and one float32 row per pixel in
        (image, y, x) raster order, so ``values.reshape(len(chunk_rows), H, W)`` restores maps.

    Shape:
        prob_maps values: (N, H, W); features: (len(chunk_rows) * H * W) rows.
    """
    n_images, height, width, images = _check_pixel_inputs(prob_maps, images)
    rows = _check_rows(rows, n_images, "rows")
    names = pixel_feature_names(list(prob_maps), images is not None)
    step = chunk_size(chunk_images, height * width * len(names), _PIXEL_CHUNK_VALUES)
    for start in range(0, len(rows), step):
        chunk_rows = rows[start : start + step]
        planes = _pixel_planes(prob_maps, images, chunk_rows)
        values = planes.transpose(0, 2, 3, 1).reshape(-1, len(names))
        yield chunk_rows, pd.DataFrame(values, columns=names)
