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
    if len(lines) == 1:
        lines.append("  nothing yet: run `snakemake` (or `make demo`) first")
    return "\n".join(lines)
