"""The package's layers: imports flow one way, core -> formats -> artifacts -> data -> model ->
search -> ensemble -> report (each may import the ones before it, never one after it).

Read from the syntax trees, imports inside functions included (segflow imports heavy modules
lazily), like the security audit (tests/test_security.py). The command line (``cli``,
``stages``, ``__main__``) sits above every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "src" / "segflow"
LAYERS = ("core", "formats", "artifacts", "data", "model", "search", "ensemble", "report", "bundle")
TOP = ("cli", "stages", "__main__", "__init__")


def layer_of(module: str) -> int | None:
    """The rank of ``segflow.<layer>...`` in :data:`LAYERS`; None for the top and the package."""
    parts = module.split(".")
    if parts[0] != "segflow" or len(parts) < 2 or parts[1] in TOP:
        return None
    if parts[1] not in LAYERS:
        raise ValueError(f"{module}: not in a layer; add its subpackage to LAYERS")
    return LAYERS.index(parts[1])


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every segflow import in ``source``, anywhere in its body."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("segflow")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "segflow":  # `from segflow import core`
                found += [(node.lineno, f"segflow.{a.name}") for a in node.names]
            elif node.module.startswith("segflow."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "relative import"))
    return found


def violations(path: Path, module: str, source: str) -> list[str]:
    """Imports of ``source`` (the file of ``module``) that point up the layers."""
    own = layer_of(module)
    out = []
    for line, name in imported_modules(source):
        if name == "relative import":
            out.append(f"{path}:{line}: relative import (write segflow.<layer>...)")
            continue
        if name == "segflow.__version__":
            continue
        target = layer_of(name)
        if own is not None and target is None and name != "segflow":
            out.append(f"{path}:{line}: {module} imports the command line ({name})")
        elif own is not None and target is not None and target > own:
            out.append(f"{path}:{line}: {LAYERS[own]} imports {LAYERS[target]} ({name})")
    return out


def test_imports_flow_one_way() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the whole package, not an empty glob
    found = []
    for path in files:
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        found += violations(path.relative_to(REPO_ROOT), module, path.read_text())
    assert found == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("segflow.core.atomic", "from segflow.model.metrics import dice\n", "core imports model"),
        ("segflow.data.folds", "def f():\n    import segflow.ensemble.blend\n", "data imports"),
        ("segflow.artifacts.layout", "from segflow import report\n", "artifacts imports report"),
        ("segflow.model.evaluate_oof", "from segflow.cli import main\n", "the command line"),
        ("segflow.formats.rle", "from . import labels\n", "relative import"),
    ],
)
def test_the_check_sees_an_upward_import(module: str, source: str, expected: str) -> None:
    assert any(expected in v for v in violations(Path("x.py"), module, source))


def test_downward_and_sideways_imports_pass() -> None:
    source = "from segflow.core.errors import SegflowError\nfrom segflow.model import metrics\n"
    assert violations(Path("x.py"), "segflow.ensemble.choose", source) == []
    assert violations(Path("x.py"), "segflow.cli", "from segflow.report import report\n") == []
