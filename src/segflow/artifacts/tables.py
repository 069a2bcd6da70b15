"""Tables one stage hands the next: ingest's manifest, dedup's items (Parquet), folds.csv; and
what the manifest records about itself as a whole, and reading its paths back safely.

Ingest validates every file it lists against a data root (``data.data_root``, or else each data
folder on its own) and records, in the table's ``attrs`` (pandas stores them in the Parquet
file's key-value metadata, so they travel with the manifest file and with the DataFrame
``ingest`` returns):

* the resolved roots it validated against (:func:`data_roots`), so that every later stage
  reading an image or mask path back from the manifest resolves it with
  :func:`resolve_manifest_path`, which refuses a path that leads outside them (``..``, an
  absolute path elsewhere, a symlink leading out): a manifest edited by hand or by a tool
  cannot make a stage read, hash or copy files outside the data;
* how the RLE CSV wrote its ids (:func:`csv_id_style`): file stems (``0002cc93b``, TGS) or file
  names (``0002cc93b.jpg``, Severstal, Airbus), which the submission follows by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from segflow.core.errors import SegflowError
from segflow.formats.labels import CLASS_SEPARATOR

# The manifest's ``attrs`` keys (see the module docstring) and the CSV id styles.
ROOTS_KEY = "segflow_data_roots"
ID_STYLE_KEY = "segflow_csv_id_style"
ID_STYLES = ("stem", "filename")


def read_table(path: str | os.PathLike[str], role: str) -> pd.DataFrame:
    """Read a Parquet artifact of an earlier stage, with a clear error if it is not there.

    Args:
        path: the Parquet file (ingest's manifest, dedup's items).
        role: what it is, for the message (e.g. ``"manifest"``).

    Returns:
        The table.

    Raises:
        SegflowError: the file is missing or not readable Parquet.
    """
    if not Path(path).is_file():
        raise SegflowError(f"{role} {path} does not exist (run the earlier stage first)")
    try:
        return pd.read_parquet(path)
    except Exception as error:
        raise SegflowError(f"{role} {path} is not a readable Parquet file ({error})") from None


def read_folds(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The folds stage's ``folds.csv`` (``id`` read as text, ``fold`` an integer).

    Args:
        path: folds.csv.

    Returns:
        The folds table, in file order.
    """
    return pd.read_csv(path, dtype={"id": str})


def record_attributes(
    manifest: pd.DataFrame, roots: Iterable[str | Path], csv_id_style: str | None
) -> pd.DataFrame:
    """Record the data roots and the CSV id style on ``manifest`` (in place; also returned).

    Args:
        manifest: the manifest ingest built.
        roots: resolved folders every image and mask path was validated to lie in.
        csv_id_style: ``stem`` or ``filename`` for an RLE CSV source, None without one.

    Returns:
        ``manifest`` itself.

    Raises:
        SegflowError: an unknown id style (a bug, not bad input).
    """
    if csv_id_style is not None and csv_id_style not in ID_STYLES:
        raise SegflowError(f"unknown CSV id style {csv_id_style!r}; valid: {', '.join(ID_STYLES)}")
    # Sorted and de-duplicated: the same data and config give the same manifest bytes.
    manifest.attrs[ROOTS_KEY] = sorted({str(root) for root in roots})
    if csv_id_style is not None:
        manifest.attrs[ID_STYLE_KEY] = csv_id_style
    return manifest


def data_roots(manifest: pd.DataFrame) -> tuple[Path, ...]:
    """The resolved roots ingest validated the manifest's paths against; () if none recorded."""
    return tuple(Path(root) for root in manifest.attrs.get(ROOTS_KEY, ()))


def csv_id_style(manifest: pd.DataFrame) -> str:
    """How the train RLE CSV wrote its ids: ``filename`` or ``stem`` (also without a CSV)."""
    return str(manifest.attrs.get(ID_STYLE_KEY, "stem"))


def resolve_manifest_path(
    value: object, column: str, item_id: str, roots: Sequence[Path], n_parts: int = 1
) -> object:
    """A path column's value with every path resolved and checked to lie under ``roots``.

    Every stage that opens a file named by the manifest goes through here and then opens the
    resolved path (so a symlink swapped after the check is not followed either).

    Args:
        value: the manifest's ``image_path`` or ``mask_path`` value (str, or None/NaN: no file).
        column: its column name, for messages.
        item_id: the manifest row's id, for messages.
        roots: :func:`data_roots` of the manifest.
        n_parts: ``|``-separated paths in the value (multi-label ``mask_path``: one per class,
            "" where the class has no file); 1 uses the value whole.

    Returns:
        The value with each path replaced by its resolved form; a non-string value unchanged.

    Raises:
        SegflowError: a path leads outside every root, or the manifest records no roots (made
            by an older segflow, or not by ingest).
    """
    if not isinstance(value, str):
        return value
    parts = value.split(CLASS_SEPARATOR) if n_parts > 1 else [value]
    resolved = [_resolve(part, column, item_id, roots) if part else "" for part in parts]
    if n_parts > 1 and any(CLASS_SEPARATOR in part for part in resolved):
        raise SegflowError(
            f"manifest row {item_id!r}: {column} {value!r} resolves to a path containing "
            f"{CLASS_SEPARATOR!r}, which cannot be split per class; rename the file or folder"
        )
    return CLASS_SEPARATOR.join(resolved)


def _resolve(path: str, column: str, item_id: str, roots: Sequence[Path]) -> str:
    """One path resolved (symlinks, ``..``; a relative path against the working folder) and
    checked to lie under one of ``roots``."""
    where = f"manifest row {item_id!r}: {column} {path!r}"
    if not roots:
        raise SegflowError(
            f"{where}: the manifest records no data roots to check it against (written by an "
            "older segflow, or not by ingest); rerun segflow ingest"
        )
    try:
        target = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
        raise SegflowError(f"{where} cannot be resolved ({error}); rerun segflow ingest") from None
    if not any(target.is_relative_to(root) for root in roots):
        raise SegflowError(
            f"{where} leads to {target}, outside the data roots ingest recorded "
            f"({', '.join(map(str, roots))}); the manifest or the data changed since ingest: rerun "
            "segflow ingest"
        )
    return str(target)
