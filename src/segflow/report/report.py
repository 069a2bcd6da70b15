"""One self-contained HTML page of a finished workflow run (``results/report/report.html``).

Everything is read from the results folder's fixed layout; the candidates (experiments, the
ensemble, the stacked models, per round) come from ``final/stages.csv``, so the report shows
exactly what the final choice compared. Figures are PNGs embedded as base64 ``data:`` URIs and
the style sheet is inline: the file opens offline, with no external resource. Every text taken
from an artifact or the config is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts import arrays, layout
from segflow.artifacts.arrays import classes_of
from segflow.artifacts.predictions import OOF_IDS, OOF_PROBS, nonempty_probs
from segflow.artifacts.tables import data_roots, resolve_manifest_path
from segflow.artifacts.truths import class_truths, mask_sources, original_truths
from segflow.core.atomic import write_text
from segflow.core.errors import SegflowError
from segflow.core.stage_args import PROVENANCE_KEY, stage_log
from segflow.formats.imageio import (
    DicomWindow,
    add_dicom_window_arguments,
    decode_image,
    dicom_window_from_args,
)
from segflow.model import diagnostics
from segflow.model.metrics import per_image_scores
from segflow.model.postprocess import apply_classes, params_from_summary
from segflow.report import figures as report_figures
from segflow.report.search_section import search_section
from segflow.report.summary import oof_coverage, oof_folds

SECOND_LEVEL = ("ensemble", "stack_gate", "stack_pixel")
# Images scored per chunk for the example cases: bounds memory on large OOF arrays.
CHUNK = 256

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { border-bottom: 2px solid #446; } h2 { margin-top: 2em; border-bottom: 1px solid #99a; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbc; padding: 3px 8px; text-align: right; }
th { background: #eef; } td.text { text-align: left; }
tr.chosen td { background: #dfd; font-weight: bold; }
img { display: block; max-width: 100%; margin: 0.6em 0; }
nav a { margin-right: 1em; } .note { color: #555; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Candidate:
    """One scored candidate of the final choice: an experiment or a second-level stage, per round."""

    name: str
    round: int

    @property
    def label(self) -> str:
        return f"{self.name} round {self.round}"

    @property
    def is_experiment(self) -> bool:
        return self.name not in SECOND_LEVEL


def escape(value: Any) -> str:
    """``value`` as HTML text (quotes escaped too, so it is also safe in attributes)."""
    return html.escape(str(value), quote=True)


def _format(value: Any, digits: int) -> str:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def html_table(
    frame: pd.DataFrame, digits: int = 4, highlight: Sequence[bool] | None = None
) -> str:
    """A DataFrame as an HTML table, every header and cell escaped.

    Args:
        frame: the table (index ignored).
        digits: decimals of float cells.
        highlight: per row, whether to mark it (class ``chosen``).

    Returns:
        The ``<table>`` element.
    """
    head = "".join(f"<th>{escape(column)}</th>" for column in frame.columns)
    rows = []
    for i, record in enumerate(frame.itertuples(index=False)):
        cells = "".join(
            f'<td class="text">{escape(value)}</td>'
            if isinstance(value, str)
            else f"<td>{escape(_format(value, digits))}</td>"
            for value in record
        )
        marked = ' class="chosen"' if highlight is not None and highlight[i] else ""
        rows.append(f"<tr{marked}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def png_img(png: bytes, alt: str) -> str:
    """An ``<img>`` embedding PNG bytes as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _section(anchor: str, title: str, body: Iterable[str]) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{"".join(body)}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _require(path: Path) -> Path:
    if not path.is_file():
        raise SegflowError(f"{path} does not exist (run the workflow up to choose first)")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(_require(path).read_text())
    except json.JSONDecodeError as error:
        raise SegflowError(f"{path} is not valid JSON ({error})") from None


def _read_csv(path: Path, **options: Any) -> pd.DataFrame:
    return pd.read_csv(_require(path), **options)


def _read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(_require(path))


def candidates_from_stages(stages: pd.DataFrame) -> list[Candidate]:
    """The candidates of ``final/stages.csv`` in its order.

    Raises:
        SegflowError: the table lacks the candidate or round column.
    """
    if not {"candidate", "round"} <= set(stages.columns):
        raise SegflowError("final/stages.csv has no candidate and round columns")
    return [Candidate(str(r.candidate), int(r.round)) for r in stages.itertuples()]


def per_image_kaggle(predictions: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """The Kaggle (TGS) score of every image, the mean over classes for multi-label data.

    Args:
        predictions: post-processed masks, one plane per class ({0, 1}).
        truths: packed label masks (bit k = class k).

    Returns:
        float64 scores.

    Shape:
        predictions: (N, K, H, W); truths: (N, H, W); output: (N,).
    """
    per_class = [
        per_image_scores(predictions[:, k] != 0, class_truths(truths, k))["kaggle"]
        for k in range(predictions.shape[1])
    ]
    return np.mean(per_class, axis=0)


def pick_cases(scores: np.ndarray, areas: np.ndarray) -> dict[str, int]:
    """Indices of the best, median and worst image by score.

    Ties at the best and worst go to the image with the most true and predicted foreground
    (empty-vs-empty scores a perfect 1 but shows nothing); the median is the middle of the
    score order (ties by index). An index already shown is not repeated.

    Args:
        scores: per-image scores.
        areas: per-image true plus predicted foreground pixels.

    Returns:
        ``{"best": i, "median": j, "worst": k}`` minus repeats (fewer keys on tiny inputs).

    Shape:
        scores, areas: (N,), N >= 1.
    """
    if len(scores) == 0:
        raise SegflowError("no OOF images to pick example cases from")
    scores, areas = np.asarray(scores, dtype=np.float64), np.asarray(areas, dtype=np.float64)
    # lexsort: last key is primary.
    best = int(np.lexsort((-areas, -scores))[0])
    worst = int(np.lexsort((-areas, scores))[0])
    median = int(np.argsort(scores, kind="stable")[len(scores) // 2])
    picked: dict[str, int] = {}
    for kind, index in (("best", best), ("median", median), ("worst", worst)):
        if index not in picked.values():
            picked[kind] = index
    return picked


def _header(root: Path, choice: dict[str, Any]) -> str:
    facts = pd.DataFrame(
        [
            ("results folder", str(root)),
            ("final submission", f"{choice.get('candidate')} round {choice.get('round')}"),
            ("why", choice.get("reason", "")),
            (
                f"tuned OOF {choice.get('metric', '')}",
                _format(float(choice.get("tuned_oof_score", np.nan)), 4),
            ),
            (
                "change vs best single experiment",
                _format(float(choice.get("delta_vs_best_single", np.nan)), 4),
            ),
        ],
        columns=["", "value"],
    )
    return html_table(facts)


def _dedup_section(root: Path) -> str:
    summary = _read_json(root / "dedup" / "summary.json")
    flat = []
    for key, value in summary.items():
        if key == PROVENANCE_KEY:  # version, seed and config hash: not a duplicate count
            continue
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v) for k, v in value.items() if not isinstance(v, list | dict)]
        elif not isinstance(value, list):
            flat.append((key, value))
    body = [html_table(pd.DataFrame(flat, columns=["quantity", "value"]).astype(str))]
    groups = summary.get("largest_groups") or []
    if groups:
        body += ["<h3>Largest duplicate groups</h3>", html_table(pd.DataFrame(groups))]
    return _section("dedup", "Duplicates", body)


def _folds_section(root: Path) -> str:
    folds = _read_csv(root / "folds" / "folds.csv", dtype={"id": str})
    summary = _read_json(root / "folds" / "summary.json")
    missing = {"fold", "group", "coverage"} - set(folds.columns)
    if missing:
        raise SegflowError(f"{root / 'folds' / 'folds.csv'} lacks columns {sorted(missing)}")
    table = (
        folds.groupby("fold")
        .agg(
            items=("id", "size"),
            groups=("group", "nunique"),
            empty=("coverage", lambda c: int((c == 0).sum())),
            mean_coverage=("coverage", "mean"),
            mean_nonempty_coverage=("coverage", lambda c: c[c > 0].mean()),
        )
        .reset_index()
    )
    table.insert(4, "empty_share", table["empty"] / table["items"])
    body = [
        _note(
            f"{len(folds)} training items in {summary.get('n_folds', table.shape[0])} folds, "
            f"stratified by mask coverage and grouped by duplicate group."
        ),
        html_table(table),
    ]
    if summary.get("strata_per_fold"):
        body.append(png_img(report_figures.strata_png(summary["strata_per_fold"]), "fold strata"))
    return _section("folds", "Fold balance", body)


def _trained_folds(root: Path, candidate: Candidate, n_folds: int) -> list[int]:
    """The folds an experiment trained: those its OOF covers (``folds.train_folds``), every
    fold for an OOF without a ``fold`` column."""
    covered = oof_folds(layout.candidate_dir(root, "oof", candidate.name, candidate.round))
    return list(range(n_folds)) if covered is None else covered


def _learning_section(root: Path, candidates: Sequence[Candidate], n_folds: int) -> str:
    body = []
    for candidate in candidates:
        if not candidate.is_experiment:
            continue
        model_dir = root / "models" / candidate.name / f"round{candidate.round}"
        histories = {
            fold: _read_csv(model_dir / f"fold{fold}" / "history.csv")
            for fold in _trained_folds(root, candidate, n_folds)
        }
        png = report_figures.learning_curves_png(histories, candidate.label)
        body.append(f"<h3>{escape(candidate.label)}</h3>{png_img(png, candidate.label)}")
    if not body:
        body.append(_note("no experiment among the candidates"))
    return _section("learning", "Learning curves", body)


def _diagnostics_section(
    root: Path, candidates: Sequence[Candidate], n_folds: int, stages: pd.DataFrame
) -> str:
    curves = []
    for candidate in candidates:
        if not candidate.is_experiment:
            continue
        model_dir = root / "models" / candidate.name / f"round{candidate.round}"
        for fold in _trained_folds(root, candidate, n_folds):
            fold_dir = model_dir / f"fold{fold}"
            history = _read_csv(fold_dir / "history.csv")
            metrics = _read_json(fold_dir / "metrics.json")
            curves.append(
                diagnostics.fold_curve(history, metrics, candidate.name, candidate.round, fold)
            )
    flags = diagnostics.all_flags(curves, stages)
    items = "".join(f"<li>{escape(flag.line())}</li>" for flag in flags)
    body = [
        _note(
            f"Undertrained: the best epoch in the last {diagnostics.LATE_FRACTION:.0%} of the "
            f"epochs (at least the last) and the last {diagnostics.TREND_EPOCHS} epochs' slope "
            f"above {diagnostics.TREND_EPS:g} per epoch. Overfit: the best epoch in the first "
            f"half and the epochs after it (up to {diagnostics.TREND_EPOCHS}) worse by more "
            f"than max({diagnostics.OVERFIT_ABS:g}, {diagnostics.OVERFIT_REL:g} x best). Few "
            f"steps: under {diagnostics.MIN_OPTIMIZER_STEPS} optimizer steps. Near constant: "
            "the tuned OOF score's mean per-image gain over the better constant prediction "
            "(all-empty or all-foreground, same metric) is at most 1.96 x its standard error."
        ),
        f"<ul>{items}</ul>" if flags else _note("no flags"),
    ]
    if curves:
        table = diagnostics.curves_table(curves)
        table["optimizer_steps"] = [
            ""
            if c.optimizer_steps is None
            else f"{'~' if c.steps_estimated else ''}{c.optimizer_steps}"
            for c in curves
        ]
        body += ["<h3>Folds</h3>", html_table(table.drop(columns=["steps_estimated"]))]
    if set(diagnostics.CONSTANT_COLUMNS) <= set(stages.columns):
        columns = ["candidate", "round", "tuned_metric", "tuned", *diagnostics.CONSTANT_COLUMNS]
        constants = stages[columns].copy()
        constants["near_constant"] = constants["near_constant"].astype(str)
        body += ["<h3>Candidates against constant predictions</h3>", html_table(constants)]
    else:
        body.append(_note("final/stages.csv has no constant-prediction columns: rerun choose"))
    return _section("diagnostics", "Diagnostics", body)


def _oof_section(root: Path, candidates: Sequence[Candidate]) -> str:
    rows, bars = [], []
    for candidate in candidates:
        metrics = _read_json(
            layout.candidate_dir(root, "oof", candidate.name, candidate.round) / "metrics.json"
        )
        row: dict[str, Any] = {"candidate": candidate.name, "round": candidate.round}
        for record in metrics.get("per_fold", []):
            row[f"fold {record['group']}"] = record["kaggle"]
            bars.append(
                {"label": candidate.label, "fold": record["group"], "kaggle": record["kaggle"]}
            )
        row.update(
            {
                "all folds": metrics["kaggle"],
                "dice": metrics["dice"],
                "iou": metrics["iou"],
                "all-empty baseline": metrics.get("all_empty_baseline_kaggle", np.nan),
            }
        )
        rows.append(row)
    coverage = oof_coverage(root)
    body = [
        _note(
            "OOF Kaggle metric per fold at threshold 0.5 (before post-processing)."
            + (f" The OOF covers {coverage}." if coverage else "")
        ),
        html_table(pd.DataFrame(rows)),
    ]
    if bars:
        body.append(png_img(report_figures.fold_metric_png(pd.DataFrame(bars)), "OOF per fold"))
    return _section("oof", "Out-of-fold scores", body)


def _postprocess_section(root: Path, candidates: Sequence[Candidate]) -> str:
    body = [
        _note(
            "Tuned score over threshold x minimum component area (each cell: the best over fill "
            "holes and gate); the chosen cell is outlined in red."
        )
    ]
    for candidate in candidates:
        folder = layout.candidate_dir(root, "postprocess", candidate.name, candidate.round)
        grid = _read_csv(folder / "grid.csv")
        params = _read_json(folder / "params.json")
        chosen = {
            str(r["class"]): (float(r["threshold"]), int(r["min_area"]))
            for r in params.get("classes", [])
        }
        png = report_figures.grid_heatmap_png(grid, candidate.label, chosen)
        body += [
            f"<h3>{escape(candidate.label)}</h3>",
            png_img(png, f"post-processing grid of {candidate.label}"),
            html_table(pd.DataFrame(params.get("classes", []))),
        ]
    return _section("postprocess", "Post-processing grid", body)


def _stacking_section(root: Path, candidates: Sequence[Candidate], classes: Sequence[str]) -> str:
    rounds = sorted({c.round for c in candidates if c.name.startswith("stack_")})
    if not rounds:
        return _section(
            "stacking", "Stacking", [_note("stacking did not run (stack.enabled: false)")]
        )
    body = []
    # Each stacked candidate of the run (stack.pixel_blender: false leaves stack_pixel out;
    # a blender file left by an earlier run is then not shown).
    stacked = {(c.name, c.round) for c in candidates}
    for round_ in rounds:
        for k, name in enumerate(classes):
            class_dir = root / "stack" / f"round{round_}" / f"class_{k}"
            for candidate, file, what in (
                ("stack_gate", "gate_importances.csv", "image-level gate"),
                ("stack_pixel", "blender_importances.csv", "pixel-level blender"),
            ):
                if (candidate, round_) not in stacked:
                    continue
                path = class_dir / file
                title = f"{what}, class {name}, round {round_}"
                png = report_figures.importance_png(_read_csv(path), title)
                body.append(png_img(png, title))
    return _section("stacking", "Stacking feature importance", body)


def _stages_section(root: Path, stages: pd.DataFrame) -> str:
    chosen = stages["chosen"].astype(bool).tolist() if "chosen" in stages else None
    body = [
        _note(
            "Raw: OOF at threshold 0.5; tuned: after post-processing; delta: tuned minus the "
            "best single experiment of round 0. The submitted candidate is highlighted."
        ),
        html_table(stages, highlight=chosen),
    ]
    return _section("stages", "Gain per stage", body)


def _cases_section(
    root: Path, choice: dict[str, Any], classes: Sequence[str], dicom_window: DicomWindow | None
) -> str:
    candidate = Candidate(str(choice["candidate"]), int(choice["round"]))
    oof_dir = layout.candidate_dir(root, "oof", candidate.name, candidate.round)
    ids = _read_csv(oof_dir / OOF_IDS, dtype={"id": str})
    probs = np.load(_require(oof_dir / OOF_PROBS), mmap_mode="r")
    if len(ids) != len(probs) or probs.ndim != 4 or probs.shape[1] != len(classes):
        raise SegflowError(
            f"{oof_dir}: {len(ids)} ids, probabilities of shape {probs.shape}, "
            f"{len(classes)} classes"
        )
    summary = _read_json(layout.postprocess_params(root, candidate.name, candidate.round))
    params = params_from_summary(summary, classes)
    gates = nonempty_probs(ids, len(classes))
    manifest = _read_parquet(layout.manifest(root))
    dedup_items = _read_parquet(layout.dedup_items(root))
    sources = mask_sources(manifest, dedup_items)
    scores, areas = np.zeros(len(ids)), np.zeros(len(ids))
    for start in range(0, len(ids), CHUNK):
        part = slice(start, start + CHUNK)
        masks = apply_classes(
            np.asarray(probs[part]), params, None if gates is None else gates[part]
        )
        truths = original_truths(manifest, dedup_items, ids["id"].iloc[part], len(classes), sources)
        scores[part] = per_image_kaggle(masks, truths)
        areas[part] = masks.sum(axis=(1, 2, 3)) + sum(
            class_truths(truths, k).sum(axis=(1, 2)) for k in range(len(classes))
        )
    picked = pick_cases(scores, areas)
    paths = manifest.set_index("id")["image_path"]
    body = [
        _note(
            f"{candidate.label} (the final choice), post-processed with its tuned parameters; "
            f"per-image Kaggle metric (mean over classes), mean {scores.mean():.4f} over "
            f"{len(scores)} OOF images."
        )
    ]
    for kind, index in picked.items():
        item_id = ids["id"].iloc[index]
        masks = apply_classes(
            np.asarray(probs[index : index + 1]),
            params,
            None if gates is None else gates[index : index + 1],
        )[0]
        truth = original_truths(manifest, dedup_items, [item_id], len(classes), sources)[0]
        truth_planes = np.stack([class_truths(truth, k) for k in range(len(classes))])
        path = resolve_manifest_path(paths[item_id], "image_path", item_id, data_roots(manifest))
        image = decode_image(str(path), dicom_window).pixels
        fold = f", fold {ids['fold'].iloc[index]}" if "fold" in ids else ""
        title = (
            f"{kind}: {item_id} (Kaggle {scores[index]:.3f}{fold}; true {int(truth_planes.sum())}"
            f" px, predicted {int((masks != 0).sum())} px)"
        )
        body += [
            f"<h3>{escape(title)}</h3>",
            png_img(report_figures.overlay_png(image, truth_planes, masks != 0, title), title),
        ]
    return _section("cases", "Example OOF cases", body)


def build_report(
    results_dir: str | os.PathLike[str],
    dicom_window: DicomWindow | None = None,
    title: str = "segflow report",
) -> str:
    """The report of the run in ``results_dir`` as one HTML document.

    Args:
        results_dir: the workflow's results folder (after ``choose``).
        dicom_window: HU window to display DICOM images with (the config's).
        title: the page title.

    Returns:
        The HTML text.

    Raises:
        SegflowError: an artifact the report needs is missing (named in the message).
    """
    root = Path(results_dir)
    stages = _read_csv(layout.final_dir(root) / "stages.csv")
    choice = _read_json(layout.final_dir(root) / "choice.json")
    candidates = candidates_from_stages(stages)
    classes = classes_of(_read_json(arrays.stats_path(layout.arrays_dir(root))))
    n_folds = int(_read_json(root / "folds" / "summary.json")["n_folds"])
    sections = [
        _diagnostics_section(root, candidates, n_folds, stages),
        _dedup_section(root),
        _folds_section(root),
        _learning_section(root, candidates, n_folds),
        _oof_section(root, candidates),
        _postprocess_section(root, candidates),
        _stacking_section(root, candidates, classes),
        _stages_section(root, stages),
        search_section(root),
        _cases_section(root, choice, classes, dicom_window),
    ]
    nav = " ".join(
        f'<a href="#{anchor}">{label}</a>'
        for anchor, label in (
            ("diagnostics", "diagnostics"),
            ("dedup", "duplicates"),
            ("folds", "folds"),
            ("learning", "learning curves"),
            ("oof", "OOF"),
            ("postprocess", "post-processing"),
            ("stacking", "stacking"),
            ("stages", "stages"),
            *([("search", "search")] if any((root / "search").glob("*/best.json")) else []),
            ("cases", "cases"),
        )
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<nav>{nav}</nav>{_header(root, choice)}{''.join(sections)}</body></html>\n"
    )


def write_report(
    results_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dicom_window: DicomWindow | None = None,
    title: str = "segflow report",
) -> None:
    """Build the report (:func:`build_report`) and write it atomically to ``out``."""
    write_text(out, build_report(results_dir, dicom_window, title))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow report``'s flags."""
    parser.add_argument("--results-dir", required=True, help="the workflow's results folder")
    parser.add_argument("--title", default="segflow report", help="page title")
    add_dicom_window_arguments(parser)
    parser.add_argument("--out", required=True, help="report.html to write")


def run(args: argparse.Namespace) -> None:
    """``segflow report``: write the HTML report."""
    write_report(args.results_dir, args.out, dicom_window_from_args(args), args.title)
    stage_log.info("report %s", args.out)
