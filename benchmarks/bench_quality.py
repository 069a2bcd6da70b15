"""Benchmark segflow's recipe quality: the pipeline vs a plain model, same wall clock, held-out data.

Run from the repository root::

    python benchmarks/bench_quality.py [--dataset demo|tgs] [--config FILE] [--seed S]
        [--holdout 0.2] [--minutes M] [--reference-minutes M] [--variant NAME=key=value,...]
        [--skip-pipeline --results DIR] [--skip-reference] [--tiny] [--out PATH]

What it does, in order:

1. **Data.** ``--dataset demo`` generates the project's demo data (``segflow demo-data`` with the
   recipe's ``demo`` section) into the work folder; ``--dataset tgs`` reads the Kaggle TGS Salt
   data (``train/images``, ``train/masks``, ``train.csv``, ``depths.csv``) from ``--tgs-dir``.
   Only the labelled training set is used.
2. **Split.** Every labelled image is hashed (decoded pixels' md5 and 64-bit pHash, as ingest
   does) and grouped by :func:`segflow.data.dedup.find_duplicates` with near-duplicates on, so exact
   copies and near-copies form one group. ``--holdout`` (20 %) of the images, whole groups at a
   time, seeded, become the held-out set. The rest is written as a dataset folder of its own
   (hard links or copies of the files; the masks of those images only) and the held-out images
   as its *test* set. Held-out masks are read only when everything has been predicted.
3. **Pipeline.** ``snakemake --profile profiles/default --configfile <generated> --cores 2``
   in a copy of the workflow: the recipe config with the data paths replaced, the demo off and
   ``results_dir`` in the work folder. Its wall clock is timed; ``final/submission.csv`` is
   decoded (the config's ``submission`` RLE convention) and scored on the held-out masks with
   the Kaggle TGS metric; its tuned OOF score is ``final/choice.json``'s ``tuned_oof_score``.
   Each ``--variant`` runs the pipeline again with config overrides and adds a row.
4. **Plain reference.** One smp model with the pipeline's :class:`~segflow.model.models.ModelSpec`
   (first experiment of ``run_experiments``; built after ``seed_all(train.seed)`` as the
   trainer does, so the same initial weights), BCE + Dice, Adam at the experiment's ``lr`` and
   ``batch_size``, random horizontal flips, images resized to the preprocess size and
   normalised as the pipeline's trainer does (:func:`segflow.model.pretrained.input_normalisation`:
   pretrained weights get their own normalisation, random ones the training images' mean/std), no
   folds. A 10 % validation split of the pipeline part (by group) picks the best epoch and the
   threshold (0.30..0.70), and is its OOF column. hflip TTA; held-out predictions resized back
   to the original size. It trains until the pipeline's wall clock (or
   ``--reference-minutes``) is used up, everything it does included: time is checked before
   each batch, and the time its held-out prediction will take (measured on the validation
   passes) is kept in reserve.
5. **All empty.** The constant empty prediction, scored the same way.

It prints one Markdown table (system | wall clock | held-out | OOF | notes) and writes it with
a JSON of every number, the seeds, the commands and the git commit to ``--out``
(``benchmarks/results/quality-<dataset>.{md,json}``; that folder is not tracked by git).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import yaml

from segflow.core.errors import SegflowError
from segflow.data.dedup import (
    DedupOptions,
    NearDuplicateOptions,
    find_duplicates,
    near_fold_groups,
)
from segflow.data.ingest import list_images
from segflow.data.preprocess import convert_channels, resize_image, resize_mask, to_uint8
from segflow.formats.imageio import decode_image, is_gray, perceptual_hash, pixel_md5, read_mask
from segflow.formats.rle import rle_decode
from segflow.model.experiment import parse_experiment
from segflow.model.metrics import kaggle_scores
from segflow.model.models import ModelSpec, build_model, forward_logits, padded_size

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
BASE_CONFIG = REPO_ROOT / "config" / "config.yaml"
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles", "envs")
SHARED_DATASETS = Path(
    os.environ.get("SEGFLOW_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)
DEFAULT_CONFIG = {"demo": "config/config.yaml", "tgs": "config/examples/tgs-salt.yaml"}
REFERENCE_THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
REFERENCE_VAL_FRACTION = 0.1
PREDICT_BATCH = 32
RUN_RECORD = "bench_quality_run.json"  # written into a pipeline run's results_dir
TINY_IMAGES = 60
# --tiny: the smallest pipeline that still runs every stage the recipe asks for but stacking.
TINY_OVERRIDES: dict[str, Any] = {
    "folds": {"n_folds": 2},
    "pseudo": {"rounds": 0},
    "stack": {"enabled": False},
    "postprocess": {
        "thresholds": [0.4, 0.5],
        "min_areas": [0, 20],
        "fill_holes_options": [False],
        "gates": [0.5],
    },
}


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


def log(message: str) -> None:
    print(f"[bench_quality] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``, mappings recursively (as Snakemake merges a
    ``--configfile`` over the Snakefile's ``configfile``)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def setting(config: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``path`` ``"a.b"``; ``default`` where a key is absent."""
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """Set ``config["a"]["b"] = value`` for ``path`` ``"a.b"``, creating mappings on the way."""
    *parents, last = path.split(".")
    node = config
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[last] = value


_VARIANT_ITEM = re.compile(r",(?=[A-Za-z_][\w-]*(?:\.[\w-]+)*=)")


@dataclass(frozen=True)
class Variant:
    """A pipeline run with config overrides (``--variant NAME=key.path=value,...``)."""

    name: str
    overrides: dict[str, Any]
    text: str


def parse_variant(text: str) -> Variant:
    """Parse ``NAME=key.path=value[,key.path=value]``; values are YAML (``true``, ``[1, 2]``).

    A comma starts a new item only where ``key.path=`` follows, so list values keep theirs.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest or not re.fullmatch(r"[\w.-]+", name):
        raise BenchError(f"--variant {text!r}: expected NAME=key.path=value[,key.path=value]")
    overrides: dict[str, Any] = {}
    for item in _VARIANT_ITEM.split(rest):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise BenchError(f"--variant {text!r}: {item!r} is not key.path=value")
        set_path(overrides, key, yaml.safe_load(value))
    return Variant(name, overrides, text)


def schema_has_budget(schema_path: Path = SCHEMA) -> bool:
    """Whether the config schema knows ``budget.minutes`` (a pipeline time cap)."""
    schema = yaml.safe_load(schema_path.read_text())
    budget = setting(schema, "properties.budget.properties", {}) or {}
    return "minutes" in budget


def experiments_to_run(config: Mapping[str, Any]) -> list[str]:
    """As the workflow decides: ``run_experiments``, or every configured experiment."""
    names = config.get("run_experiments") or list(config.get("experiments") or {})
    if not names:
        raise BenchError("the config has no experiments")
    return list(names)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class LabelledSet:
    """A labelled training set in Kaggle layout: images, and masks as files and/or RLE CSV."""

    name: str
    images: dict[str, Path]  # id -> image file
    masks_dir: Path | None
    rle_csv: Path | None
    metadata_csv: Path | None
    _mask_files: dict[str, Path] | None = None
    _rles: dict[str, str] | None = None

    @classmethod
    def open(cls, root: Path, name: str) -> LabelledSet:
        """The set at ``root``: ``train/images``, ``train/masks`` and/or ``train.csv``, and
        ``depths.csv`` or ``metadata.csv`` if present."""
        images, _ = list_images(root / "train" / "images", "train image")
        masks = root / "train" / "masks"
        csv = root / "train.csv"
        if not masks.is_dir() and not csv.is_file():
            raise BenchError(f"{root}: neither train/masks nor train.csv")
        metadata = next(
            (root / n for n in ("depths.csv", "metadata.csv") if (root / n).is_file()), None
        )
        return cls(
            name,
            images,
            masks if masks.is_dir() else None,
            csv if csv.is_file() else None,
            metadata,
        )

    def subset(self, ids: Sequence[str]) -> LabelledSet:
        return LabelledSet(
            self.name,
            {i: self.images[i] for i in ids},
            self.masks_dir,
            self.rle_csv,
            self.metadata_csv,
        )

    def mask(self, item_id: str, shape: tuple[int, int]) -> np.ndarray:
        """The binary mask of one image, uint8 {0, 1}: from the mask file (8- or 16-bit), else
        from the RLE CSV (Kaggle convention: column-major, 1-based)."""
        if self.masks_dir is not None:
            if self._mask_files is None:
                self._mask_files, _ = list_images(self.masks_dir, "train mask")
            mask = read_mask(self._mask_files[item_id])
        else:
            if self._rles is None:
                table = pd.read_csv(self.rle_csv, dtype=str, keep_default_na=False)
                self._rles = dict(zip(table["id"], table["rle_mask"], strict=True))
            mask = rle_decode(self._rles[item_id], shape, where=f"{self.rle_csv} {item_id}")
        if mask.shape != shape:
            raise BenchError(f"mask of {item_id} is {mask.shape}, its image {shape}")
        return mask


def make_demo_dataset(out: Path, config: Mapping[str, Any], n_train: int | None) -> Path:
    """``segflow demo-data`` with the config's ``demo`` section (``n_train`` overriding)."""
    demo = {k: v for k, v in (config.get("demo") or {}).items() if k not in ("enabled", "out_dir")}
    if n_train is not None:
        demo["n_train"] = n_train
        demo["n_test"] = 8  # unused: the held-out part of train is the test set
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in sorted(demo.items())]
    command = [sys.executable, "-m", "segflow", "demo-data", str(out), *flags]
    log(f"generating the demo dataset: {' '.join(command[1:])}")
    subprocess.run(command, check=True, env=_segflow_env(), capture_output=True, text=True)
    return out


def image_groups(images: Mapping[str, Path], near_max_distance: int = 4) -> dict[str, str]:
    """id -> duplicate group: exact copies (same decoded pixels, whatever the encoding) and
    near-copies (pHash within ``near_max_distance`` bits, chained) share a group.

    The same hashes ingest records, grouped by :func:`segflow.data.dedup.find_duplicates`; every
    image is given to it as unlabelled, so no mask is read.
    """
    rows = []
    for item_id, path in sorted(images.items()):
        image = decode_image(path)
        rows.append(
            {
                "id": item_id,
                "split": "test",
                "md5_bytes": image.md5_bytes,
                "md5_pixels": pixel_md5(image.pixels),
                "mask_md5": None,
                "phash": f"{perceptual_hash(image.pixels):016x}",
            }
        )
    manifest = pd.DataFrame(rows)
    items, _ = find_duplicates(manifest, DedupOptions())
    near = NearDuplicateOptions(near_duplicates=True, near_max_distance=near_max_distance)
    groups, _ = near_fold_groups(manifest, items, near)
    return dict(zip(groups["id"], groups["fold_group"], strict=True))


def split_by_group(
    groups: Mapping[str, str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split ids into (kept, held out) with about ``fraction`` held out, whole groups only.

    Groups are visited in a seeded random order; a group is held out while that brings the
    held-out count closer to ``round(fraction * n)`` (a group that would overshoot by more than
    the remaining shortfall is skipped), so the count is exact whenever small groups remain.

    Args:
        groups: id -> group.
        fraction: share to hold out, in (0, 1).
        seed: seed of the group order.

    Returns:
        (kept ids, held-out ids), each sorted.
    """
    if not 0 < fraction < 1:
        raise BenchError(f"the held-out fraction must be in (0, 1), got {fraction}")
    members: dict[str, list[str]] = {}
    for item_id, group in groups.items():
        members.setdefault(group, []).append(item_id)
    names = sorted(members)
    target = round(fraction * len(groups))
    if target < 1 or target >= len(groups):
        raise BenchError(f"{len(groups)} images: cannot hold out {fraction:.0%} of them")
    held: list[str] = []
    for index in np.random.default_rng(seed).permutation(len(names)):
        if len(held) == target:
            break
        group = members[names[index]]
        if len(held) + len(group) - target < target - len(held):
            held.extend(group)
    held_set = set(held)
    kept = sorted(i for i in groups if i not in held_set)
    return kept, sorted(held)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or hard links to others' files not allowed
        shutil.copyfile(source, target)


@dataclass(frozen=True)
class PipelineData:
    """The pipeline's dataset folder: the kept images as train, the held-out ones as test."""

    train_images: Path
    test_images: Path
    mask_source: str
    train_masks: Path | None
    rle_csv: Path | None
    metadata_csv: Path | None


def write_pipeline_dataset(
    out: Path, data: LabelledSet, kept: Sequence[str], held_out: Sequence[str], mask_source: str
) -> PipelineData:
    """Write the dataset the pipeline sees: images linked (or copied), masks of kept ids only.

    ``mask_source`` is the recipe's (``folder`` or ``rle_csv``); where the data lacks that
    form, the other one is used.
    """
    if mask_source == "folder" and data.masks_dir is None:
        mask_source = "rle_csv"
    if mask_source == "rle_csv" and data.rle_csv is None:
        mask_source = "folder"
    for split, ids in (("train", kept), ("test", held_out)):
        for item_id in ids:
            path = data.images[item_id]
            _link_or_copy(path, out / split / "images" / path.name)
    train_masks = rle_csv = None
    if mask_source == "folder" and data.masks_dir is not None:
        train_masks = out / "train" / "masks"
        mask_files, _ = list_images(data.masks_dir, "train mask")
        for item_id in kept:
            _link_or_copy(mask_files[item_id], train_masks / mask_files[item_id].name)
    elif data.rle_csv is not None:
        table = pd.read_csv(data.rle_csv, dtype=str, keep_default_na=False)
        rle_csv = out / "train.csv"
        table[table["id"].isin(set(kept))].to_csv(rle_csv, index=False)
    return PipelineData(
        out / "train" / "images",
        out / "test" / "images",
        mask_source,
        train_masks,
        rle_csv,
        data.metadata_csv,
    )


def pipeline_config(
    recipe: Mapping[str, Any],
    data: PipelineData,
    results_dir: Path,
    overrides: Mapping[str, Any],
    minutes: float | None,
) -> dict[str, Any]:
    """The recipe with the data paths replaced, the demo off and results in ``results_dir``."""
    config = deep_merge(recipe, overrides)
    config["results_dir"] = str(results_dir)
    config["demo"] = {**(config.get("demo") or {}), "enabled": False}
    had_metadata = setting(deep_merge(_base_config(), recipe), "data.metadata_csv") is not None
    config["data"] = {
        **(config.get("data") or {}),
        "train_images": str(data.train_images),
        "test_images": str(data.test_images),
        "mask_source": data.mask_source,
        "train_masks": str(data.train_masks) if data.train_masks else None,
        "mask_suffix": "",
        "rle_csv": str(data.rle_csv) if data.rle_csv else None,
        "rle_id_column": "id",
        "rle_column": "rle_mask",
        "rle_order": "column",
        "rle_start": 1,
        "metadata_csv": str(data.metadata_csv.resolve())
        if had_metadata and data.metadata_csv
        else None,
        "data_root": None,
    }
    if minutes is not None:
        config["budget"] = {**(config.get("budget") or {}), "minutes": minutes}
    return config


def _base_config() -> dict[str, Any]:
    return yaml.safe_load(BASE_CONFIG.read_text()) or {}


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def _segflow_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")])
    )
    # Rules call the `segflow` console script of this interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class PipelineRun:
    """One pipeline run (or an existing one, ``--skip-pipeline``)."""

    name: str
    results_dir: Path
    wall_s: float | None
    command: list[str]
    config: dict[str, Any]
    choice: dict[str, Any] = field(default_factory=dict)


def run_pipeline(
    name: str, slug: str, config: dict[str, Any], work: Path, cores: int, results_dir: Path
) -> PipelineRun:
    """Run the workflow (a copy of it, in ``work``) on ``config``; time its wall clock.

    ``name`` is the row's name, ``slug`` the file-name-safe form used for the config and log.
    """
    workflow = work / "workflow-copy"
    if not workflow.exists():
        workflow.mkdir(parents=True)
        for item in WORKFLOW_FILES:
            source = REPO_ROOT / item
            if source.is_dir():
                shutil.copytree(source, workflow / item)
            else:
                shutil.copy2(source, workflow / item)
    config_path = work / f"config-{slug}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/default",
        "--configfile",
        str(config_path),
        "--cores",
        str(cores),
    ]
    log_path = work / f"snakemake-{slug}.log"
    log(f"pipeline {name!r}: {' '.join(command[1:])} (log {log_path})")
    started = time.perf_counter()
    with log_path.open("w") as out:
        result = subprocess.run(
            command, cwd=workflow, env=_segflow_env(), stdout=out, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        raise BenchError(f"pipeline {name!r} failed (exit {result.returncode}):\n{tail}")
    run = PipelineRun(name, results_dir, wall, command, config)
    record = {"name": name, "wall_s": wall, "command": command, "config": config}
    (results_dir / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str))
    log(f"pipeline {name!r}: {wall:.0f} s")
    return run


def existing_run(results_dir: Path) -> PipelineRun:
    """A finished run to score (``--skip-pipeline``); its wall clock if this script ran it."""
    if not (results_dir / "final" / "submission.csv").is_file():
        raise BenchError(f"{results_dir}: no final/submission.csv (not a finished segflow run)")
    record_path = results_dir / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return PipelineRun(
        record.get("name", "pipeline"),
        results_dir,
        record.get("wall_s"),
        record.get("command", []),
        record.get("config", {}),
    )


def read_choice(results_dir: Path) -> dict[str, Any]:
    """``final/choice.json``: the submitted candidate and its tuned OOF score."""
    path = results_dir / "final" / "choice.json"
    if not path.is_file():
        raise BenchError(f"{path} is missing")
    return json.loads(path.read_text())


def read_submission(
    path: Path,
    shapes: Mapping[str, tuple[int, int]],
    id_column: str = "id",
    rle_column: str = "rle_mask",
    rle_order: str = "column",
    rle_start: int = 1,
) -> dict[str, np.ndarray]:
    """Decode a binary submission CSV into one mask per expected id.

    Ids written as file names (``id_style: filename``) are matched by their stem; several rows
    of one id (``instances``) are unioned.

    Args:
        path: the submission CSV.
        shapes: id -> (height, width) of every image the submission must cover.
        id_column, rle_column, rle_order, rle_start: the config's ``submission`` convention.

    Returns:
        id -> uint8 {0, 1} mask of that shape.

    Raises:
        BenchError: a class column (multi-label), an unknown id, or an id without a row.
    """
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in (id_column, rle_column):
        if column not in table.columns:
            raise BenchError(f"{path}: no column {column!r} (columns: {list(table.columns)})")
    if len(table.columns) != 2:
        raise BenchError(f"{path}: expected 2 columns (binary masks), got {list(table.columns)}")
    masks: dict[str, np.ndarray] = {}
    for written, rle in zip(table[id_column], table[rle_column], strict=True):
        item_id = written if written in shapes else Path(written).stem
        if item_id not in shapes:
            raise BenchError(f"{path}: id {written!r} is not a held-out image (another split?)")
        mask = rle_decode(
            rle, shapes[item_id], order=rle_order, start=rle_start, where=f"{path} {written}"
        )
        masks[item_id] = masks[item_id] | mask if item_id in masks else mask
    missing = sorted(set(shapes) - set(masks))
    if missing:
        raise BenchError(f"{path}: no row for {len(missing)} held-out image(s), e.g. {missing[0]}")
    return masks


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def mean_kaggle(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """Mean per-image Kaggle TGS score; images may differ in size."""
    if len(preds) != len(truths) or not preds:
        raise BenchError(f"{len(preds)} predictions for {len(truths)} masks")
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, truth in enumerate(truths):
        by_shape.setdefault(truth.shape, []).append(index)
    total = 0.0
    for indices in by_shape.values():
        pred = np.stack([preds[i] != 0 for i in indices])
        truth = np.stack([truths[i] != 0 for i in indices])
        total += float(kaggle_scores(pred, truth).sum())
    return total / len(truths)


def score(predicted: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> float:
    """Mean Kaggle score of ``predicted`` over every id of ``truth``."""
    ids = sorted(truth)
    return mean_kaggle([predicted[i] for i in ids], [truth[i] for i in ids])


def choose_threshold(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    thresholds: Sequence[float] = REFERENCE_THRESHOLDS,
) -> tuple[float, float]:
    """The threshold with the best mean Kaggle score on (``probs``, ``truths``); the lowest one
    on a tie.

    Args:
        probs: probability maps at the masks' size.
        truths: binary masks.
        thresholds: candidates.

    Returns:
        (threshold, its score).
    """
    best = (float(thresholds[0]), -1.0)
    for threshold in thresholds:
        value = mean_kaggle([p > threshold for p in probs], truths)
        if value > best[1]:
            best = (float(threshold), value)
    return best


# --------------------------------------------------------------------------------------------
# Plain reference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSpec:
    """What the plain reference trains (everything from the pipeline's recipe)."""

    model: ModelSpec
    seed: int
    height: int
    width: int
    batch_size: int
    lr: float
    budget_s: float
    max_epochs: int | None = None
    thresholds: tuple[float, ...] = REFERENCE_THRESHOLDS
    device: str = "auto"


@dataclass
class ReferenceResult:
    """The trained reference: chosen epoch and threshold, validation score, predictions."""

    threshold: float
    best_epoch: int
    val_score: float
    epochs: int
    steps: int
    wall_s: float
    history: list[dict[str, float]]
    heldout: dict[str, np.ndarray]  # id -> predicted mask at the original size
    device: str
    mean: list[float]
    std: list[float]


def load_pixels(path: Path, channels: int) -> np.ndarray:
    """An image as uint8 (H, W, channels), as preprocess converts it (no CLAHE: plain)."""
    return to_uint8(convert_channels(decode_image(path).pixels, channels))


def infer_channels(images: Mapping[str, Path], setting_value: Any) -> int:
    """preprocess.channels: ``1``/``3``, or ``auto`` (1 when every image is gray)."""
    if str(setting_value) in ("1", "3"):
        return int(setting_value)
    return 1 if all(is_gray(decode_image(p).pixels) for p in images.values()) else 3


def _to_tensor(images: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    stacked = np.stack(images).astype(np.float32) / 255.0  # (N, H, W, C)
    return torch.from_numpy(((stacked - mean) / std).transpose(0, 3, 1, 2).copy())


def predict_probs(
    model: torch.nn.Module,
    images: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    device: torch.device,
) -> list[np.ndarray]:
    """hflip-TTA probabilities, resized back to each image's original (height, width).

    Shape:
        images: (N, C, h, w) normalised; output: N maps of sizes[i].
    """
    from segflow.model.datasets import crop_to, pad_to_size
    from segflow.model.inference.tta import predict_with_tta

    model.eval()
    height, width = images.shape[-2:]
    padded = padded_size(model, height, width)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return crop_to(forward_logits(model, pad_to_size(x, *padded)[0]), height, width).sigmoid()

    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(images), PREDICT_BATCH):
            batch = images[start : start + PREDICT_BATCH].to(device)
            probs = predict_with_tta(predict, batch, "hflip")[:, 0].float().cpu().numpy()
            for prob, (h, w) in zip(probs, sizes[start : start + len(probs)], strict=True):
                out.append(cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR))
    model.train()
    return out


def train_reference(
    train: LabelledSet,
    val: LabelledSet,
    heldout_images: Mapping[str, Path],
    spec: ReferenceSpec,
    channels: int,
    clock: Callable[[], float] = time.perf_counter,
) -> ReferenceResult:
    """Train the plain reference within ``spec.budget_s`` and predict the held-out images.

    It never sees a held-out mask: only the held-out image files. The budget covers everything
    here (reading images, training, validation, the held-out prediction): training stops
    before a batch once ``budget - reserve`` has passed, where the reserve is the held-out
    prediction's time estimated from the last validation pass.

    Args:
        train: its training images and masks.
        val: its validation split (best epoch and threshold; its OOF score).
        heldout_images: id -> image file to predict.
        spec: model, optimiser, size and budget.
        channels: input channels (the pipeline's preprocess.channels decision).
        clock: seconds (tests may pass a fake).

    Returns:
        The result, held-out predictions included.
    """
    from segflow.core.devices import resolve_device
    from segflow.model.datasets import crop_to, pad_to_size, safe_std
    from segflow.model.pretrained import input_normalisation
    from segflow.model.training.fold_data import seed_all
    from segflow.model.training.losses import build_loss

    started = clock()
    device = resolve_device(spec.device)
    size = (spec.height, spec.width)

    def prepared(data: LabelledSet) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        ids = sorted(data.images)
        pixels = [load_pixels(data.images[i], channels) for i in ids]
        masks = [data.mask(i, p.shape[:2]) for i, p in zip(ids, pixels, strict=True)]
        return ids, pixels, masks

    _, train_pixels, train_masks = prepared(train)
    _, val_pixels, val_masks = prepared(val)
    resized = [resize_image(p, *size) for p in train_pixels]
    scaled = np.stack(resized).astype(np.float64) / 255.0
    # The trainer's choice: pretrained weights get their own normalisation, others the data's.
    data_mean, data_std = input_normalisation(
        spec.model, scaled.mean(axis=(0, 1, 2)), safe_std(scaled.std(axis=(0, 1, 2)))
    )
    mean = np.asarray(data_mean, dtype=np.float32)
    std = np.asarray(data_std, dtype=np.float32)
    x_train = _to_tensor(resized, mean, std)
    y_train = torch.from_numpy(np.stack([resize_mask(m, *size) for m in train_masks])[:, None])
    y_train = y_train.float()
    x_val = _to_tensor([resize_image(p, *size) for p in val_pixels], mean, std)
    val_sizes = [m.shape for m in val_masks]

    seed_all(spec.seed)  # the trainer's order: seed, then build -> the same initial weights
    model = build_model(spec.model).to(device)
    model.train()
    padded = padded_size(model, *size)
    loss_fn = build_loss({"bce": 1.0, "dice": 1.0}, mode="binary")
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed)

    history: list[dict[str, float]] = []
    best: tuple[float, int, float, dict[str, torch.Tensor]] | None = None
    reserve = 0.0
    deadline = started + spec.budget_s
    epoch = steps = 0
    out_of_time = False
    while not out_of_time and (spec.max_epochs is None or epoch < spec.max_epochs):
        epoch += 1
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        for start in range(0, len(order), spec.batch_size):
            index = order[start : start + spec.batch_size]
            if len(index) < 2:  # BatchNorm cannot train on one image
                continue
            if steps and clock() >= deadline - reserve:
                out_of_time = True
                break
            images, masks = x_train[index], y_train[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
            images, masks = images.to(device), masks.to(device)
            logits = forward_logits(model, pad_to_size(images, *padded)[0])
            loss = loss_fn(crop_to(logits, *size), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
        if not losses:
            epoch -= 1
            break
        val_started = clock()
        probs = predict_probs(model, x_val, val_sizes, device)
        threshold, value = choose_threshold(probs, val_masks, spec.thresholds)
        per_image = (clock() - val_started) / max(len(x_val), 1)
        reserve = per_image * len(heldout_images) * 1.2  # +20 %: reading the files too
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_kaggle": value,
                "threshold": threshold,
                "partial": float(out_of_time),
                "elapsed_s": clock() - started,
            }
        )
        log(
            f"reference epoch {epoch}: loss {np.mean(losses):.4f}, val {value:.4f} at "
            f"{threshold:.2f}, {clock() - started:.0f}/{spec.budget_s:.0f} s"
        )
        if best is None or value > best[0]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (value, epoch, threshold, state)
    if best is None:
        raise BenchError("the reference trained no batch (too few training images?)")
    value, best_epoch, threshold, state = best
    model.load_state_dict(state)
    ids = sorted(heldout_images)
    pixels = [load_pixels(heldout_images[i], channels) for i in ids]
    x_held = _to_tensor([resize_image(p, *size) for p in pixels], mean, std)
    probs = predict_probs(model, x_held, [p.shape[:2] for p in pixels], device)
    heldout = {i: (p > threshold).astype(np.uint8) for i, p in zip(ids, probs, strict=True)}
    return ReferenceResult(
        threshold,
        best_epoch,
        value,
        epoch,
        steps,
        clock() - started,
        history,
        heldout,
        str(device),
        mean.tolist(),
        std.tolist(),
    )


def reference_spec(
    config: Mapping[str, Any],
    data: LabelledSet,
    channels: int,
    budget_s: float,
    max_epochs: int | None,
) -> tuple[str, ReferenceSpec]:
    """The reference's spec from the effective config: its first run experiment's ModelSpec,
    seed, lr and batch size; the preprocess size (null: the images' common size)."""
    name = experiments_to_run(config)[0]
    experiment = parse_experiment(
        name, dict(config["experiments"][name]), in_channels=channels, classes=1
    )
    height = setting(config, "preprocess.height")
    width = setting(config, "preprocess.width")
    if height is None or width is None:
        shapes = {decode_image(p).pixels.shape[:2] for p in data.images.values()}
        if len(shapes) != 1:
            raise BenchError(f"images of {len(shapes)} sizes: set preprocess.height/width")
        common = shapes.pop()
        height, width = height or common[0], width or common[1]
    return name, ReferenceSpec(
        model=experiment.model,
        seed=experiment.train.seed,
        height=int(height),
        width=int(width),
        batch_size=experiment.train.batch_size,
        lr=experiment.train.lr,
        budget_s=budget_s,
        max_epochs=max_epochs,
        device=experiment.train.device,
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    wall_s: float | None
    heldout: float | None
    oof: float | None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| system | wall clock | held-out score | OOF score | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = [row.system, _clock(row.wall_s), _score(row.heldout), _score(row.oof), row.notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _dataset_root(args: argparse.Namespace, work: Path, recipe: Mapping[str, Any]) -> Path:
    if args.dataset == "demo":
        return make_demo_dataset(
            work / "dataset", deep_merge(_base_config(), recipe), TINY_IMAGES if args.tiny else None
        )
    root = args.tgs_dir or SHARED_DATASETS / "tgs-salt"
    if not (root / "train" / "images").is_dir():
        raise BenchError(f"{root}: no train/images (pass --tgs-dir)")
    return root


def run(args: argparse.Namespace, work: Path) -> int:
    """The whole benchmark; writes the report to ``args.out``."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    torch.set_num_threads(args.cores)  # as the pipeline's jobs under --cores
    config_path = args.config or REPO_ROOT / DEFAULT_CONFIG[args.dataset]
    recipe = yaml.safe_load(Path(config_path).read_text()) or {}
    if args.tiny:
        name = experiments_to_run(deep_merge(_base_config(), recipe))[0]
        tiny = {
            **TINY_OVERRIDES,
            "run_experiments": [name],
            "experiments": {name: {"train": {"epochs": 1, "batch_size": 8}}},
        }
        recipe = deep_merge(recipe, tiny)
    budget_supported = schema_has_budget()
    if args.minutes is not None and not budget_supported:
        log(
            "WARNING: --minutes is ignored: the config schema has no budget.minutes key, "
            "so the pipeline runs uncapped"
        )
    minutes = args.minutes if budget_supported else None

    data = LabelledSet.open(_dataset_root(args, work, recipe), args.dataset)
    if args.tiny and len(data.images) > TINY_IMAGES:
        chosen = np.random.default_rng(args.seed).choice(
            sorted(data.images), TINY_IMAGES, replace=False
        )
        data = data.subset(sorted(chosen.tolist()))
    effective = deep_merge(_base_config(), recipe)
    near = int(setting(effective, "dedup.near_max_distance", 4))
    log(f"grouping {len(data.images)} labelled images (exact + pHash <= {near})...")
    groups = image_groups(data.images, near)
    kept, held_out = split_by_group(groups, args.holdout, args.seed)
    ref_groups = {i: groups[i] for i in kept}
    ref_train, ref_val = split_by_group(ref_groups, REFERENCE_VAL_FRACTION, args.seed + 1)
    n_groups = len(set(groups.values()))
    log(f"{len(kept)} pipeline / {len(held_out)} held-out images ({n_groups} groups)")
    heldout_images = {i: data.images[i] for i in held_out}
    shapes = {i: decode_image(p).pixels.shape[:2] for i, p in heldout_images.items()}

    # ---- pipeline runs (predictions only; held-out masks are read after all predictions)
    runs: list[PipelineRun] = []
    variants = [parse_variant(text) for text in args.variant]
    if len({v.name for v in variants}) != len(variants):
        raise BenchError("--variant names must differ")
    failed: list[str] = []
    planned = [] if args.skip_pipeline else [("pipeline", {})]
    planned += [(f"pipeline: {v.name}", v.overrides) for v in variants]
    if args.skip_pipeline:
        runs.append(existing_run(args.results))
    if planned:
        mask_source = setting(effective, "data.mask_source", "folder")
        pipeline_data = write_pipeline_dataset(
            work / "pipeline-data", data, kept, held_out, mask_source
        )
        for name, overrides in planned:
            slug = re.sub(r"\W+", "-", name).strip("-")
            results_dir = work / "results" / slug
            config = pipeline_config(recipe, pipeline_data, results_dir, overrides, minutes)
            try:
                runs.append(run_pipeline(name, slug, config, work, args.cores, results_dir))
            except BenchError as error:
                if not runs and not args.skip_pipeline:
                    raise  # the recipe itself failed: nothing to compare against
                # A variant that fails is a row that says so; the other rows still count.
                log(f"{error}")
                failed.append(name)
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for pipeline in runs:
        run_config = deep_merge(effective, pipeline.config) if pipeline.config else effective
        sub = run_config.get("submission") or {}
        predictions[pipeline.name] = read_submission(
            pipeline.results_dir / "final" / "submission.csv",
            shapes,
            sub.get("id_column", "id"),
            sub.get("rle_column", "rle_mask"),
            sub.get("rle_order", "column"),
            int(sub.get("rle_start", 1)),
        )
        pipeline.choice = read_choice(pipeline.results_dir)

    # ---- plain reference
    reference: ReferenceResult | None = None
    reference_info: dict[str, Any] = {}
    if not args.skip_reference:
        if args.reference_minutes is not None:
            budget_s = args.reference_minutes * 60
        elif runs and runs[0].wall_s is not None:
            budget_s = runs[0].wall_s
        else:
            raise BenchError("no pipeline wall clock known: pass --reference-minutes")
        channels = infer_channels(data.images, setting(effective, "preprocess.channels", "auto"))
        experiment, spec = reference_spec(
            effective, data, channels, budget_s, 1 if args.tiny else None
        )
        log(
            f"reference: {spec.model.arch}/{spec.model.encoder} ({experiment!r}) at "
            f"{spec.height}x{spec.width}, budget {budget_s:.0f} s, "
            f"{len(ref_train)} train / {len(ref_val)} val"
        )
        reference = train_reference(
            data.subset(ref_train), data.subset(ref_val), heldout_images, spec, channels
        )
        reference_info = {
            "experiment": experiment,
            "spec": {**asdict(spec), "model": asdict(spec.model)},
            "channels": channels,
            "n_train": len(ref_train),
            "n_val": len(ref_val),
            **{k: v for k, v in asdict(reference).items() if k != "heldout"},
        }

    # ---- scoring: the held-out masks are read only now
    truth = {i: data.mask(i, shapes[i]) for i in held_out}
    rows: list[Row] = []
    for pipeline in runs:
        choice = pipeline.choice
        rows.append(
            Row(
                pipeline.name,
                pipeline.wall_s,
                score(predictions[pipeline.name], truth),
                choice.get("tuned_oof_score"),
                f"submits {choice.get('candidate')} round {choice.get('round')}",
                {
                    "results_dir": str(pipeline.results_dir),
                    "command": pipeline.command,
                    "choice": choice,
                    "config": pipeline.config,
                },
            )
        )
    rows += [Row(name, None, None, None, "failed: see its snakemake log") for name in failed]
    if reference is not None:
        rows.append(
            Row(
                "plain reference",
                reference.wall_s,
                score(reference.heldout, truth),
                reference.val_score,
                f"{reference.epochs} epoch(s), {reference.steps} steps"
                f"{' (--tiny: 1 epoch at most)' if args.tiny else ''}; best epoch "
                f"{reference.best_epoch}, threshold {reference.threshold:.2f}",
                reference_info,
            )
        )
    empty = {i: np.zeros(s, dtype=np.uint8) for i, s in shapes.items()}
    rows.append(Row("all empty", None, score(empty, truth), None, "constant empty masks"))

    table = markdown_table(rows)
    header = (
        f"# segflow quality benchmark: {args.dataset}\n\n"
        f"- config `{config_path}`{' (--tiny)' if args.tiny else ''}; seed {args.seed}\n"
        f"- {len(data.images)} labelled images: {len(kept)} pipeline, {len(held_out)} held out "
        f"({args.holdout:.0%} by dedup group, {n_groups} groups); reference "
        f"{len(ref_train)} train / {len(ref_val)} validation\n"
        f"- Kaggle TGS metric (mean per image of precision over IoU 0.50..0.95)\n"
        f"- {args.cores} cores; git {git_state()['commit']}; {started_at}\n"
    )
    report = f"{header}\n{table}\n"
    print(report)
    payload = {
        "dataset": args.dataset,
        "config": str(config_path),
        "tiny": args.tiny,
        "seed": args.seed,
        "holdout": args.holdout,
        "reference_val_fraction": REFERENCE_VAL_FRACTION,
        "near_max_distance": near,
        "minutes": args.minutes,
        "minutes_applied": minutes is not None,
        "cores": args.cores,
        "n_images": len(data.images),
        "n_pipeline": len(kept),
        "n_heldout": len(held_out),
        "n_groups": n_groups,
        "heldout_ids": held_out,
        "rows": [asdict(row) for row in rows],
        "variants": [v.text for v in variants],
        "command": [sys.executable, *sys.argv],
        "git": git_state(),
        "machine": {
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "started_at": started_at,
    }
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"quality-{args.dataset}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=_json_value))
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="bench_quality.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--dataset", choices=("demo", "tgs"), default="demo")
    parser.add_argument(
        "--config",
        type=Path,
        help="recipe config (default: config/config.yaml for demo, "
        "config/examples/tgs-salt.yaml for tgs)",
    )
    parser.add_argument(
        "--tgs-dir",
        type=Path,
        help=f"TGS Salt data (default: {SHARED_DATASETS / 'tgs-salt'}; "
        "$SEGFLOW_SHARED_DATASETS/tgs-salt)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="held-out share, by dedup group (default: 0.2)"
    )
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores; torch threads")
    parser.add_argument(
        "--minutes",
        type=float,
        help="cap the pipeline (config budget.minutes; only where the schema has that key)",
    )
    parser.add_argument(
        "--reference-minutes",
        type=float,
        help="the reference's budget (default: the pipeline's wall clock)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=key.path=value[,key.path=value]",
        help="also run the pipeline with these config overrides (repeatable); one row each",
    )
    parser.add_argument(
        "--skip-pipeline", action="store_true", help="score an existing run (--results)"
    )
    parser.add_argument("--results", type=Path, help="results_dir of the run to score")
    parser.add_argument("--skip-reference", action="store_true", help="no plain reference")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke mode: {TINY_IMAGES} images, 2 folds, 1 epoch, no stacking; reference 1 epoch",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep the runs here (default: a temporary folder, removed)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="report path without suffix (default: benchmarks/results/quality-<dataset>)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.skip_pipeline and args.results is None:
        print("bench_quality.py: --skip-pipeline needs --results DIR", file=sys.stderr)
        return 2
    if args.cores < 1:
        print("bench_quality.py: --cores must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            return run(args, args.work_dir.resolve())
        with tempfile.TemporaryDirectory(prefix="segflow-bench-quality-") as tmp:
            return run(args, Path(tmp))
    except (BenchError, SegflowError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or ""
        print(f"bench_quality.py: error: {error}\n{detail}".rstrip(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
