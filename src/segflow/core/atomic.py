"""Atomic artifact writing: write to a temporary sibling, then rename over the target.

A reader (or Snakemake) therefore sees either the old file, the complete new file, or nothing —
never a half-written artifact, even if the process is killed mid-write.

A failed write (disk full, I/O error) removes the temporary file and raises the ``OSError``. A
writer killed outright (``kill -9``, OOM killer, node loss) cannot clean up, so every temporary
file is ``flock``-ed by its writer while it exists: the next writer of the same target (a
rerun) deletes the temporaries whose lock is free, i.e. whose writer is dead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left untouched.
    The temporary name keeps the target's suffix so writers that infer a format from it work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, _temporary_pattern(target))
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    tmp = Path(tmp_name)
    try:
        # Held until this writer ends (the kernel drops it when the process dies): it tells
        # remove_stale_temporaries that this file is still being written.
        with contextlib.suppress(OSError):  # a file system without locks: never swept
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
        # mkstemp makes the file 0600; an artifact gets the mode any new file would (umask),
        # so teammates sharing a results folder can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike[str], pattern: str = ".*.tmp*") -> int:
    """Delete the temporaries of :func:`atomic_path` in ``directory`` whose writer is dead.

    A live writer holds an exclusive ``flock`` on its temporary file; one killed with SIGKILL
    (or lost with its node) does not, and its half-written file would otherwise stay forever.
    Files whose lock cannot be tested (no lock support, already gone) are left alone.

    Args:
        directory: the folder to sweep.
        pattern: glob of the candidates (default: every atomic_path temporary).

    Returns:
        How many files were deleted.
    """
    removed = 0
    for candidate in Path(directory).glob(pattern):
        if candidate.is_symlink() or not candidate.is_file():
            continue  # e.g. the demo generator's temporary folders: not ours
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # vanished (its writer renamed it), a symlink, or unreadable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: its writer is alive (or locks are unsupported here)
        else:
            with contextlib.suppress(OSError):
                candidate.unlink(missing_ok=True)
                removed += 1
        finally:
            os.close(fd)
    return removed


def _umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_pattern(target: Path) -> str:
    """Glob of :func:`atomic_path`'s temporary names for ``target``."""
    return f".{glob.escape(target.name)}.*.tmp{glob.escape(target.suffix)}"


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Atomically write a UTF-8 text file."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], payload: Any) -> None:
    """Atomically write ``payload`` as indented, key-sorted JSON."""
    write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_parquet(
    target: str | os.PathLike[str], frame: pd.DataFrame, keep_attrs: bool = False
) -> None:
    """Atomically write a DataFrame as Parquet (index dropped).

    pandas stores ``frame.attrs`` in the file's key-value metadata, and copies them to every
    frame derived from one that has them (the manifest's data roots, :mod:`segflow.artifacts.tables`):
    they are written only with ``keep_attrs``, so a derived table does not embed them.
    """
    if frame.attrs and not keep_attrs:
        frame = frame.copy(deep=False)
        frame.attrs = {}
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(target: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """Atomically write a DataFrame as CSV (index dropped)."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)


def write_npy(target: str | os.PathLike[str], array: Any) -> None:
    """Atomically write ``array`` as ``.npy`` (what ``np.save`` writes); a failed write raises
    its ``OSError``.

    ``np.save`` into a real file writes through C ``fwrite`` and reports a full disk only as
    "N requested and M written", without an errno; through a Python file the ENOSPC surfaces.
    """
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array(
            _ErrorRecordingWriter(handle), np.asanyarray(array), allow_pickle=False
        )


def write_torch(target: str | os.PathLike[str], payload: Any) -> None:
    """Atomically ``torch.save`` ``payload``; a failed write raises its ``OSError``.

    ``torch.save`` reports a failed write (disk full) as an opaque ``RuntimeError`` ("enforce
    fail at inline_container.cc"); it writes through a Python file here whose errors are kept,
    so the real cause is raised instead.
    """
    import torch

    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        recorder = _ErrorRecordingWriter(handle)
        try:
            torch.save(payload, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


class _ErrorRecordingWriter:
    """A binary file wrapper that remembers the ``OSError`` of a failed write or flush."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        """Write ``data``; an ``OSError`` is kept, then re-raised."""
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        """Flush the file; an ``OSError`` is kept, then re-raised."""
        try:
            self.handle.flush()
        except OSError as error:
            self.error = error
            raise


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-space or over-quota failure."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _json_default(value: Any) -> Any:
    # numpy scalars and paths show up in summaries; make them plain JSON.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
