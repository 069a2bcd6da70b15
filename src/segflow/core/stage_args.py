"""A stage's arguments: the command-line pieces several stages share, and the provenance
record of the options a stage ran with, which its metrics and summary JSON files carry.

Command line (``segflow <stage> --help`` shows them): each stage module exposes
``add_arguments(parser)`` and ``run(args)`` next to its logic (:mod:`segflow.stages` lists
them); the helpers below add the flags that recur across stages and read them back. No torch
here: the GPU slot (:func:`segflow.core.devices.compute`) lives with the devices.

Provenance: which code, seed and options made a metrics or summary JSON file. Every such file a
stage writes carries one block under :data:`PROVENANCE_KEY`::

    "provenance": {"segflow_version": "0.1.0", "seed": 42, "config_hash": "<sha256 hex>"}

* ``segflow_version``: :data:`segflow.__version__` of the code that wrote the file.
* ``seed``: the stage's own seed option (``folds.seed``, ``train.seed``, ``stack.seed``), or
  ``None`` for the stages that have no randomness: ingest, dedup, preprocess, evaluate-oof,
  tune-postprocess, blend, select-pseudo and choose give the same output for the same input
  without one.
* ``config_hash``: the SHA-256 of the options the stage ran with — the config values its rule
  passes, never input or output paths, so the same config gives the same hash in any folder
  (:func:`options_hash`; a stage without options hashes the empty mapping). Training records
  :func:`segflow.model.training.checkpointing.config_hash`, the digest that also guards its resume files.

Everything here is deterministic: the same options give byte-identical JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from segflow import __version__
from segflow.core.errors import SegflowError

# The command line's logger: stage messages read `segflow: ...` whichever module logs them.
stage_log = logging.getLogger("segflow")
# The key of the provenance block in a metrics or summary JSON.
PROVENANCE_KEY = "provenance"


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


def options_hash(options: Any) -> str:
    """The SHA-256 hex digest of ``options`` as canonical JSON (keys sorted).

    Args:
        options: an options dataclass (hashed as :func:`dataclasses.asdict`) or a JSON-able
            mapping; values JSON does not know are hashed as their ``str``.

    Returns:
        64 hex characters.
    """
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = dataclasses.asdict(options)
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def provenance(seed: int | None, config_hash: str) -> dict[str, Any]:
    """The provenance block of a metrics or summary JSON.

    Args:
        seed: the stage's seed option; None for a stage without randomness.
        config_hash: the digest of the stage's options (:func:`options_hash`, or training's
            :func:`segflow.model.training.checkpointing.config_hash`).

    Returns:
        ``{"segflow_version", "seed", "config_hash"}``.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    return {"segflow_version": __version__, "seed": seed, "config_hash": config_hash}


def stage_provenance(options: Any, seed: int | None = None) -> dict[str, Any]:
    """:func:`provenance` of a stage run with ``options`` (hashed by :func:`options_hash`).

    Args:
        options: the stage's options dataclass or mapping (no paths).
        seed: the stage's seed option; None (the default) for a stage without randomness.
    """
    return provenance(seed, options_hash(options))


def with_provenance(payload: Mapping[str, Any], block: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` with ``block`` added under :data:`PROVENANCE_KEY` (a new dict).

    Raises:
        ValueError: ``payload`` already has a ``provenance`` key of its own.
    """
    if PROVENANCE_KEY in payload:
        raise ValueError(f"payload already has a {PROVENANCE_KEY!r} key")
    return {**payload, PROVENANCE_KEY: dict(block)}
