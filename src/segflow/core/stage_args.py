"""Command-line pieces that several stages share (``segflow <stage> --help`` shows them).

Each stage module exposes ``add_arguments(parser)`` and ``run(args)`` next to its logic
(:mod:`segflow.stages` lists them); these helpers add the flags that recur across stages and
read them back. No torch here: the GPU slot (:func:`segflow.core.devices.compute`) lives with
the devices.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from segflow.core.errors import SegflowError

# The command line's logger: stage messages read `segflow: ...` whichever module logs them.
stage_log = logging.getLogger("segflow")


def add_stage_tables(parser: argparse.ArgumentParser) -> None:
    """``--manifest`` (ingest) and ``--dedup-items`` (dedup)."""
    parser.add_argument("--manifest", required=True, help="manifest Parquet from ingest")
    parser.add_argument("--dedup-items", required=True, help="items Parquet from dedup")


def add_workers(parser: argparse.ArgumentParser) -> None:
    """``--workers``: worker processes."""
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")


def add_stats(parser: argparse.ArgumentParser) -> None:
    """``--stats``: preprocess's stats.json."""
    parser.add_argument(
        "--stats", required=True, help="preprocess's stats.json (the class names, in bit order)"
    )


def add_fold_merge(parser: argparse.ArgumentParser) -> None:
    """``--fold-merge``: how the fold models' test predictions are merged."""
    parser.add_argument("--fold-merge", default="mean", choices=("mean", "gmean"))


def add_experiment_dirs(
    parser: argparse.ArgumentParser, oof: bool = True, test: bool = True
) -> None:
    """The experiments' prediction folders that blend and stack (``oof``: their fits, on
    the OOF side) and apply-blend and apply-stack (``test``: the test side) read."""
    parser.add_argument("--names", nargs="+", required=True, help="experiment names")
    if oof:
        parser.add_argument("--oof-dirs", nargs="+", required=True, help="evaluate-oof folders")
        parser.add_argument("--n-folds", type=int, required=True)
    if test:
        parser.add_argument(
            "--test-dirs", nargs="+", required=True, help="predict-test folders, experiment-major"
        )
    add_fold_merge(parser)


def check_names(args: argparse.Namespace) -> None:
    """One ``--oof-dirs`` folder per ``--names`` experiment.

    Raises:
        SegflowError: the counts differ.
    """
    if len(args.oof_dirs) != len(args.names):
        raise SegflowError(f"{len(args.names)} names but {len(args.oof_dirs)} OOF folders")


def json_mapping(text: str, flag: str) -> dict[str, Any]:
    """A JSON object given on the command line.

    Raises:
        SegflowError: not JSON, or not a mapping (naming ``flag``).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SegflowError(f"{flag} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise SegflowError(f"{flag} must be a JSON mapping")
    return value
