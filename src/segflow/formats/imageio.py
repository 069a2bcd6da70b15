"""Reading images and masks from disk into canonical arrays, with errors that name the file.

Canonical image: ``(H, W)`` for grayscale or ``(H, W, C)`` with C in {3, 4} in **RGB(A)** order,
dtype uint8 or uint16. Canonical mask: ``(H, W)`` uint8 with values {0, 1}.
DICOM files are converted to 8-bit with a Hounsfield-unit window (see :class:`DicomWindow`).

A JPEG or PNG with an EXIF orientation is turned the way a viewer shows it, image and mask alike
(OpenCV's ``IMREAD_UNCHANGED``, used to keep bit depth and alpha, ignores EXIF; its TIFF reader
already applies the TIFF orientation tag). A palette (P-mode) mask is read as its palette
indices, not its colours.

Ingest records each image's :func:`pixel_md5` (exact identity) and :func:`perceptual_hash`
(near-duplicates), which dedup groups by.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from segflow.core.errors import SegflowError

RASTER_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})
_DICOM_MAGIC_OFFSET = 128
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class DicomWindow:
    """Display window applied to Hounsfield units before conversion to 8-bit.

    Args:
        center: window centre in HU (e.g. 40 for soft tissue, -600 for lung).
        width: window width in HU (e.g. 400 soft tissue, 1500 lung).
        orientation: turn each slice by its ImageOrientationPatient into the canonical
            orientation (:func:`canonical_orientation`; config
            ``data.dicom_orientation``).
    """

    # Left out of provenance at its default (segflow.core.late_options.published_options).
    _omit_at_default: ClassVar[tuple[str, ...]] = ("orientation",)

    center: float = 40.0
    width: float = 400.0
    orientation: bool = False


def add_dicom_window_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dicom-window-center`` and ``--dicom-window-width`` (see :class:`DicomWindow`)."""
    default = DicomWindow()
    parser.add_argument(
        "--dicom-window-center",
        type=float,
        default=default.center,
        help=f"DICOM window centre in HU (default: {default.center})",
    )
    parser.add_argument(
        "--dicom-window-width",
        type=float,
        default=default.width,
        help=f"DICOM window width in HU (default: {default.width})",
    )
    parser.add_argument(
        "--dicom-orientation",
        action=argparse.BooleanOptionalAction,
        default=default.orientation,
        help="turn DICOM slices by their ImageOrientationPatient into one canonical "
        "orientation, masks with them (default: false)",
    )


def dicom_window_from_args(args: argparse.Namespace) -> DicomWindow:
    """The :class:`DicomWindow` of :func:`add_dicom_window_arguments`' flags."""
    return DicomWindow(
        args.dicom_window_center,
        args.dicom_window_width,
        bool(getattr(args, "dicom_orientation", False)),
    )


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image plus what ingest records about its file."""

    pixels: np.ndarray
    file_bytes: int
    md5_bytes: str
    bit_depth: int
    stored_channels: int
    image_format: str
    orientation: int = 1  # EXIF (or DICOM, as an EXIF code) orientation applied (1: none)


def image_kind(path: Path) -> str | None:
    """Return ``"raster"``, ``"dicom"`` or ``None`` (not an image) for a file path."""
    suffix = path.suffix.lower()
    if suffix in RASTER_EXTENSIONS:
        return "raster"
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    # No known extension: DICOM files are often named without one, or by their SOP Instance
    # UID ("1.2.840....123", whose last component looks like a suffix): check the magic bytes.
    if _has_dicom_magic(path):
        return "dicom"
    return None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SegflowError(f"{path}: cannot read file ({error.strerror or error})") from None
    if not data:
        raise SegflowError(f"{path}: file is empty (0 bytes)")
    return data


def _check_pixel_limit(path: Path, data: bytes, max_pixels: int | None) -> None:
    """Refuse oversized images from their header, before a decompression bomb is decoded."""
    if not max_pixels:
        return
    size = _header_size(data)
    if size is None:
        return
    width, height = size
    if width * height > max_pixels:
        raise SegflowError(
            f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} (data.max_pixels)"
        )


_PIL_LIMIT_LOCK = threading.Lock()
_CV_LOG_LOCK = threading.Lock()
_cv_quiet_depth = 0  # decodes in flight that have OpenCV's own logging switched off
_cv_log_level = 0  # OpenCV's log level before the first of them


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Switch OpenCV's logging off while decoding: on a bad file it prints multi-line
    ``[ERROR] ... imdecode_ ...`` reports to stderr, next to the one-line error raised here."""
    global _cv_quiet_depth, _cv_log_level
    logging_ = cv2.utils.logging
    with _CV_LOG_LOCK:
        if _cv_quiet_depth == 0:
            _cv_log_level = logging_.getLogLevel()
            logging_.setLogLevel(logging_.LOG_LEVEL_SILENT)
        _cv_quiet_depth += 1
    try:
        yield
    finally:
        with _CV_LOG_LOCK:
            _cv_quiet_depth -= 1
            if _cv_quiet_depth == 0:
                logging_.setLogLevel(_cv_log_level)


def _check_png_chunks(path: Path, data: bytes, role: str) -> bytes | None:
    """Refuse a truncated or corrupted PNG from its chunk structure, before libpng sees it.

    libpng prints its own ``libpng error: ...`` line to stderr (which cannot be switched off
    from Python) on exactly these files; walking the chunk headers and checking the CRCs of the
    critical chunks costs one pass over the bytes and names what is wrong instead.

    Returns:
        The payload of the PNG's ``eXIf`` chunk (EXIF data), or None without one.

    Raises:
        SegflowError: a chunk runs past the end of the file, a critical chunk (IHDR, PLTE,
            IDAT, IEND) fails its CRC, or the file ends without an IEND chunk.
    """
    view = memoryview(data)
    offset = len(_PNG_SIGNATURE)
    exif = None
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", view[offset : offset + 8])
        end = offset + 12 + length
        name = kind.decode("latin-1")
        if end > len(data):
            raise SegflowError(
                f"{path}: not a readable {role} (truncated PNG: chunk {name} at byte {offset} "
                f"needs {end} bytes, the file has {len(data)})"
            )
        # Ancillary chunks (lower-case first letter) with a bad CRC are dropped by libpng with a
        # warning, not refused, so only the critical ones are checked.
        if kind[:1].isupper():
            (crc,) = struct.unpack(">I", view[end - 4 : end])
            if zlib.crc32(view[offset + 4 : end - 4]) != crc:
                raise SegflowError(
                    f"{path}: not a readable {role} (corrupt PNG: CRC mismatch in chunk {name} "
                    f"at byte {offset})"
                )
        if kind == b"eXIf" and exif is None:
            exif = bytes(view[offset + 8 : end - 4])
        if kind == b"IEND":
            return exif
        offset = end
    raise SegflowError(
        f"{path}: not a readable {role} (truncated PNG: the file ends before its IEND chunk)"
    )


def _imdecode(path: Path, data: bytes, role: str) -> tuple[np.ndarray, int]:
    """Decode raster bytes as stored (bit depth and channels kept), turned by their EXIF
    orientation; ``role`` names the kind of file ("image", "mask image") in the error.

    Returns:
        (pixels, the EXIF orientation applied to them: 1 for none).
    """
    exif = None
    if data[:8] == _PNG_SIGNATURE:
        exif = _check_png_chunks(path, data, role)
    elif data[:2] == _JPEG_SOI:
        exif = _jpeg_exif(data)
    with _quiet_opencv():
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise SegflowError(f"{path}: not a readable {role} (corrupt, truncated or not an image)")
    orientation = _exif_orientation(exif)
    return apply_orientation(pixels, orientation), orientation


def _jpeg_exif(data: bytes) -> bytes | None:
    """The EXIF payload of a JPEG's APP1 segment, from its marker segments before the scan."""
    offset = len(_JPEG_SOI)
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no more headers
            return None
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        segment = data[offset + 4 : offset + 2 + length]
        if marker == 0xE1 and segment.startswith(_EXIF_HEADER):
            return segment
        offset += 2 + length
    return None


def _exif_orientation(exif: bytes | None) -> int:
    """The Orientation tag (1-8) of EXIF data; 1 without one or when the EXIF data cannot be
    parsed (image viewers ignore it then too)."""
    if not exif:
        return 1
    from PIL import Image

    try:
        orientation = Image.Exif()
        orientation.load(exif)
        value = int(orientation.get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


# (flip columns, flip rows, transpose) -> the EXIF code of apply_orientation doing exactly that
# (the flips first, then the transpose).
_EXIF_CODE = {
    (False, False, False): 1,
    (True, False, False): 2,
    (True, True, False): 3,
    (False, True, False): 4,
    (False, False, True): 5,
    (False, True, True): 6,
    (True, True, True): 7,
    (True, False, True): 8,
}


def canonical_orientation(row_cosines: np.ndarray, column_cosines: np.ndarray) -> int:
    """The EXIF code turning pixels stored with these direction cosines into the canonical
    orientation (column index along the lower patient axis, both axes positive).

    Args:
        row_cosines: direction of increasing column index (the first three values of
            ImageOrientationPatient).
        column_cosines: direction of increasing row index (the last three).

    Returns:
        An EXIF orientation code 1-8; oblique slices are turned by their dominant axes.
    """
    row_axis = int(np.argmax(np.abs(row_cosines)))
    column_axis = int(np.argmax(np.abs(column_cosines)))
    if row_axis == column_axis:  # degenerate cosines: take the next axis for the columns
        column_axis = int(np.argsort(np.abs(column_cosines))[-2])
    flip_columns = bool(row_cosines[row_axis] < 0)
    flip_rows = bool(column_cosines[column_axis] < 0)
    return _EXIF_CODE[(flip_columns, flip_rows, row_axis > column_axis)]


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels as stored the way an EXIF orientation says they are shown.

    Args:
        pixels: the stored pixels (rows first; channels, if any, last).
        orientation: EXIF Orientation 1-8 (1: as stored, 3: rotated 180 degrees, 6: turned 90
            degrees clockwise, 8: counter-clockwise, 2/4: mirrored, 5/7: transposed).

    Returns:
        The pixels as shown (contiguous); 5-8 swap height and width.

    Shape:
        pixels: (H, W) or (H, W, C); output: the same, or (W, H[, C]) for 5-8.
    """
    turned = {
        1: lambda p: p,
        2: lambda p: p[:, ::-1],
        3: lambda p: p[::-1, ::-1],
        4: lambda p: p[::-1],
        5: lambda p: np.swapaxes(p, 0, 1),
        6: lambda p: np.rot90(p, -1),
        7: lambda p: np.swapaxes(p[::-1, ::-1], 0, 1),
        8: lambda p: np.rot90(p, 1),
    }[orientation](pixels)
    return turned if orientation == 1 else np.ascontiguousarray(turned)


INVERSE_ORIENTATION = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}
"""EXIF code -> the code that undoes it (a turn by 90 degrees one way undoes the other; the
flips and transposes undo themselves)."""


def undo_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels as :func:`apply_orientation` shows them back onto the stored grid.

    Args:
        pixels: pixels turned by ``orientation`` (rows first; channels, if any, last).
        orientation: the EXIF code (1-8) they were turned by.

    Returns:
        The pixels as stored: ``undo_orientation(apply_orientation(p, o), o) == p``.

    Shape:
        pixels: (H, W) or (H, W, C); output: the same, or (W, H[, C]) for 5-8.
    """
    return apply_orientation(pixels, INVERSE_ORIENTATION[orientation])


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header alone, or None if Pillow cannot parse it."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":  # most files: no Pillow needed
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    from PIL import Image  # header-only read; cv2 has no such API

    # Pillow's own bomb check raises before the size can be read (and warns above ~89 M pixels);
    # max_pixels is the limit that applies here, so switch Pillow's off while reading the header.
    with _PIL_LIMIT_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(data)) as header:
                return header.size
        except Exception:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def decode_image(
    path: str | os.PathLike[str],
    dicom_window: DicomWindow | None = None,
    max_pixels: int | None = None,
) -> DecodedImage:
    """Read and decode one image file.

    Args:
        path: PNG/JPEG/TIFF/BMP file, or a DICOM file (``.dcm`` or DICM magic bytes).
        dicom_window: HU window for DICOM; defaults to :class:`DicomWindow()`.
        max_pixels: refuse images with more pixels than this (None or 0: no limit).

    Returns:
        The canonical pixels and file facts (size, md5 of the bytes, bit depth, channels).

    Shape:
        pixels: (H, W) or (H, W, C), C in {3, 4}.
    """
    path = Path(path)
    data = _read_bytes(path)
    md5_bytes = hashlib.md5(data).hexdigest()
    kind = image_kind(path)
    orientation = 1
    if kind == "dicom":
        window = dicom_window or DicomWindow()
        pixels, bit_depth, stored, orientation = _decode_dicom(path, data, window, max_pixels)
        image_format = "dicom"
    else:
        _check_pixel_limit(path, data, max_pixels)
        decoded, orientation = _imdecode(path, data, "image")
        pixels = _to_canonical(path, decoded)
        bit_depth = 16 if pixels.dtype == np.uint16 else 8
        stored = 1 if pixels.ndim == 2 else pixels.shape[2]
        image_format = path.suffix.lower().lstrip(".").replace("jpeg", "jpg").replace("tiff", "tif")
    if max_pixels and pixels.shape[0] * pixels.shape[1] > max_pixels:
        raise SegflowError(
            f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels exceeds the limit of {max_pixels} "
            "(data.max_pixels)"
        )
    return DecodedImage(pixels, len(data), md5_bytes, bit_depth, stored, image_format, orientation)


def _to_canonical(path: Path, pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype not in (np.uint8, np.uint16):
        # Float (and 32-bit integer) TIFFs have no agreed value range to map to 8/16 bits
        # (reflectance 0..1, raw counts, HU, ...): the user must choose the scaling.
        raise SegflowError(
            f"{path}: pixel type {pixels.dtype} is not supported (only 8- and 16-bit integer "
            "images); convert it to 8- or 16-bit with the value range you want"
        )
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3:
        if pixels.shape[2] == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        elif pixels.shape[2] == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
        else:
            raise SegflowError(f"{path}: {pixels.shape[2]} channels are not supported (1, 3 or 4)")
    return pixels


def _decode_dicom(
    path: Path, data: bytes, window: DicomWindow, max_pixels: int | None
) -> tuple[np.ndarray, int, int, int]:
    """Decode a DICOM to canonical pixels; returns (pixels, bit depth, stored channels, the
    EXIF code of the orientation applied: 1 unless ``window.orientation``)."""
    import pydicom

    # pydicom parses element values lazily and a corrupt file can fail with almost any exception
    # type (struct.error, BytesLengthException, ValueError, ...), at read time or at first access.
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        has_pixels = "PixelData" in dataset
    except Exception as error:
        raise SegflowError(f"{path}: not a readable DICOM file ({error})") from None
    if not has_pixels:
        raise SegflowError(f"{path}: DICOM file has no pixel data (PixelData element missing)")
    _check_dicom_pixel_limit(path, dataset, max_pixels)
    try:
        raw = dataset.pixel_array
        samples = int(_dicom_value(dataset, "SamplesPerPixel", 1))
        bit_depth = int(_dicom_value(dataset, "BitsStored", raw.dtype.itemsize * 8))
        slope = float(_dicom_value(dataset, "RescaleSlope", 1.0))
        intercept = float(_dicom_value(dataset, "RescaleIntercept", 0.0))
        photometric = str(_dicom_value(dataset, "PhotometricInterpretation", ""))
        orientation = _dicom_orientation(dataset) if window.orientation else 1
    except SegflowError:
        raise
    except Exception as error:
        raise SegflowError(f"{path}: cannot decode DICOM pixel data ({error})") from None
    if samples == 3 and raw.ndim == 3:  # colour DICOM (e.g. dermoscopy): no HU to window
        return apply_orientation(raw.astype(np.uint8), orientation), bit_depth, 3, orientation
    if raw.ndim != 2:
        raise SegflowError(f"{path}: multi-frame DICOM (shape {raw.shape}) is not supported")
    hounsfield = raw.astype(np.float32) * slope + intercept
    low = window.center - window.width / 2.0
    scaled = (hounsfield - low) / max(window.width, 1e-6)
    pixels = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    if photometric.strip() == "MONOCHROME1":
        pixels = 255 - pixels  # MONOCHROME1 stores inverted grey levels
    return apply_orientation(pixels, orientation), bit_depth, 1, orientation


def _dicom_orientation(dataset: object) -> int:
    """The EXIF code turning a slice into the canonical orientation (1 without the tag)."""
    cosines = getattr(dataset, "ImageOrientationPatient", None)
    if cosines is None or len(cosines) != 6:
        return 1
    values = np.asarray([float(value) for value in cosines])
    return canonical_orientation(values[:3], values[3:])


def _check_dicom_pixel_limit(path: Path, dataset: object, max_pixels: int | None) -> None:
    """Refuse a DICOM whose Rows x Columns (x frames) exceed the limit before its pixel data
    is decompressed (JPEG 2000 or RLE pixel data can expand far beyond the file size)."""
    if not max_pixels:
        return
    try:
        rows = int(_dicom_value(dataset, "Rows", 0))
        columns = int(_dicom_value(dataset, "Columns", 0))
        frames = int(_dicom_value(dataset, "NumberOfFrames", 1))
    except Exception:  # malformed values: left to the decoder, which reports them
        return
    if rows * columns * max(frames, 1) > max_pixels:
        size = f"{columns}x{rows}" + (f"x{frames} frames" if frames > 1 else "")
        raise SegflowError(
            f"{path}: {size} = {rows * columns * max(frames, 1)} pixels exceeds the limit of "
            f"{max_pixels} (data.max_pixels)"
        )


def _dicom_value(dataset: object, keyword: str, default: object) -> object:
    """An element's value, or ``default`` when the element is absent or empty."""
    value = getattr(dataset, keyword, None)
    return default if value is None or value == "" else value


def canonical_pixels(pixels: np.ndarray, gray: bool | None = None) -> np.ndarray:
    """Drop redundancy that does not change the picture: an opaque alpha, identical RGB channels.

    Two files showing the same picture (gray PNG vs RGB PNG with equal channels) then hash equal.
    ``gray`` is :func:`is_gray` of ``pixels`` when the caller already knows it.
    """
    if pixels.ndim == 3 and pixels.shape[2] == 4 and (pixels[:, :, 3] == _max_value(pixels)).all():
        pixels = pixels[:, :, :3]
    if gray is None:
        gray = is_gray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 3 and gray:
        pixels = pixels[:, :, 0]
    return pixels


def is_gray(pixels: np.ndarray) -> bool:
    """True when the image carries no colour: one channel, or R == G == B everywhere."""
    if pixels.ndim == 2:
        return True
    channels = pixels[:, :, :3]
    return bool(
        (channels[:, :, 0] == channels[:, :, 1]).all()
        and (channels[:, :, 1] == channels[:, :, 2]).all()
    )


def pixel_md5(pixels: np.ndarray, gray: bool | None = None) -> str:
    """md5 of the canonical pixels, their shape and dtype (equal only for the same picture)."""
    canonical = np.ascontiguousarray(canonical_pixels(pixels, gray))
    digest = hashlib.md5(f"{canonical.shape}|{canonical.dtype}|".encode())
    digest.update(canonical.data)
    return digest.hexdigest()


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit DCT perceptual hash (pHash): robust to re-encoding, mild noise and contrast changes.

    Shape:
        pixels: (H, W) or (H, W, C).
    """
    gray = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels[:, :, :3], cv2.COLOR_RGB2GRAY)
    # Shrink before converting to float: a large image is never copied at 4 bytes a pixel.
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    # Compare to the median of the AC terms; the DC term only encodes mean brightness.
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def mask_md5(mask: np.ndarray) -> str:
    """md5 of a binary mask (bit-packed, with its shape)."""
    digest = hashlib.md5(f"{mask.shape}|".encode())
    digest.update(np.packbits(mask != 0).data)
    return digest.hexdigest()


def _max_value(pixels: np.ndarray) -> int:
    return 65535 if pixels.dtype == np.uint16 else 255


def read_mask(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read a binary mask file: background 0 and one foreground value (1, 255, 65535, ...).

    A palette (P-mode) mask is read as its palette indices (index 0 is background), whatever
    colours its palette gives them; only when its indices are not 0 and one other (e.g. an
    adaptive palette that put black elsewhere) are its colours read instead, as for any image.
    An EXIF orientation is applied as to images.

    Returns:
        uint8 mask with values {0, 1}.

    Shape:
        (H, W).

    Raises:
        SegflowError: unreadable file, colour mask with differing channels, or more than two values.
    """
    path = Path(path)
    data = _read_bytes(path)
    _check_pixel_limit(path, data, max_pixels)
    mask, orientation = _imdecode(path, data, "mask image")
    # OpenCV maps a palette to its colours (or grays); the indices are the labels.
    indices = _palette_indices(data)
    if indices is None:
        return _binary_mask(path, mask, "values")
    indices = apply_orientation(indices, orientation)
    try:
        return _binary_mask(path, indices, "palette indices")
    except SegflowError as index_error:
        try:
            return _binary_mask(path, mask, "colours")
        except SegflowError:
            raise index_error from None


def _binary_mask(path: Path, mask: np.ndarray, what: str) -> np.ndarray:
    """{0, 1} of a decoded mask: 0 and one foreground value (equal channels if several).

    Raises:
        SegflowError: differing colour channels, or more than two ``what`` (values, indices).
    """
    if mask.ndim == 3:
        colour = mask[:, :, :3] if mask.shape[2] >= 3 else mask
        if not (colour == colour[:, :, :1]).all():
            raise SegflowError(
                f"{path}: mask has differing colour channels; expected a binary mask"
            )
        mask = colour[:, :, 0]
    foreground = mask.max()
    if foreground and not ((mask == 0) | (mask == foreground)).all():
        values = np.unique(mask)
        shown = ", ".join(map(str, values[:6].tolist())) + (", ..." if values.size > 6 else "")
        raise SegflowError(
            f"{path}: mask has {values.size} distinct {what} ({shown}); expected 0 and one "
            "foreground value"
        )
    return (mask != 0).astype(np.uint8)


def _palette_indices(data: bytes) -> np.ndarray | None:
    """The palette indices of a palette (P-mode) image, as stored; None for any other image.

    A PNG tells from its header (colour type 3), a JPEG has no palette; BMP and TIFF are asked
    of Pillow (its lazy open reads the header only).
    """
    if data[:8] == _PNG_SIGNATURE and data[25:26] != b"\x03":
        return None
    if data[:2] == _JPEG_SOI:
        return None
    from PIL import Image

    try:
        # The size was checked against max_pixels already: Pillow's own limit does not apply.
        with _PIL_LIMIT_LOCK:
            pil_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        with image:
            return np.asarray(image) if image.mode == "P" else None
    except Exception:  # OpenCV decoded it: a file Pillow cannot read is not a palette file
        return None
