"""Code fingerprints: one hash of the segflow modules a stage runs, for Snakemake's ``params``.

Snakemake reruns a job when its inputs, its params or its rule's own code change, but not when a
package function that the rule calls changes (snakemake#1694). Every rule therefore carries
``params.code``: :func:`code_fingerprint` of its stage module, a hash over that module and every
segflow module it imports, directly or through others, including imports inside functions. An
edit to the stacking code reruns stacking and what depends on it; training, upstream of it, keeps
its models.

``segflow/cli.py`` and ``segflow/stages.py`` (the table of sub-commands) and the packages'
``__init__`` files (notes only) are not part of any fingerprint, so editing them reruns nothing.
A stage's own ``add_arguments``/``run`` sit in its module and are part of its fingerprint.
:func:`segflow.stages.stage_fingerprint` gives a sub-command's fingerprint.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

from segflow.core.errors import SegflowError

PACKAGE = "segflow"
# Shared wiring: see the module docstring.
EXCLUDED = frozenset({"segflow", "segflow.cli", "segflow.__main__", "segflow.stages"})
DIGEST_CHARS = 16


def package_root() -> Path:
    """The folder of the segflow package that is imported (the code the rules will run)."""
    return Path(__file__).resolve().parents[1]


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


def _is_package_notes(name: str, root: Path) -> bool:
    """A subpackage's ``__init__`` (its developer notes; no code)."""
    path = _module_file(name, root)
    return path is not None and path.name == "__init__.py"


def module_closure(
    *entries: str, root: Path | None = None, exclude: tuple[str, ...] = ()
) -> list[str]:
    """The segflow modules that ``entries`` need, themselves included, sorted.

    Args:
        entries: dotted module names, e.g. ``segflow.ensemble.stacking.stack``.
        root: the package folder (default: the imported one).
        exclude: modules not followed (nor included) unless they are entries.

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
        if name in seen or name in EXCLUDED or (name in exclude and name not in entries):
            continue
        if name not in entries and _is_package_notes(name, root):
            continue
        seen.add(name)
        path = _module_file(name, root)
        if path is not None:
            pending.extend(_imported_modules(path, root) - seen)
    return sorted(seen)


@cache
def _cached_fingerprint(entries: tuple[str, ...], root: str, exclude: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for name in module_closure(*entries, root=Path(root), exclude=exclude):
        path = _module_file(name, Path(root))
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path is not None else b"")
        digest.update(b"\0")
    return digest.hexdigest()[:DIGEST_CHARS]


def code_fingerprint(*entries: str, root: Path | None = None, exclude: tuple[str, ...] = ()) -> str:
    """A short hash of the source of ``entries`` and every segflow module they import.

    Args:
        entries: the stage's module(s), e.g. ``segflow.model.training.train``.
        root: the package folder (default: the imported one).
        exclude: modules left out, with what only they import (see :func:`module_closure`).

    Returns:
        16 hex characters; any edit of one of those files changes it.
    """
    root = package_root() if root is None else Path(root)
    return _cached_fingerprint(tuple(sorted(entries)), str(root.resolve()), tuple(sorted(exclude)))
