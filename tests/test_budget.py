"""The time budget: the plan's arithmetic, timing on this machine, `segflow train --plan`, and
the workflow's plan_budget job (dry runs; one run of the data stages and the plan, no training).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO_ROOT, copy_workflow, planned_jobs, run_snakemake
from helpers import write_synthetic_arrays

from segflow.cli import main
from segflow.core.errors import SegflowError
from segflow.model import budget_measure
from segflow.model.budget import (
    REFIT,
    BudgetOptions,
    Measurement,
    TrainingCost,
    fold_sizes,
    make_plan,
    plan_budget,
    plan_epochs,
    planned_epochs,
    read_plan,
    refit_test_models,
    steps_per_epoch,
    training_costs,
)
from segflow.model.datasets import PseudoMixSampler, SegmentationArrays
from segflow.model.experiment import parse_experiment
from segflow.model.training.refit import RefitOptions, check_refit
from segflow.model.training.train_options import MIN_OPTIMIZER_STEPS

TINY = {
    "model": {
        "encoder": "mobilenet_v2",
        "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    },
    "augment": "d4",
    "train": {"epochs": 5, "batch_size": 8, "lr": 0.01},
}
# One second per step, validation and prediction free: epochs are easy to count by hand.
UNIT = TrainingCost(steps_per_epoch=10, step_seconds=1.0, epoch_extra_seconds=0.0, fixed_seconds=0)


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _costs(n: int, cost: TrainingCost = UNIT) -> list[TrainingCost]:
    return [cost] * n


# --------------------------------------------------------------------------- the arithmetic


def test_budget_is_split_in_the_ratio_of_the_configured_epochs() -> None:
    # a: 10 s per epoch, b: 20 s per epoch (2 trainings); configured 10 and 20 epochs.
    plan = plan_epochs(
        {"a": _costs(1), "b": _costs(2)},
        {"a": 10, "b": 20},
        budget_seconds=500.0,
        max_epochs={"a": 100, "b": 100},
    )
    # s * (10 * 10 + 20 * 20) = 500  ->  s = 1: exactly the configured epochs.
    assert plan.feasible and plan.epochs == {"a": 10, "b": 20}
    assert plan.estimated_seconds == pytest.approx(500.0)

    half = plan_epochs({"a": _costs(1), "b": _costs(2)}, {"a": 10, "b": 20}, 250.0)
    assert half.epochs == {"a": 5, "b": 10} and half.scale == pytest.approx(0.5)


def test_rounding_down_then_the_largest_remainders_fill_what_is_left() -> None:
    # s = 360 / 500: ideal a = 7.2, b = 14.4 -> 7 and 14 use 350 s; 10 s are left: b has the
    # larger remainder but its epoch costs 20 s, a's 10 s fits.
    plan = plan_epochs({"a": _costs(1), "b": _costs(2)}, {"a": 10, "b": 20}, 360.0)
    assert plan.epochs == {"a": 8, "b": 14}
    assert plan.estimated_seconds == pytest.approx(360.0)


def test_at_least_min_epochs_each() -> None:
    plan = plan_epochs({"a": _costs(1), "b": _costs(1)}, {"a": 1, "b": 50}, 200.0)
    assert plan.feasible and plan.epochs["a"] == 1 and plan.epochs["b"] >= 10
    plan = plan_epochs({"a": _costs(1)}, {"a": 10}, 1000.0, min_epochs=3, max_epochs={"a": 2})
    assert plan.epochs == {"a": 2}  # the cap (what was configured) wins over the minimum


def test_more_folds_give_fewer_epochs() -> None:
    measured = Measurement(0.1, 0.01, 0.02, 1.0, 0.1, 2.0)
    epochs = []
    for n_folds in (3, 5, 10):
        costs = training_costs(measured, [(400, 40)] * n_folds, 50, 0, 8, 0.3)
        assert len(costs) == n_folds
        epochs.append(plan_epochs({"a": list(costs.values())}, {"a": 10}, 600.0).epochs["a"])
    assert epochs[0] > epochs[1] > epochs[2] >= 1


def test_twice_the_budget_gives_about_twice_the_epochs() -> None:
    cost = TrainingCost(50, 0.2, 3.0, 20.0)
    kwargs = {"overhead_seconds": 30.0, "parallel_jobs": 1}
    one = plan_epochs({"a": _costs(5, cost)}, {"a": 10}, 3600.0, **kwargs).epochs["a"]
    two = plan_epochs({"a": _costs(5, cost)}, {"a": 10}, 7200.0, **kwargs).epochs["a"]
    # Uncapped (no max_epochs): the fixed costs make it a little over 2x.
    assert one >= 10 and 2 * one <= two <= 2 * one + 3


def test_parallel_jobs_divide_the_training_time() -> None:
    one = plan_epochs({"a": _costs(4)}, {"a": 10}, 400.0).epochs["a"]
    four = plan_epochs({"a": _costs(4)}, {"a": 10}, 400.0, parallel_jobs=4).epochs["a"]
    assert (one, four) == (10, 40)


def test_the_configured_epochs_cap_a_large_budget() -> None:
    plan = plan_epochs(
        {"a": _costs(1), "b": _costs(1)}, {"a": 4, "b": 6}, 1e6, max_epochs={"a": 4, "b": 6}
    )
    assert plan.epochs == {"a": 4, "b": 6} and plan.estimated_seconds == pytest.approx(100.0)


def test_an_infeasible_budget_plans_the_minimum_and_says_so() -> None:
    plan = plan_epochs({"a": _costs(5)}, {"a": 10}, 30.0, overhead_seconds=10.0)
    assert not plan.feasible and plan.epochs == {"a": 1} and plan.scale == 0
    assert plan.estimated_seconds == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"a": 10, "z": 1}}, "weights for"),
        ({"budget_seconds": 0.0}, "budget_seconds > 0"),
        ({"parallel_jobs": 0}, "parallel_jobs"),
        ({"trainings": {"a": [TrainingCost(0, 1.0, 0.0, 0.0)]}}, "costs nothing"),
    ],
)
def test_plan_epochs_refuses_inconsistent_arguments(kwargs: dict, message: str) -> None:
    arguments = {"trainings": {"a": _costs(1)}, "weights": {"a": 10}, "budget_seconds": 100.0}
    with pytest.raises(SegflowError, match=message):
        plan_epochs(**{**arguments, **kwargs})


def test_budget_options_are_checked() -> None:
    with pytest.raises(SegflowError, match=r"budget\.reserve_share"):
        BudgetOptions(minutes=10, reserve_share=1.0)
    with pytest.raises(SegflowError, match=r"budget\.max_epochs"):
        BudgetOptions(minutes=10, min_epochs=5, max_epochs=2)
    assert BudgetOptions().minutes is None  # off by default


# --------------------------------------------------------------------------- the cost model


@pytest.mark.parametrize(
    ("n_train", "batch_size", "n_pseudo", "share"),
    [(21, 8, 0, 0.3), (100, 16, 40, 0.3), (100, 16, 5, 0.3), (6, 8, 0, 0.3), (30, 8, 200, 0.5)],
)
def test_steps_per_epoch_match_the_training_loader(
    n_train: int, batch_size: int, n_pseudo: int, share: float
) -> None:
    draws = n_train
    if n_pseudo:
        draws = len(PseudoMixSampler(n_train, n_pseudo, share, torch.Generator()))
    loader = torch.utils.data.DataLoader(
        list(range(draws)), batch_size=batch_size, drop_last=n_train + n_pseudo > batch_size
    )
    assert steps_per_epoch(n_train, batch_size, n_pseudo, share) == len(loader)


def test_training_costs_count_every_fold_round_and_prediction() -> None:
    m = Measurement(
        step_seconds=0.5,
        val_seconds_per_image=0.01,
        predict_seconds_per_image=0.02,
        setup_seconds=3.0,
        checkpoint_seconds=0.2,
        startup_seconds=4.0,
    )
    costs = training_costs(
        m, [(80, 20), (90, 10)], n_test=50, pseudo_rounds=1, batch_size=10, max_pseudo_share=0.3
    )
    assert list(costs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = costs[(0, 0)]
    # round 1: + min(50 test images, int(0.3 / 0.7 * 80) = 34) pseudo-labelled draws
    assert first.steps_per_epoch == 8 and costs[(1, 0)].steps_per_epoch == 11
    assert first.epoch_seconds == pytest.approx(8 * 0.5 + 20 * 0.01 + 0.2)
    # 3 job start-ups, set-up, final validation, OOF (20) and test (50) prediction
    assert first.fixed_seconds == pytest.approx(12 + 3 + 0.2 + 70 * 0.02)


def test_fold_sizes_read_folds_csv(tmp_path: Path) -> None:
    arrays = write_synthetic_arrays(tmp_path / "a", n=30, n_folds=3)
    assert fold_sizes(arrays / "folds.csv") == [(20, 10)] * 3


def _plan(
    tmp_path: Path,
    minutes: float = 10.0,
    refits: dict[str, str] | None = None,
    **measured: float,
) -> dict:
    m = Measurement(0.1, 0.01, 0.01, 1.0, 0.1, 1.0)
    m = Measurement(**{**m.__dict__, **measured})
    return make_plan(
        BudgetOptions(minutes=minutes),
        {"tiny": TINY},
        {"tiny": 5},
        {"tiny": 8},
        {"tiny": m},
        [(20, 10), (20, 10), (20, 10)],
        n_test=4,
        pseudo_rounds=1,
        max_pseudo_share=0.3,
        parallel_jobs=1,
        refits=refits,
    )


def test_the_plan_lists_every_training_and_flags_an_infeasible_budget(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    assert plan["feasible"] and plan["warning"] is None
    assert plan["experiments"]["tiny"]["epochs"] == 5  # capped at the configured 5
    keys = [(r["experiment"], r["round"], r["fold"]) for r in plan["trainings"]]
    assert keys == [("tiny", r, f) for r in (0, 1) for f in (0, 1, 2)]
    assert planned_epochs(plan, "tiny", 1, 2, TINY) == 5

    tight = _plan(tmp_path, minutes=0.5, step_seconds=5.0)  # 6 x 2 steps x 5 s > 30 s
    assert not tight["feasible"] and tight["experiments"]["tiny"]["epochs"] == 1
    assert "cannot fit" in tight["warning"] and "budget.minutes = 0.5" in tight["warning"]


def test_planned_epochs_refuses_a_stale_or_incomplete_plan(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    edited = {**TINY, "train": {**TINY["train"], "lr": 0.1}}
    with pytest.raises(SegflowError, match="another configuration of experiment 'tiny'"):
        planned_epochs(plan, "tiny", 0, 0, edited)
    with pytest.raises(SegflowError, match="no training of 'tiny' round 2 fold 0"):
        planned_epochs(plan, "tiny", 2, 0, TINY)
    with pytest.raises(SegflowError, match="no experiment 'other'"):
        planned_epochs(plan, "other", 0, 0, TINY)
    (tmp_path / "old.json").write_text('{"format": 0}')
    with pytest.raises(SegflowError, match="snakemake -R plan_budget"):
        read_plan(tmp_path / "old.json")


def test_plan_budget_times_each_experiment_once(tmp_path: Path) -> None:
    arrays = write_synthetic_arrays(tmp_path / "a", n=30, n_folds=3)
    timed = []

    def measure(name, experiment):
        timed.append((name, experiment.train.batch_size))
        return Measurement(0.05, 0.01, 0.01, 0.5, 0.05, 0.5)

    small = {**TINY, "train": {**TINY["train"], "epochs": 20, "batch_size": 4}}
    plan = plan_budget(
        arrays,
        arrays / "folds.csv",
        {"tiny": TINY, "small": small},
        BudgetOptions(minutes=1.0),
        measure,
    )
    assert timed == [("small", 4), ("tiny", 8)]
    epochs = {name: info["epochs"] for name, info in plan["experiments"].items()}
    assert 1 <= epochs["tiny"] <= 5 and epochs["small"] >= epochs["tiny"]
    assert plan["estimated_seconds"] <= 60.0 and plan["feasible"]
    with pytest.raises(SegflowError, match="budget is off"):
        plan_budget(arrays, arrays / "folds.csv", {"tiny": TINY}, BudgetOptions(), measure)


# --------------------------------------------------------------------------- full refits


def test_a_refit_is_one_more_training_on_every_item_without_validation() -> None:
    m = Measurement(
        step_seconds=0.5,
        val_seconds_per_image=0.01,
        predict_seconds_per_image=0.02,
        setup_seconds=3.0,
        checkpoint_seconds=0.2,
        startup_seconds=4.0,
    )
    args = (m, [(80, 20), (90, 10)], 50, 1, 10, 0.3)
    plain = training_costs(*args)
    full = training_costs(*args, refit="full")
    assert list(full) == [(0, 0), (0, 1), (0, REFIT), (1, 0), (1, 1), (1, REFIT)]
    refit = full[(0, REFIT)]
    # 100 items of folds.csv, batch 10; round 1 adds min(50, int(0.3 / 0.7 * 100) = 42) draws.
    assert refit.steps_per_epoch == 10 and full[(1, REFIT)].steps_per_epoch == 14
    assert refit.epoch_seconds == pytest.approx(10 * 0.5 + 0.2)  # no validation
    # train + predict-test start-ups, set-up, the test prediction; no OOF, no final validation
    assert refit.fixed_seconds == pytest.approx(8 + 3 + 50 * 0.02)
    # The folds no longer predict the test set: one job and 50 images less each.
    assert full[(0, 0)].fixed_seconds == pytest.approx(plain[(0, 0)].fixed_seconds - 4 - 1.0)
    assert full[(0, 0)].epoch_seconds == plain[(0, 0)].epoch_seconds

    folds = training_costs(*args, refit="folds")  # the refit is only trained
    assert folds[(0, REFIT)].fixed_seconds == pytest.approx(4 + 3)
    assert folds[(0, 0)] == plain[(0, 0)]
    both = training_costs(*args, refit="both")
    assert both[(0, REFIT)] == refit and both[(0, 0)] == plain[(0, 0)]
    with pytest.raises(SegflowError, match="refit must be"):
        training_costs(*args, refit="auto")


# One second per step and nothing else: 3 folds of 20 training images (2 steps of 10), a refit
# on all 30 (3 steps); a one-minute budget without reserve.
STEPS_ONLY = Measurement(1.0, 0.0, 0.0, 0.0, 0.0, 0.0)


LONG = {**TINY, "train": {**TINY["train"], "epochs": 100, "batch_size": 10}}


def _refit_plan(
    refit: str | None,
    measured: Measurement = STEPS_ONLY,
    train_folds: list[int] | None = None,
    **budget: Any,
) -> dict:
    experiment = dict(LONG)
    if refit is not None:
        experiment["refit"] = {"enabled": True, "test_models": refit}
    return make_plan(
        BudgetOptions(**{"minutes": 1.0, "reserve_share": 0.0, **budget}),
        {"tiny": experiment},
        {"tiny": 100},
        {"tiny": 10},
        {"tiny": measured},
        [(20, 10)] * 3,
        n_test=10,
        pseudo_rounds=0,
        max_pseudo_share=0.3,
        parallel_jobs=1,
        refits={} if refit is None else {"tiny": refit},
        train_folds=train_folds,
    )


def test_the_plan_counts_the_refit_and_its_epochs_shrink_to_fit() -> None:
    without = _refit_plan(None)
    # 3 folds x 2 steps = 6 s per epoch: 10 epochs fill the 60 s.
    assert without["experiments"]["tiny"]["epochs"] == 10
    assert without["experiments"]["tiny"]["refit"] is None and without["refit_choice"] is None
    plan = _refit_plan("full")
    # + the refit's 3 steps: 9 s per epoch, 6 epochs (54 s; a 7th would be 63 s).
    info = plan["experiments"]["tiny"]
    assert info["epochs"] == 6 and plan["estimated_seconds"] == pytest.approx(54.0)
    assert plan["feasible"] and plan["estimated_seconds"] <= plan["budget"]["seconds"]
    assert info["refit"] == {
        "configured": "full",
        "test_models": "full",
        "trained": True,
        "epochs": 6,
    }
    full = [r for r in plan["trainings"] if r["fold"] == REFIT]
    assert full == [
        {
            "experiment": "tiny",
            "round": 0,
            "fold": REFIT,
            "epochs": 6,
            "steps_per_epoch": 3,
            "estimated_seconds": 18.0,
        }
    ]
    assert sum(r["estimated_seconds"] for r in plan["trainings"]) == pytest.approx(54.0)
    assert planned_epochs(plan, "tiny", 0, REFIT, LONG) == 6  # the refit section is no config
    assert refit_test_models(plan, "tiny") == "full"


def test_one_trained_fold_gets_the_whole_budget_and_its_refit_as_many_epochs() -> None:
    """folds.train_folds: [1] of 3: only fold 1's trainings are planned (2 s per epoch instead
    of 6: three times the epochs); a refit still trains on every item (3 steps)."""
    holdout = _refit_plan(None, train_folds=[1])
    assert holdout["experiments"]["tiny"]["epochs"] == 30  # 30 x 2 s = 60 s
    assert [(r["round"], r["fold"]) for r in holdout["trainings"]] == [(0, 1)]
    assert holdout["data"]["train_folds"] == [1] and holdout["data"]["folds"] == 3
    assert _refit_plan(None)["data"]["train_folds"] == [0, 1, 2]
    with pytest.raises(SegflowError, match="no training of 'tiny' round 0 fold 0"):
        planned_epochs(holdout, "tiny", 0, 0, LONG)
    refit = _refit_plan("full", train_folds=[1])
    assert refit["experiments"]["tiny"]["epochs"] == 12  # (2 + 3) s x 12 = 60 s
    assert [r["fold"] for r in refit["trainings"]] == [1, REFIT]
    assert planned_epochs(refit, "tiny", 0, REFIT, LONG) == 12
    costs = training_costs(STEPS_ONLY, [(20, 10)] * 3, 0, 1, 10, 0.3, train_folds=[0, 2])
    assert list(costs) == [(0, 0), (0, 2), (1, 0), (1, 2)]


def test_the_refit_predicting_the_test_set_spares_the_folds_test_prediction() -> None:
    # 0.5 s per predicted image, 10 test images: the folds predict 10 OOF images each, and the
    # test set each (30 s of test prediction) or the refit alone does (5 s).
    measured = Measurement(1.0, 0.0, 0.5, 0.0, 0.0, 0.0)
    full = _refit_plan("full", measured, minutes=2.0)
    folds = _refit_plan("folds", measured, minutes=2.0)
    # fixed: full = 15 (OOF) + 5 (refit's test) = 20 s -> (120 - 20) / 9 = 11 epochs;
    # folds = 15 + 15 (the folds' test) = 30 s -> (120 - 30) / 9 = 10 epochs.
    assert full["experiments"]["tiny"]["epochs"] == 11
    assert folds["experiments"]["tiny"]["epochs"] == 10
    assert full["estimated_seconds"] == pytest.approx(20 + 11 * 9)


@pytest.mark.parametrize(
    ("step_seconds", "choice", "epochs", "fewest"),
    # 1 s: with the refit 6 epochs x 2 steps = 12 >= 12 -> the refit predicts the test set.
    # 1.5 s: with the refit 4 epochs (54 s) x 2 = 8 < 12 -> the folds, 6 epochs, no refit.
    [(1.0, "full", 6, 12), (1.5, "folds", 6, 8)],
)
def test_auto_takes_the_refit_only_when_every_fold_keeps_min_fold_steps(
    step_seconds: float, choice: str, epochs: int, fewest: int
) -> None:
    measured = Measurement(step_seconds, 0.0, 0.0, 0.0, 0.0, 0.0)
    plan = _refit_plan("auto", measured, min_fold_steps=12)
    chosen = plan["refit_choice"]
    assert chosen["choice"] == choice and chosen["experiments"] == ["tiny"]
    assert chosen["min_fold_steps"] == 12
    options = chosen["options"]
    assert options["full"]["fewest_fold_steps"] == fewest
    assert options["folds"]["epochs"] == {"tiny": int(60 // (6 * step_seconds))}
    for option in options.values():  # both estimates fit
        assert option["feasible"] and option["estimated_seconds"] <= 60.0
    info = plan["experiments"]["tiny"]
    assert info["epochs"] == epochs
    assert plan["estimated_seconds"] == options[choice]["estimated_seconds"]
    full = [r for r in plan["trainings"] if r["fold"] == REFIT]
    if choice == "full":
        assert info["refit"] == {
            "configured": "auto",
            "test_models": "full",
            "trained": True,
            "epochs": 6,
        }
        assert [r["epochs"] for r in full] == [6]
        assert refit_test_models(plan, "tiny") == "full"
        assert ">= budget.min_fold_steps = 12" in chosen["reason"]
    else:
        assert info["refit"]["trained"] is False and info["refit"]["epochs"] is None
        assert full == [] and refit_test_models(plan, "tiny") is None
        assert "only 8 optimizer steps < budget.min_fold_steps = 12" in chosen["reason"]
        with pytest.raises(SegflowError, match="no full refit of 'tiny' round 0 planned"):
            planned_epochs(plan, "tiny", 0, REFIT, LONG)


def test_auto_keeps_the_folds_when_the_refit_does_not_fit() -> None:
    # 10 s per step: even one epoch with the refit (90 s) overruns the minute; without it, 60 s.
    plan = _refit_plan("auto", Measurement(10.0, 0.0, 0.0, 0.0, 0.0, 0.0), min_fold_steps=0)
    assert plan["refit_choice"]["choice"] == "folds" and plan["feasible"]
    assert "does not fit" in plan["refit_choice"]["reason"]
    assert not plan["refit_choice"]["options"]["full"]["feasible"]
    # The default threshold is the diagnostics' "few steps" one.
    assert BudgetOptions().min_fold_steps == MIN_OPTIMIZER_STEPS == 300


def test_refit_options_and_auto_without_a_budget_are_refused_in_one_line() -> None:
    experiments = {"a": {"refit": {"enabled": True, "test_models": "auto"}}}
    with pytest.raises(SegflowError) as error:
        check_refit(experiments, budget_minutes=None)
    message = str(error.value)
    assert "\n" not in message
    assert (
        message.startswith("experiments.a.refit.test_models: auto") and "budget.minutes" in message
    )
    check_refit(experiments, budget_minutes=10)
    # A disabled refit's options are ignored, as everywhere.
    check_refit({"a": {"refit": {"enabled": False, "test_models": "auto"}}}, None)
    assert RefitOptions(enabled=True, test_models="auto").test_models == "auto"
    with pytest.raises(SegflowError, match=r"budget\.min_fold_steps must be an integer >= 0"):
        BudgetOptions(minutes=5, min_fold_steps=-1)
    with pytest.raises(SegflowError, match="test_models must be full, folds, both or auto"):
        _refit_plan("best")


def _refit_args(arrays_dir: Path, out: Path, plan: Path, metrics: list[Path]) -> list[str]:
    args = _train_args(arrays_dir, out, plan)
    fold = args.index("--fold")
    return [*args[:fold], "--refit-from", *map(str, metrics), *args[fold + 2 :]]


def test_a_refit_trains_the_plans_epochs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "a", n=32, n_empty=8)
    metrics = tmp_path / "fold0" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"best_epoch": 1, "epochs_trained": 1}))
    plan = _plan(tmp_path, refits={"tiny": "full"})
    assert [r["epochs"] for r in plan["trainings"] if r["fold"] == REFIT] == [5, 5]
    plan["trainings"] = [{**r, "epochs": 2 if r["fold"] == REFIT else 3} for r in plan["trainings"]]
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    args = _refit_args(arrays_dir, tmp_path / "run", tmp_path / "plan.json", [metrics])
    assert main(args) == 0
    written = json.loads((tmp_path / "run" / "out" / "metrics.json").read_text())
    # The plan's 2 epochs, not the folds' median best epoch (1), nor a fold's planned 3.
    assert written["epochs_trained"] == 2 and written["refit_epochs_from"] == "plan"
    assert written["refit"] and written["refit_best_epochs"] == [1]

    # A plan whose auto choice kept the folds has no refit to train.
    plan["trainings"] = [r for r in plan["trainings"] if r["fold"] != REFIT]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = _refit_args(arrays_dir, tmp_path / "none", tmp_path / "plan.json", [metrics])
    assert main(args) == 2
    assert "no full refit of 'tiny' round 0 planned" in capsys.readouterr().err
    assert not (tmp_path / "none" / "out").exists()


def test_plan_budget_plans_the_refits_its_experiments_ask_for(tmp_path: Path) -> None:
    arrays = write_synthetic_arrays(tmp_path / "a", n=30, n_folds=3)
    refit = {"enabled": True, "test_models": "auto"}
    plan = plan_budget(
        arrays,
        arrays / "folds.csv",
        {"tiny": {**TINY, "refit": refit}, "other": {**TINY, "refit": {"enabled": False}}},
        BudgetOptions(minutes=10.0, min_fold_steps=1),
        lambda name, experiment: Measurement(0.05, 0.01, 0.01, 0.5, 0.05, 0.5),
    )
    assert plan["refit_choice"]["experiments"] == ["tiny"]
    assert plan["refit_choice"]["choice"] == "full"  # ten minutes are plenty
    assert plan["experiments"]["other"]["refit"] is None
    assert planned_epochs(plan, "tiny", 0, REFIT, TINY) == 5  # the refit's own section aside


# --------------------------------------------------------------------------- timing here


def test_measure_experiment_times_the_real_training_step(tmp_path: Path) -> None:
    from segflow.model.inference.predict import PredictOptions

    arrays_dir = write_synthetic_arrays(tmp_path / "a", n=32, n_empty=8)
    arrays = SegmentationArrays.open(arrays_dir)
    experiment = parse_experiment("tiny", TINY, in_channels=1)
    steps = []
    original = budget_measure._StepClock.__iter__

    def counting(self):
        for batch in original(self):
            steps.append(batch["image"].shape)
            yield batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget_measure._StepClock, "__iter__", counting)
        measured = budget_measure.measure_experiment(
            arrays, arrays_dir / "folds.csv", experiment, PredictOptions(tta="hflip"), 2, 1, 0.5
        )
    # 2 warm-up + 2 timed steps of full batches, although an epoch has 2 batches only.
    assert len(steps) == 4 and all(shape[0] == 8 for shape in steps)
    for name in ("step_seconds", "val_seconds_per_image", "predict_seconds_per_image"):
        assert 0 < getattr(measured, name) < 60, name
    assert measured.checkpoint_seconds > 0 and measured.startup_seconds == 0.5


# --------------------------------------------------------------------------- segflow train --plan


def _train_args(arrays_dir: Path, out: Path, plan: Path, experiment: dict = TINY) -> list[str]:
    return [
        "train",
        "--arrays-dir",
        str(arrays_dir),
        "--folds",
        str(arrays_dir / "folds.csv"),
        "--fold",
        "1",
        "--name",
        "tiny",
        "--experiment",
        json.dumps(experiment),
        "--out-dir",
        str(out / "out"),
        "--resume-dir",
        str(out / "resume"),
        "--plan",
        str(plan),
        "--round",
        "0",
    ]


def test_train_follows_the_plan_and_is_deterministic_given_it(tmp_path: Path) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "a", n=32, n_empty=8)
    plan = _plan(tmp_path, minutes=10.0)
    plan["trainings"] = [{**r, "epochs": 2} for r in plan["trainings"]]  # TINY says 5
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    assert main(_train_args(arrays_dir, tmp_path / "one", tmp_path / "plan.json")) == 0
    assert main(_train_args(arrays_dir, tmp_path / "two", tmp_path / "plan.json")) == 0
    metrics = json.loads((tmp_path / "one" / "out" / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["options"]["epochs"] == 2
    first = (tmp_path / "one" / "out" / "model.pt").read_bytes()
    assert first == (tmp_path / "two" / "out" / "model.pt").read_bytes()


def test_train_refuses_a_plan_for_another_experiment_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "a", n=32, n_empty=8)
    (tmp_path / "plan.json").write_text(json.dumps(_plan(tmp_path)))
    edited = {**TINY, "train": {**TINY["train"], "batch_size": 4}}
    status = main(_train_args(arrays_dir, tmp_path / "run", tmp_path / "plan.json", edited))
    assert status == 2
    assert "another configuration of experiment 'tiny'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "out" / "model.pt").exists()


def test_plan_budget_command_writes_a_plan_that_train_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "a", n=32, n_empty=8)
    monkeypatch.setattr(budget_measure, "process_startup_seconds", lambda: 1.0)
    out = tmp_path / "budget" / "plan.json"
    args = [
        "plan-budget",
        "--arrays-dir",
        str(arrays_dir),
        "--folds",
        str(arrays_dir / "folds.csv"),
        "--experiments",
        json.dumps({"tiny": TINY}),
        "--predict",
        json.dumps({"tta": "hflip", "batch_size": 8}),
        "--pseudo-rounds",
        "1",
        "--minutes",
        "60",
        "--measure-steps",
        "2",
        "--out",
        str(out),
    ]
    status = main(args)
    assert status == 0
    plan = read_plan(out)
    assert set(plan["provenance"]) == {"segflow_version", "seed", "config_hash"}
    assert plan["feasible"] and plan["experiments"]["tiny"]["epochs"] == 5  # an hour is plenty
    assert len(plan["trainings"]) == 3 * 2  # folds x rounds
    assert plan["experiments"]["tiny"]["measured"]["startup_seconds"] == 1.0
    assert plan["machine"]["threads"] == 1 and plan["budget"]["parallel_jobs"] == 1
    assert plan["data"]["train_folds"] == [0, 1, 2]
    holdout = tmp_path / "budget" / "holdout.json"
    argv = [*args[:-1], str(holdout), "--train-folds", "2"]
    assert main(argv) == 0
    plan = read_plan(holdout)
    assert {(r["round"], r["fold"]) for r in plan["trainings"]} == {(0, 2), (1, 2)}
    assert plan["provenance"]["config_hash"] != read_plan(out)["provenance"]["config_hash"]
    assert main([*args[:-1], str(holdout), "--train-folds", "3"]) == 2


def test_plan_budget_command_refuses_an_unknown_predict_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "a", n=32, n_empty=8)
    args = [
        "plan-budget",
        "--arrays-dir",
        str(arrays_dir),
        "--folds",
        str(arrays_dir / "folds.csv"),
    ]
    args += ["--experiments", json.dumps({"tiny": TINY}), "--predict", '{"ttaa": "d4"}']
    assert main([*args, "--minutes", "5", "--out", str(tmp_path / "p.json")]) == 2
    assert "unknown key predict.ttaa" in capsys.readouterr().err


# --------------------------------------------------------------------------- the workflow

SMALL = {
    "demo": {"n_train": 60, "n_test": 20, "seed": 5},
    "folds": {"n_folds": 2},
    "run_experiments": ["tiny"],
    "experiments": {"tiny": TINY},
    "pseudo": {"rounds": 1, "max_uncertain_share": 1.0},
}


def _write(workdir: Path, name: str, config: dict) -> str:
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


def _dag_edges(workdir: Path, config: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """(node id -> rule, edges (from, to)) of the workflow's DAG (`snakemake --dag`)."""
    result = run_snakemake(workdir, "--dag", "--configfile", config)
    nodes = {m[1]: m[2] for m in re.finditer(r'^\s*(\d+)\[label = "(\w+)', result.stdout, re.M)}
    edges = set(re.findall(r"^\s*(\d+) -> (\d+)", result.stdout, re.M))
    return nodes, edges


def test_plan_budget_is_declared_twice_identical_but_for_being_a_checkpoint() -> None:
    """budget.smk declares the rule as a checkpoint (refit.test_models auto) or a plain rule;
    the two declarations must not drift apart."""
    text = (REPO_ROOT / "workflow" / "rules" / "budget.smk").read_text()
    checkpoint, rule = text.split("\nelse:\n")
    checkpoint = checkpoint[checkpoint.index("    checkpoint plan_budget:") :]
    rule = rule[rule.index("    rule plan_budget:") :]
    rule = rule[: m.start()] if (m := re.search(r"^\S", rule, re.M)) else rule  # the else block
    assert checkpoint.count("plan_budget:") == rule.count("plan_budget:") == 1
    assert (
        checkpoint.replace("checkpoint plan_budget:", "rule plan_budget:").strip() == rule.strip()
    )
    assert "shell:" in rule and "params:" in rule


@pytest.mark.workflow
def test_dry_run_with_a_budget_plans_before_every_training(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    off = planned_jobs(
        workdir, "--configfile", _write(workdir, "off.yaml", {**SMALL, "budget": {"minutes": None}})
    )
    on = planned_jobs(
        workdir, "--configfile", _write(workdir, "on.yaml", {**SMALL, "budget": {"minutes": 20}})
    )
    # Without any budget key (a config from before the budget existed): the same DAG as off.
    base = workdir / "config" / "config.yaml"
    base.write_text(re.sub(r"\nbudget:\n  minutes: null\n", "\n", base.read_text()))
    assert "budget" not in yaml.safe_load(base.read_text())
    absent = planned_jobs(workdir, "--configfile", _write(workdir, "absent.yaml", SMALL))
    assert "plan_budget" not in off and off == absent
    assert off["train_fold"] == 4  # 2 folds x 2 rounds
    assert on == {**off, "plan_budget": 1}

    nodes, edges = _dag_edges(workdir, "on.yaml")
    plan = [node for node, rule in nodes.items() if rule == "plan_budget"]
    trainings = [node for node, rule in nodes.items() if rule == "train_fold"]
    assert len(plan) == 1 and len(trainings) == 4
    assert all((plan[0], node) in edges for node in trainings)

    commands = run_snakemake(workdir, "-n", "-p", "--configfile", "on.yaml").stdout
    trains = [line for line in commands.splitlines() if "segflow train " in line]
    assert len(trains) == 4 and all("--plan results/budget/plan.json" in t for t in trains)
    assert sum("--round 1 " in t for t in trains) == 2
    commands = run_snakemake(workdir, "-n", "-p", "--configfile", "off.yaml").stdout
    assert commands.count("segflow train ") == 4
    assert "--plan" not in commands and "plan-budget" not in commands


@pytest.mark.workflow
def test_the_plan_is_cached_and_made_again_only_when_its_inputs_change(tmp_path: Path) -> None:
    """Runs the data stages and plan_budget (no training), then dry runs."""
    workdir = copy_workflow(tmp_path / "wf")
    config = {
        **SMALL,
        "budget": {"minutes": 20, "measure_steps": 2},
        "max_threads": 1,
    }
    name = _write(workdir, "budget.yaml", config)
    target = "results/budget/plan.json"
    run_snakemake(workdir, target, "--configfile", name)
    plan = read_plan(workdir / target)
    assert {r["round"] for r in plan["trainings"]} == {0, 1} and plan["data"]["folds"] == 2
    triggers = ("--rerun-triggers", "mtime", "params", "input", "code")
    assert planned_jobs(workdir, target, "--configfile", name, *triggers) == {}
    # Unrelated to the plan: nothing to do.
    unrelated = _write(workdir, "post.yaml", {**config, "postprocess": {"thresholds": [0.5]}})
    assert planned_jobs(workdir, target, "--configfile", unrelated, *triggers) == {}
    for change in (
        {"budget": {"minutes": 40, "measure_steps": 2}},
        {"experiments": {"tiny": {**TINY, "train": {**TINY["train"], "lr": 0.02}}}},
        {"predict": {"tta": "vflip"}},  # prediction time is in the plan (the default is d4)
    ):
        changed = _write(workdir, "changed.yaml", {**config, **change})
        assert planned_jobs(workdir, target, "--configfile", changed, *triggers) == {
            "plan_budget": 1
        }, change
