"""End-to-end Snakemake runs of the competition tricks (issue 18): distance losses,
DeepLabV3 with a GeM aux head on dehazed arrays, and the inference options (multi-scale TTA,
gmean merge, MC-dropout, vote). A module of their own so `make test`'s xdist workers share
them out with test_workflow.py's runs.

Each run trains fold 0 of a 2-fold split (``folds.train_folds: [0]``): the options act on one
fold's training and predictions as on every fold's, and each fold costs a torch process per
training or prediction job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TWO_CLASS_DATA, copy_workflow, run_snakemake
from test_workflow import SMALL_DEMO, _two_class_dataset, write_config

from segflow.model.models import load_checkpoint

pytestmark = pytest.mark.workflow

# One trained fold (fold 0) of a 2-fold split.
HOLDOUT = {"n_folds": 2, "train_folds": [0]}


def test_deeplabv3_with_gem_aux_head_on_dehazed_arrays_runs_to_the_oof_metrics(
    tmp_path: Path,
) -> None:
    """Issue 18's options through the workflow: dehazed arrays (train and test), a DeepLabV3
    with a GeM-pooled aux head, trained (fold 0), predicted and scored on the OOF and the test
    set."""
    workdir = copy_workflow(tmp_path / "deeplab")
    overrides = {
        **SMALL_DEMO,
        "folds": HOLDOUT,
        "demo": {"n_train": 24, "n_test": 8, "height": 32, "width": 32, "seed": 5},
        "preprocess": {"dehaze": True, "dehaze_patch": 5},
        "experiments": {
            "deeplab": {
                "model": {
                    "arch": "DeepLabV3",
                    "encoder": "resnet18",
                    "aux_head": True,
                    "aux_pooling": "gem",
                    "aux_dropout": 0.3,
                },
                "train": {"epochs": 1, "batch_size": 4},
            }
        },
        "run_experiments": ["deeplab"],
    }
    config = write_config(workdir, "deeplab.yaml", overrides)
    targets = [
        "results/oof/deeplab/round0/metrics.json",
        "results/test/deeplab/round0/fold0/probs.npy",
    ]
    run_snakemake(workdir, *targets, "--configfile", config)
    stats = json.loads((workdir / "results" / "preprocess" / "stats.json").read_text())
    assert stats["options"]["dehaze"] is True and stats["options"]["dehaze_patch"] == 5
    metrics = json.loads((workdir / targets[0]).read_text())
    assert metrics  # scored
    _, metadata = load_checkpoint(
        workdir / "results" / "models" / "deeplab" / "round0" / "fold0" / "model.pt"
    )
    assert metadata["spec"]["arch"] == "DeepLabV3" and metadata["spec"]["aux_pooling"] == "gem"
    assert np.load(workdir / targets[1]).shape[0] == 8


def test_distance_losses_train_a_multilabel_run_to_its_oof(tmp_path: Path) -> None:
    """A two-class run whose loss has the distance-based terms (the loaders compute the maps of
    the augmented masks) and a ramped boundary term trains its fold and scores its OOF."""
    workdir = copy_workflow(tmp_path / "workflow")
    _two_class_dataset(workdir / "data", n_train=24, n_test=4, size=32)
    overrides = {
        "results_dir": "results-dist",
        "demo": {"enabled": False},
        "data": TWO_CLASS_DATA,
        "preprocess": {"height": 32, "width": 32, "clahe": False},
        "folds": HOLDOUT,
        "run_experiments": ["dist"],
        "experiments": {
            "dist": {
                "model": {
                    "arch": "Unet",
                    "encoder": "mobilenet_v2",
                    "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
                },
                "loss": {
                    "bce": 1.0,
                    "dice": 1.0,
                    "boundary": {"weight": 0.5, "ramp_epochs": 1},
                    "hausdorff": 0.01,
                    "distance_bce": 0.5,
                },
                "augment": "d4",
                "train": {"epochs": 2, "batch_size": 8, "lr": 0.01},
            }
        },
    }
    config = write_config(workdir, "dist.yaml", overrides)
    run_snakemake(workdir, "results-dist/oof/dist/round0/metrics.json", "--configfile", config)
    results = workdir / "results-dist"
    model_dir = results / "models" / "dist" / "round0" / "fold0"
    history = pd.read_csv(model_dir / "history.csv")
    assert len(history) == 2 and np.isfinite(history[["train_loss", "val_loss"]]).all().all()
    metrics = json.loads((results / "oof" / "dist" / "round0" / "metrics.json").read_text())
    assert [record["class"] for record in metrics["per_class"]] == ["1", "2"]


# Issue 18's inference options all on: multi-scale TTA with the geometric merge, MC-dropout
# (FPN has decoder_dropout) whose uncertainty.npy drives the pseudo-label selection, and the
# majority-vote ensemble; the second level's stacking is off to keep the run short.
INFERENCE_DEMO = {
    **SMALL_DEMO,
    "folds": HOLDOUT,
    "run_experiments": ["fpn"],
    "experiments": {
        "fpn": {
            "model": {
                "arch": "FPN",
                "encoder": "mobilenet_v2",
                "extra": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
            },
            "augment": "none",
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
        },
    },
    "predict": {
        "tta": "hflip",
        "tta_scales": [0.75, 1.0],
        "tta_merge": "gmean",
        "mc_dropout_passes": 3,
    },
    "ensemble": {"mode": "vote"},
    "pseudo": {
        "rounds": 1,
        "uncertainty": "mc_dropout",
        "uncertain_std": 0.05,
        "max_uncertain_share": 1.0,
    },
    "stack": {"enabled": False},
}


# Where the options act: round 0's predictions, the vote and its submission, and round 1's
# pseudo-label selection by the MC-dropout spread (round 1's training on it is no new option).
INFERENCE_TARGETS = (
    "results/submission/ensemble/round0/submission.csv",
    "results/pseudo/round1/selection.csv",
)


@pytest.mark.timeout(1800)
def test_inference_options_run_end_to_end(tmp_path: Path) -> None:
    """The inference options from the predictions to the ensemble's submission and the next
    round's pseudo-label selection."""
    workdir = copy_workflow(tmp_path)
    config = write_config(workdir, "infer.yaml", INFERENCE_DEMO)
    run_snakemake(workdir, *INFERENCE_TARGETS, "--configfile", config)
    results = workdir / "results"
    fold_dir = results / "test" / "fpn" / "round0" / "fold0"
    probs, spread = (np.load(fold_dir / name) for name in ("probs.npy", "uncertainty.npy"))
    assert spread.shape == probs.shape and spread.dtype == np.float16
    assert float(spread.astype(np.float32).max()) > 0  # the passes differed
    assert (results / "oof" / "fpn" / "round0" / "fold0" / "uncertainty.npy").is_file()
    ensemble_test = results / "test" / "ensemble" / "round0"
    assert (ensemble_test / "uncertainty.npy").is_file()
    weights = json.loads((results / "ensemble" / "round0" / "weights.json").read_text())
    assert weights["mode"] == "vote" and weights["weights"] == {"fpn": 1.0}
    # One member: its vote share is its p > 0.5 mask, so the ensemble's OOF is binary.
    oof = np.load(results / "oof" / "ensemble" / "round0" / "oof_probs.npy")
    assert set(np.unique(oof).tolist()) <= {0.0, 1.0}
    params = json.loads(
        (results / "postprocess" / "ensemble" / "round0" / "params.json").read_text()
    )
    assert params  # the ensemble's post-processing was tuned on the vote
    selection = pd.read_csv(results / "pseudo" / "round1" / "selection.csv", dtype={"id": str})
    # The MC-dropout rule: the confidence is 1 - 2 * mean std, not the band's.
    assert selection["confidence"].between(0, 1).all()
    submission = pd.read_csv(results / INFERENCE_TARGETS[0].removeprefix("results/"), dtype=str)
    assert len(submission) == INFERENCE_DEMO["demo"]["n_test"]
