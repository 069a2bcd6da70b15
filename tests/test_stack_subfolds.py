"""The stacking layer on the OOF of a single trained fold (``folds.train_folds: [k]``): its
rows are split into sub-folds by duplicate group (``learners.stacking_folds``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_stack import _stack_inputs

from segflow.core.errors import SegflowError
from segflow.ensemble.stacking.learners import stacking_folds
from segflow.ensemble.stacking.stack import StackOptions, run_stack


def _planted(n_groups: int = 12, seed: int = 3) -> np.ndarray:
    """Groups of 1 to 4 rows, shuffled: group ``gK`` repeated."""
    rng = np.random.default_rng(seed)
    groups = np.concatenate([[f"g{i}"] * int(rng.integers(1, 5)) for i in range(n_groups)])
    return rng.permutation(groups)


def test_one_fold_is_split_into_sub_folds_keeping_groups_together() -> None:
    groups = _planted()
    folds = np.zeros(len(groups), dtype=np.int64)
    sub = stacking_folds(folds, groups, n_sub_folds=3, seed=7)
    assert sub.dtype == np.int64 and sub.shape == folds.shape
    assert set(sub.tolist()) == {0, 1, 2}
    table = pd.DataFrame({"group": groups, "sub": sub})
    assert (table.groupby("group")["sub"].nunique() == 1).all()  # no group split
    sizes = table["sub"].value_counts()
    assert sizes.max() - sizes.min() <= 4  # balanced to within the largest group
    # Deterministic: the same inputs give the same sub-folds, whatever the row order.
    assert np.array_equal(sub, stacking_folds(folds, groups, 3, seed=7))
    order = np.random.default_rng(0).permutation(len(groups))
    again = stacking_folds(folds[order], groups[order], 3, seed=7)
    assert np.array_equal(again, sub[order])


def test_sub_folds_are_capped_by_the_groups_and_at_least_two() -> None:
    groups = np.array(["a", "a", "b", "b", "b"])
    folds = np.full(5, 4)
    sub = stacking_folds(folds, groups, n_sub_folds=5, seed=0)
    assert sorted(set(sub.tolist())) == [0, 1]
    assert len(set(sub[:2])) == 1 and len(set(sub[2:])) == 1
    assert sorted(set(stacking_folds(folds, groups, n_sub_folds=1).tolist())) == [0, 1]
    with pytest.raises(SegflowError, match="single duplicate group"):
        stacking_folds(np.zeros(3, dtype=int), np.array(["x", "x", "x"]), 5)


def test_several_first_level_folds_are_kept_as_given() -> None:
    folds = np.array([0, 2, 0, 2, 2])
    out = stacking_folds(folds, np.array(list("abcde")), n_sub_folds=5, seed=1)
    assert out.tolist() == folds.tolist()


def test_stack_runs_on_the_oof_of_one_fold(tmp_path) -> None:
    """All OOF rows in fold 1 of a 3-fold folds.csv (the table also lists other folds' ids):
    the gate cross-fits on sub-folds, each group in one, and writes its candidate."""
    inputs = _stack_inputs(True)
    ids = inputs.folds["id"]
    group = [f"grp{i // 2}" for i in range(len(ids))]  # pairs of duplicates
    other = pd.DataFrame({"id": ["zz0", "zz1"], "fold": [0, 2], "group": ["o0", "o1"]})
    folds = pd.concat(
        [pd.DataFrame({"id": ids, "fold": 1, "group": group}), other], ignore_index=True
    )
    inputs = type(inputs)(**{**inputs.__dict__, "folds": folds})
    summary = run_stack(
        inputs,
        StackOptions(),
        "gate",
        tmp_path / "stack",
        tmp_path / "c" / "oof",
    )
    assert set(summary["candidates"]) == {"stack_gate"}
    features = pd.read_parquet(tmp_path / "stack" / "class_0" / "features_oof.parquet")
    assert features["fold"].nunique() == 3  # folds.csv's 3 folds -> 3 sub-folds
    merged = features.assign(group=group)
    assert (merged.groupby("group")["fold"].nunique() == 1).all()
    # The candidate's OOF keeps the first-level fold of its rows.
    assert set(pd.read_csv(tmp_path / "c" / "oof" / "oof_ids.csv")["fold"]) == {1}
