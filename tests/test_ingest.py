"""Tests for ingest: listing, decoding and validating a dataset into a manifest (segflow.data.ingest)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import naive_encode, write_ct_dicom, write_label_dataset

from segflow import cli
from segflow.artifacts.tables import csv_id_style, data_roots
from segflow.core.errors import SegflowError
from segflow.data.ingest import IngestOptions, ingest
from segflow.formats.imageio import mask_md5
from segflow.formats.labels import label_md5, pack_labels, read_label, unpack_labels
from segflow.formats.rle import rle_decode

MANIFEST_COLUMNS = [
    "id",
    "split",
    "image_path",
    "image_format",
    "file_bytes",
    "height",
    "width",
    "channels",
    "bit_depth",
    "is_gray",
    "md5_bytes",
    "md5_pixels",
    "phash",
    "mask_path",
    "mask_rle",
    "mask_md5",
    "mask_coverage",
]

# --------------------------------------------------------------------------- helpers


def _write(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels), path
    return path


def _image(height: int, width: int, seed: int, channels: int = 1, dtype: type = np.uint8):
    rng = np.random.default_rng(seed)
    top = int(np.iinfo(dtype).max)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, top + 1, size=shape, dtype=np.int64).astype(dtype)


def _mask(height: int, width: int, seed: int) -> np.ndarray:
    mask = (np.random.default_rng(seed).random((height, width)) < 0.4).astype(np.uint8)
    mask[0, 0] = 1  # never empty
    return mask


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _folder_dataset(root: Path) -> dict:
    """Train images a (gray 8-bit), b (RGB), c (16-bit gray TIFF), d (gray stored as 3 channels);
    masks with suffix '_mask' in 0/255, 0/65535 (16-bit), 0/1 and 3-channel form; two test images.
    """
    images, masks, test = root / "train" / "images", root / "train" / "masks", root / "test"
    h, w = 6, 9
    truth = {
        "a": _mask(h, w, 1),
        "b": _mask(h, w, 2),
        "c": np.zeros((h, w), np.uint8),  # empty mask
        "d": _mask(h, w, 4),
    }
    gray_d = _image(h, w, 13)
    paths = {
        "a": _write(images / "a.png", _image(h, w, 11)),
        "b": _write(images / "b.png", _image(h, w, 12, channels=3)),
        "c": _write(images / "c.tif", _image(h, w, 14, dtype=np.uint16)),
        "d": _write(images / "d.png", np.dstack([gray_d] * 3)),
        "t1": _write(test / "t1.png", _image(h, w, 21)),
        "t2": _write(test / "t2.bmp", _image(h + 2, w, 22, channels=3)),
    }
    mask_paths = {
        "a": _write(masks / "a_mask.png", truth["a"] * 255),
        "b": _write(masks / "b_mask.png", truth["b"].astype(np.uint16) * 65535),
        "c": _write(masks / "c_mask.png", truth["c"]),
        "d": _write(masks / "d_mask.png", np.dstack([truth["d"]] * 3)),
    }
    options = IngestOptions(
        train_images=str(images),
        train_masks=str(masks),
        mask_suffix="_mask",
        test_images=str(test),
    )
    return {"options": options, "truth": truth, "paths": paths, "mask_paths": mask_paths}


def _rle_dataset(root: Path, rows: list[tuple[str, str]], ids=("a", "b", "c", "d")) -> Path:
    """Train images (5 high, 4 wide) for ``ids`` and a train.csv with ``rows``."""
    for index, item_id in enumerate(ids):
        _write(root / "images" / f"{item_id}.png", _image(5, 4, index))
    csv = root / "train.csv"
    csv.write_text("id,rle_mask\n" + "".join(f"{i},{r}\n" for i, r in rows))
    return csv


def _rle_options(root: Path, **changes) -> IngestOptions:
    return IngestOptions(
        train_images=str(root / "images"),
        mask_source="rle_csv",
        rle_csv=str(root / "train.csv"),
        **changes,
    )


def _raises(options: IngestOptions, *fragments: str) -> str:
    with pytest.raises(SegflowError) as info:
        ingest(options)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    return message


def _write_dicom(path: Path, hu: np.ndarray) -> Path:
    """A 12-bit CT slice stored as HU + 1024 with intercept -1024."""
    return write_ct_dicom(path, hu.astype(np.int32) + 1024, bits_stored=12)


# --------------------------------------------------------------------------- folder source


def test_folder_source_manifest(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    manifest, summary = ingest(data["options"])

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["id"].tolist() == ["a", "b", "c", "d", "t1", "t2"]
    assert manifest["split"].tolist() == ["train"] * 4 + ["test"] * 2
    for column in ("file_bytes", "height", "width", "channels", "bit_depth"):
        assert pd.api.types.is_integer_dtype(manifest[column]), column
    assert manifest["is_gray"].dtype == bool
    assert manifest["mask_coverage"].dtype == np.float64

    rows = manifest.set_index("id")
    for item_id, path in data["paths"].items():
        row = rows.loc[item_id]
        assert Path(row["image_path"]).is_absolute()
        assert row["image_path"] == str(path.resolve())
        assert row["md5_bytes"] == _md5(path)
        assert row["file_bytes"] == path.stat().st_size
        assert isinstance(row["md5_pixels"], str)
        assert len(row["md5_pixels"]) == 32

    expected = {
        # id: (format, height, width, channels, bit_depth, is_gray)
        "a": ("png", 6, 9, 1, 8, True),
        "b": ("png", 6, 9, 3, 8, False),
        "c": ("tif", 6, 9, 1, 16, True),
        "d": ("png", 6, 9, 3, 8, True),
        "t1": ("png", 6, 9, 1, 8, True),
        "t2": ("bmp", 8, 9, 3, 8, False),
    }
    for item_id, facts in expected.items():
        row = rows.loc[item_id]
        got = (row.image_format, row.height, row.width, row.channels, row.bit_depth, row.is_gray)
        assert got == facts, item_id

    for item_id, truth in data["truth"].items():
        row = rows.loc[item_id]
        assert row["mask_path"] == str(data["mask_paths"][item_id].resolve())
        assert row["mask_coverage"] == pytest.approx(truth.sum() / truth.size)
        assert row["mask_md5"] == mask_md5(truth)
        assert row["mask_rle"] is None  # only the rle_csv source records an RLE
    assert rows.loc["c", "mask_coverage"] == 0.0
    for item_id in ("t1", "t2"):
        assert pd.isna(rows.loc[item_id, "mask_path"])
        assert pd.isna(rows.loc[item_id, "mask_md5"])
        assert np.isnan(rows.loc[item_id, "mask_coverage"])

    # Gray stored as 3 equal channels hashes like its 1-channel twin would; colour does not.
    assert rows.loc["d", "md5_pixels"] != rows.loc["a", "md5_pixels"]
    assert len(set(manifest["md5_pixels"])) == len(manifest)

    assert summary["n_items"] == 6
    assert summary["n_train"] == 4
    assert summary["n_test"] == 2
    assert summary["n_train_empty_masks"] == 1
    assert summary["sizes"] == {"9x6": 5, "9x8": 1}
    assert summary["channels"] == {"1": 3, "3": 3}
    assert summary["bit_depths"] == {"8": 5, "16": 1}
    assert summary["formats"] == {"png": 4, "tif": 1, "bmp": 1}
    assert summary["all_gray"] is False
    assert summary["skipped_files"]["train"]["count"] == 0
    assert summary["items_without_metadata"] == 0
    json.dumps(summary)  # JSON-ready


def test_identical_pixels_in_different_files_share_md5_pixels(tmp_path: Path) -> None:
    gray = _image(7, 7, 5)
    _write(tmp_path / "images" / "one.png", gray)
    _write(tmp_path / "images" / "three.png", np.dstack([gray] * 3))
    _write(tmp_path / "images" / "tiff.tif", gray)
    for name in ("one", "three", "tiff"):
        _write(tmp_path / "masks" / f"{name}.png", _mask(7, 7, 0))
    manifest, _ = ingest(
        IngestOptions(train_images=str(tmp_path / "images"), train_masks=str(tmp_path / "masks"))
    )
    assert manifest["md5_pixels"].nunique() == 1
    assert manifest["md5_bytes"].nunique() == 3


def test_folder_source_without_suffix_and_without_test(tmp_path: Path) -> None:
    truth = _mask(4, 4, 9)
    _write(tmp_path / "images" / "x.jpg", _image(4, 4, 1))
    _write(tmp_path / "masks" / "x.png", truth)
    manifest, summary = ingest(
        IngestOptions(train_images=str(tmp_path / "images"), train_masks=str(tmp_path / "masks"))
    )
    assert manifest["id"].tolist() == ["x"]
    assert manifest["image_format"].tolist() == ["jpg"]
    assert manifest["mask_coverage"].iloc[0] == pytest.approx(truth.mean())
    assert summary["n_test"] == 0
    assert summary["skipped_files"]["test"]["count"] == 0


# --------------------------------------------------------------------------- rle_csv source


def test_rle_csv_column_major_union_and_empty_spellings(tmp_path: Path) -> None:
    # Image is 5 high and 4 wide; column-major pixel p is (row (p-1) % 5, column (p-1) // 5).
    # a: rows "1 3" (column 0, rows 0-2) and "3 4" (column 0 rows 2-4, column 1 row 0): the
    #    union is pixels 1-6 -> "1 6"; the two rows overlap at pixel 3, which is fine across rows.
    d_mask = np.zeros((5, 4), np.uint8)
    d_mask[1:3, 2:4] = 1  # pixels 12, 13, 17, 18
    # d also has an empty row ("-1"), which adds nothing to the union.
    rows = [("a", "1 3"), ("b", "-1"), ("c", ""), ("d", "-1"), ("a", "3 4"), ("d", "12 2 17 2")]
    _rle_dataset(tmp_path, rows)
    manifest, summary = ingest(_rle_options(tmp_path))
    by_id = manifest.set_index("id")

    a_mask = np.zeros((5, 4), np.uint8)
    a_mask[:, 0] = 1
    a_mask[0, 1] = 1
    assert by_id.loc["a", "mask_rle"] == "1 6"
    assert by_id.loc["b", "mask_rle"] == ""
    assert by_id.loc["c", "mask_rle"] == ""
    assert by_id.loc["d", "mask_rle"] == "12 2 17 2"
    for item_id, truth in {"a": a_mask, "d": d_mask}.items():
        decoded = rle_decode(by_id.loc[item_id, "mask_rle"], (5, 4))
        np.testing.assert_array_equal(decoded, truth)
        assert by_id.loc[item_id, "mask_coverage"] == pytest.approx(truth.sum() / 20)
        assert by_id.loc[item_id, "mask_md5"] == mask_md5(truth)
    for item_id in ("b", "c"):
        assert by_id.loc[item_id, "mask_coverage"] == 0.0
        assert by_id.loc[item_id, "mask_md5"] == mask_md5(np.zeros((5, 4), np.uint8))
    assert manifest["mask_path"].isna().all()
    assert summary["n_train_empty_masks"] == 2


def test_rle_csv_row_order_is_stored_column_major(tmp_path: Path) -> None:
    truth = _mask(5, 4, 7)
    row_rle = naive_encode(truth, "row")
    column_rle = naive_encode(truth, "column")
    assert row_rle != column_rle  # otherwise the test would not tell the orders apart
    _rle_dataset(tmp_path, [("a", row_rle)], ids=("a",))
    manifest, _ = ingest(_rle_options(tmp_path, rle_order="row"))
    assert manifest["mask_rle"].iloc[0] == column_rle
    np.testing.assert_array_equal(rle_decode(manifest["mask_rle"].iloc[0], (5, 4)), truth)
    assert manifest["mask_md5"].iloc[0] == mask_md5(truth)


def test_rle_csv_zero_based_start(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", "0 2 19 1")], ids=("a",))
    manifest, _ = ingest(_rle_options(tmp_path, rle_start=0))
    assert manifest["mask_rle"].iloc[0] == "1 2 20 1"


def test_rle_csv_custom_columns(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "q.png", _image(5, 4, 0))
    (tmp_path / "train.csv").write_text("ImageId,EncodedPixels,extra\nq,2 3,x\n")
    manifest, _ = ingest(
        _rle_options(tmp_path, rle_id_column="ImageId", rle_column="EncodedPixels")
    )
    assert manifest["mask_rle"].tolist() == ["2 3"]


# --------------------------------------------------------------------------- multi-label


CLASSES = ("1", "2", "3")


def _labelled(seed: int, empty: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A 5x4 gray image and 3 class masks (the classes in ``empty`` have no pixel)."""
    planes = np.stack([_mask(5, 4, seed * 10 + k) for k in range(3)])
    planes[list(empty)] = 0
    return _image(5, 4, seed), planes


def _label_truth() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"a": _labelled(1), "b": _labelled(2, empty=(1,)), "c": _labelled(3, empty=(0, 1, 2))}


def _check_label_rows(manifest: pd.DataFrame, truth: dict) -> None:
    rows = manifest.set_index("id")
    for item_id, (_, planes) in truth.items():
        row = rows.loc[item_id]
        label = read_label(row["mask_path"], row["mask_rle"], (5, 4), 3, item_id)
        np.testing.assert_array_equal(unpack_labels(label, 3), planes)
        assert row["mask_md5"] == label_md5(pack_labels(planes), 3)
        assert row["mask_coverage"] == pytest.approx(planes.any(axis=0).mean())
        assert row["mask_classes"] == "1|2|3"


@pytest.mark.parametrize("source", ["rle_csv", "folder"])
def test_multilabel_manifest(tmp_path: Path, source: str) -> None:
    truth = _label_truth()
    options = write_label_dataset(tmp_path, truth, CLASSES, source)
    manifest, summary = ingest(options)
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "mask_classes"]
    _check_label_rows(manifest, truth)
    rows = manifest.set_index("id")
    if source == "rle_csv":  # canonical per-class RLE, "" for an empty class
        assert rows.loc["b", "mask_rle"] == "|".join(naive_encode(p) for p in truth["b"][1])
        assert rows.loc["b", "mask_rle"].split("|")[1] == ""
        assert rows.loc["c", "mask_rle"] == "||"
    else:  # a class without a file is ""
        masks = Path(options.train_masks or "").resolve()
        assert rows.loc["b", "mask_path"] == f"{masks / '1' / 'b.png'}||{masks / '3' / 'b.png'}"
        assert rows.loc["c", "mask_path"] == "||"
    assert summary["classes"] == ["1", "2", "3"] and summary["multilabel"] is True
    assert summary["n_train_empty_masks"] == 1


def test_binary_summary_names_one_class(tmp_path: Path) -> None:
    _, summary = ingest(_folder_dataset(tmp_path)["options"])
    assert summary["classes"] == ["mask"] and summary["multilabel"] is False


def test_one_class_list_is_class_aware(tmp_path: Path) -> None:
    truth = {item_id: (image, planes[:1]) for item_id, (image, planes) in _label_truth().items()}
    manifest, summary = ingest(write_label_dataset(tmp_path, truth, ("defect",), "rle_csv"))
    assert manifest["mask_classes"].tolist() == ["defect"] * 3
    assert manifest.set_index("id").loc["a", "mask_rle"] == naive_encode(truth["a"][1][0])
    assert summary["multilabel"] is True


def test_long_csv_rows_of_one_id_and_class_are_unioned(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "a.png", _image(5, 4, 0))
    (tmp_path / "train.csv").write_text("id,class,rle_mask\na,y,1 2\na,x,5 1\na,y,2 3\n")
    manifest, _ = ingest(_rle_options(tmp_path, classes=("x", "y")))
    assert manifest["mask_rle"].tolist() == ["5 1|1 4"]


def test_long_csv_unknown_class_names_the_row(tmp_path: Path) -> None:
    options = write_label_dataset(tmp_path, _label_truth(), CLASSES, "rle_csv")
    csv = Path(options.rle_csv or "")
    csv.write_text(csv.read_text() + "a,5,1 1\n")
    line = len(csv.read_text().splitlines())
    _raises(options, str(csv), f"row {line}", "id 'a'", "ClassId '5'", "data.classes (1, 2, 3)")


def test_long_csv_without_the_class_column(tmp_path: Path) -> None:
    options = write_label_dataset(tmp_path, _label_truth(), CLASSES, "rle_csv")
    options = dataclasses.replace(options, rle_class_column="Kind")
    _raises(options, "no column 'Kind'", "data.rle_class_column")


@pytest.mark.parametrize("classes", [None, CLASSES])
def test_missing_csv_rows(tmp_path: Path, classes: tuple[str, ...] | None) -> None:
    _write(tmp_path / "images" / "a.png", _image(5, 4, 0))
    _write(tmp_path / "images" / "b.png", _image(5, 4, 1))
    row = "a,2,1 1\n" if classes else "a,1 1\n"
    header = "id,class,rle_mask\n" if classes else "id,rle_mask\n"
    (tmp_path / "train.csv").write_text(header + row)
    csv = str(tmp_path / "train.csv")
    _raises(_rle_options(tmp_path, classes=classes), "b.png", csv, "no row", "rle_missing_is_empty")
    manifest, summary = ingest(_rle_options(tmp_path, classes=classes, rle_missing_is_empty=True))
    rows = manifest.set_index("id")
    assert rows.loc["b", "mask_rle"] == ("||" if classes else "")
    assert rows.loc["b", "mask_coverage"] == 0.0
    assert rows.loc["a", "mask_rle"] == ("|1 1|" if classes else "1 1")
    assert summary["n_train_empty_masks"] == 1


def test_class_folder_missing_is_an_error(tmp_path: Path) -> None:
    options = write_label_dataset(tmp_path, _label_truth(), CLASSES, "folder")
    shutil.rmtree(Path(options.train_masks or "") / "2")
    _raises(options, str(Path(options.train_masks or "") / "2"), "does not exist", "class '2'")


def test_class_mask_without_image_is_an_error(tmp_path: Path) -> None:
    options = write_label_dataset(tmp_path, _label_truth(), CLASSES, "folder")
    orphan = _write(Path(options.train_masks or "") / "3" / "zz.png", _mask(5, 4, 0) * 255)
    _raises(options, str(orphan.resolve()), "has no train image")


def test_class_mask_of_different_size(tmp_path: Path) -> None:
    options = write_label_dataset(tmp_path, _label_truth(), CLASSES, "folder")
    wrong = _write(Path(options.train_masks or "") / "2" / "a.png", _mask(4, 5, 0) * 255)
    _raises(options, str(wrong.resolve()), "mask is 5x4", "is 4x5")


@pytest.mark.parametrize(
    ("classes", "fragment"),
    [
        ((), "empty list"),
        (("a", "a"), "'a' more than once"),
        (("a", ""), "empty"),
        (("a", " b"), "surrounding spaces"),
        (("a|b",), "'|'"),
        (("None",), "reserved"),
        (tuple(map(str, range(33))), "at most 32"),
        ("abc", "must be a list"),
    ],
)
def test_invalid_classes(tmp_path: Path, classes: object, fragment: str) -> None:
    options = dataclasses.replace(_folder_dataset(tmp_path)["options"], classes=classes)
    _raises(options, "data.classes", fragment)


# --------------------------------------------------------------------------- ids with extension
# Severstal and Airbus key their CSV rows by file name (ImageId=0002cc93b.jpg); ids are stems.

SEVERSTAL_IDS = ("0002cc93b", "00031f466", "0007a71bf")


def _severstal(root: Path, classes: tuple[str, ...] | None) -> tuple[IngestOptions, dict]:
    """JPEG train images and a CSV keyed by file name listing non-empty masks only, one row per
    (image, class), or for binary data (Airbus) one row per object; returns the options and
    id -> (C, H, W) planes the CSV encodes."""
    n_classes = len(classes or ("mask",))
    header = "ImageId,ClassId,EncodedPixels\n" if classes else "ImageId,EncodedPixels\n"
    rows, truth = [], {}
    for seed, item_id in enumerate(SEVERSTAL_IDS):
        _write(root / "images" / f"{item_id}.jpg", _image(5, 4, seed))
        planes = np.stack([_mask(5, 4, seed * 10 + k) for k in range(n_classes)])
        if seed == 1:  # no row for the last class (binary: an image without any row)
            planes[-1] = 0
        truth[item_id] = planes
        for k, plane in enumerate(planes):
            if classes:
                rows.append(f"{item_id}.jpg,{classes[k]},{naive_encode(plane)}\n")
            else:  # one row per column of the mask, unioned again by ingest
                for x in np.flatnonzero(plane.any(axis=0)):
                    column = np.zeros_like(plane)
                    column[:, x] = plane[:, x]
                    rows.append(f"{item_id}.jpg,{naive_encode(column)}\n")
    (root / "train.csv").write_text(header + "".join(rows))
    options = _rle_options(
        root,
        rle_id_column="ImageId",
        rle_column="EncodedPixels",
        rle_class_column="ClassId",
        classes=classes,
        rle_missing_is_empty=True,
    )
    return options, truth


@pytest.mark.parametrize("classes", [("1", "2", "3", "4"), None], ids=["severstal", "airbus"])
def test_csv_ids_with_extension_match_the_image_files(
    tmp_path: Path, classes: tuple[str, ...] | None
) -> None:
    options, truth = _severstal(tmp_path, classes)
    manifest, summary = ingest(options)
    assert manifest["id"].tolist() == list(SEVERSTAL_IDS)  # ids stay file stems
    # Airbus: one row per object (here per column), unioned; 00031f466 has no row at all.
    assert summary["rle_ids_with_several_rows"] == (0 if classes else 2)
    assert csv_id_style(manifest) == "filename"
    n_classes = len(classes or ("mask",))
    for row in manifest.itertuples():
        label = read_label(row.mask_path, row.mask_rle, (5, 4), n_classes, row.id)
        np.testing.assert_array_equal(unpack_labels(label, n_classes), truth[row.id])
    # The CLI's manifest file keeps the id style for the submission.
    out = tmp_path / "out"
    argv = ["ingest", "--train-images", str(tmp_path / "images"), "--mask-source", "rle_csv"]
    argv += ["--rle-csv", str(tmp_path / "train.csv"), "--rle-id-column", "ImageId"]
    argv += ["--rle-column", "EncodedPixels", "--rle-missing-is-empty"]
    if classes:
        argv += ["--rle-class-column", "ClassId", "--classes", *classes]
    argv += ["--out-manifest", str(out / "m.parquet"), "--out-summary", str(out / "s.json")]
    assert cli.main(argv) == 0
    assert csv_id_style(pd.read_parquet(out / "m.parquet")) == "filename"


def test_csv_ids_without_extension_keep_the_stem_style(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", "1 1"), ("b", ""), ("c", ""), ("d", "")])
    manifest, _ = ingest(_rle_options(tmp_path))
    assert csv_id_style(manifest) == "stem"
    assert manifest.set_index("id").loc["a", "mask_rle"] == "1 1"


def test_csv_mixing_ids_with_and_without_extension_is_refused(tmp_path: Path) -> None:
    csv = _rle_dataset(tmp_path, [("a.png", "1 1"), ("b", ""), ("c.png", ""), ("d.png", "")])
    _raises(
        _rle_options(tmp_path),
        f"{csv} row 2 (id 'a.png'): the id is an image file name",
        f"{csv} row 3 (id 'b') names an image without its extension",
        "one style",
    )
    # Both spellings of one image are the same mixture.
    _rle_dataset(tmp_path, [("a", "1 1"), ("a.png", "2 1")], ids=("a",))
    _raises(_rle_options(tmp_path), "one style")


def test_csv_id_that_is_a_stem_and_another_file_name_is_refused(tmp_path: Path) -> None:
    # 'x.png' is the stem of x.png.png and the file name of x.png: which image is meant?
    _write(tmp_path / "images" / "x.png", _image(5, 4, 0))
    _write(tmp_path / "images" / "x.png.png", _image(5, 4, 1))
    (tmp_path / "train.csv").write_text("id,rle_mask\nx.png,1 1\n")
    _raises(
        _rle_options(tmp_path, rle_missing_is_empty=True),
        "row 2 (id 'x.png'): ambiguous id",
        "x.png.png",
    )


def test_csv_ids_with_extension_and_two_images_sharing_a_stem_are_refused(
    tmp_path: Path,
) -> None:
    _write(tmp_path / "images" / "a.jpg", _image(5, 4, 0))
    _write(tmp_path / "images" / "a.png", _image(5, 4, 1))
    (tmp_path / "train.csv").write_text("id,rle_mask\na.jpg,1 1\na.png,2 1\n")
    _raises(_rle_options(tmp_path), "duplicate id 'a'", "a.jpg and a.png")


def test_manifest_records_the_data_roots_it_checked(tmp_path: Path) -> None:
    options = _folder_dataset(tmp_path / "data")["options"]
    manifest, _ = ingest(options)
    folders = (options.train_images, options.train_masks, options.test_images)
    assert data_roots(manifest) == tuple(sorted(Path(f or "").resolve() for f in folders))
    with_root, _ = ingest(dataclasses.replace(options, data_root=str(tmp_path)))
    assert data_roots(with_root) == (tmp_path.resolve(),)
    # Recorded deterministically: the same data and config give the same manifest bytes.
    for out in ("one", "two"):
        argv = ["ingest", "--train-images", str(options.train_images), "--train-masks"]
        argv += [str(options.train_masks), "--test-images", str(options.test_images)]
        argv += [
            "--mask-suffix",
            "_mask",
            "--out-manifest",
            str(tmp_path / out / "manifest.parquet"),
        ]
        assert cli.main([*argv, "--out-summary", str(tmp_path / out / "summary.json")]) == 0
    one, two = (tmp_path / out / "manifest.parquet" for out in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    assert data_roots(pd.read_parquet(one)) == data_roots(manifest)


# --------------------------------------------------------------------------- metadata


def test_metadata_is_joined_as_meta_columns(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", ""), ("b", ""), ("c", "1 1"), ("d", "")])
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,depth,site\na,101,north\nc,303,south\nb,202,north\nzz,9,east\n")
    manifest, summary = ingest(_rle_options(tmp_path, metadata_csv=str(metadata)))
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "meta_depth", "meta_site"]
    rows = manifest.set_index("id")
    assert rows.loc["a", "meta_depth"] == 101
    assert rows.loc["b", "meta_depth"] == 202
    assert rows.loc["c", "meta_depth"] == 303
    assert rows.loc["c", "meta_site"] == "south"
    assert np.isnan(rows.loc["d", "meta_depth"])
    assert len(manifest) == 4  # the metadata-only id zz adds no row
    assert summary["items_without_metadata"] == 1


def test_metadata_with_string_ids_keeps_leading_zeros(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("007", ""), ("7", "1 1")], ids=("007", "7"))
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,depth\n007,1\n7,2\n")
    manifest, summary = ingest(_rle_options(tmp_path, metadata_csv=str(metadata)))
    assert manifest.set_index("id")["meta_depth"].to_dict() == {"007": 1, "7": 2}
    assert summary["items_without_metadata"] == 0


def test_metadata_duplicate_id_names_the_line(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", ""), ("b", ""), ("c", ""), ("d", "")])
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,depth\na,1\nb,2\nc,3\na,4\n")  # second 'a' is line 5
    _raises(
        _rle_options(tmp_path, metadata_csv=str(metadata)),
        str(metadata),
        "row 5",
        "duplicate id 'a'",
    )


def test_metadata_duplicate_line_number_counts_blank_lines(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", ""), ("b", ""), ("c", ""), ("d", "")])
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,depth\na,1\n\nb,2\nb,4\n")  # second 'b' is line 5
    _raises(_rle_options(tmp_path, metadata_csv=str(metadata)), "row 5", "duplicate id 'b'")


def test_metadata_errors(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", ""), ("b", ""), ("c", ""), ("d", "")])
    metadata = tmp_path / "meta.csv"
    metadata.write_text("name,depth\na,1\n")
    _raises(_rle_options(tmp_path, metadata_csv=str(metadata)), str(metadata), "'id'")
    missing = tmp_path / "nope.csv"
    _raises(_rle_options(tmp_path, metadata_csv=str(missing)), str(missing), "data.metadata_csv")


# --------------------------------------------------------------------------- DICOM and demo


def test_dicom_folder_ingest(tmp_path: Path) -> None:
    hu = np.array([[-160, 240, 40], [-1000, 0, 1000]], dtype=np.int16)
    names = ["ct1.dcm", "IM0002", "1.2.826.0.1.3680043.8.498.77"]
    ids = ["ct1", "IM0002", "1.2.826.0.1.3680043.8.498.77"]
    for index, (name, item_id) in enumerate(zip(names, ids, strict=True)):
        _write_dicom(tmp_path / "images" / name, hu + index)
        _write(tmp_path / "masks" / f"{item_id}.png", _mask(2, 3, index))
    manifest, summary = ingest(
        IngestOptions(train_images=str(tmp_path / "images"), train_masks=str(tmp_path / "masks"))
    )
    assert sorted(manifest["id"]) == sorted(ids)
    assert set(manifest["image_format"]) == {"dicom"}
    assert set(manifest["height"]) == {2}
    assert set(manifest["width"]) == {3}
    assert set(manifest["channels"]) == {1}
    assert set(manifest["bit_depth"]) == {12}
    assert summary["formats"] == {"dicom": 3}
    assert summary["skipped_files"]["train"]["count"] == 0


def test_demo_dataset_both_mask_sources_agree(demo_dataset: Path) -> None:
    common = {
        "train_images": str(demo_dataset / "train" / "images"),
        "test_images": str(demo_dataset / "test" / "images"),
        "metadata_csv": str(demo_dataset / "metadata.csv"),
    }
    by_folder, folder_summary = ingest(
        IngestOptions(**common, train_masks=str(demo_dataset / "train" / "masks"))
    )
    by_rle, rle_summary = ingest(
        IngestOptions(**common, mask_source="rle_csv", rle_csv=str(demo_dataset / "train.csv"))
    )
    assert by_folder["id"].tolist() == by_rle["id"].tolist()
    train = by_folder["split"] == "train"
    assert train.sum() == 80
    assert (~train).sum() == 30
    assert by_folder.loc[train, "mask_md5"].tolist() == by_rle.loc[train, "mask_md5"].tolist()
    np.testing.assert_array_equal(
        by_folder.loc[train, "mask_coverage"], by_rle.loc[train, "mask_coverage"]
    )
    assert folder_summary["n_train_empty_masks"] == rle_summary["n_train_empty_masks"] > 0
    assert "meta_depth" in by_folder.columns
    assert folder_summary["items_without_metadata"] == 0

    # Spot-check against the files themselves, not against ingest's own helpers.
    csv = pd.read_csv(demo_dataset / "train.csv", dtype=str, keep_default_na=False)
    by_id = by_rle.set_index("id")
    for item_id, rle in list(zip(csv["id"], csv["rle_mask"], strict=True))[:25]:
        png = cv2.imread(str(demo_dataset / "train" / "masks" / f"{item_id}.png"), -1) > 0
        assert by_id.loc[item_id, "mask_rle"] == naive_encode(png)
        assert by_id.loc[item_id, "mask_rle"] == rle
        assert by_id.loc[item_id, "mask_coverage"] == pytest.approx(png.mean())


def test_workers_two_gives_the_same_manifest(demo_dataset: Path) -> None:
    options = IngestOptions(
        train_images=str(demo_dataset / "train" / "images"),
        test_images=str(demo_dataset / "test" / "images"),
        train_masks=str(demo_dataset / "train" / "masks"),
    )
    one, one_summary = ingest(options, workers=1)
    two, two_summary = ingest(options, workers=2)
    pd.testing.assert_frame_equal(one, two)
    assert one_summary == two_summary


# --------------------------------------------------------------------------- skipped files


def test_non_image_files_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _folder_dataset(tmp_path)
    images = Path(data["options"].train_images)
    (images / "README.txt").write_text("about this data")
    (images / ".DS_Store").write_bytes(b"\0\1")
    (images / ".hidden.png").write_bytes(b"")  # hidden files are skipped even with image names
    (images / "subfolder").mkdir()
    with caplog.at_level(logging.WARNING, logger="segflow.data.ingest"):
        manifest, summary = ingest(data["options"])
    assert "README" not in manifest["id"].tolist()
    assert summary["n_train"] == 4
    skipped = summary["skipped_files"]["train"]
    assert skipped["count"] == 4
    assert sorted(skipped["examples"]) == [".DS_Store", ".hidden.png", "README.txt", "subfolder"]
    assert summary["skipped_files"]["test"] == {"count": 0, "examples": []}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 4" in r.getMessage() and str(images) in r.getMessage() for r in warnings)


# --------------------------------------------------------------------------- errors


def test_unreadable_image(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    bad = data["paths"]["b"]
    bad.write_bytes(np.random.default_rng(1).bytes(300))
    _raises(data["options"], str(bad.resolve()), "not a readable image")


def test_zero_byte_image(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    bad = data["paths"]["t1"]
    bad.write_bytes(b"")
    _raises(data["options"], str(bad.resolve()), "0 bytes")


def test_text_file_named_png(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    bad = data["paths"]["a"]
    bad.write_text("hello\n")
    _raises(data["options"], str(bad.resolve()))


def test_unreadable_mask(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    bad = data["mask_paths"]["a"]
    bad.write_bytes(b"\x89PNG garbage")
    _raises(data["options"], str(bad.resolve()), "not a readable mask")


def test_mask_missing_for_an_image(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    data["mask_paths"]["c"].unlink()
    message = _raises(data["options"], str(data["paths"]["c"]), "has no mask")
    assert str(Path(data["options"].train_masks) / "c_mask") in message


def test_mask_without_image(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    orphan = _write(Path(data["options"].train_masks) / "zz_mask.png", _mask(6, 9, 0))
    _raises(data["options"], str(orphan), "has no train image")


def test_mask_of_different_size(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    mask_path = data["mask_paths"]["b"]
    _write(mask_path, _mask(9, 6, 0) * 255)  # transposed size
    _raises(data["options"], str(mask_path.resolve()), "6x9", "9x6", str(data["paths"]["b"].name))


def test_mask_with_three_values(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    mask = _mask(6, 9, 0) * 255
    mask[0, 1] = 7
    mask_path = _write(data["mask_paths"]["a"], mask)
    _raises(data["options"], str(mask_path.resolve()), "distinct values")


def test_rle_past_the_image_names_row_and_id(tmp_path: Path) -> None:
    csv = _rle_dataset(tmp_path, [("a", "1 1"), ("b", "18 4"), ("c", ""), ("d", "")])
    _raises(_rle_options(tmp_path), str(csv), "row 3", "id 'b'", "past the 5x4 image")


def test_rle_row_numbers_count_blank_lines(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [], ids=("a", "b"))
    csv = tmp_path / "train.csv"
    csv.write_text("id,rle_mask\na,1 1\n\nb,1 2 3\n")  # the bad row is line 4
    _raises(_rle_options(tmp_path), "row 4", "id 'b'", "odd number")


@pytest.mark.parametrize(
    ("rle", "fragment"),
    [("1 2 3", "odd number"), ("1 x", "'x' is not an integer"), ("3 2 4 1", "overlap")],
)
def test_malformed_rle_names_row_and_id(tmp_path: Path, rle: str, fragment: str) -> None:
    csv = _rle_dataset(tmp_path, [("a", ""), ("b", ""), ("c", ""), ("d", rle)])
    _raises(_rle_options(tmp_path), str(csv), "row 5", "id 'd'", fragment)


def test_rle_csv_missing_column_names_available_columns(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", "")], ids=("a",))
    csv = tmp_path / "train.csv"
    csv.write_text("ImageId,EncodedPixels\na,\n")
    _raises(
        _rle_options(tmp_path), str(csv), "'id'", "ImageId, EncodedPixels", "data.rle_id_column"
    )
    _raises(
        _rle_options(tmp_path, rle_id_column="ImageId"),
        "'rle_mask'",
        "ImageId, EncodedPixels",
    )


def test_rle_csv_id_without_image(tmp_path: Path) -> None:
    csv = _rle_dataset(tmp_path, [("a", ""), ("ghost", "1 1")], ids=("a",))
    _raises(_rle_options(tmp_path), str(csv), "row 3", "'ghost'", "no train image")


def test_rle_csv_image_without_row(tmp_path: Path) -> None:
    csv = _rle_dataset(tmp_path, [("a", "")], ids=("a", "b"))
    _raises(_rle_options(tmp_path), "b.png", str(csv), "no row")


def test_rle_csv_missing_file(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", "")], ids=("a",))
    (tmp_path / "train.csv").unlink()
    _raises(_rle_options(tmp_path), "train.csv", "data.rle_csv")
    _raises(
        IngestOptions(train_images=str(tmp_path / "images"), mask_source="rle_csv"), "data.rle_csv"
    )


def test_rle_csv_empty_id(tmp_path: Path) -> None:
    _rle_dataset(tmp_path, [("a", ""), ("  ", "1 1")], ids=("a",))
    _raises(_rle_options(tmp_path), "row 3", "empty id")


def test_duplicate_ids_in_one_folder(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    _write(Path(data["options"].train_images) / "a.jpg", _image(6, 9, 0))
    _raises(data["options"], "duplicate id 'a'", "a.jpg", "a.png")


def test_same_id_in_train_and_test(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    _write(Path(data["options"].test_images) / "b.png", _image(6, 9, 0))
    _raises(data["options"], "'b'", "both train and test")


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("nothing here")
    (tmp_path / "masks").mkdir()
    options = IngestOptions(
        train_images=str(tmp_path / "images"), train_masks=str(tmp_path / "masks")
    )
    _raises(options, str(tmp_path / "images"), "contains no images")


def test_empty_test_folder(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    for path in Path(data["options"].test_images).iterdir():
        path.unlink()
    _raises(data["options"], data["options"].test_images, "contains no images")


@pytest.mark.parametrize("field", ["train_images", "train_masks", "test_images"])
def test_missing_folder(tmp_path: Path, field: str) -> None:
    data = _folder_dataset(tmp_path)
    missing = str(tmp_path / "does-not-exist")
    options = dataclasses.replace(data["options"], **{field: missing})
    _raises(options, missing, "does not exist")


def test_option_errors(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    _raises(IngestOptions(), "data.train_images")
    _raises(dataclasses.replace(data["options"], train_images=""), "data.train_images")
    _raises(dataclasses.replace(data["options"], mask_source="json"), "data.mask_source", "'json'")
    _raises(dataclasses.replace(data["options"], rle_order="diagonal"), "data.rle_order")
    _raises(dataclasses.replace(data["options"], train_masks=None), "data.train_masks")


def test_max_pixels_option_is_applied(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path)
    _raises(dataclasses.replace(data["options"], max_pixels=50), "data.max_pixels", "9x6")


# --------------------------------------------------------------------------- CLI


def _cli_args(options: IngestOptions, out: Path) -> list[str]:
    args = ["ingest", "--out-manifest", str(out / "manifest.parquet")]
    args += ["--out-summary", str(out / "summary.json")]
    for field in ("train_images", "train_masks", "test_images", "mask_suffix"):
        value = getattr(options, field)
        if value:
            args += ["--" + field.replace("_", "-"), value]
    return args


@pytest.mark.parametrize("problem", ["zero-byte image", "missing folder"])
def test_cli_error_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    data = _folder_dataset(tmp_path / "data")
    options = data["options"]
    if problem == "zero-byte image":
        data["paths"]["b"].write_bytes(b"")
        culprit = str(data["paths"]["b"].resolve())
    else:
        culprit = str(tmp_path / "nowhere")
        options = dataclasses.replace(options, train_images=culprit)
    out = tmp_path / "out"
    status = cli.main(_cli_args(options, out))
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("segflow ingest: error: ")
    assert culprit in lines[0]
    assert "Traceback" not in captured.err
    assert not (out / "manifest.parquet").exists()
    assert not (out / "summary.json").exists()
    assert not out.exists() or not any(out.iterdir())  # no temporary leftovers either


def test_cli_good_run_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder_dataset(tmp_path / "data")
    out = tmp_path / "out"
    status = cli.main(_cli_args(data["options"], out))
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "error" not in captured.err
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["id"].tolist() == ["a", "b", "c", "d", "t1", "t2"]
    assert list(manifest.columns) == MANIFEST_COLUMNS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 4
    assert summary["n_test"] == 2
