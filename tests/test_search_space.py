"""Search config checks (one line naming search.<study>.space.<path>), the study id and how a
trial's values enter the experiment."""

from __future__ import annotations

import copy

import pytest

from segflow.core.errors import SegflowError
from segflow.search.space import apply_params, check_search, direction, study_id

EXPERIMENTS = {
    "fpn_r18": {
        "model": {"arch": "FPN", "encoder": "resnet18"},
        "loss": {"bce": 1.0, "lovasz": {"weight": 0.5, "per_image": True}},
        "train": {"epochs": 10, "lr": 0.001},
    }
}
STUDY = {
    "base": "fpn_r18",
    "space": {
        "train.lr": {"log_uniform": [1.0e-4, 3.0e-3]},
        "model.encoder": {"choice": ["resnet18", "resnet34", "timm-tf_efficientnet_lite0"]},
        "loss.lovasz": {"uniform": [0.0, 1.0]},
        "augment": {"choice": ["d4", "heavy"]},
    },
    "sampler": "tpe",
    "pruner": "median",
    "pruner_startup_trials": 5,
    "n_trials": 40,
    "workers": 4,
    "folds": [0],
    "trial_epochs": 8,
    "seed": 0,
    "storage": None,
    "heartbeat_seconds": 30,
}


def study(**overrides: object) -> dict:
    return {**copy.deepcopy(STUDY), **overrides}


def test_the_issue_example_is_valid() -> None:
    check_search({"lr_and_loss": study()}, EXPERIMENTS, n_folds=5)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": {"uniform": [0.1, 0.2]}}, "space.train.lrr: unknown field train.lrr"),
        ({"modle.encoder": {"choice": ["resnet18"]}}, "space.modle.encoder: unknown experiment"),
        ({"loss.lovaz": {"uniform": [0.0, 1.0]}}, "space.loss.lovaz: unknown field"),
        ({"train.lr": {"uniform": [0.01, 0.01]}}, "space.train.lr: empty range"),
        ({"train.lr": {"log_uniform": [0.0, 0.01]}}, "space.train.lr: log_uniform needs low > 0"),
        ({"train.lr": {"choice": []}}, "space.train.lr: choice needs a non-empty list"),
        ({"train.optimizer": {"choice": ["adamw", "adamx"]}}, "space.train.optimizer: 'adamx'"),
        ({"train.lr": {"uniform": [-1.0, 0.01]}}, "space.train.lr: -1.0 is not valid"),
        (
            {"model.encoder": {"choice": ["resnet18", "resnet_99"]}},
            "space.model.encoder: 'resnet_99'",
        ),
        ({"augment": {"choice": ["d4", "medium"]}}, "space.augment: augment 'medium'"),
        ({"train.epochs": {"int_uniform": [2, 8]}}, "space.train.epochs: train.epochs cannot"),
        ({"refit.enabled": {"choice": [True, False]}}, "space.refit.enabled: refit cannot"),
        ({"train.lr": {"normal": [0.1, 0.2]}}, "space.train.lr: unknown distribution"),
    ],
    ids=[
        "unknown-train-field",
        "unknown-section",
        "unknown-loss-term",
        "empty-range",
        "log-from-zero",
        "empty-choice",
        "bad-optimizer",
        "negative-lr",
        "unknown-encoder",
        "unknown-augment",
        "epochs",
        "refit",
        "unknown-distribution",
    ],
)
def test_a_bad_space_is_refused_naming_the_key(space: dict, message: str) -> None:
    with pytest.raises(SegflowError) as raised:
        check_search({"lr_and_loss": study(space=space)}, EXPERIMENTS, n_folds=5)
    text = str(raised.value)
    assert text.startswith("search.lr_and_loss.") and message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base": "unet"}, "search.s.base: unknown experiment 'unet'"),
        ({"folds": [5]}, "search.s.folds: fold 5 does not exist"),
        ({"sampler": "grid"}, "search.s.space.train.lr: sampler grid searches choice lists"),
    ],
)
def test_bad_study_settings_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(SegflowError, match=message.replace(".", r"\.")):
        check_search({"s": study(**overrides)}, EXPERIMENTS, n_folds=5)


def test_a_study_named_like_an_experiment_is_refused() -> None:
    with pytest.raises(SegflowError, match="already configured"):
        check_search({"fpn_r18": study()}, EXPERIMENTS, n_folds=5)


def test_the_study_id_follows_the_space_and_the_base_but_not_the_trial_count() -> None:
    base = EXPERIMENTS["fpn_r18"]
    first = study_id("s", study(), base)
    assert first.startswith("s-") and first == study_id("s", study(), copy.deepcopy(base))
    assert study_id("s", study(n_trials=80, workers=1, storage="sqlite:///x.db"), base) == first
    narrower = study(space={"train.lr": {"log_uniform": [1.0e-4, 1.0e-3]}})
    assert study_id("s", narrower, base) != first
    other_base = {**base, "train": {"epochs": 10, "lr": 0.001, "batch_size": 8}}
    assert study_id("s", study(), other_base) != first
    assert study_id("s", study(trial_epochs=4), base) != first
    # The refit is no part of what a trial trains.
    assert study_id("s", study(), {**base, "refit": {"enabled": True}}) == first


def test_trial_values_enter_a_copy_of_the_base_experiment() -> None:
    base = EXPERIMENTS["fpn_r18"]
    before = copy.deepcopy(base)
    values = apply_params(
        base,
        {"train.lr": 0.002, "model.encoder": "resnet34", "loss.lovasz": 0.25, "augment": "heavy"},
    )
    assert base == before
    assert values["train"] == {"epochs": 10, "lr": 0.002}
    assert values["model"]["encoder"] == "resnet34"
    # A term given as a mapping keeps its options: the value is its weight.
    assert values["loss"]["lovasz"] == {"weight": 0.25, "per_image": True}
    assert apply_params(base, {"loss.dice": 1.0})["loss"]["dice"] == 1.0
    assert values["augment"] == "heavy"


def test_the_direction_follows_the_monitor() -> None:
    assert direction(EXPERIMENTS["fpn_r18"]) == "maximize"
    assert direction({"train": {"monitor": "val_loss"}}) == "minimize"
