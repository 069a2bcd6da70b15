"""Shared fixtures: the generated demo dataset and the optional real datasets in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segflow.demo_data import DemoDataOptions, generate_demo_data

REPO_ROOT = Path(__file__).resolve().parents[1]
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
