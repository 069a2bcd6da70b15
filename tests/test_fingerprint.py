"""Code fingerprints of stages (segflow.core.fingerprint): what goes in, what changes them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from segflow.core.errors import SegflowError
from segflow.core.fingerprint import code_fingerprint, folder_stamp, module_closure, package_root
from segflow.stages import stage_fingerprint, stage_modules

STAGE_MODULES = stage_modules()

REPO = Path(__file__).resolve().parents[1]


def _package(root: Path) -> Path:
    """A fake segflow: a imports b inside a function, b imports c, d is unrelated."""
    package = root / "segflow"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def run():\n    from segflow.b import helper\n    helper()\n")
    (package / "b.py").write_text("import numpy\nfrom segflow import c\n\ndef helper(): pass\n")
    (package / "c.py").write_text("from segflow.core.errors import SegflowError\n")
    (package / "d.py").write_text("import segflow.a\n")
    (package / "cli.py").write_text("from segflow import a\n")
    (package / "core").mkdir()
    (package / "core" / "__init__.py").write_text('"""notes only"""\n')
    (package / "core" / "errors.py").write_text("class SegflowError(Exception): pass\n")
    return package


def test_closure_follows_imports_anywhere_and_only_segflow(tmp_path: Path) -> None:
    package = _package(tmp_path)
    assert module_closure("segflow.a", root=package) == [
        "segflow.a",
        "segflow.b",
        "segflow.c",
        "segflow.core.errors",
    ]
    assert module_closure("segflow.d", root=package)[:2] == ["segflow.a", "segflow.b"]
    # An excluded module is left out with what only it imports; an entry never is.
    assert module_closure("segflow.a", root=package, exclude=("segflow.b",)) == ["segflow.a"]
    assert module_closure("segflow.b", root=package, exclude=("segflow.b",))[0] == "segflow.b"
    with pytest.raises(SegflowError, match=r"segflow\.nope"):
        module_closure("segflow.nope", root=package)
    with pytest.raises(SegflowError, match=r"segflow\.cli"):
        module_closure("segflow.cli", root=package)


def test_fingerprint_changes_exactly_with_the_modules_used(tmp_path: Path) -> None:
    package = _package(tmp_path)
    before = _fresh(package, "segflow.a")
    assert re.fullmatch(r"[0-9a-f]{16}", before)
    (package / "d.py").write_text("import segflow.a\n# unrelated edit\n")
    (package / "cli.py").write_text("# the wiring is not part of any fingerprint\n")
    assert _fresh(package, "segflow.a") == before
    (package / "c.py").write_text("from segflow.core.errors import SegflowError\nX = 1\n")
    assert _fresh(package, "segflow.a") != before


def _fresh(package: Path, entry: str) -> str:
    """The fingerprint computed anew (the cache is per process: a run plans once)."""
    from segflow.core import fingerprint

    fingerprint._cached_fingerprint.cache_clear()
    return code_fingerprint(entry, root=package)


def test_stacking_code_is_in_the_stack_stage_only() -> None:
    closures = {name: module_closure(*modules) for name, modules in STAGE_MODULES.items()}
    users = {
        name
        for name, modules in closures.items()
        if "segflow.ensemble.stacking.learners" in modules
    }
    assert users == {"stack"}
    assert (
        "segflow.model.training.train" in closures["train"]
        and "segflow.model.training.train" not in closures["predict-oof"]
    )
    assert all("segflow.core.errors" in modules for modules in closures.values())
    assert package_root() == Path(__import__("segflow").__file__).resolve().parent


def test_every_rule_command_has_a_fingerprint() -> None:
    rules = "\n".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    commands = set(re.findall(r'"segflow ([a-z-]+)', rules))
    fingerprinted = set(re.findall(r'stage_fingerprint\("([a-z-]+)"\)', rules))
    # `segflow summary` prints a results folder for a person; `segflow predict-bundle` runs a
    # bundle in a Kaggle notebook, outside any workflow: no rule runs them.
    assert commands == fingerprinted == set(STAGE_MODULES) - {"summary", "predict-bundle"}
    with pytest.raises(KeyError, match="valid: demo-data"):
        stage_fingerprint("bogus")


def test_folder_stamp_sees_files_overwritten_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"one")
    (folder / "sub" / "b.png").write_bytes(b"two")
    before = folder_stamp(folder, tmp_path / "absent")
    assert before == folder_stamp(folder, tmp_path / "absent")
    folder_mtime = folder.stat().st_mtime_ns
    (folder / "a.png").write_bytes(b"ONE!")  # the folder's own mtime does not move
    assert folder.stat().st_mtime_ns == folder_mtime
    assert folder_stamp(folder, tmp_path / "absent") != before
    assert folder_stamp(tmp_path / "absent") != folder_stamp(tmp_path / "other-absent")


def test_budget_code_reaches_training_only_through_the_plan() -> None:
    """train reads the plan file (plan-budget's fingerprint covers budget), and plan-budget
    leaves the timing code out: re-timing must not re-plan and so retrain everything."""
    from segflow.stages import BY_COMMAND

    train, plan = BY_COMMAND["train"], BY_COMMAND["plan-budget"]
    train_closure = module_closure(*train.entries, exclude=train.not_fingerprinted)
    assert "segflow.model.budget" not in train_closure
    assert "segflow.model.training.train" in train_closure
    plan_closure = module_closure(*plan.entries, exclude=plan.not_fingerprinted)
    assert "segflow.model.budget" in plan_closure
    assert "segflow.model.budget_measure" not in plan_closure
