"""Starting from earlier weights: an earlier stage's checkpoint (``train.init_from``) and a frozen
encoder (``train.freeze_encoder_epochs``).

Two-stage training (the TGS Salt winners' recipe: BCE + Dice, then Lovasz fine-tuning) starts
each fold of the second experiment from the same fold's ``model.pt`` of the first:
:func:`load_init_checkpoint` copies its weights (BatchNorm statistics included) into the freshly
built model, after checking that it is the same network. Only the weights travel; optimizer and
learning-rate schedule start fresh. The file's SHA-256 joins the resume configuration hash, so
a retrained first stage never resumes a second stage started from its old weights.

:func:`set_encoder_frozen` turns the encoder's gradients off (and its BatchNorm layers to eval
mode, so their running statistics stay those loaded) for the first epochs of a fine-tuning run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from segflow.core.errors import SegflowError
from segflow.model.models import ModelSpec, SnapshotEnsemble, load_checkpoint

# ModelSpec fields that decide the network's parameters; encoder_weights only says where the
# first stage's encoder started, which the loaded weights replace anyway.
_SPEC_KEYS = (
    "arch",
    "encoder",
    "in_channels",
    "classes",
    "aux_head",
    "decoder_attention",
    "extra",
    "aux_pooling",
    "aux_dropout",
    "aux_gem_p",
    "aux_gem_learnable",
)


def _canonical(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples -> lists), for comparing stored specs."""
    return json.loads(json.dumps(value, sort_keys=True))


def spec_mismatch(stored: dict[str, Any], spec: ModelSpec) -> str | None:
    """The first model key in which a checkpoint's stored spec differs from ``spec``.

    Args:
        stored: the checkpoint's ``spec`` (a dict).
        spec: this experiment's model.

    Returns:
        ``"model.<key> <stored> != <ours>"``, or None when the networks are the same.
    """
    ours = _canonical(dataclasses.asdict(spec))
    # A stored spec leaves out the aux-head options at their defaults (ModelSpec.to_dict).
    theirs = {**_canonical(dataclasses.asdict(ModelSpec())), **_canonical(stored)}
    for key in _SPEC_KEYS:
        if theirs.get(key) != ours.get(key):
            return f"model.{key} {theirs.get(key)!r} != {ours.get(key)!r}"
    return None


def load_init_checkpoint(
    model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str]
) -> dict[str, Any]:
    """Copy the weights of an earlier stage's ``model.pt`` into ``model``.

    Args:
        model: the freshly built model of ``spec`` (on any device).
        spec: this experiment's model spec.
        path: the earlier stage's checkpoint (:func:`segflow.model.models.save_checkpoint`).

    Returns:
        The checkpoint's metadata (fold, epoch, score, ...), without its weights.

    Raises:
        SegflowError: a missing or unreadable file, or a checkpoint of another network
            (architecture, encoder, channels, classes, heads or extra arguments).
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"train.init_from: {path} does not exist (train the first stage first)")
    loaded, metadata = load_checkpoint(path)
    mismatch = spec_mismatch(metadata["spec"], spec)
    if mismatch is not None:
        raise SegflowError(
            f"train.init_from: {path} holds another network than this experiment's ({mismatch}); "
            "both stages need the same model (arch, encoder, channels, classes, heads)"
        )
    if isinstance(loaded, SnapshotEnsemble):
        raise SegflowError(
            f"train.init_from: {path} is a snapshot ensemble of {len(loaded.members)} networks "
            "(train.snapshot_ensemble), not one network to start from"
        )
    model.load_state_dict(loaded.state_dict(), strict=True)
    return metadata


def checkpoint_normalisation(
    metadata: dict[str, Any], channels: int, path: str | os.PathLike[str]
) -> tuple[list[float], list[float]]:
    """The input (mean, std) an earlier stage's weights were trained with.

    A second stage is fed what its loaded weights saw (a first stage with pretrained encoder
    weights: their normalisation, whatever this experiment's ``encoder_weights`` says), and
    stores it in its own ``model.pt`` for prediction.

    Args:
        metadata: :func:`load_init_checkpoint`'s result.
        channels: the model's input channels.
        path: the checkpoint, for messages.

    Returns:
        (mean, std), one value per channel, in [0, 1] units.

    Raises:
        SegflowError: the checkpoint has no per-channel mean/std.
    """
    mean, std = metadata.get("mean"), metadata.get("std")
    if not (
        isinstance(mean, list | tuple)
        and isinstance(std, list | tuple)
        and len(mean) == len(std) == channels
    ):
        raise SegflowError(
            f"train.init_from: {path} stores no input normalisation for {channels} channel(s) "
            f"(mean {mean!r}, std {std!r})"
        )
    return [float(v) for v in mean], [float(v) for v in std]


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder of an smp model (``model.encoder``).

    Raises:
        SegflowError: the model has no ``encoder`` submodule.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise SegflowError(
            f"train.freeze_encoder_epochs: {type(model).__name__} has no encoder to freeze"
        )
    return encoder


def set_encoder_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze the encoder; call after ``model.train()`` and before the forward pass.

    Frozen: the encoder's parameters need no gradient (so the optimizer, which skips parameters
    without one, neither steps nor decays them) and its BatchNorm layers run in eval mode (their
    running statistics stay those loaded). Unfrozen: gradients on again; the BatchNorm mode is
    then the model's own.

    Args:
        model: an smp model.
        frozen: whether the encoder is frozen this epoch.
    """
    encoder = encoder_of(model)
    for parameter in encoder.parameters():
        parameter.requires_grad_(not frozen)
    if frozen:
        for module in encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
