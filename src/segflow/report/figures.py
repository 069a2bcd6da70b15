"""The HTML report's figures: matplotlib (Agg, no pyplot state) rendered to PNG bytes.

Every function takes plain tables or arrays and returns the PNG file's bytes, so the report can
embed them as base64 ``data:`` URIs and the figures can be tested without any artifact.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from segflow.core.errors import SegflowError

# Overlay colours per class (RGB 0..1); classes past the list reuse it.
CLASS_COLOURS = (
    (1.0, 0.2, 0.2),
    (0.2, 0.6, 1.0),
    (1.0, 0.8, 0.1),
    (0.3, 0.9, 0.3),
    (0.9, 0.3, 0.9),
    (0.2, 0.9, 0.9),
)
DPI = 100


def plain(text: object) -> str:
    """``text`` for a matplotlib label: ``$`` escaped, so a name from the config never starts
    mathtext (which could fail to parse)."""
    return str(text).replace("$", r"\$")


def _png(figure: Figure) -> bytes:
    """The figure as PNG bytes (Agg canvas attached here: no global pyplot backend)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def learning_curves_png(histories: Mapping[int, pd.DataFrame], title: str) -> bytes:
    """Loss and validation metrics per epoch, one line per fold.

    Args:
        histories: fold -> ``history.csv`` table (columns epoch, train_loss, val_loss,
            val_kaggle, val_dice; others are ignored).
        title: the figure title (experiment and round).

    Returns:
        PNG bytes.
    """
    if not histories:
        raise SegflowError(f"{title}: no training history to plot")
    figure = Figure(figsize=(10, 3.4))
    loss_axes, metric_axes = figure.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(histories))]
    for colour, (fold, history) in zip(colours, sorted(histories.items()), strict=True):
        for column, style, axes in (
            ("train_loss", "--", loss_axes),
            ("val_loss", "-", loss_axes),
            ("val_kaggle", "-", metric_axes),
            ("val_dice", ":", metric_axes),
        ):
            if column in history:
                axes.plot(
                    history["epoch"],
                    history[column],
                    style,
                    marker="o",
                    markersize=3,
                    color=colour,
                    label=f"fold {fold} {column}",
                )
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss (dashed: train, solid: val)")
    metric_axes.set(
        xlabel="epoch", ylabel="score", title="validation (solid: Kaggle, dotted: Dice)"
    )
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    figure.suptitle(plain(title))
    return _png(figure)


def fold_metric_png(table: pd.DataFrame, metric: str = "kaggle") -> bytes:
    """Grouped bars of one OOF metric per fold, one group per candidate.

    Args:
        table: one row per (candidate label, fold) with columns ``label``, ``fold``, ``metric``.
        metric: the column to plot.

    Returns:
        PNG bytes.
    """
    order = list(dict.fromkeys(table["label"]))  # candidates in the order given, not sorted
    pivot = table.pivot(index="label", columns="fold", values=metric).sort_index(axis=1).loc[order]
    figure = Figure(figsize=(max(6.0, 1.2 * len(pivot) + 2), 3.4))
    axes = figure.subplots()
    width = 0.8 / max(1, pivot.shape[1])
    positions = np.arange(len(pivot))
    for i, fold in enumerate(pivot.columns):
        axes.bar(positions + i * width, pivot[fold], width, label=f"fold {fold}")
    axes.set_xticks(
        positions + width * (pivot.shape[1] - 1) / 2, [plain(x) for x in pivot.index], rotation=20
    )
    axes.set(ylabel=f"OOF {metric}", ylim=(0, 1), title=f"OOF {metric} per fold")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def strata_png(strata_per_fold: Mapping[str, Sequence[int]]) -> bytes:
    """Stacked bars: items of each coverage stratum in each fold (stratum 0 = empty masks).

    Args:
        strata_per_fold: stratum -> count per fold (``folds/summary.json``).

    Returns:
        PNG bytes.
    """
    strata = sorted(strata_per_fold, key=int)
    n_folds = len(strata_per_fold[strata[0]]) if strata else 0
    figure = Figure(figsize=(max(5.0, 0.9 * n_folds + 3), 3.2))
    axes = figure.subplots()
    bottom = np.zeros(n_folds)
    for stratum in strata:
        counts = np.asarray(strata_per_fold[stratum], dtype=float)
        label = "empty" if int(stratum) == 0 else f"coverage bin {stratum}"
        axes.bar(np.arange(n_folds), counts, bottom=bottom, label=label)
        bottom += counts
    axes.set_xticks(np.arange(n_folds), [f"fold {k}" for k in range(n_folds)])
    axes.set(ylabel="items", title="items per fold by coverage stratum")
    axes.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _png(figure)


def grid_heatmap_png(
    grid: pd.DataFrame, title: str, chosen: Mapping[str, tuple[float, int]] | None = None
) -> bytes:
    """Post-processing score over threshold x min component area, one panel per class.

    Each cell is the best score over the other grid axes (fill holes, gate); the chosen cell of
    a class (else its best) is outlined.

    Args:
        grid: ``grid.csv`` of tune-postprocess (columns threshold, min_area, score; optional
            class, fill_holes, gate).
        title: the figure title (candidate and round).
        chosen: class -> the tuned (threshold, min_area) (``params.json``), outlined.

    Returns:
        PNG bytes.
    """
    missing = {"threshold", "min_area", "score"} - set(grid.columns)
    if missing:
        raise SegflowError(f"{title}: grid lacks columns {sorted(missing)}")
    if "class" not in grid:
        grid = grid.assign(**{"class": "mask"})
    classes = list(dict.fromkeys(grid["class"].astype(str)))
    figure = Figure(figsize=(4.6 * len(classes) + 0.6, 3.8))
    panels = np.atleast_1d(figure.subplots(1, len(classes)))
    for axes, name in zip(panels, classes, strict=True):
        rows = grid[grid["class"].astype(str) == name]
        cells = rows.pivot_table(
            index="threshold", columns="min_area", values="score", aggfunc="max"
        )
        image = axes.imshow(cells.to_numpy(), cmap="viridis", aspect="auto", origin="lower")
        axes.set_xticks(range(cells.shape[1]), [str(v) for v in cells.columns])
        axes.set_yticks(range(cells.shape[0]), [f"{v:g}" for v in cells.index])
        axes.set(xlabel="min component area (px)", ylabel="threshold", title=plain(f"class {name}"))
        if cells.size <= 120:  # annotate only grids small enough to stay readable
            values = cells.to_numpy()
            middle = (np.nanmin(values) + np.nanmax(values)) / 2
            for (i, j), value in np.ndenumerate(values):
                if np.isfinite(value):
                    # white on viridis' dark low end, black on its bright high end
                    colour = "black" if value > middle else "white"
                    axes.text(
                        j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color=colour
                    )
        if chosen and name in chosen:
            # Ties are common: outline the cell tuning picked, not just any maximum.
            best_i = _position(cells.index, chosen[name][0], f"{title}: threshold")
            best_j = _position(cells.columns, chosen[name][1], f"{title}: min_area")
        else:
            best_i, best_j = np.unravel_index(np.nanargmax(cells.to_numpy()), cells.shape)
        axes.add_patch(
            Rectangle((best_j - 0.5, best_i - 0.5), 1, 1, edgecolor="red", linewidth=2, fill=False)
        )
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.suptitle(plain(title))
    return _png(figure)


def _position(values: pd.Index, target: float, what: str) -> int:
    """Where ``target`` sits among ``values`` (float-tolerant: it went through CSV and JSON)."""
    matches = np.flatnonzero(np.isclose(values.to_numpy(dtype=float), target))
    if len(matches) == 0:
        raise SegflowError(f"{what} {target} was chosen but is not in the grid")
    return int(matches[0])


def importance_png(importances: pd.DataFrame, title: str, top: int = 20) -> bytes:
    """Horizontal bars of the ``top`` largest feature importances.

    Args:
        importances: columns ``feature``, ``importance``.
        title: the figure title.
        top: how many features to show.

    Returns:
        PNG bytes.
    """
    rows = importances.sort_values("importance", ascending=False).head(top).iloc[::-1]
    figure = Figure(figsize=(7, 0.28 * len(rows) + 1.2))
    axes = figure.subplots()
    axes.barh([plain(f) for f in rows["feature"]], rows["importance"], color="C0")
    axes.set(xlabel="importance (sum 1)", title=plain(title))
    axes.tick_params(axis="y", labelsize=7)
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def display_image(pixels: np.ndarray) -> np.ndarray:
    """An image as 8-bit gray (H, W) or RGB (H, W, 3) for display (16-bit scaled, alpha dropped).

    Shape:
        pixels: (H, W) or (H, W, C), C in {3, 4}.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.ndim == 3:
        pixels = pixels[:, :, :3]
    return pixels


def overlay_png(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, title: str) -> bytes:
    """Three panels: the image, the image with the true mask, the image with the prediction.

    Args:
        image: 8-bit gray or RGB image (see :func:`display_image`).
        truth: true masks, one bool plane per class.
        prediction: predicted masks, one bool plane per class.
        title: names the case in error messages (the page shows it above the figure).

    Returns:
        PNG bytes.

    Shape:
        image: (H, W) or (H, W, 3); truth, prediction: (K, H, W).
    """
    image = display_image(image)
    if truth.shape != prediction.shape or truth.shape[1:] != image.shape[:2]:
        raise SegflowError(
            f"{title}: image {image.shape[:2]}, truth {truth.shape} and prediction "
            f"{prediction.shape} do not match"
        )
    height, width = image.shape[:2]
    panel = 3.6
    figure = Figure(figsize=(3 * panel, min(8.0, max(1.6, panel * height / width)) + 0.3))
    panels = figure.subplots(1, 3)
    gray = dict(cmap="gray", vmin=0, vmax=255) if image.ndim == 2 else {}
    for axes, masks, name in zip(
        panels, (None, truth, prediction), ("image", "truth", "prediction"), strict=True
    ):
        axes.imshow(image, **gray)
        if masks is not None:
            axes.imshow(_mask_layer(masks), interpolation="nearest")
        axes.set_title(name, fontsize=9)
        axes.axis("off")
    return _png(figure)


def _mask_layer(masks: np.ndarray) -> np.ndarray:
    """RGBA layer colouring each class's pixels, half transparent (Shape: (K, H, W) -> (H, W, 4))."""
    layer = np.zeros((*masks.shape[1:], 4), dtype=np.float32)
    for k, plane in enumerate(np.asarray(masks, dtype=bool)):
        layer[plane, :3] = CLASS_COLOURS[k % len(CLASS_COLOURS)]
        layer[plane, 3] = 0.45
    return layer
