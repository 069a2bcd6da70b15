"""Tests for the final-submission stage (segflow.ensemble.final_submission)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from segflow.artifacts import layout
from segflow.core.errors import SegflowError
from segflow.ensemble.final_submission import chosen_submission, run


def _candidate(results: Path, name: str, round_: int, text: str) -> None:
    path = layout.submission_csv(results, name, round_)
    path.parent.mkdir(parents=True)
    path.write_text(text)


def test_copies_the_submission_choice_json_names(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _candidate(results, "unet", 0, "id,rle_mask\na,1 2\n")
    _candidate(results, "stack_gate", 1, "id,rle_mask\na,3 4\n")
    choice = layout.final_dir(results) / "choice.json"
    choice.parent.mkdir(parents=True)
    choice.write_text(json.dumps({"candidate": "stack_gate", "round": 1}))
    out = layout.final_dir(results) / "submission.csv"
    run(argparse.Namespace(choice=str(choice), results_dir=str(results), out=str(out)))
    assert out.read_text() == "id,rle_mask\na,3 4\n"


def test_a_missing_choice_or_submission_is_one_named_error(tmp_path: Path) -> None:
    choice = tmp_path / "choice.json"
    with pytest.raises(SegflowError, match="run choose first"):
        chosen_submission(choice, tmp_path)
    choice.write_text(json.dumps({"candidate": "unet"}))
    with pytest.raises(SegflowError, match="no readable candidate and round"):
        chosen_submission(choice, tmp_path)
    choice.write_text(json.dumps({"candidate": "unet", "round": 0}))
    with pytest.raises(SegflowError, match=r"unet round 0 does not exist"):
        chosen_submission(choice, tmp_path)
