"""The results folder's layout: where each stage writes, for the stages and the report.

Every candidate (an experiment, ``ensemble``, ``stack_gate``, ``stack_pixel``) has the same
folders per pseudo-labelling round: ``oof/<name>/round<r>`` (evaluate-oof style),
``test/<name>/round<r>`` (its fold models' ``fold<k>``/``full`` predictions, or a second-level
candidate's merged one), ``postprocess/<name>/round<r>/params.json`` and
``submission/<name>/round<r>/submission.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from segflow.core.errors import SegflowError

CANDIDATE_KINDS = ("oof", "test", "postprocess", "submission")


def round_name(round_: int) -> str:
    """``round<r>``."""
    return f"round{int(round_)}"


def candidate_dir(results: str | os.PathLike[str], kind: str, name: str, round_: int) -> Path:
    """``<results>/<kind>/<name>/round<r>`` for kind oof, test, postprocess or submission."""
    if kind not in CANDIDATE_KINDS:
        raise KeyError(f"unknown candidate folder {kind!r}; valid: {', '.join(CANDIDATE_KINDS)}")
    return Path(results) / kind / name / round_name(round_)


def postprocess_params(results: str | os.PathLike[str], name: str, round_: int) -> Path:
    """tune-postprocess's ``params.json`` of a candidate."""
    return candidate_dir(results, "postprocess", name, round_) / "params.json"


def submission_csv(results: str | os.PathLike[str], name: str, round_: int) -> Path:
    """submit's ``submission.csv`` of a candidate."""
    return candidate_dir(results, "submission", name, round_) / "submission.csv"


def candidate_of(oof_dir: str | os.PathLike[str]) -> tuple[Path, str, int]:
    """(results folder, candidate name, round) of an ``oof/<name>/round<r>`` folder.

    Raises:
        ValueError: a folder outside that layout.
    """
    oof_dir = Path(oof_dir)
    kind, name, round_dir = oof_dir.parts[-3:] if len(oof_dir.parts) >= 3 else ("", "", "")
    if kind != "oof" or not round_dir.startswith("round") or not round_dir[5:].isdigit():
        raise ValueError(f"{oof_dir} is not an oof/<name>/round<r> folder of a results folder")
    return oof_dir.parent.parent.parent, name, int(round_dir[5:])


def manifest(results: str | os.PathLike[str]) -> Path:
    """ingest's train manifest (the train side reads nothing of the test set)."""
    return Path(results) / "ingest" / "manifest.parquet"


def test_manifest(results: str | os.PathLike[str]) -> Path:
    """ingest's test manifest (``--split test``)."""
    return Path(results) / "ingest" / "test_manifest.parquet"


def test_leaks(results: str | os.PathLike[str]) -> Path:
    """The leaks stage's links of test items to their train copies."""
    return Path(results) / "dedup" / "test_leaks.parquet"


def dedup_items(results: str | os.PathLike[str]) -> Path:
    """dedup's items table."""
    return Path(results) / "dedup" / "items.parquet"


def arrays_dir(results: str | os.PathLike[str]) -> Path:
    """preprocess's output folder (:mod:`segflow.artifacts.arrays`)."""
    return Path(results) / "preprocess"


def final_dir(results: str | os.PathLike[str]) -> Path:
    """choose's folder: ``submission.csv``, ``choice.json``, ``stages.csv``/``.md``."""
    return Path(results) / "final"


def group_by_experiment(dirs: Sequence[str], groups: int, what: str) -> list[list[str]]:
    """Split experiment-major folder lists (``--test-dirs``) into one list per experiment.

    In the results layout (``test/<name>/round<r>/fold<k>`` and ``.../full``) consecutive
    folders with the same parent are one experiment's, so experiments may bring different
    counts (a full refit's one folder, or the folds' and the refit's); folders outside that
    layout are split evenly.

    Raises:
        SegflowError: the folders do not split into ``groups`` experiments.
    """
    runs: list[list[str]] = []
    for directory in dirs:
        if runs and Path(runs[-1][-1]).parent == Path(directory).parent:
            runs[-1].append(directory)
        else:
            runs.append([directory])
    if len(runs) == groups:
        return runs
    if len(dirs) % groups:
        raise SegflowError(f"{len(dirs)} {what} do not split into {groups} experiments")
    size = len(dirs) // groups
    return [list(dirs[i * size : (i + 1) * size]) for i in range(groups)]


def model_checkpoint(results: str | os.PathLike[str], name: str, round_: int, member: str) -> Path:
    """train's ``model.pt`` of an experiment's fold (``fold<k>``) or refit (``full``)."""
    return Path(results) / "models" / name / round_name(round_) / member / "model.pt"


def ensemble_weights(results: str | os.PathLike[str], round_: int) -> Path:
    """blend's ``weights.json`` of a round."""
    return Path(results) / "ensemble" / round_name(round_) / "weights.json"


def stack_dir(results: str | os.PathLike[str], round_: int) -> Path:
    """stack's folder of a round: ``summary_<stacker>.json`` and ``class_<k>/`` models."""
    return Path(results) / "stack" / round_name(round_)


def choice_json(results: str | os.PathLike[str]) -> Path:
    """choose's ``choice.json`` (the final candidate and round)."""
    return final_dir(results) / "choice.json"
