"""The final-submission stage: copy the chosen candidate's ``submission.csv`` to ``final/``.

Apart from choose (which writes ``choice.json`` and the stage table) so that an option of the
submission's format (``submission.*``) reruns the candidates' submit jobs and this copy, never
the choice or the report, which read no submission.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from segflow.artifacts import layout
from segflow.core.atomic import atomic_path
from segflow.core.errors import SegflowError
from segflow.core.stage_args import stage_log


def chosen_submission(choice_path: str | Path, results: str | Path) -> Path:
    """The submission of the candidate that choose's ``choice.json`` names.

    Args:
        choice_path: choose's ``choice.json``.
        results: the results folder (:mod:`segflow.artifacts.layout`).

    Returns:
        That candidate's ``submission/<name>/round<r>/submission.csv``.

    Raises:
        SegflowError: choice.json missing, unreadable or without candidate/round, or the
            submission is not there.
    """
    path = Path(choice_path)
    if not path.is_file():
        raise SegflowError(f"choice {path} does not exist (run choose first)")
    try:
        choice = json.loads(path.read_text())
        name, round_ = choice["candidate"], int(choice["round"])
    except (ValueError, KeyError, TypeError) as error:
        raise SegflowError(f"choice {path} has no readable candidate and round ({error})") from None
    source = layout.submission_csv(results, name, round_)
    if not source.is_file():
        raise SegflowError(
            f"submission {source} of the chosen {name} round {round_} does not exist"
        )
    return source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``segflow final-submission``'s flags."""
    parser.add_argument("--choice", required=True, help="choose's choice.json")
    parser.add_argument("--results-dir", required=True)
    parser.add_argument("--out", required=True, help="final submission CSV to write")


def run(args: argparse.Namespace) -> None:
    """``segflow final-submission``: copy the chosen candidate's submission."""
    source = chosen_submission(args.choice, args.results_dir)
    with atomic_path(Path(args.out)) as tmp:
        shutil.copyfile(source, tmp)
    stage_log.info("final submission: %s", source)
