"""Segmentation models: segmentation-models-pytorch (smp) architectures built from a small spec.

A :class:`ModelSpec` names the architecture, the encoder and where its weights come from; it is
stored in every checkpoint, so :func:`load_checkpoint` rebuilds the exact network without the
caller knowing how it was configured. Nothing here downloads unless a spec explicitly asks for
``encoder_weights: imagenet`` (or another smp tag); checkpoints are always rebuilt offline.
Weights that pip packages ship (``encoder_weights: package:<name>``) and the input
normalisation of pretrained weights are :mod:`segflow.model.pretrained`'s.

Input sizes: most smp models need height and width divisible by the encoder's output stride
(:func:`required_divisor`); PAN needs at least 8 times that (:func:`min_input_size`). Callers pad
to :func:`padded_size` and crop the logits back.

Training: DeepLabV3, DeepLabV3Plus, UPerNet and PAN apply BatchNorm after a global pooling, which fails in
training mode for a batch of one image — use batches of at least 2 (``drop_last``).

Snapshot ensembles (``train.snapshot_ensemble``): a checkpoint may hold several members' weights
(key ``snapshots``); :func:`load_checkpoint` then returns a :class:`SnapshotEnsemble`, which
behaves like one model whose logits are those of the members' mean probability.

Aux head (``model.aux_head``): smp's classification head on the deepest encoder features;
``aux_pooling`` picks its global pooling (``avg``, ``max`` or ``gem``: generalised mean,
:class:`GeM`, with a learnable or fixed exponent) and ``aux_dropout`` its dropout.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import segmentation_models_pytorch as smp
import torch

from segflow.core.atomic import write_torch
from segflow.core.errors import SegflowError, first_line
from segflow.core.late_options import published_options
from segflow.model.pretrained import (
    PACKAGE_PREFIX,
    WEIGHT_FILE_SUFFIXES,
    WEIGHT_PACKAGES,
    differs_only_in_input_channels,
    efficientnet_pytorch_to_timm,
    fold_rgb_kernel,
    is_efficientnet_pytorch,
    package_of_encoder,
    read_state_dict,
    weights_file,
)

ARCHITECTURES: dict[str, type[torch.nn.Module]] = {
    "Unet": smp.Unet,
    "UnetPlusPlus": smp.UnetPlusPlus,
    "FPN": smp.FPN,
    "Linknet": smp.Linknet,
    "DeepLabV3": smp.DeepLabV3,
    "DeepLabV3Plus": smp.DeepLabV3Plus,
    "PAN": smp.PAN,
    "MAnet": smp.MAnet,
    "PSPNet": smp.PSPNet,
    "UPerNet": smp.UPerNet,
    "Segformer": smp.Segformer,
}

CHECKPOINT_FORMAT = "segflow-model-1"
ENCODER_LIST_URL = "https://smp.readthedocs.io/en/latest/encoders.html"

# Constructor arguments that ModelSpec fields own; ``extra`` may not set them behind its back.
# ``activation`` is refused because everything downstream (losses, prediction) expects logits.
_MANAGED_KWARGS = {
    "encoder_name": "encoder",
    "encoder_weights": "encoder_weights",
    "in_channels": "in_channels",
    "classes": "classes",
    "aux_params": "aux_head",
    "decoder_attention_type": "decoder_attention",
    "activation": None,
}
_RESERVED_CHECKPOINT_KEYS = ("format", "state_dict", "spec", "snapshots")

AUX_POOLINGS = ("avg", "max", "gem")
# smp's ClassificationHead default dropout: what an aux head got before aux_dropout existed.
SMP_AUX_DROPOUT = 0.2
_GEM_EPS = 1e-6


class GeM(torch.nn.Module):
    """Generalised-mean global pooling: ``(mean_hw clamp(x, eps) ** p) ** (1 / p)`` per channel.

    p = 1 is average pooling; as p grows it approaches max pooling. Inputs are clamped to
    ``eps`` first (the mean of powers needs non-negative values; encoder features after a ReLU
    already are).

    Args:
        p: the exponent (> 0).
        learnable: make p a trained parameter (else a fixed buffer).
        eps: lower clamp of the inputs.

    Shape:
        input: (N, C, H, W); output: (N, C, 1, 1).
    """

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = _GEM_EPS) -> None:
        super().__init__()
        tensor = torch.tensor([float(p)])
        if learnable:
            self.p = torch.nn.Parameter(tensor)
        else:
            self.register_buffer("p", tensor)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the input: eps ** p underflows float16 to 0, whose 1/p-th power
        # has an infinite gradient.
        with torch.autocast(x.device.type, enabled=False):
            p = self.p.float()
            pooled = torch.nn.functional.adaptive_avg_pool2d(
                x.float().clamp(min=self.eps).pow(p), 1
            )
            # A copy: the power's backward reads its output, which smp's head then changes in
            # place (Dropout(inplace=True)).
            return pooled.pow(1.0 / p).to(x.dtype, copy=True)

    def extra_repr(self) -> str:
        kind = "learnable" if isinstance(self.p, torch.nn.Parameter) else "fixed"
        return f"p={float(self.p.detach()[0]):.4g} ({kind}), eps={self.eps}"


@dataclass(frozen=True)
class ModelSpec:
    """What to build (config section ``model``).

    Attributes:
        arch: smp architecture, a key of :data:`ARCHITECTURES`.
        encoder: smp encoder name (``smp.encoders.get_encoder_names()``) or ``tu-<timm model>``.
        encoder_weights: None (random init), an smp pretrained tag such as ``"imagenet"``
            (downloads!), ``"package:<pip name>"`` (offline ImageNet weights that an installed
            package ships: :data:`segflow.model.pretrained.WEIGHT_PACKAGES`), or a path to a local
            ``.pt``/``.pth``/``.safetensors`` encoder state dict (or to an EfficientNet-PyTorch
            file such as those packages ship). Pretrained weights change the input normalisation
            (:func:`segflow.model.pretrained.input_normalisation`).
        in_channels: image channels.
        classes: output mask channels (logits).
        aux_head: add smp's image-level classification head (one logit per class, "this
            class's mask is non-empty").
        aux_pooling: the aux head's global pooling: ``avg`` (smp's default), ``max`` or
            ``gem`` (:class:`GeM`).
        aux_dropout: the aux head's dropout probability before its linear layer, in [0, 1)
            (0 = none; the default 0.2 is smp's).
        aux_gem_p: GeM's (initial) exponent, > 0 (``aux_pooling: gem`` only).
        aux_gem_learnable: train GeM's exponent with the network (else it stays ``aux_gem_p``).
        decoder_attention: decoder attention type (``"scse"``); Unet and UnetPlusPlus only.
        extra: further constructor keyword arguments (e.g. ``decoder_channels``), passed through.
    """

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    in_channels: int = 1
    classes: int = 1
    aux_head: bool = False
    decoder_attention: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    aux_pooling: str = "avg"
    aux_dropout: float = SMP_AUX_DROPOUT
    aux_gem_p: float = 3.0
    aux_gem_learnable: bool = True

    # Left out of the stored spec at their defaults: checkpoints and training hashes of models
    # without these options stay byte-identical (segflow.core.late_options.published_options).
    _omit_at_default: ClassVar[tuple[str, ...]] = (
        "aux_pooling",
        "aux_dropout",
        "aux_gem_p",
        "aux_gem_learnable",
    )

    def __post_init__(self) -> None:
        for name in ("arch", "encoder"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SegflowError(f"model.{name} must be a non-empty string")
        for name in ("in_channels", "classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SegflowError(f"model.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.aux_head, bool):
            raise SegflowError(f"model.aux_head must be true or false, got {self.aux_head!r}")
        for name in ("encoder_weights", "decoder_attention"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SegflowError(f"model.{name} must be a string or null, got {value!r}")
        if not isinstance(self.extra, Mapping):
            raise SegflowError(f"model.extra must be a mapping, got {type(self.extra).__name__}")
        if self.aux_pooling not in AUX_POOLINGS:
            raise SegflowError(
                f"model.aux_pooling: unknown pooling {self.aux_pooling!r}; valid: "
                f"{', '.join(AUX_POOLINGS)}"
            )
        if not _is_real(self.aux_dropout) or not 0.0 <= self.aux_dropout < 1.0:
            raise SegflowError(f"model.aux_dropout must be in [0, 1), got {self.aux_dropout!r}")
        if not _is_real(self.aux_gem_p) or not self.aux_gem_p > 0:
            raise SegflowError(f"model.aux_gem_p must be a number > 0, got {self.aux_gem_p!r}")
        if not isinstance(self.aux_gem_learnable, bool):
            raise SegflowError(
                f"model.aux_gem_learnable must be true or false, got {self.aux_gem_learnable!r}"
            )
        if not self.aux_head:
            changed = [name for name in self._omit_at_default if name in self._non_default()]
            if changed:
                raise SegflowError(f"model.{changed[0]} needs model.aux_head: true")

    def _non_default(self) -> set[str]:
        """Names of the fields whose value differs from the default."""
        return {
            f.name
            for f in dataclasses.fields(self)
            if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default
        }

    def to_dict(self) -> dict[str, Any]:
        """The spec as stored in checkpoints and hashed by training (the aux-head options only
        when set: specs without them give the same dict as before they existed)."""
        return published_options(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from a config section or a checkpoint's ``spec``; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SegflowError(
                f"model.{unknown[0]}: unknown key; valid keys: {', '.join(sorted(known))}"
            )
        values = dict(values)
        if "extra" in values:
            values["extra"] = dict(values["extra"] or {})
        return cls(**values)


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the smp model described by ``spec`` (in training mode, on the CPU).

    A local weights file (``encoder_weights`` ending in .pt, .pth or .safetensors, or the file
    of a ``package:<name>``) is read after building with random weights:
    ``torch.load(weights_only=True)`` or safetensors, then a strict load into ``model.encoder``.
    Its keys must be the encoder's own (``model.encoder.state_dict()``), or EfficientNet-PyTorch
    keys for a ``timm-tf_efficientnet_lite*`` encoder (translated by name,
    :func:`segflow.model.pretrained.efficientnet_pytorch_to_timm`). RGB first-convolution weights are
    adapted to ``in_channels`` (:func:`segflow.model.pretrained.fold_rgb_kernel`: for weights of known
    normalisation, folded consistently with it).

    Args:
        spec: architecture, encoder, weights, channels, heads.

    Returns:
        The model. Without ``aux_head`` it returns mask logits; with it, ``(mask logits, label
        logits)`` — use :func:`forward_logits` to get the mask either way.

    Shape:
        input: (N, in_channels, H, W), H and W multiples of :func:`required_divisor` and at least
        :func:`min_input_size`; mask logits: (N, classes, H, W); label logits: (N, 1).

    Raises:
        KeyError: unknown ``spec.arch`` (the message lists the valid names).
        SegflowError: unknown encoder, bad weights file, or options the architecture refuses.
    """
    cls = _architecture(spec.arch)
    _check_encoder(spec.encoder)
    local_weights = weights_file(spec.encoder_weights, spec.encoder)
    if spec.encoder_weights is not None and local_weights is None:
        _check_pretrained_tag(spec.encoder, spec.encoder_weights)
    kwargs = _constructor_kwargs(cls, spec)
    if local_weights is not None:
        kwargs["encoder_weights"] = None
    try:
        model = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # smp refuses some arch/encoder pairs (e.g. UnetPlusPlus + mit_b0) and bad option values.
        raise SegflowError(
            f"model: cannot build {spec.arch} with encoder {spec.encoder!r}: {exc}"
        ) from exc
    if spec.aux_head and spec.aux_pooling == "gem":
        _install_gem(model, spec)
    if local_weights is not None:
        _load_encoder_weights(model, local_weights, spec)
    return model


def mean_probability_logit(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``logit(mean_k sigmoid(logits[k]))``, computed without overflow for confident logits.

    ``log mean p = logsumexp(logsigmoid(z)) - log K`` and likewise for ``1 - p`` with ``-z``;
    the ``log K`` cancels. One member gives back its own logits.

    Args:
        logits: one tensor per member, all of one shape (any float dtype; computed in float32).

    Returns:
        The logits of the mean probability, float32.
    """
    if not logits:
        raise SegflowError("mean_probability_logit needs at least one member's logits")
    log_p = log_q = None  # running logsumexp of log(p_k) and log(1 - p_k)
    for z in logits:
        z = z.float()
        lp, lq = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
        log_p = lp if log_p is None else torch.logaddexp(log_p, lp)
        log_q = lq if log_q is None else torch.logaddexp(log_q, lq)
    return log_p - log_q


class SnapshotEnsemble(torch.nn.Module):
    """Members of one architecture (a run's snapshots) whose probabilities are averaged.

    ``forward`` returns what one member returns — mask logits, or (mask logits, label logits)
    with an aux head — each being :func:`mean_probability_logit` of the members' outputs, so
    anything that applies a sigmoid to a model's logits (prediction, TTA, validation) gets the
    members' mean probability without knowing it runs an ensemble. Costs K forward passes.

    Args:
        members: the models (same architecture and input size).

    Shape:
        as one member: input (N, C, H, W), mask logits (N, classes, H, W), label logits
        (N, classes).
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise SegflowError("a snapshot ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = [member(x) for member in self.members]
        if isinstance(outputs[0], tuple | list):
            return tuple(
                mean_probability_logit([out[i] for out in outputs]) for i in range(len(outputs[0]))
            )
        return mean_probability_logit(outputs)


def forward_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mask logits of ``model(x)``, dropping the label logits of an aux head if present.

    Shape:
        x: (N, in_channels, H, W); output: (N, classes, H, W).
    """
    out = model(x)
    if isinstance(out, tuple | list):
        return out[0]
    return out


def required_divisor(model: ModelSpec | torch.nn.Module) -> int:
    """The multiple that input height and width must be for ``model`` (a spec or a built model).

    This is what smp 0.6 checks in ``forward``: the encoder's output stride (32 by default,
    16 for DeepLabV3Plus and PAN, 8 for PSPNet's 3-stage encoder), or 1 for models that set
    ``requires_divisible_input_shape = False`` (Unet, whose decoder resizes each upsampled map
    to its skip connection).
    """
    net = _as_model(model)
    if not getattr(net, "requires_divisible_input_shape", True):
        return 1
    return int(net.encoder.output_stride)


def min_input_size(model: ModelSpec | torch.nn.Module) -> int:
    """The smallest height and width that run through ``model`` (a spec or a built model).

    PAN's feature pyramid attention max-pools the deepest feature map three more times, so it
    needs 8 times the output stride (128 by default); every other model runs from 32 pixels
    (at 16 pixels some encoders fail, e.g. mit_b0 and efficientnet-b0).
    """
    net = _as_model(model)
    stride = int(net.encoder.output_stride)
    if isinstance(net, smp.PAN):
        return 8 * stride
    return max(32, required_divisor(net))


def padded_size(model: ModelSpec | torch.nn.Module, height: int, width: int) -> tuple[int, int]:
    """The smallest (height, width) >= the given size that ``model`` accepts."""
    net = _as_model(model)
    divisor, minimum = required_divisor(net), min_input_size(net)

    def fit(size: int) -> int:
        size = max(size, minimum)
        return -(-size // divisor) * divisor

    return fit(height), fit(width)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    spec: ModelSpec,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write ``model``'s weights, its spec and ``extra`` metadata to ``path``.

    The file is a ``torch.save`` dict ``{"format", "state_dict", "spec", **extra}`` that
    :func:`load_checkpoint` reads with ``weights_only=True``; ``extra`` must therefore hold only
    plain values (str, int, float, bool, None, lists/tuples/dicts of them, tensors). numpy
    scalars and paths are converted; anything else is refused here rather than at load time.
    A :class:`SnapshotEnsemble` adds ``snapshots`` (its members' state dicts, in order);
    ``state_dict`` is then the last member's (the same tensors, stored once), which is what a
    reader that knows no ensembles loads.

    Raises:
        ValueError: ``extra`` uses a reserved key (format, state_dict, spec, snapshots).
        TypeError: ``extra`` holds a value that a weights-only load could not read back.
    """
    extra = dict(extra or {})
    clash = [key for key in _RESERVED_CHECKPOINT_KEYS if key in extra]
    if clash:
        raise ValueError(f"checkpoint extra may not use the reserved key(s) {clash}")
    # torch.compile and (Distributed)DataParallel wrap the model and prefix its state dict keys
    # ("_orig_mod.", "module."); store the plain model's so load_checkpoint can rebuild it.
    model = _unwrap(model)
    payload: dict[str, Any] = {"format": CHECKPOINT_FORMAT}
    if isinstance(model, SnapshotEnsemble):
        snapshots = [_unwrap(member).state_dict() for member in model.members]
        payload.update(state_dict=snapshots[-1], snapshots=snapshots)
    else:
        payload["state_dict"] = model.state_dict()
    payload["spec"] = _plain(spec.to_dict(), "spec")
    payload.update({key: _plain(value, key) for key, value in extra.items()})
    write_torch(path, payload)


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`, offline.

    The file is read with ``torch.load(weights_only=True)`` (no arbitrary pickles), the model is
    rebuilt from the stored spec with ``encoder_weights=None`` (the trained weights replace any
    pretrained ones anyway, so nothing is downloaded or read from the original weights file) and
    the state dict is loaded strictly. A checkpoint with ``snapshots`` gives a
    :class:`SnapshotEnsemble` of one rebuilt model per stored state dict.

    Args:
        path: the checkpoint file.
        device: where to put the model (also the ``map_location``).

    Returns:
        (model in eval mode on ``device``, metadata): the metadata is the checkpoint without its
        weights (format, spec as a dict, and the extra keys given when saving).

    Raises:
        SegflowError: missing or unreadable file, not a segflow checkpoint, or weights that do not
        fit the stored spec.
    """
    path = Path(path)
    if not path.is_file():
        raise SegflowError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise SegflowError(f"{path}: not a readable checkpoint ({first_line(exc)})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        raise SegflowError(
            f"{path}: not a segflow model checkpoint (format {found!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    if not isinstance(checkpoint.get("spec"), dict) or "state_dict" not in checkpoint:
        raise SegflowError(f"{path}: checkpoint lacks its spec or state_dict")
    snapshots = checkpoint.get("snapshots")
    if snapshots is not None and (
        not isinstance(snapshots, list)
        or not snapshots
        or not all(isinstance(state, dict) for state in snapshots)
    ):
        raise SegflowError(f"{path}: snapshots must be a non-empty list of state dicts")
    model = rebuild_model(
        checkpoint["spec"],
        snapshots if snapshots is not None else [checkpoint["state_dict"]],
        snapshots is not None,
        str(path),
    )
    weights = ("state_dict", "snapshots")
    metadata = {key: value for key, value in checkpoint.items() if key not in weights}
    return model.to(device).eval(), metadata


def rebuild_model(
    spec: Mapping[str, Any],
    states: Sequence[Mapping[str, torch.Tensor]],
    snapshots: bool = False,
    where: str = "model",
) -> torch.nn.Module:
    """The model a checkpoint (or an export bundle) describes, offline: built from ``spec``
    with ``encoder_weights=None`` (nothing is downloaded or read), the weights loaded strictly.

    Args:
        spec: a :class:`ModelSpec` as a dict (a checkpoint's ``spec``).
        states: the state dicts: one, or a snapshot ensemble's members in order.
        snapshots: build a :class:`SnapshotEnsemble` of one model per state dict.
        where: names the source in error messages (a path, a bundle member).

    Returns:
        The model on the CPU (tensors of another dtype, e.g. float16, are cast on load).

    Raises:
        SegflowError: an invalid spec, or weights that do not fit it.
    """
    try:
        model_spec = ModelSpec.from_dict(spec)
    except (SegflowError, TypeError) as exc:
        raise SegflowError(f"{where}: invalid stored spec: {exc}") from exc
    models = []
    for index, state in enumerate(states):
        model = build_model(dataclasses.replace(model_spec, encoder_weights=None))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            which = f"snapshot {index}" if snapshots else "weights"
            raise SegflowError(
                f"{where}: {which} do not match the stored spec ({first_line(exc)})"
            ) from exc
        models.append(model)
    return SnapshotEnsemble(models) if snapshots else models[0]


# --------------------------------------------------------------------------- helpers


def _architecture(arch: str) -> type[torch.nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise KeyError(
            f"model.arch: unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}"
        ) from None


def _check_encoder(encoder: str) -> None:
    if encoder.startswith("tu-"):
        import timm

        # "tu-<model>.<pretrained tag>" is valid too; timm.is_model accepts both forms.
        if timm.is_model(encoder[3:]):
            return
        hint = "expected a timm model name after 'tu-' (see timm.list_models())"
    else:
        names = smp.encoders.get_encoder_names()
        if encoder in names:
            return
        close = difflib.get_close_matches(encoder, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        hint += "see smp.encoders.get_encoder_names() or 'tu-<timm model>'"
    raise SegflowError(
        f"model.encoder: unknown encoder {encoder!r}; {hint} (list: {ENCODER_LIST_URL})"
    )


def _check_pretrained_tag(encoder: str, tag: str) -> None:
    if encoder.startswith("tu-"):
        return  # timm picks the pretrained variant from the encoder name itself
    available = list(smp.encoders.encoders[encoder]["pretrained_settings"])
    if tag not in available:
        raise SegflowError(
            f"model.encoder_weights: {tag!r} is neither a weights file "
            f"({'/'.join(WEIGHT_FILE_SUFFIXES)}), a weights package "
            f"({', '.join(PACKAGE_PREFIX + name for name in WEIGHT_PACKAGES)}) nor a "
            f"pretrained tag of {encoder!r} (available: {', '.join(available) or 'none'})"
        )


def _constructor_kwargs(cls: type[torch.nn.Module], spec: ModelSpec) -> dict[str, Any]:
    """The smp constructor arguments for ``spec``, refusing ones the architecture lacks."""
    accepted = {
        name
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }
    kwargs: dict[str, Any] = {
        "encoder_name": spec.encoder,
        "encoder_weights": spec.encoder_weights,
        "in_channels": spec.in_channels,
        "classes": spec.classes,
    }
    if spec.aux_head:
        kwargs["aux_params"] = _aux_params(spec)
    if spec.decoder_attention is not None:
        if "decoder_attention_type" not in accepted:
            with_attention = [
                name
                for name, arch in ARCHITECTURES.items()
                if "decoder_attention_type" in inspect.signature(arch).parameters
            ]
            raise SegflowError(
                f"model.decoder_attention: {spec.arch} has no decoder attention "
                f"(only {', '.join(with_attention)})"
            )
        kwargs["decoder_attention_type"] = spec.decoder_attention
    for key, value in spec.extra.items():
        if key in _MANAGED_KWARGS:
            owner = _MANAGED_KWARGS[key]
            reason = f"set model.{owner} instead" if owner else "models must output logits"
            raise SegflowError(f"model.extra.{key}: not allowed ({reason})")
        # smp silently drops unknown keyword arguments for its own encoders (they only reach
        # timm for "tu-" encoders), so a typo would otherwise go unnoticed.
        if key not in accepted and not spec.encoder.startswith("tu-"):
            raise SegflowError(
                f"model.extra.{key}: {spec.arch} has no such argument; "
                f"valid: {', '.join(sorted(accepted - set(_MANAGED_KWARGS)))}"
            )
        kwargs[key] = value
    return kwargs


def _aux_params(spec: ModelSpec) -> dict[str, Any]:
    """smp's ``aux_params`` of ``spec``: one logit per class (is its mask non-empty?).

    Options at smp's defaults are not passed, so a default aux head is built exactly as
    before. GeM is not smp's: the head is built with average pooling and :func:`build_model`
    swaps in :class:`GeM` (parameters are created in the same order, so the seeded initial
    weights of everything else do not move).
    """
    params: dict[str, Any] = {"classes": spec.classes}
    if spec.aux_pooling == "max":
        params["pooling"] = "max"
    if spec.aux_dropout != SMP_AUX_DROPOUT:
        params["dropout"] = float(spec.aux_dropout)
    return params


def _install_gem(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Replace the pooling layer of ``model``'s aux head with :class:`GeM` (``aux_pooling``
    gem)."""
    head = getattr(model, "classification_head", None)
    if not isinstance(head, torch.nn.Sequential) or not isinstance(
        head[0], torch.nn.AdaptiveAvgPool2d
    ):
        raise SegflowError(
            f"model.aux_pooling: gem: {spec.arch} has no smp classification head to pool"
        )
    head[0] = GeM(spec.aux_gem_p, spec.aux_gem_learnable)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _load_encoder_weights(model: torch.nn.Module, path: Path, spec: ModelSpec) -> None:
    """Load a local encoder state dict into ``model.encoder``, strictly.

    EfficientNet-PyTorch weights for a ``timm-tf_efficientnet_lite*`` encoder are translated by
    name first; their normalisation is known, so a gray model gets the folded first convolution.
    """
    state_dict = read_state_dict(path)
    expected = model.encoder.state_dict()
    rgb_std = None
    if set(state_dict) != set(expected) and is_efficientnet_pytorch(state_dict, spec.encoder):
        state_dict = efficientnet_pytorch_to_timm(state_dict, model.encoder, str(path))
        package = package_of_encoder(spec.encoder)
        rgb_std = package.std if package is not None else None
    try:
        model.encoder.load_state_dict(
            _adapt_input_channels(state_dict, expected, rgb_std), strict=True
        )
    except RuntimeError as exc:
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        detail = (
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})"
            if missing or unexpected
            else first_line(exc)
        )
        raise SegflowError(
            f"model.encoder_weights: {path}: does not fit encoder "
            f"{model.encoder.__class__.__name__}: {detail}"
        ) from exc


def _adapt_input_channels(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    rgb_std: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit an RGB encoder's first convolution to the model's input channels.

    Weight files are usually RGB (3 input channels) while segmentation images are often gray.
    smp adapts its own pretrained weights in ``patch_first_conv``: for 1 channel the RGB kernels
    are summed, for n channels they are repeated cyclically and scaled by 3 / n. The same rule
    is applied here to any 4-D weight that differs from the model only in having 3 input
    channels, except that for 1 channel and a known RGB normalisation (``rgb_std``) the
    kernels are folded consistently with it (:func:`segflow.model.pretrained.fold_rgb_kernel`);
    every other difference is left for the strict load to report.
    """
    adapted = dict(state_dict)
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is not None and differs_only_in_input_channels(value, target):
            adapted[key] = fold_rgb_kernel(value, target.shape[1], rgb_std)
    return adapted


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile / (Distributed)DataParallel wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _as_model(model: ModelSpec | torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, SnapshotEnsemble):
        return model.members[0]  # members share the architecture
    if isinstance(model, torch.nn.Module):
        return model
    spec = dataclasses.replace(model, encoder_weights=None)
    try:
        # Parameters on the meta device cost no memory or init time: only the structure matters.
        with torch.device("meta"):
            return build_model(spec)
    except (RuntimeError, NotImplementedError):
        # Some encoders (mit_b*) call .item() while building, which meta tensors refuse.
        return build_model(spec)


def _plain(value: Any, key: str) -> Any:
    """``value`` as types a weights-only ``torch.load`` can read, or TypeError naming ``key``."""
    if value is None or type(value) in (str, bool, int, float) or isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy scalars (np.float64 is a float subclass the loader refuses)
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)  # other subclasses (enums, ...) would be pickled as their class
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint extra {key}: {type(value).__name__} cannot be stored "
        "(weights-only checkpoints hold plain values and tensors)"
    )
