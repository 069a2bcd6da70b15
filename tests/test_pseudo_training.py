"""Training on pseudo-labelled test images: sampling cap, loss weight, never in validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_synthetic_arrays

from segflow.core.errors import SegflowError
from segflow.model.datasets import PseudoMixSampler, SegmentationArrays
from segflow.model.experiment import Experiment
from segflow.model.training.fold_data import (
    FoldData,
    PseudoLabels,
    PseudoSpec,
    SeededItems,
    split_rows,
)
from segflow.model.training.train import train_fold
from segflow.model.training.train_options import TrainOptions

SPEC_KW = {"encoder": "mobilenet_v2", "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}


def _pseudo_dir(arrays_dir: Path, soft: bool = False) -> Path:
    """Select test1 and test3 (the synthetic test images are copies of train rows 0..3)."""
    masks = np.load(arrays_dir / "train_masks.npy")
    out = arrays_dir.parent / ("soft" if soft else "hard")
    out.mkdir()
    pd.DataFrame(
        {"id": [f"test{i}" for i in range(4)], "selected": [False, True, False, True]}
    ).to_csv(out / "selection.csv", index=False)
    targets = masks[[1, 3]]
    if soft:
        targets = (targets[:, None] * 0.9).astype(np.float16)
    np.save(out / "targets.npy", targets)
    return out


@pytest.fixture()
def arrays_dir(tmp_path: Path) -> Path:
    return write_synthetic_arrays(tmp_path / "arrays", n=24, size=32)


def test_mix_sampler_caps_the_pseudo_share_and_is_reproducible() -> None:
    generator = torch.Generator()
    sampler = PseudoMixSampler(n_real=30, n_pseudo=100, max_share=0.25, generator=generator)
    assert len(sampler) == 30 + 10  # 10 / 40 = 0.25
    generator.manual_seed(7)
    first = list(sampler)
    generator.manual_seed(7)
    assert list(sampler) == first
    assert sorted(i for i in first if i < 30) == list(range(30))  # every real item once
    pseudo = [i for i in first if i >= 30]
    assert len(pseudo) == len(set(pseudo)) == 10 and max(pseudo) < 130
    generator.manual_seed(8)
    assert {i for i in sampler if i >= 30} != set(pseudo)  # a fresh subset each epoch
    assert len(PseudoMixSampler(30, 3, 0.5, generator)) == 33  # fewer pseudo items than the cap
    with pytest.raises(SegflowError, match="max_pseudo_share"):
        PseudoMixSampler(30, 3, 1.0, generator)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_pseudo_items_are_trained_on_but_never_validated(arrays_dir: Path, soft: bool) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    pseudo = PseudoLabels.load(_pseudo_dir(arrays_dir, soft), arrays, max_share=0.5, weight=1.0)
    assert pseudo.test_rows.tolist() == [1, 3]
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    data = FoldData.build(
        arrays, train_rows, val_rows, "d4", TrainOptions(batch_size=4), False, pseudo
    )
    assert len(data.train_set) == len(train_rows) + 2
    assert data.val_loader.dataset.rows.tolist() == val_rows.tolist()  # real labels only
    flags = [float(data.train_set[i]["pseudo"]) for i in range(len(data.train_set))]
    assert flags == [0.0] * len(train_rows) + [1.0, 1.0]
    target = data.train_set[len(train_rows)]["mask"]
    expected = np.load(arrays_dir / "train_masks.npy")[1]
    value = 0.9 if soft else 1.0
    assert target.shape == (1, 32, 32)
    # d4 moves the square; its area and value survive.
    assert float(target.sum()) == pytest.approx(expected.sum() * value, rel=1e-3)


def test_pseudo_round_trains_and_a_changed_selection_changes_the_fingerprint(
    arrays_dir: Path, tmp_path: Path
) -> None:
    from segflow.model.models import ModelSpec

    pseudo_dir = _pseudo_dir(arrays_dir)
    experiment = Experiment(
        "experiment",
        ModelSpec(**SPEC_KW),
        {"bce": 1.0},
        None,
        "none",
        TrainOptions(epochs=1, batch_size=8, lr=1e-2),
    )
    metrics = train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        experiment,
        tmp_path / "out",
        tmp_path / "resume",
        pseudo=PseudoSpec(pseudo_dir, max_share=0.5, weight=0.5),
    )
    assert metrics["n_train"] == 16 + 2 and metrics["n_val"] == 8
    # The resume state is keyed by this digest: other targets never continue old weights.
    arrays = SegmentationArrays.open(arrays_dir)
    before = PseudoLabels.load(pseudo_dir, arrays, 0.5, 0.5).fingerprint()
    np.save(pseudo_dir / "targets.npy", 1 - np.load(pseudo_dir / "targets.npy"))
    assert PseudoLabels.load(pseudo_dir, arrays, 0.5, 0.5).fingerprint() != before
    assert PseudoLabels.load(pseudo_dir, arrays, 0.4, 0.5).fingerprint() != before


def test_pseudo_weight_scales_only_the_pseudo_part(arrays_dir: Path, tmp_path: Path) -> None:
    from segflow.model.models import ModelSpec
    from segflow.model.training.train import _FoldTrainer

    arrays = SegmentationArrays.open(arrays_dir)
    pseudo = PseudoLabels.load(_pseudo_dir(arrays_dir), arrays, max_share=0.5, weight=0.0)
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    trainer = _FoldTrainer(
        arrays,
        train_rows,
        val_rows,
        0,
        ModelSpec(**SPEC_KW),
        {"bce": 1.0},
        "none",
        TrainOptions(batch_size=4, device="cpu"),
        None,
        tmp_path / "resume",
        pseudo,
    )
    logits = torch.randn(4, 1, 32, 32)
    masks = (torch.rand(4, 1, 32, 32) > 0.5).float()
    flags = torch.tensor([0.0, 0.0, 1.0, 1.0])
    weighted = trainer._batch_loss(logits, None, masks, flags)
    real_only = trainer._loss(logits[:2], None, masks[:2])
    assert float(weighted) == pytest.approx(float(real_only))  # weight 0: pseudo ignored
    trainer.pseudo_weight = 1.0
    assert float(trainer._batch_loss(logits, None, masks, flags)) == pytest.approx(
        float(trainer._loss(logits, None, masks))
    )


def test_bad_pseudo_folder_is_named(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    pseudo_dir = _pseudo_dir(arrays_dir)
    np.save(pseudo_dir / "targets.npy", np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(SegflowError, match=r"targets\.npy: shape"):
        PseudoLabels.load(pseudo_dir, arrays, 0.5, 1.0)
    (pseudo_dir / "selection.csv").unlink()
    with pytest.raises(SegflowError, match=r"selection\.csv does not exist"):
        PseudoLabels.load(pseudo_dir, arrays, 0.5, 1.0)


def _epoch_batches(data: FoldData, epoch: int) -> list[tuple[list[int], torch.Tensor]]:
    data.seed_epoch(7, epoch)
    return [(batch["row"].tolist(), batch["image"]) for batch in data.train_loader]


@pytest.mark.timeout(180)
def test_epochs_do_not_depend_on_workers_or_on_what_ran_before(arrays_dir: Path) -> None:
    """Per-draw augmentation seeds: 0 or 2 (persistent) workers give the same epochs, and an
    epoch replayed after another (a resume) is drawn exactly as the first time."""
    arrays = SegmentationArrays.open(arrays_dir)
    pseudo = PseudoLabels.load(_pseudo_dir(arrays_dir, False), arrays, max_share=0.5, weight=1.0)
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    epochs = {}
    for workers in (0, 2):
        options = TrainOptions(batch_size=4, num_workers=workers)
        data = FoldData.build(arrays, train_rows, val_rows, "heavy", options, False, pseudo)
        assert data.train_loader.persistent_workers == (workers > 0)
        epochs[workers] = [_epoch_batches(data, epoch) for epoch in (1, 2, 1)]
    for workers in (0, 2):
        first, second, replayed = epochs[workers]
        assert [rows for rows, _ in first] == [rows for rows, _ in replayed]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, replayed, strict=True))
        assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True))
    for plain, pooled in zip(epochs[0], epochs[2], strict=True):
        assert [rows for rows, _ in plain] == [rows for rows, _ in pooled]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain, pooled, strict=True))


def test_seeded_items_address_every_part_and_refuse_what_they_cannot(arrays_dir: Path) -> None:
    arrays = SegmentationArrays.open(arrays_dir)
    pseudo = PseudoLabels.load(_pseudo_dir(arrays_dir, False), arrays, max_share=0.5, weight=1.0)
    train_rows, val_rows = split_rows(arrays, arrays_dir / "folds.csv", 0)
    data = FoldData.build(
        arrays, train_rows, val_rows, "d4", TrainOptions(batch_size=4), False, pseudo
    )
    items = SeededItems(data.train_set)
    assert len(items) == len(train_rows) + 2
    assert float(items[(len(train_rows) - 1, 3)]["pseudo"]) == 0.0
    assert float(items[(len(train_rows), 3)]["pseudo"]) == 1.0
    assert torch.equal(items[(5, 11)]["image"], items[(5, 11)]["image"])
    with pytest.raises(IndexError):
        items[(len(items), 0)]
    with pytest.raises(SegflowError, match="MemmapDataset"):
        SeededItems(torch.utils.data.Subset(data.train_set, [0, 1]))
