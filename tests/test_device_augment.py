"""Tests for the device input path: uint8 batches, geometric augmentation and normalisation on
the device (segflow.model.training.device_augment), checked on the CPU against the
albumentations path pixel for pixel, in loaders and in whole trainings (resume included).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_synthetic_arrays

from segflow.core.errors import SegflowError
from segflow.model.datasets import SegmentationArrays
from segflow.model.experiment import Experiment
from segflow.model.models import ModelSpec
from segflow.model.training import fold_data as fold_data_module
from segflow.model.training import train as train_module
from segflow.model.training.augment import build_augmentation
from segflow.model.training.device_augment import (
    DeviceBatcher,
    apply_geometry,
    draw_geometry,
    is_device_geometric,
)
from segflow.model.training.fold_data import FoldData, split_rows
from segflow.model.training.train import TrainOptions, train_fold

SPEC = ModelSpec(
    encoder="mobilenet_v2",
    in_channels=3,
    extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
)
LOSS = {"bce": 1.0, "dice": 1.0}
FAST = {"epochs": 3, "batch_size": 8, "lr": 1e-2}
LIST_SPEC = [
    {"name": "HorizontalFlip", "params": {"p": 0.5}},
    {"name": "RandomRotate90"},
    {"name": "Transpose", "params": {"p": 0.3}},
    {"name": "VerticalFlip"},
]


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def arrays_dir(tmp_path: Path) -> Path:
    return write_synthetic_arrays(tmp_path / "preprocess", n=32, n_empty=8, channels=3)


@pytest.mark.parametrize("spec", ["d4", LIST_SPEC])
@pytest.mark.parametrize("crop", [None, (8, 8), (12, 7)])
def test_drawn_geometry_equals_albumentations_for_the_same_seed(spec: Any, crop: Any) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (12, 12), dtype=np.uint8)
    transform = build_augmentation(spec, 12, 12, crop=crop, channels=3)
    assert is_device_geometric(transform)
    seen = set()
    for seed in range(64):
        transform.set_random_seed(seed)
        expected = transform(image=image, mask=mask)
        transform.set_random_seed(seed)
        geometry = draw_geometry(transform, 12, 12, 3)
        seen.add(tuple(geometry[:6]))
        out, out_mask = apply_geometry(
            torch.from_numpy(image)[None],
            torch.from_numpy(mask)[None],
            torch.from_numpy(geometry)[None],
            (int(geometry[6]), int(geometry[7])),
        )
        np.testing.assert_array_equal(out[0].numpy(), expected["image"])
        np.testing.assert_array_equal(out_mask[0].numpy(), expected["mask"])
    assert len(seen) >= 4  # the draws vary: flips, rotations and crop offsets


def test_only_lossless_geometry_takes_the_device_path() -> None:
    assert is_device_geometric(None)
    assert is_device_geometric(build_augmentation("d4", 16, 16, crop=(8, 8)))
    assert is_device_geometric(build_augmentation("none", 16, 16, crop=(8, 8)))
    assert not is_device_geometric(build_augmentation("heavy", 16, 16))
    colour = [{"name": "HorizontalFlip"}, {"name": "RandomBrightnessContrast"}]
    assert not is_device_geometric(build_augmentation(colour, 16, 16))


def _fold_data(arrays_dir: Path, augment: Any, device_path: bool, **overrides: Any) -> FoldData:
    arrays = SegmentationArrays.open(arrays_dir)
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    options = TrainOptions(**{"batch_size": 4, **overrides})
    return FoldData.build(
        arrays, train_rows, val_rows, augment, options, False, device_path=device_path
    )


@pytest.mark.parametrize(
    ("augment", "crop"),
    [("d4", None), ([{"until_epoch": 1, "augment": "none"}, {"augment": LIST_SPEC}], [24, 24])],
)
def test_device_batches_equal_the_albumentations_path(
    arrays_dir: Path, augment: Any, crop: Any
) -> None:
    host = _fold_data(arrays_dir, augment, False, crop=crop, empty_ratio=0.5)
    device = _fold_data(arrays_dir, augment, True, crop=crop, empty_ratio=0.5)
    assert device.device_path and not host.device_path
    cpu = torch.device("cpu")
    for epoch in (1, 2):
        host.seed_epoch(3, epoch)
        device.seed_epoch(3, epoch)
        for expected, raw in zip(host.train_loader, device.train_loader, strict=True):
            assert raw["image"].dtype == torch.uint8 and "geometry" in raw
            got = device.to_device(raw, cpu)
            reference = host.to_device(expected, cpu)
            assert torch.equal(got["image"], reference["image"])  # same draws, same pixels
            assert torch.equal(got["mask"], reference["mask"])
            assert got["image"].is_contiguous()
    for expected, raw in zip(host.val_loader, device.val_loader, strict=True):
        got, reference = device.to_device(raw, cpu), host.to_device(expected, cpu)
        assert torch.equal(got["image"], reference["image"])
        assert torch.equal(got["mask"], reference["mask"])
    channels_last = device.to_device(raw, cpu, channels_last=True)["image"]
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, reference["image"])


def test_the_device_path_is_chosen_from_the_spec_on_cuda_only(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    options = TrainOptions(batch_size=4, num_workers=0)

    def build(augment: Any, cuda: bool) -> FoldData:
        return FoldData.build(arrays, train_rows, val_rows, augment, options, pin_memory=cuda)

    assert build("d4", cuda=True).device_path
    assert not build("heavy", cuda=True).device_path
    assert not build("d4", cuda=False).device_path  # the CPU keeps today's path
    with pytest.raises(SegflowError, match="lossless geometric"):
        FoldData.build(arrays, train_rows, val_rows, "heavy", options, False, device_path=True)


def test_float_batches_are_only_moved() -> None:
    batcher = DeviceBatcher((0.5,), (0.25,), 255.0, 1)
    batch = {"image": torch.rand(2, 1, 4, 4), "mask": torch.ones(2, 1, 4, 4), "pseudo": None}
    out = batcher(batch, torch.device("cpu"))
    assert out["image"] is batch["image"] and out["mask"] is batch["mask"]


@pytest.mark.timeout(120)
def test_persistent_workers_start_once_per_fold(arrays_dir: Path) -> None:
    data = _fold_data(arrays_dir, "d4", True, num_workers=1)
    pids: list[set[int]] = []
    for epoch in (1, 2, 3):
        data.seed_epoch(3, epoch)
        for loader in (data.train_loader, data.val_loader):
            for _ in loader:
                pass
            pids.append({worker.pid for worker in loader._iterator._workers})
    train, val = pids[0::2], pids[1::2]
    assert all(p == train[0] for p in train) and all(p == val[0] for p in val)
    assert len(train[0] | val[0]) == 2  # one train worker and one validation worker, once


def _train(arrays_dir: Path, run: Path, **overrides: Any) -> dict[str, Any]:
    options = TrainOptions(**{**FAST, **overrides})
    return train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        Experiment("experiment", SPEC, LOSS, None, "d4", options),
        run / "out",
        run / "resume",
    )


def _force_device_path(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    build = FoldData.build.__func__  # type: ignore[attr-defined]

    def forced(cls: type, *args: Any, **kwargs: Any) -> FoldData:
        return build(cls, *args, **{**kwargs, "device_path": on})

    monkeypatch.setattr(fold_data_module.FoldData, "build", classmethod(forced))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.timeout(180)
def test_training_on_the_device_path_equals_today_and_resumes(
    arrays_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"empty_ratio": 0.5, "ema_decay": 0.9}
    _train(arrays_dir, tmp_path / "host", **settings)
    _force_device_path(monkeypatch, True)
    _train(arrays_dir, tmp_path / "device", **settings)
    host = _weights(tmp_path / "host" / "out" / "model.pt")
    device = _weights(tmp_path / "device" / "out" / "model.pt")
    assert all(torch.equal(host[key], device[key]) for key in host)
    history = pd.read_csv(tmp_path / "device" / "out" / "history.csv").drop(columns="seconds")
    reference = pd.read_csv(tmp_path / "host" / "out" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history, reference)

    # Interrupted after epoch 2 and resumed, on the device path: the same weights again.
    monkeypatch.setattr(train_module, "_remove_resume_state", lambda resume_dir: None)
    original = train_module._FoldTrainer.train_epoch

    def interrupt(self: Any, epoch: int) -> tuple[float, float]:
        if epoch == 3:
            raise KeyboardInterrupt
        return original(self, epoch)

    run = tmp_path / "resumed"
    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(arrays_dir, run, **settings)
    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", original)
    metrics = _train(arrays_dir, run, **settings)
    assert metrics["resumed_from_epoch"] == 2
    resumed = _weights(run / "out" / "model.pt")
    assert all(torch.equal(host[key], resumed[key]) for key in host)
    written = json.loads((run / "out" / "metrics.json").read_text())
    assert (
        written["score"]
        == json.loads((tmp_path / "host" / "out" / "metrics.json").read_text())["score"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_batches_equal_the_albumentations_path(arrays_dir: Path) -> None:
    host = _fold_data(arrays_dir, "d4", False, crop=[24, 24], num_workers=2)
    device = _fold_data(arrays_dir, "d4", True, crop=[24, 24], num_workers=2)
    cuda = torch.device("cuda")
    host.seed_epoch(3, 1)
    device.seed_epoch(3, 1)
    for expected, raw in zip(host.train_loader, device.train_loader, strict=True):
        got = device.to_device(raw, cuda, channels_last=True)
        assert got["image"].is_cuda
        assert torch.equal(got["image"].cpu(), expected["image"])
        assert torch.equal(got["mask"].cpu(), expected["mask"])
