"""Mixup and CutMix of training batches (segflow.model.training.mixing): image and mask stay aligned.

The planted batch encodes each image's source in both tensors: image i is the constant i + 1 on
its one channel, mask i is one-hot on plane i (K = N planes). Whatever is mixed, decoding the mask
(``sum_k mask_k * (k + 1)``) must give back the image pixel for pixel.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from segflow.core.errors import SegflowError
from segflow.model.training.mixing import check_mixing_loss, draw_mix, mix_batch
from segflow.model.training.train_options import TrainOptions

N, SIZE = 6, 16
_MIX = {"mixup_prob": 0.5, "cutmix_prob": 0.5}


def _planted() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.arange(1, N + 1, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 1, SIZE, SIZE)
    masks = torch.eye(N).view(N, N, 1, 1).expand(N, N, SIZE, SIZE)
    return images.clone(), masks.clone()


def _decode(masks: torch.Tensor) -> torch.Tensor:
    """The image a (mixed) mask says each pixel comes from."""
    codes = torch.arange(1, N + 1, dtype=torch.float32).view(1, N, 1, 1)
    return (masks * codes).sum(dim=1, keepdim=True)


def test_mixup_blends_image_and_mask_with_the_same_lambda() -> None:
    options = TrainOptions(mixup_prob=1.0, mixup_alpha=0.4)
    images, masks = _planted()
    mixed_images, mixed_masks, draw = mix_batch(images, masks, options, epoch=1, batch=1)
    assert draw.kind == "mixup"
    torch.testing.assert_close(mixed_images, _decode(mixed_masks))
    partners = 0
    lambdas = set()
    for b in range(N):
        plane = mixed_masks[b, :, 0, 0]
        assert torch.all(mixed_masks[b] == plane.view(N, 1, 1))  # constant over the image
        if plane[b] == 1.0:  # paired with itself: unchanged
            assert torch.equal(mixed_images[b], images[b])
            continue
        partner = int(torch.argmax(torch.where(torch.arange(N) == b, -1.0, plane)))
        lam = float(plane[b])
        lambdas.add(round(lam, 6))
        # mask = lam * m_b + (1 - lam) * m_partner, image with the same lam.
        expected_mask = lam * masks[b] + (1 - lam) * masks[partner]
        torch.testing.assert_close(mixed_masks[b], expected_mask)
        assert float(mixed_images[b, 0, 0, 0]) == pytest.approx(
            lam * (b + 1) + (1 - lam) * (partner + 1)
        )
        partners += 1
    assert partners > 0 and len(lambdas) == 1  # one lambda for the batch
    assert 0.0 < lambdas.pop() < 1.0  # soft masks
    assert torch.equal(images, _planted()[0])  # the inputs are left as loaded


def test_cutmix_pastes_the_same_box_into_image_and_mask() -> None:
    options = TrainOptions(cutmix_prob=1.0, cutmix_alpha=1.0)
    images, masks = _planted()
    pasted_boxes = 0
    for batch in range(1, 6):
        mixed_images, mixed_masks, draw = mix_batch(images, masks, options, epoch=2, batch=batch)
        assert draw.kind == "cutmix"
        assert set(mixed_masks.unique().tolist()) <= {0.0, 1.0}  # masks stay hard
        torch.testing.assert_close(mixed_images, _decode(mixed_masks))
        for b in range(N):
            sources = mixed_images[b, 0]
            foreign = sources != b + 1
            if not foreign.any():
                continue
            assert len(sources[foreign].unique()) == 1  # one partner per image
            rows, cols = torch.nonzero(foreign, as_tuple=True)
            box = foreign[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert bool(box.all())  # a rectangle
            pasted_boxes += 1
        # The same box in every image of the batch (whose partner is another image).
        changed = [torch.nonzero(mixed_images[b, 0] != b + 1) for b in range(N)]
        boxes = {(*c.min(0).values.tolist(), *c.max(0).values.tolist()) for c in changed if len(c)}
        assert len(boxes) <= 1
    assert pasted_boxes > 0


def test_same_seed_epoch_and_batch_give_the_same_mix() -> None:
    options = TrainOptions(mixup_prob=0.5, cutmix_prob=0.5, seed=3)
    images, masks = _planted()

    def mixed(opts: TrainOptions, epoch: int, batch: int) -> torch.Tensor:
        out_images, out_masks, _ = mix_batch(images, masks, opts, epoch, batch)
        return torch.cat([out_images, out_masks], dim=1)

    assert torch.equal(mixed(options, 4, 7), mixed(options, 4, 7))
    reference = mixed(options, 1, 1)
    others = [mixed(options, 1, 2), mixed(options, 2, 1), mixed(TrainOptions(seed=4, **_MIX), 1, 1)]
    assert all(not torch.equal(reference, other) for other in others)
    # Nothing global is drawn from: the global generators do not change the mix.
    torch.manual_seed(0)
    np.random.seed(0)
    first = mixed(options, 5, 5)
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(first, mixed(options, 5, 5))


def test_probabilities_pick_at_most_one_mix_per_batch() -> None:
    options = TrainOptions(mixup_prob=0.3, cutmix_prob=0.4)
    kinds = Counter(draw_mix(options, 4, 8, 8, 1, batch).kind for batch in range(1, 1001))
    assert set(kinds) == {"none", "mixup", "cutmix"}
    assert kinds["mixup"] == pytest.approx(300, abs=60)
    assert kinds["cutmix"] == pytest.approx(400, abs=60)
    images, masks = _planted()
    out_images, out_masks, draw = mix_batch(images, masks, TrainOptions(), 1, 1)
    assert draw.kind == "none" and out_images is images and out_masks is masks


def test_mixup_with_lovasz_is_refused_in_one_line() -> None:
    with pytest.raises(SegflowError, match=r"^train\.mixup_prob: .*lovasz[^\n]*$"):
        check_mixing_loss(TrainOptions(mixup_prob=0.5), {"bce": 1.0, "lovasz": 0.5})
    check_mixing_loss(TrainOptions(cutmix_prob=0.5), {"lovasz": 1.0})  # cutmix keeps masks hard
    check_mixing_loss(TrainOptions(mixup_prob=0.5), {"bce": 1.0, "lovasz": 0.0})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"mixup_prob": 1.5}, "train.mixup_prob"),
        ({"mixup_alpha": 0}, "train.mixup_alpha"),
        ({"cutmix_prob": -0.1}, "train.cutmix_prob"),
        ({"cutmix_alpha": float("nan")}, "train.cutmix_alpha"),
        ({"mixup_prob": 0.6, "cutmix_prob": 0.6}, "train.cutmix_prob"),
        ({"steps_per_epoch": 0}, "train.steps_per_epoch"),
        ({"steps_per_epoch": 2.5}, "train.steps_per_epoch"),
    ],
)
def test_invalid_mix_and_step_options_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(SegflowError, match=key.replace(".", r"\.")):
        TrainOptions(**overrides)


def test_mismatched_images_and_masks_are_refused() -> None:
    images, masks = _planted()
    with pytest.raises(SegflowError, match="differ"):
        mix_batch(images, masks[:, :, :8], TrainOptions(mixup_prob=1.0), 1, 1)
