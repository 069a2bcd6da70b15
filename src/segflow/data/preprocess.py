"""Preprocess: channel handling, 16->8-bit, dehazing, CLAHE and resize (or reflect-pad) into
memory-mappable arrays.

Outputs (in one folder) ``train_images.npy`` (N, H, W, C), ``train_masks.npy`` (N, H, W) of
packed label masks (bit k = class k, :func:`segflow.formats.labels.label_dtype`; binary data: uint8
{0, 1}), ``index.parquet`` (id, split, row, original size) and ``stats.json`` (per-channel
mean/std of the train images, for normalisation; the class names). The train images alone
decide the size, channels and depth: the test images are prepared the same way by a separate
stage (:mod:`segflow.data.preprocess_test`), so new test images never retrain. Training then slices the arrays with ``np.load(..., mmap_mode="r")`` and never decodes
a PNG.

``resize_mode: pad`` keeps the native pixels: images (and their masks, the same way) are
reflect-padded to ``height`` x ``width`` (:mod:`segflow.artifacts.resolution`), and ``index.parquet``
gains the ``pad_top``/``pad_left`` offsets that prediction crops back with.

The classes come from the manifest itself (its ``mask_classes`` column, written by ingest when
``data.classes`` is set), so the arrays always match the masks they were decoded from.

Workers write disjoint row ranges straight into the ``.npy`` memmaps, so memory stays at one
chunk of decoded images per worker however large the dataset is.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pandas as pd

from segflow.artifacts.arrays import images_file, masks_file, write_index, write_stats
from segflow.artifacts.resolution import (
    RESIZE_MODES,
    pad_columns,
    pad_offsets,
    read_resolution,
    reflect_pad,
    resize_labels,
)
from segflow.artifacts.tables import data_roots, read_table, resolve_manifest_path
from segflow.artifacts.truths import MaskSource, load_mask, mask_sources
from segflow.core.atomic import atomic_path
from segflow.core.errors import SegflowError
from segflow.core.late_options import published_options
from segflow.core.options import (
    add_dataclass_arguments,
    dataclass_from_namespace,
    option,
)
from segflow.core.parallel import chunked, parallel_map
from segflow.core.stage_args import (
    add_stage_tables,
    add_workers,
    stage_log,
    stage_provenance,
    with_provenance,
)
from segflow.formats.dicom_series import (
    context_stack,
    context_weights,
    series_order,
    series_spacing,
)
from segflow.formats.imageio import (
    DicomWindow,
    add_dicom_window_arguments,
    decode_image,
    dicom_window_from_args,
)
from segflow.formats.labels import class_names, label_dtype, manifest_classes

log = logging.getLogger(__name__)

CHANNEL_MODES = ("auto", "1", "3")
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
_CHUNK = 64
# A gap between two slices of a series larger than this many median spacings: missing slices.
MAX_GAP_RATIO = 4.0


@dataclass(frozen=True)
class PreprocessOptions:
    """Image preparation (config section ``preprocess``)."""

    # Left out of stats.json at their defaults: arrays prepared without them keep
    # byte-identical stats (segflow.core.late_options.published_options).
    _omit_at_default: ClassVar[tuple[str, ...]] = (
        "dehaze",
        "dehaze_omega",
        "dehaze_t0",
        "dehaze_patch",
        "context_slices",
        "slice_spacing",
    )

    height: int | None = option(None, "output height; null keeps the (common) original size")
    width: int | None = option(None, "output width; null keeps the (common) original size")
    channels: str = option(
        "auto", "output channels; auto = 1 if every image is gray", CHANNEL_MODES
    )
    to_uint8: bool = option(True, "convert 16-bit images to 8-bit (full-range scaling)")
    dehaze: bool = option(
        False,
        "dark-channel-prior dehazing (He et al. 2009) before CLAHE: J = (I - A) / max(t, t0) + A "
        "with t = 1 - omega * dark channel of I / A",
    )
    dehaze_omega: float = option(
        0.95, "dehaze: the share of haze removed (omega in (0, 1]; 1 = all)"
    )
    dehaze_t0: float = option(0.1, "dehaze: the least transmission (t0 in (0, 1))")
    dehaze_patch: int = option(15, "dehaze: the dark channel's minimum filter side (pixels)")
    clahe: bool = option(False, "apply CLAHE (on luminance for colour images)")
    clahe_clip_limit: float = option(2.0, "CLAHE contrast clip limit")
    clahe_tile_grid: int = option(8, "CLAHE tiles per side")
    interpolation: str = option(
        "auto",
        "image resize interpolation; auto = area when shrinking, linear when enlarging",
        ("auto", *INTERPOLATIONS),
    )
    resize_mode: str = option(
        "resize",
        "resize = scale every image to height x width; pad = keep the native pixels and "
        "reflect-pad images and masks symmetrically to height x width (every image must fit)",
        RESIZE_MODES,
    )
    context_slices: int = option(
        0,
        "2.5D inputs for DICOM series (needs data.dicom_series): each slice's input is 2k+1 "
        "channels, the slice and its k neighbours on each side along the series at "
        "slice_spacing, linearly interpolated between the real slices, edges replicated; 0 = off",
    )
    slice_spacing: float | None = option(
        None,
        "the step between 2.5D channels in mm (context_slices); null = each series' median "
        "slice spacing",
    )


@dataclass(frozen=True)
class Geometry:
    """The arrays' pixel grid: (height, width), channels and dtype (``uint8``/``uint16``)."""

    height: int
    width: int
    channels: int
    dtype: str


@dataclass(frozen=True)
class _Item:
    image_path: str
    masks: tuple[MaskSource, ...]  # unioned: one item's own, or a 'union' group's


@dataclass(frozen=True)
class _ChunkTask:
    images_path: str
    masks_path: str | None
    first_row: int
    items: tuple[_Item, ...]
    geometry: Geometry
    options: PreprocessOptions
    dicom_window: DicomWindow
    n_classes: int


def convert_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Return ``(H, W, channels)``: drop alpha, gray->RGB by replication, RGB->gray by luma.

    Shape:
        pixels: (H, W) or (H, W, C); output: (H, W, channels).
    """
    if pixels.ndim == 3 and pixels.shape[2] == 1:  # (H, W, 1) is gray too
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    if channels == 1:
        if pixels.ndim == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        return pixels[:, :, None]
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map 16-bit to 8-bit over the full range (65535 -> 255); 8-bit passes through."""
    if pixels.dtype == np.uint8:
        return pixels
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def apply_clahe(pixels: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation, on luminance for colour images.

    Shape:
        pixels: (H, W, 1) or (H, W, 3), uint8 or uint16; output: same.
    """
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    if pixels.shape[2] == 1:
        return clahe.apply(np.ascontiguousarray(pixels[:, :, 0]))[:, :, None]
    # Equalising R, G, B separately shifts hues; equalise luma only.
    ycrcb = cv2.cvtColor(pixels, cv2.COLOR_RGB2YCrCb)
    ycrcb[:, :, 0] = clahe.apply(np.ascontiguousarray(ycrcb[:, :, 0]))
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


def dark_channel(pixels: np.ndarray, patch: int) -> np.ndarray:
    """The dark channel: per pixel, the minimum over the channels and a ``patch`` x ``patch``
    window (``cv2.erode`` with a square kernel, borders replicated).

    Shape:
        pixels: (H, W, C) float32; output: (H, W) float32.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (patch, patch))
    return cv2.erode(
        np.ascontiguousarray(pixels.min(axis=2)), kernel, borderType=cv2.BORDER_REPLICATE
    )


def check_dehaze(omega: float, t0: float, patch: int) -> None:
    """Refuse dehazing options out of range (one line naming the ``preprocess`` key).

    Raises:
        SegflowError: omega not in (0, 1], t0 not in (0, 1) or patch not an integer >= 1.
    """
    if isinstance(omega, bool) or not isinstance(omega, int | float) or not 0.0 < omega <= 1.0:
        raise SegflowError(f"preprocess.dehaze_omega must be in (0, 1], got {omega!r}")
    if isinstance(t0, bool) or not isinstance(t0, int | float) or not 0.0 < t0 < 1.0:
        raise SegflowError(f"preprocess.dehaze_t0 must be in (0, 1), got {t0!r}")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise SegflowError(f"preprocess.dehaze_patch must be an integer >= 1, got {patch!r}")


def dehaze(pixels: np.ndarray, omega: float = 0.95, t0: float = 0.1, patch: int = 15) -> np.ndarray:
    """Dark-channel-prior dehazing (He, Sun and Tang, CVPR 2009), without the soft-matting or
    guided-filter refinement of the transmission.

    Haze-free patches have a dark channel near 0; haze lifts it towards the atmospheric light
    A. A is taken as the brightest pixel (sum over channels) among the 0.1 % of pixels with the
    brightest dark channel; the transmission is ``t = 1 - omega * dark_channel(I / A)`` and the
    scene ``J = (I - A) / max(t, t0) + A``, clipped to the pixel range. Gray images work alike
    (one channel).

    Args:
        pixels: the image, uint8 or uint16.
        omega: the share of the haze removed, in (0, 1] (below 1 keeps a little for depth).
        t0: the least transmission, in (0, 1) (bounds the noise amplification in dense haze).
        patch: the minimum filter's side in pixels (>= 1).

    Returns:
        The dehazed image, same shape and dtype.

    Shape:
        pixels: (H, W, C); output: (H, W, C).

    Raises:
        SegflowError: an option out of range.
    """
    check_dehaze(omega, t0, patch)
    scale = float(np.iinfo(pixels.dtype).max)
    image = pixels.astype(np.float32) / np.float32(scale)
    dark = dark_channel(image, patch)
    n_top = max(1, dark.size // 1000)
    top = np.argpartition(dark.ravel(), dark.size - n_top)[dark.size - n_top :]
    flat = image.reshape(-1, image.shape[2])
    light = flat[top[np.argmax(flat[top].sum(axis=1))]]
    light = np.maximum(light, np.float32(1e-3))  # a black "sky" would divide by 0
    transmission = 1.0 - np.float32(omega) * dark_channel(image / light, patch)
    transmission = np.maximum(transmission, np.float32(t0))[:, :, None]
    scene = (image - light) / transmission + light
    return np.rint(np.clip(scene, 0.0, 1.0) * scale).astype(pixels.dtype)


def resize_image(
    pixels: np.ndarray, height: int, width: int, interpolation: str = "auto"
) -> np.ndarray:
    """Resize an (H, W, C) image; ``auto`` uses area when shrinking, linear when enlarging."""
    if pixels.shape[:2] == (height, width):
        return pixels
    if interpolation == "auto":
        shrinking = height <= pixels.shape[0] and width <= pixels.shape[1]
        interpolation = "area" if shrinking else "linear"
    resized = cv2.resize(pixels, (width, height), interpolation=INTERPOLATIONS[interpolation])
    return resized if resized.ndim == 3 else resized[:, :, None]  # cv2 drops a single channel


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize, so a mask stays binary and a packed label keeps its values.

    Shape:
        mask: (H, W) uint8, uint16 or uint32; output: (height, width), same dtype.
    """
    return resize_labels(mask, height, width)


def prepare_image(
    pixels: np.ndarray, geometry: Geometry, options: PreprocessOptions, where: str = "image"
) -> np.ndarray:
    """Channels -> bit depth -> dehaze -> CLAHE -> resize or reflect-pad
    (``options.resize_mode``), in that order (dehazing and CLAHE at native resolution).
    ``where`` names the image in errors."""
    pixels = convert_channels(pixels, geometry.channels)
    if geometry.dtype == "uint8":
        pixels = to_uint8(pixels)
    elif pixels.dtype == np.uint8:  # mixed depths kept at 16 bits: promote 8-bit images
        pixels = pixels.astype(np.uint16) * 257
    if options.dehaze:
        pixels = dehaze(pixels, options.dehaze_omega, options.dehaze_t0, options.dehaze_patch)
    if options.clahe:
        pixels = apply_clahe(pixels, options.clahe_clip_limit, options.clahe_tile_grid)
    target = (geometry.height, geometry.width)
    if options.resize_mode == "pad":
        return reflect_pad(pixels, target, pad_offsets(pixels.shape[:2], target, where))
    return resize_image(pixels, geometry.height, geometry.width, options.interpolation)


def prepare_mask(
    label: np.ndarray, geometry: Geometry, options: PreprocessOptions, where: str = "mask"
) -> np.ndarray:
    """A packed label mask into the arrays' grid, as :func:`prepare_image` places its image:
    nearest-neighbour resize, or the same reflect padding (the mirrored truth of the mirrored
    image content)."""
    target = (geometry.height, geometry.width)
    if options.resize_mode == "pad":
        return reflect_pad(label, target, pad_offsets(label.shape, target, where))
    return resize_mask(label, geometry.height, geometry.width)


def _process_chunk(task: _ChunkTask) -> tuple[np.ndarray, int]:
    """Write one chunk's rows; return per-channel [sum, sum of squares] of the scaled pixels
    and the number of foreground mask pixels (pixels of any class)."""
    images = np.load(task.images_path, mmap_mode="r+")
    masks = np.load(task.masks_path, mmap_mode="r+") if task.masks_path else None
    geometry = task.geometry
    scale = 255.0 if geometry.dtype == "uint8" else 65535.0
    moments = np.zeros((2, geometry.channels), dtype=np.float64)
    foreground = 0
    for offset, item in enumerate(task.items):
        row = task.first_row + offset
        pixels = decode_image(item.image_path, task.dicom_window).pixels
        prepared = prepare_image(pixels, geometry, task.options, item.image_path)
        images[row] = prepared
        scaled = prepared.reshape(-1, geometry.channels).astype(np.float64) / scale
        moments[0] += scaled.sum(axis=0)
        moments[1] += np.square(scaled).sum(axis=0)
        if masks is not None:
            label = load_mask(item.masks, pixels.shape[:2], task.n_classes)
            masks[row] = prepare_mask(label, geometry, task.options, item.image_path)
            foreground += int(np.count_nonzero(masks[row]))
    images.flush()
    if masks is not None:
        masks.flush()
    return moments, foreground


def reserve_space(path: str | os.PathLike[str]) -> None:
    """Allocate the disk blocks of the (sparse) file ``path`` now.

    Workers fill the memmaps through page faults: on a full disk the kernel then kills them
    with SIGBUS instead of any error being raised. Allocating up front turns that into an
    ``OSError`` (ENOSPC) here, before any work. A file system without fallocate is left sparse.

    Raises:
        OSError: no space for the file (ENOSPC, EDQUOT) or another I/O error.
    """
    if not hasattr(os, "posix_fallocate"):  # not on macOS: best effort only
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def output_channels(items: pd.DataFrame, channels: str) -> int:
    """The arrays' channels: ``preprocess.channels``, or with ``auto`` 1 when every image of
    ``items`` (manifest rows, ``is_gray``) is gray, else 3."""
    return (1 if items["is_gray"].all() else 3) if channels == "auto" else int(channels)


def _decide_geometry(used: pd.DataFrame, options: PreprocessOptions) -> Geometry:
    if (options.height is None) != (options.width is None):
        raise SegflowError("set both preprocess.height and preprocess.width, or neither")
    if options.height is None:
        sizes = used.groupby(["height", "width"])["id"].first()
        if len(sizes) > 1:
            examples = ", ".join(f"{item} is {w}x{h}" for (h, w), item in sizes.head(3).items())
            raise SegflowError(
                f"images have {len(sizes)} different sizes ({examples}); set preprocess.height "
                "and preprocess.width"
            )
        height, width = (int(v) for v in sizes.index[0])
    else:
        height, width = options.height, options.width
        if height < 1 or width < 1:
            raise SegflowError(f"preprocess.height/width must be positive, got {height}x{width}")
    if options.channels not in CHANNEL_MODES:
        raise SegflowError(
            f"unknown preprocess.channels {options.channels!r}; valid: {', '.join(CHANNEL_MODES)}"
        )
    if options.dehaze:  # checked before any work, not in every worker
        check_dehaze(options.dehaze_omega, options.dehaze_t0, options.dehaze_patch)
    channels = output_channels(used, options.channels)
    if options.context_slices:
        check_context(options)
        channels = 2 * options.context_slices + 1  # one gray channel per sampled slice
    dtype = "uint8" if options.to_uint8 or (used["bit_depth"] <= 8).all() else "uint16"
    if options.resize_mode not in RESIZE_MODES:
        raise SegflowError(
            f"unknown preprocess.resize_mode {options.resize_mode!r}; valid: "
            f"{', '.join(RESIZE_MODES)}"
        )
    if options.resize_mode == "pad":  # every image must fit: checked before any work
        too_large = used[(used["height"] > height) | (used["width"] > width)]
        if not too_large.empty:
            row = too_large.iloc[0]
            pad_offsets((int(row["height"]), int(row["width"])), (height, width), row["image_path"])
    return Geometry(height, width, channels, dtype)


def check_context(options: PreprocessOptions) -> None:
    """Refuse 2.5D options that cannot work (one line naming the ``preprocess`` key).

    Raises:
        SegflowError: context_slices negative or not an integer, channels 3 with it, or a
            slice_spacing that is not positive.
    """
    k = options.context_slices
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise SegflowError(f"preprocess.context_slices must be an integer >= 0, got {k!r}")
    if k and options.channels == "3":
        raise SegflowError(
            "preprocess.context_slices stacks one gray channel per slice: set "
            "preprocess.channels to auto or 1"
        )
    if options.slice_spacing is not None and not options.slice_spacing > 0:
        raise SegflowError(
            f"preprocess.slice_spacing must be positive (or null), got {options.slice_spacing!r}"
        )


def context_plan(
    slices: pd.DataFrame, ids: list[str], options: PreprocessOptions
) -> tuple[list[str], dict[str, list[tuple[int, int, float]]]]:
    """Which slices a 2.5D run prepares, and how each of ``ids`` samples them.

    Args:
        slices: manifest rows of one split with ``series_uid`` and ``slice_position``.
        ids: the items whose 2.5D inputs are built.
        options: ``context_slices`` (k) and ``slice_spacing``.

    Returns:
        (every slice of the series of ``ids``, in series order; per id of ``ids``, its 2k+1
        channels as (lower, upper, weight of upper) rows of that list,
        :func:`segflow.formats.dicom_series.context_weights`).

    Raises:
        SegflowError: no series columns, two slices at one position, a series with fewer
            slices than k + 1, slices of one series of different sizes, or a gap of more than
            :data:`MAX_GAP_RATIO` median spacings (missing slices).
    """
    k = options.context_slices
    wanted = set(ids)
    order = series_order(slices)  # refuses a manifest without series columns
    needed = set(slices.set_index("id")["series_uid"].loc[list(wanted)])
    order = order[order["series_uid"].isin(needed)]
    sizes = slices.set_index("id")[["height", "width"]]
    ordered: list[str] = []
    plan: dict[str, list[tuple[int, int, float]]] = {}
    for uid, frame in order.groupby("series_uid", sort=True):
        members = frame["id"].tolist()
        if len(members) <= k:
            raise SegflowError(
                f"preprocess.context_slices = {k} but series {uid} has only {len(members)} "
                f"slices (e.g. {members[0]}); lower preprocess.context_slices"
            )
        if len(sizes.loc[members].drop_duplicates()) > 1:
            raise SegflowError(f"series {uid}: its slices differ in size (e.g. {members[0]})")
        positions = frame["slice_position"].to_numpy(dtype=np.float64)
        gaps = np.diff(positions)
        median = float(np.median(gaps))
        if gaps.max() > MAX_GAP_RATIO * median:
            at = int(gaps.argmax())
            raise SegflowError(
                f"series {uid}: inconsistent slice spacing, a gap of {gaps[at]:g} mm between "
                f"{members[at]} and {members[at + 1]} is over {MAX_GAP_RATIO:g} times its median "
                f"spacing {median:g} mm (missing slices?)"
            )
        spacing = series_spacing(positions, options.slice_spacing, str(uid))
        offset = len(ordered)
        for item_id, weights in zip(members, context_weights(positions, k, spacing), strict=True):
            if item_id in wanted:
                plan[item_id] = [(offset + lo, offset + hi, t) for lo, hi, t in weights]
        ordered.extend(members)
    return ordered, plan


def write_context_arrays(
    slices: pd.DataFrame,
    items: dict[str, _Item],
    ids: list[str],
    images_path: Path,
    masks_path: Path | None,
    geometry: Geometry,
    options: PreprocessOptions,
    window: DicomWindow,
    n_classes: int,
    workers: int,
) -> list[tuple[np.ndarray, int]]:
    """2.5D arrays: every slice of the series of ``ids`` prepared as one gray channel, then
    each of ``ids`` stacked with its neighbours (:func:`context_plan`) into ``images_path``;
    its own mask (per slice) into ``masks_path``.

    Args:
        slices: manifest rows of the split (the series' slices).
        items: id -> what to read (image and mask sources) for every slice.
        ids: the rows to write, in array order.
        geometry: the output grid, ``channels`` = 2k+1.

    Returns:
        One (per-channel [sum, sum of squares], foreground pixels) entry, as :func:`write_arrays`.
    """
    ordered, plan = context_plan(slices, ids, options)
    single = dataclasses.replace(geometry, channels=1)
    # The per-slice arrays are scratch, removed with their folder, never published.
    with tempfile.TemporaryDirectory(prefix=".slices.", dir=images_path.parent) as scratch:
        slice_images = Path(scratch) / "images.npy"
        slice_masks = Path(scratch) / "masks.npy"
        write_arrays(
            [items[item_id] for item_id in ordered],
            slice_images,
            slice_masks if masks_path is not None else None,
            single,
            options,
            window,
            n_classes,
            workers,
        )
        per_slice = np.load(slice_images, mmap_mode="r")[..., 0]
        shape = (len(ids), geometry.height, geometry.width)
        images = np.lib.format.open_memmap(
            images_path, mode="w+", dtype=geometry.dtype, shape=(*shape, geometry.channels)
        )
        scale = 255.0 if geometry.dtype == "uint8" else 65535.0
        moments = np.zeros((2, geometry.channels), dtype=np.float64)
        for row, item_id in enumerate(ids):
            images[row] = context_stack(per_slice, plan[item_id], np.dtype(geometry.dtype))
            scaled = images[row].reshape(-1, geometry.channels).astype(np.float64) / scale
            moments[0] += scaled.sum(axis=0)
            moments[1] += np.square(scaled).sum(axis=0)
        images.flush()
        foreground = 0
        if masks_path is not None:
            position = {item_id: row for row, item_id in enumerate(ordered)}
            per_slice_masks = np.load(slice_masks, mmap_mode="r")
            masks = np.lib.format.open_memmap(
                masks_path, mode="w+", dtype=per_slice_masks.dtype, shape=shape
            )
            for row, item_id in enumerate(ids):
                masks[row] = per_slice_masks[position[item_id]]
                foreground += int(np.count_nonzero(masks[row]))
            masks.flush()
        del per_slice
    return [(moments, foreground)]


def write_arrays(
    items: list[_Item],
    images_path: Path,
    masks_path: Path | None,
    geometry: Geometry,
    options: PreprocessOptions,
    window: DicomWindow,
    n_classes: int,
    workers: int,
) -> list[tuple[np.ndarray, int]]:
    """Prepare ``items`` into ``images_path`` (and their masks into ``masks_path``, None: no
    masks), created at full size and filled by the workers in chunks.

    Returns:
        Per chunk, the per-channel [sum, sum of squares] and the foreground pixel count.
    """
    shape = (geometry.height, geometry.width)
    # Create each file at full size; workers reopen it in r+ mode and fill their rows.
    np.lib.format.open_memmap(
        images_path, mode="w+", dtype=geometry.dtype, shape=(len(items), *shape, geometry.channels)
    )
    reserve_space(images_path)
    if masks_path is not None:
        np.lib.format.open_memmap(
            masks_path, mode="w+", dtype=label_dtype(n_classes), shape=(len(items), *shape)
        )
        reserve_space(masks_path)
    tasks = [
        _ChunkTask(
            str(images_path),
            str(masks_path) if masks_path else None,
            index * _CHUNK,
            tuple(chunk),
            geometry,
            options,
            window,
            n_classes,
        )
        for index, chunk in enumerate(chunked(items, _CHUNK))
    ]
    return parallel_map(
        _process_chunk,
        tasks,
        workers,
        desc="preprocess",
        unit="img",
        weights=[len(task.items) for task in tasks],
    )


def context_items(slices: pd.DataFrame, roots: tuple[Path, ...]) -> dict[str, _Item]:
    """id -> an :class:`_Item` without masks for every slice of ``slices`` (the neighbours a
    2.5D stack reads), its image path checked against the manifest's data roots."""
    return {
        row.id: _Item(str(resolve_manifest_path(row.image_path, "image_path", row.id, roots)), ())
        for row in slices.itertuples()
    }


def array_index(
    frame: pd.DataFrame, geometry: Geometry, options: PreprocessOptions
) -> pd.DataFrame:
    """The index rows of ``frame`` (manifest rows in array order): id, split, row, original
    size, and with ``resize_mode`` pad the offsets prediction crops back with."""
    index = frame.assign(row=np.arange(len(frame)))[["id", "split", "row", "height", "width"]]
    index = index.rename(columns={"height": "orig_height", "width": "orig_width"})
    if options.resize_mode == "pad":
        sizes = list(zip(index["orig_height"], index["orig_width"], strict=True))
        shape = (geometry.height, geometry.width)
        index = index.assign(**pad_columns(sizes, shape, list(index["id"])))
    return index


def preprocess(
    manifest: pd.DataFrame,
    dedup_items: pd.DataFrame,
    options: PreprocessOptions,
    out_dir: str | Path,
    workers: int = 1,
    dicom_window: DicomWindow | None = None,
) -> dict[str, Any]:
    """Write the preprocessed train arrays, index and stats into ``out_dir`` (atomically per
    file).

    Args:
        manifest: the train manifest (ingest ``--split train``).
        dedup_items: the dedup stage's items (decides which train items are used, and how).
        options: preprocessing options.
        out_dir: output folder.
        workers: processes.
        dicom_window: HU window for DICOM sources.

    Returns:
        The stats written to ``stats.json``: n_train, height, width, channels, dtype,
        train_mean, train_std, train_mask_coverage (fraction of pixels of any class), classes
        (the label bits' names; binary: ``["mask"]``), multilabel (whether ingest had
        ``data.classes``), options and provenance (:mod:`segflow.core.stage_args`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used_ids = set(dedup_items.loc[dedup_items["use_for_training"], "id"])
    train = manifest[(manifest["split"] == "train") & manifest["id"].isin(used_ids)].sort_values(
        "id"
    )
    if train.empty:
        raise SegflowError("no train items left to preprocess (all dropped by dedup?)")
    geometry = _decide_geometry(train, options)
    classes = manifest_classes(manifest)
    n_classes = len(class_names(classes))
    sources = mask_sources(manifest, dedup_items)
    # Checked before any output file exists: a path leading out of the data writes nothing.
    roots = data_roots(manifest)
    image_paths = {
        row.id: str(resolve_manifest_path(row.image_path, "image_path", row.id, roots))
        for row in train.itertuples()
    }
    window = dicom_window or DicomWindow()
    items = [_Item(image_paths[row.id], sources[row.id]) for row in train.itertuples()]
    with (
        atomic_path(out_dir / images_file("train")) as images_path,
        atomic_path(out_dir / masks_file()) as masks_path,
    ):
        if options.context_slices:
            # Neighbours come from every train slice of the series, used for training or not.
            slices = manifest[manifest["split"] == "train"]
            by_id = context_items(slices, roots)
            by_id.update(
                {row.id: item for row, item in zip(train.itertuples(), items, strict=True)}
            )
            results = write_context_arrays(
                slices,
                by_id,
                train["id"].tolist(),
                images_path,
                masks_path,
                geometry,
                options,
                window,
                n_classes,
                workers,
            )
        else:
            results = write_arrays(
                items, images_path, masks_path, geometry, options, window, n_classes, workers
            )
    moments = np.sum([chunk_moments for chunk_moments, _ in results], axis=0)
    foreground = sum(chunk_foreground for _, chunk_foreground in results)
    write_index(out_dir, array_index(train, geometry, options))
    n_pixels = len(train) * geometry.height * geometry.width
    mean = moments[0] / n_pixels
    std = np.sqrt(np.maximum(moments[1] / n_pixels - mean**2, 0.0))
    stats = {
        "n_train": len(train),
        "height": geometry.height,
        "width": geometry.width,
        "channels": geometry.channels,
        "dtype": geometry.dtype,
        "train_mean": mean.round(6).tolist(),
        "train_std": std.round(6).tolist(),
        "train_mask_coverage": round(foreground / n_pixels, 6),
        "classes": list(class_names(classes)),
        "multilabel": classes is not None,
        "options": published_options(options),
    }
    # Deterministic (no seed): the same manifest and options give the same arrays.
    block = stage_provenance(
        {"options": stats["options"], "dicom_window": published_options(window)}
    )
    stats = with_provenance(stats, block)
    write_stats(out_dir, stats)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow preprocess``'s flags."""
    add_dataclass_arguments(parser, PreprocessOptions)
    add_stage_tables(parser)
    parser.add_argument(
        "--out-dir", required=True, help="folder for the .npy arrays, index and stats"
    )
    parser.add_argument(
        "--resolution",
        default=None,
        help="resolution.json (segflow plan-resolution): its chosen size and mode replace "
        "--height, --width and --resize-mode",
    )
    add_workers(parser)
    add_dicom_window_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow preprocess``: write the arrays, index and stats."""
    options = dataclass_from_namespace(PreprocessOptions, args)
    if args.resolution:
        height, width, mode = read_resolution(args.resolution)
        stage_log.info("resolution %s: %dx%d (%s)", args.resolution, height, width, mode)
        options = dataclasses.replace(options, height=height, width=width, resize_mode=mode)
    stats = preprocess(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        options,
        args.out_dir,
        workers=args.workers,
        dicom_window=dicom_window_from_args(args),
    )
    stage_log.info(
        "preprocessed %d train images to %dx%dx%d %s in %s",
        stats["n_train"],
        stats["height"],
        stats["width"],
        stats["channels"],
        stats["dtype"],
        args.out_dir,
    )
