"""Inference: fold models -> probabilities, with TTA, tiling, and the original resolution restored.

OOF: each fold's model predicts only its own validation fold, so every training item gets
exactly one out-of-fold probability map. Test: every fold's model predicts every test image and
the folds are merged (mean or geometric mean). Probabilities are stored as float16 at the
original image resolution, row-aligned with an index table, so metrics, post-processing tuning
and stacking work in the competition's own pixel grid.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import images_file, read_index, read_stats
from segflow.artifacts.predictions import FOLD_MERGES, nonempty_column, write_prediction
from segflow.artifacts.resolution import Offsets, index_offsets, to_original
from segflow.core.devices import add_compute_arguments, compute
from segflow.core.errors import SegflowError
from segflow.core.options import (
    add_dataclass_arguments,
    dataclass_from_namespace,
    lists_to_tuples,
    option,
)
from segflow.core.stage_args import stage_log

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AMP = ("bf16", "float32")


@dataclass(frozen=True)
class PredictOptions:
    """Inference settings (config section ``predict``)."""

    tta: str = option("none", "test-time augmentation: none, hflip, vflip or d4")
    tta_scales: tuple[float, ...] | None = option(
        None, "TTA input scales, each prediction resized back to the input size (None: 1.0)"
    )
    tta_merge: str = option("mean", "how the TTA copies are merged: mean or gmean", FOLD_MERGES)
    mc_dropout_passes: int = option(
        0, "MC-dropout: stochastic passes with the dropout layers on (0: off, eval mode)"
    )
    mc_dropout_rate: float | None = option(
        None, "MC-dropout: drop probability for every dropout layer (None: the model's own)"
    )
    mc_dropout_seed: int = option(0, "MC-dropout: seed of the dropout masks")
    batch_size: int = option(32, "images per forward pass")
    tile: int | None = option(None, "tile size for tiled inference of large images (None: whole)")
    tile_overlap: float = option(0.5, "overlap fraction between tiles")
    tile_weighting: str = option("gaussian", "tile blending: gaussian, pyramid or uniform")
    fold_merge: str = option("mean", "how test predictions of the folds are merged", FOLD_MERGES)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: str = option(
        "bf16", "forward pass on CUDA: bf16 autocast or float32; the CPU is always float32", AMP
    )
    channels_last: bool = option(
        True, "channels-last (NHWC) memory format: faster convolutions on CUDA and on the CPU"
    )

    def __post_init__(self) -> None:
        """YAML/JSON lists (``tta_scales``) become tuples, as from the CLI."""
        lists_to_tuples(self)


def _to_device(chunk: np.ndarray, scale: float, device: torch.device) -> torch.Tensor:
    """Stored pixels scaled to [0, 1] on ``device``: uint8 batches travel as uint8 (pinned and
    ``non_blocking`` on CUDA: a quarter of float32's bytes) and are scaled there, with the
    same float32 arithmetic as on the host.

    Shape:
        chunk: (N, H, W, C); output: (N, H, W, C) float32.
    """
    import torch

    if chunk.dtype != np.uint8:
        return torch.from_numpy(chunk.astype(np.float32) / scale).to(device)
    host = torch.from_numpy(chunk)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True).float() / scale


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
    """Sigmoid probabilities for ``images[rows]`` at the preprocessed resolution
    (:func:`predict_rows_uncertain` without its uncertainty map)."""
    masks, nonempty, _ = predict_rows_uncertain(
        model, images, rows, mean, std, options, device, divisor
    )
    return masks, nonempty


def dropout_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's dropout modules (``nn.Dropout``, ``Dropout2d``, ... : every ``_DropoutNd``)."""
    from torch.nn.modules.dropout import _DropoutNd

    return [module for module in model.modules() if isinstance(module, _DropoutNd)]


def _check_mc_dropout(model: torch.nn.Module, options: PredictOptions) -> list[torch.nn.Module]:
    """The dropout layers MC-dropout switches on.

    Raises:
        SegflowError: invalid passes/rate, or a model without any dropout layer.
    """
    if isinstance(options.mc_dropout_passes, bool) or options.mc_dropout_passes < 0:
        raise SegflowError(
            f"predict.mc_dropout_passes must be an integer >= 0, got {options.mc_dropout_passes!r}"
        )
    rate = options.mc_dropout_rate
    if rate is not None and not 0 < rate < 1:
        raise SegflowError(f"predict.mc_dropout_rate must be in (0, 1) or null, got {rate!r}")
    if not options.mc_dropout_passes:
        return []
    layers = dropout_layers(model)
    if not layers:
        raise SegflowError(
            "predict.mc_dropout_passes: the model has no dropout layer, so its passes would not "
            "differ (smp's Unet/Unet++ decoders have none; FPN has decoder_dropout, the aux "
            "head model.aux_head has none)"
        )
    return layers


def predict_rows_uncertain(
    model: torch.nn.Module,
    images: np.ndarray,
    rows: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    options: PredictOptions,
    device: torch.device,
    divisor: int = 32,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Sigmoid probabilities for ``images[rows]`` at the preprocessed resolution, with the
    MC-dropout spread when ``options.mc_dropout_passes`` is set.

    MC-dropout: the model's dropout layers (only those: BatchNorm stays in eval mode) are
    switched on, with their drop probability set to ``mc_dropout_rate`` when given, and every
    batch is predicted ``mc_dropout_passes`` times (each pass with the full TTA); the
    probabilities are the passes' arithmetic mean and the uncertainty their per-pixel standard
    deviation. The dropout masks come from a generator seeded with ``mc_dropout_seed`` (forked:
    the global RNG state is left as it was), so the result is reproducible.

    Args:
        model: a segmentation model, optionally with an aux (image-level) head.
        images: the preprocessed (N, H, W, C) array (a memmap is fine: rows are read in batches).
        rows: which rows to predict.
        mean, std: per-channel normalisation of the training run (in [0, 1] units).
        options: TTA (transforms, scales, merge), MC-dropout, batch size, tiling and AMP
            (bf16 autocast on CUDA only). A batch that runs out of device memory
            (``torch.OutOfMemoryError``) is retried at half the batch size, which the rest of
            the rows keep, down to 1; so ``batch_size`` is the largest size tried.
        device: where to run.
        divisor: the model's required input multiple; inputs are reflect-padded to it.

    Returns:
        (mask probabilities, non-empty probabilities of the aux head averaged over the TTA
        copies and passes, or None without an aux head or with tiling, where the head sees
        tiles; the MC-dropout standard deviation, or None without MC-dropout).

    Shape:
        masks, uncertainty: (len(rows), K, H, W) float32; non-empty: (len(rows), K) float32.

    Raises:
        SegflowError: MC-dropout on a model without dropout layers, or invalid MC options.
    """
    import torch

    from segflow.model.datasets import crop_to, pad_to_multiple
    from segflow.model.inference.tiling import predict_tiled
    from segflow.model.inference.tta import predict_with_tta

    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    scale = _scale(images.dtype)
    height, width = images.shape[1:3]
    model = model.to(device).eval()
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    layers = _check_mc_dropout(model, options)
    passes = max(1, options.mc_dropout_passes)
    label_probs: list[torch.Tensor] = []  # aux-head sigmoids of every TTA copy, in call order
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if options.amp == "bf16" and device.type == "cuda"
        else contextlib.nullcontext()
    )

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        padded, _ = pad_to_multiple(batch, divisor)
        padded = padded.contiguous(memory_format=memory_format)
        with autocast:
            logits = model(padded)
        if isinstance(logits, tuple | list):  # smp's aux head: (mask logits, label logits)
            logits, label_logits = logits
            label_probs.append(torch.sigmoid(label_logits.float()))
        return torch.sigmoid(crop_to(logits, batch.shape[-2], batch.shape[-1]).float())

    def augmented(batch: torch.Tensor) -> torch.Tensor:
        return predict_with_tta(
            probabilities, batch, options.tta, options.tta_merge, options.tta_scales
        )

    def one_pass(batch: torch.Tensor) -> torch.Tensor:
        if not options.tile:
            return augmented(batch)
        return torch.stack(
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

    rates = [layer.p for layer in layers]
    masks: np.ndarray | None = None
    nonempty: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    devices = [device] if device.type == "cuda" else []
    try:
        for layer in layers:
            layer.train()
            if options.mc_dropout_rate is not None:
                layer.p = float(options.mc_dropout_rate)
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if layers:
                torch.manual_seed(options.mc_dropout_seed)
            start, size = 0, options.batch_size
            while start < len(rows):
                chunk = np.asarray(images[rows[start : start + size]])
                batch = _to_device(chunk, scale, device).permute(0, 3, 1, 2)
                batch = ((batch - mean_t) / std_t).contiguous()
                label_probs.clear()
                try:
                    if layers:
                        samples = torch.stack([one_pass(batch) for _ in range(passes)])
                        probs = samples.mean(dim=0)
                        spread = samples.std(dim=0, unbiased=False)
                    else:
                        probs, spread = one_pass(batch), None
                except torch.OutOfMemoryError:
                    if size == 1:
                        raise
                    # Halve for the rest of the rows and retry this batch (each image is
                    # predicted alone: the batch size changes no result on the CPU).
                    del batch
                    label_probs.clear()
                    size //= 2
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    log.warning("out of device memory: predict.batch_size now %d", size)
                    continue
                if masks is None:
                    masks = np.empty((len(rows), probs.shape[1], height, width), dtype=np.float32)
                    if label_probs and not options.tile:
                        nonempty = np.empty((len(rows), probs.shape[1]), dtype=np.float32)
                    if spread is not None:
                        uncertainty = np.empty_like(masks)
                masks[start : start + len(chunk)] = probs.cpu().numpy()
                if uncertainty is not None and spread is not None:
                    uncertainty[start : start + len(chunk)] = spread.cpu().numpy()
                if nonempty is not None:
                    # TTA calls hold whole copies of the batch, copy-major: average the copies.
                    copies = torch.cat(label_probs).view(-1, len(chunk), probs.shape[1])
                    nonempty[start : start + len(chunk)] = copies.mean(dim=0).cpu().numpy()
                start += len(chunk)
    finally:
        for layer, rate in zip(layers, rates, strict=True):
            layer.p = rate
        model.eval()
    if masks is None:
        masks = np.empty((0, 1, height, width), dtype=np.float32)
        if layers:
            uncertainty = np.empty_like(masks)
    return masks, nonempty, uncertainty


def restore_resolution(
    probs: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    offsets: Sequence[Offsets | None] | None = None,
) -> list[np.ndarray]:
    """Each image's probability maps back on its original (height, width) grid
    (:func:`segflow.artifacts.resolution.to_original`): cropped where it was reflect-padded, else
    resized bilinearly.

    Args:
        probs: the maps at the preprocessed size.
        sizes: each image's original (height, width).
        offsets: each image's (top, left) padding (:func:`segflow.artifacts.resolution.index_offsets`);
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


def predict_split(
    arrays_dir: str | Path,
    model_path: str | Path,
    split: str,
    options: PredictOptions,
    fold: int | None = None,
    folds_csv: str | Path | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Predict one fold model on its validation fold (``split="train"``) or on the test set
    (:func:`predict_split_uncertain` without its uncertainty map).

    Returns:
        (ids with their original sizes, plus one ``nonempty_prob_<k>`` column per class when
        the model has an aux head; float16 probabilities at the original resolution).

    Shape:
        probabilities: (N, K, H_orig, W_orig).
    """
    ids, probs, _ = predict_split_uncertain(arrays_dir, model_path, split, options, fold, folds_csv)
    return ids, probs


def predict_split_uncertain(
    arrays_dir: str | Path,
    model_path: str | Path,
    split: str,
    options: PredictOptions,
    fold: int | None = None,
    folds_csv: str | Path | None = None,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """Predict one fold model on its validation fold (``split="train"``) or on the test set.

    Returns:
        (ids with their original sizes, plus one ``nonempty_prob_<k>`` column per class when
        the model has an aux head; float16 probabilities at the original resolution; with
        MC-dropout their per-pixel standard deviation, float16 on the same grid, else None).

    Shape:
        probabilities, uncertainty: (N, K, H_orig, W_orig).
    """
    from segflow.core.devices import resolve_device
    from segflow.model.models import load_checkpoint, required_divisor

    arrays_dir = Path(arrays_dir)
    index, stats = read_index(arrays_dir, split=split), read_stats(arrays_dir)
    device = resolve_device(options.device)
    model, meta = load_checkpoint(model_path, device=str(device))
    if split == "train":
        if fold is None or folds_csv is None:
            raise SegflowError("OOF prediction needs the fold and folds.csv")
        folds = pd.read_csv(folds_csv, dtype={"id": str})
        rows = validation_rows(index, folds, fold)
    else:
        rows = index.reset_index(drop=True)
    images = np.load(arrays_dir / images_file(split), mmap_mode="r")
    mean, std = meta.get("mean", stats["train_mean"]), meta.get("std", stats["train_std"])
    probs, nonempty, spread = predict_rows_uncertain(
        model, images, rows["row"].to_numpy(), mean, std, options, device, required_divisor(model)
    )
    sizes = list(zip(rows["orig_height"], rows["orig_width"], strict=True))
    offsets = index_offsets(rows)
    restored = stack_original(restore_resolution(probs, sizes, offsets), f"{split} predictions")
    uncertainty = (
        None
        if spread is None
        else stack_original(restore_resolution(spread, sizes, offsets), f"{split} uncertainty")
    )
    ids = rows[["id", "orig_height", "orig_width"]].reset_index(drop=True)
    if nonempty is not None:
        for k in range(nonempty.shape[1]):
            ids[nonempty_column(k)] = nonempty[:, k]
    return ids, restored, uncertainty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow predict-oof`` and ``segflow predict-test``'s flags."""
    add_dataclass_arguments(parser, PredictOptions)
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument("--model", required=True, help="model.pt of the fold")
    parser.add_argument("--fold", type=int, default=None, help="the fold (predict-oof)")
    parser.add_argument("--folds", default=None, help="folds.csv (predict-oof)")
    parser.add_argument("--out-dir", required=True, help="folder for ids.csv and probs.npy")
    add_compute_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """``segflow predict-oof`` / ``predict-test``: write ids.csv and probs.npy (and with
    MC-dropout uncertainty.npy)."""
    split = "train" if args.command == "predict-oof" else "test"
    with compute(args):
        ids, probs, uncertainty = predict_split_uncertain(
            args.arrays_dir,
            args.model,
            split,
            dataclass_from_namespace(PredictOptions, args),
            args.fold,
            args.folds,
        )
    write_prediction(args.out_dir, ids, probs, uncertainty)
    stage_log.info("%s: %d predictions at %s", args.command, len(ids), probs.shape[1:])
