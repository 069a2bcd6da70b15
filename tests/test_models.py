"""Tests for model building, input-size rules, encoder weight files and checkpoints (segflow.model.models).

Everything is built with ``encoder_weights=None`` (or a local file) on tiny inputs; nothing may
touch the network, so smp's downloader is replaced by a failing stub for the whole module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from segflow.core.errors import SegflowError
from segflow.model.models import (
    ARCHITECTURES,
    CHECKPOINT_FORMAT,
    GeM,
    ModelSpec,
    build_model,
    forward_logits,
    load_checkpoint,
    min_input_size,
    padded_size,
    required_divisor,
    save_checkpoint,
)

# Every architecture builds with resnet18 in smp 0.6 (Segformer included); Segformer's own
# encoder family (mit_b*) is checked separately. Tests that only need *a* model use the smaller
# efficientnet-b0 (5.8M parameters with FPN, vs 13M): checkpoints are written and read back.
ENCODER = "resnet18"
SMALL = "efficientnet-b0"


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread (shared 2-core machine), and any weight download fails loudly."""

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a test tried to download weights: {args} {kwargs}")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_download)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _input(model: torch.nn.Module, channels: int, batch: int = 1) -> torch.Tensor:
    size = max(64, min_input_size(model))
    return torch.randn(batch, channels, size, size)


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
# (1, 3) and (3, 1) cover both channel counts and both class counts at half the cost.
@pytest.mark.parametrize(("in_channels", "classes"), [(1, 3), (3, 1)])
def test_every_architecture_builds_and_keeps_the_size(
    arch: str, in_channels: int, classes: int
) -> None:
    model = build_model(
        ModelSpec(arch=arch, encoder=ENCODER, in_channels=in_channels, classes=classes)
    )
    assert isinstance(model, ARCHITECTURES[arch])
    x = _input(model, in_channels)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, classes, x.shape[2], x.shape[3])
    assert torch.isfinite(out).all()


def test_segformer_with_its_own_encoder() -> None:
    model = build_model(ModelSpec(arch="Segformer", encoder="mit_b0", in_channels=1, classes=2))
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 2, 64, 64)


def test_other_small_encoders() -> None:
    for encoder in ("efficientnet-b0", "tu-resnet18"):
        model = build_model(ModelSpec(arch="FPN", encoder=encoder, in_channels=1))
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_training_step_changes_weights() -> None:
    model = build_model(ModelSpec(arch="Unet"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.segmentation_head[0].weight.detach().clone()
    logits = forward_logits(model.train(), torch.randn(2, 1, 64, 64))
    logits.mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.segmentation_head[0].weight)


def test_aux_head_gives_a_label_and_forward_logits_returns_the_mask() -> None:
    model = build_model(ModelSpec(arch="Unet", classes=2, aux_head=True)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        logits = forward_logits(model, x)
    assert isinstance(out, tuple) and len(out) == 2
    mask, label = out
    assert mask.shape == (2, 2, 64, 64)
    assert label.shape == (2, 2)  # one "non-empty" logit per class
    assert torch.equal(logits, mask)


def test_deeplabv3_forward_on_cpu_with_an_aux_head() -> None:
    model = build_model(ModelSpec(arch="DeepLabV3", encoder=ENCODER, classes=2, aux_head=True))
    assert isinstance(model, smp.DeepLabV3) and not isinstance(model, smp.DeepLabV3Plus)
    with torch.no_grad():
        mask, label = model.eval()(torch.randn(2, 1, 64, 96))
    assert mask.shape == (2, 2, 64, 96)
    assert label.shape == (2, 2)


def test_unknown_arch_lists_deeplabv3() -> None:
    with pytest.raises(KeyError, match="DeepLabV3,"):
        build_model(ModelSpec(arch="DeepLabV4"))


def test_gem_differs_from_avg_and_max_on_a_planted_feature_map() -> None:
    features = torch.zeros(1, 2, 8, 8)
    features[0, 0, 3, 4] = 4.0  # one hot spot: the mean hides it, the max is all of it
    features[0, 1] = 1.0  # a flat map: every pooling gives 1
    gem = GeM(p=3.0, learnable=False)(features).flatten()
    avg = torch.nn.functional.adaptive_avg_pool2d(features, 1).flatten()
    peak = torch.nn.functional.adaptive_max_pool2d(features, 1).flatten()
    assert avg[0] == pytest.approx(4.0 / 64)
    assert gem[0] == pytest.approx(4.0 / 64 ** (1 / 3), rel=1e-4)  # (4^3 / 64)^(1/3)
    assert avg[0] < gem[0] < peak[0]
    assert gem[1] == pytest.approx(1.0, rel=1e-4)
    assert float(GeM(p=1.0)(features).detach().flatten()[0]) == pytest.approx(
        float(avg[0]), rel=1e-4
    )


@pytest.mark.parametrize("learnable", [True, False])
def test_aux_gem_pooling_is_installed_with_a_learnable_or_fixed_exponent(learnable: bool) -> None:
    spec = ModelSpec(
        arch="DeepLabV3",
        encoder=ENCODER,
        aux_head=True,
        aux_pooling="gem",
        aux_gem_p=2.5,
        aux_gem_learnable=learnable,
    )
    model = build_model(spec)
    pool = model.classification_head[0]
    assert isinstance(pool, GeM)
    assert float(pool.p.detach()) == 2.5
    names = {name for name, _ in model.named_parameters()}
    assert ("classification_head.0.p" in names) is learnable
    _, label = model.train()(torch.rand(2, 1, 64, 64))
    label.sum().backward()
    assert (pool.p.grad is not None) is learnable
    avg_model = build_model(dataclasses.replace(spec, aux_pooling="avg"))
    avg_model.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k != "classification_head.0.p"}
    )
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        gem_label = model.eval()(x)[1]
        avg_label = avg_model.eval()(x)[1]
    assert not torch.allclose(gem_label, avg_label)  # same weights, only the pooling differs


def test_aux_max_pooling_and_dropout_reach_the_head() -> None:
    model = build_model(ModelSpec(arch="Unet", aux_head=True, aux_pooling="max", aux_dropout=0.5))
    head = model.classification_head
    assert isinstance(head[0], torch.nn.AdaptiveMaxPool2d)
    assert isinstance(head[2], torch.nn.Dropout) and head[2].p == 0.5
    plain = build_model(ModelSpec(arch="Unet", aux_head=True)).classification_head
    assert isinstance(plain[0], torch.nn.AdaptiveAvgPool2d) and plain[2].p == 0.2  # smp's
    none = build_model(ModelSpec(arch="Unet", aux_head=True, aux_dropout=0.0)).classification_head
    assert isinstance(none[2], torch.nn.Identity)


def test_default_aux_options_leave_the_stored_spec_as_before() -> None:
    stored = ModelSpec(arch="Unet", aux_head=True).to_dict()
    assert set(stored) == {
        "arch",
        "encoder",
        "encoder_weights",
        "in_channels",
        "classes",
        "aux_head",
        "decoder_attention",
        "extra",
    }
    assert ModelSpec.from_dict(stored) == ModelSpec(arch="Unet", aux_head=True)
    gem = ModelSpec(aux_head=True, aux_pooling="gem")
    assert gem.to_dict()["aux_pooling"] == "gem"
    assert ModelSpec.from_dict(gem.to_dict()) == gem


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"aux_head": True, "aux_pooling": "median"}, "aux_pooling"),
        ({"aux_head": True, "aux_dropout": 1.0}, "aux_dropout"),
        ({"aux_head": True, "aux_gem_p": 0}, "aux_gem_p"),
        ({"aux_head": True, "aux_gem_learnable": "yes"}, "aux_gem_learnable"),
        ({"aux_pooling": "gem"}, "needs model.aux_head"),
    ],
)
def test_bad_aux_options_name_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SegflowError, match=message):
        ModelSpec(**values)


def test_gem_checkpoint_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec(arch="FPN", encoder=SMALL, aux_head=True, aux_pooling="gem", aux_gem_p=4.0)
    model = build_model(spec)
    with torch.no_grad():
        model.classification_head[0].p.fill_(2.0)  # as if trained
    save_checkpoint(tmp_path / "model.pt", model, spec)
    loaded, metadata = load_checkpoint(tmp_path / "model.pt")
    assert metadata["spec"]["aux_pooling"] == "gem"
    assert float(loaded.classification_head[0].p.detach()) == 2.0


def test_forward_logits_without_aux_head_is_the_output() -> None:
    model = build_model(ModelSpec(arch="FPN", encoder=SMALL)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(forward_logits(model, x), model(x))
    assert model.classification_head is None


def test_decoder_attention_scse() -> None:
    plain = build_model(ModelSpec(arch="Unet"))
    scse = build_model(ModelSpec(arch="Unet", decoder_attention="scse"))
    kinds = {type(module).__name__ for module in scse.modules()}
    assert "SCSEModule" in kinds
    assert "SCSEModule" not in {type(module).__name__ for module in plain.modules()}
    with torch.no_grad():
        assert scse.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("arch", ["FPN", "DeepLabV3Plus", "Segformer"])
def test_decoder_attention_refused_where_the_arch_has_none(arch: str) -> None:
    with pytest.raises(SegflowError, match=r"model\.decoder_attention: .*Unet, UnetPlusPlus"):
        build_model(ModelSpec(arch=arch, decoder_attention="scse"))


def test_unknown_decoder_attention_is_a_segflow_error() -> None:
    with pytest.raises(SegflowError, match="Attention foo is not implemented"):
        build_model(ModelSpec(arch="Unet", decoder_attention="foo"))


def test_unknown_architecture_lists_the_names() -> None:
    with pytest.raises(KeyError, match="unknown architecture 'Unet3'") as info:
        build_model(ModelSpec(arch="Unet3"))
    for name in ARCHITECTURES:
        assert name in str(info.value)


@pytest.mark.parametrize("encoder", ["resnet19", "tu-not_a_timm_model"])
def test_unknown_encoder_names_the_key(encoder: str) -> None:
    with pytest.raises(SegflowError, match=r"model\.encoder: unknown encoder .*smp"):
        build_model(ModelSpec(encoder=encoder))


def test_unknown_encoder_suggests_close_names() -> None:
    with pytest.raises(SegflowError, match="did you mean resnet18"):
        build_model(ModelSpec(encoder="resnet-18"))


def test_arch_encoder_pair_refused_by_smp() -> None:
    with pytest.raises(SegflowError, match="cannot build UnetPlusPlus with encoder 'mit_b0'"):
        build_model(ModelSpec(arch="UnetPlusPlus", encoder="mit_b0"))


def test_extra_kwargs_are_passed_and_checked() -> None:
    model = build_model(ModelSpec(arch="FPN", extra={"decoder_pyramid_channels": 32}))
    assert model.decoder.p5.out_channels == 32
    # smp silently ignores unknown kwargs for its own encoders: segflow refuses the typo.
    with pytest.raises(SegflowError, match=r"model\.extra\.decoder_pyramid_chanels"):
        build_model(ModelSpec(arch="FPN", extra={"decoder_pyramid_chanels": 32}))
    with pytest.raises(SegflowError, match=r"model\.extra\.in_channels.*model\.in_channels"):
        build_model(ModelSpec(extra={"in_channels": 3}))
    with pytest.raises(SegflowError, match=r"model\.extra\.activation.*logits"):
        build_model(ModelSpec(extra={"activation": "sigmoid"}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("in_channels", 0), ("classes", -1), ("classes", 1.5), ("aux_head", "yes"), ("arch", "")],
)
def test_spec_validation_names_the_key(field: str, value: Any) -> None:
    with pytest.raises(SegflowError, match=rf"model\.{field}"):
        ModelSpec(**{field: value})


def test_spec_from_dict_refuses_unknown_keys() -> None:
    assert ModelSpec.from_dict({"arch": "FPN", "extra": None}) == ModelSpec(arch="FPN")
    with pytest.raises(SegflowError, match=r"model\.encodr: unknown key"):
        ModelSpec.from_dict({"encodr": "resnet18"})


# --------------------------------------------------------------------------- pretrained tags


def test_imagenet_is_forwarded_to_smp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    class RecordingUnet(smp.Unet):
        def __init__(self, **kwargs: Any) -> None:
            calls.append(dict(kwargs))
            super().__init__(**{**kwargs, "encoder_weights": None})  # never download

    monkeypatch.setitem(ARCHITECTURES, "Unet", RecordingUnet)
    model = build_model(ModelSpec(arch="Unet", encoder_weights="imagenet", in_channels=3))
    assert isinstance(model, RecordingUnet)
    assert calls == [
        {
            "encoder_name": "resnet18",
            "encoder_weights": "imagenet",
            "in_channels": 3,
            "classes": 1,
        }
    ]


def test_unknown_pretrained_tag_is_refused() -> None:
    with pytest.raises(SegflowError, match=r"model\.encoder_weights: 'imagenet21k'.*imagenet"):
        build_model(ModelSpec(encoder_weights="imagenet21k"))


# --------------------------------------------------------------------------- local weights


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_local_encoder_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    source = build_model(ModelSpec(encoder=SMALL, arch="Unet", in_channels=1))
    path = tmp_path / f"encoder{suffix}"
    state = source.encoder.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)

    # Another architecture with the same encoder: only the encoder comes from the file.
    model = build_model(
        ModelSpec(encoder=SMALL, arch="FPN", in_channels=1, encoder_weights=str(path))
    )
    loaded = model.encoder.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    fresh = build_model(ModelSpec(encoder=SMALL, arch="FPN", in_channels=1)).encoder.state_dict()
    first = next(iter(state))
    assert not torch.equal(fresh[first], loaded[first])


def test_local_weights_file_with_wrong_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"backbone.conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(SegflowError, match=r"model\.encoder_weights: .*other\.pt.*missing"):
        build_model(ModelSpec(encoder=SMALL, encoder_weights=str(path)))


def test_rgb_weights_adapt_to_other_input_channels(tmp_path: Path) -> None:
    path = tmp_path / "rgb.pt"
    rgb = build_model(ModelSpec(encoder=SMALL, in_channels=3)).encoder.state_dict()
    torch.save(rgb, path)
    first = "_conv_stem.weight"
    assert rgb[first].shape[1] == 3
    gray = build_model(ModelSpec(encoder=SMALL, in_channels=1, encoder_weights=str(path)))
    assert torch.allclose(gray.encoder.state_dict()[first], rgb[first].sum(1, keepdim=True))
    four = build_model(ModelSpec(encoder=SMALL, in_channels=4, encoder_weights=str(path)))
    expected = torch.cat([rgb[first], rgb[first][:, :1]], dim=1) * 0.75
    assert torch.allclose(four.encoder.state_dict()[first], expected)
    # Every other weight is taken as is.
    key = "_blocks.0._depthwise_conv.weight"
    assert torch.equal(gray.encoder.state_dict()[key], rgb[key])


def test_local_weights_of_another_encoder(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save(
        build_model(ModelSpec(arch="Linknet", encoder="resnet18")).encoder.state_dict(), path
    )
    with pytest.raises(SegflowError, match=r"model\.encoder_weights: .*resnet\.pt.*does not fit"):
        build_model(ModelSpec(encoder=SMALL, encoder_weights=str(path)))
    # Same keys, other shapes (resnet34 has more blocks, resnet18's are a subset: missing keys).
    with pytest.raises(SegflowError, match=r"model\.encoder_weights: .*missing"):
        build_model(ModelSpec(arch="Linknet", encoder="resnet34", encoder_weights=str(path)))


def test_local_weights_missing_or_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match=r"model\.encoder_weights: .*nope\.pth: file not found"):
        build_model(ModelSpec(encoder=SMALL, encoder_weights=str(tmp_path / "nope.pth")))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(SegflowError, match="not a readable state dict"):
        build_model(ModelSpec(encoder=SMALL, encoder_weights=str(garbage)))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(SegflowError, match="expected a state dict"):
        build_model(ModelSpec(encoder=SMALL, encoder_weights=str(tensor)))


# --------------------------------------------------------------------------- input sizes


def test_required_divisor_and_min_size_per_architecture() -> None:
    divisors = {
        arch: required_divisor(ModelSpec(encoder=SMALL, arch=arch)) for arch in ARCHITECTURES
    }
    assert divisors == {
        "Unet": 1,  # its decoder resizes to each skip connection
        "UnetPlusPlus": 32,
        "FPN": 32,
        "Linknet": 32,
        "DeepLabV3": 8,  # dilated encoder, output stride 8
        "DeepLabV3Plus": 16,  # dilated encoder, output stride 16
        "PAN": 16,
        "MAnet": 32,
        "PSPNet": 8,  # 3-stage encoder
        "UPerNet": 32,
        "Segformer": 32,
    }
    assert min_input_size(ModelSpec(encoder=SMALL, arch="PAN")) == 128
    assert min_input_size(ModelSpec(encoder=SMALL, arch="FPN")) == 32
    assert required_divisor(ModelSpec(arch="PSPNet", encoder="mit_b0")) == 8  # CPU fallback
    assert (
        required_divisor(ModelSpec(encoder=SMALL, arch="PAN", extra={"encoder_output_stride": 32}))
        == 32
    )
    assert required_divisor(ModelSpec(encoder=SMALL, arch="FPN", extra={"encoder_depth": 4})) == 16


def test_padded_size() -> None:
    assert padded_size(ModelSpec(encoder=SMALL, arch="FPN"), 101, 64) == (128, 64)
    assert padded_size(ModelSpec(encoder=SMALL, arch="DeepLabV3Plus"), 101, 101) == (112, 112)
    assert padded_size(ModelSpec(encoder=SMALL, arch="PAN"), 101, 200) == (128, 208)
    assert padded_size(ModelSpec(encoder=SMALL, arch="Unet"), 101, 7) == (101, 32)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_size_rules_match_what_the_model_accepts(arch: str) -> None:
    spec = ModelSpec(arch=arch, encoder=SMALL)
    model = build_model(spec).eval()
    assert required_divisor(model) == required_divisor(spec)
    height, width = padded_size(model, 101, 37)
    with torch.no_grad():
        assert model(torch.randn(1, 1, height, width)).shape == (1, 1, height, width)
        divisor = required_divisor(model)
        if divisor > 1:
            with pytest.raises(RuntimeError):
                model(torch.randn(1, 1, height + divisor // 2, width))
        if arch == "PAN":
            below = min_input_size(model) - divisor
            with pytest.raises(RuntimeError):
                model(torch.randn(1, 1, below, below))


# --------------------------------------------------------------------------- checkpoints


def _trained(spec: ModelSpec) -> torch.nn.Module:
    """A model whose BatchNorm statistics differ from a fresh one (they are in the state dict)."""
    model = build_model(spec).train()
    with torch.no_grad():
        model(torch.randn(2, spec.in_channels, 64, 64))
    return model.eval()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec(
        arch="Unet",
        encoder=SMALL,
        classes=2,
        aux_head=True,
        extra={"decoder_channels": [64, 32, 16, 16, 8]},
    )
    model = _trained(spec)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(
        path, model, spec, {"epoch": 3, "score": np.float64(0.75), "fold": 1, "log": Path("x")}
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp files

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert meta["format"] == CHECKPOINT_FORMAT
    # The aux options added later are left out at their defaults: model.pt as before them.
    assert meta["spec"] == {
        k: v
        for k, v in dataclasses.asdict(spec).items()
        if k not in ("aux_pooling", "aux_dropout", "aux_gem_p", "aux_gem_learnable")
    }
    assert ModelSpec.from_dict(meta["spec"]) == spec
    assert (meta["epoch"], meta["score"], meta["fold"], meta["log"]) == (3, 0.75, 1, "x")
    assert "state_dict" not in meta
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_checkpoint_of_a_wrapped_model(tmp_path: Path, wrap: str) -> None:
    spec = ModelSpec(encoder=SMALL, arch="FPN")
    model = _trained(spec)
    # torch.compile only compiles on the first call; its wrapper already prefixes the keys.
    wrapped = torch.compile(model) if wrap == "compile" else torch.nn.DataParallel(model)
    assert not set(wrapped.state_dict()) & set(model.state_dict())
    save_checkpoint(tmp_path / "model.pt", wrapped, spec)
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_is_loaded_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(encoder=SMALL, arch="FPN")
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model(spec), spec)
    original = torch.load
    seen: list[dict[str, Any]] = []

    def checking_load(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        assert kwargs.get("weights_only") is True
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checking_load)
    load_checkpoint(path)
    assert len(seen) == 1 and seen[0]["map_location"] == "cpu"


def test_checkpoint_never_reads_or_downloads_the_original_weights(tmp_path: Path) -> None:
    weights = tmp_path / "encoder.pt"
    torch.save(build_model(ModelSpec(encoder=SMALL)).encoder.state_dict(), weights)
    local = ModelSpec(encoder=SMALL, encoder_weights=str(weights))
    save_checkpoint(tmp_path / "local.pt", build_model(local), local)
    weights.unlink()  # the checkpoint holds every weight: the file is not needed any more
    _, meta = load_checkpoint(tmp_path / "local.pt")
    assert meta["spec"]["encoder_weights"] == str(weights)

    # A model trained from "imagenet": rebuilding must not download (the stub would fail).
    imagenet = ModelSpec(encoder=SMALL, encoder_weights="imagenet")
    save_checkpoint(tmp_path / "imagenet.pt", build_model(ModelSpec(encoder=SMALL)), imagenet)
    model, _ = load_checkpoint(tmp_path / "imagenet.pt")
    assert isinstance(model, smp.Unet)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(SegflowError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")

    corrupt = tmp_path / "corrupt.pt"
    spec = ModelSpec(encoder=SMALL, arch="FPN")
    save_checkpoint(corrupt, build_model(spec), spec)
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # truncated
    with pytest.raises(SegflowError, match=r"corrupt\.pt: not a readable checkpoint"):
        load_checkpoint(corrupt)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(SegflowError, match="not a readable checkpoint"):
        load_checkpoint(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": build_model(spec).state_dict()}, foreign)
    with pytest.raises(SegflowError, match="not a segflow model checkpoint"):
        load_checkpoint(foreign)

    mismatched = tmp_path / "mismatched.pt"
    save_checkpoint(mismatched, build_model(ModelSpec(encoder=SMALL, arch="Unet")), spec)
    with pytest.raises(SegflowError, match="weights do not match the stored spec"):
        load_checkpoint(mismatched)


def test_failed_save_leaves_no_temp_file_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ModelSpec(encoder=SMALL, arch="FPN")
    model = build_model(spec)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, spec, {"epoch": 1})
    before = path.read_bytes()

    def failing_save(obj: Any, target: Any) -> None:
        target.write(b"half")  # segflow.core.atomic.write_torch saves into an open file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, spec, {"epoch": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert path.read_bytes() == before


def test_save_refuses_what_a_weights_only_load_could_not_read(tmp_path: Path) -> None:
    spec = ModelSpec(encoder=SMALL, arch="FPN")
    model = build_model(spec)
    with pytest.raises(TypeError, match="extra history"):
        save_checkpoint(tmp_path / "a.pt", model, spec, {"history": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "b.pt", model, spec, {"spec": {}})
    assert list(tmp_path.iterdir()) == []
