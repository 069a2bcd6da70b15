"""Tests for duplicate detection (segflow.data.dedup).

Expected values come from hand counts on small hand-built manifests, from files written here with
cv2, from the demo generator's planted truth, or from hashlib run on the files independently.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import write_label_dataset

from segflow.core.errors import SegflowError
from segflow.data.dedup import (
    CONFLICT_POLICIES,
    DedupOptions,
    NearDuplicateOptions,
    find_duplicates,
    near_duplicate_pairs,
    near_fold_groups,
    summary_markdown,
)
from segflow.data.ingest import IngestOptions, ingest
from segflow.data.preprocess import PreprocessOptions, preprocess
from segflow.formats.imageio import perceptual_hash
from segflow.formats.labels import read_label, unpack_labels

# --------------------------------------------------------------------------- helpers


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _manifest(rows: list[tuple[str, str, str, str, str | None]]) -> pd.DataFrame:
    """Manifest from (id, split, bytes key, pixels key, mask key) rows; keys are hashed."""
    return pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "md5_bytes": [_md5("bytes:" + r[2]) for r in rows],
            "md5_pixels": [_md5("pixels:" + r[3]) for r in rows],
            "mask_md5": [None if r[4] is None else _md5("mask:" + r[4]) for r in rows],
            "image_path": [f"/nonexistent/{r[0]}.png" for r in rows],
        }
    )


def _by_id(items: pd.DataFrame) -> pd.DataFrame:
    return items.set_index("id")


def _groups(items: pd.DataFrame, column: str = "exact_group") -> set[frozenset[str]]:
    """The id sets of all groups with more than one member."""
    return {
        frozenset(ids) for ids in items.groupby(column)["id"].agg(list).tolist() if len(ids) > 1
    }


def _png(image: np.ndarray, level: int = 3) -> bytes:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, level])
    assert ok
    return buf.tobytes()


def _texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A smooth, mid-grey random texture (uint8): structure for pHash, no clipping."""
    image = cv2.resize(
        rng.standard_normal((8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    image += 0.3 * cv2.resize(
        rng.standard_normal((16, 16)).astype(np.float32),
        (size, size),
        interpolation=cv2.INTER_CUBIC,
    )
    image = (image - image.mean()) / image.std() * 30 + 128
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_dataset(
    root: Path,
    train: dict[str, tuple[bytes, np.ndarray]],
    test: dict[str, bytes] | None = None,
) -> IngestOptions:
    """Write train PNG bytes + masks and test PNG bytes; return the ingest options."""
    for sub in ("train/images", "train/masks", "test/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for item_id, (data, mask) in train.items():
        (root / "train/images" / f"{item_id}.png").write_bytes(data)
        (root / "train/masks" / f"{item_id}.png").write_bytes(_png(mask * 255))
    for item_id, data in (test or {}).items():
        (root / "test/images" / f"{item_id}.png").write_bytes(data)
    return IngestOptions(
        train_images=str(root / "train/images"),
        test_images=str(root / "test/images") if test else None,
        train_masks=str(root / "train/masks"),
    )


def _hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


# --------------------------------------------------------------------------- grouping from files


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict]:
    """Ingested files covering every kind of exact match (and non-match)."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("encoded")
    base = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    other = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    colour = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    near = base.copy()
    near[0, 0] ^= 1  # one pixel, one bit: a different picture
    mask = np.zeros((20, 24), np.uint8)
    mask[2:9, 3:11] = 1
    empty = np.zeros_like(mask)
    data = {
        "base_l3": _png(base, 3),
        "base_l0": _png(base, 0),
        "base_l9": _png(base, 9),
        "gray_1ch": _png(gray),
        "gray_3ch": _png(cv2.merge([gray, gray, gray])),
    }
    train = {
        "a1": (data["base_l3"], mask),
        "a2": (data["base_l3"], mask),  # byte copy of a1
        "b1": (data["base_l0"], mask),  # same pixels as a*, other compression
        "g1": (data["gray_1ch"], empty),
        "u1": (_png(other), empty),
        "u2": (_png(near), mask),
        "c1": (_png(colour), empty),
    }
    test = {
        "t_gray": data["gray_3ch"],  # same picture as g1, stored as RGB with equal channels
        "t_l9": data["base_l9"],
        "t_colour_bgr": _png(colour[:, :, ::-1]),  # channels swapped: another picture
    }
    manifest, _ = ingest(_write_dataset(root, train, test))
    return manifest, data


def test_png_variants_really_differ_in_bytes(encoded: tuple[pd.DataFrame, dict]) -> None:
    _, data = encoded
    assert len({data["base_l3"], data["base_l0"], data["base_l9"]}) == 3
    assert data["gray_1ch"] != data["gray_3ch"]
    decoded_gray = cv2.imdecode(np.frombuffer(data["gray_3ch"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded_gray.ndim == 3 and decoded_gray.shape[2] == 3


def test_grouping_from_real_files(encoded: tuple[pd.DataFrame, dict]) -> None:
    manifest, _ = encoded
    items, _ = find_duplicates(manifest, DedupOptions())
    assert len(items) == len(manifest)
    assert _groups(items) == {frozenset({"a1", "a2", "b1", "t_l9"}), frozenset({"g1", "t_gray"})}
    by_id = _by_id(items)
    for item_id in ("u1", "u2", "c1", "t_colour_bgr"):
        assert by_id.loc[item_id, "match"] == "unique"
        assert by_id.loc[item_id, "group_size"] == 1
    # a1/a2 share bytes, but b1 and t_l9 only share pixels: the group is a pixel match.
    assert set(by_id.loc[["a1", "a2", "b1", "t_l9"], "match"]) == {"pixels"}
    assert set(by_id.loc[["g1", "t_gray"], "match"]) == {"pixels"}
    assert by_id.loc["a1", "group_size"] == 4
    assert by_id.loc["a1", "group_n_train"] == 3
    assert by_id.loc["a1", "group_n_test"] == 1


def test_byte_identical_files_match_as_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    data = _png(image)
    mask = np.zeros((9, 13), np.uint8)
    options = _write_dataset(
        tmp_path,
        {"x": (data, mask), "y": (data, mask), "z": (_png(image[::-1].copy()), mask)},
        {"w": data},
    )
    manifest, _ = ingest(options)
    items, summary = find_duplicates(manifest, DedupOptions())
    by_id = _by_id(items)
    assert _groups(items) == {frozenset({"x", "y", "w"})}
    assert set(by_id.loc[["x", "y", "w"], "match"]) == {"bytes"}
    assert by_id.loc["z", "match"] == "unique"
    assert summary["groups_pixel_equal_bytes_different"] == 0
    assert by_id.loc["w", "leak_train_ids"] == "x;y"


# --------------------------------------------------------------------------- synthetic manifests


def test_representative_and_leaks() -> None:
    manifest = _manifest(
        [
            # Deliberately unsorted, test rows first: order must come from split and id.
            ("t9", "test", "A", "A", None),
            ("r3", "train", "A", "A", "m"),
            ("r1", "train", "A", "A", "m"),
            ("r2", "train", "A", "A", "m"),
            ("s2", "test", "B", "B", None),
            ("s1", "test", "B2", "B", None),
            ("t1", "test", "C", "C", None),
            ("q1", "train", "C", "C", "m"),
            ("lone", "test", "D", "D", None),
        ]
    )
    items, _ = find_duplicates(manifest, DedupOptions())
    by_id = _by_id(items)
    representatives = set(items.loc[items["is_representative"], "id"])
    # First train member by id; a test-only group's first test member; singletons are their own.
    assert representatives == {"r1", "s1", "q1", "lone"}
    assert by_id.loc["t9", "leak_train_ids"] == "r1;r2;r3"
    assert by_id.loc["t1", "leak_train_ids"] == "q1"
    assert pd.isna(by_id.loc["s1", "leak_train_ids"])
    assert pd.isna(by_id.loc["s2", "leak_train_ids"])
    assert pd.isna(by_id.loc["lone", "leak_train_ids"])
    # Train rows never carry leak ids; test rows never carry a train action.
    assert items.loc[items["split"] == "train", "leak_train_ids"].isna().all()
    assert items.loc[items["split"] == "test", "train_action"].isna().all()
    assert not items.loc[items["split"] == "test", "use_for_training"].any()
    assert by_id.loc["s1", "match"] == "pixels"
    assert by_id.loc["t1", "match"] == "bytes"


def _conflict_manifest() -> pd.DataFrame:
    return _manifest(
        [
            # Group P: three agree on mask "x", one says "y" -> strict majority x.
            ("p1", "train", "P", "P", "y"),
            ("p2", "train", "P", "P", "x"),
            ("p3", "train", "P", "P", "x"),
            ("p4", "train", "P", "P", "x"),
            ("pt", "test", "P", "P", None),
            # Group Q: two vs two -> tie.
            ("q1", "train", "Q", "Q", "x"),
            ("q2", "train", "Q", "Q", "y"),
            ("q3", "train", "Q", "Q", "y"),
            ("q4", "train", "Q", "Q", "x"),
            # Group R: masks agree.
            ("r1", "train", "R", "R", "z"),
            ("r2", "train", "R", "R", "z"),
            # Unique.
            ("u1", "train", "U", "U", "x"),
        ]
    )


def test_conflict_policy_drop() -> None:
    items, summary = find_duplicates(_conflict_manifest(), DedupOptions(conflict_policy="drop"))
    by_id = _by_id(items)
    conflicted = ["p1", "p2", "p3", "p4", "q1", "q2", "q3", "q4"]
    assert set(by_id.loc[conflicted, "train_action"]) == {"drop-conflict"}
    assert not by_id.loc[conflicted, "use_for_training"].any()
    assert set(by_id.loc[["r1", "r2", "u1"], "train_action"]) == {"keep"}
    assert by_id.loc[["r1", "r2", "u1"], "use_for_training"].all()
    assert bool(by_id.loc["p1", "masks_agree"]) is False
    assert bool(by_id.loc["r1", "masks_agree"]) is True
    assert pd.isna(by_id.loc["u1", "masks_agree"])
    assert pd.isna(by_id.loc["pt", "leak_train_ids"])  # no trustworthy label to leak
    assert summary["conflicting_groups"] == 2
    assert summary["conflicting_members"] == 8
    assert summary["train_actions"] == {"drop-conflict": 8, "keep": 3}
    assert summary["n_train_used"] == 3


def test_conflict_policy_majority() -> None:
    items, summary = find_duplicates(_conflict_manifest(), DedupOptions(conflict_policy="majority"))
    by_id = _by_id(items)
    assert by_id.loc["p1", "train_action"] == "drop-minority"
    assert set(by_id.loc[["p2", "p3", "p4"], "train_action"]) == {"keep"}
    assert set(by_id.loc[["q1", "q2", "q3", "q4"], "train_action"]) == {"drop-tie"}
    used = set(items.loc[items["use_for_training"], "id"])
    assert used == {"p2", "p3", "p4", "r1", "r2", "u1"}
    assert by_id.loc["pt", "leak_train_ids"] == "p2;p3;p4"
    assert summary["train_actions"] == {"keep": 6, "drop-tie": 4, "drop-minority": 1}
    # Conflicts are still reported as conflicts, whatever the policy does with them.
    assert summary["conflicting_groups"] == 2


def test_conflict_policy_majority_two_versus_one() -> None:
    manifest = _manifest(
        [
            ("a", "train", "G", "G", "x"),
            ("b", "train", "G", "G", "y"),
            ("c", "train", "G", "G", "y"),
            ("d", "train", "H", "H", "x"),
            ("e", "train", "H", "H", "y"),
        ]
    )
    items, _ = find_duplicates(manifest, DedupOptions(conflict_policy="majority"))
    actions = _by_id(items)["train_action"].to_dict()
    assert actions == {
        "a": "drop-minority",
        "b": "keep",
        "c": "keep",
        "d": "drop-tie",
        "e": "drop-tie",
    }


def test_conflict_policy_union() -> None:
    items, summary = find_duplicates(_conflict_manifest(), DedupOptions(conflict_policy="union"))
    by_id = _by_id(items)
    conflicted = ["p1", "p2", "p3", "p4", "q1", "q2", "q3", "q4"]
    assert set(by_id.loc[conflicted, "train_action"]) == {"union"}
    assert by_id.loc[conflicted, "use_for_training"].all()
    assert set(by_id.loc[["r1", "r2", "u1"], "train_action"]) == {"keep"}
    assert summary["n_train_used"] == 11
    assert by_id.loc["pt", "leak_train_ids"] == "p1;p2;p3;p4"


def _multilabel_copies(root: Path) -> IngestOptions:
    """Three copies of one picture (2 classes): s1/s2 carry the same label; x has the same
    pixels as s1 but in the other class, so only the class tells them apart."""
    picture = np.random.default_rng(7).integers(0, 256, (6, 5), dtype=np.uint8)
    region = np.zeros((6, 5), np.uint8)
    region[1:4, 1:3] = 1
    other = np.zeros((6, 5), np.uint8)
    other[4:, :] = 1
    label = np.stack([region, other])
    swapped = np.stack([other, region])
    train = {"s1": (picture, label), "s2": (picture, label.copy()), "x": (picture, swapped)}
    return write_label_dataset(root, train, ("left", "right"), "rle_csv")


def test_multilabel_conflicts_are_decided_by_class_too(tmp_path: Path) -> None:
    manifest, _ = ingest(_multilabel_copies(tmp_path))
    by_id = manifest.set_index("id")
    assert by_id.loc["s1", "mask_coverage"] == by_id.loc["x", "mask_coverage"]
    assert by_id.loc["s1", "mask_md5"] == by_id.loc["s2", "mask_md5"] != by_id.loc["x", "mask_md5"]
    items, summary = find_duplicates(manifest, DedupOptions(conflict_policy="majority"))
    actions = _by_id(items)["train_action"].to_dict()
    assert actions == {"s1": "keep", "s2": "keep", "x": "drop-minority"}
    assert summary["conflicting_groups"] == 1


def test_multilabel_union_policy_unions_each_class(tmp_path: Path) -> None:
    manifest, _ = ingest(_multilabel_copies(tmp_path / "data"))
    items, _ = find_duplicates(manifest, DedupOptions(conflict_policy="union"))
    assert set(_by_id(items)["train_action"]) == {"union"}
    preprocess(manifest, items, PreprocessOptions(), tmp_path / "out")
    masks = np.load(tmp_path / "out/train_masks.npy")
    rows = manifest.set_index("id")
    planes = {
        item_id: unpack_labels(read_label(None, rows.loc[item_id, "mask_rle"], (6, 5), 2, ""), 2)
        for item_id in ("s1", "x")
    }
    union = planes["s1"] | planes["x"]
    assert union[0].sum() > planes["s1"][0].sum()  # the union really adds pixels to a class
    assert masks.shape == (3, 6, 5)
    for row in range(3):
        np.testing.assert_array_equal(unpack_labels(masks[row], 2), union)


@pytest.mark.parametrize(
    ("policy", "expected_used"),
    [
        # drop: P and Q are dropped entirely; R keeps its first member.
        ("drop", {"r1", "u1"}),
        # majority: P's first *kept* member is p2 (p1 is the minority); Q is a tie.
        ("majority", {"p2", "r1", "u1"}),
        ("union", {"p1", "q1", "r1", "u1"}),
    ],
)
def test_train_members_representative(policy: str, expected_used: set[str]) -> None:
    items, summary = find_duplicates(
        _conflict_manifest(), DedupOptions(conflict_policy=policy, train_members="representative")
    )
    used = set(items.loc[items["use_for_training"], "id"])
    assert used == expected_used
    by_id = _by_id(items)
    assert by_id.loc["r2", "train_action"] == "drop-duplicate"
    assert summary["n_train_used"] == len(expected_used)
    if policy == "union":
        assert by_id.loc["p1", "train_action"] == "union"
        assert set(by_id.loc[["p2", "p3", "p4"], "train_action"]) == {"drop-duplicate"}


@pytest.mark.parametrize(
    "options",
    [DedupOptions(conflict_policy="vote"), DedupOptions(train_members="first")],
)
def test_invalid_policy_lists_valid_names(options: DedupOptions) -> None:
    with pytest.raises(SegflowError) as error:
        find_duplicates(_conflict_manifest(), options)
    message = str(error.value)
    if options.conflict_policy == "vote":
        assert "conflict_policy" in message and "'vote'" in message
        for name in CONFLICT_POLICIES:
            assert name in message
    else:
        assert "train_members" in message and "'first'" in message
        assert "all" in message and "representative" in message


def _summary_manifest() -> pd.DataFrame:
    return _manifest(
        [
            # G1: three byte-identical train copies, masks agree.
            ("t1", "train", "G1", "G1", "m1"),
            ("t2", "train", "G1", "G1", "m1"),
            ("t3", "train", "G1", "G1", "m1"),
            # G2: two test copies only.
            ("s1", "test", "G2", "G2", None),
            ("s2", "test", "G2", "G2", None),
            # G3: one train + two test copies.
            ("t4", "train", "G3", "G3", "m3"),
            ("s3", "test", "G3", "G3", None),
            ("s4", "test", "G3", "G3", None),
            # G4: two train copies, same pixels, different bytes, conflicting masks.
            ("t5", "train", "G4a", "G4", "m4"),
            ("t6", "train", "G4b", "G4", "m5"),
            # Unique items.
            ("t7", "train", "U1", "U1", "m6"),
            ("s5", "test", "U2", "U2", None),
        ]
    )


def test_summary_counts_by_hand() -> None:
    _, summary = find_duplicates(_summary_manifest(), DedupOptions())
    assert summary["n_items"] == 12
    assert summary["n_groups"] == 4
    assert summary["n_members"] == 10
    assert summary["groups_with_train_duplicates"] == 2  # G1, G4
    assert summary["train_items_in_train_duplicates"] == 5
    assert summary["groups_with_test_duplicates"] == 2  # G2, G3
    assert summary["test_items_in_test_duplicates"] == 4
    assert summary["groups_across_train_test"] == 1  # G3
    assert summary["groups_pixel_equal_bytes_different"] == 1  # G4
    assert summary["conflicting_groups"] == 1
    assert summary["conflicting_members"] == 2
    assert summary["train_actions"] == {"keep": 5, "drop-conflict": 2}
    assert summary["n_train_used"] == 5
    assert summary["test_items_with_train_label"] == 2  # s3, s4
    assert "near_duplicates" not in summary  # the folds stage's (near_fold_groups)
    largest = [
        (g["representative"], g["size"], g["n_train"], g["n_test"], g["match"])
        for g in summary["largest_groups"]
    ]
    assert largest == [
        ("t1", 3, 3, 0, "bytes"),
        ("t4", 3, 1, 2, "bytes"),
        ("s1", 2, 0, 2, "bytes"),
        ("t5", 2, 2, 0, "pixels"),
    ]
    json.dumps(summary)  # plain JSON types only

    markdown = summary_markdown(summary)
    assert "- items: 12" in markdown
    assert "duplicate groups: 4 with 10 members" in markdown
    assert "several train copies: 2 groups, 5 train items" in markdown
    assert "several test copies: 2 groups, 4 test items" in markdown
    assert "(leaks): 1 groups; 2 test items" in markdown
    assert "same pixels, different bytes: 1" in markdown
    assert "conflicting masks: 1 groups, 2 train items (policy: drop)" in markdown
    assert "train items used: 5" in markdown
    assert "| t5 | 2 | 2 | 0 | pixels |" in markdown
    assert "near-duplicates" not in markdown


def test_no_duplicates_at_all() -> None:
    """A dataset without a single duplicate must still summarise (it used to crash)."""
    manifest = _manifest(
        [
            ("a", "train", "A", "A", "x"),
            ("b", "train", "B", "B", "y"),
            ("c", "test", "C", "C", None),
        ]
    )
    items, summary = find_duplicates(manifest, DedupOptions())
    assert (items["match"] == "unique").all()
    assert items["is_representative"].all()
    assert summary["n_groups"] == 0
    assert summary["groups_with_train_duplicates"] == 0
    assert summary["groups_with_test_duplicates"] == 0
    assert summary["largest_groups"] == []
    assert summary["n_train_used"] == 2
    assert "duplicate groups: 0 with 0 members" in summary_markdown(summary)


def test_train_only_manifest() -> None:
    manifest = _manifest(
        [
            ("a", "train", "A", "A", "x"),
            ("b", "train", "A", "A", "x"),
            ("c", "train", "C", "C", "y"),
        ]
    )
    items, summary = find_duplicates(manifest, DedupOptions())
    assert summary["groups_with_train_duplicates"] == 1
    # The workflow's dedup sees the train set alone: no test counts (the leaks stage has them).
    assert "groups_across_train_test" not in summary
    assert "test_items_with_train_label" not in summary
    markdown = summary_markdown(summary)
    assert "several train copies: 1 groups" in markdown and "test copies" not in markdown
    assert "leaks" not in markdown
    assert items["use_for_training"].all()


# --------------------------------------------------------------------------- near duplicates


def test_perceptual_hash_is_stable_under_small_changes() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(20):
        image = _texture(rng)
        reference = perceptual_hash(image)
        reencoded = cv2.imdecode(np.frombuffer(_png(image, 9), np.uint8), cv2.IMREAD_UNCHANGED)
        assert perceptual_hash(reencoded) == reference
        noise = rng.integers(-3, 4, image.shape)
        noisy = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
        assert _hamming(perceptual_hash(noisy), reference) <= 4
        brighter = np.clip(image.astype(int) + 12, 0, 255).astype(np.uint8)
        assert _hamming(perceptual_hash(brighter), reference) <= 2
        rgb = cv2.merge([image, image, image])
        assert perceptual_hash(rgb) == reference  # gray = equal-channel RGB
        unrelated = _texture(rng)
        assert _hamming(perceptual_hash(unrelated), reference) >= 12


def test_perceptual_hash_is_a_64_bit_int() -> None:
    rng = np.random.default_rng(1)
    values = [perceptual_hash(_texture(rng)) for _ in range(30)]
    assert all(isinstance(v, int) and 0 <= v < 2**64 for v in values)
    # About half of the bits are set (median split of the DCT terms).
    assert 20 <= np.mean([bin(v).count("1") for v in values]) <= 44
    assert len(set(values)) == 30


def _brute_force_pairs(hashes: list[int], max_distance: int) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if _hamming(hashes[i], hashes[j]) <= max_distance
    ]


@pytest.mark.parametrize("seed", range(6))
def test_near_duplicate_pairs_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 80))
    hashes = [int(v) for v in rng.integers(0, 2**63, n, dtype=np.int64)]
    hashes = [h * 2 + int(rng.integers(0, 2)) for h in hashes]  # use the top and bottom bits
    # Plant near copies of random items at distances 0..10, and one exact copy.
    for _ in range(n // 2):
        source, target = rng.integers(0, n, 2)
        flipped = hashes[int(source)]
        for bit in rng.choice(64, size=int(rng.integers(0, 11)), replace=False):
            flipped ^= 1 << int(bit)
        hashes[int(target)] = flipped
    hashes[-1] = hashes[0]
    array = np.array(hashes, dtype=np.uint64)
    for max_distance in (0, 1, 2, 3, 4, 6, 9, 16, 40, 63):
        expected = _brute_force_pairs(hashes, max_distance)
        assert near_duplicate_pairs(array, max_distance) == expected, max_distance
    assert (0, n - 1) in near_duplicate_pairs(array, 0)


def test_near_duplicate_pairs_edge_cases() -> None:
    assert near_duplicate_pairs(np.array([], dtype=np.uint64), 4) == []
    assert near_duplicate_pairs(np.array([7], dtype=np.uint64), 4) == []
    top = np.uint64(1 << 63)
    hashes = np.array([0, top, 2**64 - 1, 2**64 - 1], dtype=np.uint64)
    assert near_duplicate_pairs(hashes, 0) == [(2, 3)]
    assert near_duplicate_pairs(hashes, 1) == [(0, 1), (2, 3)]
    assert near_duplicate_pairs(hashes, 63) == [(0, 1), (1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize("max_distance", [-1, 64, 100])
def test_near_max_distance_out_of_range(max_distance: int) -> None:
    with pytest.raises(SegflowError, match="near_max_distance"):
        near_duplicate_pairs(np.array([1, 2], dtype=np.uint64), max_distance)


def test_near_max_distance_out_of_range_in_find_duplicates(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mask = np.zeros((64, 64), np.uint8)
    options = _write_dataset(
        tmp_path, {"a": (_png(_texture(rng)), mask), "b": (_png(_texture(rng)), mask)}
    )
    manifest, _ = ingest(options)
    items, _ = find_duplicates(manifest, DedupOptions())
    with pytest.raises(SegflowError, match="near_max_distance"):
        near_fold_groups(
            manifest, items, NearDuplicateOptions(near_duplicates=True, near_max_distance=64)
        )


def test_near_duplicates_widen_fold_groups_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    image = _texture(rng)
    noisy = np.clip(image.astype(int) + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
    assert not np.array_equal(noisy, image)
    assert _hamming(perceptual_hash(image), perceptual_hash(noisy)) <= 4
    empty = np.zeros((64, 64), np.uint8)
    full = np.ones((64, 64), np.uint8)
    options = _write_dataset(
        tmp_path,
        {
            "a": (_png(image), empty),
            "a_copy": (_png(image, 9), empty),  # exact (pixel) duplicate of a
            "b_near": (_png(noisy), full),  # near copy of a: different picture and label
            "c": (_png(_texture(rng)), empty),
            "d": (_png(_texture(rng)), empty),
        },
        {"t_near": _png(np.clip(image.astype(int) + 1, 0, 255).astype(np.uint8))},
    )
    manifest, _ = ingest(options)

    items, summary = find_duplicates(manifest, DedupOptions())
    assert "fold_group" not in items.columns and "phash" not in items.columns
    plain, plain_near = near_fold_groups(manifest, items, NearDuplicateOptions())
    assert (plain["fold_group"] == plain["exact_group"]).all()
    assert "phash" not in plain.columns
    assert plain_near == {"enabled": False, "max_distance": 4, "fold_groups_merged": 0}

    groups, near = near_fold_groups(manifest, items, NearDuplicateOptions(near_duplicates=True))
    assert groups["id"].tolist() == items["id"].tolist()
    by_id = _by_id(items)
    group_of = _by_id(groups)
    near_family = ["a", "a_copy", "b_near", "t_near"]
    assert by_id.loc["a", "exact_group"] == by_id.loc["a_copy", "exact_group"]
    assert by_id.loc["b_near", "exact_group"] != by_id.loc["a", "exact_group"]
    assert by_id.loc["t_near", "exact_group"] != by_id.loc["a", "exact_group"]
    assert group_of.loc[near_family, "fold_group"].nunique() == 1
    # The fold group is named after an exact group of its members.
    assert group_of.loc["a", "fold_group"] in set(by_id.loc[near_family, "exact_group"])
    assert group_of.loc["c", "fold_group"] == by_id.loc["c", "exact_group"]
    assert group_of.loc["c", "fold_group"] != group_of.loc["d", "fold_group"]
    assert group_of.loc["c", "fold_group"] != group_of.loc["a", "fold_group"]
    # Near copies never merge labels or change exact-duplicate decisions.
    assert by_id.loc["b_near", "train_action"] == "keep"
    assert pd.isna(by_id.loc["t_near", "leak_train_ids"])
    # phash column: 16 hex digits, equal to perceptual_hash of the decoded file.
    assert group_of.loc["b_near", "phash"] == f"{perceptual_hash(noisy):016x}"
    # Two independent merges (b_near and t_near into a's group).
    assert near == {"enabled": True, "max_distance": 4, "fold_groups_merged": 2}
    assert summary["n_groups"] == 1

    # Distance 0: only identical hashes link, and the near copies are not identical.
    strict, _ = near_fold_groups(
        manifest, items, NearDuplicateOptions(near_duplicates=True, near_max_distance=0)
    )
    strict_by_id = _by_id(strict)
    hashes = {item_id: int(strict_by_id.loc[item_id, "phash"], 16) for item_id in near_family}
    linked = {i for i in ("b_near", "t_near") if hashes[i] == hashes["a"]}
    same_group = {
        i
        for i in ("b_near", "t_near")
        if strict_by_id.loc[i, "fold_group"] == strict_by_id.loc["a", "fold_group"]
    }
    assert same_group == linked


# --------------------------------------------------------------------------- demo dataset


def test_demo_planted_duplicates_found_exactly(
    demo_dataset: Path, demo_manifest: pd.DataFrame
) -> None:
    truth = json.loads((demo_dataset / "planted_duplicates.json").read_text())
    items, summary = find_duplicates(demo_manifest, DedupOptions())
    by_id = _by_id(items)

    byte_groups = [frozenset(g) for g in truth["train_exact_byte_groups"]]
    pixel_pairs = [frozenset(g) for g in truth["train_pixel_equal_byte_different"]]
    conflict = frozenset(truth["conflicting_mask_group"])
    copies = [frozenset(pair) for pair in truth["train_test_copies"]]
    assert len(byte_groups) == 3 and len(pixel_pairs) == 1 and len(conflict) == 3
    assert len(copies) == 4
    assert _groups(items) == {*byte_groups, *pixel_pairs, conflict, *copies}

    for group in byte_groups:
        assert set(by_id.loc[list(group), "match"]) == {"bytes"}
        assert by_id.loc[list(group), "masks_agree"].all()
        assert set(by_id.loc[list(group), "train_action"]) == {"keep"}
    for group in pixel_pairs:
        assert set(by_id.loc[list(group), "match"]) == {"pixels"}
        assert by_id.loc[list(group), "masks_agree"].all()
    assert set(by_id.loc[list(conflict), "match"]) == {"bytes"}
    assert not by_id.loc[list(conflict), "masks_agree"].any()
    assert set(by_id.loc[list(conflict), "train_action"]) == {"drop-conflict"}
    for train_id, test_id in truth["train_test_copies"]:
        assert by_id.loc[test_id, "leak_train_ids"] == train_id
        assert by_id.loc[train_id, "match"] == "bytes"
    leaking = set(items.loc[items["leak_train_ids"].notna(), "id"])
    assert leaking == {test_id for _, test_id in truth["train_test_copies"]}

    assert summary["n_groups"] == 3 + 1 + 1 + 4
    assert summary["groups_with_train_duplicates"] == 5
    assert summary["groups_across_train_test"] == 4
    assert summary["groups_pixel_equal_bytes_different"] == 1
    assert summary["conflicting_groups"] == 1
    assert summary["n_train_used"] == truth["n_train"] - 3


def test_demo_near_duplicates_keep_planted_groups(demo_manifest: pd.DataFrame) -> None:
    items, _ = find_duplicates(demo_manifest, DedupOptions())
    groups, _ = near_fold_groups(demo_manifest, items, NearDuplicateOptions(near_duplicates=True))
    # Every exact group is inside one fold group.
    assert (groups.groupby("exact_group")["fold_group"].nunique() == 1).all()
    assert groups["phash"].str.fullmatch(r"[0-9a-f]{16}").all()


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_tgs_salt_blank_images(tgs_salt: Path) -> None:
    # Independent truth: md5 of every file's bytes with hashlib.
    by_md5: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split in ("train", "test"):
        for path in sorted((tgs_salt / split / "images").glob("*.png")):
            by_md5[hashlib.md5(path.read_bytes()).hexdigest()].append((split, path.stem))
    file_groups = [members for members in by_md5.values() if len(members) > 1]
    assert len(file_groups) == 1
    blank = file_groups[0]
    assert sum(split == "train" for split, _ in blank) == 65
    assert sum(split == "test" for split, _ in blank) == 73
    first = cv2.imread(str(tgs_salt / blank[0][0] / "images" / f"{blank[0][1]}.png"))
    assert first.min() == first.max()  # blank: one grey level everywhere

    manifest, _ = ingest(
        IngestOptions(
            train_images=str(tgs_salt / "train/images"),
            test_images=str(tgs_salt / "test/images"),
            train_masks=str(tgs_salt / "train/masks"),
        ),
        workers=2,
    )
    items, summary = find_duplicates(manifest, DedupOptions())
    assert _groups(items) == {frozenset(item_id for _, item_id in blank)}
    group = items[items["group_size"] > 1]
    assert (group["group_n_train"] == 65).all() and (group["group_n_test"] == 73).all()
    assert set(group["match"]) == {"bytes"}
    assert summary["n_groups"] == 1
    assert summary["test_items_with_train_label"] == 73
    assert summary["largest_groups"][0]["n_train"] == 65
    assert summary["largest_groups"][0]["n_test"] == 73
    # A blank image has no salt: all 65 train masks are empty, so they agree.
    assert bool(group["masks_agree"].dropna().all())
    train_ids = group.loc[group["split"] == "train", "id"]
    for item_id in train_ids:
        mask = cv2.imread(str(tgs_salt / "train/masks" / f"{item_id}.png"), cv2.IMREAD_UNCHANGED)
        assert not mask.any()
