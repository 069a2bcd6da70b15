"""Training on pseudo-labelled test images: sampling cap, loss weight, never in validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_synthetic_arrays

from segflow.datasets import PseudoMixSampler, SegmentationArrays
from segflow.errors import SegflowError
from segflow.fold_data import FoldData, PseudoLabels, split_rows
from segflow.train import train_fold
from segflow.train_options import TrainOptions

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
    from segflow.models import ModelSpec

    pseudo_dir = _pseudo_dir(arrays_dir)
    common = {
        "model_spec": ModelSpec(**SPEC_KW),
        "loss_weights": {"bce": 1.0},
        "augment": "none",
        "options": TrainOptions(epochs=1, batch_size=8, lr=1e-2),
        "out_dir": tmp_path / "out",
        "resume_dir": tmp_path / "resume",
    }
    metrics = train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        pseudo_dir=pseudo_dir,
        max_pseudo_share=0.5,
        pseudo_weight=0.5,
        **common,
    )
    assert metrics["n_train"] == 16 + 2 and metrics["n_val"] == 8
    # The resume state is keyed by this digest: other targets never continue old weights.
    arrays = SegmentationArrays.open(arrays_dir)
    before = PseudoLabels.load(pseudo_dir, arrays, 0.5, 0.5).fingerprint()
    np.save(pseudo_dir / "targets.npy", 1 - np.load(pseudo_dir / "targets.npy"))
    assert PseudoLabels.load(pseudo_dir, arrays, 0.5, 0.5).fingerprint() != before
    assert PseudoLabels.load(pseudo_dir, arrays, 0.4, 0.5).fingerprint() != before


def test_pseudo_weight_scales_only_the_pseudo_part(arrays_dir: Path, tmp_path: Path) -> None:
    from segflow.models import ModelSpec
    from segflow.train import _FoldTrainer

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
