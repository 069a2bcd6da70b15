"""Benchmark segflow's data stages on one dataset: dedup vs ``md5sum``, preprocess, peak memory.

Run from the repository root (``make bench`` runs it with no arguments)::

    python benchmarks/bench_data.py [--data DIR] [--workers N] [--repeat R]

``--data`` is a dataset in Kaggle layout (``train/images``, ``train/masks`` or ``train.csv``,
optional ``test/images`` and ``depths.csv``/``metadata.csv``). By default it is the real TGS Salt
data at ``../shared/datasets/tgs-salt`` next to the clone, or, where that is absent, a demo dataset
generated into the temporary folder.

It prints, for the same files in one run:

1. ``md5sum`` over exactly the images dedup considers (train + test), the reference;
2. segflow's dedup measured two ways, each as seconds and as a ratio to ``md5sum`` against the
   project goal (dedup <= 1.5x md5sum): the full ingest scan plus ``find_duplicates`` (what the
   pipeline runs), and a "from scratch" path that only hashes bytes and decoded pixels with the
   same segflow functions, plus grouping; and ``find_duplicates`` alone on an existing manifest;
3. preprocess throughput with one worker and with all of them, and the parallel efficiency;
4. the peak memory of every step and the size of what it produced.

How it measures:

* Every measurement runs in a **fresh Python process** (this script re-invoked with a hidden
  ``--step``), so a step's peak memory is its own and not an earlier step's high-water mark, and
  every parallel run pays the worker start-up the pipeline pays. The time is taken inside that
  process around the measured call only: interpreter start-up, imports and reading the step's
  inputs (e.g. the manifest Parquet) are not counted.
* The page cache is warm for both sides: one ``md5sum`` run and one full ingest (which also
  reads the masks and CSVs) run before anything is timed, and each step reports its best of R.
* Peak memory comes from the kernel, not from sampling, which would steal CPU from the step
  being timed: the step process's own high-water mark (``VmHWM``; ``ru_maxrss`` would carry over
  the parent's mark through fork + exec), and ``RUSAGE_CHILDREN`` for its largest worker.
  segflow's pool forks its workers from a fork server, which reaps them; the step stops the fork
  server before asking, so the workers' peaks reach ``RUSAGE_CHILDREN`` (see :func:`measure`
  for the one run per parallel step that this needs). Both are peak RSS per process, shared
  pages included, so the peak of a parallel step lies between the larger of the two numbers and
  ``main + workers x largest worker``.

All outputs go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from segflow.core.errors import SegflowError
from segflow.core.parallel import available_cores, chunked, parallel_map

# Imported at module level on purpose: every worker of segflow's pool re-runs the main module
# (this script) as __mp_main__ before its first task, as multiprocessing prepares spawned and
# fork-server children. In the pipeline that module is the `segflow` console script, which
# imports segflow.cli and with it pandas, numpy and OpenCV; these imports match it closely, so a
# worker here starts up about as slowly as one in the pipeline.
from segflow.data.dedup import DedupOptions, NearDuplicateOptions, find_duplicates, near_fold_groups
from segflow.data.ingest import IngestOptions, ingest, list_images
from segflow.data.preprocess import PreprocessOptions, preprocess
from segflow.formats.imageio import DicomWindow, decode_image, pixel_md5

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "tgs-salt"
DEMO_TRAIN, DEMO_TEST = 2000, 1000
GOAL_RATIO = 1.5
BUSY_WARNING = 0.10  # warn when other processes used more than this share of the CPU
SCRATCH_CHUNK = 64  # the same batch size as the ingest scan (segflow.data.ingest._SCAN_CHUNK)
PREPROCESS_OPTIONS = PreprocessOptions(height=128, width=128, clahe=True)
RESULT_MARKER = "BENCH-RESULT "
GNU_TIME = "/usr/bin/time"
MIB = 1024 * 1024
# ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


class BenchError(Exception):
    """A benchmark step could not run; the message says why."""


@dataclass(frozen=True)
class StepSpec:
    """What one fresh step process is asked to do (passed to it as JSON)."""

    data: str
    tmp: str
    workers: int = 1
    collect: bool = False  # md5sum: return the digests, to cross-check segflow's byte md5s
    early_fork_server: bool = False  # start the fork server first (memory runs; see measure())


@dataclass
class StepRun:
    """What one step process reported."""

    seconds: dict[str, float]  # "total" plus the step's phases
    cpu_seconds: float = 0.0  # user + system CPU of the measured call, its workers included
    maxrss_self: int = 0  # bytes: peak RSS of the step process itself (VmHWM)
    maxrss_children: int = 0  # bytes: peak RSS of its largest child (a worker, or md5sum)
    output_bytes: int = 0  # size of what the step produced, for context
    info: dict[str, Any] = field(default_factory=dict)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall time of the measured call, with named phases, and the CPU time this process spent.

    The CPU time of child processes (workers, md5sum) is added by :func:`_child_main` once they
    have all been reaped; no step starts a child before its measured call.
    """

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._cpu = _cpu(resource.RUSAGE_SELF)
        self._phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """End a phase of the call."""
        now = time.perf_counter()
        self._phases[phase] = now - self._last
        self._last = now

    def stop(self) -> StepRun:
        """End the call: its total and phase times and this process's CPU time."""
        total = time.perf_counter() - self._start
        cpu = _cpu(resource.RUSAGE_SELF) - self._cpu
        return StepRun({"total": total, **self._phases}, cpu)


@dataclass
class Measurement:
    """The R timed runs of one step, and the peak RSS of its largest worker."""

    label: str
    workers: int
    runs: list[StepRun]
    worker_peak: int = 0  # bytes; 0 without workers (or where it cannot be measured)

    @property
    def best(self) -> StepRun:
        """The run with the smallest total time."""
        return min(self.runs, key=lambda run: run.seconds["total"])

    @property
    def median(self) -> float:
        """Median total seconds over the runs."""
        return statistics.median(run.seconds["total"] for run in self.runs)

    @property
    def peak_self(self) -> int:
        """Largest step-process peak RSS over the runs (bytes)."""
        return max(run.maxrss_self for run in self.runs)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def ingest_options(root: Path) -> IngestOptions:
    """Ingest options for a dataset in Kaggle layout, as config/examples/tgs-salt.yaml sets them.

    Raises:
        BenchError: no ``train/images``, or no masks (neither ``train/masks`` nor ``train.csv``).
    """
    train_images = root / "train" / "images"
    if not train_images.is_dir():
        raise BenchError(f"{root} has no train/images folder (expected Kaggle layout)")
    test_images = root / "test" / "images"
    masks: dict[str, Any]
    if (root / "train" / "masks").is_dir():
        masks = {"mask_source": "folder", "train_masks": str(root / "train" / "masks")}
    elif (root / "train.csv").is_file():
        masks = {"mask_source": "rle_csv", "rle_csv": str(root / "train.csv")}
    else:
        raise BenchError(f"{root} has neither train/masks nor train.csv")
    metadata = next(
        (str(p) for p in (root / "depths.csv", root / "metadata.csv") if p.is_file()), None
    )
    return IngestOptions(
        train_images=str(train_images),
        test_images=str(test_images) if test_images.is_dir() else None,
        metadata_csv=metadata,
        **masks,
    )


def dedup_files(options: IngestOptions) -> tuple[list[str], int]:
    """The image files dedup considers, listed as ingest lists them; and how many are train.

    Returns:
        (absolute paths, train first, each split sorted by id; number of train images).
    """
    train, _ = list_images(options.train_images or "", "train image")
    test = list_images(options.test_images, "test image")[0] if options.test_images else {}
    paths = [str(train[key].resolve()) for key in sorted(train)]
    paths += [str(test[key].resolve()) for key in sorted(test)]
    return paths, len(train)


def _paths_file(tmp: str) -> Path:
    return Path(tmp) / "paths.nul"


def _read_paths(tmp: str) -> list[str]:
    return _paths_file(tmp).read_text().split("\0")


# --------------------------------------------------------------------------------------------
# Steps: each runs in its own fresh process (see _child_main)
# --------------------------------------------------------------------------------------------


def _step_baseline(spec: StepSpec) -> StepRun:
    """Nothing: the peak RSS of a fresh process that has imported segflow, for reference."""
    return StepRun({"total": 0.0})


def _step_md5sum(spec: StepSpec) -> StepRun:
    """``md5sum`` on every dedup file at once; xargs splits an over-long argument list."""
    if shutil.which("xargs") is None or shutil.which("md5sum") is None:
        raise BenchError("md5sum and xargs (GNU coreutils/findutils) are needed")
    paths = _read_paths(spec.tmp)
    command = ["xargs", "-0", "md5sum"]
    if spec.collect and Path(GNU_TIME).is_file():
        # The warm-up run also measures md5sum's memory. getrusage cannot: a child forked from
        # this Python process inherits its high-water mark. GNU time forks from a small process.
        command = [GNU_TIME, "-f", f"{RESULT_MARKER}%M", *command]
    stdin = "\0".join(paths).encode()
    out_path = Path(spec.tmp) / "md5sum.txt"
    # Digests go to a file, as `md5sum ... > file` would: reading a pipe from Python costs more.
    with out_path.open("wb") as out:
        watch = Stopwatch()
        done = subprocess.run(command, input=stdin, stdout=out, stderr=subprocess.PIPE, check=True)
        run = watch.stop()
    lines = out_path.read_text().splitlines()
    if len(lines) != len(paths):
        raise BenchError(f"md5sum printed {len(lines)} digests for {len(paths)} files")
    if spec.collect:
        run.info["digests"] = sorted(line[:32] for line in lines)
        for line in done.stderr.decode().splitlines():
            if line.startswith(RESULT_MARKER):
                run.info["md5sum_maxrss"] = int(line[len(RESULT_MARKER) :]) * 1024
    return run


def _step_prepare(spec: StepSpec) -> StepRun:
    """Warm-up: a full ingest + dedup whose manifest and items the later steps read."""
    watch = Stopwatch()
    manifest, summary = ingest(ingest_options(Path(spec.data)), workers=spec.workers)
    items, dedup_summary = find_duplicates(manifest, DedupOptions())
    run = watch.stop()
    manifest.to_parquet(Path(spec.tmp) / "manifest.parquet")
    items.to_parquet(Path(spec.tmp) / "items.parquet")
    run.info = {
        "digests": sorted(manifest["md5_bytes"]),
        "sizes": summary["sizes"],
        "n_groups": dedup_summary["n_groups"],
        "n_members": dedup_summary["n_members"],
    }
    return run


def _step_scan(spec: StepSpec) -> StepRun:
    """The pipeline's hashing work: the ingest scan, then exact-duplicate grouping."""
    options = ingest_options(Path(spec.data))
    watch = Stopwatch()
    manifest, _ = ingest(options, workers=spec.workers)
    watch.lap("ingest")
    find_duplicates(manifest, DedupOptions())
    watch.lap("find_duplicates")
    run = watch.stop()
    run.output_bytes = int(manifest.memory_usage(deep=True).sum())
    return run


def _hash_chunk(task: tuple[Sequence[str], DicomWindow, int]) -> list[tuple[str, str]]:
    """(md5 of the bytes, md5 of the decoded pixels) per file, as the ingest scan computes them."""
    paths, window, max_pixels = task
    rows = []
    for path in paths:
        image = decode_image(path, window, max_pixels)
        rows.append((image.md5_bytes, pixel_md5(image.pixels)))
    return rows


def _step_scratch(spec: StepSpec) -> StepRun:
    """Dedup from scratch: hash bytes and decoded pixels in parallel, then group by pixels."""
    paths = _read_paths(spec.tmp)  # the list md5sum gets: listing is not timed on either side
    defaults = IngestOptions()
    window = DicomWindow(defaults.dicom_window_center, defaults.dicom_window_width)
    chunks = chunked(paths, SCRATCH_CHUNK)
    tasks = [(chunk, window, defaults.max_pixels) for chunk in chunks]
    watch = Stopwatch()
    hashed = parallel_map(
        _hash_chunk, tasks, spec.workers, desc="hash", unit="img", weights=map(len, chunks)
    )
    watch.lap("hash")
    frame = pd.DataFrame(
        [row for rows in hashed for row in rows], columns=["md5_bytes", "md5_pixels"]
    )
    groups = frame.groupby("md5_pixels", sort=False)["md5_bytes"].agg(["size", "nunique"])
    duplicated = groups[groups["size"] > 1]
    watch.lap("group")
    run = watch.stop()
    run.output_bytes = int(frame.memory_usage(deep=True).sum())
    run.info = {
        "n_groups": len(duplicated),
        "n_pixel_only": int((duplicated["nunique"] > 1).sum()),
    }
    return run


def _read_manifest(tmp: str) -> pd.DataFrame:
    return pd.read_parquet(Path(tmp) / "manifest.parquet")


def _step_find_duplicates(spec: StepSpec) -> StepRun:
    """Exact-duplicate grouping alone, on the manifest an earlier ingest wrote."""
    manifest = _read_manifest(spec.tmp)
    watch = Stopwatch()
    items, _ = find_duplicates(manifest, DedupOptions())
    run = watch.stop()
    run.output_bytes = int(items.memory_usage(deep=True).sum())
    return run


def _step_find_duplicates_near(spec: StepSpec) -> StepRun:
    """Grouping with near-duplicates on (as the example configs set it): pHash decodes again."""
    manifest = _read_manifest(spec.tmp)
    near = NearDuplicateOptions(near_duplicates=True)
    watch = Stopwatch()
    items, _ = find_duplicates(manifest, DedupOptions())
    groups, _ = near_fold_groups(manifest, items, near)
    run = watch.stop()
    run.output_bytes = int(
        items.memory_usage(deep=True).sum() + groups.memory_usage(deep=True).sum()
    )
    return run


def _step_preprocess(spec: StepSpec) -> StepRun:
    """Preprocess every used train item and every test item into .npy arrays."""
    manifest = _read_manifest(spec.tmp)
    items = pd.read_parquet(Path(spec.tmp) / "items.parquet")
    out_dir = Path(tempfile.mkdtemp(prefix="preprocess-", dir=spec.tmp))
    try:
        watch = Stopwatch()
        stats = preprocess(manifest, items, PREPROCESS_OPTIONS, out_dir, workers=spec.workers)
        run = watch.stop()
        run.output_bytes = sum(path.stat().st_size for path in out_dir.glob("*.npy"))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    run.info["n_images"] = stats["n_train"] + stats["n_test"]
    return run


STEPS: dict[str, Callable[[StepSpec], StepRun]] = {
    "baseline": _step_baseline,
    "md5sum": _step_md5sum,
    "prepare": _step_prepare,
    "scan": _step_scan,
    "scratch": _step_scratch,
    "find_duplicates": _step_find_duplicates,
    "find_duplicates_near": _step_find_duplicates_near,
    "preprocess": _step_preprocess,
}


def _peak_rss_self() -> int:
    """Peak RSS of this process since its exec, in bytes.

    ``VmHWM`` belongs to the address space that exec created. ``ru_maxrss`` (the fallback off
    Linux) also keeps the high-water mark that the parent had when it forked this process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def _reap_fork_server() -> None:
    """Stop the fork server that segflow's pool started, so that it and the workers it reaped
    count in this process's RUSAGE_CHILDREN. Private API: without it, worker peaks read 0."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if callable(stop):
        stop()


def _child_main(step: str, spec_json: str) -> int:
    """Run one step in this (fresh) process and print its result as one JSON line."""
    spec = StepSpec(**json.loads(spec_json))
    if spec.early_fork_server:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    run = STEPS[step](spec)
    _reap_fork_server()
    run.cpu_seconds += _cpu(resource.RUSAGE_CHILDREN)
    run.maxrss_self = _peak_rss_self()
    run.maxrss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _MAXRSS_UNIT
    print(RESULT_MARKER + json.dumps(asdict(run)), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def run_step(name: str, spec: StepSpec, env: dict[str, str]) -> StepRun:
    """Run one step in a fresh Python process and return what it reported.

    Raises:
        BenchError: the step process failed (its stderr is included).
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name]
    command += ["--spec", json.dumps(asdict(spec))]
    # stderr is captured: segflow's progress bars stay off (not a terminal) and out of the table.
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        raise BenchError(f"step {name!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return StepRun(**json.loads(lines[-1][len(RESULT_MARKER) :]))


def measure(name: str, label: str, spec: StepSpec, repeat: int, env: dict[str, str]) -> Measurement:
    """Run a step ``repeat`` times, each in a fresh process; with workers, one more run first for
    their memory.

    Why the extra run: a process started by fork + exec keeps its parent's RSS high-water mark.
    The fork server is such a process, and segflow starts it inside the measured call, when the
    step process may already hold its inputs, so in a timed run RUSAGE_CHILDREN (the largest of
    the fork server and the workers it reaped) can report the step process's peak instead of a
    worker's. The memory run starts the fork server before anything is loaded (its inherited
    mark is then that of the bare imports, no more than every worker holds once it has imported
    the same modules), and is not timed, since in the pipeline the fork server's start-up is
    part of the call.
    """
    worker_peak = 0
    if spec.workers > 1:
        print(f"  {label}, workers={spec.workers}: memory run", file=sys.stderr)
        memory_run = run_step(name, replace(spec, early_fork_server=True), env)
        worker_peak = memory_run.maxrss_children
    runs = []
    for index in range(repeat):
        print(f"  {label}, workers={spec.workers}: run {index + 1}/{repeat}", file=sys.stderr)
        runs.append(run_step(name, spec, env))
    return Measurement(label, spec.workers, runs, worker_peak)


def _mib(size: int) -> str:
    return f"{size / MIB:,.0f} MiB" if size >= 10 * MIB else f"{size / MIB:,.1f} MiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def _worker_memory(measurement: Measurement) -> str:
    if measurement.workers == 1:
        return "-"
    return _mib(measurement.worker_peak) if measurement.worker_peak else "n/a"


def report_dedup(
    md5sum: Measurement,
    md5sum_maxrss: int | None,
    variants: Sequence[Measurement],
    n_files: int,
    repeat: int,
) -> None:
    """Print the dedup-vs-md5sum table."""
    reference = md5sum.best.seconds["total"]
    print(
        f"\n1-2. Dedup vs md5sum on the same {n_files:,} images "
        f"(best of {repeat}; goal: dedup <= {GOAL_RATIO}x md5sum)"
    )
    headers = ["step", "workers", "best s", "median s", "CPU s", "x md5sum", "goal"]
    headers += ["peak RSS main", "peak RSS worker", "output"]
    rows = [
        [
            "md5sum (xargs -0 md5sum, all files at once)",
            "1",
            f"{reference:.3f}",
            f"{md5sum.median:.3f}",
            f"{md5sum.best.cpu_seconds:.2f}",
            "1.00",
            "-",
            "-",
            f"{_mib(md5sum_maxrss)} (md5sum)" if md5sum_maxrss else "n/a",
            "-",
        ]
    ]
    for measurement in variants:
        best = measurement.best
        total = best.seconds["total"]
        ratio = total / reference
        rows.append(
            [
                measurement.label,
                str(measurement.workers),
                f"{total:.3f}",
                f"{measurement.median:.3f}",
                f"{best.cpu_seconds:.2f}",
                f"{ratio:.2f}",
                "meets" if ratio <= GOAL_RATIO else "MISSES",
                _mib(measurement.peak_self),
                _worker_memory(measurement),
                _mib(best.output_bytes),
            ]
        )
        for phase, seconds in best.seconds.items():
            if phase != "total":
                ratio_cell = f"{seconds / reference:.2f}"
                rows.append([f"    of which {phase}", "", f"{seconds:.3f}", "", "", ratio_cell])
                rows[-1] += [""] * (len(headers) - len(rows[-1]))
    print_table(headers, rows)
    print(
        "   CPU s: user + system CPU of the best run, workers included. 'of which': phases of "
        "the best run.\n"
        "   The scan also decodes and validates the masks. find_duplicates runs with "
        "near_duplicates off\n"
        "   unless said; with it on it links the pHashes ingest recorded (no decoding). output: "
        "the manifest,\n   hashes or dedup items DataFrame in memory."
    )


def report_preprocess(measurements: Sequence[Measurement], repeat: int) -> None:
    """Print the preprocess throughput table."""
    options = PREPROCESS_OPTIONS
    print(
        f"\n3. Preprocess throughput ({options.height}x{options.width}, "
        f"CLAHE {'on' if options.clahe else 'off'}, channels {options.channels}; best of {repeat})"
    )
    single = measurements[0].best.seconds["total"]
    headers = ["workers", "best s", "median s", "CPU s", "images/s", "speedup", "efficiency"]
    headers += ["peak RSS main", "peak RSS worker", "output arrays"]
    rows = []
    for measurement in measurements:
        best = measurement.best
        seconds = best.seconds["total"]
        speedup = single / seconds
        rows.append(
            [
                str(measurement.workers),
                f"{seconds:.3f}",
                f"{measurement.median:.3f}",
                f"{best.cpu_seconds:.2f}",
                f"{best.info['n_images'] / seconds:,.0f}",
                f"{speedup:.2f}x",
                f"{speedup / measurement.workers:.0%}",
                _mib(measurement.peak_self),
                _worker_memory(measurement),
                _mib(best.output_bytes),
            ]
        )
    print_table(headers, rows)
    print(
        f"   images = used train items + test items ({measurements[0].best.info['n_images']:,}); "
        "efficiency = speedup / workers;\n"
        "   output arrays: the .npy files written (train images + masks, test images)."
    )
    best = measurements[0].best
    cores_used = best.cpu_seconds / best.seconds["total"]
    if cores_used > 1.15:
        print(
            f"   workers=1 kept {cores_used:.1f} cores busy: it runs inline, where OpenCV keeps "
            "its own thread pool\n"
            "   (segflow.core.parallel limits OpenCV to one thread only in pool workers)."
        )


def report_memory(baseline: StepRun) -> None:
    """Explain the memory columns."""
    print(
        "\n4. Peak memory: peak RSS per process (shared pages counted in each), from the kernel.\n"
        f"   Reference: a fresh step process that has only imported segflow peaks at "
        f"{_mib(baseline.maxrss_self)}.\n"
        "   'main': the step process (VmHWM, largest over the timed runs). 'worker': its "
        "largest\n"
        "   worker (RUSAGE_CHILDREN, from one extra untimed run that starts the fork server "
        "first; see\n"
        "   measure()). A parallel step's total lies between max(main, worker) and "
        "main + workers x worker."
    )


def _step_env() -> dict[str, str]:
    """The environment for step processes: this segflow first on PYTHONPATH, so they import the
    same code as this process does even when the shared venv points at another clone."""
    import segflow

    env = dict(os.environ)
    src = str(Path(segflow.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds spent machine-wide and by this process and its reaped descendants."""

    wall: float
    machine: float
    own: float

    @classmethod
    def now(cls) -> CpuClock:
        """Read the clocks."""
        times = psutil.cpu_times()
        busy = (
            times.user
            + times.system
            + sum(getattr(times, name, 0.0) for name in ("nice", "irq", "softirq"))
        )
        own = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
        return cls(time.perf_counter(), busy, own)

    def others_since(self, start: CpuClock) -> tuple[float, float]:
        """(CPU seconds other processes used since ``start``, as a share of the machine)."""
        others = max((self.machine - start.machine) - (self.own - start.own), 0.0)
        capacity = (self.wall - start.wall) * (psutil.cpu_count() or 1)
        return others, others / capacity if capacity else 0.0


@dataclass
class Results:
    """Everything one benchmark run measured."""

    data: Path
    source: str  # where the data came from, in words
    options: IngestOptions
    n_files: int
    n_train: int
    n_bytes: int
    workers: int
    repeat: int
    others_cpu: float  # CPU seconds that other processes used while the benchmark ran
    others_share: float  # the same as a share of the machine's capacity over that time
    baseline: StepRun  # a step process that only imported segflow
    warm_md5sum: StepRun  # the warm-up md5sum run: digests and md5sum's own peak RSS
    prepared: StepRun  # the warm-up ingest + dedup run
    md5sum: Measurement
    dedup: list[Measurement]
    scratch: Measurement
    preprocess: list[Measurement]


def _resolve_data(data: Path | None, tmp: str) -> tuple[Path, str]:
    """The dataset to use (generating the demo one if needed) and where it came from."""
    if data is not None:
        data = data.resolve()
        return data, "the default" if data == DEFAULT_DATA.resolve() else "--data"
    if DEFAULT_DATA.is_dir():
        return DEFAULT_DATA.resolve(), "the default"
    from segflow.data.demo_data import DemoDataOptions, generate_demo_data

    demo = Path(tmp) / "demo"
    print(f"generating a demo dataset ({DEMO_TRAIN} + {DEMO_TEST})...", file=sys.stderr)
    generate_demo_data(demo, DemoDataOptions(n_train=DEMO_TRAIN, n_test=DEMO_TEST))
    return demo, f"demo data generated in a temp folder; {DEFAULT_DATA} is absent"


def run_benchmark(data: Path | None, workers: int, repeat: int, tmp: str) -> Results:
    """Run every measurement on one dataset, with all outputs under ``tmp``."""
    env = _step_env()
    start = CpuClock.now()
    data, source = _resolve_data(data, tmp)
    options = ingest_options(data)
    paths, n_train = dedup_files(options)
    _paths_file(tmp).write_text("\0".join(paths))
    counts = sorted({1, workers})

    def spec(count: int = 1, collect: bool = False) -> StepSpec:
        return StepSpec(str(data), tmp, count, collect)

    print("warming up: md5sum, then a full ingest + dedup...", file=sys.stderr)
    baseline = run_step("baseline", spec(), env)
    warm_md5sum = run_step("md5sum", spec(collect=True), env)
    prepared = run_step("prepare", spec(workers), env)

    md5sum = measure("md5sum", "md5sum", spec(), repeat, env)
    scan = "ingest scan + find_duplicates"
    dedup = [measure("scan", scan, spec(count), repeat, env) for count in counts]
    scratch = measure(
        "scratch", "dedup from scratch (bytes+pixels md5, group)", spec(workers), repeat, env
    )
    dedup.append(scratch)
    alone = "find_duplicates alone (existing manifest)"
    dedup.append(measure("find_duplicates", alone, spec(), repeat, env))
    near = "find_duplicates, near_duplicates on (pHash)"
    dedup.append(measure("find_duplicates_near", near, spec(), repeat, env))
    prep = [measure("preprocess", "preprocess", spec(count), repeat, env) for count in counts]
    others_cpu, others_share = CpuClock.now().others_since(start)
    return Results(
        data=data,
        source=source,
        options=options,
        n_files=len(paths),
        n_train=n_train,
        n_bytes=sum(Path(path).stat().st_size for path in paths),
        workers=workers,
        repeat=repeat,
        others_cpu=others_cpu,
        others_share=others_share,
        baseline=baseline,
        warm_md5sum=warm_md5sum,
        prepared=prepared,
        md5sum=md5sum,
        dedup=dedup,
        scratch=scratch,
        preprocess=prep,
    )


def report(results: Results) -> None:
    """Print the whole report."""
    import segflow

    cores = available_cores()
    prepared = results.prepared
    same = results.warm_md5sum.info["digests"] == prepared.info["digests"]
    print("segflow data benchmark")
    print(f"  data     {results.data} ({results.source})")
    print(
        f"  files    {results.n_files:,} images dedup considers ({results.n_train:,} train + "
        f"{results.n_files - results.n_train:,} test), {results.n_bytes / 1e6:,.1f} MB, "
        f"{', '.join(prepared.info['sizes'])}; the scan also reads the masks "
        f"({results.options.mask_source})"
    )
    print(
        f"  machine  {cores} cores; workers {' and '.join(map(str, sorted({1, results.workers})))}; "
        f"best of {results.repeat} run{'s' if results.repeat > 1 else ''}; other processes "
        f"used {results.others_cpu:.1f} CPU s meanwhile ({results.others_share:.0%} of the machine)"
    )
    print(f"  segflow  {Path(segflow.__file__).parent}")
    print(
        "  method   every run is a fresh Python process; the time is the measured call only "
        "(start-up,\n"
        "           imports and reading inputs excluded); the page cache is warm for md5sum and "
        "segflow\n"
        "           alike: one md5sum run and one full ingest + dedup run come before any timing"
    )
    print(
        f"  check    md5sum and segflow agree on all {results.n_files:,} byte digests: "
        f"{'yes' if same else 'NO'}; exact duplicate groups: scan {prepared.info['n_groups']} "
        f"({prepared.info['n_members']} images), from scratch "
        f"{results.scratch.best.info['n_groups']}"
    )
    if results.others_share > BUSY_WARNING:
        print(
            "  WARNING  other processes competed for the CPU during the benchmark: timings may be "
            "perturbed\n"
            "           (compare best and median; CPU s is less sensitive to contention)"
        )
    md5sum_peak = results.warm_md5sum.info.get("md5sum_maxrss")
    report_dedup(results.md5sum, md5sum_peak, results.dedup, results.n_files, results.repeat)
    report_preprocess(results.preprocess, results.repeat)
    report_memory(results.baseline)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="bench_data.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--data",
        type=Path,
        help=f"dataset in Kaggle layout (default: {DEFAULT_DATA} if present, else demo data)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=available_cores(),
        help="worker processes for the parallel runs (default: all available cores)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs per step; the best counts (default: 3)"
    )
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.step:
        return _child_main(args.step, args.spec)
    if args.workers < 1 or args.repeat < 1:
        print("bench_data.py: --workers and --repeat must be >= 1", file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"bench_data.py: {args.data} is not a folder", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="segflow-bench-") as tmp:
            results = run_benchmark(args.data, args.workers, args.repeat, tmp)
        report(results)
    except (BenchError, SegflowError) as error:
        print(f"bench_data.py: error: {error}", file=sys.stderr)
        return 1
    return 0


# Required: every worker of segflow's pool runs this file again (as __mp_main__) before its first
# task; without the guard each worker would start a benchmark of its own.
if __name__ == "__main__":
    sys.exit(main())
