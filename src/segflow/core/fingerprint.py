"""Code fingerprints: one hash of the segflow code a stage runs, for Snakemake's ``params``.

Snakemake reruns a job when its inputs, its params or its rule's own code change, but not when a
package function that the rule calls changes (snakemake#1694). Every rule therefore carries
``params.code``: :func:`code_fingerprint` of its stage, a hash of the segflow code that the
stage can run. An edit to the stacking code reruns stacking and what depends on it; training,
upstream of it, keeps its models.

What is hashed: definitions, followed symbol by symbol. Starting from the stage module's ``run``
and ``add_arguments`` and its module-level statements (an entry module without ``run`` nor
``add_arguments`` counts whole), every name a hashed piece of code uses is resolved to the
segflow definition it means, and that definition is hashed and followed in turn:

* a top-level function is hashed with its decorators; a class whole (bases, decorators, every
  method), and what any of that uses is followed;
* names are resolved through ``from segflow.x import y``, ``import segflow.x as m`` then
  ``m.y``, ``from segflow.x import module`` then ``module.y``, imports inside functions, and
  re-exports (``y`` imported into the module that is imported from);
* the module-level statements of every module one of whose definitions is hashed (constants,
  registries such as ``LOSSES = {...}``, ``if`` and ``try`` blocks, the imports themselves) are
  always hashed and followed;
* importing a module runs its module level: a module that hashed code imports (directly, or
  through the module-level imports of what it imports) counts even when none of its definitions
  is used if its module level has side effects (a bare call such as
  ``os.environ.setdefault(...)``, an assignment to an attribute or an item, a loop) or decorates
  a definition with segflow code (which may register it somewhere); such decorated definitions
  are hashed whenever their module is;
* where a use cannot be resolved to one definition, the whole module counts (all its
  definitions, followed): a module object used other than as ``module.name`` (``getattr(module,
  name)``, passed as a value), a name the module does not define at top level, ``from segflow.x
  import *``, ``globals()``/``vars()``/``locals()`` in hashed code, ``importlib.import_module``
  or ``__import__`` of a literal segflow module name. Such a call with a computed name makes every
  segflow module named by a string literal in the calling module count whole.

Each hashed definition is hashed as its syntax tree (``ast.dump``, without line or column
numbers, with the docstrings of the module, its classes and its functions removed): a comment,
a docstring or a formatting change of any file changes no fingerprint, a change of what the code
does changes the fingerprint of every stage that reaches it, and an edit of a definition that a
stage never reaches (a helper of another stage in a module it imports) leaves that stage alone.
Function signature annotations are not followed in a module with ``from __future__ import
annotations`` (they are strings there, never evaluated); class-body annotations, which
``typing.get_type_hints`` reads for the options dataclasses, are.

Not promised: a behaviour change that reaches a stage only through a dynamic lookup that this
analysis does not see (a name built at run time and looked up in another module's globals by a
module that is not counted whole), nor a side effect hidden in a module-level assignment's value
of a module whose definitions the stage never uses, nor a docstring read at run time through
``__doc__``. A new Python version may change
``ast.dump`` and so every fingerprint (everything reruns once).

``segflow/cli.py``, ``segflow/__main__.py`` and ``segflow/stages.py`` (the table of
sub-commands), ``segflow/__init__.py`` and the subpackages' ``__init__`` files (notes only) are
part of no fingerprint, so editing them reruns nothing. :func:`module_closure` names the modules
that a stage's fingerprint touches (those with code hashed);
:func:`segflow.stages.stage_fingerprint` gives a sub-command's fingerprint.

Computing every stage's fingerprint parses the whole package (about 2 s on a small CPU), which
each Snakemake invocation, dry runs included, would pay. :func:`use_disk_cache` keeps the values
in a JSON file (the workflow's is ``.snakemake/segflow/code_fingerprints.json``), keyed by
:func:`source_digest`: one sha256 of every ``.py`` file under the package root (path and bytes)
and the Python version. Any byte changed in any file (the fingerprint code itself included)
gives another key, so the cache never answers for code other than the one it was computed from;
a comment-only edit costs one recomputation, which then gives the same fingerprints. A missing,
corrupt or unwritable cache file only costs that recomputation.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from segflow.core.errors import SegflowError

log = logging.getLogger(__name__)

PACKAGE = "segflow"
# Shared wiring: see the module docstring.
EXCLUDED = frozenset({"segflow", "segflow.cli", "segflow.__main__", "segflow.stages"})
DIGEST_CHARS = 16
# The workflow's fingerprint cache file (see the module docstring), under .snakemake/segflow/.
CACHE_NAME = "code_fingerprints.json"
# A stage module's own command: where its fingerprint starts.
STAGE_FUNCTIONS = ("run", "add_arguments")
# Calls whose result is a namespace of the calling module: the whole module counts.
_NAMESPACE_CALLS = frozenset({"globals", "locals", "vars"})

# What a name is bound to: ("module", dotted name) or ("symbol", dotted module name, name).
Target = tuple[str, ...]
# A use of a name in code: the name and the attributes read from it (``m.f`` -> ("m", ("f",))).
Reference = tuple[str, tuple[str, ...]]


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


def _is_package_notes(name: str, root: Path) -> bool:
    """A subpackage's ``__init__`` (its developer notes; no code)."""
    path = _module_file(name, root)
    return path is not None and path.name == "__init__.py"


@dataclass
class _Unit:
    """A piece of one module hashed as a whole: one top-level definition, or all of the
    module-level statements that are not definitions.

    Attributes:
        name: the definition's name; "" for the module-level statements.
        nodes: its statements, docstrings removed.
        references: the names (with attribute chains) its code uses.
        imports: segflow bindings made by import statements inside it (function-level imports;
            for the module-level unit, the module's own imports).
        imported: the segflow modules its import statements import.
        whole: modules that count whole when this unit is hashed (star imports, literal
            ``importlib.import_module``).
        namespace: it calls ``globals()``/``vars()``/``locals()``: its own module counts whole.
        computed_import: it imports a module whose name is computed at run time.
    """

    name: str
    nodes: list[ast.stmt]
    references: set[Reference] = field(default_factory=set)
    imports: dict[str, list[Target]] = field(default_factory=dict)
    imported: set[str] = field(default_factory=set)
    whole: set[str] = field(default_factory=set)
    namespace: bool = False
    computed_import: bool = False
    _dump: str | None = None

    def dump(self) -> str:
        """The statements' syntax tree as text, without line or column numbers (computed once:
        only the units that some fingerprint reaches are dumped)."""
        if self._dump is None:
            self._dump = "\n".join(ast.dump(node) for node in self.nodes)
        return self._dump


@dataclass
class _Module:
    """One parsed segflow module, split into :class:`_Unit` pieces.

    Attributes:
        name: dotted module name.
        top: its module-level statements that are not definitions.
        definitions: top-level function and class definitions by name (a name defined twice
            keeps both).
        order: every unit in source order (``top`` first).
        top_names: every name the module-level statements bind (assignments, imports, ``if``
            and ``try`` blocks).
        side_effects: its module level does something besides binding names.
        registering: definitions whose decorators use segflow code (which may register them
            somewhere at import): hashed whenever the module is.
        literal_modules: the segflow modules named by string literals in it.
    """

    name: str
    top: _Unit
    definitions: dict[str, list[_Unit]]
    order: list[_Unit]
    top_names: set[str]
    side_effects: bool
    literal_modules: set[str]
    registering: list[_Unit]


def _strip_docstrings(tree: ast.AST, root: Path) -> set[str]:
    """Remove the docstrings of ``tree``'s module, classes and functions, in place.

    Returns:
        The segflow modules named by the string literals left in ``tree`` (one pass for both).
    """
    literal_modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(PACKAGE + ".")
            and _module_file(node.value, root) is not None
        ):
            literal_modules.add(node.value)
    return literal_modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``ImportFrom`` names (relative ones resolved), None if it is
    above the top package."""
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(parts):
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    """The references, imports and dynamic lookups of one unit's code."""

    def __init__(self, module: str, is_package: bool, root: Path, follow_signatures: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.root = root
        self.follow_signatures = follow_signatures
        self.unit = _Unit(name="", nodes=[])

    def _bind(self, name: str, target: Target) -> None:
        self.unit.imports.setdefault(name, []).append(target)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _module_file(alias.name, self.root) is None and alias.name != PACKAGE:
                continue
            self.unit.imported.add(alias.name)
            if alias.asname:
                self._bind(alias.asname, ("module", alias.name))
            else:  # `import segflow.a.b` binds `segflow`
                self._bind(alias.name.split(".")[0], ("module", PACKAGE))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _absolute(self.module, self.is_package, node)
        if source is None or not (source == PACKAGE or source.startswith(PACKAGE + ".")):
            return
        self.unit.imported.add(source)
        for alias in node.names:
            if alias.name == "*":
                self.unit.whole.add(source)
                continue
            submodule = f"{source}.{alias.name}"
            if _module_file(submodule, self.root) is not None:
                self.unit.imported.add(submodule)
                target: Target = ("module", submodule)
            else:
                target = ("symbol", source, alias.name)
            self._bind(alias.asname or alias.name, target)

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Store):  # a name bound here is no use of a definition
            self.unit.references.add((node.id, ()))

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):  # `x += 1` reads x
            self.unit.references.add((node.target.id, ()))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attributes: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            attributes.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name):
            self.unit.references.add((current.id, tuple(reversed(attributes))))
        else:
            self.visit(current)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = function.id if isinstance(function, ast.Name) else None
        attribute = function.attr if isinstance(function, ast.Attribute) else None
        if name in _NAMESPACE_CALLS:
            self.unit.namespace = True
        if name in {"import_module", "__import__"} or attribute == "import_module":
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if _module_file(first.value, self.root) is not None:
                    self.unit.whole.add(first.value)
            else:
                self.unit.computed_import = True
        self.generic_visit(node)

    def annotation(self, node: ast.expr | None) -> None:
        """Follow an annotation, including one written as a string."""
        if node is None:
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return
        self.visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        if self.follow_signatures:
            self.annotation(node.annotation)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.annotation(node.annotation)
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)
        if self.follow_signatures:
            self.annotation(node.returns)
        for statement in node.body:
            self.visit(statement)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)


def _root_names(node: ast.AST) -> set[str]:
    """The names an expression reads (``a.b(c)`` -> a, c)."""
    return {child.id for child in ast.walk(node) if isinstance(child, ast.Name)}


def _bound_names(statements: Iterable[ast.stmt]) -> set[str]:
    """Every name that module-level ``statements`` bind."""
    names: set[str] = set()
    for statement in statements:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                names.add(node.id)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update(
                    alias.asname or alias.name.split(".")[0]
                    for alias in node.names
                    if alias.name != "*"
                )
            elif isinstance(node, ast.Global | ast.Nonlocal):
                names.update(node.names)
    return names


def _has_side_effects(statements: Iterable[ast.stmt]) -> bool:
    """Module-level statements that do more than bind names: a bare expression (a call), an
    assignment to an attribute or an item, ``del``, ``global``, a loop or ``with`` block."""
    for statement in statements:
        if isinstance(statement, ast.Expr):
            if isinstance(statement.value, ast.Constant):
                continue
            return True
        if isinstance(statement, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in targets:
                if any(isinstance(n, ast.Attribute | ast.Subscript) for n in ast.walk(target)):
                    return True
            continue
        if isinstance(statement, ast.If | ast.Try):
            blocks = [statement.body, statement.orelse]
            if isinstance(statement, ast.Try):
                blocks += [statement.finalbody] + [h.body for h in statement.handlers]
            if any(_has_side_effects(block) for block in blocks):
                return True
            continue
        if isinstance(
            statement,
            ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
        ):
            continue
        return True
    return False


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def _collect(
    name: str,
    nodes: list[ast.stmt],
    module: str,
    is_package: bool,
    root: Path,
    follow_signatures: bool,
) -> _Unit:
    collector = _Collector(module, is_package, root, follow_signatures)
    for node in nodes:
        collector.visit(node)
    unit = collector.unit
    unit.name = name
    unit.nodes = nodes
    return unit


@cache
def _parse(source: bytes, path: Path, name: str, root: Path) -> _Module:
    """The module ``name`` (file ``path`` holding ``source``) parsed and split into units
    (cached per content: an edited file is parsed anew, an unchanged one once per process)."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise SegflowError(f"{path}: cannot parse for its code fingerprint ({error})") from None
    literal_modules = _strip_docstrings(tree, root)
    is_package = path.name == "__init__.py"
    follow_signatures = not _has_future_annotations(tree)
    statements: list[ast.stmt] = []
    definitions: dict[str, list[_Unit]] = {}
    order: list[_Unit] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            unit = _collect(node.name, [node], name, is_package, root, follow_signatures)
            definitions.setdefault(node.name, []).append(unit)
            order.append(unit)
        else:
            statements.append(node)
    top = _collect("", statements, name, is_package, root, follow_signatures)
    return _Module(
        name=name,
        top=top,
        definitions=definitions,
        order=[top, *order],
        top_names=_bound_names(statements),
        side_effects=_has_side_effects(statements),
        literal_modules=literal_modules,
        registering=[
            unit
            for unit in order
            if any(
                name in definitions or name in top.imports
                for node in unit.nodes
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                for decorator in node.decorator_list
                for name in _root_names(decorator)
            )
        ],
    )


def _module(name: str, root: Path) -> _Module | None:
    path = _module_file(name, root)
    if path is None:
        return None
    return _parse(path.read_bytes(), path, name, root)


class _Reach:
    """The units that ``entries`` reach, symbol by symbol (see the module docstring)."""

    def __init__(self, entries: tuple[str, ...], root: Path, exclude: tuple[str, ...]) -> None:
        self.entries = entries
        self.root = root
        self.exclude = exclude
        self.units: dict[str, set[int]] = {}  # module -> ids of its hashed units
        self.modules: dict[str, _Module] = {}
        self.pending: list[tuple[str, _Unit]] = []
        for entry in entries:
            if entry in EXCLUDED or _module_file(entry, root) is None:
                raise SegflowError(f"code fingerprint: {entry!r} is not a module under {root}")
        self.loaded: dict[str, _Module | None] = {}
        self.symbols: set[tuple[str, str, tuple[str, ...]]] = set()
        for entry in entries:
            module = self._touch(entry)
            starts = [name for name in STAGE_FUNCTIONS if module and name in module.definitions]
            if not starts:
                self._whole(entry)
            for start in starts:
                self._add(entry, module.definitions[start])
        self._run()

    def _load(self, name: str) -> _Module | None:
        if name not in self.loaded:
            self.loaded[name] = _module(name, self.root)
        return self.loaded[name]

    def _skipped(self, name: str) -> bool:
        if name in self.entries:
            return False
        return name in EXCLUDED or name in self.exclude or _is_package_notes(name, self.root)

    def _touch(self, name: str) -> _Module | None:
        """The module, its module-level statements hashed; None when it is not followed."""
        if self._skipped(name):
            return None
        module = self.modules.get(name)
        if module is None:
            module = self._load(name)
            if module is None:
                return None
            self.modules[name] = module
            self.units[name] = set()
            self._add(name, [module.top, *module.registering])
        return module

    def _add(self, name: str, units: Iterable[_Unit]) -> None:
        for unit in units:
            if id(unit) not in self.units[name]:
                self.units[name].add(id(unit))
                self.pending.append((name, unit))

    def _whole(self, name: str) -> None:
        module = self._touch(name)
        if module is not None:
            self._add(name, module.order)

    def _target(self, target: Target, attributes: tuple[str, ...]) -> None:
        if target[0] == "module":
            self._chain(target[1], attributes)
        else:
            self._symbol(target[1], target[2], attributes)

    def _chain(self, module: str, attributes: tuple[str, ...]) -> None:
        """``module.a.b...`` used in code; the bare module counts whole."""
        if attributes:
            self._symbol(module, attributes[0], attributes[1:])
        else:
            self._whole(module)

    def _symbol(self, module: str, name: str, attributes: tuple[str, ...]) -> None:
        """``name`` read from ``module`` (then ``attributes`` read from it)."""
        if (module, name, attributes) in self.symbols:
            return  # already followed (re-exports may go round in a circle)
        self.symbols.add((module, name, attributes))
        submodule = f"{module}.{name}"
        if _module_file(submodule, self.root) is not None:
            self._chain(submodule, attributes)
            return
        parsed = self._touch(module)
        if parsed is None:
            return
        found = False
        if name in parsed.definitions:
            self._add(module, parsed.definitions[name])
            found = True
        for target in parsed.top.imports.get(name, []):
            self._target(target, attributes)
            found = True
        if not found and name not in parsed.top_names:
            self._whole(module)  # defined dynamically (or not at all): be conservative

    def _unit(self, module: str, unit: _Unit) -> None:
        parsed = self.modules[module]
        for name, attributes in unit.references:
            local = unit.imports.get(name, []) if unit is not parsed.top else []
            for target in [*local, *parsed.top.imports.get(name, [])]:
                self._target(target, attributes)
            if name in parsed.definitions:
                self._add(module, parsed.definitions[name])
        for other in unit.whole:
            self._whole(other)
        if unit.namespace:
            self._whole(module)
        if unit.computed_import:
            for other in parsed.literal_modules:
                self._whole(other)

    def _run(self) -> None:
        while True:
            while self.pending:
                self._unit(*self.pending.pop())
            # Modules that the hashed code imports, directly or through module-level imports,
            # whose module level has side effects.
            imported: set[str] = set()
            stack = [
                name
                for module, ids in self.units.items()
                for unit in self.modules[module].order
                if id(unit) in ids
                for name in unit.imported
            ]
            while stack:
                name = stack.pop()
                if name in imported or self._skipped(name):
                    continue
                imported.add(name)
                parsed = self._load(name)
                if parsed is not None:
                    stack.extend(parsed.top.imported)
                    if parsed.side_effects or parsed.registering:
                        self._touch(name)
            if not self.pending:
                return

    def digest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.modules):
            digest.update(name.encode() + b"\0")
            for unit in self.modules[name].order:
                if id(unit) in self.units[name]:
                    digest.update(unit.name.encode() + b"\0" + unit.dump().encode() + b"\0")
        return digest.hexdigest()[:DIGEST_CHARS]


def module_closure(
    *entries: str, root: Path | None = None, exclude: tuple[str, ...] = ()
) -> list[str]:
    """The segflow modules whose code the fingerprint of ``entries`` hashes, sorted.

    Args:
        entries: dotted module names, e.g. ``segflow.ensemble.stacking.stack``.
        root: the package folder (default: the imported one).
        exclude: modules not followed (nor hashed) unless they are entries: what only they
            reach is left out too.

    Returns:
        Sorted dotted names (entries included) of the modules with at least one hashed
        definition or their module-level statements hashed; never :data:`EXCLUDED`.

    Raises:
        SegflowError: an entry that is not a segflow module file, or a file that does not parse.
    """
    root = package_root() if root is None else Path(root)
    return sorted(_Reach(tuple(entries), root.resolve(), tuple(exclude)).modules)


@cache
def _cached_fingerprint(entries: tuple[str, ...], root: str, exclude: tuple[str, ...] = ()) -> str:
    return _Reach(entries, Path(root), exclude).digest()


def code_fingerprint(*entries: str, root: Path | None = None, exclude: tuple[str, ...] = ()) -> str:
    """A short hash of the segflow code that ``entries`` can run (see the module docstring).

    Args:
        entries: the stage's module(s), e.g. ``segflow.model.training.train``.
        root: the package folder (default: the imported one).
        exclude: modules left out, with what only they reach (see :func:`module_closure`).

    Returns:
        16 hex characters; a change of what reached code does changes it, a comment,
        docstring or formatting edit does not.
    """
    root_name = str((package_root() if root is None else Path(root)).resolve())
    entry_key, exclude_key = tuple(sorted(entries)), tuple(sorted(exclude))
    if _disk_cache_path is None:
        return _cached_fingerprint(entry_key, root_name, exclude_key)
    digest = source_digest(root_name)
    key = f"{'+'.join(entry_key)}:{'+'.join(exclude_key)}"
    stored = _read_disk_cache(_disk_cache_path)
    if stored.get("source") == digest and isinstance(stored.get(key), str):
        return stored[key]
    value = _cached_fingerprint(entry_key, root_name, exclude_key)
    if stored.get("source") != digest:
        stored = {"source": digest}  # another source tree's values are of no use
    _write_disk_cache(_disk_cache_path, {**stored, key: value})
    return value


_disk_cache_path: Path | None = None


def use_disk_cache(path: str | os.PathLike[str] | None) -> None:
    """Keep fingerprints between processes in ``path`` (see the module docstring).

    Args:
        path: a JSON file (created with its folder when first written); None: no disk cache,
            every process computes its fingerprints (the default).
    """
    global _disk_cache_path
    _disk_cache_path = None if path is None else Path(path)


@cache
def source_digest(root: str) -> str:
    """sha256 of the Python version and every ``.py`` file under ``root`` (relative path and
    bytes, in path order): the key of the disk cache. Cached per process, like the
    fingerprints themselves (a run plans once)."""
    base = Path(root)
    digest = hashlib.sha256(sys.version.encode() + b"\0")
    for path in sorted(base.rglob("*.py")):
        if "__pycache__" in path.relative_to(base).parts:
            continue
        digest.update(path.relative_to(base).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _read_disk_cache(path: Path) -> dict[str, str]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: recompute
    return stored if isinstance(stored, dict) else {}


def _write_disk_cache(path: Path, stored: dict[str, str]) -> None:
    """Write atomically: two Snakemake processes starting at once each leave a whole file.
    Failure to write only costs recomputation next time."""
    # Imported here: numpy and pandas (atomic's other writers) are not needed to fingerprint.
    from segflow.core.atomic import write_text

    try:
        write_text(path, json.dumps(stored, sort_keys=True) + "\n")
    except OSError as error:
        log.warning("code fingerprint cache %s not written (%s)", path, error)
