"""Folds: K folds stratified by mask coverage and grouped by duplicate group.

Empty masks are their own stratum, non-empty masks are binned by coverage quantiles, and every
member of a (near-)duplicate group lands in the same fold, so no copy of a validation image is
ever trained on. The assignment is a persisted artifact, identical on rerun for the same seed.
The near-duplicate grouping (config ``dedup.near_*``) is done here, on dedup's exact groups and
ingest's perceptual hashes (:func:`segflow.data.dedup.near_fold_groups`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from segflow.artifacts.tables import read_table
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace, option
from segflow.core.stage_args import add_stage_tables, stage_log, stage_provenance, with_provenance
from segflow.data.dedup import NearDuplicateOptions, near_fold_groups


@dataclass(frozen=True)
class FoldOptions:
    """Cross-validation split (config section ``folds``)."""

    n_folds: int = option(5, "number of folds K")
    seed: int = option(42, "random seed of the split")
    coverage_bins: int = option(5, "coverage quantile bins for non-empty masks (empty is its own)")


def coverage_strata(coverage: pd.Series, n_bins: int) -> pd.Series:
    """Stratum 0 for empty masks; 1..n_bins by coverage quantile for the others."""
    if n_bins < 1:
        raise SegflowError(f"folds.coverage_bins must be >= 1, got {n_bins}")
    strata = pd.Series(0, index=coverage.index, dtype=int)
    non_empty = coverage > 0
    if non_empty.any():
        ranks = coverage[non_empty].rank(method="first")  # ties broken by order: exact quantiles
        strata[non_empty] = pd.qcut(ranks, q=min(n_bins, int(non_empty.sum())), labels=False) + 1
    return strata


def _split_strata(strata: pd.Series, n_folds: int) -> np.ndarray:
    """The strata handed to the splitter: coarser when every stratum is smaller than K.

    StratifiedGroupKFold refuses (ValueError) when *every* class has fewer than K members, which
    happens on small datasets even though there are enough groups; stratify by empty/non-empty
    then, or not at all.
    """
    for candidate in (strata, (strata > 0).astype(int), pd.Series(0, index=strata.index)):
        if (candidate.value_counts() >= n_folds).any():
            return candidate.to_numpy()
    return np.zeros(len(strata), dtype=int)


def _fill_empty_folds(fold: np.ndarray, groups: np.ndarray, n_folds: int) -> None:
    """Give every empty fold one group, in place.

    StratifiedGroupKFold balances strata greedily and can leave a fold without any item when
    there are few groups (e.g. as many groups as folds); a fold with no validation images is
    useless. Move the smallest group (ties: first by name) of the fold holding the most groups
    (ties: lowest fold) into each empty fold — deterministic, so reruns stay identical.
    """
    for empty in range(n_folds):
        if (fold == empty).any():
            continue
        n_groups_per_fold = [len(np.unique(groups[fold == k])) for k in range(n_folds)]
        donor = int(np.argmax(n_groups_per_fold))
        names, sizes = np.unique(groups[fold == donor], return_counts=True)
        fold[groups == names[int(np.argmin(sizes))]] = empty


def series_fold_groups(items: pd.DataFrame, manifest: pd.DataFrame) -> pd.Series:
    """Fold groups merged with DICOM series: slices of one series, and every item a dedup
    group links to any of them, share one group (named by its smallest member group), so no
    neighbouring slice of a validation slice is trained on.

    Args:
        items: dedup items with their ``fold_group``.
        manifest: the manifest with ``series_uid`` (ingest with ``data.dicom_series``).

    Returns:
        The merged fold group of each item (aligned with ``items``).
    """
    series = manifest.set_index("id")["series_uid"].reindex(items["id"]).to_numpy()
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for group, uid in zip(items["fold_group"].astype(str), series, strict=True):
        if isinstance(uid, str) and uid:
            first, second = sorted((find(group), find("series:" + uid)))
            parent[second] = first
    merged = [find(group) for group in items["fold_group"].astype(str)]
    # Name each merged group by its smallest original fold group (not a "series:" node).
    names: dict[str, str] = {}
    for root, group in zip(merged, items["fold_group"].astype(str), strict=True):
        names[root] = min(names.get(root, group), group)
    return pd.Series([names[root] for root in merged], index=items.index)


def make_folds(
    manifest: pd.DataFrame,
    dedup_items: pd.DataFrame,
    options: FoldOptions,
    near: NearDuplicateOptions | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Assign every train item used for training to one of K folds.

    Args:
        manifest: the ingest manifest (mask coverage; perceptual hashes with near-duplicates).
        dedup_items: the dedup items (use_for_training, exact_group, train_action).
        options: K, seed and coverage bins.
        near: near-copies in one fold group (default: exact duplicate groups only).

    Returns:
        (folds, summary): folds has columns id, fold, group, stratum, coverage (sorted by id);
        the summary's ``near_duplicates`` says how many fold groups near-copies merged.
    """
    if options.n_folds < 2:
        raise SegflowError(f"folds.n_folds must be >= 2, got {options.n_folds}")
    groups, near_summary = near_fold_groups(manifest, dedup_items, near or NearDuplicateOptions())
    items = dedup_items.reset_index(drop=True).assign(fold_group=groups["fold_group"])
    if "series_uid" in manifest.columns:  # data.dicom_series: a volume's slices stay together
        items = items.assign(fold_group=series_fold_groups(items, manifest))
    used = items[items["use_for_training"]][["id", "fold_group", "exact_group", "train_action"]]
    coverage = manifest.set_index("id")["mask_coverage"]
    used = used.assign(coverage=coverage.loc[used["id"]].to_numpy())
    # Union-labelled members carry the group's union mask: approximate its coverage by the max.
    union = used["train_action"] == "union"
    used.loc[union, "coverage"] = used[union].groupby("exact_group")["coverage"].transform("max")
    used = used.sort_values("id").reset_index(drop=True)
    n_groups = used["fold_group"].nunique()
    if n_groups < options.n_folds:
        raise SegflowError(
            f"folds.n_folds = {options.n_folds} but only {n_groups} independent image groups "
            "remain after dedup (a DICOM series is one group); lower folds.n_folds"
        )
    strata = coverage_strata(used["coverage"], options.coverage_bins)
    splitter = StratifiedGroupKFold(
        n_splits=options.n_folds, shuffle=True, random_state=options.seed
    )
    fold = np.full(len(used), -1, dtype=int)
    for index, (_, validation) in enumerate(
        splitter.split(used, _split_strata(strata, options.n_folds), groups=used["fold_group"])
    ):
        fold[validation] = index
    _fill_empty_folds(fold, used["fold_group"].to_numpy(), options.n_folds)
    folds = pd.DataFrame(
        {
            "id": used["id"],
            "fold": fold,
            "group": used["fold_group"],
            "stratum": strata.to_numpy(),
            "coverage": used["coverage"].round(6),
        }
    )
    return folds, {**_summarise(folds, options), "near_duplicates": near_summary}


def _summarise(folds: pd.DataFrame, options: FoldOptions) -> dict[str, Any]:
    table = pd.crosstab(folds["fold"], folds["stratum"])
    return {
        "n_folds": options.n_folds,
        "seed": options.seed,
        "n_items": len(folds),
        "n_groups": int(folds["group"].nunique()),
        "items_per_fold": folds["fold"].value_counts().sort_index().astype(int).tolist(),
        "empty_per_fold": folds[folds["stratum"] == 0]["fold"]
        .value_counts()
        .reindex(range(options.n_folds), fill_value=0)
        .astype(int)
        .tolist(),
        "strata_per_fold": {str(s): table[s].astype(int).tolist() for s in table.columns},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow folds``' flags."""
    add_dataclass_arguments(parser, FoldOptions)
    add_dataclass_arguments(parser, NearDuplicateOptions)
    add_stage_tables(parser)
    parser.add_argument("--out-folds", required=True, help="folds CSV to write")
    parser.add_argument("--out-summary", required=True, help="summary JSON to write")


def run(args: argparse.Namespace) -> None:
    """``segflow folds``: write folds.csv and its summary."""
    options = dataclass_from_namespace(FoldOptions, args)
    near = dataclass_from_namespace(NearDuplicateOptions, args)
    folds, summary = make_folds(
        read_table(args.manifest, "manifest"),
        read_table(args.dedup_items, "dedup items"),
        options,
        near,
    )
    write_csv(args.out_folds, folds)
    block = stage_provenance(options, seed=options.seed)
    write_json(args.out_summary, with_provenance(summary, block))
    stage_log.info(
        "%d items in %d folds: %s per fold",
        summary["n_items"],
        summary["n_folds"],
        summary["items_per_fold"],
    )
