"""Second-level stages on files: candidate layout, pseudo-label targets, stage table, choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segflow.artifacts.predictions import Prediction, read_oof
from segflow.core.errors import SegflowError
from segflow.ensemble.blend import run_blend
from segflow.ensemble.candidates import write_oof_candidate
from segflow.ensemble.choose import choose_candidate, markdown_table, stage_table
from segflow.ensemble.pseudo import PseudoOptions
from segflow.ensemble.select_pseudo import select_pseudo_stage
from segflow.model.tune_postprocess import tuned_scores


def _write_scores(root: Path, name: str, round_: int, raw: float, tuned: float) -> None:
    oof = root / "oof" / name / f"round{round_}"
    oof.mkdir(parents=True)
    (oof / "metrics.json").write_text(json.dumps({"kaggle": raw, "dice": raw + 0.1}))
    params = root / "postprocess" / name / f"round{round_}"
    params.mkdir(parents=True)
    (params / "params.json").write_text(json.dumps({"metric": "kaggle", "score": tuned}))


def test_stage_table_deltas_against_the_best_single_and_the_choice(tmp_path: Path) -> None:
    scores = {
        ("a", 0): 0.50,
        ("b", 0): 0.55,
        ("ensemble", 0): 0.58,
        ("a", 1): 0.57,
        ("ensemble", 1): 0.60,
        ("stack_gate", 1): 0.60,
        ("stack_pixel", 1): 0.40,
    }
    for (name, round_), tuned in scores.items():
        _write_scores(tmp_path, name, round_, tuned - 0.05, tuned)
    table = stage_table(list(scores), tmp_path)
    assert table.loc[table["baseline"], "candidate"].tolist() == ["b"]  # best single, round 0
    keys = zip(table["candidate"], table["round"], strict=True)
    deltas = dict(zip(keys, table["delta_tuned"].round(6), strict=True))
    assert deltas == {key: round(value - 0.55, 6) for key, value in scores.items()}
    assert table["stage"].tolist()[3] == "experiment (pseudo round 1)"
    chosen = choose_candidate(table)  # a tie: the earlier-listed (simpler) candidate wins
    assert (chosen["candidate"], chosen["round"]) == ("ensemble", 1)
    forced = choose_candidate(table, "stack_pixel:1")
    assert forced["candidate"] == "stack_pixel"
    with pytest.raises(SegflowError, match="not a candidate"):
        choose_candidate(table, "c:0")
    markdown = markdown_table(table)
    assert "| experiment | b | 0 | 0.5000 | 0.6000 | 0.5500 | baseline |" in markdown
    assert "+0.0500" in markdown and "-0.1500" in markdown


@pytest.mark.parametrize("metric", ["kaggle", "dice"])
def test_tuned_scores_are_the_per_image_scores_the_tuner_averaged(metric: str) -> None:
    from segflow.model.postprocess import tune_classes

    rng = np.random.default_rng(3)
    truths = np.zeros((12, 16, 16), np.uint8)
    for i in range(12):
        if i % 3:
            truths[i, 2 : 4 + i, 3 : 5 + i] |= 0b01
        if i % 2:
            truths[i, 8:14, 8:14] |= 0b10
    planes = np.stack([(truths >> k) & 1 for k in range(2)], 1).astype(np.float32)
    probs = (0.6 * planes + 0.5 * rng.random(planes.shape)).clip(0, 1).astype(np.float16)
    ids = pd.DataFrame({"id": [f"i{i}" for i in range(12)]})
    gate = rng.random((12, 2)).astype(np.float32)
    ids = ids.assign(nonempty_prob_0=gate[:, 0], nonempty_prob_1=gate[:, 1])
    _, _, summary = tune_classes(
        probs, truths, ["a", "b"], [0.4, 0.6], [0, 6], [False, True], metric, gate, [0.5]
    )
    scores = tuned_scores(Prediction(ids, probs), summary, ["a", "b"], truths)
    assert scores.shape == (12,)
    assert scores.mean() == pytest.approx(summary["score"], abs=1e-12)


def test_markdown_table_marks_a_candidate_near_a_constant() -> None:
    table = pd.DataFrame(
        {
            "stage": ["experiment", "stack_gate"],
            "candidate": ["a", "stack_gate"],
            "round": [0, 0],
            "kaggle": [0.8, 0.4],
            "dice": [0.8, 0.4],
            "tuned": [0.8, 0.4],
            "delta_tuned": [0.0, -0.4],
            "baseline": [True, False],
            "const_empty": [0.4, 0.4],
            "const_full": [0.0, 0.0],
            "gain_vs_constant": [0.4, 0.0],
            "noise": [0.1, 0.0],
            "near_constant": [False, True],
        }
    )
    markdown = markdown_table(table)
    assert "| const_empty | const_full | gain_vs_constant | noise |" in markdown
    assert "| 0.4000 | 0.0000 | +0.4000 | 0.1000 |" in markdown
    assert "| -0.4000 | 0.4000 | 0.0000 | +0.0000 near constant | 0.0000 |" in markdown


def test_candidate_files_round_trip(tmp_path: Path) -> None:
    ids = pd.DataFrame({"id": ["a", "b"], "orig_height": 4, "orig_width": 4})
    probs = np.zeros((2, 1, 4, 4), np.float16)
    probs[0, 0, :2] = 0.9
    truths = np.zeros((2, 4, 4), np.uint8)
    truths[0, :2] = 1
    folds = pd.DataFrame({"id": ["b", "a"], "fold": [1, 0]})
    gated = ids.assign(nonempty_prob_0=[0.9, 0.1])
    summary = write_oof_candidate(
        tmp_path / "oof", Prediction(gated, probs), folds, truths, ["mask"]
    )
    assert summary["kaggle"] == 1.0
    oof = read_oof(tmp_path / "oof")
    assert oof.ids["fold"].tolist() == [0, 1] and oof.ids["nonempty_prob_0"].tolist() == [0.9, 0.1]
    np.testing.assert_array_equal(oof.probs, probs)


def test_blend_stage_prefers_the_good_experiment() -> None:
    truths = np.zeros((6, 8, 8), np.uint8)
    truths[::2, 2:6, 2:6] = 1
    good = (truths[:, None] * 0.9).astype(np.float16)
    noise = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float16)
    ids = pd.DataFrame({"id": [f"i{k}" for k in range(6)], "orig_height": 8, "orig_width": 8})
    folds = pd.DataFrame({"id": ids["id"], "fold": [0, 1] * 3})
    oof, summary, table = run_blend(
        ["good", "noise"],
        [Prediction(ids, good), Prediction(ids, noise)],
        truths,
        folds,
        ["mask"],
        "kaggle",
        0.1,
    )
    assert summary["weights"]["good"] > summary["weights"]["noise"]
    assert set(table["kind"]) == {"single:good", "single:noise", "mean", "tuned"}
    assert oof.probs.shape == good.shape and oof.probs.dtype == np.float16


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_pseudo_targets_follow_the_tuned_postprocessing_at_the_training_size(labels: str) -> None:
    probs = np.full((3, 1, 20, 20), 0.02, np.float16)
    probs[0, 0, 5:15, 5:15] = 0.97  # confident object
    probs[1, 0, :, :10] = 0.5  # half the pixels uncertain
    ids = pd.DataFrame({"id": ["c", "b", "a"], "orig_height": 20, "orig_width": 20})
    tuned = {
        "classes": [
            {"class": "mask", "threshold": 0.5, "min_area": 0, "fill_holes": False, "gate": 0.0}
        ]
    }
    items = pd.DataFrame(
        {"id": ["a", "b", "c"], "split": "test", "leak_train_ids": ["t1", None, None]}
    )
    options = PseudoOptions(labels=labels, max_uncertain_share=0.1)
    selection, targets, summary = select_pseudo_stage(
        Prediction(ids, probs), tuned, ["mask"], items, options, (10, 10)
    )
    assert selection["id"].tolist() == ["a", "b", "c"]
    assert selection["selected"].tolist() == [False, False, True]  # duplicate, unsure, chosen
    assert summary["reasons"] == {"duplicate of train": 1, "too uncertain": 1, "selected": 1}
    if labels == "hard":
        assert targets.shape == (1, 10, 10) and targets.dtype == np.uint8
        assert targets[0, 3:7, 3:7].all() and targets[0].sum() == 25
    else:
        assert targets.shape == (1, 1, 10, 10) and targets.dtype == np.float16
        assert float(targets[0, 0, 5, 5]) == pytest.approx(0.97, abs=1e-3)
