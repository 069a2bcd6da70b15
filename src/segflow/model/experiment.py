"""One experiment of the config (``experiments.<name>``): model, loss, augmentation, training.

The workflow passes an experiment to ``segflow train`` as JSON; this module turns it into the
typed option objects, with errors that name the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segflow.core.errors import SegflowError

EXPERIMENT_KEYS = ("model", "loss", "ohem_fraction", "augment", "train", "refit")
DEFAULT_LOSS = {"bce": 1.0, "dice": 1.0}
# An experiment's name is a results folder and the rules' {experiment} wildcard (their
# wildcard_constraints use this pattern): a name outside it would match no rule.
EXPERIMENT_NAME_PATTERN = "[A-Za-z0-9_.-]+"


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment: what ``segflow train`` needs besides data paths."""

    name: str
    model: Any  # segflow.model.models.ModelSpec
    loss: dict[
        str, Any
    ]  # term -> weight, or -> {weight, options} (segflow.model.training.losses.parse_loss)
    ohem_fraction: float | None
    augment: Any
    train: Any  # segflow.model.training.train_options.TrainOptions
    refit: Any = None  # segflow.model.training.refit.RefitOptions


def _dataclass_from(cls: type, values: dict[str, Any], key: str) -> Any:
    if not isinstance(values, dict):
        raise SegflowError(f"{key} must be a mapping, got {type(values).__name__}")
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise SegflowError(f"unknown key {key}.{unknown[0]}; valid: {', '.join(sorted(fields))}")
    return cls(**values)


def parse_experiment(
    name: str, values: dict[str, Any], in_channels: int, classes: int = 1
) -> Experiment:
    """Validate and type an experiment mapping.

    Args:
        name: the experiment's name (config key).
        values: its mapping (model, loss, ohem_fraction, augment, train).
        in_channels: channels of the preprocessed images (the model's input).
        classes: mask classes of the data (the model's output channels).

    Returns:
        The parsed :class:`Experiment`.
    """
    from segflow.model.models import ModelSpec
    from segflow.model.training.losses import parse_loss
    from segflow.model.training.refit import RefitOptions
    from segflow.model.training.train_options import TrainOptions

    key = f"experiments.{name}"
    unknown = sorted(set(values) - set(EXPERIMENT_KEYS))
    if unknown:
        raise SegflowError(f"unknown key {key}.{unknown[0]}; valid: {', '.join(EXPERIMENT_KEYS)}")
    model_values = values.get("model", {})
    for derived in ("in_channels", "classes"):
        if isinstance(model_values, dict) and derived in model_values:
            raise SegflowError(
                f"{key}.model.{derived} is set by the data (preprocess stats.json); remove it"
            )
    model_values = {**model_values, "in_channels": in_channels, "classes": classes}
    return Experiment(
        name=name,
        model=_dataclass_from(ModelSpec, model_values, f"{key}.model"),
        loss=parse_loss(values.get("loss", DEFAULT_LOSS), f"{key}.loss", classes),
        ohem_fraction=values.get("ohem_fraction"),
        augment=values.get("augment", "d4"),
        train=_dataclass_from(TrainOptions, values.get("train", {}), f"{key}.train"),
        refit=_dataclass_from(RefitOptions, values.get("refit", {}), f"{key}.refit"),
    )


def check_experiment_names(
    experiments: dict[Any, Any], run_experiments: list[Any] | None = None
) -> None:
    """Check that every configured experiment's name can be a folder and a rule wildcard.

    Args:
        experiments: the config's ``experiments`` mapping.
        run_experiments: the config's ``run_experiments`` (None: every experiment runs).

    Raises:
        SegflowError: one line naming ``experiments.<name>`` (and ``run_experiments`` when the
            name is listed there) for a name outside :data:`EXPERIMENT_NAME_PATTERN` (a space,
            '/', ':', ...) or a name that is ``.`` or ``..``.
    """
    for name in experiments:
        valid = isinstance(name, str) and re.fullmatch(EXPERIMENT_NAME_PATTERN, name)
        if valid and name not in (".", ".."):
            continue
        listed = " and in run_experiments" if name in (run_experiments or ()) else ""
        raise SegflowError(
            f"experiments.{name}: the experiment name {name!r} may contain only letters, digits, "
            "'_', '.' and '-' and may not be '.' or '..' (it names result folders and rule "
            f"wildcards); rename it here{listed}"
        )


def check_init_from(experiments: dict[str, Any]) -> None:
    """Check every ``train.init_from`` of the config's experiments (config time, before any job).

    It must name another configured experiment, the links may not form a cycle, the source may
    not save a snapshot ensemble, and both experiments' ``model`` sections must build the same
    network (``encoder_weights`` aside: the loaded weights replace it). Call after the schema
    filled in the model defaults.

    Args:
        experiments: the config's ``experiments`` mapping.

    Raises:
        SegflowError: one line naming the offending ``experiments.<name>.train.init_from``.
    """
    links = {}
    for name, values in experiments.items():
        source = ((values or {}).get("train") or {}).get("init_from")
        if source is None:
            continue
        key = f"experiments.{name}.train.init_from"
        if source == name:
            raise SegflowError(f"{key}: an experiment cannot start from itself")
        if source not in experiments:
            raise SegflowError(
                f"{key}: unknown experiment {source!r}; configured: {', '.join(experiments)}"
            )
        links[name] = source
    for start in links:
        path = [start]
        while path[-1] in links:
            nxt = links[path[-1]]
            if nxt in path:
                cycle = " -> ".join([*path[path.index(nxt) :], nxt])
                raise SegflowError(
                    f"experiments.{path[-1]}.train.init_from: cycle {cycle} (every chain of "
                    "init_from must end at an experiment trained from scratch)"
                )
            path.append(nxt)
    for name, source in links.items():
        members = ((experiments[source] or {}).get("train") or {}).get("snapshot_ensemble") or 0
        if isinstance(members, int) and members >= 2:
            raise SegflowError(
                f"experiments.{name}.train.init_from: {source!r} saves a snapshot ensemble (its "
                f"train.snapshot_ensemble is {members}), not one network to start from"
            )
        ours = experiments[name].get("model") or {}
        theirs = experiments[source].get("model") or {}
        for model_key in sorted((set(ours) | set(theirs)) - {"encoder_weights"}):
            if ours.get(model_key) != theirs.get(model_key):
                raise SegflowError(
                    f"experiments.{name}.train.init_from: {source!r} builds another network "
                    f"(its model.{model_key} is {theirs.get(model_key)!r}, this experiment's "
                    f"{ours.get(model_key)!r}); both stages need the same model"
                )


def load_experiment_values(text_or_path: str) -> dict[str, Any]:
    """An experiment mapping from inline JSON or from a JSON/YAML file path."""
    path = Path(text_or_path)
    if not text_or_path.lstrip().startswith("{") and path.is_file():
        values = yaml.safe_load(path.read_text())
    else:
        try:
            values = json.loads(text_or_path)
        except json.JSONDecodeError as error:
            raise SegflowError(f"experiment is neither a file nor valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise SegflowError("an experiment must be a mapping")
    return values
