"""Test helpers shared by several test modules: independent reference code and file writers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from segflow.data.ingest import IngestOptions


def naive_encode(mask: np.ndarray, order: str = "column", start: int = 1) -> str:
    """Reference encoder: walks the pixels with explicit Python loops (no numpy order flags)."""
    height, width = mask.shape
    if order == "column":
        pixels = [mask[y, x] for x in range(width) for y in range(height)]
    else:
        pixels = [mask[y, x] for y in range(height) for x in range(width)]
    runs: list[int] = []
    run_start = None
    for index, value in enumerate([*pixels, 0]):
        if value and run_start is None:
            run_start = index
        elif not value and run_start is not None:
            runs += [run_start + start, index - run_start]
            run_start = None
    return " ".join(map(str, runs))


def write_ct_dicom(
    path: Path,
    stored: np.ndarray | None,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    **extra: object,
) -> Path:
    """A minimal valid CT DICOM file (explicit VR little endian, with the DICM preamble)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CT"
    dataset.RescaleSlope = slope
    dataset.RescaleIntercept = intercept
    dataset.PhotometricInterpretation = photometric
    dataset.SamplesPerPixel = 1
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 1
    for keyword, value in extra.items():
        setattr(dataset, keyword, value)
    if stored is not None:
        dataset.Rows, dataset.Columns = stored.shape[-2:]
        if stored.ndim == 3:
            dataset.NumberOfFrames = stored.shape[0]
        dataset.PixelData = stored.astype("<i2").tobytes()
    else:
        dataset.Rows, dataset.Columns = 4, 4
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


BRIGHT = 200  # object pixels; the background stays below DARK_MAX
DARK_MAX = 100


def write_synthetic_arrays(
    out_dir: Path,
    n: int = 24,
    size: int = 32,
    channels: int = 1,
    n_empty: int = 6,
    n_folds: int = 3,
    dtype: str = "uint8",
    seed: int = 0,
) -> Path:
    """Write a tiny dataset the way preprocess and folds do: bright squares are the objects.

    Files: train_images.npy (N, H, W, C), train_masks.npy (N, H, W) {0, 1}, test_images.npy,
    index.parquet, test_index.parquet, stats.json and folds.csv (id, fold, group, stratum, coverage).
    """
    rng = np.random.default_rng(seed)
    scale = 255 if dtype == "uint8" else 65535
    images = rng.integers(0, DARK_MAX, size=(n, size, size, channels)).astype(np.float64)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n_empty, n):
        side = int(rng.integers(size // 4, size // 2))
        y, x = rng.integers(0, size - side, size=2)
        masks[i, y : y + side, x : x + side] = 1
    images[masks.astype(bool)] = BRIGHT
    images = (images * (scale // 255)).astype(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "train_images.npy", images)
    np.save(out_dir / "train_masks.npy", masks)
    np.save(out_dir / "test_images.npy", images[:4])
    ids = [f"img{i:03d}" for i in range(n)]
    # Two indexes, as preprocess (train) and preprocess-test (test) write them.
    for name, split, split_ids in (
        ("index.parquet", "train", ids),
        ("test_index.parquet", "test", [f"test{i}" for i in range(4)]),
    ):
        index = pd.DataFrame(
            {
                "id": split_ids,
                "split": split,
                "row": list(range(len(split_ids))),
                "orig_height": size,
                "orig_width": size,
            }
        )
        index.to_parquet(out_dir / name, index=False)
    scaled = images.reshape(-1, channels).astype(np.float64) / scale
    stats = {
        "n_train": n,
        "n_test": 4,
        "height": size,
        "width": size,
        "channels": channels,
        "dtype": dtype,
        "train_mean": scaled.mean(axis=0).round(6).tolist(),
        "train_std": scaled.std(axis=0).round(6).tolist(),
        "train_mask_coverage": float(masks.mean()),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats))
    coverage = masks.reshape(n, -1).mean(axis=1)
    # Interleave so every fold gets empty and non-empty items; listed in shuffled order.
    order = rng.permutation(n)
    pd.DataFrame(
        {
            "id": [ids[i] for i in order],
            "fold": [i % n_folds for i in order],
            "group": [ids[i] for i in order],
            "stratum": [int(coverage[i] > 0) for i in order],
            "coverage": [round(float(coverage[i]), 6) for i in order],
        }
    ).to_csv(out_dir / "folds.csv", index=False)
    return out_dir


def write_label_dataset(
    root: Path,
    train: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: tuple[str, ...],
    source: str = "folder",
) -> IngestOptions:
    """A multi-label dataset the way Kaggle ships one; returns its ``IngestOptions``.

    ``train`` maps id -> (gray uint8 image (H, W), class masks (C, H, W) {0, 1}). Only non-empty
    class masks are written, as Severstal does: ``folder`` writes
    ``train/masks/<class>/<id>.png`` (every class folder is created), ``rle_csv`` writes a
    long-format ``train.csv`` (``ImageId,ClassId,EncodedPixels``) encoded by
    :func:`naive_encode`.
    """
    images = root / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for item_id, (image, planes) in train.items():
        cv2.imwrite(str(images / f"{item_id}.png"), image)
        for name, plane in zip(classes, planes, strict=True):
            (root / "train" / "masks" / name).mkdir(parents=True, exist_ok=True)
            if plane.any() and source == "folder":
                cv2.imwrite(str(root / "train" / "masks" / name / f"{item_id}.png"), plane * 255)
            if plane.any() and source == "rle_csv":
                rows.append(f"{item_id},{name},{naive_encode(plane)}\n")
    (root / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n" + "".join(rows))
    common = {"train_images": str(images), "classes": classes}
    if source == "folder":
        return IngestOptions(**common, train_masks=str(root / "train" / "masks"))
    return IngestOptions(
        **common,
        mask_source="rle_csv",
        rle_csv=str(root / "train.csv"),
        rle_id_column="ImageId",
        rle_class_column="ClassId",
        rle_column="EncodedPixels",
        rle_missing_is_empty=True,
    )


def layout_probe_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    """A convolution whose weight layout tells NCHW from NHWC: grouped, 1x1 or one-channel
    weights are contiguous in both."""
    return next(
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Conv2d)
        and module.groups == 1
        and module.kernel_size[0] > 1
        and module.in_channels > 1
    )
