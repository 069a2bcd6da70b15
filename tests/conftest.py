"""Shared fixtures: the generated demo dataset and the optional real datasets in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segflow.data.demo_data import DemoDataOptions, generate_demo_data

REPO_ROOT = Path(__file__).resolve().parents[1]
# `make test` runs two pytest-xdist workers on a 2-core machine. Every process then gets one
# thread (torch, OpenMP, Snakemake's --cores): two workers whose thread pools each want both
# cores spin-wait on each other and run 10-20x slower than one worker alone.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
TEST_CORES = "1" if XDIST_WORKER else "2"
SHARED_DATASETS = Path(
    os.environ.get("SEGFLOW_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (Kaggle layout), generated once per test session; treat as read-only."""
    root = tmp_path_factory.mktemp("demo") / "dataset"
    generate_demo_data(root, DemoDataOptions(n_train=80, n_test=30, seed=3))
    return root


@pytest.fixture(scope="session")
def demo_manifest(demo_dataset: Path):
    """The ingest manifest of ``demo_dataset`` (mask files as the source)."""
    from segflow.data.ingest import IngestOptions, ingest

    manifest, _ = ingest(
        IngestOptions(
            train_images=str(demo_dataset / "train/images"),
            test_images=str(demo_dataset / "test/images"),
            train_masks=str(demo_dataset / "train/masks"),
        )
    )
    return manifest


@pytest.fixture(scope="session")
def tgs_salt() -> Path:
    """The real Kaggle TGS Salt data; tests using it skip when ../shared is absent."""
    root = SHARED_DATASETS / "tgs-salt"
    if not (root / "train" / "images").is_dir():
        pytest.skip(f"real dataset not available at {root}")
    return root


@pytest.fixture(scope="session")
def isbi_membranes() -> Path:
    """The ISBI 2012 EM membrane data; tests using it skip when ../shared is absent."""
    root = SHARED_DATASETS / "isbi2012-membranes"
    if not (root / "images").is_dir():
        pytest.skip(f"real dataset not available at {root}")
    return root


WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles", "envs")
# The data section of the two-class (Severstal-style RLE CSV) runs on helpers' two-class dataset.
TWO_CLASS_DATA = {
    "train_images": "data/train/images",
    "test_images": "data/test",
    "mask_source": "rle_csv",
    "rle_csv": "data/train.csv",
    "rle_id_column": "ImageId",
    "rle_class_column": "ClassId",
    "rle_column": "EncodedPixels",
    "rle_missing_is_empty": True,
    "classes": ["1", "2"],
    "metadata_csv": None,
}
# The tests' tiny experiment: a 3-level Unet on mobilenet_v2 (random init), 1 epoch.
TINY_EXPERIMENT = {
    "model": {
        "arch": "Unet",
        "encoder": "mobilenet_v2",
        "extra": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    },
    "augment": "none",
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
}
# The post-processing grid of the tests' small workflow runs: 2 thresholds x 2 min areas.
SMALL_POSTPROCESS_GRID = {
    "thresholds": [0.4, 0.5],
    "min_areas": [0, 20],
    "fill_holes_options": [False],
    "gates": [0.5],
}
# What the data stages write under results/, besides ingest/manifest.parquet (whose image
# paths are absolute, so two runs' manifests are compared as tables, not bytes).
DATA_ARTIFACTS = (
    "ingest/summary.json",
    "dedup/items.parquet",
    "dedup/summary.json",
    "dedup/report.md",
    "preprocess/train_images.npy",
    "preprocess/train_masks.npy",
    "preprocess/test_images.npy",
    "preprocess/index.parquet",
    "preprocess/stats.json",
    "folds/folds.csv",
    "folds/summary.json",
)


def copy_workflow(destination: Path) -> Path:
    """Copy the workflow (not the package, not results) into ``destination`` to run it there."""
    import shutil

    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name)
        else:
            shutil.copy2(source, destination / name)
    return destination


def run_snakemake(workdir: Path, *args: str, check: bool = True, src: Path | None = None):
    """Run Snakemake in ``workdir`` with this checkout's package (or ``src``, a copy of the
    ``src`` folder) first on PYTHONPATH."""
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(src or REPO_ROOT / "src"), env.get("PYTHONPATH")])
    )
    # Rules call the `segflow` console script of the interpreter running the tests.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", TEST_CORES, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def _rule_counts(table: str) -> dict[str, int]:
    """Rule -> job count of Snakemake's "Job stats" table text (its total row left out)."""
    import re

    return {
        match.group(1): int(match.group(2))
        for match in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE)
        if match.group(1) != "total"
    }


def planned_jobs(workdir: Path, *args: str, src: Path | None = None) -> dict[str, int]:
    """Rule -> job count that a dry run would execute (empty when nothing is to be done)."""
    result = run_snakemake(workdir, "--dry-run", *args, src=src)
    output = result.stdout + result.stderr
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    return _rule_counts(table)


def run_job_counts(result) -> dict[str, int]:
    """Rule -> job count of the job table a real (not dry) run printed when it started: what
    it planned, read from the run itself instead of a dry run before it (the first table; a
    checkpoint's later re-evaluation may print more)."""
    output = result.stdout + result.stderr
    if "Job stats:" not in output:
        raise AssertionError(f"no job table in the run's output:\n{output[-2000:]}")
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return _rule_counts(table)


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless-capable Chromium; installed with apt-get (Debian ``chromium``) when missing
    and this is root on a Debian-like system, otherwise the test is skipped saying why."""
    import shutil
    import subprocess

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=900,
        )
        if found := shutil.which("chromium"):
            return found
    pytest.skip("no chromium on PATH and `apt-get install chromium` was not possible here")
