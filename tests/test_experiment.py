"""Experiments from the config: typed options, errors naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from segflow.core.errors import SegflowError
from segflow.model.experiment import (
    check_experiment_names,
    load_experiment_values,
    parse_experiment,
)


def test_experiment_parsing_names_bad_keys(tmp_path: Path) -> None:
    values = {"model": {"arch": "FPN"}, "loss": {"bce": 1, "lovasz": 0.5}, "augment": "heavy"}
    experiment = parse_experiment("fpn", values, in_channels=3)
    assert experiment.model.arch == "FPN" and experiment.model.in_channels == 3
    assert experiment.loss == {"bce": 1.0, "lovasz": 0.5}
    with pytest.raises(SegflowError, match=r"experiments\.fpn\.model\.archh"):
        parse_experiment("fpn", {"model": {"archh": "FPN"}}, 1)
    with pytest.raises(SegflowError, match=r"experiments\.fpn\.optimizer"):
        parse_experiment("fpn", {"optimizer": "adam"}, 1)
    (tmp_path / "exp.yaml").write_text("model:\n  arch: Unet\n")
    assert load_experiment_values(str(tmp_path / "exp.yaml")) == {"model": {"arch": "Unet"}}
    assert load_experiment_values('{"loss": {"dice": 1}}') == {"loss": {"dice": 1}}


def test_input_channels_and_classes_come_from_the_data() -> None:
    experiment = parse_experiment("multi", {"model": {"arch": "Unet"}}, in_channels=1, classes=4)
    assert (experiment.model.in_channels, experiment.model.classes) == (1, 4)
    for key in ("in_channels", "classes"):
        with pytest.raises(SegflowError, match=rf"experiments\.x\.model\.{key} is set by the data"):
            parse_experiment("x", {"model": {key: 3}}, in_channels=1)


def test_loss_terms_with_options_are_parsed_and_checked_against_the_classes() -> None:
    values = {
        "loss": {
            "bce": {"weight": 1, "pos_weight": [2, 3]},
            "lovasz": {"weight": 0.5, "per_image": True},
            "dice": 1,
        }
    }
    experiment = parse_experiment("two", values, in_channels=1, classes=2)
    assert experiment.loss == {
        "bce": {"weight": 1.0, "pos_weight": [2.0, 3.0]},
        "lovasz": {"weight": 0.5, "per_image": True},
        "dice": 1.0,
    }
    with pytest.raises(SegflowError, match=r"^experiments\.one\.loss\.bce\.pos_weight: 2 values"):
        parse_experiment("one", values, in_channels=1, classes=1)
    bad = {"loss": {"focal": {"weight": 1, "gama": 2}}}
    with pytest.raises(
        SegflowError,
        match=r"^experiments\.x\.loss\.focal\.gama: unknown option; valid for focal: "
        r"weight, gamma, alpha$",
    ):
        parse_experiment("x", bad, in_channels=1)
    with pytest.raises(SegflowError, match=r"^experiments\.x\.loss\.focal\.gamma: must be"):
        parse_experiment("x", {"loss": {"focal": {"weight": 1, "gamma": -1}}}, in_channels=1)
    with pytest.raises(SegflowError, match=r"^experiments\.x\.loss: unknown loss term 'dise'"):
        parse_experiment("x", {"loss": {"dise": 1}}, in_channels=1)


def test_loss_options_reach_segflow_train_json_and_the_resume_hash() -> None:
    """The workflow passes the experiment as JSON (common.smk experiment_json): options survive
    it, and they change the resume hash while the short form keeps its old hash."""
    from segflow.model.models import ModelSpec
    from segflow.model.training.checkpointing import config_hash
    from segflow.model.training.train_options import TrainOptions

    def loss_hash(loss: dict) -> str:
        text = json.dumps({"loss": loss}, sort_keys=True)
        experiment = parse_experiment("e", load_experiment_values(text), in_channels=1)
        spec = ModelSpec(arch="Unet", encoder="resnet18")
        return config_hash(TrainOptions(), spec, 0, experiment.loss, None, "d4", {"data": "d"})

    short = loss_hash({"bce": 1})
    spec = ModelSpec(arch="Unet", encoder="resnet18")
    assert short == config_hash(TrainOptions(), spec, 0, {"bce": 1.0}, None, "d4", {"data": "d"})
    assert loss_hash({"bce": {"weight": 1.0}}) == short
    weighted = loss_hash({"bce": {"weight": 1, "pos_weight": 3.0}})
    assert weighted != short
    assert loss_hash({"bce": {"weight": 1, "pos_weight": 2.0}}) not in (short, weighted)


def test_a_fold_trains_with_term_options_and_ohem(tmp_path: Path) -> None:
    """The options reach training: a pos-weighted bce under OHEM next to a per-image lovasz."""
    import math

    from helpers import write_synthetic_arrays

    from segflow.model.training.train import train_fold

    arrays_dir = write_synthetic_arrays(tmp_path / "arrays", n=12, size=32)
    values = {
        "model": {
            "encoder": "mobilenet_v2",
            "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        },
        "loss": {
            "bce": {"weight": 1, "pos_weight": 3.0},
            "lovasz": {"weight": 0.5, "per_image": True},
        },
        "ohem_fraction": 0.5,
        "train": {"epochs": 1, "batch_size": 4},
    }
    experiment = parse_experiment("opts", values, in_channels=1)
    common = {"out_dir": tmp_path / "out", "resume_dir": tmp_path / "resume"}
    metrics = train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        dataclasses.replace(experiment, augment="none"),
        **common,
    )
    assert math.isfinite(metrics["score"]) and (tmp_path / "out" / "model.pt").is_file()
    plain = parse_experiment("plain", {**values, "loss": {"bce": 1, "lovasz": 0.5}}, 1)
    common["out_dir"] = tmp_path / "plain"
    other = train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        dataclasses.replace(plain, augment="none"),
        **common,
    )
    assert other["provenance"]["config_hash"] != metrics["provenance"]["config_hash"]


@pytest.mark.parametrize("name", ["my exp", "a/b", "x:1", "ü", "..", ".", "", 3])
def test_experiment_names_outside_the_wildcard_pattern_are_refused(name: object) -> None:
    check_experiment_names({"fpn_r18": {}, "v1.2-b_c": {}}, ["fpn_r18"])
    with pytest.raises(SegflowError, match=rf"^experiments\.{name}: the experiment name") as info:
        check_experiment_names({"ok": {}, name: {}}, None)
    assert str(info.value).endswith("rename it here")
    with pytest.raises(SegflowError, match=r"; rename it here and in run_experiments$"):
        check_experiment_names({"ok": {}, name: {}}, ["ok", name])
