"""Every stage is a `segflow` sub-command with working help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from segflow.cli import build_parser, main

STAGES = ["demo-data", "ingest", "dedup", "preprocess", "folds", "plan-budget", "summary", "report"]


@pytest.mark.parametrize("command", STAGES)
def test_every_stage_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: segflow" in capsys.readouterr().out


def test_option_flags_follow_config_keys() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["preprocess"].format_help()
    for flag in ("--clahe-clip-limit", "--clahe-tile-grid", "--no-to-uint8", "--interpolation"):
        assert flag in help_text


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "segflow", "--version"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT / "src")},
        check=True,
    )
    assert result.stdout.startswith("segflow ")


def test_summary_of_an_empty_folder(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", str(tmp_path)]) == 0
    assert "nothing yet" in capsys.readouterr().out


def test_stage_reading_a_missing_artifact_fails_cleanly(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "folds",
            "--manifest",
            str(tmp_path / "nope.parquet"),
            "--dedup-items",
            str(tmp_path / "x.parquet"),
            "--out-folds",
            str(tmp_path / "folds.csv"),
            "--out-summary",
            str(tmp_path / "s.json"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert (
        len(err) == 1
        and err[0].startswith("segflow folds: error: manifest ")
        and "nope.parquet" in err[0]
    )
    assert not (tmp_path / "folds.csv").exists()


def test_summary_ends_with_the_final_choice_and_the_stage_table(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    final = tmp_path / "final"
    final.mkdir()
    (final / "choice.json").write_text(
        '{"candidate": "ensemble", "round": 1, "reason": "best tuned OOF score",'
        ' "metric": "kaggle", "tuned_oof_score": 0.61}'
    )
    (final / "stages.md").write_text("| stage | candidate |\n|---|---|\n| ensemble | ensemble |\n")
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (
        "final" in out and "ensemble round 1 (best tuned OOF score, tuned OOF kaggle 0.6100)" in out
    )
    assert out.rstrip().endswith("| ensemble | ensemble |")


def test_a_light_stage_imports_only_its_own_module() -> None:
    """`segflow folds` must not import every stage (torch, LightGBM): that is start-up time and
    memory a SLURM job of a light stage pays for nothing."""
    code = (
        "import sys\n"
        "from segflow.cli import main\n"
        "try:\n"
        "    main(['folds', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'lightgbm', 'segmentation_models_pytorch') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
