"""Dedup: exact duplicate groups (same bytes or same decoded pixels), mask-conflict policy,
train-test leaks, and optional near-duplicate grouping by perceptual hash.

Exact groups are keyed by the md5 of the decoded pixels that ingest recorded, and near-copies
by the perceptual hash it recorded, so byte-identical files and re-encodings of one picture
(other PNG compression, gray vs RGB-with-equal-channels) land together without decoding
anything again: dedup is pure table work. Near-duplicates only widen the *fold* groups,
so near-copies cannot straddle a train/validation split; they never merge labels. That grouping
(:func:`near_fold_groups`, options :class:`NearDuplicateOptions`) is the folds stage's: the
items table dedup writes holds only what its readers use (which train items are kept and how),
so a near-duplicate option reruns make_folds alone, never preprocess or what reads the items.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.tables import read_table
from segflow.core.atomic import write_json, write_parquet, write_text
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace, option
from segflow.core.stage_args import stage_log, stage_provenance, with_provenance

log = logging.getLogger(__name__)

CONFLICT_POLICIES = ("drop", "majority", "union")
TRAIN_MEMBER_POLICIES = ("all", "representative")
_PAIR_BLOCK = 1024


@dataclass(frozen=True)
class DedupOptions:
    """How duplicates are grouped and resolved (config section ``dedup``)."""

    conflict_policy: str = option(
        "drop",
        "identical train images with different masks: drop the group, keep the majority mask's "
        "members, or give every member the union mask",
        CONFLICT_POLICIES,
    )
    train_members: str = option(
        "all",
        "train on every member of a duplicate group or on its representative only",
        TRAIN_MEMBER_POLICIES,
    )


@dataclass(frozen=True)
class NearDuplicateOptions:
    """Near-copies in one fold group (config section ``dedup``; read by the folds stage)."""

    near_duplicates: bool = option(False, "also group near-copies (perceptual hash) for the folds")
    near_max_distance: int = option(
        4, "largest Hamming distance between 64-bit pHashes of near-copies"
    )


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return int(root)

    def union(self, first: int, second: int) -> None:
        root_a, root_b = self.find(first), self.find(second)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Index pairs whose 64-bit hashes differ in at most ``max_distance`` bits.

    Multi-index hashing: split each hash into ``max_distance + 1`` bands; by pigeonhole, two
    hashes within the distance agree exactly on at least one band, so only items sharing a band
    value are compared — far fewer than all pairs on real data.
    """
    if not 0 <= max_distance < 64:
        raise SegflowError(f"dedup.near_max_distance must be in [0, 63], got {max_distance}")
    hashes = hashes.astype(np.uint64)
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    pairs: set[tuple[int, int]] = set()
    for low, high in itertools.pairwise(edges):
        band = (hashes >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)
        order = np.argsort(band, kind="stable")
        breaks = np.flatnonzero(np.diff(band[order])) + 1
        for bucket in np.split(order, breaks):
            # Row blocks bound memory when a bucket is large (many similar, blank-ish images).
            for start in range(0, bucket.size - 1, _PAIR_BLOCK):
                rows = bucket[start : start + _PAIR_BLOCK]
                distance = np.bitwise_count(hashes[rows][:, None] ^ hashes[bucket][None, :])
                first, second = np.nonzero(distance <= max_distance)
                keep = rows[first] < bucket[second]
                pairs.update(
                    zip(rows[first][keep].tolist(), bucket[second][keep].tolist(), strict=True)
                )
    return sorted(pairs)


def _resolve_group(
    train: pd.DataFrame, options: DedupOptions
) -> tuple[bool | None, dict[str, str]]:
    """(masks agree?, id -> train action) for the train members of one exact group."""
    ids = train["id"].tolist()
    if len(ids) < 2:
        return None, dict.fromkeys(ids, "keep")
    counts = Counter(train["mask_md5"])
    if len(counts) == 1:
        return True, dict.fromkeys(ids, "keep")
    if options.conflict_policy == "drop":
        return False, dict.fromkeys(ids, "drop-conflict")
    if options.conflict_policy == "union":
        return False, dict.fromkeys(ids, "union")
    (top_mask, top_count), *rest = counts.most_common()
    if rest and rest[0][1] == top_count:  # no strict majority: nothing trustworthy to keep
        return False, dict.fromkeys(ids, "drop-tie")
    return False, {
        item_id: "keep" if mask == top_mask else "drop-minority"
        for item_id, mask in zip(ids, train["mask_md5"], strict=True)
    }


def find_duplicates(
    manifest: pd.DataFrame, options: DedupOptions
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Group duplicates and decide, per train item, whether and how it is used.

    Args:
        manifest: the ingest manifest.
        options: grouping and conflict policy.

    Returns:
        (items, summary). ``items`` has one row per manifest item: id, split, exact_group,
        group_size, group_n_train, group_n_test, match ('unique'|'bytes'|'pixels'),
        is_representative, masks_agree, train_action ('keep'|'union'|'drop-conflict'|
        'drop-tie'|'drop-minority'|'drop-duplicate'; None for test), use_for_training,
        leak_train_ids (test items: ';'-joined train ids whose label applies).
    """
    for key, valid in (
        ("conflict_policy", CONFLICT_POLICIES),
        ("train_members", TRAIN_MEMBER_POLICIES),
    ):
        if getattr(options, key) not in valid:
            raise SegflowError(
                f"unknown dedup.{key} {getattr(options, key)!r}; valid: {', '.join(valid)}"
            )
    items = manifest[["id", "split", "md5_bytes", "md5_pixels", "mask_md5"]].copy()
    # Train before test, then by id: the representative is the first member in this order.
    items["_split_order"] = (items["split"] != "train").astype(int)
    items = items.sort_values(["_split_order", "id"], kind="stable").reset_index(drop=True)
    items["exact_group"] = items["md5_pixels"].str[:16]
    grouped = items.groupby("exact_group", sort=False)
    items["group_size"] = grouped["id"].transform("size")
    items["group_n_train"] = (
        items["split"]
        .eq("train")
        .groupby(items["exact_group"], sort=False)
        .transform("sum")
        .astype(int)
    )
    items["group_n_test"] = items["group_size"] - items["group_n_train"]
    n_byte_variants = grouped["md5_bytes"].transform("nunique")
    items["match"] = np.where(
        items["group_size"] == 1, "unique", np.where(n_byte_variants == 1, "bytes", "pixels")
    )
    items["is_representative"] = ~items.duplicated("exact_group")

    agree: dict[str, bool | None] = {}
    actions: dict[str, str] = {}
    train = items[items["split"] == "train"]
    # Only groups with several train copies need a decision; every other train item is kept.
    actions.update(dict.fromkeys(train.loc[train["group_n_train"] == 1, "id"], "keep"))
    shared = train[train["group_n_train"] > 1]
    for group, members in shared.groupby("exact_group", sort=False):
        agree[group], group_actions = _resolve_group(members, options)
        if options.train_members == "representative":
            kept = [i for i, action in group_actions.items() if action in ("keep", "union")]
            group_actions.update({i: "drop-duplicate" for i in kept[1:]})
        actions.update(group_actions)
    items["masks_agree"] = items["exact_group"].map(agree).astype("boolean")
    items["train_action"] = items["id"].map(actions).where(items["split"] == "train")
    items["use_for_training"] = items["train_action"].isin(["keep", "union"])
    usable = items[items["train_action"].isin(["keep", "union"])]
    label_sources = usable.groupby("exact_group")["id"].agg(";".join)
    items["leak_train_ids"] = (
        items["exact_group"].map(label_sources).where(items["split"] == "test")
    )

    items = items.drop(columns=["_split_order", "md5_bytes", "md5_pixels", "mask_md5"])
    return items, _summarise(items, options)


def find_test_leaks(
    test_manifest: pd.DataFrame, train_manifest: pd.DataFrame, items: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Link each test item to the train items it is an exact copy of (same decoded pixels).

    A test-side step: dedup's items (the train side) never see the test set, so new test
    images change no train grouping, fold or model; only these links and what reads them.

    Args:
        test_manifest: the test manifest (``md5_pixels``).
        train_manifest: the train manifest (``md5_pixels``).
        items: dedup's items table of the train set (``use_for_training``).

    Returns:
        (leaks, summary). ``leaks`` has one row per test item: id, split (``test``),
        exact_group, leak_train_ids (';'-joined train ids whose label applies: the copies used
        for training; None without one), the columns :func:`segflow.model.submit` and the
        pseudo-label selection read. summary: n_test, test_items_with_train_label,
        groups_across_train_test, test_items_in_test_duplicates.
    """
    train = train_manifest[["id", "md5_pixels"]].assign(
        exact_group=lambda f: f["md5_pixels"].str[:16]
    )
    usable = set(items.loc[items["use_for_training"], "id"])
    label_sources = (
        train[train["id"].isin(usable)].sort_values("id").groupby("exact_group")["id"].agg(";".join)
    )
    leaks = pd.DataFrame(
        {
            "id": test_manifest["id"].astype(str).to_numpy(),
            "split": "test",
            "exact_group": test_manifest["md5_pixels"].str[:16].to_numpy(),
        }
    )
    leaks = leaks.sort_values("id", kind="stable").reset_index(drop=True)
    leaks["leak_train_ids"] = leaks["exact_group"].map(label_sources).astype(object)
    n_copies = leaks.groupby("exact_group")["id"].transform("size")
    shared = leaks["exact_group"].isin(set(train["exact_group"]))
    summary = {
        "n_test": len(leaks),
        "test_items_with_train_label": int(leaks["leak_train_ids"].notna().sum()),
        "groups_across_train_test": int(leaks.loc[shared, "exact_group"].nunique()),
        "test_items_in_test_duplicates": int((n_copies > 1).sum()),
    }
    return leaks, summary


def near_fold_groups(
    manifest: pd.DataFrame, items: pd.DataFrame, options: NearDuplicateOptions
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The fold group of every item: its exact group, widened to near-copies when enabled.

    Args:
        manifest: the ingest manifest (``phash`` column, needed with near-duplicates on).
        items: dedup's items table (:func:`find_duplicates`).
        options: whether and how far near-copies are linked.

    Returns:
        (groups, summary): groups has one row per row of ``items`` (same order): id,
        exact_group, fold_group (named after an exact group of its members), and phash (16 hex
        digits) when near-duplicates are on; summary: enabled, max_distance and
        fold_groups_merged.
    """
    groups = items[["id", "exact_group"]].reset_index(drop=True)
    groups["fold_group"] = groups["exact_group"]
    n_near_links = 0
    if options.near_duplicates:
        if "phash" not in manifest.columns:
            raise SegflowError("the manifest has no phash column; rerun ingest with this version")
        hashes = np.array(
            [int(h, 16) for h in manifest.set_index("id").loc[groups["id"], "phash"]],
            dtype=np.uint64,
        )
        groups["phash"] = [f"{h:016x}" for h in hashes.tolist()]
        union_find = _UnionFind(len(groups))
        first_of_group: dict[int, int] = {}
        for index, code in enumerate(pd.factorize(groups["exact_group"])[0].tolist()):
            union_find.union(first_of_group.setdefault(code, index), index)
        # Equal hashes are linked directly; the pair search then runs over distinct hash values
        # only, so a block of identical (e.g. blank) images costs nothing there.
        distinct, first_index, hash_codes = np.unique(
            hashes, return_index=True, return_inverse=True
        )
        links = [(int(first_index[code]), index) for index, code in enumerate(hash_codes.tolist())]
        links += [
            (int(first_index[first]), int(first_index[second]))
            for first, second in near_duplicate_pairs(distinct, options.near_max_distance)
        ]
        for item_a, item_b in links:
            if union_find.find(item_a) != union_find.find(item_b):
                n_near_links += 1
                union_find.union(item_a, item_b)
        roots = [union_find.find(index) for index in range(len(groups))]
        groups["fold_group"] = groups["exact_group"].to_numpy()[roots]
    summary = {
        "enabled": options.near_duplicates,
        "max_distance": options.near_max_distance,
        "fold_groups_merged": n_near_links,
    }
    return groups, summary


def _summarise(items: pd.DataFrame, options: DedupOptions) -> dict[str, Any]:
    duplicated = items[items["group_size"] > 1]
    groups = (
        # A boolean column, not a lambda over "split": with no duplicate group at all, a lambda
        # aggregation keeps the (string) input dtype and the arithmetic below fails.
        duplicated.assign(_is_train=duplicated["split"] == "train")
        .groupby("exact_group", sort=False)
        .agg(
            size=("id", "size"),
            n_train=("_is_train", "sum"),
            representative=("id", "first"),
            match=("match", "first"),
            masks_agree=("masks_agree", "first"),
        )
    )
    groups["n_train"] = groups["n_train"].astype(int)
    n_test = groups["size"] - groups["n_train"]
    conflicts = groups[groups["masks_agree"].eq(False).fillna(False)]
    actions = items["train_action"].value_counts()
    largest = groups.sort_values(["size", "representative"], ascending=[False, True]).head(10)
    summary: dict[str, Any] = {
        "policy": {
            "conflict_policy": options.conflict_policy,
            "train_members": options.train_members,
        },
        "n_items": len(items),
        "n_groups": len(groups),
        "n_members": int(groups["size"].sum()),
        # Overlapping views: a group with 2 train and 3 test copies counts in all three.
        "groups_with_train_duplicates": int((groups["n_train"] > 1).sum()),
        "train_items_in_train_duplicates": int(groups.loc[groups["n_train"] > 1, "n_train"].sum()),
        "groups_pixel_equal_bytes_different": int((groups["match"] == "pixels").sum()),
        "conflicting_groups": len(conflicts),
        "conflicting_members": int(conflicts["n_train"].sum()),
        "train_actions": {str(k): int(v) for k, v in actions.items()},
        "n_train_used": int(items["use_for_training"].sum()),
        "largest_groups": [
            {
                "representative": row.representative,
                "size": int(row.size),
                "n_train": int(row.n_train),
                "n_test": int(row.size - row.n_train),
                "match": row.match,
            }
            for row in largest.itertuples()
        ],
    }
    if items["split"].eq("test").any():
        # Only a manifest with both splits (the library's ``ingest --split all``); the workflow
        # dedups the train set alone and the leaks stage counts these (test_leaks.json).
        summary.update(
            {
                "groups_with_test_duplicates": int((n_test > 1).sum()),
                "test_items_in_test_duplicates": int(n_test[n_test > 1].sum()),
                "groups_across_train_test": int(((groups["n_train"] > 0) & (n_test > 0)).sum()),
                "test_items_with_train_label": int(items["leak_train_ids"].notna().sum()),
            }
        )
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """Human-readable Markdown version of the dedup summary."""
    lines = [
        "# Duplicate report",
        "",
        f"- items: {summary['n_items']}",
        f"- duplicate groups: {summary['n_groups']} with {summary['n_members']} members",
        f"  - with several train copies: {summary['groups_with_train_duplicates']} groups, "
        f"{summary['train_items_in_train_duplicates']} train items",
    ]
    if "groups_across_train_test" in summary:  # a manifest with test items (not the workflow's)
        lines += [
            f"  - with several test copies: {summary['groups_with_test_duplicates']} groups, "
            f"{summary['test_items_in_test_duplicates']} test items",
            f"  - across train and test (leaks): {summary['groups_across_train_test']} groups; "
            f"{summary['test_items_with_train_label']} test items get a known train label",
        ]
    lines += [
        f"  - same pixels, different bytes: {summary['groups_pixel_equal_bytes_different']}",
        f"- conflicting masks: {summary['conflicting_groups']} groups, "
        f"{summary['conflicting_members']} train items (policy: {summary['policy']['conflict_policy']})",
        f"- train items used: {summary['n_train_used']} "
        f"({', '.join(f'{k}: {v}' for k, v in summary['train_actions'].items())})",
    ]
    if summary["largest_groups"]:
        lines += ["", "| representative | size | train | test | match |", "|---|---|---|---|---|"]
        lines += [
            f"| {g['representative']} | {g['size']} | {g['n_train']} | {g['n_test']} | {g['match']} |"
            for g in summary["largest_groups"]
        ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow dedup``'s flags."""
    add_dataclass_arguments(parser, DedupOptions)
    parser.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    parser.add_argument("--out-items", required=True, help="per-item dedup Parquet to write")
    parser.add_argument("--out-summary", required=True, help="summary JSON to write")
    parser.add_argument("--out-report", required=True, help="summary Markdown to write")


def run(args: argparse.Namespace) -> None:
    """``segflow dedup``: write the items table, its summary and report."""
    manifest = read_table(args.manifest, "manifest")
    options = dataclass_from_namespace(DedupOptions, args)
    items, summary = find_duplicates(manifest, options)
    write_parquet(args.out_items, items)
    write_json(args.out_summary, with_provenance(summary, stage_provenance(options)))
    write_text(args.out_report, summary_markdown(summary))
    stage_log.info(
        "%d duplicate groups with %d members; %d conflicting",
        summary["n_groups"],
        summary["n_members"],
        summary["conflicting_groups"],
    )
