"""Process-parallel map with a progress bar, falling back to a plain loop for one worker."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Task = TypeVar("Task")
Result = TypeVar("Result")

log = logging.getLogger(__name__)

_PRELOAD = ("numpy", "pandas", "cv2", "segflow.data.ingest", "segflow.data.preprocess")


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks set by schedulers like SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _limit_native_threads() -> None:
    # One process per core already saturates the machine; nested OpenCV/BLAS threads only thrash.
    import cv2

    cv2.setNumThreads(1)


def parallel_map(
    func: Callable[[Task], Result],
    tasks: Sequence[Task],
    workers: int,
    desc: str,
    unit: str = "item",
    weights: Iterable[int] | None = None,
) -> list[Result]:
    """Apply ``func`` to every task, in order, using up to ``workers`` processes.

    Args:
        func: a picklable (module-level) function.
        tasks: the inputs; results come back in the same order.
        workers: process count; 1 runs inline (no pickling, easy to debug).
        desc: progress-bar label.
        unit: progress-bar unit.
        weights: per-task progress increments (e.g. images per chunk); 1 each by default.

    Returns:
        ``[func(task) for task in tasks]``.
    """
    weights = list(weights) if weights is not None else [1] * len(tasks)
    total = sum(weights)
    results: list[Result] = []
    with tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, disable=None) as bar:
        if workers <= 1 or len(tasks) <= 1:
            _limit_native_threads()  # one worker means one core, also for OpenCV's own threads
            for task, weight in zip(tasks, weights, strict=True):
                results.append(func(task))
                bar.update(weight)
            return results
        # Not "fork": the parent may already run OpenCV/BLAS thread pools, and a forked child
        # inherits their locks in a held state and deadlocks. A fork server is started clean.
        context = multiprocessing.get_context("forkserver")
        # Import the heavy modules once in the fork server instead of once per worker.
        context.set_forkserver_preload(list(_PRELOAD))
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_limit_native_threads
        ) as pool:
            # map() keeps order; chunksize 1 because callers already batch their tasks.
            for result, weight in zip(pool.map(func, tasks), weights, strict=True):
                results.append(result)
                bar.update(weight)
    return results


def chunked(items: Sequence[Task], size: int) -> list[Sequence[Task]]:
    """Split a sequence into consecutive chunks of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"chunk size must be positive, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]
