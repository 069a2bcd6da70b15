"""A hyperparameter search's config (``search.<study>``): its space, checks and identity.

A study searches fields of one experiment (``base``); each entry of ``space`` names a field by
its dotted path in the experiment (``train.lr``, ``model.encoder``, ``loss.lovasz``,
``augment``) and a distribution:

- ``{uniform: [low, high]}``, ``{log_uniform: [low, high]}`` (low > 0): a float;
- ``{int_uniform: [low, high]}``: an integer, both ends included;
- ``{choice: [a, b, ...]}``: one of the listed values.

:func:`check_search` refuses, before any job, an unknown field, an empty range or a value
that field cannot take (naming ``search.<study>.space.<path>``). :func:`study_id` names the
study by a hash of what its trials mean (the base experiment, the space and how trials are
trained and sampled): editing any of it starts a new study, editing ``n_trials`` or
``workers`` continues the same one. :func:`apply_params` turns a trial's values into the
experiment it trains. No torch here unless a check needs the model code (the encoder names).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from segflow.core.errors import SegflowError

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "hyperband")
# Settings that change what a trial trains, scores or samples: part of the study's identity.
# n_trials, workers, storage and heartbeat_seconds are not (more trials continue a study).
IDENTITY_KEYS = (
    "base",
    "space",
    "sampler",
    "pruner",
    "pruner_startup_trials",
    "folds",
    "trial_epochs",
    "seed",
)
# Fields a study may not search: they shape the workflow's jobs (a refit, the stage a model
# starts from) or the search itself (what is monitored, how long a trial trains).
FORBIDDEN = ("refit", "train.init_from", "train.monitor", "train.epochs")
EXPERIMENT_SECTIONS = ("model", "loss", "ohem_fraction", "augment", "train")


def check_search(search: Mapping[str, Any], experiments: Mapping[str, Any], n_folds: int) -> None:
    """Check every study of the ``search`` config section (config time, before any job).

    Args:
        search: ``search`` (study -> settings; the schema's defaults filled in).
        experiments: the configured ``experiments``.
        n_folds: ``folds.n_folds``.

    Raises:
        SegflowError: one line naming the bad key (``search.<study>.space.<path>`` for a
            field, an empty range or a value that field does not take).
    """
    for name, settings in search.items():
        key = f"search.{name}"
        if name in experiments:
            raise SegflowError(
                f"{key}: the study's best trial becomes experiment {name!r}, which is already "
                "configured under experiments; rename the study"
            )
        base = settings["base"]
        if base not in experiments:
            raise SegflowError(
                f"{key}.base: unknown experiment {base!r}; configured: {', '.join(experiments)}"
            )
        bad = [f for f in settings["folds"] if not 0 <= f < n_folds]
        if bad:
            raise SegflowError(
                f"{key}.folds: fold {bad[0]} does not exist (folds.n_folds is {n_folds})"
            )
        if len(set(settings["folds"])) != len(settings["folds"]):
            raise SegflowError(f"{key}.folds: a fold is listed twice")
        base_values = experiments[base]
        has_init = ((base_values.get("train") or {}).get("init_from")) is not None
        for path, spec in settings["space"].items():
            where = f"{key}.space.{path}"
            _check_path(path, where, has_init)
            candidates = _check_distribution(spec, where)
            for value in candidates:
                _check_value(name, base_values, path, value, where)
        if settings["sampler"] == "grid":
            ranged = [p for p, spec in settings["space"].items() if "choice" not in spec]
            if ranged:
                raise SegflowError(
                    f"{key}.space.{ranged[0]}: sampler grid searches choice lists only"
                )
        if settings["sampler"] == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise SegflowError(
                    f"{key}.sampler: cmaes needs the cmaes package (pip install cmaes)"
                ) from None


def _check_path(path: str, where: str, has_init: bool) -> None:
    """An experiment field that exists and may be searched."""
    from segflow.model.models import ModelSpec
    from segflow.model.training.losses import LOSSES
    from segflow.model.training.train_options import TrainOptions

    parts = path.split(".")
    if any(not part for part in parts):
        raise SegflowError(f"{where}: empty part in the field path")
    for forbidden in FORBIDDEN:
        if path == forbidden or path.startswith(forbidden + "."):
            raise SegflowError(
                f"{where}: {forbidden} cannot be searched (it shapes the workflow or the search)"
            )
    section = parts[0]
    if section not in EXPERIMENT_SECTIONS:
        raise SegflowError(
            f"{where}: unknown experiment field {section!r}; valid: "
            + ", ".join(EXPERIMENT_SECTIONS)
        )
    if section in ("augment", "ohem_fraction"):
        if len(parts) > 1:
            raise SegflowError(f"{where}: {section} has no sub-fields")
        return
    if len(parts) < 2:
        raise SegflowError(f"{where}: name a field of {section} (e.g. {section}.<field>)")
    fields: tuple[str, ...]
    if section == "model":
        fields = tuple(
            f.name for f in _fields(ModelSpec) if f.name not in ("in_channels", "classes")
        )
        if has_init:
            raise SegflowError(
                f"{where}: the base experiment starts from another (train.init_from), which "
                "needs the same model; model fields cannot be searched"
            )
    elif section == "train":
        fields = tuple(f.name for f in _fields(TrainOptions))
    else:
        fields = tuple(LOSSES)
    if parts[1] not in fields:
        raise SegflowError(
            f"{where}: unknown field {section}.{parts[1]}; valid: {', '.join(sorted(fields))}"
        )
    free = section == "model" and parts[1] == "extra"
    deep_loss = section == "loss" and len(parts) == 3
    if len(parts) > 2 and not free and not deep_loss:
        raise SegflowError(f"{where}: {section}.{parts[1]} has no sub-field {parts[2]!r}")
    if deep_loss and parts[2] != "weight":
        from segflow.model.training.losses import TERM_OPTIONS

        options = TERM_OPTIONS.get(parts[1], ())
        if parts[2] not in options:
            raise SegflowError(
                f"{where}: loss term {parts[1]} has no option {parts[2]!r}; valid: weight"
                + "".join(f", {o}" for o in options)
            )


def _fields(cls: type) -> tuple[Any, ...]:
    import dataclasses

    return dataclasses.fields(cls)


def _check_distribution(spec: Any, where: str) -> list[Any]:
    """The distribution's values to check against the field (ends of a range, every choice).

    Raises:
        SegflowError: a missing or unknown distribution, or an empty range.
    """
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SegflowError(f"{where}: give exactly one of {', '.join(DISTRIBUTIONS)}")
    ((kind, values),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SegflowError(
            f"{where}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise SegflowError(f"{where}: choice needs a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SegflowError(f"{where}: choice lists a value twice")
        return list(values)
    if not (isinstance(values, list) and len(values) == 2):
        raise SegflowError(f"{where}: {kind} needs [low, high]")
    low, high = values
    numeric = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    if not numeric:
        raise SegflowError(f"{where}: {kind} bounds must be finite numbers, got {values!r}")
    if kind == "int_uniform" and not all(isinstance(v, int) for v in values):
        raise SegflowError(f"{where}: int_uniform bounds must be integers, got {values!r}")
    if not low < high:
        raise SegflowError(f"{where}: empty range [{low}, {high}] (low must be below high)")
    if kind == "log_uniform" and low <= 0:
        raise SegflowError(f"{where}: log_uniform needs low > 0, got {low}")
    return [low, high]


def _check_value(study: str, base: Mapping[str, Any], path: str, value: Any, where: str) -> None:
    """Whether the base experiment with ``path`` set to ``value`` is a valid experiment."""
    from segflow.model.experiment import parse_experiment
    from segflow.model.training.augment import PRESETS

    values = apply_params(base, {path: value})
    if path == "augment" and isinstance(value, str) and value not in PRESETS:
        raise SegflowError(
            f"{where}: augment {value!r} is not a preset; valid: {', '.join(PRESETS)}"
        )
    try:
        experiment = parse_experiment(study, values, in_channels=1)
    except (SegflowError, TypeError, ValueError) as exc:
        raise SegflowError(f"{where}: {value!r} is not valid there ({_one_line(exc)})") from None
    if path == "model.encoder":
        from segflow.model.models import _check_encoder

        try:
            _check_encoder(str(experiment.model.encoder))
        except SegflowError as exc:
            raise SegflowError(
                f"{where}: {value!r} is not valid there ({_one_line(exc)})"
            ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment a trial trains: ``base`` with each dotted path set to its value.

    A loss term given as a mapping (``{weight: w, <option>: ...}``) keeps its options when the
    path names the term itself: the value becomes its ``weight``.

    Args:
        base: the base experiment's mapping.
        params: dotted field path -> value.

    Returns:
        A new mapping (``base`` is not changed).
    """
    values = copy.deepcopy(dict(base))
    for path, value in params.items():
        parts = path.split(".")
        node = values
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        last = parts[-1]
        current = node.get(last)
        if parts[0] == "loss" and len(parts) == 2 and isinstance(current, dict):
            node[last] = {**current, "weight": value}
        else:
            node[last] = value
    return values


def identity(settings: Mapping[str, Any], base_values: Mapping[str, Any]) -> dict[str, Any]:
    """What a study's trials mean: its :data:`IDENTITY_KEYS`, the base experiment's values in
    place of its name (without ``refit``, which no trial trains)."""
    ident = {key: settings[key] for key in IDENTITY_KEYS}
    ident["base"] = {k: v for k, v in base_values.items() if k != "refit"}
    return ident


def study_id(name: str, settings: Mapping[str, Any], base_values: Mapping[str, Any]) -> str:
    """``<name>-<hash>``: the study's name with 12 hex digits of its :func:`identity`.

    Args:
        name: the study (``search.<name>``).
        settings: its settings.
        base_values: the base experiment's mapping.

    Returns:
        The id, the Optuna study name and the journal file's name.
    """
    text = json.dumps(identity(settings, base_values), sort_keys=True)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def direction(base_values: Mapping[str, Any]) -> str:
    """``minimize`` when the base experiment monitors ``val_loss``, else ``maximize``."""
    from segflow.model.training.train_options import TrainOptions

    monitor = (base_values.get("train") or {}).get("monitor", TrainOptions().monitor)
    return "minimize" if monitor == "val_loss" else "maximize"
