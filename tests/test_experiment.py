"""Experiments from the config: typed options, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflow.errors import SegflowError
from segflow.experiment import load_experiment_values, parse_experiment


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
