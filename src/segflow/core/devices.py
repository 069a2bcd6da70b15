"""Devices: parse a device name, and give concurrent jobs on one machine distinct GPUs.

Snakemake's ``resources: gpu=1`` only *counts* GPUs: with two GPUs it starts two training jobs
at once but does not say which job gets which GPU, so both would land on ``cuda:0``.
:func:`acquire_gpu` lets the jobs agree among themselves: job k holds an exclusive ``flock`` on
``lock_dir/gpu{k}.lock`` and restricts itself to GPU k with ``CUDA_VISIBLE_DEVICES``. The kernel
drops a ``flock`` when its holder dies, however it dies (even ``kill -9``), so a crashed job
never leaves a stale lock behind; that is why there is no "lock file exists" protocol here.
The locks live on the machine's own disk (:func:`default_gpu_lock_dir`), not in the results
folder: on a cluster that folder is shared by every node, and a job on one node must not wait
for a GPU held on another. Every segflow job of one user on one machine, of any workflow and
under any executor, shares them.

Ordering: ``CUDA_VISIBLE_DEVICES`` is read once, when CUDA is initialised in the process (the
first CUDA call, including ``torch.cuda.device_count()`` when NVML is unavailable). So call
:func:`acquire_gpu` first, then :func:`resolve_device` and anything else that touches CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from segflow.core.errors import SegflowError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_CUDA_NAME = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a configured name.

    Args:
        name: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``
            (N counts the *visible* GPUs, see :func:`acquire_gpu`).

    Returns:
        The device.

    Raises:
        SegflowError: for an unknown name, or a CUDA device that is not available.
    """
    import torch  # lazily: acquire_gpu must work without importing torch (and CUDA)

    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_NAME.fullmatch(text)
    if match is None:
        raise SegflowError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SegflowError(f"device {name!r} requested but CUDA is not available on this machine")
    if match.group(1) is not None:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise SegflowError(
                f"device {name!r} requested but only {count} GPU(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        return torch.device("cuda", index)
    return torch.device("cuda")


GPU_LOCK_DIR_ENV = "SEGFLOW_GPU_LOCK_DIR"


def default_gpu_lock_dir() -> Path:
    """The folder of this machine's GPU slot locks.

    Returns:
        ``$SEGFLOW_GPU_LOCK_DIR`` when set, else ``<tmp>/segflow-gpu-locks-<uid>`` on the local
        temporary disk (``flock`` is only reliable there; per user, since another user's jobs
        could not open our lock files anyway).
    """
    configured = os.environ.get(GPU_LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"segflow-gpu-locks-{os.getuid()}"


class GpuLease:
    """One job's claim on a GPU; a context manager that releases it on exit.

    Attributes:
        index: the physical GPU index k that was claimed, or None when a scheduler had already
            set ``CUDA_VISIBLE_DEVICES`` (nothing claimed, nothing to release).
        device: the torch device name to use in this process: always ``cuda:0``, the first
            (only) GPU of the visible set.
        lock_path: the held lock file, or None.
    """

    def __init__(self, index: int | None, lock_path: Path | None, fd: int | None) -> None:
        self.index = index
        self.lock_path = lock_path
        self.device = "cuda:0"
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this lease still holds its lock."""
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close the lock file (idempotent). The file stays: deleting a flock'ed
        file races with a process that has just opened it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        # Undo our CUDA_VISIBLE_DEVICES so a later acquire_gpu in this process claims afresh
        # instead of mistaking it for a scheduler's assignment.
        if os.environ.get("CUDA_VISIBLE_DEVICES") == str(self.index):
            del os.environ["CUDA_VISIBLE_DEVICES"]

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"GpuLease(index={self.index}, device={self.device!r}, held={self.held})"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _holders(lock_dir: Path, n_gpus: int) -> str:
    pids = []
    for k in range(n_gpus):
        with contextlib.suppress(OSError):
            pids.append(f"gpu{k}: pid {(lock_dir / f'gpu{k}.lock').read_text().strip() or '?'}")
    return "; ".join(pids)


def acquire_gpu(
    lock_dir: str | os.PathLike[str],
    n_gpus: int,
    timeout_s: float,
    poll_s: float = 0.25,
) -> GpuLease:
    """Claim the first free GPU slot of this machine, waiting up to ``timeout_s``.

    If ``CUDA_VISIBLE_DEVICES`` is already set (SLURM and other schedulers assign GPUs that
    way), it is respected: nothing is locked and the lease says ``cuda:0`` of the visible set.
    Otherwise slot k is claimed with a non-blocking exclusive ``flock`` on
    ``lock_dir/gpu{k}.lock`` (the holder's pid is written into it, for humans), and
    ``CUDA_VISIBLE_DEVICES=k`` is set for this process and its children, so the job sees its GPU
    as ``cuda:0``. The lock lives as long as the lease (or the process: the kernel releases a
    dead holder's lock; forked children such as DataLoader workers share it while they live).

    Must run before CUDA is initialised in this process (see the module docstring).

    Args:
        lock_dir: a folder shared by the jobs of this machine (local disk: flock over NFS is
            unreliable).
        n_gpus: GPUs on the machine, i.e. slots 0..n_gpus-1.
        timeout_s: how long to keep retrying while every slot is held.
        poll_s: pause between retries.

    Returns:
        The lease; use it as a context manager (``with acquire_gpu(...) as lease:``).

    Raises:
        SegflowError: when ``n_gpus`` < 1, or no slot came free within ``timeout_s``.
        RuntimeError: when CUDA is already initialised (too late to choose a GPU).
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        log.info(
            "CUDA_VISIBLE_DEVICES=%s set by the scheduler; using cuda:0 of that set",
            os.environ["CUDA_VISIBLE_DEVICES"],
        )
        return GpuLease(None, None, None)
    if n_gpus < 1:
        raise SegflowError(f"n_gpus must be >= 1 to assign a GPU, got {n_gpus}")
    torch = sys.modules.get("torch")  # not imported: CUDA certainly not initialised
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(
            "acquire_gpu() called after CUDA was initialised; CUDA_VISIBLE_DEVICES would be "
            "ignored. Call it before any CUDA use."
        )
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if lock_dir.stat().st_uid != os.getuid():  # e.g. planted in a shared /tmp by another user
        raise SegflowError(f"{lock_dir}: GPU lock folder is not owned by this user")
    deadline = time.monotonic() + timeout_s
    waiting = False
    while True:
        for k in range(n_gpus):
            path = lock_dir / f"gpu{k}.lock"
            fd = _try_lock(path)
            if fd is None:
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.environ["CUDA_VISIBLE_DEVICES"] = str(k)
            log.info("claimed GPU %d (%s)", k, path)
            return GpuLease(k, path, fd)
        if time.monotonic() >= deadline:
            raise SegflowError(
                f"{lock_dir}: all {n_gpus} GPU slot(s) still held after {timeout_s:g} s "
                f"({_holders(lock_dir, n_gpus)})"
            )
        if not waiting:
            waiting = True
            log.info("all %d GPU slot(s) held (%s); waiting", n_gpus, _holders(lock_dir, n_gpus))
        time.sleep(poll_s)


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--gpus``, ``--gpu-lock-dir``, ``--gpu-timeout`` (see :func:`compute`)."""
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs on this machine (0: none)")
    parser.add_argument(
        "--gpu-lock-dir",
        default=None,
        help="folder of this machine's GPU slot locks, on local disk "
        "(default: $SEGFLOW_GPU_LOCK_DIR, else <tmp>/segflow-gpu-locks-<uid>)",
    )
    parser.add_argument(
        "--gpu-timeout", type=float, default=24 * 3600.0, help="seconds to wait for a free GPU"
    )


@contextlib.contextmanager
def compute(args: argparse.Namespace) -> Iterator[None]:
    """Pin torch to the job's threads and, on a multi-GPU machine, to a GPU of its own.

    The GPU slot must be taken before anything initialises CUDA in this process.

    Args:
        args: parsed :func:`add_compute_arguments` flags.
    """
    import torch

    torch.set_num_threads(max(1, args.threads))
    if not args.gpus:
        yield
        return
    lock_dir = args.gpu_lock_dir or default_gpu_lock_dir()
    with acquire_gpu(lock_dir, args.gpus, timeout_s=args.gpu_timeout) as lease:
        logging.getLogger("segflow").info("using GPU slot %s (%s)", lease.index, lease.device)
        yield
