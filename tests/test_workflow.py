"""The Snakemake workflow end to end on a small demo dataset: artifacts, reruns, bad config."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    DATA_ARTIFACTS,
    REPO_ROOT,
    SMALL_POSTPROCESS_GRID,
    TINY_EXPERIMENT,
    TWO_CLASS_DATA,
    copy_workflow,
    planned_jobs,
    run_snakemake,
)
from helpers import write_label_dataset

from segflow.data.demo_data import DemoDataOptions, generate_demo_data
from segflow.formats.rle import rle_decode

pytestmark = pytest.mark.workflow

SMALL_DEMO = {
    "demo": {"n_train": 60, "n_test": 20, "seed": 5},
    "folds": {"n_folds": 2},
    "run_experiments": ["unet_lite0"],
    "experiments": {"unet_lite0": {"train": {"epochs": 1, "batch_size": 8}}},
    "pseudo": {"rounds": 0},
    "predict": {"tta": "hflip"},
    "postprocess": SMALL_POSTPROCESS_GRID,
}
MODEL_STAGES = {
    "train_fold",
    "predict_oof",
    "predict_test",
    "evaluate_oof",
    "tune_postprocess",
    "submit",
    "blend",
    "apply_blend",
    "stack",
    "apply_stack",
    "choose",
    "final_submission",
    "report",
    "all",
}
# What a change of a second-level stage's output reruns after it.
SECOND_LEVEL_TAIL = {
    "tune_postprocess",
    "submit",
    "choose",
    "final_submission",
    "report",
    "all",
}


# The profile's trigger set (profiles/default/config.yaml), as a user's rerun would use it.
TRIGGERS = ("--rerun-triggers", "mtime", "params", "input", "code")


def write_config(workdir: Path, name: str, overrides: dict) -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(overrides))
    return name


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workflow copied to a temp dir and run once on a small demo dataset."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    config = write_config(workdir, "small.yaml", SMALL_DEMO)
    run_snakemake(workdir, "--configfile", config)
    return workdir


def test_demo_run_writes_every_artifact(demo_run: Path) -> None:
    results = demo_run / "results"
    test_side = (
        "ingest/test_manifest.parquet",
        "ingest/test_summary.json",
        "dedup/test_leaks.parquet",
        "dedup/test_leaks.json",
        "preprocess/test_index.parquet",
    )
    truths = ("truths/masks.npy", "truths/ids.csv")  # for the OOF stages
    for relative in ("ingest/manifest.parquet", *DATA_ARTIFACTS, *test_side, *truths):
        assert (results / relative).is_file(), relative
    for rule in (
        "generate_demo_data",
        "ingest_train",
        "ingest_test",
        "dedup",
        "leaks",
        "preprocess_train",
        "preprocess_test",
        "make_folds",
        "truth_masks",
    ):
        assert (results / "logs" / f"{rule}.log").is_file()
        assert (results / "benchmarks" / f"{rule}.tsv").is_file()
    manifest = pd.read_parquet(results / "ingest" / "manifest.parquet")
    test_manifest = pd.read_parquet(results / "ingest" / "test_manifest.parquet")
    assert (manifest["split"] == "train").all() and len(manifest) == 60  # no test item
    assert (test_manifest["split"] == "test").all() and len(test_manifest) == 20
    assert "meta_depth" in manifest.columns and "meta_depth" in test_manifest.columns


def test_demo_run_finds_the_planted_duplicates(demo_run: Path) -> None:
    truth = json.loads((demo_run / "resources" / "demo" / "planted_duplicates.json").read_text())
    items = pd.read_parquet(demo_run / "results" / "dedup" / "items.parquet").set_index("id")
    folds = pd.read_csv(demo_run / "results" / "folds" / "folds.csv", dtype={"id": str}).set_index(
        "id"
    )
    for group in truth["train_exact_byte_groups"]:
        assert items.loc[group, "exact_group"].nunique() == 1
        assert folds.loc[group, "fold"].nunique() == 1  # duplicates never straddle folds
    conflicting = truth["conflicting_mask_group"]
    assert not items.loc[conflicting, "masks_agree"].any()
    assert not set(conflicting) & set(folds.index)  # default policy drops the conflict
    assert (items["split"] == "train").all()  # dedup sees the train set; leaks links the test
    leaks = pd.read_parquet(demo_run / "results" / "dedup" / "test_leaks.parquet").set_index("id")
    for train_id, test_id in truth["train_test_copies"]:
        assert leaks.loc[test_id, "leak_train_ids"] == train_id


def test_preprocessed_arrays_follow_the_config(demo_run: Path) -> None:
    preprocess = demo_run / "results" / "preprocess"
    images = np.load(preprocess / "train_images.npy", mmap_mode="r")
    masks = np.load(preprocess / "train_masks.npy", mmap_mode="r")
    index = pd.read_parquet(preprocess / "index.parquet")
    assert images.shape[1:] == (64, 64, 1) and images.dtype == np.uint8  # config.yaml: 64x64
    assert masks.shape == images.shape[:3] and set(np.unique(masks)) <= {0, 1}
    assert len(index[index["split"] == "train"]) == len(images)
    folds = pd.read_csv(demo_run / "results" / "folds" / "folds.csv", dtype={"id": str})
    assert set(folds["id"]) == set(index.loc[index["split"] == "train", "id"])


def test_model_stages_produce_oof_postprocessing_and_submission(demo_run: Path) -> None:
    results = demo_run / "results"
    folds = pd.read_csv(results / "folds" / "folds.csv", dtype={"id": str})
    for fold in (0, 1):
        model_dir = results / "models" / "unet_lite0" / "round0" / f"fold{fold}"
        history = pd.read_csv(model_dir / "history.csv")
        assert len(history) == 1 and (model_dir / "model.pt").is_file()
    assert not (results / ".resume" / "unet_lite0" / "round0" / "fold0" / "last.pt").exists()
    oof_dir = results / "oof" / "unet_lite0" / "round0"
    oof_ids = pd.read_csv(oof_dir / "oof_ids.csv", dtype={"id": str})
    assert sorted(oof_ids["id"]) == sorted(folds["id"])  # every used train item exactly once
    oof = np.load(oof_dir / "oof_probs.npy")
    assert oof.dtype == np.float16 and oof.shape == (len(folds), 1, 101, 101)  # original size
    metrics = json.loads((oof_dir / "metrics.json").read_text())
    assert {"dice", "iou", "kaggle", "all_empty_baseline_kaggle"} <= set(metrics)
    params = json.loads(
        (results / "postprocess" / "unet_lite0" / "round0" / "params.json").read_text()
    )
    grid = pd.read_csv(results / "postprocess" / "unet_lite0" / "round0" / "grid.csv")
    # thresholds x min_areas x (no gate, gate 0.5): the demo model has an aux head
    assert len(grid) == 8 and params["score"] == pytest.approx(grid["score"].max())
    assert [record["class"] for record in params["classes"]] == ["mask"]
    assert oof_ids["nonempty_prob_0"].between(0, 1).all()
    submission = pd.read_csv(
        results / "submission" / "unet_lite0" / "round0" / "submission.csv",
        dtype=str,
        keep_default_na=False,
    )
    manifest = pd.read_parquet(results / "ingest" / "manifest.parquet")
    test_manifest = pd.read_parquet(results / "ingest" / "test_manifest.parquet")
    assert sorted(submission["id"]) == sorted(test_manifest["id"])
    truth = json.loads((demo_run / "resources" / "demo" / "planted_duplicates.json").read_text())
    train_rle = manifest.set_index("id")["mask_rle"]
    by_id = submission.set_index("id")["rle_mask"]
    for train_id, test_id in truth["train_test_copies"]:  # known labels copied from train
        assert by_id[test_id] == (train_rle[train_id] or "")


# Injected into a copy of the report (the report itself has no script): after load, write how
# many <img> decoded and which sections rendered into the DOM that --dump-dom prints.
IMAGE_CHECK = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "segflow-check";
  out.textContent = JSON.stringify({
    images: images.length,
    decoded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    sections: Array.from(document.querySelectorAll("section > h2")).map((h) => h.textContent),
  });
  document.body.appendChild(out);
});</script>"""


def _rendered(chromium: str, page: Path) -> dict:
    """What headless Chromium reports about ``page`` (see ``IMAGE_CHECK``)."""
    import html
    import re

    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="segflow-check">([^<]*)</pre>', result.stdout)
    assert found, f"chromium rendered no check:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_renders_in_headless_chromium(demo_run: Path, tmp_path: Path, chromium: str) -> None:
    report = demo_run / "results" / "report" / "report.html"
    assert (demo_run / "results" / "logs" / "report.log").is_file()
    assert (demo_run / "results" / "benchmarks" / "report.tsv").is_file()
    text = report.read_text()
    assert "<script" not in text and "://" not in text  # self-contained (":" is not base64)
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace("</body>", IMAGE_CHECK + "</body>"))
    rendered = _rendered(chromium, checked)
    assert rendered["sections"] == [
        "Diagnostics",
        "Duplicates",
        "Fold balance",
        "Learning curves",
        "Out-of-fold scores",
        "Post-processing grid",
        "Stacking feature importance",
        "Gain per stage",
        "Example OOF cases",
    ]
    # strata, learning curves, OOF bars, 4 grids (unet, ensemble, 2 stacks), gate + blender,
    # best / median / worst
    assert rendered["images"] == 12
    assert "image-level gate, class mask" in text and "pixel-level blender, class mask" in text
    assert rendered["decoded"] == rendered["images"]
    # The check itself sees a broken image.
    broken = tmp_path / "broken.html"
    broken.write_text(
        checked.read_text().replace("</body>", '<img src="data:image/png;base64,AAAA"></body>')
    )
    assert _rendered(chromium, broken)["decoded"] == 12


def test_report_without_the_pixel_blender_renders_in_headless_chromium(
    demo_run: Path, tmp_path: Path, chromium: str
) -> None:
    """stack.pixel_blender: false on the finished run: the report, rebuilt without stack_pixel,
    still renders every section. Undone at the end: the fixture is shared."""
    config = write_config(demo_run, "no-pixel.yaml", {"stack": {"pixel_blender": False}})
    results = demo_run / "results"
    try:
        run_snakemake(demo_run, "--configfile", "small.yaml", config, *TRIGGERS)
        stages = pd.read_csv(results / "final" / "stages.csv")
        assert set(stages["candidate"]) == {"unet_lite0", "ensemble", "stack_gate"}
        text = (results / "report" / "report.html").read_text()
        assert "image-level gate, class mask" in text and "pixel-level blender" not in text
        checked = tmp_path / "checked.html"
        checked.write_text(text.replace("</body>", IMAGE_CHECK + "</body>"))
        rendered = _rendered(chromium, checked)
        assert "Stacking feature importance" in rendered["sections"]
        # 12 of the full report less stack_pixel's grid and the blender's importances.
        assert rendered["images"] == rendered["decoded"] == 10
    finally:
        run_snakemake(demo_run, "--configfile", "small.yaml", *TRIGGERS)
    assert "pixel-level blender" in (results / "report" / "report.html").read_text()
    assert planned_jobs(demo_run, "--configfile", "small.yaml", *TRIGGERS) == {}


def test_nothing_reruns_when_nothing_changed(demo_run: Path) -> None:
    assert planned_jobs(demo_run, "--configfile", "small.yaml") == {}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"preprocess": {"clahe_clip_limit": 3.0}},
            {"preprocess_train", "preprocess_test"} | MODEL_STAGES,
        ),
        ({"folds": {"seed": 7}}, {"make_folds"} | MODEL_STAGES),
        (
            {"dedup": {"conflict_policy": "union"}},
            {"dedup", "leaks", "preprocess_train", "preprocess_test", "make_folds", "truth_masks"}
            | MODEL_STAGES,
        ),
        (
            {"data": {"dicom_window_width": 300.0}},
            {"ingest_train", "ingest_test", "dedup", "leaks", "make_folds", "truth_masks"}
            | {"preprocess_train", "preprocess_test"}
            | MODEL_STAGES,
        ),
        ({"experiments": {"unet_lite0": {"train": {"lr": 0.01}}}}, MODEL_STAGES),
        ({"predict": {"tta": "d4"}}, MODEL_STAGES - {"train_fold"}),
        (
            {"postprocess": {"min_areas": [0, 5]}},
            {"tune_postprocess", "submit", "choose", "final_submission", "report", "all"},
        ),
        # The submissions' format: choose and the report read no submission.
        (
            {"submission": {"empty_rle": "-1"}},
            {"submit", "final_submission", "all"},
        ),
        ({"submit_experiment": "unet_lite0:0"}, {"choose", "final_submission", "report", "all"}),
        # Near-duplicate grouping is make_folds' (dedup and preprocess stay). A dry run cannot
        # know folds.csv will come out the same, so it plans what reads it: see
        # test_an_unchanged_folds_csv_reruns_nothing_after_it for what a real run does.
        ({"dedup": {"near_max_distance": 8}}, {"make_folds"} | MODEL_STAGES),
        # Training-only pseudo options: no round uses them here, nothing reruns.
        ({"pseudo": {"pseudo_weight": 0.5, "max_pseudo_share": 0.2}}, set()),
        (
            {"ensemble": {"weight_step": 0.25}},
            {"blend", "apply_blend", "stack", "apply_stack"} | SECOND_LEVEL_TAIL,
        ),
    ],
    ids=[
        "clahe",
        "fold-seed",
        "conflict-policy",
        "dicom-window",
        "experiment",
        "tta",
        "postprocess-grid",
        "submission-format",
        "submit-choice",
        "near-distance",
        "pseudo-share-round0",
        "ensemble-step",
    ],
)
def test_a_config_change_reruns_exactly_the_dependent_stages(
    demo_run: Path, change: dict, expected: set
) -> None:
    config = write_config(demo_run, "changed.yaml", change)
    jobs = planned_jobs(demo_run, "--configfile", "small.yaml", config, *TRIGGERS)
    assert set(jobs) == expected


# What one experiment's change reruns with 2 folds: its fold models and predictions, its OOF
# scoring, the ensemble (fit and apply) and both stack jobs (gate, pixel; fit and apply) on top,
# and the four candidates' tuning and submissions (unet_lite0, ensemble, stack_gate,
# stack_pixel).
ONE_EXPERIMENT = {
    "train_fold": 2,
    "predict_oof": 2,
    "predict_test": 2,
    "evaluate_oof": 1,
    "blend": 1,
    "apply_blend": 1,
    "stack": 2,
    "apply_stack": 2,
    "tune_postprocess": 4,
    "submit": 4,
    "choose": 1,
    "final_submission": 1,
    "report": 1,
    "all": 1,
}
# An option (stack.backend, stack.seed) or code both stack jobs read: the fits, and the applies
# of the models they write.
STACK_ONLY = {
    "stack": 2,
    "apply_stack": 2,
    "tune_postprocess": 2,
    "submit": 2,
    "choose": 1,
    "final_submission": 1,
    "report": 1,
    "all": 1,
}
# An option only one stacked candidate reads: its stack job (fit and apply), tuning and
# submission.
ONE_STACKER = {
    "stack": 1,
    "apply_stack": 1,
    "tune_postprocess": 1,
    "submit": 1,
    "choose": 1,
    "final_submission": 1,
    "report": 1,
    "all": 1,
}
EXTRA_EXPERIMENT = {
    "model": {"arch": "Unet", "encoder": "resnet18", "encoder_weights": None},
    "train": {"epochs": 1, "batch_size": 8},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"folds": {"n_folds": 3}},
            {
                **ONE_EXPERIMENT,
                "make_folds": 1,
                "train_fold": 3,
                "predict_oof": 3,
                "predict_test": 3,
            },
        ),
        (
            {
                "run_experiments": ["unet_lite0", "unet"],
                "experiments": {"unet": EXTRA_EXPERIMENT},
            },
            # Only the new experiment trains; unet_lite0's tuning and submission stay.
            {**ONE_EXPERIMENT, "tune_postprocess": 4, "submit": 4},
        ),
        ({"experiments": {"unet_lite0": {"loss": {"bce": 1.0, "lovasz": 0.5}}}}, ONE_EXPERIMENT),
        (
            {"experiments": {"unet_lite0": {"loss": {"bce": {"weight": 1.0, "pos_weight": 2.0}}}}},
            ONE_EXPERIMENT,
        ),
        (
            {"pseudo": {"rounds": 1, "max_uncertain_share": 1.0}},
            # Round 1 only: selection, its folds, and the second level moved to round 1.
            {**ONE_EXPERIMENT, "select_pseudo": 1},
        ),
        ({"stack": {"backend": "catboost"}}, STACK_ONLY),
        (
            {"postprocess": {"thresholds": [0.3, 0.5]}},
            {
                "tune_postprocess": 4,
                "submit": 4,
                "choose": 1,
                "final_submission": 1,
                "report": 1,
                "all": 1,
            },
        ),
        (
            {"submission": {"id_column": "img", "rle_column": "EncodedPixels"}},
            {"submit": 4, "final_submission": 1, "all": 1},
        ),
    ],
    ids=[
        "fold-count",
        "add-experiment",
        "experiment-loss",
        "experiment-loss-option",
        "pseudo-round",
        "stack-backend",
        "postprocess-grid",
        "submission-columns",
    ],
)
def test_each_edit_plans_exactly_the_jobs_it_affects(
    demo_run: Path, change: dict, expected: dict
) -> None:
    config = write_config(demo_run, "changed.yaml", change)
    assert planned_jobs(demo_run, "--configfile", "small.yaml", config, *TRIGGERS) == expected


def test_an_unchanged_folds_csv_reruns_nothing_after_it(demo_run: Path) -> None:
    """Snakemake touches every output of a job and reruns what reads one in the same
    invocation, but a later one compares an input newer than its reader's outputs by checksum
    (files up to --max-checksum-file-size, 1 MB): a near-duplicate edit that leaves folds.csv
    byte-identical retrains nothing. Only the report reads folds/summary.json, which records
    the new distance. The edit is undone at the end: the fixture is shared."""
    folds = demo_run / "results" / "folds" / "folds.csv"
    target = str(folds.relative_to(demo_run))
    before = folds.read_bytes()
    config = write_config(demo_run, "near.yaml", {"dedup": {"near_max_distance": 8}})
    run_snakemake(demo_run, target, "--configfile", "small.yaml", config, *TRIGGERS)
    try:
        assert folds.read_bytes() == before
        assert planned_jobs(demo_run, "--configfile", "small.yaml", config, *TRIGGERS) == {
            "report": 1,
            "all": 1,
        }
    finally:
        run_snakemake(demo_run, target, "--configfile", "small.yaml", *TRIGGERS)
    assert planned_jobs(demo_run, "--configfile", "small.yaml", *TRIGGERS) == {}


def _append(path: Path, text: str) -> None:
    with path.open("a") as module:
        module.write(text)


def test_editing_stacking_code_reruns_stacking_but_not_training(
    demo_run: Path, tmp_path: Path
) -> None:
    """snakemake#1694: package code the rule calls, not only the rule's own code, must count."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "src" / "segflow", src / "segflow")
    features = src / "segflow" / "ensemble" / "stacking" / "features.py"
    _append(features, "\n# a comment changes nothing the code does\n")
    assert planned_jobs(demo_run, "--configfile", "small.yaml", *TRIGGERS, src=src) == {}
    # A real edit of a module only the stacking stage uses.
    _append(features, "\nEDITED = True\n")
    assert planned_jobs(demo_run, "--configfile", "small.yaml", *TRIGGERS, src=src) == STACK_ONLY
    _append(src / "segflow" / "core" / "errors.py", "\nEDITED = True  # every stage\n")
    edited_everywhere = planned_jobs(demo_run, "--configfile", "small.yaml", *TRIGGERS, src=src)
    assert {"generate_demo_data", "ingest_train", "train_fold", "stack"} <= set(edited_everywhere)


def test_code_edits_rerun_the_stages_that_run_that_code_only(
    demo_run: Path, tmp_path: Path
) -> None:
    """Comments, docstrings and formatting rerun nothing; a real edit reruns the stages whose
    code reaches it (segflow.core.fingerprint), not every stage that imports its module."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "src" / "segflow", src / "segflow")
    tta = src / "segflow" / "model" / "inference" / "tta.py"
    original = tta.read_text()

    def plan() -> dict[str, int]:
        return planned_jobs(demo_run, "--configfile", "small.yaml", *TRIGGERS, src=src)

    tta.write_text(original.replace("\ndef ", "\n# a comment\n\n\ndef ") + "\n# the end\n")
    assert plan() == {}
    docstring = original.replace('"""', '"""Reworded: ', 1)
    tta.write_text(docstring.replace('    """', '    """Reworded. ', 1))
    assert docstring != original and plan() == {}
    tta.write_text(original + "\nEDITED = True\n")
    jobs = plan()
    assert {"predict_oof", "predict_test", "evaluate_oof", "blend", "stack", "choose"} <= set(jobs)
    assert not {"train_fold", "make_folds", "ingest_train"} & set(jobs)
    tta.write_text(original)
    assert plan() == {}
    # Provenance blocks are written by the stages' own code: a change of them reruns the data
    # stages (their summaries carry one).
    provenance = src / "segflow" / "core" / "stage_args.py"
    provenance.write_text(
        provenance.read_text().replace(
            '"config_hash": config_hash}', '"config_hash": str(config_hash)}'
        )
    )
    assert {"ingest_train", "dedup", "make_folds"} <= set(plan())


@pytest.mark.parametrize(
    ("change", "stacker"),
    [
        ({"stack": {"pixels_per_image": 16}}, "pixel"),
        ({"stack": {"threshold_target": True}}, "gate"),
    ],
    ids=["stack-pixels", "stack-threshold"],
)
def test_a_stack_option_refits_only_the_candidate_that_reads_it(
    demo_run: Path, change: dict, stacker: str
) -> None:
    """The stack_gate maps cannot change with the pixel sample, nor the blender's with the
    gate's thresholds: each option reruns its own stack job, tuning and submission."""
    jobs = _dry_run(demo_run, change, *TRIGGERS)
    assert _rules(jobs) == ONE_STACKER
    assert _job(jobs, "stack", stacker=stacker)
    assert _job(jobs, "apply_stack", stacker=stacker)
    for rule in ("tune_postprocess", "submit"):
        assert _job(jobs, rule, experiment=f"stack_{stacker}", round="0")


def test_without_the_pixel_blender_no_stack_pixel_job_or_candidate(
    demo_run: Path, fresh_plan: Callable[[dict], list[dict]]
) -> None:
    """stack.pixel_blender: false on the finished run: the choice, its copy and the report
    are redone without stack_pixel, and nothing is fitted or tuned."""
    jobs = _dry_run(demo_run, {"stack": {"pixel_blender": False}}, *TRIGGERS)
    assert _rules(jobs) == {"choose": 1, "final_submission": 1, "report": 1, "all": 1}
    for job in jobs:
        assert "stack_pixel" not in job["shell"] and "summary_pixel" not in job["shell"], job
        assert not [path for path in job["input"] if "stack_pixel" in path], job
    assert "stack_gate:0" in _job(jobs, "choose")["shell"]
    # A fresh run plans one stack job, the gate's, and three candidates' tuning.
    planned = fresh_plan({"stack": {"pixel_blender": False}})
    assert _job(planned, "stack")["wildcards"] == {"stacker": "gate"}
    assert _job(planned, "apply_stack")["wildcards"] == {"stacker": "gate"}
    tuned = {job["wildcards"]["experiment"] for job in planned if job["rule"] == "tune_postprocess"}
    assert tuned == {"unet_lite0", "ensemble", "stack_gate"}


# A user's dataset (demo off), for the edit matrix of the test side: tiny, one experiment and
# one holdout fold (the test side's reruns do not depend on how many folds train).
USER_DATA = {
    "demo": {"enabled": False},
    "data": {
        "train_images": "mydata/train/images",
        "test_images": "mydata/test/images",
        "mask_source": "rle_csv",
        "rle_csv": "mydata/train.csv",
        "metadata_csv": "mydata/metadata.csv",
    },
    "preprocess": {"height": 32, "width": 32},
    "folds": {"n_folds": 2, "train_folds": [0]},
    "run_experiments": ["unet_lite0"],
    "experiments": {"unet_lite0": {"train": {"epochs": 1, "batch_size": 8}}},
    "pseudo": {"rounds": 0},
    "predict": {"tta": "none"},
    "postprocess": {
        "thresholds": [0.5],
        "min_areas": [0],
        "fill_holes_options": [False],
        "gates": [0.5],
    },
}
# What a test-set change reruns: the test side, with blend's and the stack jobs' apply halves
# (apply_blend, apply_stack), which apply what blend and stack fitted on OOF to the new test
# predictions, then every submission and the final copy (README "How to rerun"). No fit:
# blend and stack read only the OOF side, so their outputs, the tuning, choose and the report
# (which read no test-side file) stay. No ingest_train, dedup, make_folds, preprocess_train,
# train_fold, predict_oof or evaluate_oof.
TEST_SIDE_JOBS = {
    "ingest_test": 1,
    "leaks": 1,
    "preprocess_test": 1,
    "predict_test": 1,  # the holdout fold's model
    "apply_blend": 1,
    "apply_stack": 2,  # the gate's and the pixel blender's
    "submit": 4,
    "final_submission": 1,
    "all": 1,
}


@pytest.fixture(scope="module")
def user_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workflow run once on a small user dataset (demo off) in a temp dir."""
    workdir = copy_workflow(tmp_path_factory.mktemp("user-run"))
    generate_demo_data(workdir / "mydata", DemoDataOptions(n_train=40, n_test=12, seed=5))
    config = write_config(workdir, "user.yaml", USER_DATA)
    run_snakemake(workdir, "--configfile", config)
    return workdir


def _user_plan(workdir: Path, config: str = "user.yaml") -> dict[str, int]:
    return planned_jobs(workdir, "--configfile", config, *TRIGGERS)


def test_a_byte_identical_copy_of_the_test_folder_reruns_the_test_side_only(
    user_run: Path,
) -> None:
    """data.test_images pointed elsewhere: no fold, training or OOF job, only the test side."""
    shutil.copytree(user_run / "mydata" / "test", user_run / "copied-test")
    moved = {**USER_DATA, "data": {**USER_DATA["data"], "test_images": "copied-test/images"}}
    config = write_config(user_run, "moved.yaml", moved)
    assert _user_plan(user_run, config) == TEST_SIDE_JOBS
    assert _user_plan(user_run) == {}  # the run's own config: still up to date


def test_adding_or_removing_a_test_image_reruns_the_test_side_only(user_run: Path) -> None:
    """A test image added in place, or one removed: the test folder's content stamp reruns the
    test side; putting the folder back as it was reruns nothing."""
    images = user_run / "mydata" / "test" / "images"
    first = sorted(images.glob("*.png"))[0]
    added = images / "added_test_image.png"
    cv2.imwrite(str(added), 255 - cv2.imread(str(first), cv2.IMREAD_UNCHANGED))
    assert _user_plan(user_run) == TEST_SIDE_JOBS
    added.unlink()
    assert _user_plan(user_run) == {}
    kept = user_run / "removed.png"
    shutil.move(first, kept)
    assert _user_plan(user_run) == TEST_SIDE_JOBS
    shutil.move(kept, first)
    assert _user_plan(user_run) == {}


def test_a_train_image_change_still_reruns_training(user_run: Path) -> None:
    """The train side's stamp on a user's dataset (not the generated demo): a file overwritten
    in place leaves its folder's modification time alone, so only the data stamp param can
    notice it (it reruns from ingest, and retrains); a file touched (same bytes, new time)
    reruns nothing."""
    assert (user_run / ".snakemake" / "segflow" / "data_stamp.json").is_file()  # the hash cache
    image_path = sorted((user_run / "mydata" / "train" / "images").glob("*.png"))[0]
    for touched in (image_path, user_run / "mydata" / "train.csv"):
        later = touched.stat().st_mtime + 100
        os.utime(touched, (later, later))  # `touch`: same bytes, new time
    assert _user_plan(user_run) == {}
    original = image_path.read_bytes()
    image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(image_path), 255 - image)  # in place, as a user copying over it would
    try:
        folds = planned_jobs(
            user_run, "results/folds/folds.csv", "--configfile", "user.yaml", *TRIGGERS
        )
        jobs = _user_plan(user_run)
    finally:
        image_path.write_bytes(original)
    assert folds == {"ingest_train": 1, "dedup": 1, "make_folds": 1}
    assert {"ingest_train", "dedup", "make_folds", "preprocess_train"} <= set(jobs)
    assert {"train_fold", "predict_oof", "evaluate_oof", "predict_test"} <= set(jobs)
    assert _user_plan(user_run) == {}


def test_editing_a_demo_image_in_place_reruns_from_ingest(tmp_path: Path) -> None:
    """The demo folder is the workflow's own output: its content list (contents.json) keeps the
    stamp "demo" after a generation; a user's edit in place (same name, other pixels) reruns
    ingest once, a touch reruns nothing."""
    workdir = copy_workflow(tmp_path / "demo-edit")
    config = write_config(workdir, "small.yaml", SMALL_DEMO)
    target = "results/folds/folds.csv"
    run_snakemake(workdir, target, "--configfile", config)
    image_path = sorted((workdir / "resources" / "demo" / "train" / "images").glob("*.png"))[0]
    later = image_path.stat().st_mtime + 100
    os.utime(image_path, (later, later))
    assert planned_jobs(workdir, target, "--configfile", config, *TRIGGERS) == {}
    image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(image_path), 255 - image)
    assert planned_jobs(workdir, target, "--configfile", config, *TRIGGERS) == {
        "ingest_train": 1,
        "dedup": 1,
        "make_folds": 1,
    }
    run_snakemake(workdir, target, "--configfile", config)
    assert planned_jobs(workdir, target, "--configfile", config, *TRIGGERS) == {}  # stable


def test_rerun_after_a_change_leaves_upstream_artifacts_untouched(
    tmp_path: Path, demo_run: Path
) -> None:
    workdir = copy_workflow(tmp_path / "copy")
    config = write_config(workdir, "small.yaml", SMALL_DEMO)
    # Up to preprocessing only: what lies upstream of the change is what must stay untouched.
    target = "results/preprocess/stats.json"
    run_snakemake(workdir, target, "--configfile", config)
    manifest = workdir / "results" / "ingest" / "manifest.parquet"
    stats = workdir / "results" / "preprocess" / "stats.json"
    before = manifest.stat().st_mtime_ns, stats.stat().st_mtime_ns
    changed = write_config(workdir, "changed.yaml", {"preprocess": {"clahe_clip_limit": 4.0}})
    run_snakemake(
        workdir,
        target,
        "--configfile",
        config,
        changed,
        "--rerun-triggers",
        "mtime",
        "params",
        "input",
        "code",
    )
    assert manifest.stat().st_mtime_ns == before[0]
    assert stats.stat().st_mtime_ns > before[1]
    assert json.loads(stats.read_text())["options"]["clahe_clip_limit"] == 4.0


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"preprocess": {"clahe_clp": 3.0}}, "clahe_clp"),
        ({"folds": {"n_folds": "five"}}, "n_folds"),
        ({"dedup": {"conflict_policy": "vote"}}, "conflict_policy"),
        ({"resluts_dir": "x"}, "resluts_dir"),
        (
            {"submit_experiment": "unet_lite0:7"},
            "submit_experiment 'unet_lite0:7' is not a candidate",
        ),
        (
            {"experiments": {"unet_lite0": {"train": {"init_from": "fpn_r34"}}}},
            "experiments.unet_lite0.train.init_from: unknown experiment 'fpn_r34'",
        ),
        (
            {
                "experiments": {
                    "a": {"train": {"init_from": "b"}},
                    "b": {"train": {"init_from": "a"}},
                }
            },
            "experiments.b.train.init_from: cycle a -> b -> a",
        ),
        (
            {"experiments": {"unet_lite0": {"refit": {"enabled": True, "test_models": "auto"}}}},
            "experiments.unet_lite0.refit.test_models: auto is chosen by the time budget",
        ),
    ],
    ids=[
        "typo",
        "wrong-type",
        "bad-choice",
        "top-level-typo",
        "unknown-submit-candidate",
        "init-from-unknown",
        "init-from-cycle",
        "refit-auto-without-budget",
    ],
)
def test_invalid_config_stops_before_any_job_naming_the_key(
    tmp_path: Path, override: dict, named: str
) -> None:
    workdir = copy_workflow(tmp_path)
    config = write_config(workdir, "bad.yaml", override)
    result = run_snakemake(workdir, "--configfile", config, check=False)
    assert result.returncode != 0
    assert named in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def _dry_run(workdir: Path, overrides: dict, *args: str) -> list[dict]:
    """The jobs of a dry run of SMALL_DEMO with ``overrides`` (and snakemake ``args``): rule,
    whether a checkpoint, wildcards, inputs, shell."""
    import re

    base = write_config(workdir, "small.yaml", SMALL_DEMO)
    changed = write_config(workdir, "changed.yaml", overrides)
    output = run_snakemake(
        workdir, "--dry-run", "--printshellcmds", "--configfile", base, changed, *args
    ).stdout
    jobs = []
    for block in re.split(r"^\[[^\]\n]*\]$", output, flags=re.M)[1:]:
        rule = re.match(r"\s*(?:local)?(rule|checkpoint) (\w+):", block)
        if rule is None:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.M))
        wildcards = dict(
            pair.split("=", 1) for pair in fields.get("wildcards", "").split(", ") if pair
        )
        shell = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        jobs.append(
            {
                "rule": rule.group(2),
                "checkpoint": rule.group(1) == "checkpoint",
                "wildcards": wildcards,
                "input": fields.get("input", "").split(", "),
                "shell": shell.group(1) if shell else "",
            }
        )
    return jobs


@pytest.fixture(scope="module")
def fresh_plan(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict], list[dict]]:
    """``_dry_run`` of a fresh workflow copy (no results): one copy for the module, each
    config's plan made once (a dry run loads the whole workflow, ~8 s) and reused."""
    workdir = copy_workflow(tmp_path_factory.mktemp("fresh"))
    plans: dict[str, list[dict]] = {}

    def plan(overrides: dict) -> list[dict]:
        key = json.dumps(overrides, sort_keys=True)
        if key not in plans:
            plans[key] = _dry_run(workdir, overrides)
        return copy.deepcopy(plans[key])

    return plan


def _job(jobs: list[dict], rule: str, **wildcards: str) -> dict:
    found = [j for j in jobs if j["rule"] == rule and wildcards.items() <= j["wildcards"].items()]
    assert len(found) == 1, (rule, wildcards, [j["wildcards"] for j in jobs if j["rule"] == rule])
    return found[0]


TWO_STAGE = {
    "run_experiments": ["lovasz"],
    "experiments": {
        "lovasz": {
            # The demo experiment's model (init_from needs the same network).
            "model": {"arch": "Unet", "encoder": "timm-tf_efficientnet_lite0", "aux_head": True},
            "loss": {"lovasz": 1.0},
            "train": {"epochs": 1, "init_from": "unet_lite0", "freeze_encoder_epochs": 1},
        }
    },
}


def test_a_second_stage_fold_trains_after_the_same_fold_of_the_first(
    fresh_plan: Callable[[dict], list[dict]],
) -> None:
    jobs = fresh_plan(TWO_STAGE)
    for fold in ("0", "1"):
        first = "results/models/unet_lite0/round0/fold{}/model.pt"
        second = _job(jobs, "train_fold", experiment="lovasz", fold=fold)
        assert first.format(fold) in second["input"]
        assert first.format(1 - int(fold)) not in second["input"]
        assert f"--init-checkpoint {first.format(fold)}" in second["shell"]
        # The first stage is trained (it is not in run_experiments) but nothing else of it.
        assert (
            "--init-checkpoint"
            not in _job(jobs, "train_fold", experiment="unet_lite0", fold=fold)["shell"]
        )
    assert not [j for j in jobs if j["rule"] == "predict_oof" and "unet_lite0" in str(j)]
    assert not [j for j in jobs if j["rule"] == "train_full"]


@pytest.mark.parametrize(
    ("test_models", "members"),
    [("full", ["full"]), ("both", ["fold0", "fold1", "full"]), ("folds", ["fold0", "fold1"])],
)
def test_a_refit_trains_a_full_model_that_predicts_the_test_set(
    fresh_plan: Callable[[dict], list[dict]], test_models: str, members: list[str]
) -> None:
    refit = {
        "experiments": {"unet_lite0": {"refit": {"enabled": True, "test_models": test_models}}}
    }
    jobs = fresh_plan(refit)
    full = _job(jobs, "train_full", experiment="unet_lite0", round="0")
    assert {f"results/models/unet_lite0/round0/fold{k}/metrics.json" for k in (0, 1)} <= set(
        full["input"]
    )
    submission = _job(jobs, "submit", experiment="unet_lite0")
    test_inputs = [p for p in submission["input"] if p.startswith("results/test/")]
    assert test_inputs == [f"results/test/unet_lite0/round0/{m}/probs.npy" for m in members]
    blend = _job(jobs, "apply_blend")
    assert [p for p in blend["input"] if p.startswith("results/test/")] == test_inputs
    assert not [p for p in _job(jobs, "blend")["input"] if p.startswith("results/test/")]
    if test_models != "folds":
        predict = _job(jobs, "predict_test_full", experiment="unet_lite0")
        assert predict["input"][0] == "results/models/unet_lite0/round0/full/model.pt"
    # The folds train, predict OOF and are scored as without the refit.
    plain = fresh_plan({})
    for rule in ("train_fold", "predict_oof"):
        assert sorted(j["shell"] for j in jobs if j["rule"] == rule) == sorted(
            j["shell"] for j in plain if j["rule"] == rule
        )
    assert not [j for j in plain if j["rule"] in ("train_full", "predict_test_full")]


def test_a_budget_plans_the_run_folds_and_refit_but_not_a_first_stage_outside_the_run(
    fresh_plan: Callable[[dict], list[dict]],
) -> None:
    lovasz = {**TWO_STAGE["experiments"]["lovasz"], "refit": {"enabled": True}}
    config = {**TWO_STAGE, "experiments": {"lovasz": lovasz}, "budget": {"minutes": 20}}
    jobs = fresh_plan(config)
    plan = _job(jobs, "plan_budget")
    assert not plan["checkpoint"]  # no refit.test_models auto: a plain rule
    planned = json.loads(_flag(plan["shell"], "--experiments"))
    for fold in ("0", "1"):
        second = _job(jobs, "train_fold", experiment="lovasz", fold=fold)["shell"]
        assert "--plan results/budget/plan.json" in second and "--init-checkpoint" in second
        # The plan was made for exactly what the fold trains (train --plan compares hashes,
        # leaving the refit section out), and for the refit it asks for.
        fold_values = json.loads(_flag(second, "--experiment"))
        assert {k: v for k, v in planned["lovasz"].items() if k != "refit"} == fold_values
        first = _job(jobs, "train_fold", experiment="unet_lite0", fold=fold)["shell"]
        assert "--plan" not in first
    assert planned["lovasz"]["refit"]["enabled"] and set(planned) == {"lovasz"}
    full = _job(jobs, "train_full", experiment="lovasz")
    assert "results/budget/plan.json" in full["input"]
    assert "--plan results/budget/plan.json --round 0" in full["shell"]
    assert "--init-checkpoint results/models/unet_lite0/round0/full/model.pt" in full["shell"]
    assert shlex.split(full["shell"])  # well quoted
    # The first stage's refit, outside the run, is not planned: its folds' median epoch.
    first_full = _job(jobs, "train_full", experiment="unet_lite0")
    assert "--plan" not in first_full["shell"]


def _rules(jobs: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    return counts


def test_a_budgeted_refit_without_auto_plans_the_same_jobs_plus_plan_budget(
    fresh_plan: Callable[[dict], list[dict]],
) -> None:
    refit = {"experiments": {"unet_lite0": {"refit": {"enabled": True, "test_models": "both"}}}}
    plain = fresh_plan(refit)  # test_a_refit_..._set[both]'s plan
    budgeted = fresh_plan({**refit, "budget": {"minutes": 20}})
    assert _rules(budgeted) == {**_rules(plain), "plan_budget": 1}
    assert not [job for job in budgeted if job["checkpoint"]]
    planned = [*plain, _job(budgeted, "plan_budget")]
    assert sorted(map(_job_key, budgeted)) == sorted(map(_job_key, planned))


def _job_key(job: dict) -> tuple[str, list[tuple[str, str]]]:
    return job["rule"], sorted(job["wildcards"].items())


def test_refit_auto_makes_plan_budget_a_checkpoint_the_test_set_waits_for(
    fresh_plan: Callable[[dict], list[dict]],
) -> None:
    auto = {"refit": {"enabled": True, "test_models": "auto"}}
    config = {"experiments": {"unet_lite0": auto}, "budget": {"minutes": 20}}
    jobs = fresh_plan(config)
    assert _job(jobs, "plan_budget")["checkpoint"]
    # Which models predict the test set is the plan's choice: nothing of it before the plan.
    for rule in ("train_full", "predict_test_full", "predict_test"):
        assert not [job for job in jobs if job["rule"] == rule], rule
    assert _rules(jobs)["train_fold"] == 2 and _rules(jobs)["predict_oof"] == 2
    # They wait for the plan (Snakemake shortens the input lists it prints).
    for rule in ("submit", "apply_blend", "apply_stack"):
        waiting = [job for job in jobs if job["rule"] == rule]
        assert waiting, rule
        assert not [p for j in waiting for p in j["input"] if "results/test/unet_lite0" in p]


def _plant_data_and_plan(workdir: Path, plan: dict) -> None:
    """Every data-stage output, then ``plan`` as results/budget/plan.json, oldest first: the
    dry run takes them as made (no job upstream of the plan reruns) and reads the plan."""
    import os
    import time

    paths = [workdir / "resources" / "demo", workdir / "results" / "ingest" / "manifest.parquet"]
    paths += [workdir / "results" / name for name in DATA_ARTIFACTS]
    paths.append(workdir / "results" / "budget" / "plan.json")
    start = time.time() - 1000
    for index, path in enumerate(paths):
        if path.name == "demo":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(plan) if path.name == "plan.json" else "")
        os.utime(path, (start + index, start + index))


@pytest.mark.parametrize(("chosen", "members"), [("full", ["full"]), ("folds", ["fold0", "fold1"])])
def test_the_test_set_and_the_refit_follow_the_plans_auto_choice(
    tmp_path: Path, chosen: str, members: list[str]
) -> None:
    workdir = copy_workflow(tmp_path)
    trained = chosen == "full"
    refit = {"configured": "auto", "test_models": chosen, "trained": trained, "epochs": 1}
    _plant_data_and_plan(workdir, {"format": 1, "experiments": {"unet_lite0": {"refit": refit}}})
    auto = {"refit": {"enabled": True, "test_models": "auto"}}
    jobs = _dry_run(workdir, {"experiments": {"unet_lite0": auto}, "budget": {"minutes": 20}})
    assert "plan_budget" not in _rules(jobs)  # made: the DAG past it follows it
    submission = _job(jobs, "submit", experiment="unet_lite0")
    test_inputs = [p for p in submission["input"] if p.startswith("results/test/")]
    assert test_inputs == [f"results/test/unet_lite0/round0/{m}/probs.npy" for m in members]
    blend = _job(jobs, "apply_blend")
    assert [p for p in blend["input"] if p.startswith("results/test/")] == test_inputs
    assert not [p for p in _job(jobs, "blend")["input"] if p.startswith("results/test/")]
    rules = _rules(jobs)
    if trained:
        assert rules["train_full"] == 1 and rules["predict_test_full"] == 1
        assert "predict_test" not in rules
        full = _job(jobs, "train_full", experiment="unet_lite0")["shell"]
        assert "--plan results/budget/plan.json --round 0" in full
    else:  # no refit at all: the folds predict the test set
        assert "train_full" not in rules and "predict_test_full" not in rules
        assert rules["predict_test"] == 2


def _flag(shell: str, flag: str) -> str:
    """The value of ``flag`` in a job's shell command."""
    words = shlex.split(shell)
    return words[words.index(flag) + 1]


def test_bad_input_fails_the_stage_with_a_one_line_error(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    import cv2

    cv2.imwrite(str(data / "images" / "a.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(data / "masks" / "a.png"), np.zeros((8, 8), np.uint8))
    (data / "images" / "b.png").write_bytes(b"")  # zero-byte image
    cv2.imwrite(str(data / "masks" / "b.png"), np.zeros((8, 8), np.uint8))
    config = write_config(
        workdir,
        "bad.yaml",
        {
            "demo": {"enabled": False},
            "data": {
                "train_images": str(data / "images"),
                "train_masks": str(data / "masks"),
                "mask_source": "folder",
                "test_images": None,
                "rle_csv": None,
                "metadata_csv": None,
            },
        },
    )
    result = run_snakemake(workdir, "--configfile", config, check=False)
    assert result.returncode != 0
    log = (workdir / "results" / "logs" / "ingest_train.log").read_text()
    errors = [line for line in log.splitlines() if "error:" in line]
    assert errors == [
        f"segflow ingest: error: {data / 'images' / 'b.png'}: file is empty (0 bytes)"
    ]
    assert "Traceback" not in log
    assert not (workdir / "results" / "ingest" / "manifest.parquet").exists()


def test_workflow_passes_snakemake_lint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_workflow_is_snakefmt_formatted() -> None:
    snakefmt = Path(sys.executable).parent / "snakefmt"
    if not snakefmt.exists():
        pytest.skip("snakefmt is not installed in this environment")
    result = subprocess.run(
        [str(snakefmt), "--check", "Snakefile", "workflow"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _two_class_dataset(root: Path, n_train: int = 40, n_test: int = 8, size: int = 48) -> None:
    """Severstal-style data: bright squares are class 1, dark discs class 2 (both may appear,
    and overlap), train.csv in long format listing only non-empty (image, class) pairs; the
    last test image is a byte copy of train image 0."""
    rng = np.random.default_rng(3)
    train = {}
    yy, xx = np.mgrid[:size, :size]
    for index in range(n_train + n_test):
        image = rng.integers(90, 140, size=(size, size)).astype(np.uint8)
        planes = np.zeros((2, size, size), np.uint8)
        if index % 3 != 0:
            y, x = rng.integers(0, size - 16, size=2)
            planes[0, y : y + 16, x : x + 16] = 1
            image[planes[0] == 1] = 230
        if index % 2 == 0:
            cy, cx = rng.integers(8, size - 8, size=2)
            planes[1] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
            image[planes[1] == 1] = 20
        train[f"img{index:03d}"] = (image, planes)
    test = {key: train.pop(key) for key in list(train)[n_train:]}
    test["img999"] = train["img000"]
    write_label_dataset(root, train, ("1", "2"), source="rle_csv")
    (root / "test").mkdir()
    for key, (image, _) in test.items():
        cv2.imwrite(str(root / "test" / f"{key}.png"), image)


def test_multilabel_competition_runs_end_to_end(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "workflow")
    _two_class_dataset(workdir / "data")
    overrides = {
        "results_dir": "results-ml",
        "demo": {"enabled": False},
        "data": TWO_CLASS_DATA,
        "preprocess": {"height": 32, "width": 32, "clahe": False},
        # One holdout fold: multi-label training of every fold is test_tricks_workflow's.
        "folds": {"n_folds": 2, "train_folds": [0]},
        "run_experiments": ["tiny"],
        "experiments": {
            "tiny": {
                "model": {
                    "arch": "Unet",
                    "encoder": "mobilenet_v2",
                    "aux_head": True,
                    "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
                },
                "augment": "none",
                "train": {"epochs": 2, "batch_size": 8, "lr": 0.01},
            }
        },
        "predict": {"tta": "hflip"},
        "postprocess": {"thresholds": [0.5], "min_areas": [0, 10], "gates": [0.5]},
        "submission": {
            "id_column": "ImageId",
            "class_column": "ClassId",
            "rle_column": "EncodedPixels",
        },
    }
    run_snakemake(workdir, "--configfile", write_config(workdir, "ml.yaml", overrides))
    results = workdir / "results-ml"
    stats = json.loads((results / "preprocess" / "stats.json").read_text())
    assert stats["classes"] == ["1", "2"] and stats["multilabel"] is True
    folds = pd.read_csv(results / "folds" / "folds.csv", dtype={"id": str})
    assert len(folds) == 40 and 0 < (folds["fold"] == 0).sum() < 40
    oof = np.load(results / "oof" / "tiny" / "round0" / "oof_probs.npy")
    assert oof.shape == ((folds["fold"] == 0).sum(), 2, 48, 48)  # the holdout fold's images
    metrics = json.loads((results / "oof" / "tiny" / "round0" / "metrics.json").read_text())
    assert [record["class"] for record in metrics["per_class"]] == ["1", "2"]
    params = json.loads((results / "postprocess" / "tiny" / "round0" / "params.json").read_text())
    assert [record["class"] for record in params["classes"]] == ["1", "2"]
    submission = pd.read_csv(
        results / "submission" / "tiny" / "round0" / "submission.csv",
        dtype=str,
        keep_default_na=False,
    )
    assert list(submission.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert len(submission) == 9 * 2  # every test image, every class
    copied = submission[submission["ImageId"] == "img999"].set_index("ClassId")["EncodedPixels"]
    train_csv = pd.read_csv(workdir / "data" / "train.csv", dtype=str)
    expected = train_csv[train_csv["ImageId"] == "img000"].set_index("ClassId")["EncodedPixels"]
    assert copied["2"] == expected["2"] and copied["1"] == expected.get("1", "")
    for rle in submission["EncodedPixels"]:
        assert rle_decode(rle, (48, 48)).shape == (48, 48)


SECOND_LEVEL_DEMO = {
    **SMALL_DEMO,
    "run_experiments": ["unet_lite0", "tiny"],
    "demo": {"n_train": 60, "n_test": 24, "seed": 5},
    # One holdout fold: 12 torch jobs (2 experiments x 2 rounds x train, OOF, test), not 24.
    # Full cross-validation end to end is demo_run's (and stacking's cross-fit on first-level
    # folds with it); here the stack cross-fits on sub-folds of fold 0's OOF rows.
    "folds": {"n_folds": 2, "train_folds": [0]},
    "experiments": {
        "unet_lite0": {"train": {"epochs": 1, "batch_size": 8}},
        "tiny": TINY_EXPERIMENT,
    },
    # Untrained models are unsure everywhere; a loose bound still selects some images.
    "pseudo": {"rounds": 1, "max_uncertain_share": 1.0, "top_fraction": 0.5},
    "stack": {"backend": "catboost", "pixels_per_image": 16, "threshold_target": True},
}


@pytest.fixture(scope="module")
def second_level_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("second-level"))
    run_snakemake(workdir, "--configfile", write_config(workdir, "two.yaml", SECOND_LEVEL_DEMO))
    return workdir


# The second-level run (two experiments, a pseudo round, stacking) is the module's longest
# set-up (~3 minutes on one core), so it gets more than the default 900 s per test.
@pytest.mark.timeout(1800)
def test_pseudo_round_trains_on_selected_test_images_and_scores_on_real_labels(
    second_level_run: Path,
) -> None:
    results = second_level_run / "results"
    selection = pd.read_csv(results / "pseudo" / "round1" / "selection.csv", dtype={"id": str})
    items = pd.read_parquet(results / "dedup" / "items.parquet")
    duplicates = set(items.loc[items["split"].eq("test") & items["leak_train_ids"].notna(), "id"])
    assert len(selection) == 24 and selection["selected"].sum() > 0
    assert not selection.loc[selection["id"].isin(duplicates), "selected"].any()
    targets = np.load(results / "pseudo" / "round1" / "targets.npy")
    assert targets.shape == (selection["selected"].sum(), 64, 64)
    folds = pd.read_csv(results / "folds" / "folds.csv", dtype={"id": str})
    for name in ("unet_lite0", "tiny"):
        log = (results / "logs" / "train_fold" / f"{name}_round1_fold0.log").read_text()
        n_pseudo = int(selection["selected"].sum())
        assert f"{(folds['fold'] != 0).sum() + n_pseudo} training" in log
        oof_ids = pd.read_csv(results / "oof" / name / "round1" / "oof_ids.csv", dtype={"id": str})
        # real labels only, every item of the holdout fold once
        assert sorted(oof_ids["id"]) == sorted(folds.loc[folds["fold"] == 0, "id"])


@pytest.mark.timeout(1800)
def test_final_choice_and_stage_table(second_level_run: Path) -> None:
    results = second_level_run / "results"
    stages = pd.read_csv(results / "final" / "stages.csv")
    expected = {(n, r) for r in (0, 1) for n in ("unet_lite0", "tiny", "ensemble")}
    expected |= {("stack_gate", 1), ("stack_pixel", 1)}
    assert set(zip(stages["candidate"], stages["round"], strict=True)) == expected
    choice = json.loads((results / "final" / "choice.json").read_text())
    assert choice["tuned_oof_score"] == pytest.approx(stages["tuned"].max())
    chosen = results / "submission" / choice["candidate"] / f"round{choice['round']}"
    assert (results / "final" / "submission.csv").read_bytes() == (
        chosen / "submission.csv"
    ).read_bytes()
    assert "| stack_gate |" in (results / "final" / "stages.md").read_text()
    class_dir = results / "stack" / "round1" / "class_0"
    assert (class_dir / "gate_model.cbm").is_file()
    assert (class_dir / "threshold_model.cbm").is_file()
    thresholds = pd.read_csv(class_dir / "threshold_oof.csv")
    assert thresholds["predicted"].between(0.05, 0.95).all()
    summary = json.loads((results / "stack" / "round1" / "summary_gate.json").read_text())
    assert "mae" in next(iter(summary["classes"].values()))["threshold"]
    weights = json.loads((results / "ensemble" / "round0" / "weights.json").read_text())
    assert sum(weights["weights"].values()) == pytest.approx(1.0)


@pytest.mark.timeout(1800)
def test_rerunning_a_pseudo_round_never_retrains_round_0(second_level_run: Path) -> None:
    jobs = planned_jobs(second_level_run, "--configfile", "two.yaml", "-R", "select_pseudo")
    assert jobs.get("train_fold") == 2  # 2 experiments x the holdout fold of round 1 only
    assert "blend" in jobs and "evaluate_oof" in jobs
