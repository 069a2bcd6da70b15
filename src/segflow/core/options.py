"""Stage options as frozen dataclasses, shared by the CLI flags and the workflow config.

One naming scheme everywhere: the config key ``clahe_clip_limit`` of a stage is the dataclass
field ``clahe_clip_limit`` and the CLI flag ``--clahe-clip-limit``. Defaults live in the
dataclass; the JSON schema repeats them for Snakemake, and a test keeps the two equal.

Field types: scalars (``int``, ``float``, ``str``, ``bool``), optionally ``| None``, and lists
typed ``tuple[X, ...]`` (optionally ``| None``): the flag then takes one or more values
(``--classes a b c``), and a YAML/JSON list given to the dataclass becomes a tuple (see
:func:`lists_to_tuples`). On the command line ``none``, ``null`` or an empty string alone
means None.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_NULL_TOKENS = ("none", "null", "")


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


def _tuple_item_type(annotation: Any) -> type | None:
    """The item type ``X`` of a ``tuple[X, ...]`` annotation; None for any other annotation."""
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


class _TupleAction(argparse.Action):
    """Store ``nargs="+"`` values as a tuple; a lone null token gives None (optional fields)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values == [None]:  # the item parser turned a lone "none" into None
            setattr(namespace, self.dest, None)
        elif None in values:
            parser.error(f"{option_string}: none/null only stands alone, not in a list")
        else:
            setattr(namespace, self.dest, tuple(values))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the options dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        scalar, optional = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        item_type = _tuple_item_type(scalar)
        if item_type is not None:
            parser.add_argument(
                flag,
                dest=field.name,
                nargs="+",
                action=_TupleAction,
                type=_parser_for(item_type, optional),
                default=field.default,
                metavar=field.name.upper(),
                help=f"{help_text} (one or more values; default: {field.default})",
            )
            continue
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
        if optional and text.lower() in _NULL_TOKENS:
            return None
        return scalar(text)

    parse.__name__ = scalar.__name__  # argparse names the type in its error messages
    return parse


def dataclass_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build the options dataclass from parsed CLI arguments."""
    values = {field.name: getattr(namespace, field.name) for field in dataclasses.fields(cls)}
    return cls(**values)


def lists_to_tuples(options: Any) -> None:
    """Turn list values of the ``tuple[X, ...]`` fields of a frozen options dataclass into tuples.

    YAML and JSON have lists, not tuples; call this from ``__post_init__`` so options built from
    a config mapping compare, hash and serialise like options built from the CLI.
    """
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        scalar, _ = _base_type(hints[field.name])
        if isinstance(value, list) and _tuple_item_type(scalar) is not None:
            object.__setattr__(options, field.name, tuple(value))


def options_to_dict(options: Any) -> dict[str, Any]:
    """Plain-dict view of an options dataclass (for JSON summaries)."""
    return dataclasses.asdict(options)
