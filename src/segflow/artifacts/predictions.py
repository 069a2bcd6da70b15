"""Prediction folders (predict-oof/-test, evaluate-oof, blend, stack -> the stages after them).

Two shapes, each the only reader and writer of its files:

- a model's prediction (predict-oof, predict-test; a candidate's merged test prediction):
  ``ids.csv`` (id, orig_height, orig_width[, nonempty_prob_<k>...]) + ``probs.npy`` float16
  (N, K, H, W) at the original resolution, and with MC-dropout (``predict.mc_dropout_passes``)
  ``uncertainty.npy`` float16 (N, K, H, W), the per-pixel standard deviation of the passes;
- an OOF folder (evaluate-oof, and every second-level candidate): ``oof_ids.csv`` (plus a
  ``fold`` column) + ``oof_probs.npy`` float16 (N, K, H, W).

An image-level gate (an aux head's, or the stacked gate's) travels as the
``nonempty_prob_<k>`` columns of the ids tables: :func:`nonempty_column` names them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.atomic import write_csv, write_npy
from segflow.core.errors import SegflowError

IDS, PROBS = "ids.csv", "probs.npy"
UNCERTAINTY = "uncertainty.npy"
OOF_IDS, OOF_PROBS = "oof_ids.csv", "oof_probs.npy"
NONEMPTY_PREFIX = "nonempty_prob_"
FOLD_MERGES = ("mean", "gmean")


@dataclass(frozen=True)
class Prediction:
    """One candidate's probabilities with their ids table (row-aligned)."""

    ids: pd.DataFrame
    probs: np.ndarray  # (N, K, H, W)
    uncertainty: np.ndarray | None = None  # (N, K, H, W) MC-dropout standard deviation


def nonempty_column(k: int) -> str:
    """The ids.csv column holding class ``k``'s aux-head probability that the mask is non-empty."""
    return f"{NONEMPTY_PREFIX}{k}"


def gate_column_names(ids: pd.DataFrame) -> list[str]:
    """The ``nonempty_prob_<k>`` columns an ids table has."""
    return [c for c in ids.columns if c.startswith(NONEMPTY_PREFIX)]


def without_gates(ids: pd.DataFrame) -> pd.DataFrame:
    """``ids`` without its ``nonempty_prob_<k>`` columns."""
    return ids.drop(columns=gate_column_names(ids))


def with_gates(ids: pd.DataFrame, nonempty: np.ndarray) -> pd.DataFrame:
    """``ids`` with its ``nonempty_prob_<k>`` columns replaced by ``nonempty``.

    Shape:
        nonempty: (len(ids), K).
    """
    out = without_gates(ids)
    for k in range(nonempty.shape[1]):
        out[nonempty_column(k)] = nonempty[:, k]
    return out


def nonempty_probs(ids: pd.DataFrame, n_classes: int) -> np.ndarray | None:
    """The aux-head non-empty probabilities stored in an ids table, or None if it has none.

    Shape:
        output: (len(ids), n_classes) float32.
    """
    columns = [nonempty_column(k) for k in range(n_classes)]
    if not all(column in ids.columns for column in columns):
        return None
    return ids[columns].to_numpy(dtype=np.float32)


def merge_folds(fold_probs: Sequence[np.ndarray], how: str = "mean") -> np.ndarray:
    """Merge the test predictions of several fold models (arithmetic or geometric mean)."""
    if how not in FOLD_MERGES:
        raise KeyError(f"unknown fold merge {how!r}; valid: {', '.join(FOLD_MERGES)}")
    stacked = np.stack([np.asarray(p, dtype=np.float32) for p in fold_probs])
    if how == "mean":
        return stacked.mean(axis=0)
    return np.exp(np.log(np.clip(stacked, 1e-6, 1.0)).mean(axis=0))


def write_prediction(
    out_dir: str | os.PathLike[str],
    ids: pd.DataFrame,
    probs: np.ndarray,
    uncertainty: np.ndarray | None = None,
) -> None:
    """Write ``ids.csv`` and ``probs.npy`` (float16) atomically into ``out_dir``, and
    ``uncertainty.npy`` (float16) when given; without it a stale ``uncertainty.npy`` of an
    earlier run is removed, so the folder never pairs probabilities with another run's spread.

    Raises:
        SegflowError: an uncertainty map of another shape than ``probs``.
    """
    out_dir = Path(out_dir)
    if uncertainty is not None and np.shape(uncertainty) != np.shape(probs):
        raise SegflowError(
            f"{out_dir / UNCERTAINTY}: shape {np.shape(uncertainty)} differs from the "
            f"probabilities' {np.shape(probs)}"
        )
    write_npy(out_dir / PROBS, np.asarray(probs).astype(np.float16))
    if uncertainty is None:
        (out_dir / UNCERTAINTY).unlink(missing_ok=True)
    else:
        write_npy(out_dir / UNCERTAINTY, np.asarray(uncertainty).astype(np.float16))
    write_csv(out_dir / IDS, ids)


def read_prediction_ids(pred_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """A prediction folder's ``ids.csv``."""
    return pd.read_csv(Path(pred_dir) / IDS, dtype={"id": str})


def read_prediction(pred_dir: str | os.PathLike[str], mmap: bool = True) -> Prediction:
    """A prediction folder's ids and probabilities, and its MC-dropout ``uncertainty.npy`` when
    it has one (memory-mapped unless ``mmap`` is False)."""
    pred_dir = Path(pred_dir)
    ids = read_prediction_ids(pred_dir)
    mode = "r" if mmap else None
    probs = np.load(pred_dir / PROBS, mmap_mode=mode)
    path = pred_dir / UNCERTAINTY
    uncertainty = np.load(path, mmap_mode=mode) if path.is_file() else None
    if uncertainty is not None and uncertainty.shape != probs.shape:
        raise SegflowError(
            f"{path}: shape {uncertainty.shape} differs from {PROBS}'s {probs.shape}"
        )
    return Prediction(ids, probs, uncertainty)


def read_fold_predictions(dirs: Sequence[str | os.PathLike[str]], fold_merge: str) -> Prediction:
    """Test predictions of several folds (``ids.csv`` + ``probs.npy`` each), merged
    (:func:`merge_fold_predictions`).

    Raises:
        SegflowError: the folds' ids are not in the same order.
    """
    folds = [read_prediction(d) for d in dirs]
    return merge_fold_predictions(folds, fold_merge, ", ".join(map(str, dirs)))


def merge_fold_predictions(
    folds: Sequence[Prediction], fold_merge: str, where: str = "the folds"
) -> Prediction:
    """Several fold models' test predictions (as :func:`read_prediction` reads them) merged:
    probabilities by :func:`merge_folds` (stored as float16), the aux-head
    ``nonempty_prob_<k>`` columns averaged over the folds that have them all, and the
    MC-dropout uncertainty maps averaged when every fold has one (the folds' mean spread, not
    the spread of the merged prediction).

    Args:
        folds: the fold models' predictions, row-aligned.
        fold_merge: ``mean`` or ``gmean``.
        where: names the predictions in the error message (their folders).

    Raises:
        SegflowError: the folds' ids are not in the same order.
    """
    frames = [fold.ids for fold in folds]
    if any(not frame["id"].equals(frames[0]["id"]) for frame in frames):
        raise SegflowError(f"test predictions in {where} differ in id order")
    probs = merge_folds([fold.probs for fold in folds], fold_merge)
    ids = frames[0][["id", "orig_height", "orig_width"]].copy()
    gates = gate_column_names(frames[0])
    if gates and all(set(gates) <= set(frame.columns) for frame in frames):
        for column in gates:
            ids[column] = np.mean([frame[column].to_numpy() for frame in frames], axis=0)
    spreads = [fold.uncertainty for fold in folds if fold.uncertainty is not None]
    uncertainty = None
    if spreads and len(spreads) == len(folds):
        uncertainty = merge_folds(spreads, "mean").astype(np.float16)
    return Prediction(ids, probs.astype(np.float16), uncertainty)


def as_stored(prediction: Prediction) -> Prediction:
    """``prediction`` as :func:`read_prediction` reads it back after :func:`write_prediction`:
    float16 probabilities, the ids table through its CSV text (for in-memory predictions that
    must equal the pipeline's stored ones, e.g. ``segflow predict-bundle``)."""
    buffer = io.StringIO()
    prediction.ids.to_csv(buffer, index=False)
    buffer.seek(0)
    ids = pd.read_csv(buffer, dtype={"id": str})
    uncertainty = prediction.uncertainty
    return Prediction(
        ids,
        np.asarray(prediction.probs).astype(np.float16),
        None if uncertainty is None else np.asarray(uncertainty).astype(np.float16),
    )


def read_oof(oof_dir: str | os.PathLike[str]) -> Prediction:
    """An evaluate-oof style folder: ``oof_ids.csv`` + ``oof_probs.npy`` (memory-mapped).

    Raises:
        SegflowError: a file missing, or ids and probabilities of different lengths.
    """
    oof_dir = Path(oof_dir)
    for name in (OOF_IDS, OOF_PROBS):
        if not (oof_dir / name).is_file():
            raise SegflowError(f"{oof_dir / name} does not exist (run evaluate-oof first)")
    ids = pd.read_csv(oof_dir / OOF_IDS, dtype={"id": str})
    probs = np.load(oof_dir / OOF_PROBS, mmap_mode="r")
    if len(ids) != len(probs):
        raise SegflowError(f"{oof_dir}: {len(ids)} ids but {len(probs)} OOF predictions")
    return Prediction(ids, probs)


def write_oof(oof_dir: str | os.PathLike[str], ids: pd.DataFrame, probs: np.ndarray) -> None:
    """Write ``oof_probs.npy`` (float16) and ``oof_ids.csv`` (with its fold column)."""
    oof_dir = Path(oof_dir)
    write_npy(oof_dir / OOF_PROBS, np.asarray(probs, dtype=np.float16))
    write_csv(oof_dir / OOF_IDS, ids)
