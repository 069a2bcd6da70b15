"""Tests for reading images, masks and DICOM files (segflow.formats.imageio)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from helpers import write_ct_dicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from segflow.core.errors import SegflowError
from segflow.formats.imageio import (
    DicomWindow,
    apply_orientation,
    canonical_pixels,
    decode_image,
    image_kind,
    is_gray,
    mask_md5,
    pixel_md5,
    read_mask,
)

# --------------------------------------------------------------------------- helpers


def _gray(height: int = 12, width: int = 17, dtype: type = np.uint8) -> np.ndarray:
    """A deterministic, non-symmetric gray picture (every value distinct per position)."""
    top = 255 if dtype == np.uint8 else 65535
    values = (np.arange(height * width, dtype=np.int64) * 37 + 11) % (top + 1)
    return values.reshape(height, width).astype(dtype)


def _rgb(height: int = 12, width: int = 17, dtype: type = np.uint8) -> np.ndarray:
    """An RGB picture whose three channels differ everywhere (R high, G middle, B low)."""
    base = _gray(height, width, np.uint8).astype(np.int64) % 50
    scale = 1 if dtype == np.uint8 else 257
    red = (200 + base) * scale
    green = (100 + base) * scale
    blue = (base + 1) * scale
    return np.dstack([red, green, blue]).astype(dtype)


def _imwrite(path: Path, pixels: np.ndarray, params: tuple[int, ...] = ()) -> Path:
    """Write with OpenCV; ``pixels`` is given in OpenCV's own (BGR) order."""
    assert cv2.imwrite(str(path), pixels, list(params)), path
    return path


def _write_rgb(path: Path, rgb: np.ndarray, params: tuple[int, ...] = ()) -> Path:
    return _imwrite(path, np.ascontiguousarray(rgb[:, :, ::-1]), params)


def _write_rgba(path: Path, rgba: np.ndarray) -> Path:
    return _imwrite(path, np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]]))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit gray pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _write_dicom_rgb(path: Path, rgb: np.ndarray) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = rgb.shape[:2]
    dataset.SamplesPerPixel = 3
    dataset.PlanarConfiguration = 0
    dataset.PhotometricInterpretation = "RGB"
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = rgb.astype(np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


# Hounsfield units and the 8-bit values of the default window (centre 40, width 400), by hand:
# low edge = 40 - 400/2 = -160 -> 0; high edge = 240 -> 255; value = (HU + 160) / 400 * 255.
HU = np.array([[-160, 240, 40, -1000], [1000, -60, 140, 0]], dtype=np.int16)
HU_SOFT_TISSUE = np.array([[0, 255, 128, 0], [255, 64, 191, 102]], dtype=np.uint8)
# -60: 100/400*255 = 63.75 -> 64;  140: 300/400*255 = 191.25 -> 191;  0: 160/400*255 = 102.
# 40: 200/400*255 = 127.5 -> 128 (round half to even). -1000 and 1000 are clipped.


# --------------------------------------------------------------------------- raster formats


def test_gray_png_8bit(tmp_path: Path) -> None:
    pixels = _gray()
    path = _imwrite(tmp_path / "g.png", pixels)
    image = decode_image(path)
    assert image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.bit_depth == 8
    assert image.stored_channels == 1
    assert image.image_format == "png"
    assert image.md5_bytes == _md5(path)
    assert image.file_bytes == path.stat().st_size


def test_gray_png_16bit(tmp_path: Path) -> None:
    pixels = _gray(dtype=np.uint16)
    assert pixels.max() > 255
    path = _imwrite(tmp_path / "g16.png", pixels)
    image = decode_image(str(path))  # str paths are accepted too
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.bit_depth == 16
    assert image.stored_channels == 1
    assert image.md5_bytes == _md5(path)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgb_png_comes_back_in_rgb_order(tmp_path: Path, dtype: type) -> None:
    rgb = _rgb(dtype=dtype)
    path = _write_rgb(tmp_path / "c.png", rgb)
    image = decode_image(path)
    np.testing.assert_array_equal(image.pixels, rgb)
    # Red is the brightest channel everywhere in this picture, blue the darkest.
    assert (image.pixels[:, :, 0] > image.pixels[:, :, 2]).all()
    assert image.stored_channels == 3
    assert image.bit_depth == (16 if dtype == np.uint16 else 8)
    assert image.image_format == "png"
    assert image.md5_bytes == _md5(path)


def test_rgba_png_comes_back_in_rgba_order(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb(), (_gray() // 2 + 10).astype(np.uint8)])
    path = _write_rgba(tmp_path / "a.png", rgba)
    image = decode_image(path)
    np.testing.assert_array_equal(image.pixels, rgba)
    assert image.stored_channels == 4
    assert image.bit_depth == 8


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_colour_and_format_name(tmp_path: Path, suffix: str) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :, 0] = 220  # strongly red
    rgb[:, :, 1] = 90
    rgb[:, :, 2] = 20
    path = _write_rgb(tmp_path / f"c{suffix}", rgb, (cv2.IMWRITE_JPEG_QUALITY, 95))
    image = decode_image(path)
    assert image.pixels.shape == (32, 32, 3)
    assert image.image_format == "jpg"
    assert image.stored_channels == 3
    assert image.bit_depth == 8
    # Lossy: close to the original, and in RGB order (a BGR mix-up would swap 220 and 20).
    assert np.abs(image.pixels.astype(int) - rgb).max() <= 6
    assert image.md5_bytes == _md5(path)


def test_gray_jpeg(tmp_path: Path) -> None:
    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    path = _imwrite(tmp_path / "g.jpg", gray, (cv2.IMWRITE_JPEG_QUALITY, 100))
    image = decode_image(path)
    assert image.pixels.ndim == 2
    assert image.stored_channels == 1
    assert np.abs(image.pixels.astype(int) - gray).max() <= 4


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_gray_8_and_16_bit(tmp_path: Path, suffix: str, dtype: type) -> None:
    pixels = _gray(dtype=dtype)
    path = _imwrite(tmp_path / f"t{suffix}", pixels)
    image = decode_image(path)
    assert image.pixels.dtype == dtype
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.bit_depth == (16 if dtype == np.uint16 else 8)
    assert image.stored_channels == 1
    assert image.image_format == "tif"
    assert image.md5_bytes == _md5(path)


def test_tiff_rgb_16bit(tmp_path: Path) -> None:
    rgb = _rgb(dtype=np.uint16)
    image = decode_image(_write_rgb(tmp_path / "c.tif", rgb))
    np.testing.assert_array_equal(image.pixels, rgb)
    assert image.bit_depth == 16
    assert image.stored_channels == 3


def test_bmp_rgb(tmp_path: Path) -> None:
    rgb = _rgb()
    path = _write_rgb(tmp_path / "c.bmp", rgb)
    image = decode_image(path)
    np.testing.assert_array_equal(image.pixels, rgb)
    assert image.image_format == "bmp"
    assert image.stored_channels == 3
    assert image.bit_depth == 8
    assert image.md5_bytes == _md5(path)


def test_bmp_gray(tmp_path: Path) -> None:
    gray = _gray()
    image = decode_image(_imwrite(tmp_path / "g.bmp", gray))
    # Whatever the BMP stores, the picture itself must come back unchanged and gray.
    assert is_gray(image.pixels)
    picture = image.pixels if image.pixels.ndim == 2 else image.pixels[:, :, 0]
    np.testing.assert_array_equal(picture, gray)


def test_upper_case_extension(tmp_path: Path) -> None:
    path = _imwrite(tmp_path / "G.PNG", _gray())
    assert image_kind(path) == "raster"
    assert decode_image(path).image_format == "png"


# --------------------------------------------------------------------------- pixel_md5


def test_pixel_md5_ignores_png_compression(tmp_path: Path) -> None:
    pixels = _gray(64, 64)
    fast = _imwrite(tmp_path / "fast.png", pixels, (cv2.IMWRITE_PNG_COMPRESSION, 0))
    small = _imwrite(tmp_path / "small.png", pixels, (cv2.IMWRITE_PNG_COMPRESSION, 9))
    first, second = decode_image(fast), decode_image(small)
    assert first.md5_bytes != second.md5_bytes
    assert first.file_bytes != second.file_bytes
    assert pixel_md5(first.pixels) == pixel_md5(second.pixels)


def test_pixel_md5_gray_equals_rgb_with_identical_channels(tmp_path: Path) -> None:
    gray = _gray()
    one = decode_image(_imwrite(tmp_path / "one.png", gray))
    three = decode_image(_imwrite(tmp_path / "three.png", np.dstack([gray, gray, gray])))
    assert three.stored_channels == 3
    assert one.md5_bytes != three.md5_bytes
    assert pixel_md5(one.pixels) == pixel_md5(three.pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_pixel_md5_opaque_rgba_equals_rgb(tmp_path: Path, dtype: type) -> None:
    rgb = _rgb(dtype=dtype)
    opaque = np.full(rgb.shape[:2], np.iinfo(dtype).max, dtype=dtype)
    plain = decode_image(_write_rgb(tmp_path / "rgb.png", rgb))
    with_alpha = decode_image(_write_rgba(tmp_path / "rgba.png", np.dstack([rgb, opaque])))
    assert with_alpha.stored_channels == 4
    assert pixel_md5(plain.pixels) == pixel_md5(with_alpha.pixels)
    # One translucent pixel is a different picture.
    translucent = opaque.copy()
    translucent[3, 4] -= 1
    other = decode_image(_write_rgba(tmp_path / "t.png", np.dstack([rgb, translucent])))
    assert pixel_md5(other.pixels) != pixel_md5(plain.pixels)


def test_pixel_md5_differs_for_different_pictures() -> None:
    gray = _gray()
    changed = gray.copy()
    changed[5, 5] ^= 1
    assert pixel_md5(gray) != pixel_md5(changed)
    # Same bytes, other shape or dtype: not the same picture.
    assert pixel_md5(gray) != pixel_md5(gray.reshape(gray.shape[1], gray.shape[0]))
    assert pixel_md5(gray) != pixel_md5(gray.astype(np.uint16))
    rgb = _rgb()
    swapped = rgb[:, :, ::-1]
    assert pixel_md5(rgb) != pixel_md5(swapped)
    # Non-contiguous views hash like their contiguous copies.
    assert pixel_md5(swapped) == pixel_md5(np.ascontiguousarray(swapped))


def test_canonical_pixels_drops_only_redundancy() -> None:
    gray = _gray()
    np.testing.assert_array_equal(canonical_pixels(np.dstack([gray] * 3)), gray)
    rgb = _rgb()
    assert canonical_pixels(rgb).shape == rgb.shape
    half_alpha = np.dstack([rgb, np.full(gray.shape, 128, np.uint8)])
    assert canonical_pixels(half_alpha).shape == half_alpha.shape


def test_mask_md5_depends_on_foreground_and_shape_only() -> None:
    mask = (_gray() > 128).astype(np.uint8)
    assert mask_md5(mask) == mask_md5(mask * 255)
    assert mask_md5(mask) == mask_md5(mask.astype(bool))
    flipped = mask.copy()
    flipped[0, 0] ^= 1
    assert mask_md5(mask) != mask_md5(flipped)
    assert mask_md5(np.zeros((2, 8), np.uint8)) != mask_md5(np.zeros((4, 4), np.uint8))


# --------------------------------------------------------------------------- read_mask


def _binary() -> np.ndarray:
    mask = np.zeros((9, 13), np.uint8)
    mask[2:6, 3:11] = 1
    mask[7, 0] = 1
    return mask


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("zero_one.png", lambda m: m),
        ("zero_255.png", lambda m: m * 255),
        ("zero_65535.png", lambda m: m.astype(np.uint16) * 65535),
        ("zero_1_16bit.png", lambda m: m.astype(np.uint16)),
        ("three_equal_channels.png", lambda m: np.dstack([m * 255] * 3)),
        ("bgra_equal_channels.png", lambda m: np.dstack([m * 200] * 3 + [np.full_like(m, 255)])),
        ("zero_255.bmp", lambda m: m * 255),
        ("zero_255.tif", lambda m: m * 255),
    ],
)
def test_read_mask_binarises_common_encodings(tmp_path: Path, name: str, encode) -> None:
    expected = _binary()
    path = _imwrite(tmp_path / name, encode(expected))
    mask = read_mask(path)
    assert mask.dtype == np.uint8
    assert mask.shape == expected.shape
    np.testing.assert_array_equal(mask, expected)


def test_read_mask_one_bit_and_palette_png(tmp_path: Path) -> None:
    from PIL import Image

    expected = _binary()
    Image.fromarray(expected.astype(bool)).convert("1").save(tmp_path / "one_bit.png")
    palette = Image.fromarray(expected, "P")
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "one_bit.png"), expected)
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png"), expected)


@pytest.mark.parametrize(
    "palette",
    [[0, 0, 0, 255, 0, 0], [255, 255, 255, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    ids=["red-foreground", "inverted", "same-colour"],
)
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_read_mask_reads_a_palette_mask_as_its_indices(
    tmp_path: Path, palette: list[int], suffix: str
) -> None:
    # OpenCV expands a palette to colours: a red foreground read as "differing colour channels",
    # a white background as foreground, two indices of one colour as one.
    from PIL import Image

    expected = _binary()
    image = Image.fromarray(expected, "P")
    image.putpalette(palette)
    image.save(tmp_path / f"palette{suffix}")
    np.testing.assert_array_equal(read_mask(tmp_path / f"palette{suffix}"), expected)


def test_palette_mask_whose_indices_are_not_binary_is_read_by_its_colours(tmp_path: Path) -> None:
    # An adaptive palette may put black at index 3 and white at 7: the indices are not 0 and
    # one other, the colours are black and white.
    from PIL import Image

    expected = _binary()
    palette = [0] * 768
    palette[9:12], palette[21:24] = [0, 0, 0], [255, 255, 255]
    image = Image.fromarray(np.where(expected == 1, 7, 3).astype(np.uint8), "P")
    image.putpalette(palette)
    image.save(tmp_path / "adaptive.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "adaptive.png"), expected)


def test_read_mask_with_three_palette_indices_is_an_error(tmp_path: Path) -> None:
    from PIL import Image

    indices = _binary()
    indices[0, 0] = 2
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.save(tmp_path / "three.png")
    with pytest.raises(SegflowError, match=r"mask has 3 distinct palette indices \(0, 1, 2\)"):
        read_mask(tmp_path / "three.png")


def _with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """The same JPEG or PNG bytes with an EXIF Orientation tag added (pixel data untouched)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()  # starts with b"Exif\0\0"
    if data[:2] == b"\xff\xd8":  # an APP1 segment right after SOI
        return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    ihdr_end = 8 + 12 + 13  # signature, IHDR chunk: eXIf right after it
    return data[:ihdr_end] + _png_chunk(b"eXIf", payload[6:]) + data[ihdr_end:]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_to_images_and_masks(
    tmp_path: Path, suffix: str, orientation: int
) -> None:
    gray, rgb, mask = _gray(), _rgb(), _binary()
    for name, pixels, flag in (
        ("gray", gray, cv2.IMREAD_GRAYSCALE),
        ("rgb", rgb[:, :, ::-1], cv2.IMREAD_COLOR),
        ("mask", mask * 255, cv2.IMREAD_GRAYSCALE),
    ):
        mask_suffix = ".png" if name == "mask" else suffix  # a JPEG mask is not binary
        stored = cv2.imencode(mask_suffix, np.ascontiguousarray(pixels))[1].tobytes()
        path = tmp_path / f"{name}{mask_suffix}"
        path.write_bytes(_with_exif_orientation(stored, orientation))
        # OpenCV applies the orientation except with IMREAD_UNCHANGED: the reference.
        shown = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), flag)
        if name == "mask":
            np.testing.assert_array_equal(read_mask(path), shown > 127)
            continue
        decoded = decode_image(path)
        assert decoded.orientation == orientation
        expected = shown if name == "gray" else cv2.cvtColor(shown, cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded.pixels, expected)


def test_tiff_orientation_is_applied_once(tmp_path: Path) -> None:
    # OpenCV's TIFF reader applies the orientation tag itself, even with IMREAD_UNCHANGED.
    from PIL import Image

    Image.fromarray(_gray()).save(tmp_path / "turned.tif", tiffinfo={274: 6})
    decoded = decode_image(tmp_path / "turned.tif")
    np.testing.assert_array_equal(decoded.pixels, np.rot90(_gray(), -1))


def test_apply_orientation_matches_pillow() -> None:
    from PIL import Image, ImageOps

    pixels = _rgb(5, 7)
    for orientation in range(1, 9):
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
        expected = np.asarray(ImageOps.exif_transpose(image))
        turned = apply_orientation(pixels, orientation)
        np.testing.assert_array_equal(turned, expected, err_msg=str(orientation))
        assert turned.flags.c_contiguous


def test_malformed_or_out_of_range_exif_orientation_is_ignored(tmp_path: Path) -> None:
    stored = cv2.imencode(".jpg", _gray())[1].tobytes()
    raw = decode_image(_imwrite(tmp_path / "raw.jpg", _gray())).pixels
    for name, data in (
        ("nine", _with_exif_orientation(stored, 9)),
        ("garbage", stored[:2] + b"\xff\xe1\x00\x0cExif\x00\x00MM\x00" + stored[2:]),
    ):
        (tmp_path / f"{name}.jpg").write_bytes(data)
        decoded = decode_image(tmp_path / f"{name}.jpg")
        assert decoded.orientation == 1
        np.testing.assert_array_equal(decoded.pixels, raw)


def test_read_mask_empty_and_full(tmp_path: Path) -> None:
    empty = read_mask(_imwrite(tmp_path / "empty.png", np.zeros((5, 6), np.uint8)))
    assert empty.shape == (5, 6)
    assert not empty.any()
    full = read_mask(_imwrite(tmp_path / "full.png", np.full((5, 6), 255, np.uint8)))
    assert full.all()
    assert set(np.unique(full).tolist()) == {1}


def test_read_mask_with_three_values_is_an_error(tmp_path: Path) -> None:
    mask = _binary() * 255
    mask[0, 0] = 128
    path = _imwrite(tmp_path / "three.png", mask)
    with pytest.raises(SegflowError) as info:
        read_mask(path)
    message = str(info.value)
    assert str(path) in message
    assert "3 distinct values" in message
    assert "0, 128, 255" in message


def test_read_mask_with_colour_channels_is_an_error(tmp_path: Path) -> None:
    mask = np.dstack([_binary() * 255, _binary() * 255, np.zeros((9, 13), np.uint8)])
    path = _imwrite(tmp_path / "colour.png", mask)
    with pytest.raises(SegflowError, match="differing colour channels") as info:
        read_mask(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- bad files


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _imwrite(tmp_path / "good.png", _gray(40, 40)).read_bytes()
    files = {
        "zero-byte": tmp_path / "zero.png",
        "text named png": tmp_path / "text.png",
        "truncated png": tmp_path / "truncated.png",
        "random bytes": tmp_path / "random.jpg",
        "missing": tmp_path / "missing.png",
    }
    files["zero-byte"].write_bytes(b"")
    files["text named png"].write_text("this is not an image\n")
    files["truncated png"].write_bytes(good[: len(good) // 2])
    files["random bytes"].write_bytes(np.random.default_rng(0).bytes(500))
    return files


@pytest.mark.parametrize(
    "kind", ["zero-byte", "text named png", "truncated png", "random bytes", "missing"]
)
@pytest.mark.parametrize("reader", [decode_image, read_mask])
def test_bad_files_give_segflow_error_naming_the_path(tmp_path: Path, kind: str, reader) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(SegflowError) as info:
        reader(path)
    assert str(path) in str(info.value)


def test_bad_file_messages_say_what_is_wrong(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    with pytest.raises(SegflowError, match=r"empty \(0 bytes\)"):
        decode_image(files["zero-byte"])
    with pytest.raises(SegflowError, match="cannot read file"):
        decode_image(files["missing"])
    with pytest.raises(SegflowError, match="not a readable image"):
        decode_image(files["truncated png"])


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp", ".jpg"])
@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_files_of_every_format_are_refused(
    tmp_path: Path, suffix: str, fraction: float
) -> None:
    whole = _write_rgb(tmp_path / f"whole{suffix}", _rgb(40, 48)).read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[: int(len(whole) * fraction)])
    for reader in (decode_image, read_mask):
        with pytest.raises(SegflowError) as info:
            reader(path)
        assert str(path) in str(info.value)


def test_float32_tiff_is_unsupported(tmp_path: Path) -> None:
    path = _imwrite(tmp_path / "float.tif", np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    with pytest.raises(SegflowError, match="float32 is not supported") as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_directory_is_not_readable(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(SegflowError) as info:
        decode_image(folder)
    assert str(folder) in str(info.value)


# --------------------------------------------------------------------------- max_pixels


@pytest.mark.parametrize("reader", [decode_image, read_mask])
def test_max_pixels_refuses_large_images(tmp_path: Path, reader) -> None:
    path = _imwrite(tmp_path / "big.png", np.zeros((50, 100), np.uint8))
    with pytest.raises(SegflowError, match=r"data\.max_pixels") as info:
        reader(path, max_pixels=4999)
    assert str(path) in str(info.value)
    assert "100x50" in str(info.value)
    for limit in (5000, None, 0):
        result = reader(path, max_pixels=limit)
        pixels = result.pixels if reader is decode_image else result
        assert pixels.shape == (50, 100)


@pytest.mark.parametrize("reader", [decode_image, read_mask])
def test_max_pixels_refuses_decompression_bomb_from_header(tmp_path: Path, reader) -> None:
    # 20000 x 10000 = 200 M pixels: over the configured limit and over Pillow's own bomb limit;
    # the header alone must be enough to refuse it (it is never decoded).
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 10_000))
    with pytest.raises(SegflowError, match=r"data\.max_pixels") as info:
        reader(path, max_pixels=100_000_000)
    assert "20000x10000" in str(info.value)


def test_max_pixels_above_pillow_limit_is_honoured(tmp_path: Path) -> None:
    # A limit the user raised above Pillow's default must not be replaced by Pillow's.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 10_000))
    with pytest.raises(SegflowError) as info:
        decode_image(path, max_pixels=300_000_000)
    assert "data.max_pixels" not in str(info.value)
    assert "not a readable image" in str(info.value)


def test_max_pixels_applies_to_dicom(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "ct.dcm", HU + 1024)
    with pytest.raises(SegflowError, match=r"data\.max_pixels"):
        decode_image(path, max_pixels=7)
    assert decode_image(path, max_pixels=8).pixels.shape == (2, 4)


# --------------------------------------------------------------------------- DICOM


def test_dicom_default_window_by_hand(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "ct.dcm", HU + 1024, slope=1.0, intercept=-1024.0)
    image = decode_image(path)
    assert image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, HU_SOFT_TISSUE)
    assert image.image_format == "dicom"
    assert image.stored_channels == 1
    assert image.bit_depth == 16
    assert image.md5_bytes == _md5(path)
    assert image.file_bytes == path.stat().st_size


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    # HU = 2 * stored - 1000  <=>  stored = (HU + 1000) / 2 (all HU values here are even).
    stored = (HU.astype(np.int32) + 1000) // 2
    path = write_ct_dicom(tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1000.0, bits_stored=12)
    image = decode_image(path)
    np.testing.assert_array_equal(image.pixels, HU_SOFT_TISSUE)
    assert image.bit_depth == 12


def test_dicom_custom_window(tmp_path: Path) -> None:
    # Lung window: centre -600, width 1500 -> low edge -1350, high edge 150.
    hu = np.array([[-1350, 150, -600, -2000, 500, -975]], dtype=np.int16)
    # (HU + 1350) / 1500 * 255: 0, 255, 127.5 -> 128, clipped 0, clipped 255, 375/1500*255 = 63.75
    expected = np.array([[0, 255, 128, 0, 255, 64]], dtype=np.uint8)
    path = write_ct_dicom(tmp_path / "lung.dcm", hu, intercept=0.0)
    image = decode_image(path, dicom_window=DicomWindow(center=-600, width=1500))
    np.testing.assert_array_equal(image.pixels, expected)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "m1.dcm", HU + 1024, photometric="MONOCHROME1")
    np.testing.assert_array_equal(decode_image(path).pixels, 255 - HU_SOFT_TISSUE)


def test_dicom_rgb_is_passed_through(tmp_path: Path) -> None:
    rgb = _rgb(4, 5)
    image = decode_image(_write_dicom_rgb(tmp_path / "colour.dcm", rgb))
    np.testing.assert_array_equal(image.pixels, rgb)
    assert image.stored_channels == 3


@pytest.mark.parametrize("columns", [3, 4])
def test_multi_frame_dicom_is_refused(tmp_path: Path, columns: int) -> None:
    # With 3 columns the frames array is (frames, rows, 3): it must not pass for an RGB image.
    frames = np.stack([HU[:, :columns] + 1024, HU[:, :columns] + 1000])
    path = write_ct_dicom(tmp_path / "multi.dcm", frames)
    with pytest.raises(SegflowError, match="multi-frame") as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_dicom_with_empty_rescale_uses_identity(tmp_path: Path) -> None:
    # An empty (present but zero-length) RescaleSlope/Intercept means "not given": 1 and 0.
    path = write_ct_dicom(tmp_path / "empty.dcm", HU, slope="", intercept="")
    np.testing.assert_array_equal(decode_image(path).pixels, HU_SOFT_TISSUE)


def test_dicom_with_malformed_rescale_is_a_segflow_error(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "bad.dcm", HU + 1024, slope=[1, 2])
    with pytest.raises(SegflowError) as info:
        decode_image(path)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damage it sees
def test_corrupt_dicom_files_only_give_segflow_errors(tmp_path: Path) -> None:
    """Seeded byte-level corruption: every outcome is a decoded image or a SegflowError."""
    base = write_ct_dicom(tmp_path / "base.dcm", np.tile(HU + 1024, (3, 2))).read_bytes()
    rng = np.random.default_rng(2024)
    path = tmp_path / "corrupt.dcm"
    outcomes: set[str] = set()
    for trial in range(900):
        data = bytearray(base)
        position = int(rng.integers(132, len(data)))
        if trial % 3 == 0:
            data[position] = int(rng.integers(0, 256))
        elif trial % 3 == 1:
            data = data[:position]
        else:
            data[position : position + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        try:
            image = decode_image(path)
        except SegflowError as error:
            assert str(path) in str(error)
            outcomes.add("error")
        else:
            assert image.pixels.dtype == np.uint8
            outcomes.add("decoded")
    assert outcomes == {"error", "decoded"}


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(SegflowError, match="no pixel data") as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_dicom_with_truncated_pixel_data(tmp_path: Path) -> None:
    full = write_ct_dicom(tmp_path / "full.dcm", HU + 1024).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(full[:-6])
    with pytest.raises(SegflowError, match="cannot decode DICOM pixel data") as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_text("not a dicom file\n" * 20)
    with pytest.raises(SegflowError, match="not a readable DICOM file") as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_dicom_detected_by_magic_bytes_without_extension(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "IM000001", HU + 1024)
    assert image_kind(path) == "dicom"
    image = decode_image(path)
    assert image.image_format == "dicom"
    np.testing.assert_array_equal(image.pixels, HU_SOFT_TISSUE)


def test_dicom_named_by_uid_is_detected_by_magic_bytes(tmp_path: Path) -> None:
    # PACS exports name files by SOP Instance UID: the "extension" is the last UID component.
    path = write_ct_dicom(tmp_path / "1.2.826.0.1.3680043.8.498.12345", HU + 1024)
    assert image_kind(path) == "dicom"
    np.testing.assert_array_equal(decode_image(path).pixels, HU_SOFT_TISSUE)


def test_image_kind(tmp_path: Path) -> None:
    text = tmp_path / "README"
    text.write_text("x" * 300)
    short = tmp_path / "short"
    short.write_bytes(b"DICM")
    notes = tmp_path / "notes.txt"
    notes.write_text("plain text " * 40)
    assert image_kind(text) is None
    assert image_kind(short) is None
    assert image_kind(notes) is None
    assert image_kind(tmp_path / "does-not-exist") is None
    for name in ("a.png", "a.jpg", "a.jpeg", "a.tif", "a.TIFF", "a.bmp"):
        assert image_kind(tmp_path / name) == "raster"
    assert image_kind(tmp_path / "a.dcm") == "dicom"
    assert image_kind(tmp_path / "a.DICOM") == "dicom"


def test_pydicom_can_read_the_helper_files(tmp_path: Path) -> None:
    # Guards the fixtures themselves: a broken helper would make the window tests meaningless.
    path = write_ct_dicom(tmp_path / "ct.dcm", HU + 1024)
    dataset = pydicom.dcmread(path)
    assert path.read_bytes()[128:132] == b"DICM"
    np.testing.assert_array_equal(dataset.pixel_array, HU + 1024)
    assert float(dataset.RescaleIntercept) == -1024.0
