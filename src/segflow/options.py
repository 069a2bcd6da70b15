"""Stage options as frozen dataclasses, shared by the CLI flags and the workflow config.

One naming scheme everywhere: the config key ``clahe_clip_limit`` of a stage is the dataclass
field ``clahe_clip_limit`` and the CLI flag ``--clahe-clip-limit``. Defaults live in the
dataclass; the JSON schema repeats them for Snakemake, and a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field carrying its CLI help text (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional?) for annotations like ``int``, ``str | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0], True
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the options dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        scalar, optional = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if scalar is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=help_text,
            )
            continue
        parser.add_argument(
            flag,
            dest=field.name,
            type=_parser_for(scalar, optional),
            default=field.default,
            choices=field.metadata.get("choices"),
            metavar=field.name.upper(),
            help=f"{help_text} (default: {field.default})",
        )


def _parser_for(scalar: type, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        return scalar(text)

    parse.__name__ = scalar.__name__  # argparse names the type in its error messages
    return parse


def dataclass_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build the options dataclass from parsed CLI arguments."""
    values = {field.name: getattr(namespace, field.name) for field in dataclasses.fields(cls)}
    return cls(**values)


def options_to_dict(options: Any) -> dict[str, Any]:
    """Plain-dict view of an options dataclass (for JSON summaries)."""
    return dataclasses.asdict(options)
