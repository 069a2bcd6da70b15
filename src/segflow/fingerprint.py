"""Code fingerprints: one hash of the segflow modules a stage runs, for Snakemake's ``params``.

Snakemake reruns a job when its inputs, its params or its rule's own code change, but not when a
package function that the rule calls changes (snakemake#1694). Every rule therefore carries
``params.code``: :func:`code_fingerprint` of its stage module, a hash over that module and every
segflow module it imports, directly or through others, including imports inside functions. An
edit to the stacking code reruns stacking and what depends on it; training, upstream of it, keeps
its models.

``segflow/cli.py`` (argument wiring shared by every stage) and the package ``__init__`` are not
part of any fingerprint, so editing the command-line layer reruns nothing: rerun the affected
rules with ``-R`` after such an edit.
"""

from __future__ import annotations

import ast
import hashlib
import os
from functools import cache
from pathlib import Path

from segflow.errors import SegflowError

PACKAGE = "segflow"
# Shared wiring: see the module docstring.
EXCLUDED = frozenset({"segflow", "segflow.cli", "segflow.__main__"})
DIGEST_CHARS = 16


def package_root() -> Path:
    """The folder of the segflow package that is imported (the code the rules will run)."""
    return Path(__file__).resolve().parent


def _module_file(name: str, root: Path) -> Path | None:
    """``segflow.a.b`` -> root/a/b.py (or its package __init__), None when no such file."""
    if name == PACKAGE or not name.startswith(PACKAGE + "."):
        return None
    relative = Path(*name.split(".")[1:])
    for candidate in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, root: Path) -> set[str]:
    """The segflow modules ``path`` imports anywhere in its body (``from segflow import x``
    counts when x is a module)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as error:
        raise SegflowError(f"{path}: cannot parse for its code fingerprint ({error})") from None
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if _module_file(name, root) is not None}


def module_closure(*entries: str, root: Path | None = None) -> list[str]:
    """The segflow modules that ``entries`` need, themselves included, sorted.

    Args:
        entries: dotted module names, e.g. ``segflow.stack_stage``.
        root: the package folder (default: the imported one).

    Returns:
        Sorted dotted names, without :data:`EXCLUDED`.

    Raises:
        SegflowError: an entry that is not a segflow module file.
    """
    root = package_root() if root is None else Path(root)
    pending = list(entries)
    for entry in entries:
        if entry in EXCLUDED or _module_file(entry, root) is None:
            raise SegflowError(f"code fingerprint: {entry!r} is not a module under {root}")
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name in EXCLUDED:
            continue
        seen.add(name)
        path = _module_file(name, root)
        if path is not None:
            pending.extend(_imported_modules(path, root) - seen)
    return sorted(seen)


@cache
def _cached_fingerprint(entries: tuple[str, ...], root: str) -> str:
    digest = hashlib.sha256()
    for name in module_closure(*entries, root=Path(root)):
        path = _module_file(name, Path(root))
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path is not None else b"")
        digest.update(b"\0")
    return digest.hexdigest()[:DIGEST_CHARS]


def code_fingerprint(*entries: str, root: Path | None = None) -> str:
    """A short hash of the source of ``entries`` and every segflow module they import.

    Args:
        entries: the stage's module(s), e.g. ``segflow.train``.
        root: the package folder (default: the imported one).

    Returns:
        16 hex characters; any edit of one of those files changes it.
    """
    root = package_root() if root is None else Path(root)
    return _cached_fingerprint(tuple(sorted(entries)), str(root.resolve()))


STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "demo-data": ("segflow.demo_data",),
    "ingest": ("segflow.ingest", "segflow.imageio"),
    "dedup": ("segflow.dedup",),
    "preprocess": ("segflow.preprocess",),
    "folds": ("segflow.folds",),
    "train": ("segflow.train", "segflow.experiment", "segflow.devices"),
    # The plan's arithmetic only, not segflow.budget_measure: re-timing would change the plan
    # and so retrain everything. `segflow train --plan` reads the plan through segflow.budget,
    # which is not in "train": an edit there re-plans (here), which retrains where budgeted.
    "plan-budget": ("segflow.budget",),
    # As plan-budget: the choice's arithmetic, not segflow.resolution_measure (the timing).
    "plan-resolution": ("segflow.resolution_plan",),
    "predict-oof": ("segflow.predict", "segflow.devices"),
    "predict-test": ("segflow.predict", "segflow.devices"),
    "evaluate-oof": ("segflow.evaluate",),
    "tune-postprocess": ("segflow.evaluate", "segflow.postprocess", "segflow.predict"),
    "submit": ("segflow.submission", "segflow.postprocess", "segflow.predict"),
    "blend": ("segflow.second_level",),
    "select-pseudo": ("segflow.pseudo", "segflow.second_level"),
    "stack": ("segflow.stack_stage", "segflow.second_level"),
    "choose": ("segflow.second_level",),
    "report": ("segflow.html_report",),
}
"""``segflow`` sub-command -> the modules its ``cli._run_*`` function imports."""


def stage_fingerprint(command: str, root: Path | None = None) -> str:
    """:func:`code_fingerprint` of a ``segflow`` sub-command's modules (:data:`STAGE_MODULES`).

    Raises:
        KeyError: an unknown command (the message lists the valid ones).
    """
    if command not in STAGE_MODULES:
        raise KeyError(
            f"code fingerprint: unknown stage {command!r}; valid: {', '.join(STAGE_MODULES)}"
        )
    return code_fingerprint(*STAGE_MODULES[command], root=root)


def folder_stamp(*paths: str | os.PathLike[str]) -> str:
    """A short hash of what is in the given folders (and files): every file's relative path,
    size and modification time.

    Snakemake compares a folder input by the folder's own modification time, which changes when
    a file is added, removed or renamed, but not when one is overwritten in place. Carried as a
    rule param, this stamp catches that too (a user copying a corrected image over the old one).
    Sizes and times, not contents, as Snakemake does for files: no image is read.

    Args:
        paths: folders or files; a missing one counts as missing.

    Returns:
        16 hex characters.
    """
    digest = hashlib.sha256()
    for raw in paths:
        path = Path(raw)
        digest.update(str(raw).encode() + b"\0")
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            digest.update(b"missing\0")
            continue
        for file in files:
            stat = file.stat()
            relative = file.relative_to(path) if file != path else Path(file.name)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:DIGEST_CHARS]
