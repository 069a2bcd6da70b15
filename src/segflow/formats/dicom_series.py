"""DICOM series: the geometry of a slice (series, position, orientation) and 2.5D stacks.

A CT or MR series is one file per slice. :func:`read_slice_geometry` reads a slice's header
(no pixel data): its ``SeriesInstanceUID``, its position along the slice normal
(``dot(ImagePositionPatient, cross(row cosines, column cosines))``) and the in-plane turn that
brings its pixels into one canonical orientation (:func:`canonical_orientation`).

The canonical orientation: the column index runs along the lower-numbered patient axis (x
before y before z) in its positive direction, the row index along the other; an axial slice
stored with the usual ``ImageOrientationPatient`` ``1 0 0 0 1 0`` is already canonical. The turn
is expressed as the EXIF orientation code (1-8) that :func:`segflow.formats.imageio.apply_orientation`
applies, so images and masks are turned by the one function the EXIF path uses.

:func:`context_stack` builds the 2.5D input of a slice: its neighbours at a common slice
spacing, linearly interpolated between the real slices of its series.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.errors import SegflowError
from segflow.formats.imageio import INVERSE_ORIENTATION, canonical_orientation
from segflow.formats.labels import ORIENTATION_COLUMN, manifest_orientation

__all__ = [
    "INVERSE_ORIENTATION",
    "ORIENTATION_COLUMN",
    "SERIES_COLUMNS",
    "SliceGeometry",
    "canonical_orientation",
    "context_stack",
    "context_weights",
    "manifest_orientation",
    "read_slice_geometry",
    "series_order",
    "series_spacing",
]

SERIES_COLUMNS = ("series_uid", "slice_position")
"""Manifest columns ingest adds with ``data.dicom_series`` (absent otherwise)."""


@dataclass(frozen=True)
class SliceGeometry:
    """Where one DICOM slice lies in its series.

    Attributes:
        series_uid: the SeriesInstanceUID.
        position: the slice's position along the slice normal, in mm.
        orientation: the EXIF code (1-8) turning the stored pixels into the canonical
            orientation (1 without ImageOrientationPatient or when already canonical).
    """

    series_uid: str
    position: float
    orientation: int


def read_slice_geometry(path: str | Path, data: bytes | None = None) -> SliceGeometry:
    """Read a DICOM slice's series, position and orientation from its header.

    Args:
        path: the DICOM file (named in errors).
        data: its bytes, when the caller already read them.

    Returns:
        The slice's :class:`SliceGeometry`.

    Raises:
        SegflowError: unreadable header, no SeriesInstanceUID, or malformed
            ImagePositionPatient / ImageOrientationPatient (one line naming the file).
    """
    import pydicom

    try:
        source = io.BytesIO(data) if data is not None else str(path)
        dataset = pydicom.dcmread(source, stop_before_pixels=True)
        series = str(getattr(dataset, "SeriesInstanceUID", "") or "").strip()
        position = getattr(dataset, "ImagePositionPatient", None)
        cosines = getattr(dataset, "ImageOrientationPatient", None)
    except Exception as error:
        raise SegflowError(f"{path}: not a readable DICOM file ({error})") from None
    if not series:
        raise SegflowError(
            f"{path}: DICOM file has no SeriesInstanceUID (needed by data.dicom_series)"
        )
    if position is None or len(position) != 3:
        raise SegflowError(
            f"{path}: DICOM file has no ImagePositionPatient (3 values; needed by "
            "data.dicom_series to order the slices)"
        )
    if cosines is None:
        row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    elif len(cosines) != 6:
        raise SegflowError(f"{path}: ImageOrientationPatient has {len(cosines)} values, not 6")
    else:
        values = np.asarray([float(v) for v in cosines])
        row, column = values[:3], values[3:]
    normal = np.cross(row, column)
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-6:
        raise SegflowError(f"{path}: ImageOrientationPatient {list(cosines or [])} is degenerate")
    along = float(np.dot(np.asarray([float(v) for v in position]), normal / np.linalg.norm(normal)))
    return SliceGeometry(series, round(along, 6), canonical_orientation(row, column))


def series_order(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's slices ordered along their series: columns id, series_uid,
    slice_position, slice_index (0.. within its series).

    Raises:
        SegflowError: the manifest has no series columns (ingest without data.dicom_series), or
            two slices of one series share a position.
    """
    missing = [column for column in SERIES_COLUMNS if column not in manifest.columns]
    if missing:
        raise SegflowError(
            f"the manifest has no {', '.join(missing)} column(s): set data.dicom_series: true "
            "and rerun ingest"
        )
    frame = manifest[["id", "series_uid", "slice_position"]].sort_values(
        ["series_uid", "slice_position", "id"]
    )
    repeated = frame.duplicated(["series_uid", "slice_position"])
    if repeated.any():
        row = frame[repeated].iloc[0]
        raise SegflowError(
            f"series {row.series_uid}: two slices at position {row.slice_position} (e.g. "
            f"{row.id}); remove the duplicate file"
        )
    return frame.assign(slice_index=frame.groupby("series_uid").cumcount()).reset_index(drop=True)


def series_spacing(positions: np.ndarray, spacing: float | None, where: str) -> float:
    """The slice spacing a series' 2.5D stacks step by: ``spacing``, or the median gap.

    Raises:
        SegflowError: a series of one slice without ``spacing``, or ``spacing`` not positive.
    """
    if spacing is not None:
        if spacing <= 0:
            raise SegflowError(f"preprocess.slice_spacing must be positive, got {spacing}")
        return float(spacing)
    if len(positions) < 2:
        raise SegflowError(
            f"series {where} has one slice: its slice spacing is unknown; set "
            "preprocess.slice_spacing"
        )
    return float(np.median(np.diff(np.sort(positions))))


def context_weights(
    positions: np.ndarray, k: int, spacing: float
) -> list[list[tuple[int, int, float]]]:
    """For each slice of one series, the 2k+1 channels as (lower slice, upper slice, weight of
    the upper): channel j samples position ``z_i + (j - k) * spacing``, linearly interpolated
    between the two real slices around it; beyond the first or last slice, the edge slice.

    Args:
        positions: the slices' positions along the normal, sorted ascending.
        k: neighbours on each side.
        spacing: the step between channels, in the positions' unit.

    Returns:
        ``weights[i][j] = (lower, upper, t)``: channel j of slice i is
        ``(1 - t) * slice[lower] + t * slice[upper]``.
    """
    last = len(positions) - 1
    weights = []
    for z in positions:
        channels = []
        for offset in range(-k, k + 1):
            target = z + offset * spacing
            upper = int(np.searchsorted(positions, target, side="left"))
            if upper <= 0:
                channels.append((0, 0, 0.0))
            elif upper > last:
                channels.append((last, last, 0.0))
            elif np.isclose(positions[upper], target):
                channels.append((upper, upper, 0.0))
            else:
                lower = upper - 1
                t = (target - positions[lower]) / (positions[upper] - positions[lower])
                channels.append((lower, upper, float(t)))
        weights.append(channels)
    return weights


def context_stack(
    slices: np.ndarray, weights: list[tuple[int, int, float]], dtype: np.dtype
) -> np.ndarray:
    """One slice's 2.5D input from its series' prepared slices (:func:`context_weights`).

    Shape:
        slices: (S, H, W) one channel per slice, in series order; output: (H, W, 2k+1).
    """
    channels = [
        (1.0 - t) * slices[lower].astype(np.float32) + t * slices[upper].astype(np.float32)
        for lower, upper, t in weights
    ]
    return np.rint(np.stack(channels, axis=-1)).astype(dtype)
