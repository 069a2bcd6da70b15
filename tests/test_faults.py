"""Faults (issue 6): kill -9 of training and of Snakemake, NaN/inf losses, a full disk.

The kill tests run the real ``segflow train`` CLI and the real workflow as subprocesses and
SIGKILL them mid-stage; they are marked ``slow`` but run by default (and in CI). The NaN and
disk-full tests are unit-level: a NaN pushed through the real model, and writers whose
underlying write fails with ENOSPC after some bytes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import DATA_ARTIFACTS, REPO_ROOT, TEST_CORES, copy_workflow
from helpers import write_synthetic_arrays

from segflow import cli
from segflow.core import atomic
from segflow.core.errors import SegflowError
from segflow.model.experiment import Experiment
from segflow.model.models import ModelSpec, build_model, save_checkpoint
from segflow.model.training import train as train_module
from segflow.model.training.checkpointing import remove_resume_state
from segflow.model.training.train import TrainOptions, train_fold

SPEC = ModelSpec(encoder="mobilenet_v2", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
TINY_MODEL = {"arch": "Unet", "encoder": "mobilenet_v2", "extra": SPEC.extra}
LOSS = {"bce": 1.0, "dice": 1.0}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine; the CLI's --threads 1 sets it too
    yield
    torch.set_num_threads(threads)


def _subprocess_env() -> dict[str, str]:
    """This checkout's package first on PYTHONPATH, as tests/conftest.py's run_snakemake does."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")])
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _temporaries(root: Path) -> list[Path]:
    """Every atomic-write temporary (``.<name>.<random>.tmp<suffix>``) under ``root``."""
    return sorted(p for p in root.rglob(".*.tmp*") if p.is_file())


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until it holds; fail if ``process`` exits first or after 5 minutes."""
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and everything in its process group (it leads its own session)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(left: Path, right: Path) -> None:
    a, b = _state_dict(left), _state_dict(right)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{left} and {right} differ in {different[:5]}"


# --------------------------------------------------------------------------- kill -9 of training

KILL_EPOCHS = 5
KILL_EXPERIMENT = {
    "model": TINY_MODEL,
    "loss": LOSS,
    "augment": "d4",  # random draws, balanced sampling, EMA and top-k state must all resume
    "train": {
        "epochs": KILL_EPOCHS,
        "batch_size": 8,
        "lr": 0.01,
        "num_workers": 0,
        "device": "cpu",
        "empty_ratio": 0.5,
        "ema_decay": 0.9,
        "average_top_k": 2,
    },
}


def _train_args(arrays: Path, run: Path, experiment: dict[str, Any]) -> list[str]:
    """`segflow train` arguments for fold 0 of the tiny arrays, writing under ``run``."""
    return [
        "train",
        "--arrays-dir",
        str(arrays),
        "--folds",
        str(arrays / "folds.csv"),
        "--fold",
        "0",
        "--name",
        "tiny",
        "--experiment",
        json.dumps(experiment),
        "--out-dir",
        str(run / "out"),
        "--resume-dir",
        str(run / "resume"),
        "--threads",
        "1",
    ]


def _train_command(arrays: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "segflow", *_train_args(arrays, run, KILL_EXPERIMENT)]


def _history_epochs(path: Path) -> int:
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_of_training_mid_epoch_resumes_to_the_uninterrupted_model(tmp_path: Path) -> None:
    arrays = write_synthetic_arrays(tmp_path / "preprocess", n=72, size=64, n_empty=18)
    env = _subprocess_env()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # Both at once, one thread each: the uninterrupted reference and the run to be killed.
    with open(tmp_path / "straight.log", "w") as log:
        reference = subprocess.Popen(_train_command(arrays, straight), env=env, stderr=log)
    with open(tmp_path / "killed.log", "w") as log:
        victim = subprocess.Popen(
            _train_command(arrays, killed), env=env, stderr=log, start_new_session=True
        )
    try:
        # An epoch is finished once history.csv lists it (written after last.pt). Half an
        # epoch's time after epoch 2 ends, the trainer is in the middle of epoch 3.
        history = killed / "out" / "history.csv"
        _wait_for(lambda: _history_epochs(history) >= 1, victim, "epoch 1")
        epoch_1_done = time.monotonic()
        _wait_for(lambda: _history_epochs(history) >= 2, victim, "epoch 2")
        time.sleep((time.monotonic() - epoch_1_done) / 2)
        _kill_group(victim)
    finally:
        if victim.poll() is None:
            _kill_group(victim)
    assert victim.returncode == -signal.SIGKILL
    finished = torch.load(killed / "resume" / "last.pt", weights_only=True)["epoch"]
    assert 2 <= finished < KILL_EPOCHS  # killed before the end: something is left to resume
    assert not (killed / "out" / "model.pt").exists()

    rerun = subprocess.run(
        _train_command(arrays, killed), env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"fold 0: resuming after epoch {finished} from" in rerun.stderr
    trained = [line for line in rerun.stderr.splitlines() if " epoch " in line and "/5:" in line]
    assert [line.split(" epoch ")[1].split("/")[0] for line in trained] == [
        str(epoch) for epoch in range(finished + 1, KILL_EPOCHS + 1)
    ]  # the finished epochs were not trained again
    metrics = json.loads((killed / "out" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == finished
    assert reference.wait(timeout=300) == 0

    _assert_same_weights(straight / "out" / "model.pt", killed / "out" / "model.pt")
    history = pd.read_csv(killed / "out" / "history.csv").drop(columns="seconds")
    expected = pd.read_csv(straight / "out" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history, expected)
    assert history["epoch"].tolist() == list(range(1, KILL_EPOCHS + 1))
    assert not (killed / "resume").exists()  # the resume state went once model.pt was written
    assert _temporaries(killed) == []


# --------------------------------------------------------------------------- kill -9 of snakemake

WORKFLOW_CONFIG = {
    "demo": {"n_train": 40, "n_test": 12, "height": 32, "width": 32, "seed": 5},
    "preprocess": {"height": 32, "width": 32},
    # Fold 0 of 2 trains: one training and one OOF prediction per run (each a torch process).
    "folds": {"n_folds": 2, "train_folds": [0]},
    "max_threads": 1,  # single-threaded jobs: bitwise the same models in both workdirs
    "run_experiments": ["tiny"],
    "experiments": {
        "tiny": {
            "model": TINY_MODEL,
            "augment": "d4",
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.01},
        }
    },
    "pseudo": {"rounds": 0},
    "predict": {"tta": "hflip"},
}
PREDICTIONS = ("oof/tiny/round0/fold0",)
# evaluate_oof reads every trained fold's probs.npy: the consumer that must never see a
# truncated one.
TARGETS = ("results/oof/tiny/round0/metrics.json",)

# The real `segflow`, made to stop for good inside one stage's artifact write, so that the
# test can kill Snakemake at a known point: SEGFLOW_TEST_PAUSE=<command>=<marker folder>.
SHIM = """#!{python}
import os, sys, time
from pathlib import Path


def pause(where):
    tmp = Path(MARKERS, f".{os.getpid()}")
    tmp.write_text(str(where))
    os.replace(tmp, Path(MARKERS, str(os.getpid())))  # whole, even if the kill comes now
    while True:
        time.sleep(60)


COMMAND, _, MARKERS = os.environ.get("SEGFLOW_TEST_PAUSE", "").partition("=")
if COMMAND and sys.argv[1:2] == [COMMAND]:
    if COMMAND == "preprocess":
        import segflow.data.preprocess as stage

        def parallel_map(func, tasks, *args, **kwargs):
            # The first chunk's rows written into the temporary .npy files, nothing renamed.
            func(tasks[0])
            pause(tasks[0].images_path)

        stage.parallel_map = parallel_map
    else:
        import segflow.core.atomic as atomic

        write_csv = atomic.write_csv

        def paused_write_csv(target, frame):
            # probs.npy is in place; ids.csv half written to its temporary file.
            if Path(target).name != "ids.csv":
                return write_csv(target, frame)
            with atomic.atomic_path(target) as tmp:
                text = frame.to_csv(index=False)
                tmp.write_text(text[: len(text) // 2])
                pause(Path(target).parent)

        atomic.write_csv = paused_write_csv
from segflow.cli import main

sys.exit(main())
"""


def _start_snakemake(
    workdir: Path, *args: str, pause: tuple[str, Path] | None = None
) -> subprocess.Popen:
    """Snakemake in its own process group, with the pausing ``segflow`` first on PATH.

    As a user runs it: Snakemake applies the workflow's ``profiles/default`` by itself.
    """
    env = _subprocess_env()
    env["PATH"] = os.pathsep.join([str(workdir / "shim"), env["PATH"]])
    env.pop("SEGFLOW_TEST_PAUSE", None)
    if pause is not None:
        env["SEGFLOW_TEST_PAUSE"] = f"{pause[0]}={pause[1]}"
    command = [sys.executable, "-m", "snakemake", *args, "--configfile", "faults.yaml"]
    command += ["--cores", TEST_CORES]
    with open(workdir / "snakemake.log", "w") as log:  # a file: a full pipe would block it
        return subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(process: subprocess.Popen, workdir: Path) -> tuple[int, str]:
    """Wait for a :func:`_start_snakemake` run: (exit status, its output)."""
    process.wait(timeout=600)
    return process.returncode, (workdir / "snakemake.log").read_text()


def _snakemake(workdir: Path, *args: str) -> tuple[int, str]:
    return _finish(_start_snakemake(workdir, *args), workdir)


def _kill_snakemake_inside(workdir: Path, command: str) -> list[Path]:
    """Run the workflow until a ``command`` job is inside its write, then SIGKILL Snakemake and
    all its jobs (the whole process group). Returns the paused jobs' output folders or files."""
    markers = workdir / f"markers-{command}"
    markers.mkdir()
    process = _start_snakemake(workdir, *TARGETS, pause=(command, markers))
    try:
        _wait_for(lambda: any(markers.glob("[0-9]*")), process, f"a {command} job pausing")
        time.sleep(0.5)  # a second job may be on its way to the same pause
    finally:
        _kill_group(process)
    return [Path(workdir, marker.read_text()) for marker in markers.glob("[0-9]*")]


def _truncate_into(source: Path, target: Path) -> None:
    """Plant what a non-atomic writer killed mid-write would leave: the first half of a file."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.timeout(900)
def test_kill_9_of_snakemake_mid_preprocess_and_predict_then_rerun(tmp_path: Path) -> None:
    clean = copy_workflow(tmp_path / "clean")
    (clean / "faults.yaml").write_text(yaml.safe_dump(WORKFLOW_CONFIG))
    reference = _start_snakemake(clean, *TARGETS)  # alongside: it only competes for the CPU

    work = copy_workflow(tmp_path / "killed")
    (work / "faults.yaml").write_text(yaml.safe_dump(WORKFLOW_CONFIG))
    (work / "shim").mkdir()
    (work / "shim" / "segflow").write_text(SHIM.replace("{python}", sys.executable))
    (work / "shim" / "segflow").chmod(0o755)
    results = work / "results"

    # 1. Killed inside preprocess: its .npy files half written, under temporary names only.
    paused = _kill_snakemake_inside(work, "preprocess")
    temporaries = _temporaries(results / "preprocess")
    assert len(temporaries) == 2 and paused[0] in temporaries  # train images, masks
    for name in ("train_images.npy", "train_masks.npy", "test_images.npy", "stats.json"):
        assert not (results / "preprocess" / name).exists()
    # What a non-atomic writer would have left: a truncated array under the output's name.
    _truncate_into(paused[0], results / "preprocess" / "train_images.npy")

    # The kill left Snakemake's lock: a rerun says so and names --unlock (README "How to rerun").
    status, output = _snakemake(work, *TARGETS)
    assert status != 0 and "Directory cannot be locked" in output and "--unlock" in output
    status, output = _snakemake(work, "--unlock")
    assert status == 0, output
    # Without the profile's --rerun-incomplete Snakemake refuses to use the killed job's output.
    status, output = _snakemake(work, *TARGETS, "--workflow-profile", "none")
    assert status != 0 and "incomplete" in output and "--rerun-incomplete" in output
    assert "preprocess/train_images.npy" in output

    # 2. Rerun (the profile sets --rerun-incomplete), killed again inside predict: probs.npy in
    # place, ids.csv half written; a truncated probs.npy is planted on top.
    paused = _kill_snakemake_inside(work, "predict-oof")
    assert paused and all(p.parent.parent.parent.name == "oof" for p in paused)
    for out_dir in paused:
        assert not (out_dir / "ids.csv").exists()
        assert len(_temporaries(out_dir)) == 1
        _truncate_into(out_dir / "probs.npy", out_dir / "probs.npy")
    assert _snakemake(work, "--unlock")[0] == 0

    # 3. The documented rerun completes, and redoes every killed job.
    status, output = _snakemake(work, *TARGETS)
    assert status == 0, output[-4000:]
    status, output = _finish(reference, clean)
    assert status == 0, output[-4000:]
    assert _temporaries(results) == []
    # Train side only: the OOF target needs no test arrays (preprocess_test).
    preprocess = [
        relative
        for relative in DATA_ARTIFACTS
        if relative.startswith("preprocess/") and not relative.startswith("preprocess/test_")
    ]
    for relative in preprocess:  # the planted truncated train_images.npy was regenerated
        ours, theirs = results / relative, clean / "results" / relative
        assert ours.read_bytes() == theirs.read_bytes(), relative
    stats = json.loads((results / "preprocess" / "stats.json").read_text())
    index = pd.read_parquet(results / "preprocess" / "index.parquet")
    count = np.load(results / "preprocess" / "train_images.npy").shape[0]
    assert (index["split"] == "train").sum() == count == len(index)
    assert stats["n_train"] == len(pd.read_parquet(results / "preprocess" / "index.parquet"))
    model = Path("models/tiny/round0/fold0/model.pt")
    _assert_same_weights(clean / "results" / model, results / model)
    for directory in PREDICTIONS:
        for name in ("probs.npy", "ids.csv"):
            ours, theirs = results / directory / name, clean / "results" / directory / name
            assert ours.read_bytes() == theirs.read_bytes(), f"{directory}/{name}"
        probs = np.load(results / directory / "probs.npy")
        ids = pd.read_csv(results / directory / "ids.csv")
        assert probs.dtype == np.float16 and len(probs) == len(ids) > 0
    oof = Path("oof/tiny/round0/oof_probs.npy")
    assert (results / oof).read_bytes() == (clean / "results" / oof).read_bytes()


# --------------------------------------------------------------------------- NaN / inf loss


def _poison_batches(
    monkeypatch: pytest.MonkeyPatch, batches: set[tuple[int, int]], value: float = float("nan")
) -> None:
    """Put ``value`` into a pixel of the training batches ``(epoch, batch)`` (1-based) before
    the real forward pass, so the NaN/inf comes out of the model and the real loss."""
    position = {"epoch": 0, "batch": 0}
    train_epoch = train_module._FoldTrainer.train_epoch
    forward = train_module._FoldTrainer._forward

    def counting_train_epoch(trainer: Any, epoch: int) -> tuple[float, float]:
        position.update(epoch=epoch, batch=0)
        return train_epoch(trainer, epoch)

    def poisoned_forward(trainer: Any, model: torch.nn.Module, images: torch.Tensor) -> Any:
        if model.training:  # validation (eval mode) is left alone
            position["batch"] += 1
            if (position["epoch"], position["batch"]) in batches:
                images = images.clone()
                images[0, :, 0, 0] = value
        return forward(trainer, model, images)

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", counting_train_epoch)
    monkeypatch.setattr(train_module._FoldTrainer, "_forward", poisoned_forward)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor nested in a checkpoint."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _assert_resume_state_finite(resume_dir: Path, epoch: int) -> None:
    state = torch.load(resume_dir / "last.pt", weights_only=True)
    assert state["epoch"] == epoch
    for path in [resume_dir / "last.pt", *resume_dir.glob("snapshot_e*.pt")]:
        tensors = list(_tensors(torch.load(path, weights_only=True)))
        assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors), path


def _cli_train(arrays: Path, run: Path, **train: Any) -> list[str]:
    experiment = {
        "model": TINY_MODEL,
        "loss": LOSS,
        "augment": "d4",
        "train": {"batch_size": 8, "lr": 0.01, "num_workers": 0, "device": "cpu", **train},
    }
    return _train_args(arrays, run, experiment)


def _error_lines(captured: str) -> list[str]:
    assert "Traceback" not in captured
    return [line for line in captured.splitlines() if "error:" in line]


@pytest.fixture()
def arrays(tmp_path: Path) -> Path:
    """24 training images of fold 0: 3 batches of 8 per epoch."""
    return write_synthetic_arrays(tmp_path / "preprocess", n=36, n_empty=9)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nonfinite_loss_stops_the_fold_naming_it_and_saves_nothing_of_it(
    arrays: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: float,
) -> None:
    run = tmp_path / "run"
    _poison_batches(monkeypatch, {(2, 2)}, value)
    status = cli.main(_cli_train(arrays, run, epochs=3, ema_decay=0.9, average_top_k=2))
    assert status == 2  # the CLI's status for input/training errors
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith(
        "segflow train: error: fold 0 epoch 2 batch 2/3: training loss is nan; stopped before "
        "its optimizer step, nothing of this epoch is saved ("
    ), line
    out = run / "out"
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1]
    _assert_resume_state_finite(run / "resume", epoch=1)  # model, EMA, optimizer, snapshots


@pytest.mark.parametrize(
    ("every", "poisoned", "checked"),
    [(2, (2, 2), 2), (2, (2, 1), 2), (100, (2, 2), 3)],
    ids=["at-the-check", "before-the-check", "at-the-epoch-end"],
)
def test_a_nonfinite_loss_read_from_the_device_flag_names_the_first_bad_batch(
    arrays: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    every: int,
    poisoned: tuple[int, int],
    checked: int,
) -> None:
    # The CUDA path, on the CPU: the flag is read every `every` batches and at the epoch's end.
    monkeypatch.setattr(train_module, "nonfinite_check_interval", lambda device, mode: every)
    _poison_batches(monkeypatch, {poisoned, (2, 3)})  # the first of them is named
    options = TrainOptions(epochs=3, batch_size=8, ema_decay=0.9, average_top_k=2)
    run = tmp_path / "run"
    with pytest.raises(SegflowError) as raised:
        train_fold(
            arrays,
            arrays / "folds.csv",
            0,
            Experiment("experiment", SPEC, LOSS, None, "d4", options),
            run / "out",
            run / "resume",
        )
    assert str(raised.value).startswith(
        f"fold 0 epoch 2 batch {poisoned[1]}/3: training loss is nan; stopped at the check "
        f"after batch {checked} (read every {every} batches), nothing of this epoch is saved ("
    ), raised.value
    assert "\n" not in str(raised.value)
    assert pd.read_csv(run / "out" / "history.csv")["epoch"].tolist() == [1]
    _assert_resume_state_finite(run / "resume", epoch=1)
    assert not (run / "out" / "model.pt").exists()


def test_the_deferred_nonfinite_check_trains_what_the_per_batch_check_does(
    arrays: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = TrainOptions(epochs=2, batch_size=8)
    experiment = Experiment("experiment", SPEC, LOSS, None, "d4", options)
    runs = {}
    for every in (1, 2):
        monkeypatch.setattr(train_module, "nonfinite_check_interval", lambda d, m, n=every: n)
        run = tmp_path / f"every{every}"
        train_fold(arrays, arrays / "folds.csv", 0, experiment, run / "out", run / "resume")
        runs[every] = run / "out"
    _assert_same_weights(runs[1] / "model.pt", runs[2] / "model.pt")
    history = [pd.read_csv(out / "history.csv").drop(columns="seconds") for out in runs.values()]
    pd.testing.assert_frame_equal(*history)


def test_the_nonfinite_flag_is_read_every_batch_on_the_cpu_and_with_skip_batch() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_module.nonfinite_check_interval(cpu, "error") == 1
    assert train_module.nonfinite_check_interval(cuda, "skip_batch") == 1
    every = train_module.NONFINITE_CHECK_EVERY
    assert every > 1 and train_module.nonfinite_check_interval(cuda, "error") == every


def test_skip_batch_resumes_a_stopped_fold_and_counts_the_skipped_batches(
    arrays: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    _poison_batches(monkeypatch, {(2, 2)})
    assert cli.main(_cli_train(arrays, run, epochs=3)) == 2
    capsys.readouterr()
    # nonfinite_loss is not part of the resume hash: the stopped fold continues after epoch 1.
    monkeypatch.setattr(train_module, "_remove_resume_state", lambda resume_dir: None)
    skipping = {"nonfinite_loss": "skip_batch", "max_skipped_fraction": 0.5}  # 1 of 3 batches
    assert cli.main(_cli_train(arrays, run, epochs=3, **skipping)) == 0
    assert _error_lines(capsys.readouterr().err) == []
    history = pd.read_csv(run / "out" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["skipped_batches"].tolist() == [0, 1, 0]
    metrics = json.loads((run / "out" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == 1 and metrics["resumed_from_epoch"] == 1
    assert all(
        bool(torch.isfinite(t).all()) for t in _state_dict(run / "out" / "model.pt").values()
    )
    state = torch.load(run / "resume" / "last.pt", weights_only=True)
    # The skipped batch made no optimizer step; the schedule still advanced past it.
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {3 * 3 - 1} and state["global_step"] == 3 * 3
    assert metrics["optimizer_steps"] == 3 * 3 - 1  # what the optimizer counted


@pytest.mark.parametrize(
    ("fraction", "poisoned", "message"),
    [
        (0.34, {(1, 1), (1, 2)}, "batch 2/3: training loss is nan; 2 of 3 batches of this "),
        (1.0, {(1, 1), (1, 2), (1, 3)}, "batch 3/3: training loss is nan; 3 of 3 batches of "),
    ],
    ids=["over-the-fraction", "whole-epoch"],
)
def test_skip_batch_still_stops_a_fold_with_too_many_nonfinite_batches(
    arrays: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fraction: float,
    poisoned: set[tuple[int, int]],
    message: str,
) -> None:
    _poison_batches(monkeypatch, poisoned)
    options = TrainOptions(
        epochs=2, batch_size=8, nonfinite_loss="skip_batch", max_skipped_fraction=fraction
    )
    run = tmp_path / "run"
    with pytest.raises(SegflowError, match=f"^fold 0 epoch 1 {message}") as raised:
        train_fold(
            arrays,
            arrays / "folds.csv",
            0,
            Experiment("experiment", SPEC, LOSS, None, "d4", options),
            run / "out",
            run / "resume",
        )
    assert f"train.max_skipped_fraction = {fraction}" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (run / "resume" / "last.pt").exists() and not (run / "out" / "model.pt").exists()


def test_weights_that_overflow_with_a_finite_loss_are_never_saved(
    arrays: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_epoch = train_module._FoldTrainer.train_epoch

    def overflowing_train_epoch(trainer: Any, epoch: int) -> tuple[float, float]:
        result = train_epoch(trainer, epoch)
        if epoch == 2:  # as a last step with a huge gradient would leave them
            next(trainer.model.parameters()).data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(train_module._FoldTrainer, "train_epoch", overflowing_train_epoch)
    options = TrainOptions(epochs=3, batch_size=8, ema_decay=0.9)
    run = tmp_path / "run"
    with pytest.raises(SegflowError, match=r"^fold 0 epoch 2: the trained weights hold NaN/inf \("):
        train_fold(
            arrays,
            arrays / "folds.csv",
            0,
            Experiment("experiment", SPEC, LOSS, None, "d4", options),
            run / "out",
            run / "resume",
        )
    _assert_resume_state_finite(run / "resume", epoch=1)
    assert not (run / "out" / "model.pt").exists()


def test_nonfinite_loss_options_are_validated_by_the_options_and_the_schema() -> None:
    import jsonschema

    with pytest.raises(
        SegflowError, match=r"train\.nonfinite_loss must be one of error, skip_batch"
    ):
        TrainOptions(nonfinite_loss="ignore")
    with pytest.raises(SegflowError, match=r"train\.max_skipped_fraction must be in \[0, 1\]"):
        TrainOptions(max_skipped_fraction=1.5)
    schema = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    config["experiments"]["unet_lite0"]["train"]["nonfinite_loss"] = "skip_batch"
    jsonschema.validate(config, schema)
    config["experiments"]["unet_lite0"]["train"]["nonfinite_loss"] = "ignore"
    with pytest.raises(jsonschema.ValidationError, match="ignore"):
        jsonschema.validate(config, schema)


# --------------------------------------------------------------------------- disk full


def _write_part_then_fail(path: str | os.PathLike[str], data: bytes) -> None:
    """What a write on a full disk does: some bytes land, then ENOSPC."""
    Path(path).write_bytes(data[: max(1, len(data) // 2)])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDiskFile(io.RawIOBase):
    """A binary file that takes ``room`` bytes, then fails every write with ENOSPC."""

    def __init__(self, path: str | os.PathLike[str], room: int) -> None:
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.handle.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.close()
        super().close()


def _fail_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        Path, "write_text", lambda self, text, **kw: _write_part_then_fail(self, text.encode())
    )


def _fail_frame(method: str) -> Callable[[pytest.MonkeyPatch], None]:
    original = getattr(pd.DataFrame, method)

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        def failing(frame: pd.DataFrame, path: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            original(frame, buffer, *args, **kwargs)
            _write_part_then_fail(path, buffer.getvalue())

        monkeypatch.setattr(pd.DataFrame, method, failing)

    return patch


def _fill_disk(monkeypatch: pytest.MonkeyPatch, name_prefix: str = "") -> None:
    """The file of ``write_npy``/``write_torch`` fills the disk after 1 KiB (only for targets
    named ``name_prefix``...)."""

    def opener(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and Path(path).name.startswith(f".{name_prefix}"):
            return _FullDiskFile(path, room=1024)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", opener, raising=False)


def _fail_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(source: Any, target: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(atomic.os, "replace", failing)


FRAME = pd.DataFrame({"id": [f"img{i:04d}" for i in range(500)], "value": np.linspace(0, 1, 500)})
WRITERS: dict[str, tuple[str, Callable[[Path], None], Callable[[pytest.MonkeyPatch], None]]] = {
    "text": ("report.md", lambda p: atomic.write_text(p, "line\n" * 500), _fail_text),
    "json": ("summary.json", lambda p: atomic.write_json(p, {"n": list(range(500))}), _fail_text),
    "parquet": (
        "items.parquet",
        lambda p: atomic.write_parquet(p, FRAME),
        _fail_frame("to_parquet"),
    ),
    "csv": ("folds.csv", lambda p: atomic.write_csv(p, FRAME), _fail_frame("to_csv")),
    "npy": ("probs.npy", lambda p: atomic.write_npy(p, np.arange(4096.0)), _fill_disk),
    "torch": ("model.pt", lambda p: atomic.write_torch(p, {"w": torch.arange(4096.0)}), _fill_disk),
    "rename": ("stats.json", lambda p: atomic.write_json(p, {"n": 1}), _fail_rename),
}


@pytest.mark.parametrize(
    "previous", [None, b"the previous complete artifact\n"], ids=["new", "old"]
)
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_write_failing_on_a_full_disk_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, previous: bytes | None
) -> None:
    name, write, fail = WRITERS[kind]
    target = tmp_path / "out" / name
    if previous is not None:
        target.parent.mkdir()
        target.write_bytes(previous)
    fail(monkeypatch)
    with pytest.raises(OSError) as raised:
        write(target)
    # Not torch's opaque RuntimeError, nor numpy's errno-less "N requested and M written".
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in target.parent.iterdir()) == ([name] if previous else [])
    if previous is not None:
        assert target.read_bytes() == previous


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory, demo_manifest: pd.DataFrame) -> Path:
    """Inputs of every stage under test: manifest and dedup tables, arrays, folds, a model."""
    from segflow.data.dedup import DedupOptions, find_duplicates

    root = tmp_path_factory.mktemp("stage_inputs")
    demo_manifest.to_parquet(root / "manifest.parquet", index=False)
    items, _ = find_duplicates(demo_manifest, DedupOptions())
    items.to_parquet(root / "items.parquet", index=False)
    arrays = write_synthetic_arrays(root / "arrays", n=36, n_empty=9)
    save_checkpoint(root / "model.pt", build_model(SPEC), SPEC)
    return arrays.parent


def _stage(name: str, inputs: Path, demo: Path, out: Path) -> list[str]:
    """The ``segflow <name>`` arguments of one stage on ``stage_inputs``, writing into ``out``."""
    tables = ["--manifest", str(inputs / "manifest.parquet")]
    tables += ["--dedup-items", str(inputs / "items.parquet")]
    arrays = inputs / "arrays"
    if name == "ingest":
        images, masks = demo / "train" / "images", demo / "train" / "masks"
        return [
            *("ingest", "--train-images", str(images), "--train-masks", str(masks)),
            *("--out-manifest", str(out / "manifest.parquet")),
            *("--out-summary", str(out / "summary.json")),
        ]
    if name == "dedup":
        return [
            *("dedup", *tables[:2], "--out-items", str(out / "items.parquet")),
            *("--out-summary", str(out / "summary.json"), "--out-report", str(out / "report.md")),
        ]
    if name == "preprocess":
        return ["preprocess", *tables, "--height", "32", "--width", "32", "--out-dir", str(out)]
    if name == "folds":
        return [
            *("folds", *tables, "--out-folds", str(out / "folds.csv")),
            *("--out-summary", str(out / "summary.json")),
        ]
    return [
        *("predict-oof", "--arrays-dir", str(arrays), "--model", str(inputs / "model.pt")),
        *("--fold", "0", "--folds", str(arrays / "folds.csv"), "--out-dir", str(out)),
    ]


def _no_space(*args: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# stage -> (what fails, files in its output folder afterwards: complete ones written earlier)
STAGE_FAULTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], list[str]]] = {
    "ingest": (_fail_frame("to_parquet"), []),
    "dedup": (_fail_text, ["items.parquet"]),  # summary.json (JSON) fails after items.parquet
    "preprocess": (lambda mp: mp.setattr(os, "posix_fallocate", _no_space), []),
    "folds": (_fail_frame("to_csv"), []),
    "predict-oof": (_fill_disk, []),
}


@pytest.mark.parametrize("stage", sorted(STAGE_FAULTS))
def test_a_full_disk_in_a_stage_is_one_line_and_leaves_no_partial_artifact(
    stage: str,
    stage_inputs: Path,
    demo_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fail, left = STAGE_FAULTS[stage]
    out = tmp_path / "out"
    args = _stage(stage, stage_inputs, demo_dataset, out)
    fail(monkeypatch)
    assert cli.main(args) == 1
    assert _error_lines(capsys.readouterr().err) == [
        f"segflow {stage}: error: [Errno 28] No space left on device; free some space and rerun"
    ]
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written == left  # no partial file, no temporary
    for name in left:  # written before the failure, and complete
        assert len(pd.read_parquet(out / name)) > 0


def test_a_full_disk_while_saving_model_pt_keeps_the_resume_state(
    arrays: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    _fill_disk(monkeypatch, name_prefix="model.pt.")
    assert cli.main(_cli_train(arrays, run, epochs=2)) == 1
    assert _error_lines(capsys.readouterr().err) == [
        "segflow train: error: [Errno 28] No space left on device; free some space and rerun"
    ]
    assert sorted(p.name for p in (run / "out").iterdir()) == ["history.csv"]
    _assert_resume_state_finite(run / "resume", epoch=2)  # a rerun only writes model.pt
    monkeypatch.undo()
    assert cli.main(_cli_train(arrays, run, epochs=2)) == 0
    metrics = json.loads((run / "out" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 2 and (run / "out" / "model.pt").is_file()


# --------------------------------------------------------------------------- killed writers

WRITER = """
import sys, time
from segflow.core.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half of an arr")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_next_write_removes(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out" / "probs.npy"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    writer.kill()  # SIGKILL: no cleanup runs
    writer.wait(timeout=60)
    [stale] = _temporaries(tmp_path)
    # A live writer's temporary (this process holds its lock) is never taken for a stale one.
    with atomic.atomic_path(tmp_path / "out" / "ids.csv") as live:
        live.write_text("id\n")
        assert atomic.remove_stale_temporaries(target.parent) == 1
        assert not stale.exists() and live.exists()
    # The rerun's write of the same target removes a dead writer's leftovers by itself.
    stale.write_bytes(b"left by a kill")
    atomic.write_npy(target, np.arange(4096.0))
    assert not stale.exists() and np.load(target).shape == (4096,)
    assert sorted(p.name for p in target.parent.iterdir()) == ["ids.csv", "probs.npy"]


def test_removing_the_resume_state_removes_a_killed_save_s_temporary(tmp_path: Path) -> None:
    resume = tmp_path / "resume"
    resume.mkdir()
    for name in ("last.pt", "snapshot_e0003.pt", ".snapshot_e0004.pt.k2j3h4.tmp.pt"):
        (resume / name).write_bytes(b"x")
    remove_resume_state(resume)
    assert not resume.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_an_artifact_gets_the_mode_of_a_new_file_not_the_temporary_s(
    tmp_path: Path, umask: int
) -> None:
    """mkstemp's 0600 would hide artifacts from teammates sharing a results folder."""
    previous = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "metrics.json", {"n": 1})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = (tmp_path / "metrics.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask
