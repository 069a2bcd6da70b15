"""What the stacked models read for a set of ids, beside the probability maps: the
preprocessed images (cropped back to the maps' original pixels) and the ``meta_*`` metadata;
one class's maps of every experiment; the feature tables' Parquet writer. Shared by the fit (``segflow stack``, OOF side) and
the apply (``segflow apply-stack``, test side)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import images_file, read_index
from segflow.artifacts.predictions import Prediction
from segflow.artifacts.resolution import image_to_original, index_offsets
from segflow.core.atomic import atomic_path
from segflow.core.errors import SegflowError
from segflow.ensemble.stacking.features import META_PREFIX


def images_for(arrays_dir: str | os.PathLike[str], split: str, ids: pd.Series) -> np.ndarray:
    """The preprocessed images of ``ids``; reflect-padded ones (``resize_mode: pad``) cropped
    back to their original pixels, which is where the probability maps are.

    Shape:
        output: (len(ids), h, w, C).
    """
    arrays_dir = Path(arrays_dir)
    index = read_index(arrays_dir, split=split)
    selected = index.set_index("id").loc[ids].reset_index()
    rows = selected["row"].to_numpy()
    images = np.asarray(np.load(arrays_dir / images_file(split), mmap_mode="r")[rows])
    offsets = index_offsets(selected)
    if all(offset is None for offset in offsets):
        return images
    sizes = zip(selected["orig_height"], selected["orig_width"], strict=True)
    return np.stack(
        [
            image_to_original(image, size, offset)
            for image, size, offset in zip(images, sizes, offsets, strict=True)
        ]
    )


def metadata_for(manifest: pd.DataFrame, ids: pd.Series) -> pd.DataFrame:
    """The ``meta_*`` columns of ``ids`` in a manifest (or any table with an ``id`` column),
    row-aligned with ``ids``, as numbers (text that is not a number: NaN)."""
    meta = [c for c in manifest.columns if c.startswith(META_PREFIX)]
    frame = manifest.set_index("id").loc[ids, meta].reset_index(drop=True)
    return frame.apply(pd.to_numeric, errors="coerce")


def class_maps(
    names: Sequence[str], predictions: Sequence[Prediction], k: int
) -> dict[str, np.ndarray]:
    """Class ``k``'s probability plane of every experiment, float32 (N, H, W)."""
    return {
        n: np.asarray(p.probs[:, k], np.float32) for n, p in zip(names, predictions, strict=True)
    }


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """A feature table as Parquet, atomically (the folder created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def base_dir_for(candidate: str, base_dir: str | None, command: str, flag: str) -> str | None:
    """The ensemble's folder that the gate reads (``--base-oof-dir``/``--base-test-dir``), or
    None for the pixel blender, which reads the experiments only.

    Raises:
        SegflowError: the gate without the folder, or the blender given one.
    """
    if candidate == "pixel":
        if base_dir:
            raise SegflowError(
                f"{command} --candidate pixel reads the experiments only; drop {flag}"
            )
        return None
    if not base_dir:
        raise SegflowError(f"{command} --candidate gate needs {flag}")
    return base_dir
