"""The bad-input catalogue (issue 6), each case run through the entry point a user runs.

Every case is one of three outcomes, asserted exactly:

* **refused**: ``segflow <stage>`` exits 2 with exactly one ``segflow <stage>: error: ...`` line on
  stderr naming the file, CSV row or key, no traceback, no other error output (OpenCV and
  libpng print their own reports unless kept quiet) and nothing written to the output folder;
* **converted**: accepted, and the decoded pixels (via the manifest's ``md5_pixels``, the arrays
  preprocess writes, or :func:`segflow.formats.imageio.decode_image`) are what the file holds;
* **skipped and counted**: accepted with a logged warning and a count in ``ingest/summary.json``.

The CLI is called in-process (``segflow.cli.main``); ``capfd`` sees what C libraries write to
file descriptor 2 as well.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from conftest import copy_workflow, run_snakemake
from helpers import write_ct_dicom
from PIL import Image

from segflow import cli
from segflow.core import parallel
from segflow.formats.imageio import decode_image, mask_md5, pixel_md5

H, W = 6, 8  # every small image and mask


# --------------------------------------------------------------------------- helpers


def _write(path: Path, pixels: np.ndarray, params: tuple[int, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels, params), path
    return path


def _gray(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def _mask(seed: int, height: int = H, width: int = W) -> np.ndarray:
    mask = (np.random.default_rng(100 + seed).random((height, width)) < 0.4).astype(np.uint8)
    mask[0, 0] = 1  # never empty
    return mask


def _dataset(root: Path, ids: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """8-bit gray 6x8 train images and 0/255 masks under root/train/{images,masks}."""
    for seed, item_id in enumerate(ids):
        _write(root / "train" / "images" / f"{item_id}.png", _gray(seed))
        _write(root / "train" / "masks" / f"{item_id}.png", _mask(seed) * 255)
    return root


def _images(root: Path) -> Path:
    return root / "train" / "images"


def _masks(root: Path) -> Path:
    return root / "train" / "masks"


def _ingest_argv(root: Path, out: Path, *extra: str, masks: bool = True) -> list[str]:
    argv = ["ingest", "--train-images", str(_images(root))]
    if masks:
        argv += ["--train-masks", str(_masks(root))]
    return [
        *argv,
        "--out-manifest",
        str(out / "manifest.parquet"),
        "--out-summary",
        str(out / "summary.json"),
        *extra,
    ]


def _rle_argv(root: Path, out: Path, rows: list[tuple[str, str]], *extra: str) -> list[str]:
    """The ``_dataset`` images with an RLE CSV of ``rows`` (id, rle) instead of mask files."""
    csv = root / "train.csv"
    csv.write_text("id,rle_mask\n" + "".join(f"{i},{r}\n" for i, r in rows))
    return _ingest_argv(
        root, out, "--mask-source", "rle_csv", "--rle-csv", str(csv), *extra, masks=False
    )


@dataclass
class _Run:
    code: int
    err: str


def _cli(capfd: pytest.CaptureFixture[str], argv: list[str]) -> _Run:
    capfd.readouterr()  # only this run's output
    code = cli.main(argv)
    return _Run(code, capfd.readouterr().err)


def _refused(capfd: pytest.CaptureFixture[str], argv: list[str], out: Path, *fragments: str) -> str:
    """Run a command that must be refused; return its one error line."""
    run = _cli(capfd, argv)
    assert run.code == 2, run.err
    assert "Traceback" not in run.err, run.err
    # Nothing but our line: no OpenCV/libpng report (logging goes to pytest's handler here).
    errors = [line for line in run.err.splitlines() if line.strip()]
    assert len(errors) == 1, run.err
    assert errors[0].startswith(f"segflow {argv[0]}: error: "), errors
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return errors[0]


def _accepted(
    capfd: pytest.CaptureFixture[str], argv: list[str], out: Path
) -> tuple[pd.DataFrame, dict]:
    """Run ingest that must succeed; return its manifest (indexed by id) and summary."""
    run = _cli(capfd, argv)
    assert run.code == 0, run.err
    assert not run.err.strip(), run.err
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("id")
    return manifest, json.loads((out / "summary.json").read_text())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 8-bit gray PNG whose header claims width x height, with a few bytes of
    highly compressible pixel data (a decompression bomb in miniature)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(cv2.imencode(".jpg", _gray(0, 16, 16))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _spy_on_imdecode(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every buffer OpenCV is asked to decode."""
    real = cv2.imdecode
    seen: list[bytes] = []

    def spy(buffer: np.ndarray, flags: int) -> np.ndarray | None:
        seen.append(buffer.tobytes())
        return real(buffer, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return seen


# --------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("fraction", [0.5, 0.97])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], suffix: str, fraction: float
) -> None:
    root = _dataset(tmp_path / "data")
    _images(root).joinpath("b.png").unlink()
    smooth = cv2.GaussianBlur(_gray(7, 64, 80), (5, 5), 0)
    whole = cv2.imencode(suffix, smooth)[1].tobytes()
    bad = _images(root) / f"b{suffix}"
    bad.write_bytes(whole[: int(len(whole) * fraction)])
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, str(bad.resolve()), "not a readable image")


def test_corrupt_png_is_refused_naming_the_chunk(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    bad = _images(root) / "b.png"
    data = bytearray(bad.read_bytes())
    data[data.index(b"IDAT") + 6] ^= 0xFF  # one flipped byte of pixel data
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, str(bad.resolve()), "CRC mismatch in chunk IDAT")


@pytest.mark.parametrize("which", ["image", "mask"])
def test_zero_byte_file_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], which: str
) -> None:
    root = _dataset(tmp_path / "data")
    bad = (_images(root) if which == "image" else _masks(root)) / "c.png"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, str(bad.resolve()), "file is empty (0 bytes)")


def test_text_file_named_png_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    bad = _images(root) / "a.png"
    bad.write_text("id,rle_mask\na,1 2\n")
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, str(bad.resolve()), "not a readable image")


def test_bad_image_in_a_worker_process_is_still_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # More items than one chunk of work, so the error is raised in a worker of the process pool.
    root = _dataset(tmp_path / "data", ids=tuple(f"i{k:03d}" for k in range(70)))
    bad = _images(root) / "i065.png"
    bad.write_text("not an image")
    pools: list[object] = []
    real_pool = parallel.ProcessPoolExecutor

    def counted_pool(*args: object, **kwargs: object) -> object:
        pools.append(real_pool(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", counted_pool)
    out = tmp_path / "out"
    _refused(
        capfd, _ingest_argv(root, out, "--workers", "2"), out, str(bad.resolve()), "not a readable"
    )
    assert len(pools) == 1


# --------------------------------------------------------------------------- converted formats


def test_alpha_channel_is_kept_then_dropped_by_preprocess(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row: its colour must survive (no compositing)
    _images(root).joinpath("c.png").unlink()
    _write(_images(root) / "c.png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    out = tmp_path / "out"
    manifest, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest.loc["c", "channels"] == 4
    assert manifest.loc["c", "md5_pixels"] == pixel_md5(rgba)  # RGBA order, alpha kept
    assert summary["channels"] == {"1": 2, "4": 1}
    assert (decode_image(_images(root) / "c.png").pixels == rgba).all()

    # Preprocess (what training sees): alpha dropped, RGB values unchanged; gray replicated.
    dedup = [
        "dedup",
        "--manifest",
        str(out / "manifest.parquet"),
        "--out-items",
        str(out / "items.parquet"),
        "--out-summary",
        str(out / "dedup.json"),
        "--out-report",
        str(out / "dedup.md"),
    ]
    assert _cli(capfd, dedup).code == 0
    arrays = out / "preprocess"
    preprocess = ["preprocess", "--manifest", str(out / "manifest.parquet")]
    preprocess += ["--dedup-items", str(out / "items.parquet"), "--out-dir", str(arrays)]
    assert _cli(capfd, preprocess).code == 0
    images = np.load(arrays / "train_images.npy")
    index = pd.read_parquet(arrays / "index.parquet").set_index("id")
    assert images.shape[1:] == (H, W, 3)
    assert (images[index.loc["c", "row"]] == rgba[:, :, :3]).all()
    assert (images[index.loc["a", "row"]] == _gray(0)[:, :, None]).all()


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Four 16x16 blocks (JPEG-block aligned) of cyan, magenta, yellow and a mix; Pillow writes
    # Adobe-style inverted CMYK, the form Photoshop and most CMYK JPEGs use.
    colours = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (50, 100, 150, 30)]
    cmyk = np.concatenate(
        [np.broadcast_to(np.array(c, np.uint8), (16, 16, 4)) for c in colours], axis=1
    )
    root = _dataset(tmp_path / "data", ids=("a", "b"))
    path = _images(root) / "c.jpg"
    Image.frombytes("CMYK", (64, 16), cmyk.tobytes()).save(path, quality=100)
    _write(_masks(root) / "c.png", _mask(0, 16, 64) * 255)
    out = tmp_path / "out"
    manifest, _ = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest.loc["c", ["channels", "bit_depth", "image_format"]].tolist() == [3, 8, "jpg"]

    pixels = decode_image(path).pixels.astype(int)
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)  # independent decoder
    assert pixels.shape == (16, 64, 3)
    assert np.abs(pixels - reference).max() <= 3
    for block, (c, m, y, k) in enumerate(colours):
        # Naive CMYK -> RGB; JPEG's loss stays within a few levels inside a flat block.
        expected = [255 * (1 - v / 255) * (1 - k / 255) for v in (c, m, y)]
        centre = pixels[8, block * 16 + 8]
        assert np.abs(centre - np.array(expected)).max() <= 4, (block, centre, expected)


def test_16_bit_tiff_keeps_its_range_and_bit_depth(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    deep = np.random.default_rng(5).integers(0, 65536, (H, W), dtype=np.uint16)
    deep[0, 0], deep[0, 1] = 0, 65535
    _images(root).joinpath("b.png").unlink()
    _write(_images(root) / "b.tif", deep)
    out = tmp_path / "out"
    manifest, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest.loc["b", ["bit_depth", "channels", "image_format"]].tolist() == [16, 1, "tif"]
    assert manifest.loc["b", "md5_pixels"] == pixel_md5(deep)  # every 16-bit value kept
    assert summary["bit_depths"] == {"8": 2, "16": 1}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_float_or_32_bit_tiff_is_refused_with_advice(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], dtype: type
) -> None:
    # No agreed range to map floats to 8/16 bits (0..1 reflectance, raw counts, HU...): refused
    # rather than guessed; the message says what to do.
    root = _dataset(tmp_path / "data")
    _images(root).joinpath("b.png").unlink()
    pixels = np.linspace(0, 1 if dtype != np.int32 else 70_000, H * W).astype(dtype)
    bad = _write(_images(root) / "b.tif", pixels.reshape(H, W))
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        str(bad.resolve()),
        f"pixel type {np.dtype(dtype).name} is not supported",
        "convert it to 8- or 16-bit",
    )


def test_one_pixel_image_is_accepted(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    _write(_images(root) / "dot.png", np.array([[77]], np.uint8))
    _write(_masks(root) / "dot.png", np.array([[255]], np.uint8))
    _write(_images(root) / "blank.png", np.array([[3]], np.uint8))
    _write(_masks(root) / "blank.png", np.array([[0]], np.uint8))
    out = tmp_path / "out"
    manifest, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest[["height", "width"]].to_numpy().tolist() == [[1, 1], [1, 1]]
    assert manifest.loc["dot", "mask_coverage"] == 1.0
    assert manifest.loc["blank", "mask_coverage"] == 0.0
    assert manifest.loc["dot", "md5_pixels"] == pixel_md5(np.array([[77]], np.uint8))
    assert summary["sizes"] == {"1x1": 2}


# --------------------------------------------------------------------------- pixel limit


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_decompression_bomb_is_refused_from_its_header(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    root = _dataset(tmp_path / "data")
    bomb = _png_claiming(20_000, 20_000) if kind == "png" else _jpeg_claiming(20_000, 20_000)
    assert len(bomb) < 2_000  # a tiny file claiming 400 M pixels (400 MB decoded)
    path = _images(root) / f"bomb.{kind}"
    path.write_bytes(bomb)
    _write(_masks(root) / "bomb.png", _mask(0) * 255)
    decoded = _spy_on_imdecode(monkeypatch)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        str(path.resolve()),
        "20000x20000 = 400000000 pixels exceeds the limit of 100000000 (data.max_pixels)",
    )
    assert bomb not in decoded  # refused from the header: never handed to the decoder


def test_dicom_claiming_a_huge_frame_is_refused_before_decoding(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    path = write_ct_dicom(_images(root) / "ct.dcm", np.zeros((2, 4), np.int16))
    dataset = pydicom.dcmread(path)
    dataset.Rows, dataset.Columns = 20_000, 20_000  # header only: the pixel data stays 16 bytes
    dataset.save_as(path)
    _write(_masks(root) / "ct.png", _mask(0) * 255)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        str(path.resolve()),
        "20000x20000 = 400000000 pixels exceeds the limit of 100000000 (data.max_pixels)",
    )


def test_max_pixels_is_configurable(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data", ids=("a", "b"))
    big = np.zeros((1000, 1200), np.uint8)
    big[200:400, 300:900] = 180
    path = _write(_images(root) / "big.png", big)
    _write(_masks(root) / "big.png", (big > 0).astype(np.uint8) * 255)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out, "--max-pixels", "1199999"),
        out,
        str(path.resolve()),
        "1200x1000 = 1200000 pixels exceeds the limit of 1199999 (data.max_pixels)",
    )
    manifest, _ = _accepted(capfd, _ingest_argv(root, out, "--max-pixels", "1200000"), out)
    assert manifest.loc["big", ["height", "width"]].tolist() == [1000, 1200]
    assert manifest.loc["big", "mask_coverage"] == pytest.approx(200 * 600 / 1.2e6)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(H + 1, W), (H, W - 2)], ids=["larger", "smaller"])
def test_mask_of_another_size_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], shape: tuple[int, int]
) -> None:
    root = _dataset(tmp_path / "data")
    bad = _write(_masks(root) / "b.png", _mask(1, *shape) * 255)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        str(bad.resolve()),
        f"mask is {shape[1]}x{shape[0]} but its image",
        f"is {W}x{H}",
    )


@pytest.mark.parametrize(
    ("values", "shown"), [((0, 1, 255), "0, 1, 255"), ((0, 128, 255), "0, 128, 255")]
)
def test_mask_with_more_than_one_foreground_value_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], values: tuple[int, ...], shown: str
) -> None:
    root = _dataset(tmp_path / "data")
    mask = np.zeros((H, W), np.uint8)
    mask[0, :3] = values
    bad = _write(_masks(root) / "a.png", mask)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        str(bad.resolve()),
        f"mask has 3 distinct values ({shown}); expected 0 and one foreground value",
    )


def test_mask_with_one_foreground_value_of_any_level_is_binary(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    _write(_masks(root) / "a.png", _mask(0) * 7)  # {0, 7}: still one foreground value
    out = tmp_path / "out"
    manifest, _ = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest.loc["a", "mask_coverage"] == pytest.approx(_mask(0).mean())


@pytest.mark.parametrize(
    "palette", [[0, 0, 0, 255, 0, 0], [255, 255, 255, 0, 0, 0]], ids=["red", "inverted"]
)
def test_palette_mask_is_read_as_its_indices(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], palette: list[int]
) -> None:
    # Index 1 drawn red was refused for "differing colour channels"; an inverted palette
    # (index 0 white) silently swapped foreground and background.
    root = _dataset(tmp_path / "data")
    image = Image.fromarray(_mask(0), "P")
    image.putpalette(palette)
    image.save(_masks(root) / "a.png")
    out = tmp_path / "out"
    manifest, _ = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest.loc["a", "mask_md5"] == mask_md5(_mask(0))
    # More than two indices is refused, naming them as indices.
    indices = _mask(0)
    indices[1, 1] = 2
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.save(_masks(root) / "a.png")
    shutil.rmtree(out)
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        f"{_masks(root).resolve() / 'a.png'}: mask has 3 distinct palette indices (0, 1, 2)",
    )


def _jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``pixels`` (as stored) with an EXIF Orientation tag in an APP1 segment."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    stored = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    return stored[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + stored[2:]


def test_jpeg_exif_orientation_is_applied_to_image_and_counted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A phone photo stored landscape with orientation 6 (shown turned 90 degrees clockwise) and
    # its mask drawn on the picture as shown: read unrotated, the two did not even match in size.
    root = _dataset(tmp_path / "data", ids=("a", "b"))
    stored = _gray(5)
    path = _images(root) / "c.jpg"
    path.write_bytes(_jpeg_with_orientation(stored, 6))
    raw = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    shown_mask = np.rot90(_mask(5), -1)  # W x H
    _write(_masks(root) / "c.png", shown_mask * 255)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="segflow.data.ingest"):
        manifest, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert manifest.loc["c", ["height", "width"]].tolist() == [W, H]
    assert manifest.loc["c", "md5_pixels"] == pixel_md5(np.rot90(raw, -1))
    assert manifest.loc["c", "mask_md5"] == mask_md5(shown_mask)
    assert summary["images_with_exif_orientation"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("1 images (e.g. ") and "EXIF orientation" in w for w in warnings)


def test_image_without_mask_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    (_masks(root) / "b.png").unlink()
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, str(_images(root).resolve() / "b.png"), "no mask")


def test_mask_without_image_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    orphan = _write(_masks(root) / "zz.png", _mask(0) * 255)
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, str(orphan.resolve()), "has no train image")


# --------------------------------------------------------------------------- RLE CSV


@pytest.mark.parametrize(
    ("rle", "fragment"),
    [
        ("1 2 3", "odd number of RLE tokens (3)"),
        ("-3 2", "run starts at -3, before pixel 1"),
        ("0 2", "run starts at 0, before pixel 1"),
        ("1 -2", "run length -2 is not positive"),
        ("1 5 3 2", "runs overlap"),
        ("45 10", "ends at pixel 54, past the 6x8 image (48 pixels)"),
        ("1 x", "RLE token 'x' is not an integer"),
    ],
    ids=["odd", "negative-start", "zero-start", "negative-length", "overlap", "past-end", "text"],
)
def test_malformed_rle_is_refused_naming_the_row(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], rle: str, fragment: str
) -> None:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _rle_argv(root, out, [("a", "1 1"), ("b", rle), ("c", "")])
    _refused(capfd, argv, out, f"{root / 'train.csv'} row 3 (id 'b')", fragment)


@pytest.mark.parametrize("bad_id", ["b ", " b", "b\t", "b.png "])
def test_csv_id_with_surrounding_spaces_is_refused_naming_the_row(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bad_id: str
) -> None:
    # Was "train image .../b.png has no row", which names neither the row nor the stray space.
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _rle_argv(root, out, [("a", "1 1"), (bad_id, "1 1"), ("c", "")])
    _refused(
        capfd,
        argv,
        out,
        f"{root / 'train.csv'} row 3 (id {bad_id!r}): the id has surrounding whitespace, so it "
        "matches no image (without it, it is b.png)",
    )


def test_duplicate_ids_in_the_rle_csv_are_unioned_and_counted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Documented: several rows of one id are one mask (Airbus lists one row per ship); the
    # summary counts such ids so a one-row-per-image CSV with repeats is noticed.
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _rle_argv(root, out, [("a", "1 2"), ("b", ""), ("a", "5 2"), ("a", "1 2"), ("c", "")])
    with caplog.at_level(logging.INFO, logger="segflow.data.ingest"):
        manifest, summary = _accepted(capfd, argv, out)
    assert manifest.loc["a", "mask_rle"] == "1 2 5 2"
    assert manifest.loc["a", "mask_coverage"] == pytest.approx(4 / (H * W))
    assert summary["rle_ids_with_several_rows"] == 1
    # A warning: in a one-row-per-image CSV (TGS) repeats mean a broken file.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 train ids have several rows" in w for w in warnings), warnings


def test_duplicate_ids_in_an_image_folder_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    _write(_images(root) / "b.jpg", _gray(1))
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, "duplicate id 'b'", "b.jpg and b.png")


def test_duplicate_ids_in_the_metadata_csv_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    metadata = root / "depths.csv"
    metadata.write_text("id,z\na,1\nb,2\na,3\nc,4\n")
    out = tmp_path / "out"
    argv = _ingest_argv(root, out, "--metadata-csv", str(metadata))
    _refused(capfd, argv, out, f"{metadata} row 4: duplicate id 'a'")


@pytest.mark.parametrize("bad_id", ["../b", "/etc/passwd", "sub/b", "..", "a\\b", "../../.."])
def test_path_as_id_in_the_rle_csv_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bad_id: str
) -> None:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _rle_argv(
        root, out, [("a", ""), ("b", ""), ("c", ""), (bad_id, "1 1")], "--rle-missing-is-empty"
    )
    _refused(
        capfd,
        argv,
        out,
        f"{root / 'train.csv'} row 5 (id {bad_id!r})",
        "the id is a path, not an image id",
    )


@pytest.mark.parametrize("name", ["../x", "/tmp", "a/b", ".."])
def test_path_as_class_name_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], name: str
) -> None:
    # Class names become folders (train_masks/<class>/): one that is a path would leave it.
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _ingest_argv(root, out, "--classes", "ok", name)
    _refused(capfd, argv, out, f"data.classes: class name {name!r} is a path")


def test_symlink_leaving_the_data_root_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    secret = _write(tmp_path / "elsewhere" / "secret.png", _gray(9))
    link = _images(root) / "d.png"
    link.symlink_to(secret)
    _write(_masks(root) / "d.png", _mask(3) * 255)
    # A link that stays inside the folder is fine.
    _write(_images(root) / "store" / "e.png", _gray(4))
    (_images(root) / "e.png").symlink_to(Path("store") / "e.png")
    _write(_masks(root) / "e.png", _mask(4) * 255)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        f"{link}: train image is a symlink to {secret.resolve()}",
        "set data.data_root",
    )
    # A data root holding the link targets lets it through.
    manifest, _ = _accepted(capfd, _ingest_argv(root, out, "--data-root", str(tmp_path)), out)
    assert manifest.loc["d", "md5_pixels"] == pixel_md5(_gray(9))
    assert manifest.loc["e", "md5_pixels"] == pixel_md5(_gray(4))


def test_mask_symlink_leaving_the_data_root_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    (_masks(root) / "c.png").unlink()
    target = _write(tmp_path / "elsewhere" / "c.png", _mask(2) * 255)
    (_masks(root) / "c.png").symlink_to(target)
    out = tmp_path / "out"
    _refused(capfd, _ingest_argv(root, out), out, "train mask is a symlink to", str(target))


def test_data_folder_outside_the_data_root_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    (tmp_path / "root").mkdir()
    out = tmp_path / "out"
    argv = _ingest_argv(root, out, "--data-root", str(tmp_path / "root"))
    _refused(capfd, argv, out, f"train image folder {_images(root)}", "outside data.data_root")


# --------------------------------------------------------------------------- file names


def test_non_utf8_file_name_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    latin1 = os.fsencode(_images(root)) + b"/caf\xe9.png"  # 'café' in Latin-1
    with open(latin1, "wb") as handle:
        handle.write((_images(root) / "a.png").read_bytes())
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        f"{_images(root).resolve()}/caf\\xe9.png: file name is not valid UTF-8",
    )


def test_file_names_with_spaces_and_non_ascii_are_accepted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data", ids=("my image", "café 2"))
    out = tmp_path / "out"
    manifest, _ = _accepted(capfd, _ingest_argv(root, out), out)
    assert sorted(manifest.index) == ["café 2", "my image"]
    assert manifest.loc["my image", "md5_pixels"] == pixel_md5(_gray(0))
    # The same ids in an RLE CSV.
    argv = _rle_argv(root, out, [("my image", "1 3"), ("café 2", "")])
    manifest, _ = _accepted(capfd, argv, out)
    assert manifest.loc["my image", "mask_coverage"] == pytest.approx(3 / (H * W))


# --------------------------------------------------------------------------- folders


def test_empty_image_folder_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    _images(root).mkdir(parents=True)
    _masks(root).mkdir(parents=True)
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out),
        out,
        f"train image folder {_images(root)} contains no images",
    )


def test_non_image_files_are_skipped_warned_and_counted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = _dataset(tmp_path / "data")
    (_images(root) / "README.txt").write_text("about")
    (_images(root) / "labels.csv").write_text("id\n")
    (_images(root) / ".DS_Store").write_bytes(b"\0")
    (_images(root) / "thumbs").mkdir()
    (_masks(root) / "notes.md").write_text("masks")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="segflow.data.ingest"):
        manifest, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert sorted(manifest.index) == ["a", "b", "c"]
    assert summary["skipped_files"]["train"]["count"] == 4
    assert sorted(summary["skipped_files"]["train"]["examples"]) == [
        ".DS_Store",
        "README.txt",
        "labels.csv",
        "thumbs",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(_images(root)) in w and "skipped 4 entries" in w for w in warnings), warnings
    assert any(str(_masks(root)) in w and "skipped 1 entries" in w for w in warnings), warnings


def test_test_folder_without_images_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # A configured test folder with no images is a wrong path far more often than a choice;
    # running without a test set is data.test_images: null (the default), which is fine.
    root = _dataset(tmp_path / "data")
    test = root / "test" / "images"
    test.mkdir(parents=True)
    (test / "README.txt").write_text("test images go here")
    out = tmp_path / "out"
    _refused(
        capfd,
        _ingest_argv(root, out, "--test-images", str(test)),
        out,
        f"test image folder {test} contains no images",
        "set data.test_images: null",
    )
    _, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert (summary["n_train"], summary["n_test"]) == (3, 0)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("link", ["dangling", "loop", "dangling-outside-root"])
def test_broken_or_looping_symlink_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], split: str, link: str
) -> None:
    # An un-fetched git-annex file is a dangling link: skipped, its id would silently be
    # missing from the test set (and the submission) or the training data.
    root = _dataset(tmp_path / "data")
    test = root / "test"
    _write(test / "t.png", _gray(7))
    folder = _images(root) if split == "train" else test
    bad = folder / "d.png"
    if link == "dangling":
        target = Path(".git/annex/objects/Xk/d.png")
    elif link == "loop":  # d.png -> e.png -> d.png
        target = Path("e.png")
        (folder / "e.png").symlink_to("d.png")
    else:  # must not get past the outside-root check by being skipped
        target = tmp_path / "elsewhere" / "d.png"
    bad.symlink_to(target)
    out = tmp_path / "out"
    kind = "symlink loop" if link == "loop" else "broken symlink"
    argv = _ingest_argv(root, out, "--test-images", str(test))
    _refused(capfd, argv, out, f"{folder.resolve() / 'd.png'}: {split} image is a {kind}")
    # A broken link among the masks is refused the same way.
    bad.unlink()
    (folder / "e.png").unlink(missing_ok=True)
    (_masks(root) / "c.png").unlink()
    (_masks(root) / "c.png").symlink_to(target)
    _refused(capfd, argv, out, f"{_masks(root).resolve() / 'c.png'}: train mask is a")


def test_fifo_and_socket_are_skipped_and_named_as_what_they_are(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _dataset(tmp_path / "data")
    os.mkfifo(_images(root) / "pipe.png")  # never opened: reading it would block ingest
    monkeypatch.chdir(_images(root))  # a socket path may have at most ~100 characters
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("sock.png")
        out = tmp_path / "out"
        with caplog.at_level(logging.WARNING, logger="segflow.data.ingest"):
            manifest, summary = _accepted(capfd, _ingest_argv(root, out), out)
    assert sorted(manifest.index) == ["a", "b", "c"]
    assert summary["skipped_files"]["train"] == {"count": 2, "examples": ["pipe.png", "sock.png"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{_images(root)}: skipped 2 entries (e.g. pipe.png (a FIFO), sock.png (a socket))"
    ]


def test_dicom_without_pixel_data_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    bad = write_ct_dicom(_images(root) / "ct.dcm", None)
    assert "PixelData" not in pydicom.dcmread(bad)
    _write(_masks(root) / "ct.png", _mask(0) * 255)
    out = tmp_path / "out"
    _refused(
        capfd, _ingest_argv(root, out), out, str(bad.resolve()), "DICOM file has no pixel data"
    )


# --------------------------------------------------------------------------- folds


def test_more_folds_than_groups_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data", ids=("a", "b", "c"))
    # d is an exact copy of c (same picture, same mask): one group, so 3 groups for 4 images.
    _write(_images(root) / "d.png", _gray(2))
    _write(_masks(root) / "d.png", _mask(2) * 255)
    out = tmp_path / "out"
    manifest_path, items_path = out / "manifest.parquet", out / "items.parquet"
    assert _cli(capfd, _ingest_argv(root, out)).code == 0
    dedup = ["dedup", "--manifest", str(manifest_path), "--out-items", str(items_path)]
    dedup += ["--out-summary", str(out / "dedup.json"), "--out-report", str(out / "dedup.md")]
    assert _cli(capfd, dedup).code == 0
    folds_dir = out / "folds"
    folds = ["folds", "--manifest", str(manifest_path), "--dedup-items", str(items_path)]
    folds += ["--out-folds", str(folds_dir / "folds.csv")]
    folds += ["--out-summary", str(folds_dir / "summary.json")]
    _refused(
        capfd,
        [*folds, "--n-folds", "4"],
        folds_dir,
        "folds.n_folds = 4 but only 3 independent image groups",
    )
    assert _cli(capfd, [*folds, "--n-folds", "3"]).code == 0
    assert sorted(pd.read_csv(folds_dir / "folds.csv")["fold"].unique()) == [0, 1, 2]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--max-pixles", "5"], "unrecognized arguments: --max-pixles"),
        (["--max-pixels", "lots"], "argument --max-pixels: invalid int value: 'lots'"),
        (["--mask-source", "csv"], "argument --mask-source: invalid choice: 'csv'"),
    ],
    ids=["typo", "wrong-type", "bad-choice"],
)
def test_cli_flag_typo_and_wrong_type_name_the_flag(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(_ingest_argv(root, out, *argv))
    err = capfd.readouterr().err
    assert info.value.code == 2
    assert fragment in err and "Traceback" not in err
    assert not out.exists()


def test_negative_max_pixels_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _ingest_argv(root, out, "--max-pixels", "-5")
    _refused(capfd, argv, out, "data.max_pixels must be positive (0: no limit), got -5")


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"data": {"train_image": "x"}},
            "invalid config: unknown key data.train_image (did you mean data.train_images?)",
        ),
        (
            {"data": {"max_pixels": "lots"}},
            "invalid config: data.max_pixels: 'lots' is not of type 'integer'",
        ),
        (
            {"folds": {"n_folds": 2.5}},
            "invalid config: folds.n_folds: 2.5 is not of type 'integer'",
        ),
        (  # no rule's {experiment} wildcard matches it: was a MissingInputException
            {"experiments": {"my exp": {"model": {"arch": "FPN"}}}, "run_experiments": ["my exp"]},
            "experiments.my exp: the experiment name 'my exp' may contain only letters, digits, "
            "'_', '.' and '-' and may not be '.' or '..' (it names result folders and rule "
            "wildcards); rename it here and in run_experiments",
        ),
        (
            {"experiments": {"a/b": {"model": {"arch": "FPN"}}}},
            "experiments.a/b: the experiment name 'a/b' may contain only letters, digits, '_', "
            "'.' and '-' and may not be '.' or '..' (it names result folders and rule "
            "wildcards); rename it here",
        ),
        (  # an option the term does not have: the valid ones are listed
            {"experiments": {"unet_lite0": {"loss": {"dice": {"weight": 1, "per_image": True}}}}},
            "invalid config: unknown key experiments.unet_lite0.loss.dice.per_image (valid: "
            "weight, log_loss, smooth)",
        ),
        (  # a fold the split does not have (core.config_check.train_folds)
            {"folds": {"n_folds": 3, "train_folds": [0, 3]}},
            "invalid config: folds.train_folds[1]: fold 3 does not exist (folds.n_folds is 3: "
            "folds 0 to 2)",
        ),
    ],
    ids=[
        "typo",
        "wrong-type",
        "float-for-int",
        "experiment-name-space",
        "experiment-name-path",
        "loss-option",
        "train-folds-range",
    ],
)
def test_config_typo_and_wrong_type_stop_the_dry_run_naming_the_key(
    tmp_path: Path, override: dict, message: str
) -> None:
    workdir = copy_workflow(tmp_path)
    (workdir / "bad.yaml").write_text(yaml.safe_dump(override))
    result = run_snakemake(workdir, "--dry-run", "--configfile", "bad.yaml", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output.splitlines(), output[-3000:]
    assert "Failed validating" not in output  # not snakemake's hundred-line schema dump
    assert not (workdir / "results").exists()


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            {"lovasz": {"per_image": True}},
            "experiments.x.loss.lovasz.weight: missing; a term given as a mapping needs its weight",
        ),
        (
            {"dice": {"weight": 1, "per_image": True}},
            "experiments.x.loss.dice.per_image: unknown option; valid for dice: weight, "
            "log_loss, smooth",
        ),
        (
            {"lovasz": {"weight": 1, "per_image": "yes"}},
            "experiments.x.loss.lovasz.per_image: must be true or false, got 'yes'",
        ),
        (
            {"bce": {"weight": 1, "pos_weight": {"salt": 2}}},
            "experiments.x.loss.bce.pos_weight: must be a number > 0, or a list of them",
        ),
    ],
    ids=["no-weight", "unsupported-option", "wrong-type", "dict-value"],
)
def test_loss_term_with_bad_options_stops_segflow_train_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], loss: dict, message: str
) -> None:
    # Refused while the experiment is parsed, before any data is read or model built.
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    (arrays / "stats.json").write_text(json.dumps({"channels": 1}))
    out = tmp_path / "out"
    argv = ["train", "--arrays-dir", str(arrays), "--folds", str(tmp_path / "folds.csv")]
    argv += ["--experiment", json.dumps({"loss": loss}), "--name", "x", "--fold", "0"]
    argv += ["--out-dir", str(out), "--resume-dir", str(tmp_path / "resume")]
    _refused(capfd, argv, out, message)


# --------------------------------------------------------------------------- manifest paths
# Later stages open the files the manifest names; ingest recorded the data roots it checked
# them against, and a manifest edited afterwards (by hand, a tool, an attacker) must not make
# preprocess, submit or report read outside them.


def _stage_tables(capfd: pytest.CaptureFixture[str], root: Path, out: Path) -> tuple[Path, Path]:
    """Ingest (mask files, a test folder) and dedup ``root``; return (manifest, items) paths."""
    assert _cli(capfd, _ingest_argv(root, out, "--test-images", str(root / "test"))).code == 0
    manifest, items = out / "manifest.parquet", out / "items.parquet"
    dedup = ["dedup", "--manifest", str(manifest), "--out-items", str(items)]
    dedup += ["--out-summary", str(out / "dedup.json"), "--out-report", str(out / "dedup.md")]
    assert _cli(capfd, dedup).code == 0
    return manifest, items


def _leaky_dataset(root: Path) -> Path:
    """``_dataset`` plus a test folder whose ``t`` copies train image ``a`` (dedup's leak, whose
    label the submission copies from a's mask file)."""
    _dataset(root)
    (root / "test").mkdir()
    (root / "test" / "t.png").write_bytes((_images(root) / "a.png").read_bytes())
    _write(root / "test" / "u.png", _gray(7))
    return root


def _tamper(manifest_path: Path, item_id: str, column: str, value: str) -> None:
    """Replace one row's path; the recorded data roots (Parquet key-value metadata) stay."""
    manifest = pd.read_parquet(manifest_path)
    assert manifest.attrs["segflow_data_roots"]  # written by ingest, read back by pandas
    manifest.loc[manifest["id"] == item_id, column] = value
    manifest.to_parquet(manifest_path, index=False)


def _escaping_path(tmp_path: Path, root: Path, kind: str) -> str:
    """A path to a real PNG outside the data: through '..', absolute, relative or a symlink."""
    outside = _write(tmp_path / "elsewhere" / "x.png", _gray(5))
    if kind == "dotdot":  # starts inside the images folder, climbs out of it
        return f"{_images(root)}/../../../elsewhere/x.png"
    if kind == "relative":
        return "../../etc/passwd"
    if kind == "symlink":  # a link inside the folder, added after ingest, leading out
        link = _images(root) / "z.png"
        link.symlink_to(outside)
        return str(link)
    return str(outside)


def _preprocess_argv(manifest: Path, items: Path, out: Path) -> list[str]:
    return [
        *("preprocess", "--manifest", str(manifest), "--dedup-items", str(items)),
        *("--out-dir", str(out)),
    ]


ESCAPES = ["dotdot", "absolute", "relative", "symlink"]


def test_untampered_manifest_paths_are_read_back(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _leaky_dataset(tmp_path / "data")
    manifest, items = _stage_tables(capfd, root, tmp_path / "tables")
    # A '..' that stays inside the data folder is a harmless spelling of the same file.
    _tamper(manifest, "b", "image_path", f"{_images(root)}/../images/b.png")
    arrays = tmp_path / "arrays"
    assert _cli(capfd, _preprocess_argv(manifest, items, arrays)).code == 0
    images = np.load(arrays / "train_images.npy")
    index = pd.read_parquet(arrays / "index.parquet")
    assert (images[index.set_index("id").loc["b", "row"], :, :, 0] == _gray(1)).all()
    # Derived tables do not inherit the manifest's roots: their bytes never depend on them.
    for table in (items, arrays / "index.parquet"):
        assert not pd.read_parquet(table).attrs, table


@pytest.mark.parametrize("column", ["image_path", "mask_path"])
@pytest.mark.parametrize("kind", ESCAPES)
def test_preprocess_refuses_a_manifest_path_leading_out_of_the_data(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], column: str, kind: str
) -> None:
    root = _leaky_dataset(tmp_path / "data")
    manifest, items = _stage_tables(capfd, root, tmp_path / "tables")
    bad = _escaping_path(tmp_path, root, kind)
    _tamper(manifest, "b", column, bad)
    out = tmp_path / "arrays"
    _refused(
        capfd,
        _preprocess_argv(manifest, items, out),
        out,
        f"manifest row 'b': {column} {bad!r}",
        "outside the data roots ingest recorded",
    )


def test_preprocess_refuses_a_manifest_without_recorded_roots(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # An older manifest, or a table made by another tool: nothing to check its paths against.
    root = _leaky_dataset(tmp_path / "data")
    manifest, items = _stage_tables(capfd, root, tmp_path / "tables")
    frame = pd.read_parquet(manifest)
    frame.attrs = {}
    frame.to_parquet(manifest, index=False)
    out = tmp_path / "arrays"
    _refused(
        capfd,
        _preprocess_argv(manifest, items, out),
        out,
        "manifest row 'a': mask_path",
        "records no data roots",
        "rerun segflow ingest",
    )


def _submit_argv(tmp_path: Path, manifest: Path, items: Path, out: Path) -> list[str]:
    """``segflow submit`` of an all-empty prediction for the two test images t and u."""
    from segflow.model.postprocess import tune_classes

    fold = tmp_path / "test_fold"
    fold.mkdir()
    pd.DataFrame({"id": ["t", "u"]}).to_csv(fold / "ids.csv", index=False)
    np.save(fold / "probs.npy", np.zeros((2, 1, H, W), np.float16))
    zeros = np.zeros((1, 1, H, W), np.float32)
    _, _, params = tune_classes(zeros, zeros[:, 0].astype(np.uint8), ["mask"], [0.5], [0])
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "stats.json").write_text(json.dumps({"classes": ["mask"]}))
    return [
        *("submit", "--fold-dirs", str(fold), "--postprocess", str(tmp_path / "params.json")),
        *("--stats", str(tmp_path / "stats.json")),
        # One manifest of both splits (ingest's default --split all): it is the test manifest
        # too, and its dedup items carry the test rows' leak_train_ids (as segflow leaks' do).
        *("--manifest", str(manifest), "--test-manifest", str(manifest)),
        *("--leaks", str(items), "--out", str(out / "submission.csv")),
    ]


@pytest.mark.parametrize("kind", ESCAPES)
def test_submit_refuses_a_copied_label_path_leading_out_of_the_data(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str
) -> None:
    root = _leaky_dataset(tmp_path / "data")
    manifest, items = _stage_tables(capfd, root, tmp_path / "tables")
    out = tmp_path / "submission"
    argv = _submit_argv(tmp_path, manifest, items, out)
    assert _cli(capfd, argv).code == 0  # untampered: t gets a's mask
    written = pd.read_csv(out / "submission.csv", keep_default_na=False).set_index("id")
    assert written.loc["t", "rle_mask"] != "" and written.loc["u", "rle_mask"] == ""
    (out / "submission.csv").unlink()
    bad = _escaping_path(tmp_path, root, kind)
    _tamper(manifest, "a", "mask_path", bad)
    _refused(capfd, argv, out, f"manifest row 'a': mask_path {bad!r}", "outside the data roots")


# The report needs a whole results folder: test_report builds one as a fixture.
from test_report import WORST_ID, results  # noqa: E402, F401


@pytest.mark.filterwarnings("ignore:The least populated class")  # the fixture's 10 images
@pytest.mark.parametrize("column", ["image_path", "mask_path"])
def test_report_refuses_a_manifest_path_leading_out_of_the_data(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    results: Path,  # noqa: F811 (the fixture imported above)
    column: str,
) -> None:
    # The report reads every OOF item's mask file (its true mask) and decodes the images of its
    # example cases, the worst OOF image among them.
    bad = str(_write(tmp_path / "elsewhere" / "x.png", _gray(5)))
    _tamper(results / "ingest" / "manifest.parquet", WORST_ID, column, bad)
    out = tmp_path / "report"
    argv = ["report", "--results-dir", str(results), "--out", str(out / "report.html")]
    fragment = f"manifest row {WORST_ID!r}: {column} {bad!r}"
    _refused(capfd, argv, out, fragment, "outside the data roots")


# --------------------------------------------------------------------------- CSV ids with extension
# Severstal and Airbus key RLE rows by file name (0002cc93b.jpg); segflow ids are stems.


def test_rle_csv_ids_with_extension_are_matched_to_their_images(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = _rle_argv(root, out, [("a.png", "1 2"), ("b.png", ""), ("c.png", "-1")])
    manifest, _ = _accepted(capfd, argv, out)
    assert sorted(manifest.index) == ["a", "b", "c"]
    assert manifest.loc["a", "mask_rle"] == "1 2" and manifest.loc["b", "mask_rle"] == ""


@pytest.mark.parametrize(
    ("rows", "fragments"),
    [
        (
            [("b.png", "1 1"), ("c", "")],
            ["row 2 (id 'b.png'): the id is an image file name", "row 3 (id 'c')", "one style"],
        ),
        ([("b", "1 1"), ("b.png", "2 1")], ["row 3 (id 'b.png')", "one style"]),
        ([("a.png", "1 1")], ["row 2 (id 'a.png'): ambiguous id", "a.png.png"]),
    ],
    ids=["mixed-styles", "both-spellings-of-one-image", "stem-of-one-name-of-another"],
)
def test_ambiguous_rle_csv_ids_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], rows: list, fragments: list[str]
) -> None:
    root = _dataset(tmp_path / "data")
    _write(_images(root) / "a.png.png", _gray(5))  # stem 'a.png': the file name of a.png
    out = tmp_path / "out"
    argv = _rle_argv(root, out, rows, "--rle-missing-is-empty")
    _refused(capfd, argv, out, *fragments)
