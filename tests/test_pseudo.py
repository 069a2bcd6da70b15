"""Tests for the pseudo-labelling policy (segflow.ensemble.pseudo): per-image confidence, the selection
rule, targets and options. Probability maps are hand-made from float16-exact values (0, 1/8,
1/4, 1/2, 3/4, 7/8, 1), so every share and confidence below is computed by hand."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from segflow.core.errors import SegflowError
from segflow.core.options import add_dataclass_arguments, dataclass_from_namespace
from segflow.ensemble.pseudo import (
    PseudoOptions,
    check_pseudo_uncertainty,
    excluded_test_ids,
    image_confidence,
    pseudo_targets,
    select_pseudo,
    train_duplicates,
)
from segflow.formats.labels import pack_labels

PIXELS = 20  # 4 x 5 images, one class


def _image(*changes: tuple[float, int], background: float = 0.0) -> np.ndarray:
    """A (1, 4, 5) map of ``background`` with ``count`` pixels set to ``value`` per change."""
    flat = np.full(PIXELS, background, dtype=np.float16)
    position = 0
    for value, count in changes:
        flat[position : position + count] = value
        position += count
    return flat.reshape(1, 4, 5)


# id -> map; comments give (uncertain share, confidence) with the default band (0.2, 0.8).
MAPS = {
    "d": _image((0.5, 3)),  # 3/20 = 0.15, 1 - 3/20
    "b": _image(background=1.0),  # 0, 1
    "a": _image(),  # 0, 1
    "c": _image((0.5, 2)),  # 2/20 = 0.1 (at the bound: kept), 1 - 2/20
    "e": _image(),  # 0, 1, but a duplicate of a train image
    "f": _image((0.25, 1)),  # 1/20, 1 - 0.5/20
    "g": _image((0.125, 1)),  # 0 (below the band), 1 - 0.25/20
}


def _ids_and_probs() -> tuple[pd.DataFrame, np.ndarray]:
    return pd.DataFrame({"id": list(MAPS)}), np.stack(list(MAPS.values()))


def _selected(table: pd.DataFrame) -> list[str]:
    return table.loc[table["selected"], "id"].tolist()


def test_image_confidence_by_hand() -> None:
    _, probs = _ids_and_probs()
    table = image_confidence(probs)
    assert table["uncertain_share"].tolist() == [3 / 20, 0, 0, 2 / 20, 0, 1 / 20, 0]
    expected = [1 - 3 / 20, 1, 1, 1 - 2 / 20, 1, 1 - 0.5 / 20, 1 - 0.25 / 20]
    np.testing.assert_allclose(table["confidence"], expected, rtol=0, atol=1e-12)


def test_image_confidence_counts_every_class_and_the_band_is_open() -> None:
    # Class 0: one pixel at 3/4; class 1: one at 7/8. Band (1/8, 7/8): 3/4 is inside, 7/8 is on
    # the (excluded) edge. Shares are over both classes' 40 pixels.
    probs = np.zeros((1, 2, 4, 5), dtype=np.float16)
    probs[0, 0, 0, 0] = 0.75
    probs[0, 1, 0, 0] = 0.875
    options = PseudoOptions(uncertain_low=0.125, uncertain_high=0.875)
    table = image_confidence(probs, options)
    assert table["uncertain_share"].tolist() == [1 / 40]
    assert table["confidence"].iloc[0] == pytest.approx(1 - (0.5 + 0.25) / 40, abs=1e-12)


def test_selection_rule_and_reasons() -> None:
    ids, probs = _ids_and_probs()
    options = PseudoOptions(max_uncertain_share=0.1)
    table = select_pseudo(ids, probs, options, excluded_ids={"e"})
    assert table["id"].tolist() == ["a", "b", "c", "d", "e", "f", "g"]  # sorted by id
    assert list(table.columns) == ["id", "uncertain_share", "confidence", "selected", "reason"]
    assert table["selected"].dtype == bool
    assert _selected(table) == ["a", "b", "c", "f", "g"]
    reasons = dict(zip(table["id"], table["reason"], strict=True))
    assert reasons["d"] == "too uncertain"
    assert reasons["e"].startswith("duplicate of train")
    assert reasons["a"] == "selected"


@pytest.mark.parametrize(
    ("top_fraction", "selected"),
    [
        (None, ["a", "b", "c", "f", "g"]),
        (0.2, ["a"]),  # 1 of 5: a and b tie on confidence 1, a wins by id
        (0.4, ["a", "b"]),
        (0.6, ["a", "b", "g"]),
        (0.7, ["a", "b", "f", "g"]),  # ceil(3.5) = 4
        (1.0, ["a", "b", "c", "f", "g"]),
    ],
)
def test_top_fraction_cut_with_ties_by_id(top_fraction: float | None, selected: list) -> None:
    ids, probs = _ids_and_probs()
    options = PseudoOptions(max_uncertain_share=0.1, top_fraction=top_fraction)
    table = select_pseudo(ids, probs, options, excluded_ids={"e"})
    assert _selected(table) == selected
    below = set(table["id"]) - set(selected) - {"d", "e"}
    assert set(table.loc[table["reason"] == "below top fraction", "id"]) == below


def test_top_fraction_count_is_not_inflated_by_float_noise() -> None:
    # 0.3 * 10 is 3.0000000000000004 in floating point: still 3 images, not 4.
    probs = np.stack([_image((0.5, k)) for k in range(10)])
    ids = pd.DataFrame({"id": [f"i{k}" for k in range(10)]})
    options = PseudoOptions(max_uncertain_share=None, top_fraction=0.3)
    assert _selected(select_pseudo(ids, probs, options, excluded_ids=set())) == ["i0", "i1", "i2"]


def test_no_uncertainty_bound_keeps_uncertain_images() -> None:
    ids, probs = _ids_and_probs()
    table = select_pseudo(ids, probs, PseudoOptions(max_uncertain_share=None), set())
    assert _selected(table) == ["a", "b", "c", "d", "e", "f", "g"]


def test_duplicates_are_never_selected_even_when_confident() -> None:
    ids, probs = _ids_and_probs()
    options = PseudoOptions(max_uncertain_share=None, top_fraction=1.0)
    excluded = {"a", "b", "e"}  # the three most confident images
    table = select_pseudo(ids, probs, options, excluded)
    assert not table.loc[table["id"].isin(excluded), "selected"].any()
    assert _selected(table) == ["c", "d", "f", "g"]
    # With the dedup mapping the reason names the train images.
    items = pd.DataFrame(
        {
            "id": ["t1", "t2", "a", "b", "e", "g"],
            "split": ["train", "train", "test", "test", "test", "test"],
            "leak_train_ids": [None, None, "t1;t2", "t2", "t1", None],
        }
    )
    assert excluded_test_ids(items) == excluded
    table = select_pseudo(ids, probs, options, train_duplicates(items))
    reasons = dict(zip(table["id"], table["reason"], strict=True))
    assert reasons["a"] == "duplicate of train t1;t2"
    assert reasons["b"] == "duplicate of train t2"
    assert _selected(table) == ["c", "d", "f", "g"]


def test_select_pseudo_rejects_mismatched_inputs() -> None:
    ids, probs = _ids_and_probs()
    with pytest.raises(SegflowError, match="7 test ids but probabilities for 6"):
        select_pseudo(ids, probs[:6], PseudoOptions(), set())
    with pytest.raises(SegflowError, match="repeats"):
        select_pseudo(pd.DataFrame({"id": ["a"] * 7}), probs, PseudoOptions(), set())
    with pytest.raises(SegflowError, match="'id' column"):
        select_pseudo(pd.DataFrame({"name": list(MAPS)}), probs, PseudoOptions(), set())
    with pytest.raises(SegflowError, match=r"\(M, K, H, W\)"):
        select_pseudo(ids, probs[:, 0], PseudoOptions(), set())
    with pytest.raises(SegflowError, match="leak_train_ids"):
        excluded_test_ids(pd.DataFrame({"id": ["a"], "split": ["test"]}))


@pytest.mark.parametrize(("n_classes", "dtype"), [(1, np.uint8), (3, np.uint8), (9, np.uint16)])
def test_hard_targets_are_the_masks_packed(n_classes: int, dtype: type) -> None:
    rng = np.random.default_rng(0)
    masks = (rng.random((4, n_classes, 6, 7)) < 0.4).astype(np.uint8)
    probs = rng.random(masks.shape).astype(np.float16)
    targets = pseudo_targets(probs, masks, PseudoOptions(labels="hard"))
    assert targets.dtype == dtype
    assert targets.shape == (4, 6, 7)
    for image, target in zip(masks, targets, strict=True):
        np.testing.assert_array_equal(target, pack_labels(image))
    if n_classes == 1:
        np.testing.assert_array_equal(targets, masks[:, 0])  # binary: uint8 {0, 1}


def test_soft_targets_are_the_probabilities() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random((3, 2, 5, 5)).astype(np.float16)
    masks = (probs > 0.5).astype(np.uint8)
    targets = pseudo_targets(probs, masks, PseudoOptions(labels="soft"))
    assert targets.dtype == np.float16
    np.testing.assert_array_equal(targets, probs)
    with pytest.raises(SegflowError, match="masks of shape"):
        pseudo_targets(probs, masks[:, :1], PseudoOptions())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rounds", -1),
        ("rounds", 1.5),
        ("rounds", True),
        ("labels", "fuzzy"),
        ("uncertain_low", -0.1),
        ("uncertain_high", 1.5),
        ("uncertain_low", 0.9),  # not below uncertain_high (0.8)
        ("max_uncertain_share", 1.2),
        ("max_uncertain_share", "0.1"),
        ("top_fraction", 0.0),
        ("top_fraction", 1.1),
        ("max_pseudo_share", 1.0),
        ("max_pseudo_share", -0.1),
        ("pseudo_weight", -1.0),
        ("pseudo_weight", float("inf")),
        ("pseudo_weight", float("nan")),
    ],
)
def test_option_validation_names_the_key(key: str, value: object) -> None:
    with pytest.raises(SegflowError, match=rf"pseudo\.{key}"):
        PseudoOptions(**{key: value})


def test_options_round_trip_through_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, PseudoOptions)
    namespace = parser.parse_args(
        [
            "--rounds",
            "2",
            "--labels",
            "soft",
            "--top-fraction",
            "0.5",
            "--max-uncertain-share",
            "none",
        ]
    )
    options = dataclass_from_namespace(PseudoOptions, namespace)
    assert options == PseudoOptions(
        rounds=2, labels="soft", top_fraction=0.5, max_uncertain_share=None
    )
    assert dataclass_from_namespace(PseudoOptions, parser.parse_args([])) == PseudoOptions()


# --------------------------------------------------------------------------- MC-dropout rule


def test_mc_dropout_uncertainty_replaces_the_band() -> None:
    """Planted: all images are sure by the band, but the passes of "d" disagree (std 0.3 on 3
    pixels) and those of "f" a little (std 0.05): mc_dropout drops "d", the band keeps it."""
    ids, probs = _ids_and_probs()
    probs = np.where(probs > 0.5, 1.0, 0.0).astype(np.float16)  # no pixel in the band
    spread = np.zeros_like(probs)
    names = list(MAPS)
    spread[names.index("d"), 0, 0, :3] = 0.3
    spread[names.index("f"), 0, 0, 0] = 0.05
    band = select_pseudo(ids, probs, PseudoOptions(max_uncertain_share=0.1), set(), spread)
    assert "d" in _selected(band)
    options = PseudoOptions(uncertainty="mc_dropout", uncertain_std=0.1, max_uncertain_share=0.1)
    table = select_pseudo(ids, probs, options, set(), spread)
    reasons = dict(zip(table["id"], table["reason"], strict=True))
    assert reasons["d"] == "too uncertain" and reasons["f"] == "selected"
    shares = dict(zip(table["id"], table["uncertain_share"], strict=True))
    assert shares["d"] == 3 / 20 and shares["f"] == 0
    confidence = dict(zip(table["id"], table["confidence"], strict=True))
    assert confidence["d"] == pytest.approx(1 - 2 * 0.3 * 3 / 20, abs=1e-3)


def test_mc_dropout_rule_needs_the_uncertainty_map() -> None:
    ids, probs = _ids_and_probs()
    options = PseudoOptions(uncertainty="mc_dropout")
    with pytest.raises(SegflowError, match="mc_dropout_passes"):
        select_pseudo(ids, probs, options, set())
    with pytest.raises(SegflowError, match="does not match"):
        select_pseudo(ids, probs, options, set(), probs[:, :, :2])
    with pytest.raises(SegflowError, match=r"pseudo\.uncertainty"):
        PseudoOptions(uncertainty="entropy")
    with pytest.raises(SegflowError, match="mc_dropout_passes > 0"):
        check_pseudo_uncertainty({"uncertainty": "mc_dropout"}, {"mc_dropout_passes": 0})
    check_pseudo_uncertainty({"uncertainty": "mc_dropout"}, {"mc_dropout_passes": 4})
    check_pseudo_uncertainty({"uncertainty": "band"}, {})
