"""tune-postprocess's per-image OOF scores (``image_scores.parquet``), which choose reads.

One row per OOF image, in the OOF folder's order: ``id``, ``tuned`` (the candidate's tuned
post-processing scored with the tuning metric, the mean over classes: the images' mean is
``params.json``'s score) and one column per constant prediction (:data:`CONSTANTS`: all-empty
and all-foreground, every class, scored with the same metric). choose compares them
(:func:`segflow.model.diagnostics.constant_check`) without reading masks or predictions, so
an edit of the post-processing or the metrics reruns the tuner, and choose only through the
table the tuner writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.atomic import write_parquet
from segflow.core.errors import SegflowError

IMAGE_SCORES_FILE = "image_scores.parquet"
CONSTANTS = ("all_empty", "all_foreground")
"""The constant predictions, in tie order (all-empty first), and their columns."""
TUNED = "tuned"


def write_image_scores(
    out_dir: str | os.PathLike[str],
    ids: Sequence[str],
    tuned: np.ndarray,
    constants: Mapping[str, np.ndarray],
) -> Path:
    """Write ``image_scores.parquet`` into ``out_dir`` (tune-postprocess's folder).

    Args:
        out_dir: the candidate's post-processing folder.
        ids: the OOF images' ids, in the OOF folder's order.
        tuned: per-image scores of the tuned prediction.
        constants: per-image scores of each of :data:`CONSTANTS`.

    Returns:
        The written file.

    Raises:
        SegflowError: a constant missing or an array whose length is not the number of ids.

    Shape:
        tuned and each constant: (len(ids),).
    """
    columns = {"id": [str(item_id) for item_id in ids], TUNED: tuned}
    columns |= {name: constants[name] for name in CONSTANTS if name in constants}
    for name in (TUNED, *CONSTANTS):
        if name not in columns or len(columns[name]) != len(columns["id"]):
            raise SegflowError(f"image scores: {name!r} must have one value per image")
    path = Path(out_dir) / IMAGE_SCORES_FILE
    frame = pd.DataFrame(
        {k: v if k == "id" else np.asarray(v, np.float64) for k, v in columns.items()}
    )
    write_parquet(path, frame)
    return path


def read_image_scores(out_dir: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read ``image_scores.parquet`` from a candidate's post-processing folder.

    Returns:
        (the tuned per-image scores, :data:`CONSTANTS` -> per-image scores), float64.

    Raises:
        SegflowError: the file is missing, unreadable or lacks a column.
    """
    path = Path(out_dir) / IMAGE_SCORES_FILE
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run tune-postprocess first)")
    try:
        frame = pd.read_parquet(path)
    except Exception as error:
        raise SegflowError(f"{path} is not a readable Parquet file ({error})") from None
    missing = [name for name in ("id", TUNED, *CONSTANTS) if name not in frame.columns]
    if missing:
        raise SegflowError(
            f"{path} lacks the columns {', '.join(missing)} (rerun tune-postprocess)"
        )
    tuned = frame[TUNED].to_numpy(np.float64)
    return tuned, {name: frame[name].to_numpy(np.float64) for name in CONSTANTS}
