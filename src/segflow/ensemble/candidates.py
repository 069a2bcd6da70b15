"""Second-level candidates on files: each is written in an experiment's layout.

Each candidate (the ensemble, the stacked gate, the pixel blender) is written as an
experiment's evaluate-oof output (``oof/<name>/round<r>``: OOF arrays, ids, ``metrics.json``;
its fit stage: blend, stack) plus a fold-merged test prediction (``test/<name>/round<r>``; its
apply stage: apply-blend, apply-stack), so the post-processing tuner,
the submission writer and the final choice treat every candidate alike. An image-level gate
travels as the ``nonempty_prob_<k>`` columns of the ids tables, the same columns an aux head
writes (:mod:`segflow.artifacts.predictions`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.predictions import Prediction, write_oof
from segflow.core.atomic import write_csv, write_json
from segflow.core.errors import SegflowError
from segflow.model.metrics import score_oof


def write_oof_candidate(
    oof_dir: str | os.PathLike[str],
    oof: Prediction,
    folds: pd.DataFrame,
    truths: np.ndarray,
    classes: Sequence[str],
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a candidate's OOF side as evaluate-oof does: arrays, ids, ``metrics.csv`` and
    ``metrics.json`` (its test side is one :func:`segflow.artifacts.predictions.write_prediction`
    of the apply stage).

    Returns:
        The OOF summary written to ``metrics.json``.
    """
    oof_dir = Path(oof_dir)
    fold_of = folds.set_index("id").loc[oof.ids["id"], "fold"].to_numpy()
    table, summary = score_oof(np.asarray(oof.probs), truths, fold_of, classes)
    summary.update(extra_metrics or {})
    write_oof(oof_dir, oof.ids.assign(fold=fold_of), oof.probs)
    write_csv(oof_dir / "metrics.csv", table)
    write_json(oof_dir / "metrics.json", summary)
    return summary


def check_aligned(predictions: Sequence[Prediction], names: Sequence[str], what: str) -> None:
    """Every experiment must predict the same ids in the same order and shape."""
    first = predictions[0]
    for name, prediction in zip(names, predictions, strict=True):
        if not prediction.ids["id"].equals(first.ids["id"]):
            raise SegflowError(f"{what} of {name} and {names[0]} cover different ids")
        if prediction.probs.shape != first.probs.shape:
            raise SegflowError(
                f"{what} of {name} have shape {prediction.probs.shape}, "
                f"{names[0]} {first.probs.shape}"
            )


def json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """A dict through json (NaN -> None), for summaries built from numpy values."""
    return json.loads(json.dumps(values, default=float).replace("NaN", "null"))
