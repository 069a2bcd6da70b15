"""Tests for fold training: outputs, resume, early stopping, top-k averaging, EMA, aux head.

A tiny synthetic dataset (32 images of 32x32, bright squares as objects, 8 empty) and a tiny
model (mobilenet_v2 encoder cut to 3 stages, 8-16 decoder channels) keep each training run
well under a second on one CPU thread.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import layout_probe_conv, write_synthetic_arrays

from segflow.core.errors import SegflowError
from segflow.model.datasets import MemmapDataset, SegmentationArrays
from segflow.model.diagnostics import optimizer_steps
from segflow.model.experiment import Experiment
from segflow.model.models import ModelSpec, build_model, forward_logits, load_checkpoint
from segflow.model.training import train as train_module
from segflow.model.training.fold_data import FoldData, loader_workers, split_rows
from segflow.model.training.schedules import make_schedulers
from segflow.model.training.train import (
    HISTORY_COLUMNS,
    TrainingInterrupted,
    TrainOptions,
    config_hash,
    lr_factor,
    train_fold,
)

SPEC = ModelSpec(encoder="mobilenet_v2", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
LOSS = {"bce": 1.0, "dice": 1.0}
FAST = {"epochs": 3, "batch_size": 8, "lr": 1e-2}
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


def _train(
    arrays_dir: Path,
    run: Path,
    spec: ModelSpec = SPEC,
    augment: Any = "d4",
    fold: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    options = TrainOptions(**{**FAST, **overrides})
    return train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        fold,
        Experiment("experiment", spec, LOSS, None, augment, options),
        run / "out",
        run / "resume",
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _count_epochs(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[int]:
    """Record the epochs trained; raise KeyboardInterrupt at the start of ``interrupt_at``."""
    trained: list[int] = []
    original = _TRAIN_EPOCH  # not the current attribute: it may be an earlier patch

    def train_epoch(self: Any, epoch: int) -> tuple[float, float]:
        if epoch == interrupt_at:
            raise KeyboardInterrupt
        trained.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", train_epoch)
    return trained


def _script_scores(monkeypatch: pytest.MonkeyPatch, kaggle: list[float]) -> None:
    """Make validation report the given kaggle score per epoch (the real loss still trains)."""
    calls = iter(kaggle)

    def validate(self: Any, model: torch.nn.Module) -> dict[str, float]:
        score = next(calls, 0.0)  # past the script: the final model's evaluation
        return {"val_loss": 1 - score, "dice": score, "iou": score, "kaggle": score}

    monkeypatch.setattr(train_module._FoldTrainer, "validate", validate)


def _keep_resume_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "_remove_resume_state", lambda resume_dir: None)


# --------------------------------------------------------------------------- a normal run


def test_train_fold_outputs_and_learning(arrays_dir: Path, tmp_path: Path) -> None:
    metrics = _train(arrays_dir, tmp_path / "run")
    out = tmp_path / "run" / "out"
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["lr"].is_monotonic_decreasing  # cosine
    assert ((history[["val_dice", "val_iou", "val_kaggle"]] >= 0).all()).all()

    model, meta = load_checkpoint(out / "model.pt")
    assert {"fold", "epoch", "monitor", "score", "mean", "std", "input_size", "dtype"} <= set(meta)
    assert meta["fold"] == 0 and meta["monitor"] == "kaggle" and meta["dtype"] == "uint8"
    assert meta["input_size"] == [32, 32] and len(meta["mean"]) == len(meta["std"]) == 1
    best = history.loc[history["val_kaggle"].idxmax()]
    # The best epoch's weights, re-validated: the same score as during training.
    assert meta["epoch"] == best["epoch"] == metrics["best_epoch"]
    assert meta["score"] == pytest.approx(best["val_kaggle"]) == metrics["score"]
    images = np.load(arrays_dir / "train_images.npy")[:4].astype(np.float32) / 255.0
    batch = (torch.from_numpy(images).permute(0, 3, 1, 2) - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        assert forward_logits(model, batch).shape == (4, 1, 32, 32)

    written = json.loads((out / "metrics.json").read_text())
    assert written["best_epoch"] == metrics["best_epoch"] and written["epochs_trained"] == 3
    assert not written["stopped_early"] and written["resumed_from_epoch"] == 0
    # Every batch of every epoch took a step (drop_last: n_train // batch_size batches), as
    # the diagnostics estimate it for runs that predate the field.
    assert written["optimizer_steps"] == 3 * (written["n_train"] // 8) > 0
    del written["optimizer_steps"]
    assert optimizer_steps(written) == (3 * (written["n_train"] // 8), True)
    assert not (tmp_path / "run" / "resume").exists()  # deleted once model.pt is written


# --------------------------------------------------------------------------- resume


def test_resume_after_interrupt_equals_an_uninterrupted_run(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Augmentation and balanced sampling on: their random draws must be resumed too.
    settings = {"augment": "d4", "empty_ratio": 0.5, "ema_decay": 0.9, "average_top_k": 2}
    _train(arrays_dir, tmp_path / "straight", **settings)

    run = tmp_path / "interrupted"
    trained = _count_epochs(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, **settings)
    assert trained == [1, 2]
    assert (run / "resume" / "last.pt").is_file() and not (run / "out" / "model.pt").exists()
    history_before = pd.read_csv(run / "out" / "history.csv")
    assert history_before["epoch"].tolist() == [1, 2]

    trained = _count_epochs(monkeypatch)
    metrics = _train(arrays_dir, run, **settings)
    assert trained == [3]  # only the missing epoch was trained
    assert metrics["resumed_from_epoch"] == 2
    straight_metrics = json.loads((tmp_path / "straight" / "out" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == straight_metrics["optimizer_steps"]  # resumed count
    history = pd.read_csv(run / "out" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(history.iloc[:2], history_before)

    straight = _weights(tmp_path / "straight" / "out" / "model.pt")
    resumed = _weights(run / "out" / "model.pt")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    reference = pd.read_csv(tmp_path / "straight" / "out" / "history.csv")
    pd.testing.assert_frame_equal(
        history.drop(columns="seconds"), reference.drop(columns="seconds")
    )


def test_sigterm_keeps_the_last_finished_epoch(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _TRAIN_EPOCH

    def train_epoch(self: Any, epoch: int) -> tuple[float, float]:
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as Snakemake/SLURM cancel a job
        return original(self, epoch)

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", train_epoch)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        _train(arrays_dir, tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored
    state = torch.load(tmp_path / "run" / "resume" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert not [p for p in (tmp_path / "run" / "resume").iterdir() if ".tmp" in p.name]


def test_more_epochs_continue_a_run_and_other_changes_restart_it(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    run = tmp_path / "run"
    _count_epochs(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, epochs=3, scheduler="none")
    # epochs is not part of the configuration hash: raising it continues the run.
    trained = _count_epochs(monkeypatch, interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, epochs=5, scheduler="none")
    assert trained == [3, 4]
    # Any other change (here the learning rate) makes the resume file stale.
    trained = _count_epochs(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="segflow.model.training.train"):
        metrics = _train(arrays_dir, run, epochs=2, scheduler="none", lr=5e-3)
    assert "different configuration" in caplog.text
    assert trained == [1, 2] and metrics["resumed_from_epoch"] == 0
    assert pd.read_csv(run / "out" / "history.csv")["epoch"].tolist() == [1, 2]


# --------------------------------------------------------------------------- model selection


def test_early_stopping_stops_and_keeps_the_best_epoch(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_scores(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.9, 0.9])
    trained = _count_epochs(monkeypatch)
    metrics = _train(arrays_dir, tmp_path / "run", epochs=6, early_stopping_patience=2)
    assert trained == [1, 2, 3, 4]  # epochs 3 and 4 did not beat epoch 2
    assert metrics["stopped_early"] and metrics["best_epoch"] == 2
    assert pd.read_csv(tmp_path / "run" / "out" / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "run" / "out" / "model.pt")[1]["epoch"] == 2


def test_val_loss_monitor_is_minimised(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_scores(monkeypatch, [0.1, 0.7, 0.4])  # val_loss = 1 - score: best is epoch 2
    metrics = _train(arrays_dir, tmp_path / "run", monitor="val_loss")
    assert metrics["best_epoch"] == 2 and metrics["best_epoch_score"] == pytest.approx(0.3)


def test_average_top_k_averages_the_best_snapshots(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_scores(monkeypatch, [0.2, 0.9, 0.5])
    _keep_resume_state(monkeypatch)
    metrics = _train(arrays_dir, tmp_path / "run", average_top_k=2)
    resume = tmp_path / "run" / "resume"
    assert sorted(p.name for p in resume.glob("snapshot_*")) == [
        "snapshot_e0002.pt",
        "snapshot_e0003.pt",
    ]  # epoch 1 was evicted when epoch 3 arrived
    snapshots = [torch.load(resume / f"snapshot_e000{e}.pt", weights_only=True) for e in (2, 3)]
    saved = _weights(tmp_path / "run" / "out" / "model.pt")
    changed = 0
    for key, value in saved.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, (snapshots[0][key] + snapshots[1][key]) / 2)
            changed += not torch.equal(value, snapshots[0][key])
        else:
            assert torch.equal(value, snapshots[0][key])  # the best epoch's counters
    assert changed > 0
    assert metrics["averaged_epochs"] == [2, 3] and metrics["best_epoch"] == 2
    assert load_checkpoint(tmp_path / "run" / "out" / "model.pt")[1]["averaged_epochs"] == [2, 3]


def test_ema_weights_are_validated_and_saved(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script_scores(monkeypatch, [0.1, 0.2])  # the last epoch is the best
    _keep_resume_state(monkeypatch)
    metrics = _train(arrays_dir, tmp_path / "run", epochs=2, ema_decay=0.5)
    state = torch.load(tmp_path / "run" / "resume" / "last.pt", weights_only=True)
    saved = _weights(tmp_path / "run" / "out" / "model.pt")
    assert all(torch.equal(saved[key], state["ema"][key]) for key in saved)
    assert any(not torch.equal(saved[key], state["model"][key]) for key in saved)
    assert metrics["weights"].startswith("ema")


# --------------------------------------------------------------------------- variants


def test_aux_head_is_trained_with_its_loss(arrays_dir: Path, tmp_path: Path) -> None:
    spec = ModelSpec(
        encoder=SPEC.encoder, extra=SPEC.extra, aux_head=True
    )  # mask logits + one "non-empty" logit
    torch.manual_seed(42)  # train_fold seeds the initial weights with train.seed
    initial = build_model(spec).classification_head.state_dict()
    _train(arrays_dir, tmp_path / "run", spec=spec, epochs=2, aux_weight=1.0)
    model, _ = load_checkpoint(tmp_path / "run" / "out" / "model.pt")
    trained = model.classification_head.state_dict()
    # Only the aux loss reaches the classification head; AdamW skips parameters without grads.
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if "weight" in k)
    with torch.no_grad():
        masks, labels = model(torch.zeros(2, 1, 32, 32))
    assert masks.shape == (2, 1, 32, 32) and labels.shape == (2, 1)


def test_multilabel_masks_train_one_output_and_head_logit_per_class(tmp_path: Path) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "arrays", n=24, size=32)
    squares = np.load(arrays_dir / "train_masks.npy")
    top_half = np.zeros_like(squares)  # class b: the upper half of each square
    for i, square in enumerate(squares):
        rows = np.flatnonzero(square.any(axis=1))
        if rows.size:
            top_half[i, rows[0] : rows[0] + rows.size // 2] = square[
                rows[0] : rows[0] + rows.size // 2
            ]
    np.save(arrays_dir / "train_masks.npy", squares | (top_half << 1))
    stats = json.loads((arrays_dir / "stats.json").read_text())
    (arrays_dir / "stats.json").write_text(json.dumps({**stats, "classes": ["a", "b"]}))

    spec = ModelSpec(encoder=SPEC.encoder, extra=SPEC.extra, classes=2, aux_head=True)
    metrics = _train(arrays_dir, tmp_path / "run", spec=spec, epochs=4, augment="none")
    history = pd.read_csv(tmp_path / "run" / "out" / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert 0.0 <= metrics["final"]["dice"] <= 1.0
    model, _ = load_checkpoint(tmp_path / "run" / "out" / "model.pt")
    with torch.no_grad():
        masks, labels = model(torch.zeros(2, 1, 32, 32))
    assert masks.shape == (2, 2, 32, 32) and labels.shape == (2, 2)
    with pytest.raises(SegflowError, match="lists 2 class"):
        _train(arrays_dir, tmp_path / "binary", epochs=1)  # a one-class model on two classes


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgd", "scheduler": "plateau", "warmup_epochs": 1, "grad_clip": 1.0},
        {"optimizer": "adam", "scheduler": "onecycle", "amp": "bf16"},
        {"scheduler": "cosine_restarts", "restart_epochs": 1, "crop": [16, 16], "empty_ratio": 0.5},
    ],
    ids=["sgd-plateau-clip", "adam-onecycle-bf16", "restarts-crop-balanced"],
)
def test_option_variants_train(arrays_dir: Path, tmp_path: Path, overrides: dict[str, Any]) -> None:
    metrics = _train(arrays_dir, tmp_path / "run", epochs=2, **overrides)
    assert metrics["epochs_trained"] == 2
    _, meta = load_checkpoint(tmp_path / "run" / "out" / "model.pt")
    assert meta["input_size"] == [32, 32]  # patches for training, full size for validation


@pytest.mark.timeout(120)
def test_dataloader_workers_after_opencv_threads_started(arrays_dir: Path, tmp_path: Path) -> None:
    # Workers come from a fork server, so whatever thread pools this process runs stay here.
    cv2.setNumThreads(2)
    cv2.GaussianBlur(np.zeros((512, 512), np.float32), (0, 0), 3.0)
    metrics = _train(arrays_dir, tmp_path / "run", epochs=1, num_workers=2)
    assert metrics["epochs_trained"] == 1


def test_loader_workers_follow_threads() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert loader_workers(None, cuda=True) == 3
        assert loader_workers(None, cuda=False) == 0
        assert loader_workers(2, cuda=False) == 2
        torch.set_num_threads(1)
        assert loader_workers(None, cuda=True) == 0
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- epoch length, phases, mixing

PHASES = [{"until_epoch": 1, "augment": "none"}, {"augment": "d4"}]


def _fold_data(arrays_dir: Path, augment: Any = "d4", **overrides: Any) -> FoldData:
    arrays = SegmentationArrays.open(arrays_dir)
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    options = TrainOptions(**{"batch_size": 4, **overrides})
    return FoldData.build(arrays, train_rows, val_rows, augment, options, pin_memory=False)


def test_steps_per_epoch_gives_exactly_that_many_batches(arrays_dir: Path) -> None:
    natural = _fold_data(arrays_dir, batch_size=3)
    n_train = len(natural.train_set)
    assert n_train % 3 == 0 and len(natural.train_loader) == n_train // 3  # 21 items
    # Two whole passes: every item exactly twice, reshuffled between the passes.
    data = _fold_data(arrays_dir, batch_size=3, steps_per_epoch=2 * n_train // 3)
    for epoch in (1, 2):
        data.seed_epoch(7, epoch)
        batches = [batch["row"].tolist() for batch in data.train_loader]
        assert len(batches) == 2 * n_train // 3 and {len(rows) for rows in batches} == {3}
        drawn = [row for rows in batches for row in rows]
        assert set(Counter(drawn).values()) == {2}
        assert drawn[:n_train] != drawn[n_train:]  # the second pass is reshuffled
    # Fewer draws than items, more than items, and balanced sampling: always N batches.
    for steps, extra in ((2, {}), (13, {}), (7, {"empty_ratio": 0.5})):
        data = _fold_data(arrays_dir, steps_per_epoch=steps, **extra)
        data.seed_epoch(7, 1)
        batches = [batch["row"] for batch in data.train_loader]
        assert len(data.train_loader) == len(batches) == steps
        assert all(len(rows) == 4 for rows in batches)
    # Deterministic per (seed, epoch): a replayed epoch draws the same rows.
    data = _fold_data(arrays_dir, steps_per_epoch=9, empty_ratio=0.5)
    epochs = []
    for epoch in (1, 2, 1):
        data.seed_epoch(7, epoch)
        epochs.append(torch.cat([batch["row"] for batch in data.train_loader]).tolist())
    assert epochs[0] == epochs[2] != epochs[1]


def test_class_balance_draws_the_rare_class_more_often(arrays_dir: Path) -> None:
    """Multi-label arrays where class 1 is in 3 of the non-empty images: with class_balance
    inverse the loader draws them far above their share, the same way for the same epoch."""
    masks = np.load(arrays_dir / "train_masks.npy")
    nonempty = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    rare_rows = nonempty[::6][:3]
    masks[rare_rows] *= 2  # bit 1: class "rare" instead of class "common"
    np.save(arrays_dir / "train_masks.npy", masks)
    stats = json.loads((arrays_dir / "stats.json").read_text())
    stats.update(classes=["common", "rare"], multilabel=True)
    (arrays_dir / "stats.json").write_text(json.dumps(stats))

    def drawn(data: FoldData, epoch: int) -> list[int]:
        data.seed_epoch(7, epoch)
        return torch.cat([batch["row"] for batch in data.train_loader]).tolist()

    natural = _fold_data(arrays_dir, steps_per_epoch=50)
    balanced = _fold_data(arrays_dir, steps_per_epoch=50, class_balance="inverse")
    rare = set(rare_rows.tolist())
    train_rows = natural.train_set.rows.tolist()
    in_train = len(rare & set(train_rows))
    assert in_train >= 1
    natural_share = np.mean([row in rare for row in drawn(natural, 1)])
    balanced_rows = drawn(balanced, 1)
    balanced_share = np.mean([row in rare for row in balanced_rows])
    assert natural_share < 0.25 < balanced_share  # inverse: about half of the non-empty draws
    assert balanced_rows == drawn(balanced, 1) != drawn(balanced, 2)


def test_the_lr_schedule_follows_steps_per_epoch(arrays_dir: Path, tmp_path: Path) -> None:
    _train(arrays_dir, tmp_path / "run", epochs=2, steps_per_epoch=3, scheduler="cosine")
    lrs = pd.read_csv(tmp_path / "run" / "out" / "history.csv")["lr"].tolist()
    # history's lr is that of each epoch's last batch: steps 2 and 5 of 6.
    expected = [FAST["lr"] * lr_factor("cosine", step, 6, 0, 1) for step in (2, 5)]
    assert lrs == pytest.approx(expected)


def _reference_images(arrays_dir: Path) -> MemmapDataset:
    """Every training image as the trainer loads it, without augmentation."""
    arrays = SegmentationArrays.open(arrays_dir)
    rows = np.arange(np.load(arrays.train_images_path, mmap_mode="r").shape[0])
    return MemmapDataset(arrays.train_images_path, rows, mean=arrays.mean, std=arrays.std)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 1])
def test_augment_phases_switch_at_the_epoch_even_in_persistent_workers(
    arrays_dir: Path, workers: int
) -> None:
    reference = _reference_images(arrays_dir)
    data = _fold_data(arrays_dir, augment=PHASES, num_workers=workers)
    assert data.train_loader.persistent_workers == (workers > 0)

    def unchanged_and_dihedral(epoch: int) -> tuple[int, int]:
        data.seed_epoch(7, epoch)
        same = dihedral = 0
        for batch in data.train_loader:
            for row, image in zip(batch["row"].tolist(), batch["image"], strict=True):
                original = reference[row]["image"]
                same += torch.equal(image, original)
                variants = [torch.rot90(original, k, (1, 2)) for k in range(4)]
                variants += [variant.flip(2) for variant in variants]
                dihedral += any(torch.equal(image, variant) for variant in variants)
        return same, dihedral

    n_drawn = len(data.train_loader) * 4
    assert unchanged_and_dihedral(1) == (n_drawn, n_drawn)  # "none": the input as stored
    same, dihedral = unchanged_and_dihedral(2)
    assert dihedral == n_drawn and same < n_drawn / 2  # "d4": flipped and rotated
    assert unchanged_and_dihedral(1) == (n_drawn, n_drawn)  # a resumed epoch 1 is "none" again


def test_resumed_run_with_phases_steps_and_mixing_equals_an_uninterrupted_one(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {
        "augment": [{"until_epoch": 1, "augment": "none"}, {"augment": "d4"}],
        "steps_per_epoch": 3,
        "mixup_prob": 0.4,
        "cutmix_prob": 0.4,
        "empty_ratio": 0.5,
    }
    _train(arrays_dir, tmp_path / "straight", **settings)
    run = tmp_path / "interrupted"
    _count_epochs(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, **settings)
    trained = _count_epochs(monkeypatch)
    assert _train(arrays_dir, run, **settings)["resumed_from_epoch"] == 2 and trained == [3]
    straight = _weights(tmp_path / "straight" / "out" / "model.pt")
    resumed = _weights(run / "out" / "model.pt")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    # The mixing takes part: without it the same run trains other weights.
    unmixed = {**settings, "mixup_prob": 0.0, "cutmix_prob": 0.0}
    _train(arrays_dir, tmp_path / "unmixed", **unmixed)
    other = _weights(tmp_path / "unmixed" / "out" / "model.pt")
    assert any(not torch.equal(straight[key], other[key]) for key in straight)


def test_mixup_with_lovasz_stops_before_training(arrays_dir: Path, tmp_path: Path) -> None:
    options = TrainOptions(**FAST, mixup_prob=0.5)
    with pytest.raises(SegflowError, match=r"train\.mixup_prob: .*lovasz"):
        train_fold(
            arrays_dir,
            arrays_dir / "folds.csv",
            0,
            Experiment("experiment", SPEC, {"bce": 1.0, "lovasz": 1.0}, None, "d4", options),
            tmp_path / "out",
            tmp_path / "resume",
        )


@pytest.mark.parametrize(
    "change",
    [
        {"steps_per_epoch": 250},
        {"mixup_prob": 0.5},
        {"mixup_alpha": 0.2},
        {"cutmix_prob": 0.5},
        {"cutmix_alpha": 0.5},
        {"augment": PHASES},
        {"plateau_patience": 5},
        {"plateau_factor": 0.1},
    ],
)
def test_new_options_enter_the_resume_config_hash(change: dict[str, Any]) -> None:
    def digest(values: dict[str, Any]) -> str:
        augment = values.pop("augment", "d4")
        return config_hash(TrainOptions(**values), SPEC, 0, LOSS, None, augment, {"data": "x"})

    assert digest(dict(change)) != digest({})


# --------------------------------------------------------------------------- schedules


def test_lr_schedules() -> None:
    total, warmup = 100, 10
    cosine = [lr_factor("cosine", s, total, warmup, 30) for s in range(total)]
    assert cosine[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert cosine[warmup] == 1.0 and cosine[-1] < 0.001 and np.all(np.diff(cosine[warmup:]) <= 0)
    restarts = [lr_factor("cosine_restarts", s, total, 0, 25) for s in range(total)]
    assert restarts[0] == restarts[25] == restarts[50] == 1.0 and restarts[24] < 0.01
    one_cycle = [lr_factor("onecycle", s, total, 0, 1) for s in range(total)]
    assert one_cycle[0] == pytest.approx(1 / 25) and max(one_cycle) == pytest.approx(1.0, abs=1e-3)
    assert int(np.argmax(one_cycle)) == 30 and one_cycle[-1] < 1e-3
    assert {lr_factor(kind, 50, total, 0, 1) for kind in ("none", "plateau")} == {1.0}


@pytest.mark.parametrize(("patience", "factor"), [(3, 0.5), (1, 0.5), (2, 0.1)])
@pytest.mark.parametrize("maximise", [True, False])
def test_plateau_reduces_at_the_end_of_the_patience_th_epoch_without_improvement(
    patience: int, factor: float, maximise: bool
) -> None:
    """train.plateau_patience counts epochs without improvement as early stopping does: the
    first epoch sets the best, so a flat monitor is first reduced after epoch patience + 1."""
    options = TrainOptions(scheduler="plateau", plateau_patience=patience, plateau_factor=factor)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    _, plateau = make_schedulers(optimizer, options, lambda step: 1.0, maximise)
    assert plateau is not None
    lrs = []
    for _ in range(3 * patience + 3):
        plateau.step(0.7)
        lrs.append(optimizer.param_groups[0]["lr"])
    # Reductions at the ends of epochs patience + 1, 2 patience + 1, 3 patience + 1 (1-based).
    expected = [factor ** (epoch // patience) for epoch in range(len(lrs))]
    assert lrs == pytest.approx(expected)
    assert lrs[patience - 1] == 1.0 and lrs[patience] == pytest.approx(factor)
    # An improvement restarts the count: the next reduction comes patience bad epochs later.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    _, plateau = make_schedulers(optimizer, options, lambda step: 1.0, maximise)
    better = 1.0 if maximise else 0.5
    monitor = [0.7] * patience + [better] + [better] * patience
    lrs = []
    for value in monitor:
        plateau.step(value)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:-1] == [1.0] * (len(monitor) - 1) and lrs[-1] == pytest.approx(factor)


def test_other_schedulers_have_no_plateau() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert make_schedulers(optimizer, TrainOptions(), lambda step: 1.0, True)[1] is None


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"lr": 0}, "train.lr"),
        ({"optimizer": "rmsprop"}, "train.optimizer"),
        ({"scheduler": "step"}, "train.scheduler"),
        ({"monitor": "accuracy"}, "train.monitor"),
        ({"crop": [0, 16]}, "train.crop"),
        ({"crop": [16]}, "train.crop"),
        ({"ema_decay": 1.0}, "train.ema_decay"),
        ({"average_top_k": 0}, "train.average_top_k"),
        ({"empty_ratio": 1.5}, "train.empty_ratio"),
        ({"epochs": True}, "train.epochs"),
        ({"plateau_patience": 0}, "train.plateau_patience"),
        ({"plateau_patience": 1.5}, "train.plateau_patience"),
        ({"plateau_factor": 1.0}, "train.plateau_factor"),
        ({"plateau_factor": 0}, "train.plateau_factor"),
        ({"class_balance": "log"}, "train.class_balance"),
    ],
)
def test_invalid_options_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(SegflowError, match=key.replace(".", r"\.")):
        TrainOptions(**overrides)


def test_crop_accepts_one_size() -> None:
    assert TrainOptions(crop=16).crop == [16, 16]
    assert TrainOptions(crop=(16, 8)).crop == [16, 8]


def test_bad_inputs_name_the_file(arrays_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match=r"folds\.csv: no fold 7"):
        _train(arrays_dir, tmp_path / "a", fold=7)
    with pytest.raises(SegflowError, match=r"in_channels is 3 .*stats\.json"):
        _train(arrays_dir, tmp_path / "b", spec=ModelSpec(in_channels=3))
    folds = pd.read_csv(arrays_dir / "folds.csv", dtype={"id": str})
    folds.loc[0, "id"] = "not-preprocessed"
    folds.to_csv(arrays_dir / "folds.csv", index=False)
    with pytest.raises(SegflowError, match=r"folds\.csv: 1 id\(s\).*not-preprocessed"):
        _train(arrays_dir, tmp_path / "c")
    (arrays_dir / "train_masks.npy").unlink()
    with pytest.raises(SegflowError, match=r"train_masks\.npy does not exist"):
        _train(arrays_dir, tmp_path / "d")
    with pytest.raises(SegflowError, match="fp16 needs a CUDA device"):
        train_module.amp_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize("window", [None, (2, 3, 9, 7)], ids=["whole", "pad-window"])
def test_validation_scores_from_device_counts_equal_the_per_batch_host_scores(
    window: tuple[int, int, int, int] | None,
) -> None:
    from segflow.model.metrics import per_image_scores, scores_from_counts

    generator = torch.Generator().manual_seed(0)
    batches = []
    for size in (4, 4, 3):  # a short last batch
        logits = torch.randn(size, 2, 16, 16, generator=generator) - 0.5
        masks = (torch.rand(size, 2, 16, 16, generator=generator) > 0.7).float()
        logits[0, 0] = -1.0  # empty prediction of a non-empty truth
        masks[1, 1] = 0.0  # an empty truth; and both empty:
        logits[2, 0], masks[2, 0] = -1.0, 0.0
        batches.append((logits, masks))
    # The former validation: every batch's thresholded masks copied to the host and scored.
    old: dict[str, list[np.ndarray]] = {"dice": [], "iou": [], "kaggle": []}
    for logits, masks in batches:
        pred = (logits > 0).flatten(0, 1).numpy()
        truth = masks.flatten(0, 1).numpy().astype(bool)
        if window is not None:
            top, left, height, width = window
            pred = pred[:, top : top + height, left : left + width]
            truth = truth[:, top : top + height, left : left + width]
        for name, values in per_image_scores(pred, truth).items():
            old[name].append(values)
    counts = torch.cat([train_module.overlap_counts(lo, ma, window) for lo, ma in batches], dim=1)
    assert counts.dtype == torch.int64 and counts.shape == (3, 22)
    for name, values in old.items():
        new = scores_from_counts(name, *counts.numpy())
        assert 0 < new.mean() < 1
        assert float(new.mean()) == float(np.concatenate(values).mean())  # exactly


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_the_cpu_model(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels_last: bool
) -> None:
    seen: list[bool] = []
    original = train_module._FoldTrainer._forward

    def forward(self: Any, model: torch.nn.Module, images: torch.Tensor) -> Any:
        conv = layout_probe_conv(model)
        seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last))
        return original(self, model, images)

    monkeypatch.setattr(train_module._FoldTrainer, "_forward", forward)
    _train(arrays_dir, tmp_path, epochs=1, channels_last=channels_last)
    assert seen and all(nhwc == channels_last for nhwc in seen)
