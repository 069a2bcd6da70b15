"""The ``segflow`` command line: one sub-command per pipeline stage.

The Snakemake rules call exactly these commands, so every stage can also be run by hand:

    segflow demo-data resources/demo
    segflow ingest --train-images ... --out-manifest results/ingest/manifest.parquet ...

The sub-commands are the rows of :data:`segflow.stages.STAGES`; each stage module brings its
own ``add_arguments(parser)`` and ``run(args)``.

A :class:`~segflow.core.errors.SegflowError` is printed as one ``segflow <stage>: error: ...``
line with exit status 2; nothing is left half-written because every artifact is written
atomically. An ``OSError`` (disk full, permission denied) is printed the same way with exit
status 1 (``--verbose`` adds its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from segflow import __version__
from segflow.core.atomic import is_disk_full
from segflow.core.errors import SegflowError
from segflow.stages import STAGES

log = logging.getLogger("segflow")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with one sub-command per row of :data:`segflow.stages.STAGES`.

    Args:
        command: build only this sub-command's arguments (the others keep their name and help):
            a stage then imports its own module only, not every stage's (torch, LightGBM...),
            which keeps the light stages' start-up time and memory small. None: all of them.
    """
    parser = argparse.ArgumentParser(prog="segflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"segflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        sub = commands.add_parser(stage.command, help=stage.help, description=stage.help)
        if command is None or stage.command == command:
            module = importlib.import_module(stage.module)
            sub.set_defaults(handler=module.run)
            module.add_arguments(sub)
    return parser


def _requested_command(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not a global option)."""
    known = {stage.command for stage in STAGES}
    word = next((word for word in argv if not word.startswith("-")), None)
    return word if word in known else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segflow`` command; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_requested_command(words))
    args = parser.parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.handler(args)
    except SegflowError as error:
        print(f"segflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # The machine, not the input: say so in one line (the atomic writers left no partial
        # artifact behind); the traceback only helps a developer.
        log.debug("traceback of the error below", exc_info=True)
        hint = "; free some space and rerun" if is_disk_full(error) else ""
        message = " ".join(str(error).splitlines())  # pyarrow's messages span lines
        print(f"segflow {args.command}: error: {message}{hint}", file=sys.stderr)
        return 1
    return 0
