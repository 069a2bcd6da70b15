"""Determinism and provenance: the same config and seed give the same bytes, and every metrics
JSON says which code, seed and options made it.

The whole workflow runs twice, in two folders, on one dataset (the manifest records absolute
image paths, so both runs read the same folder) with a tiny model on the CPU. Each run is every
stage on a small DAG: a 2-fold split of which fold 0 trains (``folds.train_folds``), its OOF, the
test set, the ensemble, both stackers (cross-fitted on sub-folds of fold 0), the final choice and
the report. Every artifact is then compared byte for byte; the only exceptions are the logs and benchmarks (time stamps) and
the training timings (``seconds`` in history.csv, ``train_seconds``/``elapsed_seconds`` in the
fold's metrics.json), which are measurements, not results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import SMALL_POSTPROCESS_GRID, TEST_CORES, copy_workflow, run_snakemake

from segflow import __version__, cli
from segflow.core.stage_args import (
    PROVENANCE_KEY,
    options_hash,
    provenance,
    stage_provenance,
    with_provenance,
)
from segflow.data.demo_data import DemoDataOptions, generate_demo_data
from segflow.data.folds import FoldOptions
from segflow.model.models import ModelSpec
from segflow.model.training.checkpointing import config_hash
from segflow.model.training.train_options import TrainOptions

TINY_EXPERIMENT = {
    "model": {
        "arch": "Unet",
        "encoder": "mobilenet_v2",
        "aux_head": True,
        "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    },
    "augment": "d4",  # seeded per draw: part of what must repeat
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.01},
}
# Artifacts that legitimately differ between two identical runs: wall-clock measurements.
TIMED = ("logs/", "benchmarks/")
TIMING_KEYS = ("train_seconds", "elapsed_seconds")


def tiny_config(data: Path) -> dict:
    return {
        "demo": {"enabled": False},
        "data": {
            "train_images": str(data / "train" / "images"),
            "test_images": str(data / "test" / "images"),
            "mask_source": "rle_csv",
            "rle_csv": str(data / "train.csv"),
            "metadata_csv": str(data / "metadata.csv"),
        },
        "preprocess": {"height": 32, "width": 32},
        # Fold 0 of 2 trains: each run's torch jobs (process start-up is most of their time)
        # are one training, OOF and test prediction, every other stage as in full CV.
        "folds": {"n_folds": 2, "train_folds": [0]},
        "run_experiments": ["tiny"],
        "experiments": {"tiny": TINY_EXPERIMENT},
        "pseudo": {"rounds": 0},
        "predict": {"tta": "hflip"},
        "stack": {"pixels_per_image": 16, "threshold_target": True},
        "postprocess": SMALL_POSTPROCESS_GRID,
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The workflow run twice with one config, in two folders; their results folders."""
    root = tmp_path_factory.mktemp("determinism")
    data = root / "data"
    generate_demo_data(data, DemoDataOptions(n_train=40, n_test=12, seed=5))
    results = []
    for name in ("first", "second"):
        workdir = copy_workflow(root / name)
        (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(data)))
        run_snakemake(workdir, "--configfile", "tiny.yaml")
        results.append(workdir / "results")
    return results[0], results[1]


def _files(results: Path) -> list[str]:
    return sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())


def test_demo_data_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    options = DemoDataOptions(n_train=24, n_test=8, seed=11)
    first, second = tmp_path / "a", tmp_path / "b"
    generate_demo_data(first, options)
    generate_demo_data(second, options)
    names = _files(first)
    assert names == _files(second) and len(names) > 30
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = tmp_path / "c"
    generate_demo_data(other, dataclasses.replace(options, seed=12))
    assert (other / "train.csv").read_bytes() != (first / "train.csv").read_bytes()


@pytest.mark.workflow
def test_data_stage_artifacts_are_byte_identical(two_runs: tuple[Path, Path]) -> None:
    first, second = two_runs
    for relative in (
        "ingest/manifest.parquet",
        "ingest/summary.json",
        "dedup/items.parquet",
        "dedup/summary.json",
        "dedup/report.md",
        "folds/folds.csv",
        "folds/summary.json",
        "preprocess/train_images.npy",
        "preprocess/index.parquet",
        "preprocess/stats.json",
    ):
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    folds = pd.read_csv(first / "folds" / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1] and len(folds) > 20


@pytest.mark.workflow
def test_oof_predictions_are_byte_identical_on_cpu(two_runs: tuple[Path, Path]) -> None:
    first, second = two_runs
    oof = "oof/tiny/round0"
    for relative in (
        f"{oof}/fold0/probs.npy",
        f"{oof}/oof_probs.npy",
        f"{oof}/oof_ids.csv",
        f"{oof}/metrics.json",
        "models/tiny/round0/fold0/model.pt",
    ):
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    probs = np.load(first / oof / "oof_probs.npy").astype(np.float32)
    assert probs.std() > 0  # a trained model's varied output, not a constant
    assert not (first / "models" / "tiny" / "round0" / "fold1").exists()  # fold 0 alone trains


@pytest.mark.workflow
def test_every_artifact_is_identical_except_logs_and_timings(two_runs: tuple[Path, Path]) -> None:
    first, second = two_runs
    names = _files(first)
    assert names == _files(second)
    compared = []
    for name in names:
        if name.startswith(TIMED):
            continue
        a, b = first / name, second / name
        if name.startswith("models/") and name.endswith("history.csv"):
            pd.testing.assert_frame_equal(
                pd.read_csv(a).drop(columns="seconds"), pd.read_csv(b).drop(columns="seconds")
            )
        elif name.startswith("models/") and name.endswith("metrics.json"):
            timed_a, timed_b = json.loads(a.read_text()), json.loads(b.read_text())
            for key in TIMING_KEYS:
                assert timed_a.pop(key) >= 0 and timed_b.pop(key) >= 0
            assert timed_a == timed_b, name
        else:
            assert a.read_bytes() == b.read_bytes(), name
        compared.append(name)
    # Every stage's outputs took part: models, stacking (native models), the final choice.
    for expected in (
        "stack/round0/class_0/gate_model.txt",
        "stack/round0/class_0/threshold_metrics.json",
        "final/submission.csv",
        "report/report.html",
    ):
        assert expected in compared


@pytest.mark.workflow
def test_data_loader_workers_give_the_same_oof(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Each draw carries its own augmentation seed, so 2 loader worker processes train the
    same weights as the workflow's in-process loading (num_workers 0 on the CPU)."""
    results = two_runs[0]
    experiment = {**TINY_EXPERIMENT, "train": {**TINY_EXPERIMENT["train"], "num_workers": 2}}
    arrays, folds = results / "preprocess", results / "folds" / "folds.csv"
    model_dir = tmp_path / "model"
    _segflow(
        "train",
        "--arrays-dir", str(arrays),
        "--folds", str(folds),
        "--fold", "0",
        "--experiment", json.dumps(experiment, sort_keys=True),  # as common.smk passes it
        "--out-dir", str(model_dir),
        "--resume-dir", str(tmp_path / "resume"),
        "--threads", TEST_CORES,  # as the workflow ran it
    )  # fmt: skip
    assert json.loads((model_dir / "metrics.json").read_text())["options"]["num_workers"] == 2
    _segflow(
        "predict-oof",
        "--arrays-dir", str(arrays),
        "--model", str(model_dir / "model.pt"),
        "--fold", "0",
        "--folds", str(folds),
        "--tta", "hflip",
        "--out-dir", str(tmp_path / "oof"),
        "--threads", TEST_CORES,
    )  # fmt: skip
    workflow_fold = results / "oof" / "tiny" / "round0" / "fold0"
    assert (tmp_path / "oof" / "probs.npy").read_bytes() == (
        workflow_fold / "probs.npy"
    ).read_bytes()
    assert (model_dir / "model.pt").read_bytes() == (
        results / "models" / "tiny" / "round0" / "fold0" / "model.pt"
    ).read_bytes()


def _segflow(*args: str) -> None:
    """``segflow ARGS`` in this process (the CLI's own entry point, without a new interpreter
    importing torch again); the thread count it sets is put back."""
    threads = torch.get_num_threads()
    try:
        status = cli.main(list(args))
    finally:
        torch.set_num_threads(threads)
    if status != 0:
        raise AssertionError(f"segflow {args[0]} failed with status {status} (stderr above)")


# ------------------------------------------------------------------------------ provenance


def _check_block(block: object, where: str) -> dict:
    if not isinstance(block, dict) or set(block) != {"segflow_version", "seed", "config_hash"}:
        raise AssertionError(f"{where}: provenance block {block!r}")
    if block["segflow_version"] != __version__:
        raise AssertionError(f"{where}: segflow_version {block['segflow_version']!r}")
    if not (block["seed"] is None or type(block["seed"]) is int):
        raise AssertionError(f"{where}: seed {block['seed']!r}")
    if not (isinstance(block["config_hash"], str) and len(block["config_hash"]) == 64):
        raise AssertionError(f"{where}: config_hash {block['config_hash']!r}")
    int(block["config_hash"], 16)
    return block


@pytest.mark.workflow
def test_every_metrics_json_records_version_seed_and_config_hash(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    results = two_runs[0]
    jsons = sorted(results.rglob("*.json"))
    blocks = {
        str(p.relative_to(results)): _check_block(
            json.loads(p.read_text()).get(PROVENANCE_KEY), str(p)
        )
        for p in jsons
    }
    # Every stage that writes a JSON is among them.
    assert {
        "ingest/summary.json",
        "dedup/summary.json",
        "preprocess/stats.json",
        "folds/summary.json",
        "models/tiny/round0/fold0/metrics.json",
        "oof/tiny/round0/metrics.json",
        "postprocess/tiny/round0/params.json",
        "ensemble/round0/weights.json",
        "oof/ensemble/round0/metrics.json",
        "stack/round0/summary_gate.json",
        "stack/round0/summary_pixel.json",
        "stack/round0/class_0/gate_metrics.json",
        "stack/round0/class_0/blender_metrics.json",
        "stack/round0/class_0/threshold_metrics.json",
        "oof/stack_gate/round0/metrics.json",
        "final/choice.json",
    } <= set(blocks)
    # Seeds: the stage's own seed option, null where the stage has no randomness.
    assert blocks["folds/summary.json"]["seed"] == FoldOptions().seed
    assert blocks["folds/summary.json"]["config_hash"] == options_hash(FoldOptions(n_folds=2))
    assert blocks["models/tiny/round0/fold0/metrics.json"]["seed"] == TrainOptions().seed
    assert blocks["stack/round0/class_0/gate_metrics.json"]["seed"] == 0  # stack.seed
    for name in ("ingest/summary.json", "preprocess/stats.json", "final/choice.json"):
        assert blocks[name]["seed"] is None, name
    # Training's config hash is the resume hash (which covers the fold: see
    # test_training_config_hash_keeps_its_digest): not the options hash of the other stages.
    train_hash = blocks["models/tiny/round0/fold0/metrics.json"]["config_hash"]
    assert train_hash not in {
        block["config_hash"] for name, block in blocks.items() if not name.startswith("models/")
    }

    # One job, one block: the gate job's JSONs agree, and the pixel job's; the two differ (each
    # hashes only the options it reads).
    def hashes(*names: str) -> set[str]:
        return {blocks[f"stack/round0/{name}"]["config_hash"] for name in names}

    gate = hashes(
        "summary_gate.json", "class_0/gate_metrics.json", "class_0/threshold_metrics.json"
    )
    pixel = hashes("summary_pixel.json", "class_0/blender_metrics.json")
    assert len(gate) == len(pixel) == 1 and gate != pixel
    assert {v["config_hash"] for k, v in blocks.items() if k.startswith("stack/")} == gate | pixel

    # select-pseudo (a pseudo-labelling round; not run above): its summary too.
    _segflow(
        "select-pseudo",
        "--test-dir", str(results / "test" / "ensemble" / "round0"),
        "--postprocess", str(results / "postprocess" / "ensemble" / "round0" / "params.json"),
        "--arrays-dir", str(results / "preprocess"),
        "--dedup-items", str(results / "dedup" / "items.parquet"),
        "--max-uncertain-share", "1.0",
        "--out-dir", str(tmp_path),
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert _check_block(summary.get(PROVENANCE_KEY), "select-pseudo")["seed"] is None


def test_options_hash_is_canonical_and_sensitive() -> None:
    options = FoldOptions(n_folds=3, seed=1)
    assert options_hash(options) == options_hash(dataclasses.asdict(options))
    assert options_hash({"a": 1, "b": [1, 2]}) == options_hash({"b": (1, 2), "a": 1})
    assert options_hash(options) != options_hash(dataclasses.replace(options, seed=2))
    assert options_hash({}) == hashlib.sha256(b"{}").hexdigest()


def test_training_config_hash_keeps_its_digest() -> None:
    """Resume files written before provenance existed still match: the digest is unchanged
    (SHA-256 of the key-sorted JSON of the payload)."""
    spec = ModelSpec(arch="Unet", encoder="resnet18")
    options = TrainOptions(epochs=3)
    data = {"train_rows": "t", "val_rows": "v", "stats": "s"}
    # Fields added later (class_balance, the aux-head options) are left out at their defaults
    # (core.late_options), so the payload is the one written before they existed.
    late = (*TrainOptions._omit_at_default, *ModelSpec._omit_at_default)
    payload = {
        "options": {
            k: v
            for k, v in dataclasses.asdict(options).items()
            if k not in _resume_exempt() and k not in late
        },
        "model": {k: v for k, v in dataclasses.asdict(spec).items() if k not in late},
        "fold": 1,
        "loss": {"bce": 1.0},
        "ohem_fraction": None,
        "augment": "d4",
        "data": data,
    }
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    assert config_hash(options, spec, 1, {"bce": 1.0}, None, "d4", data) == expected
    # The fold is part of it: another fold's training never resumes this one's state.
    assert config_hash(options, spec, 0, {"bce": 1.0}, None, "d4", data) != expected


def _resume_exempt() -> tuple[str, ...]:
    from segflow.model.training.checkpointing import RESUME_EXEMPT

    return RESUME_EXEMPT


def test_provenance_block_and_its_guards() -> None:
    block = stage_provenance({"x": 1}, seed=7)
    assert block == {
        "segflow_version": __version__,
        "seed": 7,
        "config_hash": options_hash({"x": 1}),
    }
    assert stage_provenance({"x": 1})["seed"] is None
    with pytest.raises(TypeError):
        provenance(True, "h")
    assert with_provenance({"a": 1}, block) == {"a": 1, PROVENANCE_KEY: block}
    with pytest.raises(ValueError, match="provenance"):
        with_provenance({PROVENANCE_KEY: {}}, block)
