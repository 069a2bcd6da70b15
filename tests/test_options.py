"""Options dataclasses as CLI flags (segflow.core.options), list-typed options included, and the
workflow's rendering of config values as those flags (cli_flags in workflow/rules/common.smk)."""

from __future__ import annotations

import argparse
import ast
import shlex
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import REPO_ROOT

from segflow.core.options import (
    add_dataclass_arguments,
    dataclass_from_namespace,
    lists_to_tuples,
    option,
)
from segflow.data.ingest import IngestOptions


@dataclass(frozen=True)
class _Listed:
    names: tuple[str, ...] | None = option(None, "some names")
    sizes: tuple[int, ...] = option((1, 2), "some sizes")
    label: str = option("x", "a scalar")

    def __post_init__(self) -> None:
        lists_to_tuples(self)


def _parse(cls: type, argv: list[str]) -> Any:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, cls)
    return dataclass_from_namespace(cls, parser.parse_args(argv))


def test_tuple_options_take_one_or_more_values() -> None:
    assert _parse(_Listed, []) == _Listed()
    parsed = _parse(_Listed, ["--names", "a", "b c", "--sizes", "3", "--label", "y"])
    assert parsed == _Listed(names=("a", "b c"), sizes=(3,), label="y")
    assert isinstance(parsed.names, tuple) and isinstance(parsed.sizes[0], int)


@pytest.mark.parametrize("token", ["none", "null", "NULL", ""])
def test_a_lone_null_token_is_none(token: str) -> None:
    assert _parse(_Listed, ["--names", token]).names is None


def test_null_inside_a_list_and_bad_items_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(_Listed, ["--names", "a", "none"])
    assert "stands alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(_Listed, ["--sizes", "3", "x"])
    with pytest.raises(SystemExit):
        _parse(_Listed, ["--names"])  # nargs="+": at least one value


def test_config_lists_become_tuples() -> None:
    assert _Listed(names=["a", "b"]).names == ("a", "b")  # type: ignore[arg-type]
    assert IngestOptions(classes=["1", "2"]).classes == ("1", "2")  # type: ignore[arg-type]
    assert IngestOptions(classes=["1", "2"]) == IngestOptions(classes=("1", "2"))  # type: ignore[arg-type]


def _workflow_cli_flags() -> Any:
    """The workflow's own ``cli_flags`` function, taken from common.smk (plain Python there)."""
    source = (REPO_ROOT / "workflow" / "rules" / "common.smk").read_text()
    tree = ast.parse(source)
    function = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "cli_flags"
    )
    namespace: dict[str, Any] = {"shlex": shlex}
    exec(compile(ast.Module([function], type_ignores=[]), "common.smk", "exec"), namespace)
    return namespace["cli_flags"]


@pytest.mark.parametrize(
    "classes", [None, ["1", "2", "3", "4"], ["road", "rock face", "it's"], ["only"]]
)
def test_workflow_flags_reach_the_cli_intact(classes: list[str] | None) -> None:
    config = {"classes": classes, "rle_missing_is_empty": True, "train_images": "in put"}
    flags = _workflow_cli_flags()(config)
    parsed = _parse(IngestOptions, shlex.split(flags))
    assert parsed.classes == (tuple(classes) if classes else None)
    assert parsed.rle_missing_is_empty is True
    assert parsed.train_images == "in put"
