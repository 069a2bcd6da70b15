"""The apply-blend stage: blend's tuned weights applied to the experiments' test predictions.

:mod:`segflow.ensemble.blend` tunes the weights on OOF (``weights.json``); this stage reads
them with the experiments' fold-merged test predictions and writes the ``ensemble``
candidate's test prediction (``test/ensemble/round<r>``), so a change of the test set reruns
this stage only, never the weights' search.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from segflow.artifacts.arrays import read_classes
from segflow.artifacts.layout import group_by_experiment
from segflow.artifacts.predictions import Prediction, read_fold_predictions, write_prediction
from segflow.core.errors import SegflowError
from segflow.core.stage_args import add_experiment_dirs, add_stats, stage_log
from segflow.ensemble.blend import BlendWeights, read_blend_weights
from segflow.ensemble.candidates import check_aligned
from segflow.ensemble.weights import blend_predictions, vote_predictions


def apply_blend(
    names: Sequence[str],
    test: Sequence[Prediction],
    blend: BlendWeights,
    n_classes: int,
) -> Prediction:
    """The experiments' test predictions blended with blend's weights (or their majority
    vote, as blend's mode says).

    Args:
        names: the experiments, in the order of ``test``.
        test: each experiment's fold-merged test prediction, row-aligned.
        blend: blend's weights and mode (:func:`segflow.ensemble.blend.read_blend_weights`)
            for the experiments of ``names``; applied in the order of ``names``.
        n_classes: the number of classes.

    Returns:
        The ensemble's test prediction.

    Raises:
        SegflowError: the weights were tuned for other experiments, or the predictions are
            not aligned.
    """
    if sorted(blend.weights) != sorted(names):
        raise SegflowError(
            f"the blend weights are for {', '.join(blend.weights)}, the test predictions for "
            f"{', '.join(names)}; rerun blend"
        )
    check_aligned(test, names, "test predictions")
    if blend.mode == "vote":
        return vote_predictions(test, n_classes)
    return blend_predictions(test, [blend.weights[name] for name in names], n_classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow apply-blend``'s flags."""
    add_experiment_dirs(parser, oof=False)
    add_stats(parser)
    parser.add_argument("--weights", required=True, help="blend's weights.json")
    parser.add_argument("--out-test", required=True, help="blended test probs.npy to write")


def run(args: argparse.Namespace) -> None:
    """``segflow apply-blend``: write the ensemble's test prediction (probs.npy, ids.csv)."""
    classes, _ = read_classes(args.stats)
    blend = read_blend_weights(args.weights)
    test = [
        read_fold_predictions(dirs, args.fold_merge)
        for dirs in group_by_experiment(args.test_dirs, len(args.names), "test folders")
    ]
    blended = apply_blend(args.names, test, blend, len(classes))
    write_prediction(Path(args.out_test).parent, blended.ids, blended.probs, blended.uncertainty)
    stage_log.info(
        "ensemble test prediction of %d images: %s, weights %s",
        len(blended.ids),
        blend.mode,
        blend.weights,
    )
