"""The table of stages: ``segflow`` sub-command -> the module that holds it.

Each stage module exposes ``add_arguments(parser)`` and ``run(args)`` next to its logic;
:mod:`segflow.cli` builds one sub-command per row, and the code fingerprint of a stage
(:func:`stage_fingerprint`, the ``params.code`` of its Snakemake rules) hashes the segflow code
that its ``run`` and ``add_arguments`` reach (:mod:`segflow.core.fingerprint`). One name per stage: the sub-command, its rule (``-`` -> ``_``),
its module and its test file (``tests/test_<module>.py``).

This table (no imports but the fingerprint's) is not part of any fingerprint, like the
command-line layer: editing a help text reruns nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segflow.core.fingerprint import code_fingerprint


@dataclass(frozen=True)
class Stage:
    """One ``segflow`` sub-command.

    Attributes:
        command: the sub-command.
        module: the module with its ``add_arguments`` and ``run``.
        help: one line for ``segflow --help``.
        fingerprint: the modules its code fingerprint starts from (default: ``module``).
        not_fingerprinted: modules left out of the fingerprint with what only they reach:
            code whose effect reaches the stage through a file that another stage writes.
    """

    command: str
    module: str
    help: str
    fingerprint: tuple[str, ...] = ()
    not_fingerprinted: tuple[str, ...] = ()

    @property
    def entries(self) -> tuple[str, ...]:
        """The modules :func:`stage_fingerprint` hashes from."""
        return self.fingerprint or (self.module,)


STAGES: tuple[Stage, ...] = (
    Stage("demo-data", "segflow.data.demo_data", "write the seeded synthetic demo dataset"),
    Stage("demo-dicom", "segflow.data.demo_dicom", "write seeded synthetic DICOM series"),
    Stage("ingest", "segflow.data.ingest", "list, decode and validate all items into a manifest"),
    Stage("dedup", "segflow.data.dedup", "group duplicates and resolve mask conflicts"),
    Stage("leaks", "segflow.data.leaks", "link test items to their exact train copies"),
    Stage("preprocess", "segflow.data.preprocess", "CLAHE/resize into memory-mappable arrays"),
    Stage(
        "preprocess-test",
        "segflow.data.preprocess_test",
        "prepare the test images as the train arrays were",
    ),
    Stage("folds", "segflow.data.folds", "assign stratified, duplicate-grouped folds"),
    Stage(
        "truth-masks",
        "segflow.data.truth_masks",
        "decode the used train items' label masks once, for the OOF stages",
    ),
    # `--plan` reads the budget plan through segflow.model.budget: an edit there re-plans
    # (plan-budget), which retrains where budgeted; it must not retrain every experiment.
    Stage(
        "train",
        "segflow.model.training.train",
        "train one fold of one experiment (resumable)",
        not_fingerprinted=("segflow.model.budget",),
    ),
    # The plan's arithmetic only, not the timing code (budget_measure, which holds the
    # command): re-timing would change the plan and so retrain everything.
    Stage(
        "plan-budget",
        "segflow.model.budget_measure",
        "time each experiment here; plan epochs that fit the time budget",
        fingerprint=("segflow.model.budget",),
    ),
    # As plan-budget: the choice's arithmetic, not the timing (resolution_measure, which
    # holds the command).
    Stage(
        "plan-resolution",
        "segflow.model.resolution_measure",
        "time each experiment at each budget.sizes candidate; choose the input size",
        fingerprint=("segflow.model.resolution_plan",),
    ),
    Stage(
        "predict-oof",
        "segflow.model.inference.predict",
        "predict a fold model on its own validation fold",
    ),
    Stage(
        "predict-test", "segflow.model.inference.predict", "predict a fold model on the test set"
    ),
    Stage(
        "search-worker",
        "segflow.search.search_worker",
        "run hyperparameter-search trials until the study has n_trials",
    ),
    Stage(
        "search-summary",
        "segflow.search.search_summary",
        "a finished search's trials.csv, best.json and importance.csv",
    ),
    Stage("evaluate-oof", "segflow.model.evaluate_oof", "assemble and score the OOF predictions"),
    Stage(
        "tune-postprocess",
        "segflow.model.tune_postprocess",
        "grid-search post-processing on OOF",
    ),
    Stage("submit", "segflow.model.submit", "write the Kaggle submission CSV"),
    Stage("blend", "segflow.ensemble.blend", "tune the experiments' blend weights on OOF"),
    Stage(
        "apply-blend",
        "segflow.ensemble.apply_blend",
        "apply the blend weights to the experiments' test predictions",
    ),
    Stage(
        "select-pseudo", "segflow.ensemble.select_pseudo", "select pseudo-labels for the next round"
    ),
    Stage(
        "stack", "segflow.ensemble.stacking.stack", "fit the stacked gate or pixel blender on OOF"
    ),
    Stage(
        "apply-stack",
        "segflow.ensemble.stacking.apply_stack",
        "apply a fitted stacked gate or pixel blender to the test set",
    ),
    Stage(
        "export",
        "segflow.bundle.export",
        "write the final choice as a self-contained zip for predict-bundle",
    ),
    Stage(
        "predict-bundle",
        "segflow.bundle.predict_bundle",
        "run an export bundle on a folder of images: the submission CSV, offline",
    ),
    Stage("choose", "segflow.ensemble.choose", "pick the final submission on OOF; stage table"),
    Stage(
        "final-submission",
        "segflow.ensemble.final_submission",
        "copy the chosen candidate's submission to final/",
    ),
    Stage("summary", "segflow.report.summary", "print what a workflow run produced"),
    Stage("report", "segflow.report.report", "write the run's self-contained HTML report"),
)

BY_COMMAND: dict[str, Stage] = {stage.command: stage for stage in STAGES}


def stage_modules() -> dict[str, tuple[str, ...]]:
    """Sub-command -> the modules its fingerprint starts from (derived from :data:`STAGES`)."""
    return {stage.command: stage.entries for stage in STAGES}


def stage_fingerprint(command: str, root: Path | None = None) -> str:
    """:func:`~segflow.core.fingerprint.code_fingerprint` of a sub-command's modules.

    Raises:
        KeyError: an unknown command (the message lists the valid ones).
    """
    if command not in BY_COMMAND:
        raise KeyError(
            f"code fingerprint: unknown stage {command!r}; valid: {', '.join(BY_COMMAND)}"
        )
    stage = BY_COMMAND[command]
    return code_fingerprint(*stage.entries, root=root, exclude=stage.not_fingerprinted)
