"""Code fingerprints of stages (segflow.core.fingerprint): what goes in, what changes them."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from segflow.core.errors import SegflowError
from segflow.core.fingerprint import code_fingerprint, module_closure, package_root
from segflow.stages import stage_fingerprint, stage_modules

STAGE_MODULES = stage_modules()

REPO = Path(__file__).resolve().parents[1]


def _package(root: Path, files: dict[str, str]) -> Path:
    """A fake segflow under ``root``: ``files`` maps a path in the package to its source; the
    wiring (cli, stages), the package notes and core/errors.py are always there."""
    package = root / "segflow"
    defaults = {
        "__init__.py": "",
        "cli.py": "from segflow import a\n",
        "stages.py": "",
        "core/__init__.py": '"""notes only"""\n',
        "core/errors.py": "class SegflowError(Exception):\n    pass\n",
    }
    for name, text in {**defaults, **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package


def _fresh(package: Path, *entries: str, exclude: tuple[str, ...] = ()) -> str:
    """The fingerprint computed anew (the cache is per process: a run plans once)."""
    from segflow.core import fingerprint

    fingerprint._cached_fingerprint.cache_clear()
    return code_fingerprint(*entries, root=package, exclude=exclude)


def _edit(package: Path, name: str, old: str, new: str) -> None:
    path = package / name
    text = path.read_text()
    if old not in text:
        raise ValueError(f"{path}: no {old!r} to replace")
    path.write_text(text.replace(old, new, 1))


def _changes(package: Path, entry: str, name: str, old: str, new: str) -> bool:
    """Whether replacing ``old`` with ``new`` in ``name`` changes ``entry``'s fingerprint (the
    edit is undone afterwards)."""
    before = _fresh(package, entry)
    _edit(package, name, old, new)
    after = _fresh(package, entry)
    _edit(package, name, new, old)
    return after != before


STAGE = '''\
    """A stage."""
    from segflow.b import helper


    def add_arguments(parser):
        parser.add_argument("--x")


    def run(args):
        return helper(args.x)


    def unused():
        from segflow.d import other
        return other()
    '''

HELPERS = '''\
    """Helpers."""
    import os

    from segflow.c import used_by_unused
    from segflow.core.errors import SegflowError

    LIMIT = 3


    def helper(x):
        """Checks x."""
        if x is None:
            raise SegflowError("x is missing")
        return _inner(x) * LIMIT


    def _inner(x):
        return x + 1


    def not_reached(x):
        return used_by_unused(x)
    '''


def _basic(root: Path) -> Path:
    return _package(
        root,
        {
            "a.py": STAGE,
            "b.py": HELPERS,
            "c.py": "def used_by_unused(x):\n    return x\n",
            "d.py": "def other():\n    return 1\n",
        },
    )


def test_closure_follows_the_symbols_a_stage_uses(tmp_path: Path) -> None:
    package = _basic(tmp_path)
    # a's run uses b.helper, which uses SegflowError; c and d are imported by code that never
    # runs in this stage (b.not_reached, a.unused).
    assert module_closure("segflow.a", root=package) == [
        "segflow.a",
        "segflow.b",
        "segflow.core.errors",
    ]
    # An entry without run/add_arguments counts whole.
    assert module_closure("segflow.b", root=package) == [
        "segflow.b",
        "segflow.c",
        "segflow.core.errors",
    ]
    # An excluded module is left out with what only it reaches; an entry never is.
    assert module_closure("segflow.a", root=package, exclude=("segflow.b",)) == ["segflow.a"]
    assert module_closure("segflow.b", root=package, exclude=("segflow.b",))[0] == "segflow.b"
    before = _fresh(package, "segflow.a", exclude=("segflow.b",))
    _edit(package, "b.py", "return x + 1", "return x + 2")
    assert _fresh(package, "segflow.a", exclude=("segflow.b",)) == before
    with pytest.raises(SegflowError, match=r"segflow\.nope"):
        module_closure("segflow.nope", root=package)
    with pytest.raises(SegflowError, match=r"segflow\.cli"):
        module_closure("segflow.cli", root=package)


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("b.py", "LIMIT = 3\n", "LIMIT = 3  # the most we allow\n# more notes\n"),
        ("b.py", '"""Checks x."""', '"""Checks x, and says so when it is missing."""'),
        ("b.py", '"""Helpers."""', "'''Helpers, rewritten.'''"),
        ("a.py", '"""A stage."""\n', ""),
        ("b.py", "    return x + 1\n", "    return (\n        x  +  1\n    )\n"),
        ("b.py", "def _inner(x):", "\n\ndef _inner(x) :"),
        # Never reached by this stage: another stage's helper in a module it imports, and the
        # code only that helper imports.
        ("b.py", "return used_by_unused(x)", "return used_by_unused(x) + 1"),
        ("c.py", "return x", "return -x"),
        ("a.py", "return other()", "return other() * 2"),
        ("d.py", "return 1", "return 2"),
        ("cli.py", "from segflow import a", "from segflow import a, b"),
    ],
    ids=[
        "comment",
        "function-docstring",
        "module-docstring",
        "stage-docstring-removed",
        "formatting",
        "blank-lines",
        "unreached-function",
        "module-only-it-imports",
        "unreached-stage-function",
        "module-only-that-imports",
        "cli",
    ],
)
def test_edits_that_change_nothing_the_stage_runs_keep_its_fingerprint(
    tmp_path: Path, name: str, old: str, new: str
) -> None:
    package = _basic(tmp_path)
    before = _fresh(package, "segflow.a")
    assert re.fullmatch(r"[0-9a-f]{16}", before)
    _edit(package, name, old, new)
    assert _fresh(package, "segflow.a") == before


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("b.py", "return x + 1", "return x + 2"),  # a function the reached one calls
        ("b.py", "LIMIT = 3", "LIMIT = 4"),  # a module-level constant of a reached module
        ("b.py", "import os\n", "import os\nimport sys\n"),  # its imports
        ("b.py", '"x is missing"', '"x is absent"'),  # a string that is no docstring
        ("core/errors.py", "pass", "code = 2"),  # a class used two modules down
        ("a.py", '"--x"', '"--y"'),  # the stage's own command line
    ],
    ids=["callee", "constant", "import", "message", "class-body", "add-arguments"],
)
def test_real_edits_of_reached_code_change_the_fingerprint(
    tmp_path: Path, name: str, old: str, new: str
) -> None:
    package = _basic(tmp_path)
    assert _changes(package, "segflow.a", name, old, new)


def test_a_class_counts_whole_with_its_bases_and_decorators(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": """\
                from segflow.shapes import Square
                def run(args):
                    return Square(2).area()
                """,
            "shapes.py": """\
                from dataclasses import dataclass
                from segflow.base import Shape, checked
                @checked
                @dataclass
                class Square(Shape):
                    side: int
                    def area(self):
                        return self.side**2
                    def perimeter(self):
                        return 4 * self.side
                def circle_area(r):
                    return 3.14 * r * r
                """,
            "base.py": """\
                def checked(cls):
                    return cls
                class Shape:
                    def describe(self):
                        return "shape"
                def unrelated():
                    return 0
                """,
        },
    )
    entry = "segflow.a"
    assert module_closure(entry, root=package) == ["segflow.a", "segflow.base", "segflow.shapes"]
    # Any method, even one this stage never calls, a field, a base and a decorator count.
    assert _changes(package, entry, "shapes.py", "4 * self.side", "2 * self.side")
    assert _changes(package, entry, "shapes.py", "side: int", "side: float")
    assert _changes(package, entry, "base.py", 'return "shape"', 'return "Shape"')
    assert _changes(package, entry, "base.py", "return cls", "return cls or None")
    assert not _changes(package, entry, "shapes.py", "3.14 * r", "3.1416 * r")
    assert not _changes(package, entry, "base.py", "return 0", "return 1")


def test_module_level_statements_of_a_reached_module_always_count(tmp_path: Path) -> None:
    """A registry maps names to functions that no code names: they count through it."""
    package = _package(
        tmp_path,
        {
            "a.py": """\
                from segflow.losses import build_loss
                def run(args):
                    return build_loss(args.name)
                """,
            "losses.py": """\
                from segflow.terms import dice
                def bce(p, t):
                    return -(t * p)
                def focal(p, t):
                    return bce(p, t) ** 2
                LOSSES = {"bce": bce, "dice": dice}
                try:
                    from segflow.fast import fast_bce as _fast
                except ImportError:
                    _fast = None
                def build_loss(name):
                    return LOSSES[name]
                """,
            "terms.py": "def dice(p, t):\n    return p * t\n\ndef jaccard(p, t):\n    return 0\n",
            "fast.py": "def fast_bce(p, t):\n    return p\n",
        },
    )
    entry = "segflow.a"
    # fast.py is imported, not used: the try block binds _fast, which nothing reads.
    assert module_closure(entry, root=package) == ["segflow.a", "segflow.losses", "segflow.terms"]
    assert _changes(package, entry, "losses.py", "return -(t * p)", "return -(t * p) / 2")
    assert _changes(package, entry, "terms.py", "return p * t", "return p * t * 2")
    assert _changes(package, entry, "losses.py", '"dice": dice}', '"dice": dice, "x": bce}')
    # focal is in no registry and no reached code names it; jaccard neither.
    assert not _changes(package, entry, "losses.py", "** 2", "** 3")
    assert not _changes(package, entry, "terms.py", "return 0", "return 1")
    # Once the module-level code uses _fast, fast_bce counts.
    _edit(package, "losses.py", '"dice": dice}', '"dice": dice, "fast": _fast}')
    assert "segflow.fast" in module_closure(entry, root=package)
    assert _changes(package, entry, "fast.py", "return p", "return -p")


@pytest.mark.parametrize(
    "use",
    [
        "from segflow.lib.tools import tool\ndef run(args):\n    return tool()\n",
        "import segflow.lib.tools as t\ndef run(args):\n    return t.tool()\n",
        "from segflow.lib import tools\ndef run(args):\n    return tools.tool()\n",
        "import segflow.lib.tools\ndef run(args):\n    return segflow.lib.tools.tool()\n",
        "def run(args):\n    from segflow.lib.tools import tool as t\n    return t()\n",
        # Re-exports: the name imported from a module that imported it.
        "from segflow.lib.api import tool\ndef run(args):\n    return tool()\n",
        "from segflow.lib import api\ndef run(args):\n    return api.tool()\n",
    ],
    ids=["from", "import-as", "from-package", "dotted", "in-function", "reexport", "reexport-attr"],
)
def test_names_resolve_through_every_import_form(tmp_path: Path, use: str) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": use,
            "lib/__init__.py": '"""notes"""\n',
            "lib/tools.py": "def tool():\n    return 1\n\ndef spare():\n    return 2\n",
            "lib/api.py": "from segflow.lib.tools import tool\n",
        },
    )
    entry = "segflow.a"
    assert "segflow.lib.tools" in module_closure(entry, root=package)
    assert _changes(package, entry, "lib/tools.py", "return 1", "return 10")
    assert not _changes(package, entry, "lib/tools.py", "return 2", "return 20")


@pytest.mark.parametrize(
    "use",
    [
        # The module object itself escapes: getattr, a value passed on.
        "from segflow import lib_mod\ndef run(args):\n    return getattr(lib_mod, args.name)()\n",
        "import segflow.lib_mod as m\ndef run(args):\n    return call(m)\ndef call(x):\n    return x\n",
        "from segflow.lib_mod import *\ndef run(args):\n    return tool()\n",
        "import importlib\n"
        "def run(args):\n    return importlib.import_module('segflow.lib_mod').tool()\n",
        # A computed name: every segflow module this module names in a string counts whole.
        "import importlib\nNAMES = {'x': 'segflow.lib_mod'}\n"
        "def run(args):\n    return importlib.import_module(NAMES[args.x]).tool()\n",
        "def run(args):\n    return __import__('segflow.lib_mod')\n",
        # A name the module does not define at top level (made by globals() there).
        "from segflow.lib_mod import made\ndef run(args):\n    return made()\n",
    ],
    ids=["getattr", "module-as-value", "star", "import-module", "computed", "dunder", "undefined"],
)
def test_dynamic_uses_count_the_whole_module(tmp_path: Path, use: str) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": use,
            "lib_mod.py": """\
                def tool():
                    return 1
                def spare():
                    return 2
                globals()["made"] = tool
                """,
        },
    )
    entry = "segflow.a"
    assert "segflow.lib_mod" in module_closure(entry, root=package)
    assert _changes(package, entry, "lib_mod.py", "return 2", "return 20")


def test_globals_in_reached_code_counts_its_own_module_whole(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": "from segflow.b import pick\ndef run(args):\n    return pick(args.name)()\n",
            "b.py": """\
                def pick(name):
                    return globals()["_" + name]
                def _fast():
                    return 1
                """,
        },
    )
    assert _changes(package, "segflow.a", "b.py", "return 1", "return 2")


def test_imported_modules_count_for_side_effects_or_registering_decorators(
    tmp_path: Path,
) -> None:
    """A module none of whose definitions a stage uses counts when importing it does something
    (sets an environment variable; decorates a definition with segflow code, which may register
    it)."""
    package = _package(
        tmp_path,
        {
            "a.py": """\
                import segflow.env_setup
                import segflow.plain
                from segflow.registry import REGISTRY
                def run(args):
                    return REGISTRY[args.name]()
                """,
            "env_setup.py": "import os\nos.environ.setdefault('LIB_FLAG', '1')\n",
            "plain.py": "import os\nFLAG = os.environ.get('LIB_FLAG')\n",
            "registry.py": """\
                REGISTRY = {}
                def register(function):
                    REGISTRY[function.__name__] = function
                    return function
                """,
            "plugins.py": """\
                from segflow.registry import register
                @register
                def fast():
                    return 1
                def unregistered():
                    return 2
                """,
            "b.py": "import segflow.plugins\n",
        },
    )
    entry = "segflow.a"
    assert module_closure(entry, root=package) == [
        "segflow.a",
        "segflow.env_setup",
        "segflow.registry",
    ]
    assert _changes(package, entry, "env_setup.py", "'1'", "'0'")
    assert not _changes(package, entry, "plain.py", "FLAG =", "FLAG_NAME =")
    # Once something imports the plugins, its registered definition counts, not the others.
    _edit(package, "a.py", "import segflow.plain\n", "import segflow.b\n")
    assert "segflow.plugins" in module_closure(entry, root=package)
    assert _changes(package, entry, "plugins.py", "return 1", "return 10")
    assert not _changes(package, entry, "plugins.py", "return 2", "return 20")


def test_a_file_that_does_not_parse_is_named(tmp_path: Path) -> None:
    package = _basic(tmp_path)
    (package / "b.py").write_text("def helper(:\n")
    with pytest.raises(SegflowError, match=r"b\.py: cannot parse"):
        _fresh(package, "segflow.a")


def test_stacking_code_is_in_the_stacking_and_bundle_stages_only() -> None:
    """The fit and the apply of the stacked models, and the bundle that carries them (export
    loads them, predict-bundle applies them): no other stage reruns for a stacking edit."""
    closures = {name: module_closure(*modules) for name, modules in STAGE_MODULES.items()}
    users = {
        name
        for name, modules in closures.items()
        if "segflow.ensemble.stacking.learners" in modules
    }
    assert users == {"stack", "apply-stack", "export", "predict-bundle"}
    assert (
        "segflow.model.training.train" in closures["train"]
        and "segflow.model.training.train" not in closures["predict-oof"]
    )
    assert all("segflow.core.errors" in modules for modules in closures.values())
    assert package_root() == Path(__import__("segflow").__file__).resolve().parent


# Modules whose code each stage's fingerprint hashes (issue 13): what the stages reach today.
# An edit reruns the stages that reach it, so a helper that a stage uses from another stage's
# module (or from a heavy one) belongs in a narrow module both reach; raising a ceiling here
# needs a reason, lowering one is progress. Issue 13 aims at 8; what the others still reach is
# code they run: every stage errors, atomic, stage_args (flags, provenance); blend the weights'
# search, the candidates' writer and the metrics, on predictions, truths, folds (tables) and
# stats.json's classes (arrays); tune-postprocess the post-processing (and its options), the
# metrics and image_scores, on the same four artifacts, + rle for the watershed's true objects
# (an object RLE CSV matched to the manifest's ids); submit the post-processing (options),
# predictions, arrays, tables, and rle, labels and imageio for the copied train labels.
MODULE_CEILINGS = {"choose": 7, "blend": 11, "tune-postprocess": 13, "submit": 12}


def _fingerprint_closures() -> dict[str, list[str]]:
    from segflow.stages import STAGES

    return {
        stage.command: module_closure(*stage.entries, exclude=stage.not_fingerprinted)
        for stage in STAGES
    }


def test_stage_fingerprints_reach_few_modules() -> None:
    closures = _fingerprint_closures()
    sizes = {command: len(modules) for command, modules in closures.items()}
    for command, ceiling in MODULE_CEILINGS.items():
        assert sizes[command] <= ceiling, (
            f"{command}'s fingerprint touches {sizes[command]} modules (ceiling {ceiling}): "
            + " ".join(name.removeprefix("segflow.") for name in closures[command])
        )
    # Helpers that other stages use live outside the stage modules that once held them.
    assert "segflow.model.evaluate_oof" not in closures["blend"] + closures["stack"]
    assert "segflow.ensemble.blend" not in closures["predict-bundle"]
    assert "segflow.search.search_worker" not in closures["search-summary"]
    assert "segflow.data.dedup" not in closures["ingest"]
    # A search trial trains for its trial_epochs, never through train's command (its plan).
    assert "segflow.model.budget" not in closures["search-worker"]


def test_every_rule_command_has_a_fingerprint() -> None:
    rules = "\n".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    commands = set(re.findall(r'"segflow ([a-z-]+)', rules))
    fingerprinted = set(re.findall(r'stage_fingerprint\("([a-z-]+)"\)', rules))
    # `segflow summary` prints a results folder for a person; `segflow predict-bundle` runs a
    # bundle in a Kaggle notebook, outside any workflow: no rule runs them.
    # `segflow demo-dicom` writes a synthetic DICOM set for tests and a person (no rule either).
    assert (
        commands
        == fingerprinted
        == set(STAGE_MODULES)
        - {
            "summary",
            "predict-bundle",
            "demo-dicom",
        }
    )
    with pytest.raises(KeyError, match="valid: demo-data"):
        stage_fingerprint("bogus")


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


def _stage_fingerprints(package: Path) -> dict[str, str]:
    from segflow.core import fingerprint
    from segflow.stages import STAGES

    fingerprint._cached_fingerprint.cache_clear()
    return {stage.command: stage_fingerprint(stage.command, root=package) for stage in STAGES}


def _changed_stages(package: Path, name: str, old: str, new: str) -> set[str]:
    before = _stage_fingerprints(package)
    _edit(package, name, old, new)
    after = _stage_fingerprints(package)
    _edit(package, name, new, old)
    return {command for command in before if before[command] != after[command]}


def test_the_package_s_own_edits_rerun_exactly_their_stages(tmp_path: Path) -> None:
    import shutil

    package = tmp_path / "segflow"
    shutil.copytree(package_root(), package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _stage_fingerprints(package)
    # A comment in every module and a docstring reworded in every module: nothing reruns.
    for path in package.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"^(\s*)def (\w+)\((.*)$", r"\1# a note\n\1def \2(\3", text, flags=re.M)
        text = re.sub(r'^"""', '"""Reworded. ', text, count=1, flags=re.M)
        path.write_text(text + "\n# the end\n")
    assert _stage_fingerprints(package) == before
    tta, provenance = "model/inference/tta.py", "core/stage_args.py"
    # predict-bundle replays prediction with the same TTA code (it has no rule of its own).
    assert _changed_stages(package, tta, "\ndef get_tta(", "\nX = 1\n\n\ndef get_tta(") == {
        "predict-oof",
        "predict-test",
        "predict-bundle",
    }
    # Provenance JSON is written by the stages' own run, inside their fingerprints.
    changed = _changed_stages(package, provenance, '"seed": seed,', '"seed": seed, "x": 1,')
    assert {"ingest", "dedup", "folds", "train", "stack", "blend"} <= changed
    changed = _changed_stages(package, "model/postprocess.py", "\ndef ", "\nX = 1\n\n\ndef ")
    assert {"tune-postprocess", "submit"} <= changed
    # choose reads tune-postprocess's per-image scores: it never post-processes nor scores.
    assert not changed & {"blend", "stack", "train", "predict-oof", "choose"}


def test_the_disk_cache_answers_only_for_the_source_it_was_computed_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workflow keeps fingerprints on disk between invocations: the same bytes are answered
    without parsing, a code change is recomputed (and differs), a comment-only edit is
    recomputed (and is equal), a corrupt or unwritable cache file only costs recomputation."""
    import json

    from segflow.core import fingerprint

    package = _package(tmp_path / "pkg", {"a.py": "def run():\n    return 1\n"})
    cache = tmp_path / "snakemake" / "code_fingerprints.json"

    def fresh() -> str:
        fingerprint.source_digest.cache_clear()  # a new process: nothing in memory
        return _fresh(package, "segflow.a")

    class Unparsed:
        def __init__(self, *args: object) -> None:
            raise AssertionError("parsed although the disk cache holds the answer")

    fingerprint.use_disk_cache(cache)
    try:
        first = fresh()
        stored = json.loads(cache.read_text())
        assert stored["source"] == fingerprint.source_digest(str(package.resolve()))
        assert first in stored.values()
        with monkeypatch.context() as patched:
            patched.setattr(fingerprint, "_Reach", Unparsed)
            assert fresh() == first
        _edit(package, "a.py", "return 1", "return 2")
        changed = fresh()
        assert changed != first
        _edit(package, "a.py", "return 2", "return 2  # a comment")
        assert fresh() == changed
        cache.write_text("{not json")
        assert fresh() == changed and json.loads(cache.read_text())["source"]
        (tmp_path / "a-file").write_text("")
        fingerprint.use_disk_cache(tmp_path / "a-file" / "code_fingerprints.json")
        assert fresh() == changed  # unwritable: computed, a warning logged, no error
    finally:
        fingerprint.use_disk_cache(None)
        fingerprint.source_digest.cache_clear()
