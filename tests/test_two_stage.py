"""Two-stage training (train.init_from), encoder freezing and the full-data refit.

The same tiny data and model as tests/test_train.py: 32 images of 32x32, a mobilenet_v2 encoder
cut to 3 stages, one CPU thread; each run is a few epochs of a few batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from helpers import write_synthetic_arrays

from segflow.artifacts.layout import group_by_experiment
from segflow.core.data_stamp import hash_file
from segflow.core.errors import SegflowError
from segflow.model.experiment import Experiment, check_init_from, parse_experiment
from segflow.model.models import (
    ModelSpec,
    SnapshotEnsemble,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from segflow.model.training import train as train_module
from segflow.model.training.checkpointing import cpu_state
from segflow.model.training.refit import RefitOptions, check_refit, refit_epochs
from segflow.model.training.train import TrainOptions, train_fold, train_full
from segflow.model.training.transfer import load_init_checkpoint, set_encoder_frozen

SPEC = ModelSpec(encoder="mobilenet_v2", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
LOSS = {"bce": 1.0, "dice": 1.0}
FAST = {"epochs": 2, "batch_size": 8, "lr": 1e-2}
_TRAIN_EPOCH = train_module._FoldTrainer.train_epoch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def arrays_dir(tmp_path: Path) -> Path:
    return write_synthetic_arrays(tmp_path / "preprocess", n=32, n_empty=8)


# The input normalisation planted checkpoints were "trained" with (not the data's statistics).
PLANTED_MEAN, PLANTED_STD = [0.3], [0.2]


def _plant(path: Path, seed: int, spec: ModelSpec = SPEC) -> dict[str, torch.Tensor]:
    """Save a checkpoint of ``spec`` with seeded random weights and the input normalisation
    every trained model.pt stores; return its state dict."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():  # BatchNorm statistics differ too, not only the weights
        for name, buffer in model.named_buffers():
            if "running_var" in name:
                buffer.uniform_(0.5, 1.5)
            elif buffer.dtype.is_floating_point:
                buffer.normal_()
    save_checkpoint(
        path,
        model,
        spec,
        {
            "fold": seed,
            "mean": PLANTED_MEAN * spec.in_channels,
            "std": PLANTED_STD * spec.in_channels,
        },
    )
    return cpu_state(model)


def _options(**overrides: Any) -> TrainOptions:
    return TrainOptions(**{**FAST, **overrides})


def _train(arrays_dir: Path, run: Path, fold: int = 0, init: Path | None = None, **overrides):
    return train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        fold,
        Experiment("experiment", SPEC, LOSS, None, "d4", _options(**overrides)),
        run / "out",
        run / "resume",
        init_checkpoint=init,
    )


def _record_epochs(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list:
    """Record the trained model's state before each epoch (and after the last call)."""
    states: list[dict[str, torch.Tensor]] = []

    def train_epoch(self: Any, epoch: int) -> tuple[float, float]:
        if epoch == interrupt_at:
            raise KeyboardInterrupt
        states.append(cpu_state(self.model))
        result = _TRAIN_EPOCH(self, epoch)
        states.append(cpu_state(self.model))
        return result

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", train_epoch)
    return states


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> bool:
    keys = [key for key in a if key.startswith(prefix)]
    assert keys
    return all(torch.equal(a[key], b[key]) for key in keys)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------- init_from


def test_each_fold_starts_from_the_same_fold_of_the_first_stage(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fold0 = _plant(tmp_path / "stage1" / "fold0" / "model.pt", seed=1)
    fold1 = _plant(tmp_path / "stage1" / "fold1" / "model.pt", seed=2)
    states = _record_epochs(monkeypatch)
    init = tmp_path / "stage1" / "fold1" / "model.pt"
    metrics = _train(arrays_dir, tmp_path / "stage2", fold=1, init=init, init_from="stage1")
    start = states[0]  # the trained model before its first step
    assert _same(start, fold1) and not _same(start, fold0)
    assert metrics["init_checkpoint_sha256"] == hash_file(init)
    assert metrics["options"]["init_from"] == "stage1"
    # Fed (and storing for prediction) what the loaded weights were trained with.
    _, meta = load_checkpoint(tmp_path / "stage2" / "out" / "model.pt")
    assert (meta["mean"], meta["std"]) == (PLANTED_MEAN, PLANTED_STD)


def test_a_changed_first_stage_invalidates_the_second_stages_resume_state(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    init = tmp_path / "stage1" / "model.pt"
    _plant(init, seed=1)
    run = tmp_path / "stage2"
    _record_epochs(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, init=init, init_from="stage1")
    assert (run / "resume" / "last.pt").is_file()
    _plant(init, seed=2)  # the first stage was retrained
    states = _record_epochs(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="segflow.model.training.checkpointing"):
        metrics = _train(arrays_dir, run, init=init, init_from="stage1")
    assert "different configuration" in caplog.text
    assert metrics["resumed_from_epoch"] == 0
    assert _same(states[0], _weights(init))


def test_a_checkpoint_of_another_network_is_refused(tmp_path: Path) -> None:
    other = dataclasses.replace(SPEC, extra={"encoder_depth": 3, "decoder_channels": [8, 8, 8]})
    _plant(tmp_path / "model.pt", seed=1, spec=other)
    with pytest.raises(SegflowError, match=r"train.init_from: .*model.extra"):
        load_init_checkpoint(build_model(SPEC), SPEC, tmp_path / "model.pt")
    with pytest.raises(SegflowError, match="does not exist"):
        load_init_checkpoint(build_model(SPEC), SPEC, tmp_path / "missing.pt")
    # encoder_weights only says where the first stage started: not a mismatch.
    _plant(tmp_path / "same.pt", seed=1)
    with_weights = dataclasses.replace(SPEC, encoder_weights="imagenet")
    model = build_model(SPEC)
    load_init_checkpoint(model, with_weights, tmp_path / "same.pt")
    assert _same(cpu_state(model), _weights(tmp_path / "same.pt"))


def test_a_second_stage_does_not_read_pretrained_encoder_weights(
    arrays_dir: Path, tmp_path: Path
) -> None:
    # The first stage's weights replace them all: a missing (or remote) file is never read.
    spec = dataclasses.replace(SPEC, encoder_weights=str(tmp_path / "gone.pt"))
    _plant(tmp_path / "stage1.pt", seed=1)
    options = _options(epochs=1, init_from="stage1")
    run = tmp_path / "run"
    data = (arrays_dir, arrays_dir / "folds.csv", 0)
    experiment = Experiment("experiment", spec, LOSS, None, "d4", options)
    train_fold(
        *data, experiment, run / "out", run / "resume", init_checkpoint=tmp_path / "stage1.pt"
    )
    assert (run / "out" / "model.pt").is_file()
    scratch = dataclasses.replace(experiment, train=_options(epochs=1))
    with pytest.raises(SegflowError, match=r"gone\.pt: file not found"):
        train_fold(*data, scratch, run / "scratch", run / "resume2")


def test_init_from_and_the_checkpoint_come_together(arrays_dir: Path, tmp_path: Path) -> None:
    _plant(tmp_path / "model.pt", seed=1)
    with pytest.raises(SegflowError, match="give both or neither"):
        _train(arrays_dir, tmp_path / "a", init_from="stage1")
    with pytest.raises(SegflowError, match="give both or neither"):
        _train(arrays_dir, tmp_path / "b", init=tmp_path / "model.pt")


def _experiments(**train: dict[str, Any]) -> dict[str, dict[str, Any]]:
    model = {"arch": "Unet", "encoder": "resnet18", "encoder_weights": None}
    return {name: {"model": dict(model), "train": values} for name, values in train.items()}


@pytest.mark.parametrize(
    ("experiments", "message"),
    [
        (_experiments(a={"init_from": "x"}), "experiments.a.train.init_from: unknown experiment"),
        (_experiments(a={"init_from": "a"}), "experiments.a.train.init_from: .*from itself"),
        (
            _experiments(a={"init_from": "b"}, b={"init_from": "c"}, c={"init_from": "a"}),
            r"experiments.c.train.init_from: cycle a -> b -> c -> a",
        ),
        (
            _experiments(a={"snapshot_ensemble": 2}, b={"init_from": "a"}),
            r"experiments.b.train.init_from: 'a' saves a snapshot ensemble",
        ),
    ],
    ids=["unknown", "itself", "cycle", "ensemble"],
)
def test_bad_init_from_links_name_the_key(experiments: dict, message: str) -> None:
    with pytest.raises(SegflowError, match=message):
        check_init_from(experiments)


def test_config_time_check_compares_the_models_but_not_their_weights() -> None:
    experiments = _experiments(a={}, b={"init_from": "a"}, c={"init_from": "b"})
    check_init_from(experiments)  # a chain is fine
    experiments["a"]["model"]["encoder_weights"] = "imagenet"
    check_init_from(experiments)  # where the first stage's encoder started does not matter
    experiments["b"]["model"]["arch"] = "FPN"
    with pytest.raises(SegflowError, match=r"experiments.b.train.init_from: 'a' .*model.arch"):
        check_init_from(experiments)


# --------------------------------------------------------------------------- freezing


def test_a_frozen_encoder_stays_put_while_the_decoder_trains(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = _record_epochs(monkeypatch)
    _train(arrays_dir, tmp_path / "run", freeze_encoder_epochs=1)
    before, after_frozen, _, after_free = states
    # Weights and BatchNorm statistics of the encoder: untouched by the frozen epoch.
    assert _same(before, after_frozen, "encoder.")
    assert not _same(before, after_frozen, "decoder.")
    assert not _same(after_frozen, after_free, "encoder.")
    # Without freezing the encoder moves in the first epoch already.
    states = _record_epochs(monkeypatch)
    _train(arrays_dir, tmp_path / "free")
    assert not _same(states[0], states[1], "encoder.")


def test_set_encoder_frozen_turns_gradients_and_batchnorm_off_and_on() -> None:
    model = build_model(SPEC).train()
    set_encoder_frozen(model, True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    model.train()
    set_encoder_frozen(model, False)
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert all(m.training for m in norms)
    with pytest.raises(SegflowError, match="freeze_encoder_epochs"):
        set_encoder_frozen(torch.nn.Linear(2, 2), True)


@pytest.mark.parametrize("interrupt_at", [2, 3], ids=["before-boundary", "after-boundary"])
def test_resuming_around_the_freeze_boundary_equals_an_uninterrupted_run(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_at: int
) -> None:
    # Frozen for epochs 1-2: resume after epoch 1 (N-1) or after epoch 2 (N).
    settings = {"epochs": 3, "freeze_encoder_epochs": 2, "ema_decay": 0.9}
    _train(arrays_dir, tmp_path / "straight", **settings)
    run = tmp_path / "resumed"
    _record_epochs(monkeypatch, interrupt_at=interrupt_at)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, **settings)
    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", _TRAIN_EPOCH)
    metrics = _train(arrays_dir, run, **settings)
    assert metrics["resumed_from_epoch"] == interrupt_at - 1
    straight = _weights(tmp_path / "straight" / "out" / "model.pt")
    assert _same(straight, _weights(run / "out" / "model.pt"))


# --------------------------------------------------------------------------- full refit


def _fold_metrics(
    tmp_path: Path, best_epochs: list[int], epochs_trained: list[int] | None = None
) -> list[Path]:
    paths = []
    for fold, best in enumerate(best_epochs):
        path = tmp_path / "folds" / f"fold{fold}" / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = {"fold": fold, "best_epoch": best}
        if epochs_trained is not None:
            metrics["epochs_trained"] = epochs_trained[fold]
        path.write_text(json.dumps(metrics))
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("best", "epochs"), [([3, 5, 4], 4), ([2, 3], 3), ([1, 2, 6, 7], 4), ([7], 7)]
)
def test_refit_epochs_are_the_median_of_the_folds_best_epochs(
    tmp_path: Path, best: list[int], epochs: int
) -> None:
    assert refit_epochs(_fold_metrics(tmp_path, best)) == (epochs, best)


def test_refit_epochs_need_each_folds_best_epoch(tmp_path: Path) -> None:
    paths = _fold_metrics(tmp_path, [2, 3])
    paths[1].write_text(json.dumps({"fold": 1}))
    with pytest.raises(SegflowError, match=r"fold1.metrics.json: best_epoch is None"):
        refit_epochs(paths)
    with pytest.raises(SegflowError, match="does not exist"):
        refit_epochs([tmp_path / "nope.json"])


def _train_full(arrays_dir: Path, run: Path, metrics: list[Path], **overrides: Any):
    return train_full(
        arrays_dir,
        arrays_dir / "folds.csv",
        metrics,
        Experiment("experiment", SPEC, LOSS, None, "d4", _options(**overrides)),
        run / "out",
        run / "resume",
    )


def test_full_refit_trains_on_every_image_for_the_median_epochs(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = _record_epochs(monkeypatch)
    fold_metrics = _fold_metrics(tmp_path, [1, 2, 3])
    # The folds' own epochs and patience do not apply: it trains the median, 2 epochs.
    metrics = _train_full(
        arrays_dir, tmp_path / "run", fold_metrics, epochs=9, early_stopping_patience=1
    )
    out = tmp_path / "run" / "out"
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["val_loss"].isna().all()
    assert metrics["refit"] and metrics["epochs"] == 2 and metrics["refit_best_epochs"] == [1, 2, 3]
    assert metrics["n_train"] == 32 and metrics["n_val"] == 0  # every item of folds.csv
    assert metrics["options"]["epochs"] == 2
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["refit"] and meta["fold"] is None and meta["epoch"] == 2 and meta["score"] is None
    assert _same(cpu_state(model), states[-1])  # the last epoch's weights
    assert not (tmp_path / "run" / "resume").exists()


def test_full_refit_resumes_and_refuses_plateau(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fold_metrics = _fold_metrics(tmp_path, [2, 2])
    _train_full(arrays_dir, tmp_path / "straight", fold_metrics)
    run = tmp_path / "resumed"
    _record_epochs(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        _train_full(arrays_dir, run, fold_metrics)
    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", _TRAIN_EPOCH)
    assert _train_full(arrays_dir, run, fold_metrics)["resumed_from_epoch"] == 1
    straight = _weights(tmp_path / "straight" / "out" / "model.pt")
    assert _same(straight, _weights(run / "out" / "model.pt"))
    with pytest.raises(SegflowError, match=r"train\.scheduler: plateau"):
        _train_full(arrays_dir, tmp_path / "plateau", fold_metrics, scheduler="plateau")


def test_a_swa_refit_trains_the_folds_epochs_and_keeps_the_swa_average(
    arrays_dir: Path, tmp_path: Path
) -> None:
    # The folds' best epochs (1) would give 1 epoch; SWA weights come from the end of training.
    fold_metrics = _fold_metrics(tmp_path, [1, 1, 1], epochs_trained=[3, 2, 3])
    metrics = _train_full(
        arrays_dir, tmp_path / "run", fold_metrics, epochs=3, swa_epochs=2, swa_select="best"
    )
    assert metrics["epochs_trained"] == 3 and metrics["refit_epochs_trained"] == [3, 2, 3]
    # No validation: swa_select best cannot compare, the SWA average is kept.
    assert metrics["swa"]["selected"] and metrics["swa"]["epochs"] == [2, 3]
    assert metrics["swa"]["score"] is None and metrics["averaged_epochs"] == [2, 3]
    _, meta = load_checkpoint(tmp_path / "run" / "out" / "model.pt")
    assert meta["weights"].startswith("SWA") and meta["score"] is None
    with pytest.raises(SegflowError, match=r"swa_epochs \(3\) exceeds the full refit's 2 epochs"):
        _train_full(arrays_dir, tmp_path / "short", fold_metrics[1:2], epochs=3, swa_epochs=3)


def test_a_snapshot_ensemble_refit_keeps_its_cycle_ends(arrays_dir: Path, tmp_path: Path) -> None:
    fold_metrics = _fold_metrics(tmp_path, [1, 1], epochs_trained=[2, 2])
    ensemble = {"scheduler": "cosine_restarts", "restart_epochs": 1, "snapshot_ensemble": 2}
    metrics = _train_full(arrays_dir, tmp_path / "run", fold_metrics, **ensemble)
    assert metrics["epochs_trained"] == 2 and metrics["ensemble_epochs"] == [1, 2]
    model, meta = load_checkpoint(tmp_path / "run" / "out" / "model.pt")
    assert isinstance(model, SnapshotEnsemble) and len(model.members) == 2 and meta["refit"]


def test_a_refit_stores_the_folds_input_normalisation(arrays_dir: Path, tmp_path: Path) -> None:
    fold = _train(arrays_dir, tmp_path / "fold", fold=0, epochs=1)
    _train_full(arrays_dir, tmp_path / "full", _fold_metrics(tmp_path, [1]), epochs=1)
    _, fold_meta = load_checkpoint(tmp_path / "fold" / "out" / "model.pt")
    _, full_meta = load_checkpoint(tmp_path / "full" / "out" / "model.pt")
    assert fold["best_epoch"] == 1
    assert (full_meta["mean"], full_meta["std"]) == (fold_meta["mean"], fold_meta["std"])
    # A refit of a second stage is fed what its first stage's refit was trained with.
    init = tmp_path / "stage1" / "full" / "model.pt"
    _plant(init, seed=3)
    train_full(
        arrays_dir,
        arrays_dir / "folds.csv",
        _fold_metrics(tmp_path, [1]),
        Experiment("experiment", SPEC, LOSS, None, "d4", _options(epochs=1, init_from="stage1")),
        tmp_path / "stage2" / "out",
        tmp_path / "stage2" / "resume",
        init_checkpoint=init,
    )
    _, meta = load_checkpoint(tmp_path / "stage2" / "out" / "model.pt")
    assert (meta["mean"], meta["std"]) == (PLANTED_MEAN, PLANTED_STD)


def test_a_snapshot_ensemble_is_no_init_checkpoint(tmp_path: Path) -> None:
    members = [build_model(SPEC) for _ in range(2)]
    path = tmp_path / "ensemble" / "model.pt"
    path.parent.mkdir()
    save_checkpoint(path, SnapshotEnsemble(members), SPEC, {"mean": [0.3], "std": [0.2]})
    with pytest.raises(SegflowError, match="is a snapshot ensemble of 2 networks"):
        load_init_checkpoint(build_model(SPEC), SPEC, path)


def test_a_refit_that_needs_plateau_is_refused_at_config_time() -> None:
    experiments = _experiments(a={"scheduler": "plateau"}, b={"init_from": "a"})
    check_refit(experiments)  # no refit: plateau is fine
    experiments["b"]["refit"] = {"enabled": True}
    with pytest.raises(SegflowError, match=r"experiments.a.train.scheduler: plateau"):
        check_refit(experiments)


def test_refit_options_parse_and_match_the_schema() -> None:
    parsed = parse_experiment("a", {"refit": {"enabled": True, "test_models": "both"}}, 1)
    assert parsed.refit == RefitOptions(enabled=True, test_models="both")
    with pytest.raises(SegflowError, match=r"refit\.test_models"):
        parse_experiment("a", {"refit": {"enabled": True, "test_models": "all"}}, 1)
    schema = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    experiment = schema["properties"]["experiments"]["additionalProperties"]["properties"]
    refit = experiment["refit"]["properties"]
    for field in dataclasses.fields(RefitOptions):
        assert refit[field.name]["default"] == field.default, field.name
    assert refit["test_models"]["enum"] == list(
        dataclasses.fields(RefitOptions)[1].metadata["choices"]
    )
    assert {"init_from", "freeze_encoder_epochs"} <= set(experiment["train"]["properties"])


def test_test_folders_group_by_experiment_with_different_counts() -> None:
    dirs = ["t/a/round0/fold0", "t/a/round0/fold1", "t/a/round0/full", "t/b/round0/full"]
    assert group_by_experiment(dirs, 2, "test folders") == [dirs[:3], dirs[3:]]
    flat = ["x/a0", "x/a1", "x/b0", "x/b1"]  # not in the results layout: split evenly
    assert group_by_experiment(flat, 2, "test folders") == [flat[:2], flat[2:]]
