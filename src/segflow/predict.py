"""Inference: fold models -> probabilities, with TTA, tiling, and the original resolution restored.

OOF: each fold's model predicts only its own validation fold, so every training item gets
exactly one out-of-fold probability map. Test: every fold's model predicts every test image and
the folds are merged (mean or geometric mean). Probabilities are stored as float16 at the
original image resolution, row-aligned with an index table, so metrics, post-processing tuning
and stacking work in the competition's own pixel grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from segflow.errors import SegflowError
from segflow.options import option
from segflow.resolution import Offsets, index_offsets, to_original

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FOLD_MERGES = ("mean", "gmean")


@dataclass(frozen=True)
class PredictOptions:
    """Inference settings (config section ``predict``)."""

    tta: str = option("none", "test-time augmentation: none, hflip, vflip or d4")
    batch_size: int = option(32, "images per forward pass")
    tile: int | None = option(None, "tile size for tiled inference of large images (None: whole)")
    tile_overlap: float = option(0.5, "overlap fraction between tiles")
    tile_weighting: str = option("gaussian", "tile blending: gaussian, pyramid or uniform")
    fold_merge: str = option("mean", "how test predictions of the folds are merged", FOLD_MERGES)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


def _scale(dtype: np.dtype) -> float:
    return 65535.0 if dtype == np.uint16 else 255.0


def predict_rows(
    model: torch.nn.Module,
    images: np.ndarray,
    rows: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    options: PredictOptions,
    device: torch.device,
    divisor: int = 32,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sigmoid probabilities for ``images[rows]`` at the preprocessed resolution.

    Args:
        model: a segmentation model, optionally with an aux (image-level) head.
        images: the preprocessed (N, H, W, C) array (a memmap is fine: rows are read in batches).
        rows: which rows to predict.
        mean, std: per-channel normalisation of the training run (in [0, 1] units).
        options: TTA, batch size and tiling.
        device: where to run.
        divisor: the model's required input multiple; inputs are reflect-padded to it.

    Returns:
        (mask probabilities, non-empty probabilities of the aux head averaged over the TTA
        copies, or None without an aux head or with tiling, where the head sees tiles).

    Shape:
        masks: (len(rows), K, H, W) float32; non-empty: (len(rows), K) float32.
    """
    import torch

    from segflow.datasets import crop_to, pad_to_multiple
    from segflow.tiling import predict_tiled
    from segflow.tta import predict_with_tta

    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    scale = _scale(images.dtype)
    height, width = images.shape[1:3]
    model = model.to(device).eval()
    label_probs: list[torch.Tensor] = []  # aux-head sigmoids of every TTA copy, in call order

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        padded, _ = pad_to_multiple(batch, divisor)
        logits = model(padded)
        if isinstance(logits, tuple | list):  # smp's aux head: (mask logits, label logits)
            logits, label_logits = logits
            label_probs.append(torch.sigmoid(label_logits.float()))
        return torch.sigmoid(crop_to(logits, batch.shape[-2], batch.shape[-1]).float())

    def augmented(batch: torch.Tensor) -> torch.Tensor:
        return predict_with_tta(probabilities, batch, options.tta)

    masks: np.ndarray | None = None
    nonempty: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(rows), options.batch_size):
            chunk = np.asarray(images[rows[start : start + options.batch_size]])
            batch = torch.from_numpy(chunk.astype(np.float32) / scale).permute(0, 3, 1, 2)
            batch = ((batch.to(device) - mean_t) / std_t).contiguous()
            label_probs.clear()
            if options.tile:
                probs = torch.stack(
                    [
                        predict_tiled(
                            augmented,
                            image,
                            (options.tile, options.tile),
                            options.tile_overlap,
                            options.tile_weighting,
                            options.batch_size,
                        )
                        for image in batch
                    ]
                )
            else:
                probs = augmented(batch)
            if masks is None:
                masks = np.empty((len(rows), probs.shape[1], height, width), dtype=np.float32)
                if label_probs and not options.tile:
                    nonempty = np.empty((len(rows), probs.shape[1]), dtype=np.float32)
            masks[start : start + len(chunk)] = probs.cpu().numpy()
            if nonempty is not None:
                # TTA calls hold whole copies of the batch, copy-major: average the copies.
                copies = torch.cat(label_probs).view(-1, len(chunk), probs.shape[1])
                nonempty[start : start + len(chunk)] = copies.mean(dim=0).cpu().numpy()
    if masks is None:
        masks = np.empty((0, 1, height, width), dtype=np.float32)
    return masks, nonempty


def restore_resolution(
    probs: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    offsets: Sequence[Offsets | None] | None = None,
) -> list[np.ndarray]:
    """Each image's probability maps back on its original (height, width) grid
    (:func:`segflow.resolution.to_original`): cropped where it was reflect-padded, else
    resized bilinearly.

    Args:
        probs: the maps at the preprocessed size.
        sizes: each image's original (height, width).
        offsets: each image's (top, left) padding (:func:`segflow.resolution.index_offsets`);
            None: every image was resized.

    Shape:
        probs: (N, K, h, w); output: N arrays of (K, H_i, W_i), float32.
    """
    offsets = [None] * len(sizes) if offsets is None else offsets
    return [
        to_original(prob, size, offset)
        for prob, size, offset in zip(probs, sizes, offsets, strict=True)
    ]


def stack_original(probs: list[np.ndarray], where: str) -> np.ndarray:
    """Stack same-sized maps as float16 (N, K, H, W); mixed original sizes are not supported yet."""
    shapes = {prob.shape for prob in probs}
    if len(shapes) > 1:
        raise SegflowError(
            f"{where}: original image sizes differ ({sorted(shapes)[:3]}); storing predictions "
            "for mixed-size datasets is not supported yet"
        )
    if not probs:
        return np.zeros((0, 1, 0, 0), dtype=np.float16)
    return np.stack(probs).astype(np.float16)


def merge_folds(fold_probs: Sequence[np.ndarray], how: str = "mean") -> np.ndarray:
    """Merge the test predictions of several fold models (arithmetic or geometric mean)."""
    if how not in FOLD_MERGES:
        raise KeyError(f"unknown fold merge {how!r}; valid: {', '.join(FOLD_MERGES)}")
    stacked = np.stack([np.asarray(p, dtype=np.float32) for p in fold_probs])
    if how == "mean":
        return stacked.mean(axis=0)
    return np.exp(np.log(np.clip(stacked, 1e-6, 1.0)).mean(axis=0))


def validation_rows(index: pd.DataFrame, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The preprocessed train rows of ``fold``'s validation items, with their original sizes."""
    train = index[index["split"] == "train"].set_index("id")
    ids = folds.loc[folds["fold"] == fold, "id"]
    if ids.empty:
        raise SegflowError(f"fold {fold} has no items in folds.csv")
    missing = sorted(set(ids) - set(train.index))
    if missing:
        raise SegflowError(f"folds.csv ids missing from the preprocessed arrays: {missing[:3]}")
    return train.loc[ids].reset_index()


def load_arrays_meta(arrays_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """index.parquet and stats.json of a preprocess output folder."""
    import json

    arrays_dir = Path(arrays_dir)
    for name in ("index.parquet", "stats.json"):
        if not (arrays_dir / name).is_file():
            raise SegflowError(f"{arrays_dir / name} does not exist (run preprocess first)")
    return pd.read_parquet(arrays_dir / "index.parquet"), json.loads(
        (arrays_dir / "stats.json").read_text()
    )


def predict_split(
    arrays_dir: str | Path,
    model_path: str | Path,
    split: str,
    options: PredictOptions,
    fold: int | None = None,
    folds_csv: str | Path | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Predict one fold model on its validation fold (``split="train"``) or on the test set.

    Returns:
        (ids with their original sizes, plus one ``nonempty_prob_<k>`` column per class when
        the model has an aux head; float16 probabilities at the original resolution).

    Shape:
        probabilities: (N, K, H_orig, W_orig).
    """
    from segflow.devices import resolve_device
    from segflow.models import load_checkpoint, required_divisor

    arrays_dir = Path(arrays_dir)
    index, stats = load_arrays_meta(arrays_dir)
    device = resolve_device(options.device)
    model, meta = load_checkpoint(model_path, device=str(device))
    if split == "train":
        if fold is None or folds_csv is None:
            raise SegflowError("OOF prediction needs the fold and folds.csv")
        folds = pd.read_csv(folds_csv, dtype={"id": str})
        rows = validation_rows(index, folds, fold)
    else:
        rows = index[index["split"] == "test"].reset_index(drop=True)
    images = np.load(arrays_dir / f"{split}_images.npy", mmap_mode="r")
    mean, std = meta.get("mean", stats["train_mean"]), meta.get("std", stats["train_std"])
    probs, nonempty = predict_rows(
        model, images, rows["row"].to_numpy(), mean, std, options, device, required_divisor(model)
    )
    sizes = list(zip(rows["orig_height"], rows["orig_width"], strict=True))
    restored = stack_original(
        restore_resolution(probs, sizes, index_offsets(rows)), f"{split} predictions"
    )
    ids = rows[["id", "orig_height", "orig_width"]].reset_index(drop=True)
    if nonempty is not None:
        for k in range(nonempty.shape[1]):
            ids[nonempty_column(k)] = nonempty[:, k]
    return ids, restored


def nonempty_column(k: int) -> str:
    """The ids.csv column holding class ``k``'s aux-head probability that the mask is non-empty."""
    return f"nonempty_prob_{k}"


def nonempty_probs(ids: pd.DataFrame, n_classes: int) -> np.ndarray | None:
    """The aux-head non-empty probabilities stored in an ids table, or None if it has none.

    Shape:
        output: (len(ids), n_classes) float32.
    """
    columns = [nonempty_column(k) for k in range(n_classes)]
    if not all(column in ids.columns for column in columns):
        return None
    return ids[columns].to_numpy(dtype=np.float32)


def write_prediction(out_dir: str | Path, ids: pd.DataFrame, probs: np.ndarray) -> None:
    """Write ``ids.csv`` and ``probs.npy`` (float16) atomically into ``out_dir``."""
    from segflow.atomic import write_csv, write_npy

    out_dir = Path(out_dir)
    write_npy(out_dir / "probs.npy", probs.astype(np.float16))
    write_csv(out_dir / "ids.csv", ids)
