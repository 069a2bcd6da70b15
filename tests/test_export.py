"""segflow export and predict-bundle (issue 16): the final choice as a self-contained zip, run
offline on a folder of images with the pipeline's own outputs.

One tiny workflow run (1 experiment trained on fold 0 of 2 -- ``folds.train_folds`` -- 1 epoch,
32x32 inputs, both stacked candidates, the gate with per-image thresholds) is shared by the
module; its ``export_bundle`` rule writes
the bundle. Bad bundles and bad images are refused
with one ``segflow predict-bundle: error: ...`` line and nothing written.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import SMALL_POSTPROCESS_GRID, copy_workflow, run_snakemake

from segflow import __version__, cli
from segflow.bundle.archive import (
    BUNDLE_VERSION,
    MANIFEST,
    Bundle,
    flat_states,
    split_states,
    version_tuple,
)
from segflow.bundle.export import export
from segflow.bundle.predict_bundle import BundlePredictor, predict_bundle
from segflow.core.errors import SegflowError
from segflow.data.preprocess import PreprocessOptions, prepare_image
from segflow.formats.imageio import DicomWindow, decode_image
from segflow.formats.rle import rle_encode
from segflow.model.inference.predict import PredictOptions
from segflow.model.submit import SubmissionOptions, train_label

TINY = {
    "demo": {"n_train": 40, "n_test": 16, "seed": 5},
    # One trained fold: the bundle carries what was trained, one model or five alike.
    "folds": {"n_folds": 2, "train_folds": [0]},
    "preprocess": {"height": 32, "width": 32},
    "run_experiments": ["unet_lite0"],
    "experiments": {"unet_lite0": {"train": {"epochs": 1, "batch_size": 8}}},
    "pseudo": {"rounds": 0},
    "stack": {"pixels_per_image": 16, "threshold_target": True},
    "predict": {"tta": "hflip"},
    "postprocess": SMALL_POSTPROCESS_GRID,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workflow run once on a tiny demo, up to its export bundle and the submissions the
    bundle must reproduce."""
    workdir = copy_workflow(tmp_path_factory.mktemp("export"))
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run_snakemake(
        workdir,
        "results/export/bundle.zip",
        "results/final/submission.csv",
        "results/submission/ensemble/round0/submission.csv",
        "results/submission/stack_gate/round0/submission.csv",
        "results/submission/stack_pixel/round0/submission.csv",
        "--configfile",
        "tiny.yaml",
    )
    return workdir


def _test_images(workdir: Path) -> Path:
    return workdir / "resources" / "demo" / "test" / "images"


def _metadata_csv(workdir: Path) -> Path:
    return workdir / "resources" / "demo" / "metadata.csv"


def _cli(*args: str) -> int:
    return cli.main([*map(str, args)])


def test_bundle_reproduces_the_final_submission_byte_for_byte(
    tiny_run: Path, tmp_path: Path
) -> None:
    results = tiny_run / "results"
    out = tmp_path / "submission.csv"
    assert _cli(
        "predict-bundle", results / "export" / "bundle.zip", _test_images(tiny_run), out,
        "--device", "cpu", "--metadata", _metadata_csv(tiny_run),
    ) == 0  # fmt: skip
    assert out.read_bytes() == (results / "final" / "submission.csv").read_bytes()
    bundle = Bundle(results / "export" / "bundle.zip")
    choice = json.loads((results / "final" / "choice.json").read_text())
    assert bundle.config["candidate"] == {"name": choice["candidate"], "round": choice["round"]}
    assert bundle.manifest["segflow_version"] == __version__
    assert bundle.manifest["bundle_version"] == BUNDLE_VERSION


def test_ensemble_bundle_reproduces_the_ensemble_submission(tiny_run: Path, tmp_path: Path) -> None:
    results = tiny_run / "results"
    zip_path = tmp_path / "ensemble.zip"
    assert _cli(
        "export", results, zip_path, "--candidate", "ensemble:0", "--tta", "hflip",
    ) == 0  # fmt: skip
    out = tmp_path / "submission.csv"
    predict_bundle(zip_path, _test_images(tiny_run), out, device="cpu")
    expected = results / "submission" / "ensemble" / "round0" / "submission.csv"
    assert out.read_bytes() == expected.read_bytes()


def test_exact_train_duplicates_get_the_train_label(tiny_run: Path, tmp_path: Path) -> None:
    """The leak copy: each test image the leaks stage linked to train images is written with
    their label."""
    results = tiny_run / "results"
    links = pd.read_parquet(results / "dedup" / "test_leaks.parquet")
    manifest = pd.read_parquet(results / "ingest" / "manifest.parquet")
    leaks = links[links["leak_train_ids"].notna()]
    assert len(leaks) >= 1  # the demo plants train copies in the test set
    out = tmp_path / "submission.csv"
    predict_bundle(
        results / "export" / "bundle.zip",
        _test_images(tiny_run),
        out,
        device="cpu",
        metadata=_metadata_csv(tiny_run),
    )
    rows = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("id")["rle_mask"]
    for row in leaks.itertuples():
        label = train_label(manifest, str(row.leak_train_ids).split(";"))
        assert rows[row.id] == rle_encode(label), row.id


def test_a_dehazed_runs_bundle_dehazes_each_image_it_reads(tiny_run: Path, tmp_path: Path) -> None:
    """preprocess.dehaze lives in stats.json's options: the bundle carries them and prepares
    each image dehazed, as preprocess-test did, where the plain run's bundle does not."""
    results = tmp_path / "results"
    shutil.copytree(tiny_run / "results", results)
    stats_path = results / "preprocess" / "stats.json"
    stats = json.loads(stats_path.read_text())
    assert "dehaze" not in stats["options"]  # the default run: stats.json as before dehaze
    stats["options"].update(dehaze=True, dehaze_patch=5)
    stats_path.write_text(json.dumps(stats))
    zip_path = tmp_path / "dehazed.zip"
    assert _cli(
        "export", results, zip_path, "--candidate", "ensemble:0", "--tta", "hflip",
    ) == 0  # fmt: skip
    dehazed = BundlePredictor(Bundle(zip_path), device="cpu")
    # The same candidate from the untouched run: the default bundle.zip is the chosen one, which
    # may be stacked (it then needs a folder), and another test may have rewritten it.
    plain_zip = tmp_path / "plain.zip"
    assert _cli(
        "export", tiny_run / "results", plain_zip, "--candidate", "ensemble:0", "--tta", "hflip",
    ) == 0  # fmt: skip
    plain = BundlePredictor(Bundle(plain_zip), device="cpu")
    assert dehazed.preprocess == PreprocessOptions(**stats["options"])
    image = sorted(_test_images(tiny_run).iterdir())[0]
    pixels = decode_image(image, DicomWindow()).pixels
    _, got, _, _ = dehazed.read_image(image)
    expected = prepare_image(pixels, dehazed.geometry, PreprocessOptions(**stats["options"]))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, plain.read_image(image)[1])


def test_export_by_hand_without_predict_flags_warns_that_it_drops_the_tta(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Predictions do not record their TTA: a bundle built by hand with no flags predicts
    without it, so export says so (the tiny run used hflip)."""
    caplog.set_level(logging.INFO, logger="segflow")
    assert (
        _cli("export", tiny_run / "results", tmp_path / "plain.zip", "--candidate", "ensemble:0")
        == 0
    )
    assert "no predict options given" in caplog.text and "TTA none" in caplog.text
    caplog.clear()
    assert _cli(
        "export", tiny_run / "results", tmp_path / "hflip.zip", "--candidate", "ensemble:0", "--tta", "hflip",
    ) == 0  # fmt: skip
    assert "no predict options given" not in caplog.text and "TTA hflip" in caplog.text


def test_fp16_halves_the_weights(tiny_run: Path, tmp_path: Path) -> None:
    results = tiny_run / "results"
    full = results / "export" / "bundle.zip"
    half = tmp_path / "half.zip"
    summary = export(results, half, PredictOptions(tta="hflip"), SubmissionOptions(), fp16=True)
    assert summary["bytes"] == half.stat().st_size
    assert 0.4 < half.stat().st_size / full.stat().st_size < 0.6
    bundle = Bundle(half)
    entry = bundle.config["experiments"][0]["models"][0]
    weights = bundle.weights(entry["path"])
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    out = tmp_path / "submission.csv"
    metadata = _metadata_csv(tiny_run)
    assert predict_bundle(half, _test_images(tiny_run), out, "cpu", metadata=metadata) == 16
    assert len(pd.read_csv(out)) == 16


@pytest.mark.parametrize("name", ["stack_gate", "stack_pixel"])
def test_stacked_bundles_reproduce_the_stacked_submissions(
    tiny_run: Path, tmp_path: Path, name: str
) -> None:
    """The second-level models travel in their native formats (never a pickle); the gate's
    meta_* features come from --metadata, the pipeline's data.metadata_csv."""
    results = tiny_run / "results"
    zip_path = tmp_path / f"{name}.zip"
    assert _cli(
        "export", results, zip_path, "--candidate", f"{name}:0", "--tta", "hflip",
    ) == 0  # fmt: skip
    bundle = Bundle(zip_path)
    stack = bundle.config["stack"]
    assert stack["stacker"] == name.removeprefix("stack_") and stack["backend"] == "lightgbm"
    with zipfile.ZipFile(zip_path) as archive:
        models = sorted(n for n in archive.namelist() if n.startswith("stack/"))
    assert models == sorted(stack["models"])
    if name == "stack_gate":
        assert models == ["stack/class_0/gate_model.txt", "stack/class_0/threshold_model.txt"]
        assert stack["meta_columns"] == ["meta_depth"]
    else:
        assert models == ["stack/class_0/blender_model.txt"] and stack["meta_columns"] == []
    out = tmp_path / "submission.csv"
    assert _cli(
        "predict-bundle", zip_path, _test_images(tiny_run), out, "--device", "cpu",
        "--metadata", _metadata_csv(tiny_run),
    ) == 0  # fmt: skip
    expected = results / "submission" / name / "round0" / "submission.csv"
    assert out.read_bytes() == expected.read_bytes()


def test_a_gate_without_its_metadata_is_refused_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tiny_run / "results"
    zip_path = tmp_path / "gate.zip"
    export(
        results,
        zip_path,
        PredictOptions(tta="hflip"),
        SubmissionOptions(),
        candidate=("stack_gate", 0),
    )
    out = tmp_path / "submission.csv"
    images = _test_images(tiny_run)
    assert _cli("predict-bundle", zip_path, images, out, "--device", "cpu") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segflow predict-bundle: error: ")
    assert "reads the metadata columns meta_depth; give --metadata CSV" in lines[0]
    # A metadata CSV without the column the gate reads.
    other = tmp_path / "other.csv"
    pd.read_csv(_metadata_csv(tiny_run)).rename(columns={"depth": "height"}).to_csv(
        other, index=False
    )
    args = ("predict-bundle", zip_path, images, out, "--device", "cpu", "--metadata", other)
    assert _cli(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--metadata: no column 'depth'" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "gate.zip",
        "other.csv",
    ]


# --------------------------------------------------------------------------- bad bundles


def _rewrite(source: Path, target: Path, edit) -> Path:
    """A copy of the bundle zip with ``edit(members)`` applied to its name -> bytes mapping."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def _edit_manifest(**changes):
    def edit(members: dict[str, bytes]) -> None:
        manifest = json.loads(members[MANIFEST])
        manifest.update(changes)
        members[MANIFEST] = json.dumps(manifest).encode()

    return edit


def _tamper(members: dict[str, bytes]) -> None:
    config = json.loads(members["bundle.json"])
    config["postprocess"]["classes"][0]["threshold"] = 0.01
    members["bundle.json"] = json.dumps(config).encode()


def _drop_leaks(members: dict[str, bytes]) -> None:
    del members["leaks.json"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_tamper, "member bundle.json does not match its sha256"),
        (_drop_leaks, "member leaks.json is missing"),
        (
            _edit_manifest(bundle_version=BUNDLE_VERSION + 1),
            f"reads up to {BUNDLE_VERSION}; upgrade segflow",
        ),
        (_edit_manifest(segflow_version="99.0.0"), "made by segflow 99.0.0, newer than"),
    ],
    ids=["checksum", "missing-member", "newer-bundle-format", "newer-segflow"],
)
def test_bad_bundles_are_refused_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:
    bundle = _rewrite(tiny_run / "results" / "export" / "bundle.zip", tmp_path / "bad.zip", edit)
    out = tmp_path / "submission.csv"
    assert _cli("predict-bundle", bundle, _test_images(tiny_run), out, "--device", "cpu") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segflow predict-bundle: error: ")
    assert message in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [bundle]


def test_an_image_of_another_channel_count_is_refused(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo is gray: a colour image is one the models never saw."""
    images = tmp_path / "images"
    shutil.copytree(_test_images(tiny_run), images)
    colour = np.random.default_rng(0).integers(0, 256, (101, 101, 3), dtype=np.uint8)
    cv2.imwrite(str(images / "zzcolour.png"), colour)
    out = tmp_path / "submission.csv"
    bundle = tiny_run / "results" / "export" / "bundle.zip"
    metadata = _metadata_csv(tiny_run)
    assert (
        _cli("predict-bundle", bundle, images, out, "--device", "cpu", "--batch-size", 4,
             "--metadata", metadata) == 2
    )  # fmt: skip
    # Progress lines (done/total) may come first; the error is one line, the last.
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == lines[-1:], lines
    assert lines[-1].startswith("segflow predict-bundle: error: ")
    assert "zzcolour.png: a colour image" in lines[-1] and "trained on gray" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


# --------------------------------------------------------------------------- units


def test_version_tuple_compares_releases() -> None:
    assert version_tuple("0.1.0") == (0, 1, 0)
    assert version_tuple("1.2.3rc1") == (1, 2, 3)
    assert version_tuple("0.10") > version_tuple("0.9.9")


def test_snapshot_states_round_trip() -> None:
    states = [
        {"w": torch.ones(2), "n": torch.tensor(3)},
        {"w": torch.zeros(2), "n": torch.tensor(4)},
    ]
    flat = flat_states(states, fp16=True)
    assert flat["0/w"].dtype == torch.float16 and flat["1/n"].dtype == torch.int64
    back = split_states(flat, 2)
    assert torch.equal(back[1]["w"], torch.zeros(2, dtype=torch.float16))
    assert int(back[0]["n"]) == 3
    assert split_states(flat_states(states[:1], fp16=False), 0)[0].keys() == {"w", "n"}
    with pytest.raises(SegflowError, match="belongs to no snapshot"):
        split_states({"w": torch.ones(1)}, 2)
