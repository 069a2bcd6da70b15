"""Test helpers shared by several test modules: independent reference code and file writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


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
