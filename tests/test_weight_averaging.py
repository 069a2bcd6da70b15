"""Tests for SWA, BatchNorm recalibration and snapshot ensembles (train.swa_*, recalibrate_bn,
snapshot_ensemble).

Same tiny setup as tests/test_train.py: 32 images of 32x32 and a mobilenet_v2 encoder cut to 3
stages, so each training run takes a few seconds on one CPU thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_synthetic_arrays
from torch import nn

from segflow.core.errors import SegflowError
from segflow.model.experiment import Experiment
from segflow.model.inference.predict import PredictOptions, predict_rows
from segflow.model.models import (
    ModelSpec,
    SnapshotEnsemble,
    build_model,
    load_checkpoint,
    mean_probability_logit,
    required_divisor,
    save_checkpoint,
)
from segflow.model.training import train as train_module
from segflow.model.training.checkpointing import (
    RESUME_EXEMPT,
    config_hash,
    cpu_state,
    recalibrate_batchnorm,
    remove_resume_state,
)
from segflow.model.training.train import TrainOptions, train_fold

SPEC = ModelSpec(encoder="mobilenet_v2", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
LOSS = {"bce": 1.0, "dice": 1.0}
FAST = {"epochs": 3, "batch_size": 8, "lr": 1e-2}
_TRAIN_EPOCH = train_module._FoldTrainer.train_epoch
_RECALIBRATE = train_module.recalibrate_batchnorm


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def arrays_dir(tmp_path: Path) -> Path:
    return write_synthetic_arrays(tmp_path / "preprocess", n=32, n_empty=8)


def _train(arrays_dir: Path, run: Path, **overrides: Any) -> dict[str, Any]:
    return train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        Experiment("experiment", SPEC, LOSS, None, "d4", TrainOptions(**{**FAST, **overrides})),
        run / "out",
        run / "resume",
    )


def _saved(run: Path) -> dict[str, Any]:
    return torch.load(run / "out" / "model.pt", map_location="cpu", weights_only=True)


def _keep_resume_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "_remove_resume_state", lambda resume_dir: None)


def _record_epoch_weights(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, torch.Tensor]]:
    """The trained weights at the end of every epoch, as the trainer hands them to SWA."""
    weights: dict[int, dict[str, torch.Tensor]] = {}
    original = train_module._FoldTrainer.update_averages

    def update_averages(self: Any, epoch: int, value: float) -> Any:
        weights[epoch] = cpu_state(self.model)
        return original(self, epoch, value)

    monkeypatch.setattr(train_module._FoldTrainer, "update_averages", update_averages)
    return weights


def _record_recalibration_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """The image batches of every BatchNorm recalibration the trainer runs."""
    passes: list[list[torch.Tensor]] = []

    def recalibrate(model: nn.Module, batches: Any, *args: Any, **kwargs: Any) -> int:
        # The trainer hands image tensors (moved to the device, augmented there on CUDA).
        images = [batch["image"] if isinstance(batch, dict) else batch for batch in batches]
        passes.append(images)
        return _RECALIBRATE(model, images, *args, **kwargs)

    monkeypatch.setattr(train_module, "recalibrate_batchnorm", recalibrate)
    return passes


def _script_scores(monkeypatch: pytest.MonkeyPatch, kaggle: list[float]) -> None:
    """Make validation report the given kaggle score per call (the real loss still trains)."""
    calls = iter(kaggle)

    def validate(self: Any, model: nn.Module) -> dict[str, float]:
        score = next(calls)
        return {"val_loss": 1 - score, "dice": score, "iou": score, "kaggle": score}

    monkeypatch.setattr(train_module._FoldTrainer, "validate", validate)


def _batchnorm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _direct_batchnorm_statistics(
    state: dict[str, torch.Tensor], batches: list[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer: the mean over ``batches`` of its input's batch mean and unbiased
    variance, recorded by hooks in training mode (where BatchNorm normalises with the batch's
    own statistics, so no layer's input depends on the running statistics)."""
    model = build_model(SPEC)
    model.load_state_dict(state)
    model.train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name in _batchnorm_names(model):

        def hook(module: nn.Module, inputs: tuple[torch.Tensor], name: str = name) -> None:
            x = inputs[0].double()
            seen.setdefault(name, []).append(
                (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True))
            )

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for images in batches:
            model(images)
    for handle in hooks:
        handle.remove()
    return {
        name: (
            torch.stack([m for m, _ in stats]).mean(0).float(),
            torch.stack([v for _, v in stats]).mean(0).float(),
        )
        for name, stats in seen.items()
    }


# --------------------------------------------------------------------------- BN recalibration


def test_recalibrate_batchnorm_is_the_mean_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    batches = [torch.randn(3, 2, 8, 8) * (i + 1) + i for i in range(4)]

    assert recalibrate_batchnorm(model, [{"image": b} for b in batches]) == 4

    assert not model.training  # mode restored
    assert model[1].momentum == model[3].momentum == 0.1  # momentum restored
    with torch.no_grad():
        first = [model[0](b) for b in batches]
        # What the second BatchNorm saw: the first one normalised with each batch's statistics.
        norm = model[1]
        hidden = [
            torch.relu(nn.functional.batch_norm(x, None, None, norm.weight, norm.bias, True))
            for x in first
        ]
    for layer, inputs in ((model[1], first), (model[3], hidden)):
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
        variances = torch.stack([x.var(dim=(0, 2, 3)) for x in inputs]).mean(0)
        torch.testing.assert_close(layer.running_mean, means)
        torch.testing.assert_close(layer.running_var, variances)
        assert int(layer.num_batches_tracked) == 4
    for key, value in weights.items():
        if "num_batches" not in key:
            assert torch.equal(model.state_dict()[key], value)  # weights untouched


def test_recalibrate_batchnorm_without_batches_or_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SegflowError, match="no training batches"):
        recalibrate_batchnorm(model, [])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model[1].momentum == 0.1
    never = iter(())
    assert recalibrate_batchnorm(nn.Conv2d(1, 1, 1), never) == 0  # nothing to recompute


# --------------------------------------------------------------------------- SWA


def test_swa_averages_the_last_epochs_and_recalibrates_batchnorm(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epoch_weights = _record_epoch_weights(monkeypatch)
    passes = _record_recalibration_batches(monkeypatch)
    run = tmp_path / "run"
    metrics = _train(arrays_dir, run, swa_epochs=2, swa_lr=4e-3, swa_select="always")

    assert metrics["swa"]["epochs"] == [2, 3] and metrics["swa"]["selected"]
    assert metrics["averaged_epochs"] == [2, 3] and metrics["weights"].startswith("SWA")
    assert metrics["score"] == metrics["swa"]["score"] == metrics["final"]["kaggle"]
    history = pd.read_csv(run / "out" / "history.csv")
    assert history["lr"].tolist()[1:] == [4e-3, 4e-3] and history["lr"][0] != 4e-3

    saved = _saved(run)["state_dict"]
    model = build_model(SPEC)
    parameters = {name for name, _ in model.named_parameters()}
    plain_average = {}
    for key, value in saved.items():
        if value.dtype.is_floating_point:
            plain_average[key] = (epoch_weights[2][key] + epoch_weights[3][key]) / 2
        else:
            plain_average[key] = epoch_weights[3][key]
        if key in parameters:
            torch.testing.assert_close(value, plain_average[key])
    assert any(not torch.equal(epoch_weights[2][k], epoch_weights[3][k]) for k in parameters)

    # One recalibration pass (the SWA model's), on whole training batches.
    assert len(passes) == 1 and len(passes[0]) == 2  # 21 training images, batches of 8
    direct = _direct_batchnorm_statistics(plain_average, passes[0])
    assert direct
    for name, (mean, var) in direct.items():
        torch.testing.assert_close(saved[f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved[f"{name}.running_var"], var, rtol=1e-4, atol=1e-5)
    first = _batchnorm_names(model)[0]
    assert not torch.allclose(
        saved[f"{first}.running_var"], plain_average[f"{first}.running_var"], rtol=1e-3
    )  # the recalibrated statistics are not the averaged ones


@pytest.mark.parametrize(("swa_score", "selected"), [(0.6, False), (0.8, True)])
def test_swa_select_best_keeps_swa_only_when_it_validates_better(
    arrays_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    swa_score: float,
    selected: bool,
) -> None:
    # Epochs 1-3, then the weights without SWA (epoch 3's), then the SWA weights.
    _script_scores(monkeypatch, [0.5, 0.6, 0.7, 0.7, swa_score])
    _keep_resume_state(monkeypatch)
    run = tmp_path / "run"
    metrics = _train(arrays_dir, run, swa_epochs=2)
    assert TrainOptions().swa_select == "best"
    assert metrics["swa"]["selected"] is selected
    assert metrics["swa"]["without_swa_score"] == 0.7 and metrics["swa"]["score"] == swa_score
    assert metrics["score"] == max(0.7, swa_score)
    best = torch.load(run / "resume" / "snapshot_e0003.pt", weights_only=True)
    saved = _saved(run)
    is_best = all(torch.equal(saved["state_dict"][k], best[k]) for k in best)
    assert is_best is not selected
    assert saved["averaged_epochs"] == ([2, 3] if selected else [3])


def test_resume_mid_swa_equals_an_uninterrupted_run(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"epochs": 4, "swa_epochs": 3, "swa_lr": 5e-3, "swa_select": "always"}
    _train(arrays_dir, tmp_path / "straight", **settings)

    run = tmp_path / "interrupted"

    def interrupted(self: Any, epoch: int) -> tuple[float, float]:
        if epoch == 4:
            raise KeyboardInterrupt
        return _TRAIN_EPOCH(self, epoch)

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, **settings)
    state = torch.load(run / "resume" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["swa"]["epochs"] == [2, 3]  # mid-SWA

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", _TRAIN_EPOCH)
    metrics = _train(arrays_dir, run, **settings)
    assert metrics["resumed_from_epoch"] == 3 and metrics["swa"]["epochs"] == [2, 3, 4]
    straight, resumed = _saved(tmp_path / "straight"), _saved(run)
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_recalibrate_bn_recomputes_the_top_k_average_statistics(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _keep_resume_state(monkeypatch)
    passes = _record_recalibration_batches(monkeypatch)
    run = tmp_path / "run"
    metrics = _train(arrays_dir, run, epochs=2, average_top_k=2, recalibrate_bn=True)
    assert metrics["averaged_epochs"] and "BatchNorm recalibrated" in metrics["weights"]
    snapshots = [torch.load(p, weights_only=True) for p in (run / "resume").glob("snapshot_*")]
    assert len(snapshots) == 2 and len(passes) == 1
    saved = _saved(run)["state_dict"]
    parameters = {name for name, _ in build_model(SPEC).named_parameters()}
    for key in parameters:  # the weights are the plain average
        torch.testing.assert_close(saved[key], (snapshots[0][key] + snapshots[1][key]) / 2)
    average = {
        k: (snapshots[0][k] + snapshots[1][k]) / 2 if v.dtype.is_floating_point else v
        for k, v in snapshots[0].items()
    }
    for name, (mean, var) in _direct_batchnorm_statistics(average, passes[0]).items():
        torch.testing.assert_close(saved[f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved[f"{name}.running_var"], var, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(saved[f"{name}.running_var"], average[f"{name}.running_var"])


# --------------------------------------------------------------------------- snapshot ensemble


class _Planted(nn.Module):
    """Fixed mask and label logits, whatever the input."""

    def __init__(self, masks: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("masks", masks)
        self.register_buffer("labels", labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.masks.expand(len(x), -1, -1, -1), self.labels.expand(len(x), -1)


def test_snapshot_ensemble_returns_the_logit_of_the_mean_probability() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = [torch.randn(1, 2, 4, 4, generator=generator) * 3 for _ in range(3)]
    labels = [torch.randn(1, 2, generator=generator) * 3 for _ in range(3)]
    ensemble = SnapshotEnsemble([_Planted(m, lab) for m, lab in zip(masks, labels, strict=True)])
    out_masks, out_labels = ensemble(torch.zeros(5, 1, 4, 4))
    for out, members in ((out_masks, masks), (out_labels, labels)):
        expected = torch.logit(torch.stack([torch.sigmoid(m.double()) for m in members]).mean(0))
        torch.testing.assert_close(out, expected.float().expand_as(out))
    # Confident members stay finite: logit(mean(sigmoid([40, 40]))) = 40.
    confident = mean_probability_logit([torch.full((3,), 40.0), torch.full((3,), 40.0)])
    torch.testing.assert_close(confident, torch.full((3,), 40.0))
    one = torch.randn(2, 3, generator=generator)
    torch.testing.assert_close(mean_probability_logit([one]), one)
    with pytest.raises(SegflowError, match="at least one member"):
        SnapshotEnsemble([])


def test_snapshot_ensemble_checkpoint_round_trip_and_prediction(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, aux_head=True)
    members = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(build_model(spec).eval())
    path = tmp_path / "model.pt"
    save_checkpoint(path, SnapshotEnsemble(members), spec, {"fold": 0})

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert len(raw["snapshots"]) == 2
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in members[1].state_dict().items())
    model, meta = load_checkpoint(path)
    assert isinstance(model, SnapshotEnsemble) and not model.training
    assert "snapshots" not in meta and "state_dict" not in meta and meta["fold"] == 0
    for loaded, member in zip(model.members, members, strict=True):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in member.state_dict().items())
    assert required_divisor(model) == required_divisor(members[0])

    # predict_rows (TTA, aux head) sees the mean of the members' probabilities.
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 1)).astype(np.uint8)
    options = PredictOptions(tta="hflip", batch_size=2, device="cpu")
    args = (images, np.arange(3), [0.3], [0.2], options, torch.device("cpu"))
    probs, nonempty = predict_rows(model, *args)
    singles = [predict_rows(member, *args) for member in members]
    np.testing.assert_allclose(probs, np.mean([p for p, _ in singles], axis=0), atol=1e-5)
    np.testing.assert_allclose(nonempty, np.mean([n for _, n in singles], axis=0), atol=1e-5)

    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", members[0], spec, {"snapshots": []})
    torch.save({**raw, "snapshots": "not a list"}, tmp_path / "bad.pt")
    with pytest.raises(SegflowError, match="snapshots must be"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save(
        {**raw, "snapshots": [raw["snapshots"][0], {"x": torch.zeros(1)}]}, tmp_path / "b.pt"
    )
    with pytest.raises(SegflowError, match="snapshot 1 do not match"):
        load_checkpoint(tmp_path / "b.pt")


def test_snapshot_ensemble_keeps_the_last_cycle_ends(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _keep_resume_state(monkeypatch)
    run = tmp_path / "run"
    metrics = _train(
        arrays_dir, run, scheduler="cosine_restarts", restart_epochs=1, snapshot_ensemble=2
    )
    assert metrics["ensemble_epochs"] == [2, 3] and "snapshot ensemble" in metrics["weights"]
    resume = run / "resume"
    assert sorted(p.name for p in resume.glob("cycle_*")) == ["cycle_e0002.pt", "cycle_e0003.pt"]
    model, meta = load_checkpoint(run / "out" / "model.pt")
    assert isinstance(model, SnapshotEnsemble) and meta["ensemble_epochs"] == [2, 3]
    for member, epoch in zip(model.members, (2, 3), strict=True):
        expected = torch.load(resume / f"cycle_e000{epoch}.pt", weights_only=True)
        assert all(torch.equal(member.state_dict()[k], v) for k, v in expected.items())
    # The ensemble is what was validated: its score is the checkpoint's.
    assert meta["score"] == metrics["score"] == metrics["final"]["kaggle"]
    remove_resume_state(resume)
    assert not resume.exists()  # cycle files are resume state too


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"swa_epochs": 4}, "train.swa_epochs .* exceeds"),
        ({"swa_epochs": -1}, "train.swa_epochs must be"),
        ({"swa_lr": 0}, "train.swa_lr must be"),
        ({"swa_select": "last"}, "train.swa_select must be"),
        ({"recalibrate_bn": 1}, "train.recalibrate_bn must be"),
        ({"snapshot_ensemble": 2}, "needs train.scheduler: cosine_restarts"),
        (
            {"snapshot_ensemble": 2, "scheduler": "cosine_restarts", "swa_epochs": 1},
            "exclude each other",
        ),
        (
            {"snapshot_ensemble": 3, "scheduler": "cosine_restarts", "restart_epochs": 2},
            "1 complete cycle",
        ),
        (
            {"snapshot_ensemble": 2, "scheduler": "cosine_restarts", "early_stopping_patience": 2},
            "early_stopping_patience: null",
        ),
    ],
)
def test_invalid_averaging_options(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SegflowError, match=message):
        TrainOptions(**{"epochs": 3, **overrides})


def test_averaging_options_enter_the_resume_config_hash() -> None:
    def digest(**overrides: Any) -> str:
        options = TrainOptions(epochs=3, scheduler="cosine_restarts", **overrides)
        return config_hash(options, SPEC, 0, LOSS, None, "d4", {"data": "x"})

    changed = [
        {"swa_epochs": 2},
        {"swa_epochs": 2, "swa_lr": 1e-3},
        {"swa_epochs": 2, "swa_select": "always"},
        {"recalibrate_bn": True},
        {"snapshot_ensemble": 2, "restart_epochs": 1},
    ]
    digests = {digest(), *(digest(**c) for c in changed)}
    assert len(digests) == len(changed) + 1
    new = {"swa_epochs", "swa_lr", "swa_select", "recalibrate_bn", "snapshot_ensemble"}
    assert not new & set(RESUME_EXEMPT)
