"""Benchmark segflow's training stage: input pipeline, training step, end-to-end, TTA inference.

Run from the repository root::

    python benchmarks/bench_train.py [--arrays DIR] [--size N] [--demo-images N]
        [--batch-size B] [--augment d4|heavy|none] [--workers W] [--seconds S]
        [--device auto|cpu|cuda] [--amp auto|off|bf16|fp16] [--channels-last on|off]
        [--encoder NAME]

``--arrays`` is a preprocess output folder (``train_images.npy``, ``train_masks.npy``,
``index.parquet``, ``stats.json``). Without it a demo dataset is generated
(:func:`segflow.data.demo_data.generate_demo_data`, ``--demo-images`` train images, 300 by default)
and run through ingest, dedup and preprocess (resized to ``--size`` x ``--size``) in a
temporary folder.

It prints, in one run:

1. **Input pipeline**: augmented training batches/s and images/s from the loader the pipeline
   builds (:meth:`segflow.model.training.fold_data.FoldData.build`: ``MemmapDataset`` + ``build_augmentation``
   + sampler), with 0 workers and with ``--workers``; nothing consumes the batches.
2. **Training step**: forward + loss + backward + optimizer step of an smp Unet (``--encoder``,
   resnet18 by default, random weights) with
   ``build_loss({'bce': 1, 'dice': 1})`` and the pipeline's optimizer, on one fixed batch that
   is already on the device: the model's ceiling, images/s.
3. **End-to-end**: the same step fed by the loader (host-to-device copy included), images/s,
   and that as a fraction of (2). The project goal on GPU is >= 0.9; on CPU the model dominates
   and the loader workers compete with it for the same cores.
4. **TTA inference**: images/s of :func:`segflow.model.inference.tta.predict_with_tta` for modes ``none``,
   ``hflip`` and ``d4`` (``eval()``, ``torch.inference_mode()``), and the d4 / none cost ratio.

How it measures:

* Every figure is a rate over a fixed wall-time budget (``--seconds``, default 10; TTA modes
  half of it each) after a warm-up, counted in whole batches; the per-batch best is shown next to
  it where that means something. On CUDA every timed region ends with a synchronize.
* Loader epochs run back to back as in training: each epoch reseeds (``FoldData.seed_epoch``);
  workers persist across epochs as in training, so their start-up falls in the warm-up. It is
  shown separately: the first epoch's first-batch latency, and the median of later epochs'.
* torch intra-op threads: ``torch.get_num_threads()`` as printed in the header (torch's default
  unless ``--threads`` is given). The header also says how much CPU other processes used while
  the benchmark ran; above 10% the timings may be perturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import torch
from bench_data import print_table  # same folder: the scripts share one table layout

from segflow.core.errors import SegflowError
from segflow.core.parallel import available_cores
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.ingest import IngestOptions, ingest
from segflow.data.preprocess import PreprocessOptions, preprocess
from segflow.model.inference.tta import predict_with_tta
from segflow.model.models import ModelSpec, build_model, padded_size
from segflow.model.training.fold_data import FoldData
from segflow.model.training.losses import build_loss
from segflow.model.training.schedules import make_optimizer
from segflow.model.training.train import amp_dtype
from segflow.model.training.train_options import AMP_MODES, TrainOptions

DEMO_TRAIN, DEMO_TEST = 300, 20  # defaults of --demo-images; few test images: unused
GOAL_FRACTION = 0.9
BUSY_WARNING = 0.10
WARMUP_BATCHES = 3
TTA_MODES = ("none", "hflip", "d4")


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_demo_arrays(tmp: Path, size: int, workers: int, n_train: int = DEMO_TRAIN) -> Path:
    """Demo data -> ingest -> dedup -> preprocess at ``size`` x ``size``; the arrays folder."""
    from segflow.data.demo_data import DemoDataOptions, generate_demo_data

    demo = tmp / "demo"
    print(f"generating demo data ({n_train} train) and preprocessing...", file=sys.stderr)
    generate_demo_data(demo, DemoDataOptions(n_train=n_train, n_test=DEMO_TEST))
    options = IngestOptions(
        train_images=str(demo / "train" / "images"),
        test_images=str(demo / "test" / "images"),
        mask_source="folder",
        train_masks=str(demo / "train" / "masks"),
    )
    manifest, _ = ingest(options, workers=workers)
    items, _ = find_duplicates(manifest, DedupOptions())
    out = tmp / "arrays"
    preprocess(manifest, items, PreprocessOptions(height=size, width=size), out, workers=workers)
    return out


def make_synthetic_arrays(tmp: Path, size: int, n_train: int, seed: int = 0) -> Path:
    """``n_train`` random 3-channel uint8 images of ``size`` x ``size`` with square masks, written
    as preprocess does (arrays, index, stats): thousands in seconds, for throughput runs."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    out = tmp / f"synthetic-{size}"
    out.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        out / "train_images.npy", mode="w+", dtype=np.uint8, shape=(n_train, size, size, 3)
    )
    masks = np.lib.format.open_memmap(
        out / "train_masks.npy", mode="w+", dtype=np.uint8, shape=(n_train, size, size)
    )
    for start in range(0, n_train, 256):
        stop = min(start + 256, n_train)
        images[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), dtype=np.uint8)
        masks[start:stop] = 0
        for i in range(start, stop):
            side = int(rng.integers(size // 8, size // 2))
            y, x = (int(v) for v in rng.integers(0, size - side, 2))
            masks[i, y : y + side, x : x + side] = 1
    images.flush()
    masks.flush()
    index = pd.DataFrame(
        {
            "id": [f"s{i:06d}" for i in range(n_train)],
            "split": "train",
            "row": np.arange(n_train),
            "orig_height": size,
            "orig_width": size,
        }
    )
    index.to_parquet(out / "index.parquet", index=False)
    stats = {
        "n_train": n_train,
        "n_test": 0,
        "height": size,
        "width": size,
        "channels": 3,
        "dtype": "uint8",
        "train_mean": [0.5, 0.5, 0.5],
        "train_std": [0.29, 0.29, 0.29],
        "train_mask_coverage": float(masks[: min(n_train, 256)].mean()),
    }
    (out / "stats.json").write_text(json.dumps(stats))
    return out


@dataclass
class Setup:
    """What every measurement shares."""

    arrays: Any  # SegmentationArrays
    device: torch.device
    batch_size: int
    augment: str
    rows: np.ndarray
    device_path: bool | None = None  # --device-path: None = the pipeline's own choice

    def fold_data(self, workers: int) -> FoldData:
        """The pipeline's loaders over all rows (validation rows: a token one)."""
        options = TrainOptions(batch_size=self.batch_size, num_workers=workers)
        return FoldData.build(
            self.arrays,
            self.rows,
            self.rows[:1],
            self.augment,
            options,
            pin_memory=self.device.type == "cuda",
            device_path=self.device_path,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(data: FoldData, first_batch: list[float]) -> Iterator[dict[str, Any]]:
    """Loader batches, epoch after epoch as in training; records each epoch's first-batch wait."""
    epoch = 0
    while True:
        epoch += 1
        data.seed_epoch(42, epoch)
        started = time.perf_counter()
        for index, batch in enumerate(data.train_loader):
            if index == 0:
                first_batch.append(time.perf_counter() - started)
            yield batch


@dataclass
class Rate:
    """Batches and images over a timed window."""

    label: str
    batches: int
    images: int
    seconds: float
    best_batch: float | None = None  # seconds of the fastest single batch, where measured
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds if self.seconds else 0.0


def timed_loop(
    step: Callable[[], int], seconds: float, device: torch.device, sync_each: bool = True
) -> Rate:
    """Call ``step`` (returns images done) until ``seconds`` have passed; count whole calls.
    ``sync_each`` False: no device sync between calls (the host queues ahead, as in training),
    only at the end; no per-batch best then."""
    batches = images = 0
    best = float("inf")
    _sync(device)
    start = time.perf_counter()
    while True:
        before = time.perf_counter()
        images += step()
        if sync_each:
            _sync(device)
        now = time.perf_counter()
        best = min(best, now - before)
        batches += 1
        if now - start >= seconds:
            _sync(device)
            now = time.perf_counter()
            return Rate("", batches, images, now - start, best if sync_each else None)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def measure_loader(setup: Setup, workers: int, seconds: float) -> Rate:
    """(1) Augmented batches produced by the pipeline's training loader, nothing consuming them."""
    data = setup.fold_data(workers)
    first: list[float] = []
    batches = _batches(data, first)
    for _ in range(WARMUP_BATCHES):
        next(batches)

    def step() -> int:
        return len(next(batches)["image"])

    rate = timed_loop(step, seconds, torch.device("cpu"))
    batches.close()  # shuts the workers down
    rate.label = f"loader, {workers} worker{'s' if workers != 1 else ''}"
    later = f", later {1000 * float(np.median(first[1:])):.0f} ms" if len(first) > 1 else ""
    rate.note = (
        f"{len(data.train_loader)} batches/epoch; {len(first)} epoch starts, first batch "
        f"{1000 * first[0]:.0f} ms{later}"
    )
    return rate


@dataclass
class Trainer:
    """Model, loss and optimizer as the pipeline builds them, with its default precision.

    On CUDA that is ``train.amp: auto`` (bf16 autocast where supported, else fp16 with a
    gradient scaler), on the CPU full precision; channels-last memory on both unless
    ``--channels-last off`` (``train.channels_last``), as
    :class:`segflow.model.training.train._FoldTrainer` does. No EMA, no clipping.
    """

    model: torch.nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    device: torch.device
    size: tuple[int, int]
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    channels_last: bool = True

    @classmethod
    def build(
        cls,
        setup: Setup,
        amp: str = "auto",
        channels_last: bool = True,
        encoder: str = "resnet18",
    ) -> Trainer:
        torch.manual_seed(0)
        spec = ModelSpec(arch="Unet", encoder=encoder, in_channels=setup.arrays.channels)
        model = build_model(spec).to(setup.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = build_loss({"bce": 1.0, "dice": 1.0}, mode="binary")
        optimizer = make_optimizer(model, TrainOptions())
        size = padded_size(model, setup.arrays.height, setup.arrays.width)
        dtype = amp_dtype(amp, setup.device)
        scaler = torch.amp.GradScaler(setup.device.type, enabled=dtype == torch.float16)
        return cls(model, loss_fn, optimizer, setup.device, size, dtype, scaler, channels_last)

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` padded to the model's size, in its memory format (channels-last or not)."""
        from segflow.model.datasets import pad_to_size

        padded = pad_to_size(images, *self.size)[0]
        if self.channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        return padded

    def step(self, images: torch.Tensor, masks: torch.Tensor, check_finite: bool = False) -> int:
        """One training step; returns the batch size. ``check_finite``: the trainer's per-batch
        NaN/inf check of the loss before the step (one host sync)."""
        from segflow.model.datasets import crop_to

        height, width = images.shape[-2:]
        padded = self.pad(images)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            logits = crop_to(self.model(padded), height, width)
            loss = self.loss_fn(logits.float(), masks)
        if check_finite and not bool(torch.isfinite(loss.detach())):
            raise BenchError("the benchmark's training loss is not finite")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return len(images)


def measure_train_step(setup: Setup, trainer: Trainer, seconds: float) -> Rate:
    """(2) Training steps on one fixed batch already on the device."""
    data = setup.fold_data(0)
    batch = data.to_device(next(iter(data.train_loader)), setup.device)
    images, masks = batch["image"], batch["mask"]
    trainer.model.train()
    for _ in range(WARMUP_BATCHES):
        trainer.step(images, masks)
    rate = timed_loop(lambda: trainer.step(images, masks), seconds, setup.device)
    rate.label = "train step, fixed batch on device"
    return rate


def measure_nan_check(setup: Setup, trainer: Trainer, seconds: float) -> list[Rate]:
    """(2b) As (2) but without a sync per step (the host queues ahead), without and with the
    trainer's per-batch NaN/inf check of the loss (which waits for every step's loss)."""
    data = setup.fold_data(0)
    batch = data.to_device(next(iter(data.train_loader)), setup.device)
    images, masks = batch["image"], batch["mask"]
    trainer.model.train()
    rates = []
    for check in (False, True):
        rate = timed_loop(
            lambda check=check: trainer.step(images, masks, check),
            seconds,
            setup.device,
            sync_each=False,
        )
        rate.label = f"train step, queued{', NaN check' if check else ''}"
        rates.append(rate)
    return rates


def measure_end_to_end(setup: Setup, trainer: Trainer, workers: int, seconds: float) -> Rate:
    """(3) Training steps fed by the pipeline's loader (copy to the device included)."""
    data = setup.fold_data(workers)
    first: list[float] = []
    batches = _batches(data, first)
    trainer.model.train()
    channels_last = trainer.channels_last

    def step() -> int:
        # As the trainer: pinned batches copied non_blocking; on the device path (uint8 batches)
        # augmented and normalised on the device.
        batch = data.to_device(next(batches), setup.device, channels_last)
        return trainer.step(batch["image"], batch["mask"])

    for _ in range(WARMUP_BATCHES):
        step()
    rate = timed_loop(step, seconds, setup.device)
    batches.close()
    rate.label = f"end-to-end, loader {workers} worker{'s' if workers != 1 else ''}"
    path = "device path (uint8, on-device aug)" if data.device_path else "albumentations path"
    rate.note = f"{len(first)} epoch starts; {path}"
    return rate


def measure_tta(setup: Setup, trainer: Trainer, mode: str, seconds: float) -> Rate:
    """(4) predict_with_tta on one fixed batch on the device, eval mode, inference_mode."""
    from segflow.model.datasets import MemmapDataset

    arrays = setup.arrays
    dataset = MemmapDataset(
        arrays.train_images_path,
        setup.rows[: setup.batch_size],
        mean=arrays.mean,
        std=arrays.std,
    )
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(setup.device)
    model = trainer.model
    model.eval()
    height, width = images.shape[-2:]

    def predict(x: torch.Tensor) -> torch.Tensor:
        from segflow.model.datasets import crop_to

        return crop_to(model(trainer.pad(x)), *x.shape[-2:]).sigmoid()

    with torch.inference_mode():
        for _ in range(2):
            predict_with_tta(predict, images, mode)
        rate = timed_loop(
            lambda: predict_with_tta(predict, images, mode).shape[0], seconds, setup.device
        )
    rate.label = f"TTA {mode}"
    copies = {"none": 1, "hflip": 2, "d4": 8}[mode]
    rate.note = f"{height}x{width}; the model sees batches of {copies * len(images)}"
    return rate


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _rate_rows(rates: list[Rate], extra: Callable[[Rate], str] = lambda _: "") -> list[list[str]]:
    rows = []
    for rate in rates:
        best = f"{1000 * rate.best_batch:.1f}" if rate.best_batch is not None else "-"
        rows.append(
            [
                rate.label,
                f"{rate.seconds:.1f}",
                str(rate.batches),
                f"{rate.batches_per_s:.2f}",
                f"{rate.images_per_s:,.1f}",
                best,
                extra(rate),
                rate.note,
            ]
        )
    return rows


def _cpu_busy() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + getattr(times, "nice", 0.0)


def _own_cpu() -> float:
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run(args: argparse.Namespace, tmp: Path) -> int:
    """Every measurement at each of ``--sizes``; the figures also to ``--json`` if given."""
    sizes = [int(v) for v in str(args.sizes or args.size).split(",")]
    figures = []
    for size in sizes:
        figures.append(run_size(args, tmp, size))
        print()
        if args.json is not None:  # after every size: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"bench_train": figures}, indent=2) + "\n")
    print("summary: end-to-end / model-step ratio (goal on GPU >= 0.9)")
    for entry in figures:
        print(
            f"  {entry['size']:>4} px  loader {entry['loader_images_per_s']:>9,.0f} img/s   "
            f"step {entry['step_images_per_s']:>9,.0f} img/s   end-to-end "
            f"{entry['end_to_end_images_per_s']:>9,.0f} img/s   ratio {entry['ratio']:.2f}"
        )
    if args.json is not None:
        print(f"figures written to {args.json}")
    return 0


def run_size(args: argparse.Namespace, tmp: Path, size: int) -> dict[str, Any]:
    """Run every measurement at ``size`` px, print the report; return its figures."""
    from segflow.core.devices import resolve_device
    from segflow.model.datasets import SegmentationArrays

    if args.threads:
        torch.set_num_threads(args.threads)
    # Before any OpenCV call: once OpenCV's thread pool runs in this process, a forked
    # DataLoader worker deadlocks in segflow.model.training.fold_data._worker_init's cv2.setNumThreads(1)
    # (seen here: the workers' loader hung after the 0-worker run). One thread avoids it.
    cv2.setNumThreads(1)
    device = resolve_device(args.device)
    if args.arrays is not None:
        arrays_dir, source = args.arrays.resolve(), "--arrays"
    elif args.synthetic:
        arrays_dir = make_synthetic_arrays(tmp, size, args.synthetic)
        source = f"synthetic ({args.synthetic} train, random pixels) at {size}x{size}"
    else:
        arrays_dir = make_demo_arrays(tmp, size, max(args.workers, 1), args.demo_images)
        source = f"demo data ({args.demo_images} train) preprocessed to {size}x{size}"
    arrays = SegmentationArrays.open(arrays_dir)
    rows = np.arange(int((arrays.index["split"] == "train").sum()), dtype=np.int64)
    choice = {"auto": None, "on": True, "off": False}[args.device_path]
    setup = Setup(arrays, device, args.batch_size, args.augment, rows, choice)
    if len(rows) <= args.batch_size:
        raise BenchError(f"{len(rows)} train images: need more than --batch-size")

    load_before = os.getloadavg()
    start_wall, start_busy, start_own = time.perf_counter(), _cpu_busy(), _own_cpu()
    seconds = args.seconds
    counts = sorted({0, args.workers})
    print("measuring the input pipeline...", file=sys.stderr)
    loader = [measure_loader(setup, workers, seconds) for workers in counts]
    trainer = Trainer.build(setup, args.amp, args.channels_last == "on", args.encoder)
    print("measuring the training step...", file=sys.stderr)
    step = measure_train_step(setup, trainer, seconds)
    nan_check = measure_nan_check(setup, trainer, seconds)
    print("measuring end-to-end training...", file=sys.stderr)
    e2e = [measure_end_to_end(setup, trainer, workers, seconds) for workers in counts]
    print("measuring TTA inference...", file=sys.stderr)
    tta = [measure_tta(setup, trainer, mode, max(seconds / 2, 1.0)) for mode in TTA_MODES]
    wall = time.perf_counter() - start_wall
    others = max((_cpu_busy() - start_busy) - (_own_cpu() - start_own), 0.0)
    others_share = others / (wall * (psutil.cpu_count() or 1))

    import segflow

    print("segflow training benchmark")
    print(f"  arrays   {arrays_dir} ({source})")
    print(
        f"  data     {len(rows)} train images {arrays.height}x{arrays.width}x{arrays.channels} "
        f"{arrays.dtype}; augment {args.augment!r}; batch size {args.batch_size}"
    )
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"  machine  {available_cores()} cores available; device {device} ({device_name}); "
        f"torch {torch.__version__}, {threads} intra-op thread(s)"
        f"{' (--threads)' if args.threads else ' (torch default)'}; step precision "
        f"{trainer.amp_dtype or 'float32'}{', channels-last' if trainer.channels_last else ''}"
    )
    print(
        f"  load     loadavg before {load_before[0]:.2f}/{load_before[1]:.2f}; other processes "
        f"used {others:.1f} CPU s during the {wall:.0f} s run ({others_share:.0%} of the machine)"
    )
    print(f"  segflow  {Path(segflow.__file__).parent}")
    print(
        "  method   rates over a fixed wall time after a warm-up of "
        f"{WARMUP_BATCHES} batches, whole batches counted;\n"
        "           'best ms' is the fastest single batch; loader workers persist across epochs "
        "as in training;\n"
        "           OpenCV limited to 1 thread in this process (cv2.setNumThreads(1)): see run()"
    )
    if others_share > BUSY_WARNING:
        print(
            "  WARNING  other processes competed for the CPU during the benchmark: timings may be "
            "perturbed"
        )
    headers = ["measurement", "s", "batches", "batches/s", "images/s", "best ms", "", "notes"]

    print(f"\n1. Input pipeline: augmented training batches ({args.augment!r}), not consumed")
    print_table(headers, _rate_rows(loader))

    print(
        f"\n2. Training step: Unet-{args.encoder} (random weights), bce+dice, "
        "forward+loss+backward+step, fixed batch"
    )
    print_table(headers, _rate_rows([step, *nan_check]))
    nan_cost = 1 - nan_check[1].images_per_s / nan_check[0].images_per_s
    print(f"   the per-batch NaN check (one host sync per step) costs {nan_cost:+.1%} of the rate")

    ceiling = step.images_per_s
    print("\n3. End-to-end: the loader feeds the model (fraction = images/s / row 2's images/s)")
    e2e_headers = [*headers[:6], "fraction", "notes"]
    print_table(e2e_headers, _rate_rows(e2e, lambda r: f"{r.images_per_s / ceiling:.2f}"))
    best = max(e2e, key=lambda r: r.images_per_s)
    fraction = best.images_per_s / ceiling
    if device.type == "cuda":
        verdict = "meets" if fraction >= GOAL_FRACTION else "MISSES"
        print(f"   goal on GPU: >= {GOAL_FRACTION}; best {fraction:.2f}: {verdict}")
    else:
        loader_best = max(r.images_per_s for r in loader)
        print(
            f"   On CPU the model dominates: the loader alone makes {loader_best:,.0f} images/s, "
            f"the model trains {ceiling:,.1f};\n"
            f"   loader workers also share the {available_cores()} cores with the model's "
            "threads. The >= 0.9 goal is for GPU runs."
        )

    print("\n4. TTA inference: predict_with_tta, eval mode, torch.inference_mode, fixed batch")
    none = tta[0].images_per_s
    tta_headers = [*headers[:6], "x none cost", "notes"]
    print_table(tta_headers, _rate_rows(tta, lambda r: f"{none / r.images_per_s:.2f}"))
    d4 = none / tta[-1].images_per_s
    print(f"   d4 / none cost ratio: {d4:.2f} (8 model passes per image; 8.0 = no batching gain)")
    return {
        "size": size,
        "images": len(rows),
        "device": str(device),
        "device_name": device_name,
        "batch_size": args.batch_size,
        "augment": args.augment,
        "workers": args.workers,
        "loader_images_per_s": max(r.images_per_s for r in loader),
        "loader": {r.label: r.images_per_s for r in loader},
        "step_images_per_s": ceiling,
        "step_queued_images_per_s": nan_check[0].images_per_s,
        "step_queued_nan_check_images_per_s": nan_check[1].images_per_s,
        "nan_check_cost": nan_cost,
        "end_to_end_images_per_s": best.images_per_s,
        "end_to_end": {r.label: r.images_per_s for r in e2e},
        "ratio": fraction,
        "device_path": bool(setup.fold_data(0).device_path),
        "tta_images_per_s": {r.label: r.images_per_s for r in tta},
    }


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="bench_train.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--arrays", type=Path, help="preprocess output folder (default: demo)")
    parser.add_argument("--size", type=int, default=64, help="demo image size (default: 64)")
    parser.add_argument(
        "--sizes", help="comma-separated image sizes measured in one run, e.g. 128,256"
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="N random synthetic images per size instead of the demo pipeline (e.g. 4000)",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument(
        "--device-path",
        default="auto",
        choices=("auto", "on", "off"),
        help="uint8 batches augmented and normalised on the device: auto (the pipeline's "
        "choice: on CUDA for lossless geometric augmentation), on (also on the CPU), off",
    )
    parser.add_argument(
        "--demo-images",
        type=int,
        default=DEMO_TRAIN,
        help=f"demo train images (default: {DEMO_TRAIN}); on a GPU use thousands, or every "
        "epoch's start (one worker augments the first batch alone) dominates the rates",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--augment", default="d4", choices=("d4", "heavy", "none"))
    parser.add_argument(
        "--workers",
        type=int,
        default=available_cores(),
        help="DataLoader workers for the parallel runs (default: all available cores)",
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="timed wall time per figure (default: 10)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--amp", default="auto", choices=AMP_MODES, help="train.amp for the step (default: auto)"
    )
    parser.add_argument(
        "--encoder", default="resnet18", help="the Unet's smp encoder (default: resnet18)"
    )
    parser.add_argument(
        "--channels-last",
        default="on",
        choices=("on", "off"),
        help="train.channels_last / predict.channels_last: NHWC memory format (default: on)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    sizes = [int(v) for v in str(args.sizes or args.size).split(",")]
    if min(sizes) < 32 or args.batch_size < 2 or args.workers < 0 or args.seconds <= 0:
        print(
            "bench_train.py: need --size >= 32, --batch-size >= 2, --workers >= 0, --seconds > 0",
            file=sys.stderr,
        )
        return 2
    if args.arrays is not None and not args.arrays.is_dir():
        print(f"bench_train.py: {args.arrays} is not a folder", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="segflow-bench-train-") as tmp:
            return run(args, Path(tmp))
    except (BenchError, SegflowError) as error:
        print(f"bench_train.py: error: {error}", file=sys.stderr)
        return 1


# Required: DataLoader workers and segflow's pool may re-import this file as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
