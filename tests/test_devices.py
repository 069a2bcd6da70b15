"""Tests for device names and per-job GPU slot assignment with flock (segflow.core.devices).

Slot assignment is plain file locking, so it is tested on CPU with several real processes
("spawn": fresh interpreters, as Snakemake jobs are; segflow.core.devices does not import torch).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_workflow, run_snakemake

from segflow.core.devices import GPU_LOCK_DIR_ENV, acquire_gpu, default_gpu_lock_dir, resolve_device
from segflow.core.errors import SegflowError

CONTEXT = multiprocessing.get_context("spawn")
# Generous: spawned interpreters start slowly on a busy 2-core machine.
START_TIMEOUT_S = 60


def _hold_slot(lock_dir: str, n_gpus: int, timeout_s: float, results, release) -> None:
    """Child: claim a slot, report (index, CUDA_VISIBLE_DEVICES, pid) or the error, hold it."""
    try:
        lease = acquire_gpu(lock_dir, n_gpus, timeout_s, poll_s=0.05)
    except SegflowError as error:
        results.put(("error", str(error), os.getpid()))
        return
    with lease:
        results.put((lease.index, os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()))
        release.wait(START_TIMEOUT_S)


@pytest.fixture()
def no_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit the environment: make sure no scheduler assignment is simulated.

    The GPUs here are fake (lock files only), so CUDA's state does not matter; on a GPU machine
    an earlier test may have initialised CUDA in this pytest process, which acquire_gpu would
    rightly refuse (see test_acquire_gpu_refuses_once_cuda_is_initialised).
    """
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unset-by-test")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


def _start(lock_dir: Path, n_gpus: int, timeout_s: float, results):
    """Start a holder; returns (process, its release event).

    One event per process: a process killed while waiting on a shared multiprocessing Event
    leaves it broken (``set()`` then waits for the dead sleeper forever).
    """
    release = CONTEXT.Event()
    process = CONTEXT.Process(
        target=_hold_slot, args=(str(lock_dir), n_gpus, timeout_s, results, release)
    )
    process.start()
    return process, release


def _finish(started: list) -> None:
    for process, release in started:
        if process.is_alive():
            release.set()
        process.join(START_TIMEOUT_S)


def test_concurrent_jobs_get_distinct_slots(tmp_path: Path, no_visible_devices: None) -> None:
    results = CONTEXT.Queue()
    started = [_start(tmp_path, 3, START_TIMEOUT_S, results) for _ in range(3)]
    try:
        got = [results.get(timeout=START_TIMEOUT_S) for _ in started]
    finally:
        _finish(started)
    assert sorted(index for index, _, _ in got) == [0, 1, 2]
    # Each job restricted itself to its own GPU.
    assert all(visible == str(index) for index, visible, _ in got)
    assert all(process.exitcode == 0 for process, _ in started)
    # Released on exit: the lock files are emptied, not deleted.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu0.lock", "gpu1.lock", "gpu2.lock"]
    assert all(p.read_text() == "" for p in tmp_path.iterdir())


def test_third_job_waits_then_times_out_or_gets_a_freed_slot(
    tmp_path: Path, no_visible_devices: None
) -> None:
    results = CONTEXT.Queue()
    started = [_start(tmp_path, 2, START_TIMEOUT_S, results) for _ in range(2)]
    try:
        held = [results.get(timeout=START_TIMEOUT_S) for _ in started]
        assert sorted(index for index, _, _ in held) == [0, 1]
        # In this process too: both slots busy, so a short wait fails, naming the holders.
        began = time.monotonic()
        with pytest.raises(SegflowError, match=r"all 2 GPU slot\(s\) still held") as caught:
            acquire_gpu(tmp_path, 2, timeout_s=0.5, poll_s=0.05)
        assert time.monotonic() - began >= 0.5
        assert f"pid {held[0][2]}" in str(caught.value)
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        # A waiting job gets a slot as soon as one holder goes away.
        waiter_results = CONTEXT.Queue()
        started.append(_start(tmp_path, 2, START_TIMEOUT_S, waiter_results))
        time.sleep(0.5)
        assert waiter_results.empty()
        os.kill(held[0][2], signal.SIGTERM)  # default action: dies without any cleanup
        index, _, _ = waiter_results.get(timeout=START_TIMEOUT_S)
        assert index == held[0][0]
    finally:
        _finish(started)


def test_killed_holder_frees_its_slot(tmp_path: Path, no_visible_devices: None) -> None:
    results = CONTEXT.Queue()
    holder, _ = _start(tmp_path, 1, START_TIMEOUT_S, results)
    index, _, pid = results.get(timeout=START_TIMEOUT_S)
    assert index == 0 and (tmp_path / "gpu0.lock").read_text().strip() == str(pid)
    os.kill(holder.pid, signal.SIGKILL)  # no finally, no __exit__: only the kernel cleans up
    holder.join(START_TIMEOUT_S)
    # The stale pid is still in the file, but the lock is gone.
    with acquire_gpu(tmp_path, 1, timeout_s=5, poll_s=0.05) as lease:
        assert lease.index == 0 and lease.held
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert (tmp_path / "gpu0.lock").read_text().strip() == str(os.getpid())
    assert not lease.held and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_scheduler_assignment_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with acquire_gpu(tmp_path / "locks", 2, timeout_s=0) as lease:
        assert lease.index is None and lease.device == "cuda:0" and not lease.held
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_acquire_gpu_refuses_once_cuda_is_initialised(
    tmp_path: Path, no_visible_devices: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="after CUDA was initialised"):
        acquire_gpu(tmp_path, 2, timeout_s=0)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and not list(tmp_path.iterdir())


def test_acquire_gpu_rejects_zero_gpus(tmp_path: Path, no_visible_devices: None) -> None:
    with pytest.raises(SegflowError, match="n_gpus"):
        acquire_gpu(tmp_path, 0, timeout_s=0)


# --------------------------------------------------------------------------- resolve_device


def test_resolve_device_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(SegflowError, match="CUDA is not available"):
            resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps0", ""])
def test_resolve_device_rejects_bad_names(name: str) -> None:
    with pytest.raises(SegflowError, match="not valid"):
        resolve_device(name)


def test_resolve_device_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SegflowError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_default_lock_dir_is_local_and_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_LOCK_DIR_ENV, raising=False)
    assert (
        default_gpu_lock_dir() == Path(tempfile.gettempdir()) / f"segflow-gpu-locks-{os.getuid()}"
    )
    monkeypatch.setenv(GPU_LOCK_DIR_ENV, "/scratch/locks")
    assert default_gpu_lock_dir() == Path("/scratch/locks")


def test_lock_dir_of_another_user_is_refused(
    tmp_path: Path, no_visible_devices: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "locks").mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(SegflowError, match="not owned by this user"):
        acquire_gpu(tmp_path / "locks", 2, timeout_s=0)


# ------------------------------------------------ GPU slots through Snakemake, faked on CPU

GPU_SLOT_RUN = {
    "demo": {"n_train": 36, "n_test": 8, "seed": 3},
    "folds": {"n_folds": 3},
    "gpus": 2,  # fake: lock slots only; `device: auto` still trains on the CPU
    "run_experiments": ["unet_lite0"],
    "experiments": {"unet_lite0": {"train": {"epochs": 1, "batch_size": 8}}},
    "pseudo": {"rounds": 0},
    "cluster": {"rules": {"train_fold": {"cpus_per_task": 1}}},
}
LOG_LINE = re.compile(r"^(\S+ \S+) \w+ [\w.]+: (.*)$")


def _slot_intervals(log_path: Path) -> tuple[int, float, float, bool]:
    """(claimed slot, claim time, last log time, whether the job waited) from a train log."""
    slot, waited, start, end = None, False, None, None
    for line in log_path.read_text().splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        end = when
        if claimed := re.match(r"claimed GPU (\d+)", match.group(2)):
            slot, start = int(claimed.group(1)), when
        waited = waited or "GPU slot(s) held" in match.group(2)
    if slot is None:
        raise AssertionError(f"{log_path} never claimed a GPU slot:\n{log_path.read_text()}")
    return slot, start, end, waited


@pytest.mark.workflow
def test_concurrent_snakemake_jobs_each_lock_their_own_fake_gpu(
    tmp_path: Path, no_visible_devices: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three train jobs at once on a 2-"GPU" machine, with no `--resources gpu` limit (an
    executor that does not count GPUs): two run on distinct slots, the third waits for one."""
    monkeypatch.setenv(GPU_LOCK_DIR_ENV, str(tmp_path / "locks"))
    workdir = copy_workflow(tmp_path / "work")
    (workdir / "slots.yaml").write_text(yaml.safe_dump(GPU_SLOT_RUN))
    targets = [f"results/models/unet_lite0/round0/fold{k}/model.pt" for k in range(3)]
    run_snakemake(workdir, *targets, "--cores", "3", "--configfile", "slots.yaml")

    logs = sorted((workdir / "results/logs/train_fold").glob("*.log"))
    assert len(logs) == 3
    jobs = [_slot_intervals(path) for path in logs]
    assert {slot for slot, *_ in jobs} == {0, 1}
    assert sum(waited for *_, waited in jobs) >= 1, "no job ever waited for a slot"
    for i, (slot_a, start_a, end_a, _) in enumerate(jobs):
        for slot_b, start_b, end_b, _ in jobs[i + 1 :]:
            if slot_a == slot_b:  # one slot, one job at a time
                assert end_a <= start_b or end_b <= start_a, (slot_a, jobs)
    assert sorted(path.name for path in (tmp_path / "locks").iterdir()) == [
        "gpu0.lock",
        "gpu1.lock",
    ]
    assert not (workdir / "results/.gpu-locks").exists()
