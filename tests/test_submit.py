"""Submission CSV: exact RLE round trip, instance rows, and labels copied from train duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from segflow.cli import main
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.ingest import IngestOptions, ingest
from segflow.formats.rle import rle_decode
from segflow.model.postprocess import tune_classes
from segflow.model.submit import (
    SubmissionOptions,
    known_test_labels,
    submission_frame,
    write_submission,
    written_ids,
)


def random_masks(count: int, shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = {f"id{index:03d}": (rng.random(shape) < 0.3).astype(np.uint8) for index in range(count)}
    masks["id000"][:] = 0  # one empty prediction
    return masks


@pytest.mark.parametrize(("order", "start"), [("column", 1), ("row", 1), ("column", 0)])
def test_written_csv_decodes_back_to_every_mask(tmp_path: Path, order: str, start: int) -> None:
    masks = random_masks(12, (7, 5), seed=1)
    options = SubmissionOptions(rle_order=order, rle_start=start)
    write_submission(tmp_path / "submission.csv", submission_frame(masks, options))
    written = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert list(written.columns) == ["id", "rle_mask"]
    assert written["id"].tolist() == sorted(masks)
    for row in written.itertuples():
        decoded = rle_decode(row.rle_mask, (7, 5), order=order, start=start)
        np.testing.assert_array_equal(decoded, masks[row.id])
    assert written.loc[written["id"] == "id000", "rle_mask"].item() == ""


def test_column_names_and_empty_spelling_are_configurable() -> None:
    frame = submission_frame(
        {"a": np.zeros((3, 3), np.uint8)},
        SubmissionOptions(id_column="ImageId", rle_column="EncodedPixels", empty_rle="-1"),
    )
    assert frame.to_dict("records") == [{"ImageId": "a", "EncodedPixels": "-1"}]


def test_instances_give_one_row_each_in_kaggle_order() -> None:
    first = np.zeros((4, 4), np.uint8)
    first[0:2, 0] = 1  # column-major pixels 1, 2
    second = np.zeros((4, 4), np.uint8)
    second[3, 3] = 1  # pixel 16
    frame = submission_frame({"img": [first, second], "none": []}, SubmissionOptions())
    assert frame.values.tolist() == [["img", "1 2"], ["img", "16 1"], ["none", ""]]


def test_known_labels_replace_predictions_only_when_enabled() -> None:
    predicted = {"t1": np.zeros((2, 2), np.uint8)}
    label = {"t1": np.ones((2, 2), np.uint8)}
    on = submission_frame(predicted, SubmissionOptions(), known_labels=label)
    off = submission_frame(
        predicted, SubmissionOptions(copy_train_labels=False), known_labels=label
    )
    assert on["rle_mask"].item() == "1 4" and off["rle_mask"].item() == ""


def test_train_test_copies_get_the_train_mask(
    demo_dataset: Path, demo_manifest: pd.DataFrame
) -> None:
    truth = json.loads((demo_dataset / "planted_duplicates.json").read_text())
    items, _ = find_duplicates(demo_manifest, DedupOptions())
    labels = known_test_labels(demo_manifest, items)
    assert set(labels) == {test_id for _, test_id in truth["train_test_copies"]}
    for train_id, test_id in truth["train_test_copies"]:
        png = cv2.imread(
            str(demo_dataset / "train" / "masks" / f"{train_id}.png"), cv2.IMREAD_UNCHANGED
        )
        np.testing.assert_array_equal(labels[test_id], (png > 0).astype(np.uint8))


def test_union_policy_label_is_the_union_of_the_group(demo_manifest: pd.DataFrame) -> None:
    manifest = demo_manifest.copy()
    non_empty = manifest[(manifest["split"] == "train") & (manifest["mask_coverage"] > 0)]
    train = non_empty.drop_duplicates("mask_md5").iloc[:2]
    test_row = manifest[manifest["split"] == "test"].iloc[[0]].copy()
    test_row["md5_pixels"] = train["md5_pixels"].iloc[0]
    manifest.loc[train.index[1], "md5_pixels"] = train["md5_pixels"].iloc[0]  # conflicting pair
    manifest.loc[test_row.index, "md5_pixels"] = test_row["md5_pixels"]
    items, _ = find_duplicates(manifest, DedupOptions(conflict_policy="union"))
    label = known_test_labels(manifest, items)[test_row["id"].item()]
    masks = [cv2.imread(path, cv2.IMREAD_UNCHANGED) > 0 for path in train["mask_path"]]
    assert not np.array_equal(masks[0], masks[1])  # a real conflict, so the union is not trivial
    assert items.set_index("id").loc[train["id"], "train_action"].eq("union").all()
    np.testing.assert_array_equal(label, (masks[0] | masks[1]).astype(np.uint8))


def test_instance_masks_split_objects_and_touching_ones_on_request() -> None:
    from segflow.model.submit import instance_masks

    mask = np.zeros((40, 60), np.uint8)
    mask[2:6, 2:6] = 1  # a small square, separate
    yy, xx = np.mgrid[:40, :60]
    discs = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 64) | ((yy - 20) ** 2 + (xx - 34) ** 2 <= 64)
    mask[discs] = 1  # two discs joined by a neck
    plain = instance_masks(mask)
    split = instance_masks(mask, split_touching=True)
    assert len(plain) == 2 and len(split) == 3
    for parts in (plain, split):
        np.testing.assert_array_equal(np.sum(parts, axis=0), mask)  # a partition of the mask
    frame = submission_frame({"img": split}, SubmissionOptions(instances=True))
    assert len(frame) == 3
    union = np.zeros_like(mask)
    for rle in frame["rle_mask"]:
        union |= rle_decode(rle, mask.shape)
    np.testing.assert_array_equal(union, mask)


def test_multilabel_rows_per_class_decode_back_and_known_labels_unpack() -> None:
    masks = random_masks(3, (6, 5), seed=2)
    stacks = {key: np.stack([m, 1 - m]) for key, m in masks.items()}  # class b = not class a
    known = {"id001": np.full((6, 5), 0b10, np.uint8)}  # a copied train label: only class b
    frame = submission_frame(stacks, SubmissionOptions(), known, classes=["a", "b"])
    assert list(frame.columns) == ["id", "class", "rle_mask"]
    assert frame[["id", "class"]].values.tolist() == [
        [i, c] for i in sorted(masks) for c in ("a", "b")
    ]
    for row in frame.itertuples():
        decoded = rle_decode(row.rle_mask, (6, 5))
        if row.id == "id001":
            expected = np.zeros((6, 5)) if row._2 == "a" else np.ones((6, 5))
        else:
            expected = stacks[row.id][0 if row._2 == "a" else 1]
        np.testing.assert_array_equal(decoded, expected)
    instances = submission_frame(
        {"x": np.stack([np.eye(4, dtype=np.uint8), np.zeros((4, 4), np.uint8)])},
        SubmissionOptions(instances=True, class_column="ClassId"),
        classes=["1", "2"],
    )
    # The diagonal is one 8-connected object; the empty class still gets its row.
    assert instances.values.tolist() == [["x", "1", "1 1 6 1 11 1 16 1"], ["x", "2", ""]]
    with pytest.raises(SegflowError, match="has 1 classes, not 2"):
        submission_frame(
            {"x": np.zeros((1, 4, 4), np.uint8)}, SubmissionOptions(), classes=["a", "b"]
        )


# --------------------------------------------------------------------------- ids with extension

TEST_FILES = ("004f40c73.jpg", "006f39c41.png")


def _filename_keyed_data(root: Path) -> pd.DataFrame:
    """Ingest JPEG/PNG images whose train CSV keys rows by file name (Severstal, Airbus)."""
    rng = np.random.default_rng(0)
    for folder, names in (("train", ("0002cc93b.jpg", "00031f466.jpg")), ("test", TEST_FILES)):
        (root / folder).mkdir(parents=True)
        for name in names:
            cv2.imwrite(str(root / folder / name), rng.integers(0, 256, (6, 5), dtype=np.uint8))
    (root / "train.csv").write_text("ImageId,EncodedPixels\n0002cc93b.jpg,1 3\n00031f466.jpg,\n")
    manifest, _ = ingest(
        IngestOptions(
            train_images=str(root / "train"),
            test_images=str(root / "test"),
            mask_source="rle_csv",
            rle_csv=str(root / "train.csv"),
            rle_id_column="ImageId",
            rle_column="EncodedPixels",
        )
    )
    return manifest


def _stem_keyed_csv(root: Path) -> dict:
    """Options of the same train images with a CSV keyed by stem (TGS)."""
    (root / "stems.csv").write_text("id,rle_mask\n0002cc93b,1 3\n00031f466,\n")
    return {"mask_source": "rle_csv", "rle_csv": str(root / "stems.csv")}


def test_ids_are_written_as_the_train_csv_wrote_them(tmp_path: Path) -> None:
    manifest = _filename_keyed_data(tmp_path)
    ids = ["004f40c73", "006f39c41"]
    assert written_ids(manifest, ids) == dict(zip(ids, TEST_FILES, strict=True))
    assert written_ids(manifest, ids, "stem") == {i: i for i in ids}
    masks = {item_id: np.eye(6, 5, dtype=np.uint8) for item_id in ids}
    options = SubmissionOptions(id_column="ImageId", rle_column="EncodedPixels")
    frame = submission_frame(masks, options, id_names=written_ids(manifest, ids))
    assert frame["ImageId"].tolist() == list(TEST_FILES)
    assert (frame["EncodedPixels"] == "1 1 8 1 15 1 22 1 29 1").all()
    stems, _ = ingest(
        IngestOptions(train_images=str(tmp_path / "train"), **_stem_keyed_csv(tmp_path))
    )
    assert written_ids(stems, ["0002cc93b"]) == {"0002cc93b": "0002cc93b"}
    assert written_ids(stems, ["0002cc93b"], "filename") == {"0002cc93b": "0002cc93b.jpg"}
    with pytest.raises(SegflowError, match=r"unknown submission\.id_style 'name'"):
        written_ids(manifest, ids, "name")
    with pytest.raises(SegflowError, match="id 'ghost' is not in the manifest"):
        written_ids(manifest, ["ghost"], "filename")


def test_submit_writes_file_name_ids(tmp_path: Path) -> None:
    manifest = _filename_keyed_data(tmp_path / "data")
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    items, _ = find_duplicates(manifest, DedupOptions())
    items.to_parquet(tmp_path / "items.parquet", index=False)
    fold = tmp_path / "fold0"
    fold.mkdir()
    pd.DataFrame({"id": ["004f40c73", "006f39c41"]}).to_csv(fold / "ids.csv", index=False)
    np.save(fold / "probs.npy", np.ones((2, 1, 6, 5), np.float16))
    ones = np.ones((1, 1, 6, 5), np.float32)
    _, _, params = tune_classes(ones, ones[:, 0].astype(np.uint8), ["mask"], [0.5], [0])
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "stats.json").write_text(json.dumps({"classes": ["mask"]}))
    argv = ["submit", "--fold-dirs", str(fold), "--postprocess", str(tmp_path / "params.json")]
    argv += ["--stats", str(tmp_path / "stats.json"), "--id-column", "ImageId"]
    argv += ["--manifest", str(tmp_path / "manifest.parquet")]
    argv += ["--test-manifest", str(tmp_path / "manifest.parquet")]
    argv += ["--leaks", str(tmp_path / "items.parquet")]
    for style, expected in (("auto", list(TEST_FILES)), ("stem", ["004f40c73", "006f39c41"])):
        out = tmp_path / f"{style}.csv"
        assert main([*argv, "--id-style", style, "--out", str(out)]) == 0
        written = pd.read_csv(out, dtype=str)
        assert written["ImageId"].tolist() == expected
        assert (written["rle_mask"] == "1 30").all()
