"""Provenance of the metrics and summary JSON files: which code, seed and options made them.

Every metrics or summary JSON a stage writes carries one block under :data:`PROVENANCE_KEY`::

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

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from segflow import __version__

PROVENANCE_KEY = "provenance"


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
