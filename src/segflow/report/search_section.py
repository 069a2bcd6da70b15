"""The report's "Hyperparameter search" section: per study under ``search/<study>/``, the best
value by trial, the parameter importances and the top trials, next to the best experiment's
full OOF score (the search's value is optimistic: it picked the best of many on few folds)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from segflow.report.figures import _png, importance_png, plain

TOP_TRIALS = 10


def best_by_trial_png(trials: pd.DataFrame, title: str) -> bytes:
    """Each finished trial's value (pruned: its last reported epoch's) and the best so far.

    Args:
        trials: ``trials.csv`` (columns number, state, value, best_so_far).
        title: the figure title.

    Returns:
        PNG bytes.
    """
    figure = Figure(figsize=(7, 3))
    axes = figure.subplots()
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        rows = trials[trials["state"] == state]
        axes.scatter(rows["number"], rows["value"], marker=marker, label=state.lower(), s=18)
    axes.step(trials["number"], trials["best_so_far"], where="post", color="C3", label="best")
    axes.set(xlabel="trial", ylabel="value", title=plain(title))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _png(figure)


def search_section(root: Path) -> str:
    """The section's HTML body parts (empty when the run has no search).

    Args:
        root: the results folder.

    Returns:
        The ``<section>`` element, or "" without ``search/*/best.json``.
    """
    from segflow.report.report import _note, _section, html_table, png_img

    body = []
    for best_path in sorted((root / "search").glob("*/best.json")):
        folder = best_path.parent
        best = json.loads(best_path.read_text())
        name = str(best["study"])
        trials = pd.read_csv(folder / "trials.csv")
        importance = pd.read_csv(folder / "importance.csv")
        counts = ", ".join(f"{v} {k.lower()}" for k, v in best["counts"].items() if v)
        oof = root / "oof" / name / "round0" / "metrics.json"
        final = (
            f"; the best experiment's OOF kaggle on every fold: "
            f"{json.loads(oof.read_text())['kaggle']:.4f}"
            if oof.is_file()
            else ""
        )
        body.append(
            f"<h3>{html.escape(name)}</h3>"
            + _note(
                f"best value {best['value']:.4f} ({best['direction']}, trial {best['trial']}, "
                f"folds {best['folds']}, {best['trial_epochs']} epochs per trial){final}; "
                f"trials: {counts}; best values: {json.dumps(best['params'])}"
            )
            + png_img(best_by_trial_png(trials, f"{name}: value by trial"), name)
        )
        if len(importance):
            table = importance.rename(columns={"param": "feature"})
            body.append(png_img(importance_png(table, f"{name}: parameter importance"), name))
        else:
            body.append(_note("no parameter importance (fewer than two complete trials)"))
        finished = trials[trials["state"] == "COMPLETE"]
        ascending = best["direction"] == "minimize"
        top = finished.sort_values("value", ascending=ascending).head(TOP_TRIALS)
        columns = ["number", "value", *[c for c in trials.columns if c.startswith("params.")]]
        body.append(html_table(top[columns]))
    if not body:
        return ""
    return _section("search", "Hyperparameter search", body)
