"""A plain-text overview of what a workflow run has produced, printed at the end of ``make demo``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from segflow.artifacts import arrays, layout
from segflow.model.diagnostics import FoldCurve, all_flags, fold_curve

_FOLD_DIR = re.compile(r"round(\d+)/fold(\d+)$")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def oof_folds(oof_dir: Path) -> list[int] | None:
    """The first-level folds an OOF folder covers (its ``oof_ids.csv``'s ``fold`` column,
    ascending), None when there is no such file or column."""
    path = oof_dir / "oof_ids.csv"
    if not path.is_file():
        return None
    ids = pd.read_csv(path, dtype={"id": str})
    return sorted(int(fold) for fold in ids["fold"].unique()) if "fold" in ids else None


def oof_coverage(root: Path) -> str | None:
    """How much of the training set the run's OOF covers: ``k of N folds (n of M images)``,
    from the first experiment's OOF (every first-level candidate covers the same images: the
    validation images of the trained folds, ``folds.train_folds``), None before there is one.
    """
    folds_csv = root / "folds" / "folds.csv"
    summary = _load(root / "folds" / "summary.json")
    if summary is None or not folds_csv.is_file():
        return None
    for ids_csv in sorted(root.glob("oof/*/round*/oof_ids.csv")):
        covered = oof_folds(ids_csv.parent)
        if covered is None:
            continue
        n_images = len(pd.read_csv(ids_csv, usecols=["id"]))
        total = len(pd.read_csv(folds_csv, usecols=["id"]))
        return (
            f"{len(covered)} of {summary['n_folds']} folds ({n_images} of {total} images"
            f"{'' if len(covered) == summary['n_folds'] else '; folds ' + ', '.join(map(str, covered))})"
        )
    return None


def fold_curves(root: Path) -> list[FoldCurve]:
    """:class:`segflow.model.diagnostics.FoldCurve` of every trained fold under ``root/models``
    (``history.csv``, with ``metrics.json`` when it is there), by experiment, round and fold."""
    found = []
    for history in root.glob("models/*/round*/fold*/history.csv"):
        match = _FOLD_DIR.search(history.parent.relative_to(root).as_posix())
        if match is None:
            continue
        round_, fold = int(match.group(1)), int(match.group(2))
        found.append((history.parts[-4], round_, fold, history))
    curves = []
    for experiment, round_, fold, history in sorted(found):
        metrics = _load(history.parent / "metrics.json") or {}
        curves.append(fold_curve(pd.read_csv(history), metrics, experiment, round_, fold))
    return curves


def diagnostics_lines(root: Path) -> list[str]:
    """The diagnostics block of the summary: every flag of :mod:`segflow.model.diagnostics` on the
    trained folds and the final choice's candidates, one line each (none if nothing to check)."""
    curves = fold_curves(root)
    stages_path = root / "final" / "stages.csv"
    stages = pd.read_csv(stages_path) if stages_path.is_file() else None
    if not curves and stages is None:
        return []
    flags = all_flags(curves, stages)
    checked = f"{len(curves)} folds" + (f", {len(stages)} candidates" if stages is not None else "")
    lines = ["", f"Diagnostics ({checked} checked; see segflow.model.diagnostics for the rules):"]
    lines += [f"  ! {flag.line()}" for flag in flags] or ["  no flags"]
    if stages is not None and "near_constant" not in stages.columns:
        lines.append(f"  {stages_path} has no constant-prediction columns (rerun choose)")
    return lines


def results_summary(results_dir: str | Path) -> str:
    """Summarise the artifacts under ``results_dir`` (stages that have not run are skipped)."""
    root = Path(results_dir)
    lines = [f"segflow results in {root.resolve()}"]
    ingest = _load(root / "ingest" / "summary.json")
    if ingest:
        lines.append(
            f"  ingest      {layout.manifest(root)}: {ingest['n_train']} train "
            f"({ingest['n_train_empty_masks']} empty masks)"
        )
    test_ingest = _load(root / "ingest" / "test_summary.json")
    if test_ingest:
        lines.append(f"  ingest      {layout.test_manifest(root)}: {test_ingest['n_test']} test")
    dedup = _load(root / "dedup" / "summary.json")
    if dedup:
        lines.append(
            f"  dedup       {root / 'dedup' / 'report.md'}: {dedup['n_groups']} groups / "
            f"{dedup['n_members']} members, {dedup['conflicting_groups']} conflicting"
        )
    leaks = _load(root / "dedup" / "test_leaks.json")
    if leaks:
        lines.append(
            f"  leaks       {layout.test_leaks(root)}: {leaks['test_items_with_train_label']} "
            "test items with a known train label"
        )
    stats = _load(arrays.stats_path(layout.arrays_dir(root)))
    if stats:
        lines.append(
            f"  preprocess  {root / 'preprocess'}: {stats['n_train']} train "
            f"at {stats['height']}x{stats['width']}x{stats['channels']} {stats['dtype']}"
        )
    folds = _load(root / "folds" / "summary.json")
    if folds:
        lines.append(
            f"  folds       {root / 'folds' / 'folds.csv'}: {folds['n_folds']} folds of "
            f"{folds['items_per_fold']} items ({folds['n_groups']} groups)"
        )
    coverage = oof_coverage(root)
    if coverage:
        lines.append(f"  OOF covers  {coverage}")
    for metrics_path in sorted(root.glob("oof/*/round*/metrics.json")):
        experiment, round_dir = metrics_path.parts[-3], metrics_path.parts[-2]
        oof = _load(metrics_path) or {}
        lines.append(
            f"  OOF         {experiment}/{round_dir}: kaggle {oof['kaggle']:.4f}, dice "
            f"{oof['dice']:.4f}, iou {oof['iou']:.4f} at threshold {oof['threshold']} "
            f"(all-empty baseline kaggle {oof['all_empty_baseline_kaggle']:.4f})"
        )
        tuned = _load(root / "postprocess" / experiment / round_dir / "params.json")
        if tuned:
            lines.append(
                f"  tuned       {experiment}/{round_dir}: {tuned['metric']} {tuned['score']:.4f}"
            )
            for record in tuned.get("classes", []):
                gate = f", gate {record['gate']}" if record.get("gate") else ""
                lines.append(
                    f"    {record['class']}: threshold {record['threshold']}, min_area "
                    f"{record['min_area']}, fill_holes {record['fill_holes']}{gate}"
                )
    choice = _load(root / "final" / "choice.json")
    if choice:
        lines.append(
            f"  final       {root / 'final' / 'submission.csv'}: {choice['candidate']} round "
            f"{choice['round']} ({choice['reason']}, tuned OOF {choice['metric']} "
            f"{choice['tuned_oof_score']:.4f})"
        )
        stages = root / "final" / "stages.md"
        if stages.is_file():
            lines.append("")
            lines.append(
                "OOF per stage (raw scores at threshold 0.5; tuned = after post-processing):"
            )
            lines.append(stages.read_text().rstrip())
    else:
        for submission in sorted(root.glob("submission/*/round*/submission.csv")):
            lines.append(f"  submission  {submission}")
    if len(lines) == 1:
        lines.append("  nothing yet: run `snakemake` (or `make demo`) first")
    lines += diagnostics_lines(root)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow summary``'s one argument."""
    parser.add_argument("results_dir", help="the workflow's results folder")


def run(args: argparse.Namespace) -> None:
    """``segflow summary``: print the run's summary."""
    print(results_summary(args.results_dir))
