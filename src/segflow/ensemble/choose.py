"""The choose stage: every candidate's OOF scores in one table, the final submission picked.

Candidates (experiments, ``ensemble``, ``stack_gate``, ``stack_pixel``, per round) all live in
an experiment's layout (:mod:`segflow.artifacts.layout`); the table compares their raw and
tuned OOF scores with the best single experiment of round 0 and with constant predictions
(:mod:`segflow.model.diagnostics`, on the per-image scores tune-postprocess wrote: choose reads
tables only, no mask nor prediction). Writes ``final/submission.csv`` (a copy of the chosen
candidate's), ``choice.json``, ``stages.csv`` and ``stages.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from segflow.artifacts import layout
from segflow.artifacts.image_scores import read_image_scores
from segflow.artifacts.layout import candidate_dir
from segflow.core.atomic import write_csv, write_json, write_text
from segflow.core.errors import SegflowError
from segflow.core.stage_args import stage_log, stage_provenance, with_provenance


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
        delta_tuned (vs the baseline), baseline (bool); with a hyperparameter search
        (``search/<name>/best.json``) also search_best: the study's best trial value (its
        ``folds``, ``trial_epochs``, the monitor at threshold 0.5), null for other candidates,
        so the search's optimism shows next to the experiment's full OOF score.
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
        search_best = root / "search" / name / "best.json"
        if search_best.is_file():
            rows[-1]["search_best"] = float(json.loads(search_best.read_text())["value"])
    table = pd.DataFrame(rows)
    singles = table[(table["stage"] == "experiment") & (table["round"] == 0)]
    baseline = float(singles["tuned"].max()) if len(singles) else float(table["tuned"].iloc[0])
    table["delta_tuned"] = table["tuned"] - baseline
    table["baseline"] = False
    if len(singles):
        table.loc[singles["tuned"].idxmax(), "baseline"] = True
    return table


def constant_baselines(table: pd.DataFrame, results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The stage table with each candidate's tuned OOF score against constant predictions.

    Adds :data:`segflow.model.diagnostics.CONSTANT_COLUMNS`: the all-empty and all-foreground
    predictions' OOF scores with the candidate's tuning metric, the mean per-image gain of the
    tuned prediction over the better one, its noise margin and whether the candidate is within
    it (:func:`segflow.model.diagnostics.constant_check`), from the per-image scores that
    tune-postprocess wrote (:mod:`segflow.artifacts.image_scores`).

    Args:
        table: :func:`stage_table`'s table.
        results_dir: the workflow's results folder.

    Returns:
        A copy of ``table`` with the extra columns.

    Raises:
        SegflowError: a candidate without its ``image_scores.parquet``.
    """
    from segflow.model.diagnostics import constant_check, constant_columns

    root = Path(results_dir)
    columns: list[dict[str, Any]] = []
    for row in table.itertuples():
        tuned, constants = read_image_scores(
            candidate_dir(root, "postprocess", row.candidate, row.round)
        )
        columns.append(constant_columns(constant_check(tuned, constants, str(row.tuned_metric))))
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(columns)], axis=1)


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
    if "search_best" in table.columns:
        columns.append("search_best")
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
            elif isinstance(value, float) and math.isnan(value):
                cells.append("")
            elif isinstance(value, float):
                cells.append(f"{value:.4f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow choose``'s flags."""
    parser.add_argument("--candidates", nargs="+", required=True, help="name:round pairs")
    parser.add_argument("--results-dir", required=True)
    parser.add_argument("--force", default=None, help="name:round to submit regardless")
    parser.add_argument("--out-dir", required=True)


def run(args: argparse.Namespace) -> None:
    """``segflow choose``: write the stage table and the choice (final-submission copies the
    chosen submission)."""
    pairs = []
    for text in args.candidates:
        name, _, round_ = text.partition(":")
        pairs.append((name, int(round_ or 0)))
    results = Path(args.results_dir)
    table = constant_baselines(stage_table(pairs, results), results)
    chosen = choose_candidate(table, args.force)
    source = layout.submission_csv(results, chosen["candidate"], chosen["round"])
    out = Path(args.out_dir)
    table["chosen"] = (table["candidate"] == chosen["candidate"]) & (
        table["round"] == chosen["round"]
    )
    write_csv(out / "stages.csv", table)
    write_text(out / "stages.md", markdown_table(table))
    choice = {
        "candidate": chosen["candidate"],
        "round": int(chosen["round"]),
        "stage": chosen["stage"],
        "metric": chosen["tuned_metric"],
        "tuned_oof_score": float(chosen["tuned"]),
        "delta_vs_best_single": float(chosen["delta_tuned"]),
        "reason": f"forced by submit_experiment {args.force}"
        if args.force
        else "best tuned OOF score",
        "submission": str(source),
    }
    block = stage_provenance({"candidates": args.candidates, "force": args.force})
    write_json(out / "choice.json", with_provenance(choice, block))
    stage_log.info(
        "final submission: %s round %d (%s)", choice["candidate"], choice["round"], choice["reason"]
    )
