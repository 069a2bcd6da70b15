"""Tables one stage hands the next: ingest's manifest, dedup's items (Parquet), folds.csv."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from segflow.core.errors import SegflowError


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
