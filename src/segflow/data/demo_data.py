"""Seeded synthetic segmentation dataset in Kaggle (TGS Salt) layout: the embedded demo data.

The generator draws objects of varied shape, size and contrast on textured, seismic-looking
backgrounds, so a small U-Net trained for a few CPU minutes learns something without the task
being trivial. The object interior differs from the background in *texture* (reflector stripes
are replaced by a smoother or differently oriented fill) and usually in intensity; background
distractors change intensity only, so brightness alone is not a reliable cue.

It also plants the data-quality problems a real Kaggle dataset has, with the ground truth written
next to the data so the duplicate-detection stages can be tested against it:

* groups of byte-identical train images (same mask),
* one pair of train images with identical pixels but different PNG bytes (same mask),
* one group of byte-identical train images whose masks conflict,
* test images that are byte-identical copies of train images.

Layout written under ``out_dir``::

    train/images/<id>.png   8-bit PNG, 1 channel ("gray") or 3 channels ("rgb")
    train/masks/<id>.png    8-bit single-channel PNG, values 0/255
    test/images/<id>.png
    train.csv               id,rle_mask  (Kaggle RLE: column-major, 1-indexed; "" when empty)
    metadata.csv            id,depth     (every train and test id; weakly informative)
    planted_duplicates.json the planted truth (also returned by generate_demo_data)
    contents.json           every other file's sha256 and the options: what was generated, so
                            the workflow's data stamp (segflow.core.data_stamp) can tell a
                            file a user edited in place from a fresh generation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from segflow.core.data_stamp import write_content_list
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace, option
from segflow.core.stage_args import stage_log
from segflow.formats.rle import rle_encode

COLORS: tuple[str, ...] = ("gray", "rgb")
MIN_TRAIN = 20
MIN_TEST = 8
MIN_SIZE = 16
MAX_SIZE = 4096

# Planted structure. Unique train images = n_train minus the extra copies these imply.
EXACT_GROUP_SIZES: tuple[int, ...] = (3, 2, 2)
CONFLICT_GROUP_SIZE = 3
N_TRAIN_TEST_COPIES = 4

# Every image is written with this PNG level; the pixel-equal twin with another encoding.
_PNG_LEVEL = 3
_ALT_PNG_PARAMS: tuple[tuple[int, int], ...] = (
    (cv2.IMWRITE_PNG_COMPRESSION, 9),
    (cv2.IMWRITE_PNG_COMPRESSION, 0),
    (cv2.IMWRITE_PNG_COMPRESSION, 1),
    (cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY),
    (cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_FILTERED),
)
_MIN_OBJECT_PIXELS = 8
_ID_BITS = 40  # 10 hex characters


@dataclass(frozen=True)
class DemoDataOptions:
    """Size and content of the demo dataset (config section ``demo``)."""

    n_train: int = option(480, "train images written, planted duplicates included")
    n_test: int = option(160, "test images written, train copies included")
    height: int = option(101, "image height in pixels")
    width: int = option(101, "image width in pixels")
    color: str = option("gray", "1-channel gray or 3-channel colour PNGs", COLORS)
    empty_fraction: float = option(0.35, "approximate fraction of empty masks, in [0, 1)")
    seed: int = option(0, "seed of the only random generator; same options, same bytes")


def generate_demo_data(
    out_dir: str | os.PathLike[str], options: DemoDataOptions = DemoDataOptions()
) -> dict[str, Any]:
    """Write the demo dataset to ``out_dir`` atomically and return the planted truth.

    Everything is built in a temporary sibling directory and renamed onto ``out_dir`` only when
    complete; an existing dataset there is replaced at that moment. On any error the temporary
    directory is removed and ``out_dir`` is left as it was.

    Args:
        out_dir: dataset directory to create or replace. An existing non-empty directory is
            replaced only if it holds a previous demo dataset (``planted_duplicates.json``), so a
            mistyped path cannot wipe unrelated files.
        options: dataset size and content; see :class:`DemoDataOptions`.

    Returns:
        The planted truth, identical to ``out_dir/planted_duplicates.json``: lists of id groups
        under ``train_exact_byte_groups``, ``train_pixel_equal_byte_different``,
        ``conflicting_mask_group`` and ``train_test_copies`` (``[train_id, test_id]`` pairs),
        plus counts (``n_train``, ``n_test``, ``n_empty_train``, ``n_empty_test``) and the
        options used.

    Raises:
        SegflowError: an option is out of range, or ``out_dir`` is a file or an unrelated
            non-empty directory.
    """
    _validate(options)
    target = Path(out_dir)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp creates 0700; the dataset should be readable like any other output.
        tmp.chmod(0o755)
        truth = _build(tmp, options)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return truth


# --------------------------------------------------------------------------- validation / io


def _validate(options: DemoDataOptions) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)

    if not is_int(options.n_train) or options.n_train < MIN_TRAIN:
        raise SegflowError(
            f"demo data option n_train={options.n_train!r}: must be an integer >= {MIN_TRAIN}"
        )
    if not is_int(options.n_test) or options.n_test < MIN_TEST:
        raise SegflowError(
            f"demo data option n_test={options.n_test!r}: must be an integer >= {MIN_TEST}"
        )
    for name in ("height", "width"):
        value = getattr(options, name)
        if not is_int(value) or not MIN_SIZE <= value <= MAX_SIZE:
            raise SegflowError(
                f"demo data option {name}={value!r}: must be an integer in [{MIN_SIZE}, {MAX_SIZE}]"
            )
    if options.color not in COLORS:
        raise SegflowError(
            f"demo data option color={options.color!r}: must be one of {', '.join(COLORS)}"
        )
    fraction = options.empty_fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float | np.floating)
        or not math.isfinite(fraction)
        or not 0.0 <= fraction < 1.0
    ):
        raise SegflowError(
            f"demo data option empty_fraction={fraction!r}: must be a number in [0, 1)"
        )
    if not is_int(options.seed) or options.seed < 0:
        raise SegflowError(
            f"demo data option seed={options.seed!r}: must be a non-negative integer"
        )


def _check_target(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise SegflowError(f"{target}: exists and is not a directory; refusing to replace it")
    if (
        target.is_dir()
        and any(target.iterdir())
        and not (target / "planted_duplicates.json").is_file()
    ):
        raise SegflowError(
            f"{target}: non-empty directory that is not a demo dataset (no planted_duplicates.json);"
            " refusing to replace it"
        )


def _swap_into_place(tmp: Path, target: Path) -> None:
    # Move the old tree aside rather than deleting it first, so a failed rename can restore it.
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, old)  # rename(2) may replace an empty directory
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _encode_png(
    image: np.ndarray, params: tuple[int, int] = (cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL)
) -> bytes:
    ok, buf = cv2.imencode(".png", image, list(params))
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for an image of shape {image.shape}")
    return buf.tobytes()


def _encode_png_differently(image: np.ndarray, reference: bytes) -> bytes:
    """Encode ``image`` losslessly again, with settings that give bytes other than ``reference``."""
    for params in _ALT_PNG_PARAMS:
        data = _encode_png(image, params)
        if data != reference:
            return data
    raise RuntimeError("could not find a PNG encoding whose bytes differ from the default one")


# --------------------------------------------------------------------------- planning / writing


def _make_ids(rng: np.random.Generator, count: int) -> list[str]:
    ids: list[str] = []
    seen: set[int] = set()
    while len(ids) < count:
        for value in rng.integers(0, 2**_ID_BITS, size=count - len(ids), dtype=np.int64).tolist():
            if value not in seen:
                seen.add(value)
                ids.append(f"{value:010x}")
    return ids


def _empty_flags(
    rng: np.random.Generator, count: int, fraction: float, min_nonempty: int
) -> np.ndarray:
    n_empty = min(round(fraction * count), count - min_nonempty)
    flags = np.zeros(count, dtype=bool)
    flags[rng.permutation(count)[: max(n_empty, 0)]] = True
    return flags


def _build(root: Path, options: DemoDataOptions) -> dict[str, Any]:
    """Generate every file under ``root`` (an empty directory) and return the planted truth."""
    rng = np.random.default_rng(options.seed)
    h, w = options.height, options.width
    for sub in ("train/images", "train/masks", "test/images"):
        (root / sub).mkdir(parents=True)

    n_extra_train = sum(s - 1 for s in EXACT_GROUP_SIZES) + 1 + (CONFLICT_GROUP_SIZE - 1)
    n_unique_train = options.n_train - n_extra_train
    n_unique_test = options.n_test - N_TRAIN_TEST_COPIES

    ids = _make_ids(rng, options.n_train + options.n_test)
    train_ids, test_ids = ids[: options.n_train], ids[options.n_train :]
    # Ids are random, so giving the first ones to the unique images reveals nothing.
    extra_train = iter(train_ids[n_unique_train:])
    copy_test = iter(test_ids[n_unique_test:])

    # The conflict source must have an object, so its masks can disagree in both ways.
    train_empty = _empty_flags(rng, n_unique_train, options.empty_fraction, min_nonempty=2)
    test_empty = _empty_flags(rng, n_unique_test, options.empty_fraction, min_nonempty=1)
    conflict_src = int(rng.choice(np.flatnonzero(~train_empty)))
    others = [int(k) for k in rng.permutation(n_unique_train) if k != conflict_src]
    n_sources = len(EXACT_GROUP_SIZES) + 1 + N_TRAIN_TEST_COPIES
    exact_src, pixel_src, copy_src = (
        others[: len(EXACT_GROUP_SIZES)],
        others[len(EXACT_GROUP_SIZES)],
        others[len(EXACT_GROUP_SIZES) + 1 : n_sources],
    )

    exact_groups: list[list[str]] = []
    pixel_pair: list[str] = []
    conflict_group: list[str] = []
    tt_copies: list[list[str]] = []
    train_rle: dict[str, str] = {}
    coverage: dict[str, float] = {}  # mask fraction per id; test ids use their hidden mask
    seen_pixels: set[bytes] = set()

    def write_train(image_id: str, png: bytes, mask: np.ndarray) -> None:
        _write_bytes(root / "train" / "images" / f"{image_id}.png", png)
        _write_bytes(root / "train" / "masks" / f"{image_id}.png", _encode_png(mask))
        train_rle[image_id] = rle_encode(mask, order="column", start=1)
        coverage[image_id] = float(np.count_nonzero(mask)) / mask.size

    for k in range(n_unique_train):
        image, mask = _unique_sample(rng, h, w, options.color, bool(train_empty[k]), seen_pixels)
        png = _encode_png(image)
        source_id = train_ids[k]
        write_train(source_id, png, mask)
        if k in exact_src:
            group = [source_id]
            for _ in range(EXACT_GROUP_SIZES[exact_src.index(k)] - 1):
                group.append(next(extra_train))
                write_train(group[-1], png, mask)
            exact_groups.append(group)
        elif k == pixel_src:
            twin = next(extra_train)
            write_train(twin, _encode_png_differently(image, png), mask)
            pixel_pair = [source_id, twin]
        elif k == conflict_src:
            conflict_group = [source_id]
            for other_mask in (np.zeros_like(mask), _conflicting_mask(rng, mask)):
                conflict_group.append(next(extra_train))
                write_train(conflict_group[-1], png, other_mask)
        elif k in copy_src:
            test_id = next(copy_test)
            _write_bytes(root / "test" / "images" / f"{test_id}.png", png)
            coverage[test_id] = coverage[source_id]
            tt_copies.append([source_id, test_id])

    for j in range(n_unique_test):
        image, mask = _unique_sample(rng, h, w, options.color, bool(test_empty[j]), seen_pixels)
        _write_bytes(root / "test" / "images" / f"{test_ids[j]}.png", _encode_png(image))
        coverage[test_ids[j]] = float(np.count_nonzero(mask)) / mask.size

    pd.DataFrame(
        {"id": sorted(train_rle), "rle_mask": [train_rle[i] for i in sorted(train_rle)]}
    ).to_csv(root / "train.csv", index=False)
    all_ids = sorted(coverage)
    pd.DataFrame({"id": all_ids, "depth": _depths(rng, [coverage[i] for i in all_ids])}).to_csv(
        root / "metadata.csv", index=False
    )

    truth: dict[str, Any] = {
        "train_exact_byte_groups": exact_groups,
        "train_pixel_equal_byte_different": [pixel_pair],
        "conflicting_mask_group": conflict_group,
        "train_test_copies": tt_copies,
        "n_train": options.n_train,
        "n_test": options.n_test,
        "n_empty_train": sum(1 for i in train_ids if coverage[i] == 0.0),
        "n_empty_test": sum(1 for i in test_ids if coverage[i] == 0.0),
        "options": asdict(options),
    }
    (root / "planted_duplicates.json").write_text(
        json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    # Last: the content hash of every file above, so an edit in place is told from this output.
    write_content_list(root, asdict(options))
    return truth


def _depths(rng: np.random.Generator, coverages: list[float]) -> list[int]:
    """A TGS-like depth: shifts with object presence and size, but mostly noise."""
    cov = np.asarray(coverages, dtype=np.float64)
    loc = 420.0 + 150.0 * (cov > 0) + 250.0 * cov
    return np.clip(np.rint(rng.normal(loc, 170.0)), 50, 960).astype(int).tolist()


def _unique_sample(
    rng: np.random.Generator, h: int, w: int, color: str, empty: bool, seen: set[bytes]
) -> tuple[np.ndarray, np.ndarray]:
    # Continuous noise makes a collision practically impossible; checking keeps it a guarantee.
    while True:
        image, mask = _render_sample(rng, h, w, color, empty)
        key = image.tobytes()
        if key not in seen:
            seen.add(key)
            return image, mask


def _conflicting_mask(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A non-empty mask that differs from ``mask``, like a second annotator's outline."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    for candidate in (cv2.dilate(mask, kernel), cv2.erode(mask, kernel)):
        if candidate.any() and not np.array_equal(candidate, mask):
            return candidate
    while True:
        candidate = _draw_shape(rng, *mask.shape, kind="ellipse")
        if np.count_nonzero(candidate) >= _MIN_OBJECT_PIXELS and not np.array_equal(
            candidate, mask
        ):
            return candidate


# --------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise with features about (size / cells) pixels wide."""
    low = rng.standard_normal((max(cells, 2), max(cells, 2))).astype(np.float32)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)


def _fractal(
    rng: np.random.Generator, h: int, w: int, octaves: int, persistence: float
) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        out += persistence**octave * _smooth_noise(rng, h, w, 2 ** (octave + 1))
    return out / (out.std() + 1e-6)


def _stripes(rng: np.random.Generator, h: int, w: int, angle: float, period: float) -> np.ndarray:
    """Warped, amplitude-modulated layers, like reflectors in a seismic section."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = _smooth_noise(rng, h, w, int(rng.integers(2, 5))) * rng.uniform(1.0, 0.12 * max(h, w))
    coord = yy * math.cos(angle) + xx * math.sin(angle) + warp
    wave = np.sin(2 * math.pi * coord / period + rng.uniform(0, 2 * math.pi))
    wave += 0.5 * np.sin(
        2 * math.pi * coord / (period * rng.uniform(1.7, 2.8)) + rng.uniform(0, 6.3)
    )
    envelope = np.clip(0.65 + 0.35 * _smooth_noise(rng, h, w, 3), 0.15, 1.0)
    return (wave * envelope / 1.5).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float, float]:
    """Background intensity in roughly [0, 1], plus its stripe angle and period (0 if none)."""
    bg = 0.5 + rng.uniform(0.04, 0.14) * _fractal(rng, h, w, 5, rng.uniform(0.45, 0.7))
    angle, period = 0.0, 0.0
    if rng.random() < 0.7:
        angle = rng.uniform(-0.4, 0.4)
        period = rng.uniform(3.5, 14.0)
        bg += rng.uniform(0.06, 0.2) * _stripes(rng, h, w, angle, period)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        ramp = (yy / h - 0.5) * math.cos(theta) + (xx / w - 0.5) * math.sin(theta)
        bg += rng.uniform(0.1, 0.35) * ramp
    return bg.astype(np.float32), angle, period


def _interior_texture(
    rng: np.random.Generator, h: int, w: int, bg_angle: float, bg_period: float
) -> np.ndarray:
    """Texture inside objects: homogeneous, speckled, or layers unlike the background's."""
    kind = rng.choice(["smooth", "speckle", "cross_layers"], p=[0.45, 0.3, 0.25])
    if kind == "smooth":
        return rng.uniform(0.02, 0.06) * _fractal(rng, h, w, 3, 0.5)
    if kind == "speckle":
        fine = rng.standard_normal((h, w)).astype(np.float32)
        return rng.uniform(0.03, 0.08) * cv2.GaussianBlur(fine, (0, 0), rng.uniform(0.6, 1.2))
    angle = bg_angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.4)
    period = rng.uniform(2.5, 6.0) if bg_period == 0.0 or bg_period > 7 else rng.uniform(8.0, 16.0)
    return rng.uniform(0.04, 0.1) * _stripes(rng, h, w, angle, period)


# --------------------------------------------------------------------------- shapes


def _draw_shape(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """One object mask (uint8 0/255); may be partly outside the image or touch its border."""
    mask = np.zeros((h, w), np.uint8)
    size = min(h, w)
    if kind == "full":
        mask[:] = 255
    elif kind in ("ellipse", "polygon"):
        center = (rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h)
        # Log-uniform radius: many small objects, a fair number of large ones.
        radius = size * math.exp(rng.uniform(math.log(0.04), math.log(0.5)))
        if kind == "ellipse":
            axes = (max(1, round(radius)), max(1, round(radius * rng.uniform(0.3, 1.0))))
            cv2.ellipse(
                mask,
                (round(center[0]), round(center[1])),
                axes,
                rng.uniform(0, 180),
                0,
                360,
                255,
                -1,
            )
        else:
            n = int(rng.integers(5, 13))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = radius * np.clip(1 + 0.35 * rng.standard_normal(n), 0.35, 1.8)
            pts = np.stack(
                [center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1
            )
            cv2.fillPoly(mask, [np.rint(pts).astype(np.int32)], 255)
    elif kind == "blob":
        field = _smooth_noise(rng, h, w, int(rng.integers(2, 6)))
        field += 0.35 * _smooth_noise(rng, h, w, int(rng.integers(8, 14)))
        area = math.exp(rng.uniform(math.log(0.02), math.log(0.5)))
        mask[field > np.quantile(field, 1 - area)] = 255
    elif kind == "layer":
        # A body below a smooth boundary, like a salt dome entering from one side.
        sideways = rng.random() < 0.25
        hh, ww = (w, h) if sideways else (h, w)
        curve = cv2.resize(
            rng.standard_normal((1, int(rng.integers(2, 6)))).astype(np.float32),
            (ww, 1),
            interpolation=cv2.INTER_CUBIC,
        )[0]
        boundary = hh * rng.uniform(0.15, 0.9) + hh * rng.uniform(0.03, 0.25) * curve
        body = (np.arange(hh, dtype=np.float32)[:, None] > boundary[None, :]).astype(np.uint8) * 255
        if rng.random() < 0.3:
            body = body[::-1]
        if sideways:
            body = body.T
        if rng.random() < 0.5:
            body = body[:, ::-1]
        mask = np.ascontiguousarray(body)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return mask


def _object_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Union of one to three shapes, without specks smaller than ``_MIN_OBJECT_PIXELS``."""
    while True:
        if rng.random() < 0.03:
            return _draw_shape(rng, h, w, "full")
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
            kind = str(
                rng.choice(["ellipse", "polygon", "blob", "layer"], p=[0.28, 0.28, 0.24, 0.2])
            )
            mask |= _draw_shape(rng, h, w, kind)
        # Thresholded noise and clipped shapes leave 1-2 pixel specks no annotator would draw.
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= _MIN_OBJECT_PIXELS
        keep[0] = False  # label 0 is the background
        if keep.any():
            return np.where(keep[labels], 255, 0).astype(np.uint8)


def _distractors(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth intensity-only patches: they keep the background texture, unlike real objects."""
    out = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(["ellipse", "polygon", "blob"]))
        patch = _draw_shape(rng, h, w, kind).astype(np.float32) / 255.0
        patch = cv2.GaussianBlur(patch, (0, 0), rng.uniform(1.5, 5.0))
        out += rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.1) * patch
    return out


# --------------------------------------------------------------------------- composition


def _render_sample(
    rng: np.random.Generator, h: int, w: int, color: str, empty: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8, HxW or HxWx3) and its mask (uint8 HxW, 0/255)."""
    bg, angle, period = _background(rng, h, w)
    # Empty images get distractors more often, so "any blob" is not a shortcut to "object".
    if rng.random() < (0.6 if empty else 0.4):
        bg += _distractors(rng, h, w)

    mask = np.zeros((h, w), np.uint8) if empty else _object_mask(rng, h, w)
    alpha = np.zeros((h, w), np.float32)
    image = bg
    if not empty:
        alpha = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), rng.uniform(0.6, 1.5))
        # Keep the background's illumination inside the object, replace its texture.
        illumination = cv2.GaussianBlur(bg, (0, 0), 6.0)
        contrast = rng.uniform(0.12, 0.35)
        interior = (
            illumination
            + rng.choice([-1.0, 1.0]) * contrast
            + _interior_texture(rng, h, w, angle, period)
        )
        image = bg * (1 - alpha) + interior * alpha
        if rng.random() < 0.3:
            # A reflector along the boundary, as salt tops often show.
            rim = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
            rim_f = cv2.GaussianBlur(rim.astype(np.float32) / 255.0, (0, 0), 0.8)
            image += rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.15) * rim_f

    image = (image - 0.5) * rng.uniform(0.7, 1.5) + 0.5 + rng.uniform(-0.12, 0.12)
    image += rng.normal(0.0, rng.uniform(0.008, 0.03), (h, w)).astype(np.float32)
    if color == "rgb":
        image = _colorize(rng, image, alpha)
    return _to_uint8(image), mask


def _colorize(rng: np.random.Generator, gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Map intensity through a random two-colour ramp, tint objects, and add per-channel noise."""
    h, w = gray.shape
    dark = rng.uniform(0.0, 0.4, 3).astype(np.float32)
    light = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    rgb = dark + (light - dark) * gray[..., None]
    rgb += rng.uniform(-0.12, 0.12, 3).astype(np.float32) * alpha[..., None]
    channel_noise = [_smooth_noise(rng, h, w, int(rng.integers(3, 9))) for _ in range(3)]
    rgb += rng.uniform(0.01, 0.04) * np.stack(channel_noise, axis=-1)
    return rgb


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow demo-data``'s flags: the options and the output folder."""
    add_dataclass_arguments(parser, DemoDataOptions)
    parser.add_argument("out_dir", help="output folder (Kaggle layout)")


def run(args: argparse.Namespace) -> None:
    """``segflow demo-data``: write the dataset."""
    truth = generate_demo_data(args.out_dir, dataclass_from_namespace(DemoDataOptions, args))
    stage_log.info(
        "demo dataset written to %s (%d train, %d test images)",
        args.out_dir,
        truth["n_train"],
        truth["n_test"],
    )
