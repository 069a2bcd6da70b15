"""The select-pseudo stage: pseudo-labels for the next round from a round's test prediction.

The selection policy is :mod:`segflow.ensemble.pseudo` (pure, on arrays); this module applies
the round's tuned post-processing to its final test prediction, builds the targets at the
preprocessed size and writes ``selection.csv``, ``targets.npy`` and ``summary.json``, which
``segflow train --pseudo-dir`` reads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflow.artifacts.arrays import classes_of, image_size, read_index, read_stats
from segflow.artifacts.predictions import Prediction, nonempty_probs, read_fold_predictions
from segflow.artifacts.resolution import PAD_COLUMNS, from_original, index_offsets
from segflow.artifacts.tables import read_table
from segflow.core.atomic import write_csv, write_json, write_npy
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace
from segflow.core.stage_args import stage_log, stage_provenance, with_provenance
from segflow.ensemble.candidates import json_ready
from segflow.ensemble.pseudo import PseudoOptions, pseudo_targets, select_pseudo, train_duplicates
from segflow.model.postprocess import apply_classes, params_from_summary


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
        test: the fold-merged (ensemble) test prediction at the original resolution (with
            its MC-dropout uncertainty map for ``pseudo.uncertainty: mc_dropout``).
        tuned: its tuned post-processing (``params.json``), applied to make hard labels.
        classes: class names in bit order.
        dedup_items: dedup's items table (test duplicates of train images are excluded).
        options: :class:`segflow.ensemble.pseudo.PseudoOptions`.
        size: the preprocessed (height, width) the targets are stored at.
        offsets: test id -> (top, left) padding when preprocess reflect-padded the images
            (``resize_mode: pad``, the index's ``pad_top``/``pad_left``): the targets are
            padded the same way; None: they are resized, as the images were.

    Returns:
        (selection table, targets at the preprocessed size, summary). Targets are packed
        labels (S, h, w) for hard labels, float16 (S, K, h, w) for soft ones.
    """
    selection = select_pseudo(
        test.ids, test.probs, options, train_duplicates(dedup_items), test.uncertainty
    )
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow select-pseudo``'s flags."""
    add_dataclass_arguments(parser, PseudoOptions)
    parser.add_argument("--test-dir", required=True, help="the round's final test prediction")
    parser.add_argument("--postprocess", required=True, help="its tuned params.json")
    parser.add_argument("--arrays-dir", required=True, help="preprocess output folder")
    parser.add_argument(
        "--dedup-items",
        required=True,
        help="the test leak links (segflow leaks): test copies of train images are not selected",
    )
    parser.add_argument("--out-dir", required=True, help="selection.csv, targets.npy, summary")


def run(args: argparse.Namespace) -> None:
    """``segflow select-pseudo``: write selection.csv, targets.npy and summary.json."""
    options = dataclass_from_namespace(PseudoOptions, args)
    stats = read_stats(args.arrays_dir)
    classes = classes_of(stats)
    test_rows = read_index(args.arrays_dir, split="test")
    # Pad mode: the targets are reflect-padded as the test images were.
    offsets = (
        dict(zip(test_rows["id"], index_offsets(test_rows), strict=True))
        if set(PAD_COLUMNS) <= set(test_rows.columns)
        else None
    )
    selection, targets, summary = select_pseudo_stage(
        read_fold_predictions([args.test_dir], "mean"),
        json.loads(Path(args.postprocess).read_text()),
        classes,
        read_table(args.dedup_items, "dedup items"),
        options,
        image_size(stats),
        offsets,
    )
    out = Path(args.out_dir)
    write_npy(out / "targets.npy", targets)
    write_csv(out / "selection.csv", selection)
    write_json(
        out / "summary.json",
        with_provenance({**summary, "source": args.test_dir}, stage_provenance(options)),
    )
    stage_log.info(
        "pseudo-labels: %d of %d test images selected", summary["n_selected"], len(selection)
    )
