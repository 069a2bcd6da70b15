"""CUDA-only checks: mixed precision and channels-last training, CUDA prediction, GPU slots.

CI has no GPU, so every test here skips there; the logic behind them (AMP dtype choice, slot
locking with faked devices) is CPU-tested in ``test_train.py`` and ``test_devices.py``. Run them
on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_synthetic_arrays

from segflow.model.experiment import Experiment
from segflow.model.inference.predict import PredictOptions, predict_split
from segflow.model.models import ModelSpec, load_checkpoint
from segflow.model.training.train import TrainOptions, train_fold

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPEC = ModelSpec(encoder="resnet18")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def arrays_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_arrays(tmp_path_factory.mktemp("gpu") / "arrays", n=96, size=64)


def _train(arrays_dir: Path, run: Path, **overrides: object) -> dict:
    options = TrainOptions(
        **{"epochs": 6, "batch_size": 16, "lr": 3e-3, "device": "cuda", **overrides}
    )
    return train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        Experiment("experiment", SPEC, {"bce": 1.0, "dice": 1.0}, None, "d4", options),
        run / "out",
        run / "resume",
    )


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_training_on_cuda_learns_and_saves_float32_weights(
    arrays_dir: Path, tmp_path: Path, amp: str
) -> None:
    _train(arrays_dir, tmp_path, amp=amp, channels_last=True, ema_decay=0.9)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert history["val_dice"].max() > 0.5
    state = torch.load(tmp_path / "out" / "model.pt", map_location="cpu", weights_only=True)
    tensors = [t for t in state["state_dict"].values() if t.is_floating_point()]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors)
    assert not (tmp_path / "resume").exists()


def test_cuda_and_cpu_predictions_agree(arrays_dir: Path, tmp_path: Path) -> None:
    _train(arrays_dir, tmp_path, epochs=2)
    model_path = tmp_path / "out" / "model.pt"
    model, _ = load_checkpoint(model_path, device="cuda")
    assert next(model.parameters()).is_cuda
    results = {}
    for device in ("cuda", "cpu"):
        results[device] = predict_split(
            arrays_dir,
            model_path,
            "train",
            PredictOptions(tta="d4", device=device),
            0,
            arrays_dir / "folds.csv",
        )
    pd.testing.assert_frame_equal(results["cuda"][0], results["cpu"][0])
    gpu_probs = results["cuda"][1].astype(np.float32)
    cpu_probs = results["cpu"][1].astype(np.float32)
    # float16 storage, fp32 inference on both (TF32 may be on for cuDNN convolutions).
    assert np.abs(gpu_probs - cpu_probs).max() < 2e-2
    assert np.abs(gpu_probs - cpu_probs).mean() < 1e-3


_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from segflow.core.devices import acquire_gpu
    with acquire_gpu(sys.argv[2], int(sys.argv[3]), timeout_s=60, poll_s=0.05) as lease:
        import os, torch  # CUDA initialised only after the lease, as the CLI does
        x = torch.ones(1024, 1024, device=lease.device)
        start = time.time()
        (x @ x).sum().item()
        time.sleep(float(sys.argv[4]))
        print(json.dumps({
            "index": lease.index,
            "visible": os.environ["CUDA_VISIBLE_DEVICES"],
            "count": torch.cuda.device_count(),
            "name": torch.cuda.get_device_name(0),
            "start": start,
            "end": time.time(),
        }))
    """
)


def _run_holders(lock_dir: Path, n_gpus: int, hold_s: float, jobs: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(SRC), str(lock_dir), str(n_gpus), str(hold_s)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(jobs)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes)
    return [json.loads(output.strip().splitlines()[-1]) for output in outputs]


def test_gpu_slots_with_real_cuda(tmp_path: Path) -> None:
    n_gpus = torch.cuda.device_count()
    names = {torch.cuda.get_device_name(i) for i in range(n_gpus)}
    # As many jobs as GPUs run at once, each alone on its own GPU...
    started = time.time()
    results = _run_holders(tmp_path / "locks", n_gpus, 2.0, n_gpus)
    assert sorted(r["index"] for r in results) == list(range(n_gpus))
    assert all(r["visible"] == str(r["index"]) and r["count"] == 1 for r in results)
    assert {r["name"] for r in results} <= names
    # ...and one job more than GPUs waits for a slot to free up.
    results = _run_holders(tmp_path / "locks", n_gpus, 2.0, n_gpus + 1)
    by_start = sorted(results, key=lambda r: r["start"])
    assert by_start[-1]["start"] >= min(r["end"] for r in by_start[:-1]) - 0.05
    assert time.time() - started < 100
