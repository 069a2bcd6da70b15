"""A plain-text overview of what a workflow run has produced, printed at the end of ``make demo``."""

from __future__ import annotations

import json
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def results_summary(results_dir: str | Path) -> str:
    """Summarise the artifacts under ``results_dir`` (stages that have not run are skipped)."""
    root = Path(results_dir)
    lines = [f"segflow results in {root.resolve()}"]
    ingest = _load(root / "ingest" / "summary.json")
    if ingest:
        lines.append(
            f"  ingest      {root / 'ingest' / 'manifest.parquet'}: {ingest['n_train']} train "
            f"({ingest['n_train_empty_masks']} empty masks), {ingest['n_test']} test"
        )
    dedup = _load(root / "dedup" / "summary.json")
    if dedup:
        lines.append(
            f"  dedup       {root / 'dedup' / 'report.md'}: {dedup['n_groups']} groups / "
            f"{dedup['n_members']} members, {dedup['conflicting_groups']} conflicting, "
            f"{dedup['test_items_with_train_label']} test items with a known train label"
        )
    stats = _load(root / "preprocess" / "stats.json")
    if stats:
        lines.append(
            f"  preprocess  {root / 'preprocess'}: {stats['n_train']} train + {stats['n_test']} test "
            f"at {stats['height']}x{stats['width']}x{stats['channels']} {stats['dtype']}"
        )
    folds = _load(root / "folds" / "summary.json")
    if folds:
        lines.append(
            f"  folds       {root / 'folds' / 'folds.csv'}: {folds['n_folds']} folds of "
            f"{folds['items_per_fold']} items ({folds['n_groups']} groups)"
        )
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
    return "\n".join(lines)
