"""Workflow config validation with one-line messages that name the key.

Snakemake's own ``validate`` reports a schema error as the whole sub-schema and instance
(a hundred lines for a typo in ``data``); :func:`check_config` runs first and stops with one
line naming the offending key, and a close match for an unknown one:
``invalid config: unknown key data.train_image (did you mean data.train_images?)``, or the valid
keys when none is close: ``unknown key experiments.x.loss.dice.per_image (valid: weight, log_loss,
smooth)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from segflow.core.errors import SegflowError


def _key(path: Any) -> str:
    """Dotted config key of a jsonschema path (``data.classes[2]``); ``<top level>`` if empty."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line for one schema error, naming the key."""
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = list(error.schema.get("properties", {}))  # in schema order
        unknown = sorted(str(key) for key in error.instance if key not in allowed)
        if unknown:
            prefix = "" if where == "<top level>" else f"{where}."
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid: {', '.join(allowed)}"
            return f"unknown key {prefix}{unknown[0]} ({hint})"
    return f"{where}: {error.message}"


def config_errors(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every schema violation of ``config`` as a one-line message, in key order.

    Args:
        config: the merged workflow config (before defaults are filled in).
        schema: the JSON schema (``workflow/schemas/config.schema.yaml``).

    Returns:
        One message per violation; empty when the config is valid.
    """
    validator_class = jsonschema.validators.validator_for(schema)
    errors = validator_class(schema).iter_errors(dict(config))
    ordered = sorted(errors, key=lambda error: [str(part) for part in error.absolute_path])
    return [_describe(error) for error in ordered]


def check_config(config: Mapping[str, Any], schema_path: str | Path) -> None:
    """Stop on an invalid config with one line naming the first bad key.

    Args:
        config: the merged workflow config.
        schema_path: the YAML JSON-schema file.

    Raises:
        SegflowError: an unknown key, a wrong type or value, or a missing required key.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    messages = config_errors(config, schema)
    if messages:
        more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
        raise SegflowError(f"invalid config: {messages[0]}{more}")


def train_folds(folds: Mapping[str, Any]) -> list[int]:
    """The folds that train under the config's ``folds`` section, checked against ``n_folds``.

    Args:
        folds: the ``folds`` section (``n_folds``; ``train_folds`` null or absent for every
            fold, else a list of validation fold indices).

    Returns:
        The trained folds, ascending: ``0 .. n_folds-1`` when ``train_folds`` is null.

    Raises:
        SegflowError: one line naming ``folds.train_folds``: not a list, empty, an entry that
            is not an integer, out of range or listed twice.
    """
    n_folds = int(folds["n_folds"])
    value = folds.get("train_folds")
    if value is None:
        return list(range(n_folds))
    key = "invalid config: folds.train_folds"
    if not isinstance(value, list):
        raise SegflowError(f"{key} must be a list of fold indices or null, got {value!r}")
    if not value:
        raise SegflowError(
            f"{key} is empty: list at least one fold (e.g. [0]), or null for every fold"
        )
    seen: set[int] = set()
    for i, fold in enumerate(value):
        if isinstance(fold, bool) or not isinstance(fold, int):
            raise SegflowError(f"{key}[{i}]: {fold!r} is not a fold index (an integer)")
        if not 0 <= fold < n_folds:
            raise SegflowError(
                f"{key}[{i}]: fold {fold} does not exist (folds.n_folds is {n_folds}: "
                f"folds 0 to {n_folds - 1})"
            )
        if fold in seen:
            raise SegflowError(f"{key}[{i}]: fold {fold} is listed twice")
        seen.add(fold)
    return sorted(seen)
