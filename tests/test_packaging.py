"""envs/segflow.yaml (for --use-conda) must install what pyproject.toml installs."""

from __future__ import annotations

import tomllib

import yaml
from conftest import REPO_ROOT


def test_conda_env_lists_the_same_packages_as_pyproject() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((REPO_ROOT / "envs" / "segflow.yaml").read_text())
    pip_section = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    pip_packages = [entry for entry in pip_section if not entry.startswith("-")]
    assert sorted(pip_packages) == sorted(pyproject["project"]["dependencies"])
    assert "--editable .." in pip_section  # segflow itself, from the checkout


def test_conda_env_python_matches_requires_python() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((REPO_ROOT / "envs" / "segflow.yaml").read_text())
    python = next(
        dep for dep in env["dependencies"] if isinstance(dep, str) and dep.startswith("python=")
    )
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def test_the_package_never_imports_snakemake() -> None:
    for path in (REPO_ROOT / "src" / "segflow").rglob("*.py"):
        text = path.read_text()
        assert "import snakemake" not in text and "from snakemake" not in text, path
