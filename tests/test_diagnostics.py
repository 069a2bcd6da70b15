"""The weak-model flags on synthetic histories, fold metrics and per-image OOF scores."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from segflow.core.errors import SegflowError
from segflow.model.diagnostics import (
    MIN_OPTIMIZER_STEPS,
    all_flags,
    constant_check,
    constant_columns,
    constant_flags,
    curves_table,
    fold_curve,
    fold_flags,
    noise_margin,
    optimizer_steps,
    slope,
)
from segflow.model.metrics import METRIC_NAMES, constant_scores, per_image_scores

HEALTHY = [0.2, 0.4, 0.55, 0.6, 0.62, 0.63, 0.63, 0.629, 0.63, 0.628]  # levels off at epoch 6
STEPS = {"optimizer_steps": 1000}


def _history(values: list[float], column: str = "val_kaggle") -> pd.DataFrame:
    return pd.DataFrame({"epoch": np.arange(1, len(values) + 1), column: values})


def _kinds(values: list[float], metrics: dict | None = None, column: str = "val_kaggle") -> list:
    curve = fold_curve(_history(values, column), metrics or STEPS, "exp", 0, 1)
    return [flag.kind for flag in fold_flags(curve)]


def test_a_healthy_fold_has_no_flag() -> None:
    assert _kinds(HEALTHY) == []
    curve = fold_curve(_history(HEALTHY), STEPS, "exp", 0, 1)
    assert (curve.best_epoch, curve.epochs_after_best, curve.best_score) == (6, 4, 0.63)
    assert curve.final_score == pytest.approx(np.mean([0.629, 0.63, 0.628]))


def test_undertrained_fires_while_the_score_still_rises_at_the_last_epoch() -> None:
    assert _kinds([0.1, 0.2, 0.3, 0.4, 0.5]) == ["undertrained"]
    [flag] = fold_flags(fold_curve(_history([0.1, 0.2, 0.3, 0.4, 0.5]), STEPS, "exp", 2, 3))
    assert flag.subject == "exp round 2 fold 3"
    assert flag.line() == (
        "exp round 2 fold 3: undertrained: raise epochs or budget (best val_kaggle 0.5000 at "
        "epoch 5 of 5, last-3 trend +0.1000/epoch)"
    )
    # A loss monitor: falling is improving.
    losses = {"monitor": "val_loss", **STEPS}
    assert _kinds([0.9, 0.7, 0.5, 0.3], losses, "val_loss") == ["undertrained"]
    # A loss rising from the first epoch: no rise of the score, an early peak instead.
    assert _kinds([0.3, 0.5, 0.7, 0.9], losses, "val_loss") == ["overfit"]
    # Best in the last 10% of 20 epochs (epoch 19), still rising over the last 3.
    rising = [0.01 * i for i in range(18)] + [0.3, 0.299]
    assert _kinds(rising) == ["undertrained"]
    # The last 10% of 30 epochs is 3 epochs: a best 3 epochs before the end is not late.
    assert _kinds([0.01 * i for i in range(26)] + [0.6, 0.4, 0.5, 0.55]) == []
    assert _kinds([0.01 * i for i in range(26)] + [0.5, 0.55, 0.6, 0.58]) == ["undertrained"]


def test_undertrained_stays_silent_within_the_noise_margin() -> None:
    # Best at the last epoch, but the last three epochs are flat to 1e-4 per epoch.
    assert _kinds([0.5, 0.6, 0.6, 0.6, 0.6002]) == []
    assert _kinds([0.5]) == []  # one epoch has no trend
    assert _kinds(HEALTHY[:6]) == ["undertrained"]  # cut while rising: the same run flags


def test_overfit_fires_on_an_early_peak_with_clearly_worse_final_epochs() -> None:
    assert _kinds([0.3, 0.6, 0.5, 0.45, 0.4, 0.4]) == ["overfit"]
    curve = fold_curve(_history([0.3, 0.6, 0.5, 0.45, 0.4, 0.4]), STEPS, "exp", 0, 1)
    [flag] = fold_flags(curve)
    assert "best val_kaggle 0.6000 at epoch 2 of 6, final epochs 0.4167" in flag.detail
    # An early peak whose later epochs stay within max(0.01, 5% of the best): not overfit.
    assert _kinds([0.3, 0.6, 0.59, 0.595, 0.59, 0.595]) == []
    # A late peak and a drop: not an early peak.
    assert _kinds([0.3, 0.4, 0.5, 0.6, 0.3, 0.3]) == []
    # Too few epochs to tell.
    assert _kinds([0.6, 0.3, 0.3]) == []
    losses = {"monitor": "val_loss", **STEPS}
    assert _kinds([0.5, 0.3, 0.4, 0.5, 0.6, 0.7], losses, "val_loss") == ["overfit"]


def test_few_steps_from_recorded_or_estimated_steps() -> None:
    assert _kinds(HEALTHY, {"optimizer_steps": MIN_OPTIMIZER_STEPS - 1}) == ["few_steps"]
    assert _kinds(HEALTHY, {"optimizer_steps": MIN_OPTIMIZER_STEPS}) == []
    # Older metrics: 10 epochs of 100 // 16 = 6 batches (drop_last).
    old = {"n_train": 100, "epochs_trained": 10, "options": {"batch_size": 16}}
    assert optimizer_steps(old) == (60, True)
    [flag] = fold_flags(fold_curve(_history(HEALTHY), old, "exp", 0, 1))
    assert flag.kind == "few_steps" and "about 60 optimizer steps in 10 epochs" in flag.detail
    # n_train <= batch_size: one (short) batch per epoch.
    assert optimizer_steps({**old, "n_train": 16}) == (10, True)
    assert optimizer_steps({**old, "n_train": 17}) == (10, True)
    assert optimizer_steps({"optimizer_steps": 7, **old}) == (7, False)
    assert optimizer_steps({}) == (None, True) and _kinds(HEALTHY, {}) == []  # unknown: silent


def test_fold_curve_rejects_a_history_without_the_monitor() -> None:
    with pytest.raises(SegflowError, match="exp round 0 fold 1 history: no epoch and val_iou"):
        fold_curve(_history([0.5]), {"monitor": "iou"}, "exp", 0, 1)
    with pytest.raises(SegflowError, match="no epoch"):
        fold_curve(_history([]), {}, "exp", 0, 1)


def test_slope_and_curves_table() -> None:
    assert slope([1, 2, 3], [0.1, 0.3, 0.5]) == pytest.approx(0.2)
    assert math.isnan(slope([1], [0.5]))
    curves = [
        fold_curve(_history(HEALTHY), STEPS, "exp", 0, 0),
        fold_curve(_history([0.1, 0.2, 0.3]), {"optimizer_steps": 5}, "exp", 0, 1),
    ]
    table = curves_table(curves)
    assert table["flags"].tolist() == ["", "undertrained, few_steps"]
    assert table["optimizer_steps"].tolist() == [1000, 5]


def _masks(areas: list[int], side: int = 10) -> np.ndarray:
    """One (side x side) mask per area, the first ``area`` pixels set."""
    masks = np.zeros((len(areas), side * side), bool)
    for i, area in enumerate(areas):
        masks[i, :area] = True
    return masks.reshape(len(areas), side, side)


def test_constant_scores_are_the_metrics_of_constant_masks() -> None:
    # 4 of 10 masks empty (40%), 3 covering the whole image, 3 partly.
    areas = [0, 0, 0, 0, 100, 100, 100, 30, 60, 97]
    truths = _masks(areas)
    scores = {
        metric: constant_scores(np.array(areas)[:, None], 100, metric) for metric in METRIC_NAMES
    }
    assert scores["kaggle"]["all_empty"].mean() == pytest.approx(0.40)
    # All-foreground: IoU = area / 100; Kaggle counts thresholds 0.5..0.95 strictly below it.
    expected_full = [0, 0, 0, 0, 1, 1, 1, 0, 0.2, 1.0]
    assert scores["kaggle"]["all_foreground"].tolist() == pytest.approx(expected_full)
    for metric in METRIC_NAMES:
        empty = per_image_scores(np.zeros_like(truths), truths)[metric]
        full = per_image_scores(np.ones_like(truths), truths)[metric]
        assert scores[metric]["all_empty"].tolist() == pytest.approx(empty.tolist())
        assert scores[metric]["all_foreground"].tolist() == pytest.approx(full.tolist())


def test_constant_scores_average_the_classes() -> None:
    areas = np.array([[0, 100], [50, 0]])  # image 0: class 1 full; image 1: class 0 half
    scores = constant_scores(areas, 100, "dice")
    assert scores["all_empty"].tolist() == [0.5, 0.5]
    assert scores["all_foreground"].tolist() == pytest.approx([0.5, (2 * 50 / 150) / 2])
    with pytest.raises(SegflowError, match=r"shape \(N, K\)"):
        constant_scores(np.array([1, 2]), 100, "dice")


def test_noise_margin_is_the_95_percent_half_width_of_the_mean() -> None:
    assert noise_margin(np.array([1.0, -1.0, 1.0, -1.0])) == pytest.approx(
        1.96 * math.sqrt(4 / 3) / 2
    )
    assert noise_margin(np.zeros(5)) == 0.0
    assert noise_margin(np.array([0.3])) == math.inf


def test_near_constant_fires_within_noise_and_not_on_a_real_gain() -> None:
    rng = np.random.default_rng(0)
    empty = np.array([1.0] * 40 + [0.0] * 60)  # 40% empty masks
    constants = {"all_empty": empty, "all_foreground": np.full(100, 0.05)}
    # A model that is all-empty but for a few noisy images.
    noisy = empty.copy()
    noisy[rng.choice(100, 6, replace=False)] += rng.choice([-1.0, 1.0], 6) * 0.5
    noisy = noisy.clip(0, 1)
    check = constant_check(noisy, constants, "kaggle")
    assert check.best_constant == "all_empty" and check.const_empty == pytest.approx(0.4)
    assert check.const_full == pytest.approx(0.05) and check.near_constant
    assert abs(check.gain) <= check.noise
    # A model that also gets most non-empty images right.
    good = empty.copy()
    good[40:90] = 0.8
    check = constant_check(good, constants, "kaggle")
    assert check.gain == pytest.approx(0.4) and not check.near_constant
    # All-foreground is the better constant when most images are full.
    flipped = {"all_empty": np.full(100, 0.1), "all_foreground": np.full(100, 0.9)}
    assert constant_check(np.full(100, 0.9), flipped, "dice").best_constant == "all_foreground"
    with pytest.raises(SegflowError, match="no OOF images"):
        constant_check(np.array([]), constants, "kaggle")


def test_constant_flags_from_the_stage_table_and_its_csv(tmp_path) -> None:
    empty = np.array([1.0] * 5 + [0.0] * 5)
    constants = {"all_empty": empty, "all_foreground": np.zeros(10)}
    rows = [
        {"candidate": "weak", "round": 0, "tuned_metric": "dice", "tuned": 0.5},
        {"candidate": "strong", "round": 1, "tuned_metric": "dice", "tuned": 1.0},
    ]
    checks = [
        constant_check(empty, constants, "dice"),
        constant_check(np.ones(10), constants, "dice"),
    ]
    stages = pd.DataFrame([{**r, **constant_columns(c)} for r, c in zip(rows, checks, strict=True)])
    path = tmp_path / "stages.csv"
    stages.to_csv(path, index=False)
    for table in (stages, pd.read_csv(path)):
        [flag] = constant_flags(table)
        assert flag.kind == "near_constant" and flag.subject == "weak round 0"
        assert flag.detail == (
            "tuned OOF dice 0.5000; all-empty 0.5000, all-foreground 0.0000; gain +0.0000 "
            "<= noise 0.0000"
        )
    assert constant_flags(stages.drop(columns=["noise"])) == []  # an older stage table
    curve = fold_curve(_history([0.1, 0.2, 0.3]), STEPS, "exp", 0, 0)
    assert [f.kind for f in all_flags([curve], stages)] == ["undertrained", "near_constant"]
    assert [f.kind for f in all_flags([curve], None)] == ["undertrained"]
