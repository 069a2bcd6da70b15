"""Tests for the grouped, coverage-stratified K-fold split (segflow.data.folds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, NearDuplicateOptions, find_duplicates
from segflow.data.folds import FoldOptions, coverage_strata, make_folds

# _table's near copies share a perceptual hash: distance 0 links exactly them.
NEAR = NearDuplicateOptions(near_duplicates=True, near_max_distance=0)

# sklearn warns whenever a stratum has fewer members than K; the small-table tests want that.
SMALL_STRATA = pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")

# --------------------------------------------------------------------------- coverage_strata


def test_coverage_strata_by_hand() -> None:
    coverage = pd.Series([0.0, 0.1, 0.2, 0.3, 0.0, 0.4, 0.5], index=list("abcdefg"))
    strata = coverage_strata(coverage, 3)
    # Five non-empty values in 3 quantile bins of their ranks: 0.1, 0.2 | 0.3 | 0.4, 0.5.
    assert strata.to_dict() == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 0, "f": 3, "g": 3}


def test_coverage_strata_empty_input_and_all_empty() -> None:
    assert coverage_strata(pd.Series([], dtype=float), 5).tolist() == []
    assert coverage_strata(pd.Series([0.0, 0.0, 0.0]), 5).tolist() == [0, 0, 0]


def test_coverage_strata_fewer_items_than_bins() -> None:
    strata = coverage_strata(pd.Series([0.9, 0.0, 0.2, 0.5]), 10)
    assert strata.tolist() == [3, 0, 1, 2]


def test_coverage_strata_balanced_and_monotone() -> None:
    rng = np.random.default_rng(0)
    coverage = pd.Series(np.where(rng.random(1000) < 0.35, 0.0, rng.random(1000)))
    n_empty = int((coverage == 0).sum())
    strata = coverage_strata(coverage, 5)
    assert set(strata[coverage == 0]) == {0}
    assert set(strata[coverage > 0]) == {1, 2, 3, 4, 5}
    counts = strata[coverage > 0].value_counts()
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == 1000 - n_empty
    # A higher coverage never gets a lower stratum.
    ordered = strata[coverage > 0].to_numpy()[np.argsort(coverage[coverage > 0].to_numpy())]
    assert (np.diff(ordered) >= 0).all()


def test_coverage_strata_ties_still_balanced() -> None:
    # Ten identical non-empty coverages: ties are split by order into equal bins.
    strata = coverage_strata(pd.Series([0.5] * 10 + [0.0] * 3), 5)
    assert strata.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0, 0, 0]


@pytest.mark.parametrize("bins", [0, -2])
def test_coverage_strata_rejects_no_bins(bins: int) -> None:
    with pytest.raises(SegflowError, match="coverage_bins"):
        coverage_strata(pd.Series([0.1]), bins)


# --------------------------------------------------------------------------- synthetic tables


def _table(
    seed: int, n_groups: int = 150, n_dropped: int = 0, near_merges: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, dedup items): groups of 1-5 copies, ~35% empty masks, shuffled rows; the
    items' fold_group is the expected one (near copies share the manifest's phash)."""
    rng = np.random.default_rng(seed)
    rows = []
    ids = rng.choice(10**9, size=n_groups * 5 + n_dropped, replace=False)
    next_id = iter(f"x{value:09d}" for value in ids)
    for group in range(n_groups):
        coverage = 0.0 if rng.random() < 0.35 else float(rng.uniform(0.001, 1.0))
        for _ in range(int(rng.integers(1, 6))):
            rows.append((next(next_id), f"g{group:03d}", coverage, "keep", True))
    for k in range(n_dropped):
        rows.append((next(next_id), f"d{k:03d}", 0.5, "drop-conflict", False))
    items = pd.DataFrame(
        rows, columns=["id", "exact_group", "coverage", "train_action", "use_for_training"]
    )
    items["fold_group"] = items["exact_group"]
    # Near duplicates: fold_group of one exact group becomes another's.
    groups = items["exact_group"].unique()
    for _ in range(near_merges):
        first, second = rng.choice(groups, 2, replace=False)
        target = items.loc[items["exact_group"] == first, "fold_group"].iloc[0]
        source = items.loc[items["exact_group"] == second, "fold_group"].iloc[0]
        items.loc[items["fold_group"] == source, "fold_group"] = target
    items = items.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    hashes = dict(zip(groups, rng.choice(2**62, size=len(groups), replace=False), strict=True))
    items["phash"] = [f"{hashes[group]:016x}" for group in items["fold_group"]]
    manifest = items[["id", "coverage", "phash"]].rename(columns={"coverage": "mask_coverage"})
    manifest = manifest.sample(frac=1.0, random_state=seed + 1).reset_index(drop=True)
    return manifest, items.drop(columns=["coverage", "phash"])


def _partition(ids: pd.Series, groups: pd.Series) -> set[frozenset[str]]:
    """The groups as sets of ids (group names aside)."""
    return {frozenset(members) for _, members in ids.groupby(groups.to_numpy())}


@pytest.mark.parametrize(("seed", "n_folds"), [(0, 5), (1, 3), (2, 4), (3, 10)])
def test_make_folds_invariants(seed: int, n_folds: int) -> None:
    manifest, items = _table(seed, n_dropped=12, near_merges=10)
    folds, summary = make_folds(manifest, items, FoldOptions(n_folds=n_folds, seed=seed), NEAR)
    used = items[items["use_for_training"]]

    # Every used item exactly once, no dropped item, sorted by id.
    assert sorted(folds["id"]) == sorted(used["id"])
    assert folds["id"].is_unique
    assert folds["id"].tolist() == sorted(folds["id"])
    assert not set(folds["id"]) & set(items.loc[~items["use_for_training"], "id"])
    assert set(folds["fold"]) == set(range(n_folds))

    # Groups (near-duplicate fold groups included) never straddle folds.
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert _partition(folds["id"], folds["group"]) == _partition(used["id"], used["fold_group"])
    exact = used.set_index("id")["exact_group"].loc[folds["id"]].to_numpy()
    assert (folds.assign(exact=exact).groupby("exact")["fold"].nunique() == 1).all()

    # Coverage comes from the manifest; strata as coverage_strata computes them.
    coverage = manifest.set_index("id")["mask_coverage"].loc[folds["id"]]
    np.testing.assert_allclose(folds["coverage"], coverage.round(6))
    assert ((folds["stratum"] == 0) == (folds["coverage"] == 0)).all()

    # Balanced: per stratum, fold counts differ by at most one group (5 items); a random
    # assignment of groups is off by 15 or more on these tables.
    table = pd.crosstab(folds["stratum"], folds["fold"])
    assert (table.max(axis=1) - table.min(axis=1)).max() <= 5
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 5

    assert summary["n_folds"] == n_folds and summary["seed"] == seed
    assert summary["n_items"] == len(used)
    assert summary["n_groups"] == used["fold_group"].nunique()
    assert summary["items_per_fold"] == [int(sizes[k]) for k in range(n_folds)]
    empty = folds[folds["stratum"] == 0]["fold"].value_counts()
    assert summary["empty_per_fold"] == [int(empty.get(k, 0)) for k in range(n_folds)]
    assert summary["strata_per_fold"]["0"] == summary["empty_per_fold"]
    json.dumps(summary)


def test_near_duplicate_fold_groups_are_respected() -> None:
    manifest, items = _table(7, n_groups=60, near_merges=25)
    assert (items["fold_group"] != items["exact_group"]).any()
    folds, summary = make_folds(manifest, items, FoldOptions(n_folds=5, seed=1), NEAR)
    assert summary["near_duplicates"]["fold_groups_merged"] > 0
    fold_of = folds.set_index("id")["fold"]
    for _, members in items.groupby("fold_group"):
        assert fold_of.loc[members["id"]].nunique() == 1


def test_same_seed_same_folds_and_input_order_does_not_matter() -> None:
    manifest, items = _table(11)
    first, first_summary = make_folds(manifest, items, FoldOptions(seed=5))
    again, again_summary = make_folds(manifest, items, FoldOptions(seed=5))
    pd.testing.assert_frame_equal(first, again)
    assert first_summary == again_summary
    shuffled, _ = make_folds(
        manifest.sample(frac=1.0, random_state=1),
        items.sample(frac=1.0, random_state=2),
        FoldOptions(seed=5),
    )
    pd.testing.assert_frame_equal(first.reset_index(drop=True), shuffled.reset_index(drop=True))


def test_different_seed_different_folds() -> None:
    manifest, items = _table(12)
    first, _ = make_folds(manifest, items, FoldOptions(seed=1))
    second, _ = make_folds(manifest, items, FoldOptions(seed=2))
    assert first["id"].tolist() == second["id"].tolist()
    assert (first["fold"] != second["fold"]).mean() > 0.3


@SMALL_STRATA
def test_union_members_use_the_largest_coverage() -> None:
    manifest = pd.DataFrame(
        {
            "id": ["u1", "u2", "u3", "k1", "k2", "k3", "k4"],
            "mask_coverage": [0.1, 0.0, 0.4, 0.2, 0.3, 0.0, 0.5],
        }
    )
    items = pd.DataFrame(
        {
            "id": ["u1", "u2", "u3", "k1", "k2", "k3", "k4"],
            "exact_group": ["U", "U", "U", "A", "B", "C", "D"],
            "train_action": ["union"] * 3 + ["keep"] * 4,
            "use_for_training": True,
        }
    )
    items["fold_group"] = items["exact_group"]
    folds, _ = make_folds(manifest, items, FoldOptions(n_folds=2, seed=0))
    coverage = folds.set_index("id")["coverage"]
    assert coverage.loc[["u1", "u2", "u3"]].tolist() == [0.4, 0.4, 0.4]
    assert coverage.loc[["k1", "k2", "k3", "k4"]].tolist() == [0.2, 0.3, 0.0, 0.5]


# --------------------------------------------------------------------------- errors and edges


@SMALL_STRATA
def test_more_folds_than_groups_is_an_error() -> None:
    manifest, items = _table(20, n_groups=4, near_merges=1)  # 3 independent groups
    assert items["fold_group"].nunique() == 3
    with pytest.raises(SegflowError, match=r"folds\.n_folds") as error:
        make_folds(manifest, items, FoldOptions(n_folds=4), NEAR)
    assert "3" in str(error.value)
    folds, _ = make_folds(manifest, items, FoldOptions(n_folds=3))
    assert folds["fold"].nunique() == 3


@pytest.mark.parametrize("n_folds", [1, 0, -1])
def test_fewer_than_two_folds_is_an_error(n_folds: int) -> None:
    manifest, items = _table(21, n_groups=20)
    with pytest.raises(SegflowError, match=r"folds\.n_folds"):
        make_folds(manifest, items, FoldOptions(n_folds=n_folds))


@SMALL_STRATA
@pytest.mark.parametrize("seed", range(25))
def test_as_many_groups_as_folds_gives_one_group_per_fold(seed: int) -> None:
    """Every fold must get validation items, even when groups barely suffice."""
    rng = np.random.default_rng(seed)
    n_folds = int(rng.integers(2, 7))
    manifest, items = _table(seed, n_groups=n_folds)
    folds, summary = make_folds(manifest, items, FoldOptions(n_folds=n_folds, seed=seed))
    assert sorted(folds["fold"].unique()) == list(range(n_folds))
    assert (folds.groupby("fold")["group"].nunique() == 1).all()
    assert len(summary["items_per_fold"]) == n_folds
    assert min(summary["items_per_fold"]) >= 1


@SMALL_STRATA
@pytest.mark.parametrize("seed", range(10))
def test_small_strata_do_not_crash(seed: int) -> None:
    """Few items per stratum (fewer than K in every one) still split, with every fold used."""
    rng = np.random.default_rng(100 + seed)
    n = 9
    manifest = pd.DataFrame(
        {
            "id": [f"i{k}" for k in range(n)],
            "mask_coverage": np.where(rng.random(n) < 0.4, 0.0, rng.random(n)),
        }
    )
    items = pd.DataFrame(
        {
            "id": manifest["id"],
            "exact_group": manifest["id"],
            "fold_group": manifest["id"],
            "train_action": "keep",
            "use_for_training": True,
        }
    )
    folds, _ = make_folds(manifest, items, FoldOptions(n_folds=5, seed=seed, coverage_bins=5))
    assert sorted(folds["fold"].unique()) == list(range(5))
    assert folds["fold"].value_counts().max() <= 2


# --------------------------------------------------------------------------- demo dataset


@pytest.mark.parametrize("policy", ["drop", "union"])
def test_demo_planted_groups_share_a_fold(
    demo_dataset: Path, demo_manifest: pd.DataFrame, policy: str
) -> None:
    truth = json.loads((demo_dataset / "planted_duplicates.json").read_text())
    items, _ = find_duplicates(demo_manifest, DedupOptions(conflict_policy=policy))
    folds, summary = make_folds(demo_manifest, items, FoldOptions(n_folds=5, seed=42))
    fold_of = folds.set_index("id")["fold"]
    planted = [
        *truth["train_exact_byte_groups"],
        *truth["train_pixel_equal_byte_different"],
    ]
    conflict = truth["conflicting_mask_group"]
    if policy == "union":
        planted.append(conflict)
    else:
        assert not set(conflict) & set(fold_of.index)
    for group in planted:
        assert fold_of.loc[group].nunique() == 1, group
    expected_items = truth["n_train"] - (0 if policy == "union" else len(conflict))
    assert len(folds) == expected_items
    assert set(folds["fold"]) == set(range(5))
    # Empty masks (their own stratum) are spread over the folds.
    empty = summary["empty_per_fold"]
    assert max(empty) - min(empty) <= 3
    assert sum(empty) == int((folds["coverage"] == 0).sum())
