"""Seeded synthetic DICOM series: small CT-like volumes with an ellipsoid, for tests and demos.

Each series is a volume of ``n_slices`` axial slices (``size`` x ``size`` pixels of 1 mm) whose
structure is a random ellipsoid (+150 HU over a noisy -100 HU background). What a real Kaggle
DICOM dataset makes a pipeline handle is planted:

* uneven slice spacing (gaps between 1.5 and 3 mm) and file names that do not follow the slice
  order (the files are named by a random token), so only ImagePositionPatient orders them;
* every ``flip_every``-th series stored mirrored (ImageOrientationPatient ``-1 0 0 0 1 0``:
  the columns run towards -x) or turned (``0 1 0 1 0 0``: rows and columns swapped), so that
  only the orientation tag brings it into the orientation of the others.

Layout written under ``out_dir``, in the style of :mod:`segflow.data.demo_data`::

    train/images/<id>.dcm   one slice (CT Image Storage, int16, RescaleSlope/Intercept)
    train/masks/<id>.png    its mask as stored (the slice's own pixel grid), values 0/255
    test/images/<id>.dcm    the slices of ``n_test_series`` further series
    series.json             the truth: per series its uid, orientation and ids in slice order
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace, option
from segflow.core.stage_args import stage_log

# ImageOrientationPatient of each storage: canonical, mirrored (columns towards -x), turned.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "canonical": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "mirrored": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "transposed": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
}
_INTERCEPT = -1024.0


@dataclass(frozen=True)
class DicomDemoOptions:
    """What ``segflow demo-dicom`` writes."""

    seed: int = option(0, "random seed")
    n_series: int = option(3, "train series (volumes)")
    n_test_series: int = option(1, "test series")
    n_slices: int = option(12, "slices per series")
    size: int = option(32, "slice side in pixels")
    flip_every: int = option(2, "every n-th series is stored mirrored or turned (0: none)")


def stored_pixels(canonical: np.ndarray, storage: str) -> np.ndarray:
    """Pixels as a file with ``storage``'s ImageOrientationPatient stores the canonical ones.

    Shape:
        canonical: (H, W); output: (H, W), or (W, H) for ``transposed``.
    """
    if storage == "mirrored":
        return np.ascontiguousarray(canonical[:, ::-1])
    if storage == "transposed":
        return np.ascontiguousarray(canonical.T)
    return canonical


def write_dicom_slice(
    path: str | Path,
    hounsfield: np.ndarray,
    series_uid: str,
    instance_uid: str,
    position: tuple[float, float, float] | None,
    orientation: tuple[float, ...] | None = ORIENTATIONS["canonical"],
    thickness: float = 2.0,
    instance_number: int = 1,
) -> None:
    """Write one valid CT slice (explicit VR little endian, int16 with a rescale).

    Args:
        path: the .dcm file.
        hounsfield: the slice in HU, as stored (rows first).
        series_uid: SeriesInstanceUID ("" leaves it out).
        instance_uid: SOPInstanceUID.
        position: ImagePositionPatient (None leaves it out).
        orientation: ImageOrientationPatient (None leaves it out).
        thickness: SliceThickness in mm.
        instance_number: InstanceNumber.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = instance_uid
    dataset.Modality = "CT"
    dataset.PatientID = "segflow-demo"
    if series_uid:
        dataset.SeriesInstanceUID = series_uid
    dataset.StudyInstanceUID = _uid(0, "study", series_uid or instance_uid)
    dataset.InstanceNumber = instance_number
    if position is not None:
        dataset.ImagePositionPatient = [f"{value:.4f}" for value in position]
    if orientation is not None:
        dataset.ImageOrientationPatient = [f"{value:g}" for value in orientation]
    dataset.PixelSpacing = ["1", "1"]
    dataset.SliceThickness = f"{thickness:g}"
    dataset.Rows, dataset.Columns = (int(n) for n in hounsfield.shape)
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1
    dataset.RescaleSlope = "1"
    dataset.RescaleIntercept = f"{_INTERCEPT:g}"
    stored = np.rint(hounsfield - _INTERCEPT).clip(-32768, 32767).astype("<i2")
    dataset.PixelData = stored.tobytes()
    dataset.save_as(str(path), enforce_file_format=True)


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["segflow-demo-dicom", str(seed), *map(str, parts)])


def _positions(rng: np.random.Generator, n_slices: int) -> np.ndarray:
    """Uneven slice positions (gaps of 1.5-3 mm), starting at a random table height."""
    gaps = rng.uniform(1.5, 3.0, size=n_slices - 1)
    return np.round(rng.uniform(-50.0, 50.0) + np.concatenate([[0.0], np.cumsum(gaps)]), 3)


def _volume(
    rng: np.random.Generator, positions: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """HU slices and masks (canonical orientation) of one random ellipsoid at ``positions``."""
    span = positions[-1] - positions[0]
    centre = np.array(
        [rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size, positions[0] + span / 2]
    )
    radii = np.array([rng.uniform(0.15, 0.3) * size, rng.uniform(0.15, 0.3) * size, span * 0.35])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images, masks = [], []
    for z in positions:
        inside = (
            ((xx - centre[0]) / radii[0]) ** 2
            + ((yy - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2
        ) <= 1.0
        background = -100.0 + 20.0 * rng.standard_normal((size, size))
        background = cv2.GaussianBlur(background, (3, 3), 0) + 0.5 * (xx - size / 2)
        images.append(background + 150.0 * inside)
        masks.append(inside.astype(np.uint8))
    return np.stack(images), np.stack(masks)


def generate_dicom_series(out_dir: str | Path, options: DicomDemoOptions) -> dict[str, Any]:
    """Write the synthetic series under ``out_dir`` (see the module docstring).

    Args:
        out_dir: the folder to write (created; files of the same names are overwritten).
        options: counts, size and seed.

    Returns:
        The truth also written to ``series.json``: per series its split, uid, storage
        (canonical, mirrored, transposed), positions and ids in slice order.

    Raises:
        SegflowError: an option out of range.
    """
    if options.n_series < 1 or options.n_test_series < 0:
        raise SegflowError("demo-dicom: n_series must be >= 1 and n_test_series >= 0")
    if options.n_slices < 2 or not 8 <= options.size <= 512:
        raise SegflowError("demo-dicom: n_slices must be >= 2 and size in 8..512")
    root = Path(out_dir)
    rng = np.random.default_rng(options.seed)
    storages = ("mirrored", "transposed")
    truth: dict[str, Any] = {"options": asdict(options), "series": []}
    n_total = options.n_series + options.n_test_series
    for index in range(n_total):
        split = "train" if index < options.n_series else "test"
        flipped = options.flip_every > 0 and index % options.flip_every == options.flip_every - 1
        storage = storages[(index // max(options.flip_every, 1)) % 2] if flipped else "canonical"
        positions = _positions(rng, options.n_slices)
        images, masks = _volume(rng, positions, options.size)
        series_uid = _uid(options.seed, "series", index)
        # File names are random tokens: sorting them does not give the slice order.
        tokens = [f"s{index}_{token:06x}" for token in rng.choice(1 << 24, options.n_slices)]
        folder = root / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if split == "train":
            (root / "train" / "masks").mkdir(parents=True, exist_ok=True)
        for number in rng.permutation(options.n_slices):  # written in shuffled order
            orientation = ORIENTATIONS[storage]
            # ImagePositionPatient is the centre of the first stored pixel: x runs the other
            # way in a mirrored slice, so its first pixel lies at the far x edge.
            x0 = float(options.size - 1) if storage == "mirrored" else 0.0
            write_dicom_slice(
                folder / f"{tokens[number]}.dcm",
                stored_pixels(images[number], storage),
                series_uid,
                _uid(options.seed, "slice", index, number),
                (x0, 0.0, float(positions[number])),
                orientation,
                instance_number=int(number) + 1,
            )
            if split == "train":
                mask = stored_pixels(masks[number], storage) * np.uint8(255)
                cv2.imwrite(str(root / "train" / "masks" / f"{tokens[number]}.png"), mask)
        truth["series"].append(
            {
                "split": split,
                "series_uid": series_uid,
                "storage": storage,
                "positions": positions.tolist(),
                "ids": tokens,
                "coverage": [float(m.mean()) for m in masks],
            }
        )
    (root / "series.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow demo-dicom``'s flags."""
    add_dataclass_arguments(parser, DicomDemoOptions)
    parser.add_argument("--out-dir", required=True, help="folder to write the series into")


def run(args: argparse.Namespace) -> None:
    """``segflow demo-dicom``: write the synthetic DICOM series."""
    options = dataclass_from_namespace(DicomDemoOptions, args)
    truth = generate_dicom_series(args.out_dir, options)
    stage_log.info(
        "wrote %d DICOM series (%d slices each) under %s",
        len(truth["series"]),
        options.n_slices,
        args.out_dir,
    )
