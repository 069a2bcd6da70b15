"""Second-level stages on files: the experiments' OOF/test predictions in, candidates out.

Each candidate (the ensemble, the stacked gate, the pixel blender) is written in the same layout
as an experiment's evaluate-oof output (``oof_probs.npy`` float16 (N, K, H, W), ``oof_ids.csv``,
``metrics.json``) plus a fold-merged test prediction (``probs.npy``, ``ids.csv``), so the
post-processing tuner, the submission writer and the final choice treat every candidate alike.
An image-level gate travels as the ``nonempty_prob_<k>`` columns of the ids tables, the same
columns an aux head writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.atomic import write_csv, write_json, write_npy
from segflow.errors import SegflowError
from segflow.evaluate import class_truths, original_truths, score_oof
from segflow.predict import merge_folds, nonempty_column

log = logging.getLogger(__name__)

# Images whose masks are read and scored at once: bounds memory on large OOF sets.
CHUNK = 256


@dataclass(frozen=True)
class Prediction:
    """One candidate's probabilities with their ids table (row-aligned)."""

    ids: pd.DataFrame
    probs: np.ndarray  # (N, K, H, W)


def load_oof(oof_dir: str | os.PathLike[str]) -> Prediction:
    """An evaluate-oof style folder: ``oof_ids.csv`` + ``oof_probs.npy`` (memory-mapped)."""
    oof_dir = Path(oof_dir)
    for name in ("oof_ids.csv", "oof_probs.npy"):
        if not (oof_dir / name).is_file():
            raise SegflowError(f"{oof_dir / name} does not exist (run evaluate-oof first)")
    ids = pd.read_csv(oof_dir / "oof_ids.csv", dtype={"id": str})
    probs = np.load(oof_dir / "oof_probs.npy", mmap_mode="r")
    if len(ids) != len(probs):
        raise SegflowError(f"{oof_dir}: {len(ids)} ids but {len(probs)} OOF predictions")
    return Prediction(ids, probs)


def load_test(dirs: Sequence[str | os.PathLike[str]], fold_merge: str) -> Prediction:
    """Test predictions of several folds (``ids.csv`` + ``probs.npy`` each), merged.

    Aux-head ``nonempty_prob_<k>`` columns are averaged over the folds that have them all.
    """
    frames = [pd.read_csv(Path(d) / "ids.csv", dtype={"id": str}) for d in dirs]
    if any(not frame["id"].equals(frames[0]["id"]) for frame in frames):
        raise SegflowError(f"test predictions in {', '.join(map(str, dirs))} differ in id order")
    probs = merge_folds([np.load(Path(d) / "probs.npy", mmap_mode="r") for d in dirs], fold_merge)
    ids = frames[0][["id", "orig_height", "orig_width"]].copy()
    gate_columns = [c for c in frames[0].columns if c.startswith("nonempty_prob_")]
    if gate_columns and all(set(gate_columns) <= set(frame.columns) for frame in frames):
        for column in gate_columns:
            ids[column] = np.mean([frame[column].to_numpy() for frame in frames], axis=0)
    return Prediction(ids, probs.astype(np.float16))


def write_candidate(
    oof_dir: str | os.PathLike[str],
    test_dir: str | os.PathLike[str],
    oof: Prediction,
    test: Prediction,
    folds: pd.DataFrame,
    truths: np.ndarray,
    classes: Sequence[str],
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a candidate's OOF (with metrics, as evaluate-oof does) and its test prediction.

    Returns:
        The OOF summary written to ``metrics.json``.
    """
    oof_dir, test_dir = Path(oof_dir), Path(test_dir)
    fold_of = folds.set_index("id").loc[oof.ids["id"], "fold"].to_numpy()
    table, summary = score_oof(np.asarray(oof.probs), truths, fold_of, classes)
    summary.update(extra_metrics or {})
    write_npy(oof_dir / "oof_probs.npy", np.asarray(oof.probs, dtype=np.float16))
    write_csv(oof_dir / "oof_ids.csv", oof.ids.assign(fold=fold_of))
    write_csv(oof_dir / "metrics.csv", table)
    write_json(oof_dir / "metrics.json", summary)
    write_npy(test_dir / "probs.npy", np.asarray(test.probs, dtype=np.float16))
    write_csv(test_dir / "ids.csv", test.ids)
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


def oof_truths(
    manifest: pd.DataFrame, dedup_items: pd.DataFrame, ids: pd.Series, n_classes: int
) -> np.ndarray:
    """Packed true label masks of the OOF ids at the original resolution."""
    return original_truths(manifest, dedup_items, ids, n_classes)


def gate_columns(ids: pd.DataFrame, nonempty: np.ndarray) -> pd.DataFrame:
    """``ids`` with its ``nonempty_prob_<k>`` columns replaced by ``nonempty`` (N, K)."""
    out = ids.drop(columns=[c for c in ids.columns if c.startswith("nonempty_prob_")])
    for k in range(nonempty.shape[1]):
        out[nonempty_column(k)] = nonempty[:, k]
    return out


def json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """A dict through json (NaN -> None), for summaries built from numpy values."""
    return json.loads(json.dumps(values, default=float).replace("NaN", "null"))


def run_blend(
    names: Sequence[str],
    oof: Sequence[Prediction],
    test: Sequence[Prediction],
    truths: np.ndarray,
    folds: pd.DataFrame,
    classes: Sequence[str],
    metric: str,
    step: float,
) -> tuple[Prediction, Prediction, dict[str, Any], pd.DataFrame]:
    """Tune the experiments' blend weights on OOF and apply them to OOF and test.

    Returns:
        (blended OOF, blended test, weights summary, the table of single / mean / tuned).
    """
    from segflow.ensemble import blend, blend_nonempty, tune_weights
    from segflow.predict import nonempty_probs

    check_aligned(oof, names, "OOF predictions")
    check_aligned(test, names, "test predictions")
    weights, table = tune_weights(
        [p.probs for p in oof], truths, classes, metric=metric, step=step, names=names
    )

    def blended(predictions: Sequence[Prediction]) -> Prediction:
        ids = predictions[0].ids.drop(
            columns=[c for c in predictions[0].ids.columns if c.startswith("nonempty_prob_")]
        )
        heads = [nonempty_probs(p.ids, len(classes)) for p in predictions]
        gate = blend_nonempty(heads, weights)
        if gate is not None:
            ids = gate_columns(ids, gate)
        return Prediction(ids, blend([p.probs for p in predictions], weights))

    summary = {
        "metric": metric,
        "step": step,
        "weights": {name: float(w) for name, w in zip(names, weights, strict=True)},
        "table": table.to_dict("records"),
    }
    return blended(oof), blended(test), json_ready(summary), table


def select_pseudo_stage(
    test: Prediction,
    tuned: dict[str, Any],
    classes: Sequence[str],
    dedup_items: pd.DataFrame,
    options: Any,
    size: tuple[int, int],
    offsets: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Select pseudo-labels from a round's final test prediction and build their targets.

    Args:
        test: the fold-merged (ensemble) test prediction at the original resolution.
        tuned: its tuned post-processing (``params.json``), applied to make hard labels.
        classes: class names in bit order.
        dedup_items: dedup's items table (test duplicates of train images are excluded).
        options: :class:`segflow.pseudo.PseudoOptions`.
        size: the preprocessed (height, width) the targets are stored at.
        offsets: test id -> (top, left) padding when preprocess reflect-padded the images
            (``resize_mode: pad``, the index's ``pad_top``/``pad_left``): the targets are
            padded the same way; None: they are resized, as the images were.

    Returns:
        (selection table, targets at the preprocessed size, summary). Targets are packed
        labels (S, h, w) for hard labels, float16 (S, K, h, w) for soft ones.
    """
    from segflow.postprocess import apply_classes, params_from_summary
    from segflow.predict import nonempty_probs
    from segflow.pseudo import pseudo_targets, select_pseudo, train_duplicates
    from segflow.resolution import from_original

    selection = select_pseudo(test.ids, test.probs, options, train_duplicates(dedup_items))
    # select_pseudo sorts by id; keep the targets in that order.
    position = pd.Series(np.arange(len(test.ids)), index=test.ids["id"])
    rows = position.loc[selection.loc[selection["selected"], "id"]].to_numpy()
    probs = np.asarray(test.probs[rows], dtype=np.float32)
    nonempty = nonempty_probs(test.ids, len(classes))
    masks = apply_classes(
        probs, params_from_summary(tuned, classes), None if nonempty is None else nonempty[rows]
    )
    targets = pseudo_targets(probs, masks, options)
    height, width = size
    selected_ids = selection.loc[selection["selected"], "id"].tolist()
    placed = [None if offsets is None else tuple(offsets[i]) for i in selected_ids]
    hard = options.labels == "hard"
    if hard:
        resized = np.zeros((len(targets), height, width), targets.dtype)
    else:
        resized = np.zeros((len(targets), len(classes), height, width), np.float16)
    for i, (target, offset) in enumerate(zip(targets, placed, strict=True)):
        resized[i] = from_original(target, size, offset, labels=hard)
    summary = {
        "n_test": len(selection),
        "n_selected": int(selection["selected"].sum()),
        # "duplicate of train <ids>" counts as one reason, whatever the ids.
        "reasons": selection["reason"]
        .str.replace(r"^duplicate of train.*", "duplicate of train", regex=True)
        .value_counts()
        .to_dict(),
        "labels": options.labels,
        "mean_confidence_selected": float(selection.loc[selection["selected"], "confidence"].mean())
        if selection["selected"].any()
        else None,
    }
    return selection, resized, json_ready(summary)


def stage_table(
    candidates: Sequence[tuple[str, int]], results_dir: str | os.PathLike[str]
) -> pd.DataFrame:
    """OOF scores of every candidate: raw (threshold 0.5) Kaggle metric and Dice, the tuned
    score, and each one's change against the best single experiment of round 0.

    Args:
        candidates: (name, round) pairs, as the workflow lists them.
        results_dir: the workflow's results folder.

    Returns:
        One row per candidate: stage, candidate, round, kaggle, dice, tuned_metric, tuned,
        delta_tuned (vs the baseline), baseline (bool).
    """
    root = Path(results_dir)
    rows = []
    for name, round_ in candidates:
        metrics = json.loads((root / "oof" / name / f"round{round_}" / "metrics.json").read_text())
        tuned = json.loads(
            (root / "postprocess" / name / f"round{round_}" / "params.json").read_text()
        )
        stage = name if name in ("ensemble", "stack_gate", "stack_pixel") else "experiment"
        if round_ > 0 and stage in ("experiment", "ensemble"):
            stage = f"{stage} (pseudo round {round_})"
        rows.append(
            {
                "stage": stage,
                "candidate": name,
                "round": round_,
                "kaggle": metrics["kaggle"],
                "dice": metrics["dice"],
                "tuned_metric": tuned["metric"],
                "tuned": tuned["score"],
            }
        )
    table = pd.DataFrame(rows)
    singles = table[(table["stage"] == "experiment") & (table["round"] == 0)]
    baseline = float(singles["tuned"].max()) if len(singles) else float(table["tuned"].iloc[0])
    table["delta_tuned"] = table["tuned"] - baseline
    table["baseline"] = False
    if len(singles):
        table.loc[singles["tuned"].idxmax(), "baseline"] = True
    return table


def tuned_scores(
    oof: Prediction, summary: dict[str, Any], classes: Sequence[str], truths: np.ndarray
) -> np.ndarray:
    """Per-image scores of a candidate's OOF prediction after its tuned post-processing, with
    the tuning metric, the mean over classes (their mean is ``params.json``'s score).

    Args:
        oof: the candidate's OOF prediction (rows aligned with ``truths``).
        summary: its ``params.json`` (metric and per-class parameters).
        classes: class names in bit order.
        truths: packed true label masks.

    Returns:
        float64 scores.

    Shape:
        oof.probs: (N, K, H, W); truths: (N, H, W); output: (N,).
    """
    from segflow.metrics import get_metric
    from segflow.postprocess import apply_classes, params_from_summary
    from segflow.predict import nonempty_probs

    metric = get_metric(str(summary["metric"]))
    masks = apply_classes(
        np.asarray(oof.probs),
        params_from_summary(summary, classes),
        nonempty_probs(oof.ids, len(classes)),
    )
    per_class = [metric(masks[:, k] != 0, class_truths(truths, k)) for k in range(len(classes))]
    return np.mean(per_class, axis=0)


def constant_baselines(table: pd.DataFrame, results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The stage table with each candidate's tuned OOF score against constant predictions.

    Adds :data:`segflow.diagnostics.CONSTANT_COLUMNS`: the all-empty and all-foreground
    predictions' OOF scores with the candidate's tuning metric, the mean per-image gain of the
    tuned prediction over the better one, its noise margin and whether the candidate is within
    it (:func:`segflow.diagnostics.constant_check`). The true masks come from the results
    folder's manifest and dedup items, read in chunks of images (once for candidates that share
    their OOF ids).

    Args:
        table: :func:`stage_table`'s table.
        results_dir: the workflow's results folder.

    Returns:
        A copy of ``table`` with the extra columns.
    """
    from segflow.diagnostics import constant_check, constant_columns, constant_scores
    from segflow.preprocess import mask_sources

    root = Path(results_dir)
    manifest = _read_parquet(root / "ingest" / "manifest.parquet")
    dedup_items = _read_parquet(root / "dedup" / "items.parquet")
    sources = mask_sources(manifest, dedup_items)
    groups: dict[tuple[str, ...], list[int]] = {}
    loaded = []
    for row in table.itertuples():
        folder = f"round{row.round}"
        oof = load_oof(root / "oof" / row.candidate / folder)
        metrics = json.loads((root / "oof" / row.candidate / folder / "metrics.json").read_text())
        tuned = json.loads(
            (root / "postprocess" / row.candidate / folder / "params.json").read_text()
        )
        loaded.append((oof, tuned, [str(c) for c in metrics.get("classes", ["mask"])]))
        groups.setdefault(tuple(oof.ids["id"]), []).append(len(loaded) - 1)
    columns: list[dict[str, Any]] = [{} for _ in loaded]
    for ids, members in groups.items():
        n_classes = len(loaded[members[0]][2])
        scores: dict[int, list[np.ndarray]] = {i: [] for i in members}
        areas, pixels = [], 0
        for start in range(0, len(ids), CHUNK):
            part = slice(start, start + CHUNK)
            truths = original_truths(manifest, dedup_items, list(ids[part]), n_classes, sources)
            pixels = truths.shape[1] * truths.shape[2]
            areas.append(
                np.stack([class_truths(truths, k).sum(axis=(1, 2)) for k in range(n_classes)], 1)
            )
            for i in members:
                oof, tuned, classes = loaded[i]
                chunk = Prediction(oof.ids.iloc[part], oof.probs[part])
                scores[i].append(tuned_scores(chunk, tuned, classes, truths))
        for i in members:
            metric = str(loaded[i][1]["metric"])
            constants = constant_scores(np.concatenate(areas), pixels, metric)
            check = constant_check(np.concatenate(scores[i]), constants, metric)
            columns[i] = constant_columns(check)
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(columns)], axis=1)


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run the workflow's ingest and dedup first)")
    return pd.read_parquet(path)


def choose_candidate(table: pd.DataFrame, forced: str | None = None) -> pd.Series:
    """The candidate whose submission is final: ``forced`` ("name:round"), else the best tuned
    OOF score (ties go to the simpler, earlier-listed candidate)."""
    if forced:
        name, _, round_ = forced.partition(":")
        match = table[(table["candidate"] == name) & (table["round"] == int(round_ or 0))]
        if match.empty:
            raise SegflowError(
                f"submit_experiment {forced!r} is not a candidate; candidates: "
                + ", ".join(f"{r.candidate}:{r.round}" for r in table.itertuples())
            )
        return match.iloc[0]
    best = table["tuned"].round(12).max()
    return table[table["tuned"].round(12) == best].iloc[0]


def markdown_table(table: pd.DataFrame) -> str:
    """The stage table as GitHub Markdown (no extra dependency); with
    :func:`constant_baselines`' columns, the two constant predictions' scores and the noise
    margin follow; a candidate whose gain over the better constant is within noise is marked
    ``near constant``."""
    columns = ["stage", "candidate", "round", "kaggle", "dice", "tuned", "delta_tuned"]
    if "near_constant" in table.columns:
        columns += ["const_empty", "const_full", "gain_vs_constant", "noise"]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in table.itertuples():
        cells = []
        for column in columns:
            value = getattr(row, column)
            if column == "delta_tuned":
                cells.append("baseline" if row.baseline else f"{value:+.4f}")
            elif column == "gain_vs_constant":
                near = " near constant" if str(row.near_constant) == "True" else ""
                cells.append(f"{value:+.4f}{near}")
            elif isinstance(value, float):
                cells.append(f"{value:.4f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Prediction",
    "check_aligned",
    "choose_candidate",
    "class_truths",
    "constant_baselines",
    "gate_columns",
    "json_ready",
    "load_oof",
    "load_test",
    "markdown_table",
    "oof_truths",
    "run_blend",
    "select_pseudo_stage",
    "stage_table",
    "tuned_scores",
    "write_candidate",
]
