"""The HTML report on tiny synthetic artifacts laid out as the workflow writes them."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from segflow.artifacts.image_scores import write_image_scores
from segflow.artifacts.predictions import read_oof
from segflow.artifacts.truths import original_truths
from segflow.cli import main
from segflow.core.errors import SegflowError
from segflow.data.dedup import DedupOptions, find_duplicates
from segflow.data.folds import FoldOptions, make_folds
from segflow.data.ingest import IngestOptions, ingest
from segflow.ensemble.choose import choose_candidate, constant_baselines, stage_table
from segflow.model.metrics import score_oof
from segflow.model.postprocess import tune_classes
from segflow.model.tune_postprocess import image_scores
from segflow.report.figures import grid_heatmap_png, learning_curves_png, overlay_png
from segflow.report.report import build_report, per_image_kaggle, pick_cases
from segflow.report.summary import results_summary

# Markup in a name from the config must come out as text, never as markup.
NASTY = 'net<b>&"x'
WORST_ID = "img05"  # the one image the experiment misses entirely
# make_folds stratifies 10 images: some coverage strata hold a single image.
pytestmark = pytest.mark.filterwarnings("ignore:The least populated class")
SECTIONS = (
    "diagnostics",
    "dedup",
    "folds",
    "learning",
    "oof",
    "postprocess",
    "stacking",
    "stages",
    "cases",
)


class _Images(HTMLParser):
    """Collects every ``<img>`` src and every element id of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values.get("src") or "")
        if values.get("id"):
            self.ids.append(values["id"])


def _parse(text: str) -> _Images:
    parser = _Images()
    parser.feed(text)
    return parser


def _write_candidate(
    root: Path, name: str, ids: pd.DataFrame, probs: np.ndarray, truths: np.ndarray
) -> None:
    """OOF arrays, metrics and the tuned grid of one candidate, as evaluate/tune write them."""
    oof = root / "oof" / name / "round0"
    oof.mkdir(parents=True)
    np.save(oof / "oof_probs.npy", probs.astype(np.float16))
    ids.to_csv(oof / "oof_ids.csv", index=False)
    _, summary = score_oof(probs, truths, ids["fold"].to_numpy())
    (oof / "metrics.json").write_text(json.dumps(summary))
    _, grid, params = tune_classes(probs, truths, ["mask"], [0.3, 0.5, 0.7], [0, 4])
    tuned = root / "postprocess" / name / "round0"
    tuned.mkdir(parents=True)
    grid.to_csv(tuned / "grid.csv", index=False)
    (tuned / "params.json").write_text(json.dumps(params))
    scores, constants = image_scores(read_oof(oof), params, ["mask"], truths)
    write_image_scores(tuned, ids["id"], scores, constants)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder of 10 train images in 2 folds: one experiment (named ``NASTY``) that is
    perfect but for ``WORST_ID``, and a stacked gate that predicts nothing."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        image = rng.integers(0, 80, (24, 24), dtype=np.uint8)
        mask = np.zeros((24, 24), np.uint8)
        if i % 3:  # a third of the masks are empty
            mask[4 : 8 + i, 3 : 9 + i] = 255
            image[mask > 0] = 200
        cv2.imwrite(str(data / "images" / f"img{i:02d}.png"), image)
        cv2.imwrite(str(data / "masks" / f"img{i:02d}.png"), mask)
    root = tmp_path / "results"
    manifest, _ = ingest(
        IngestOptions(train_images=str(data / "images"), train_masks=str(data / "masks"))
    )
    items, dedup_summary = find_duplicates(manifest, DedupOptions())
    folds, folds_summary = make_folds(manifest, items, FoldOptions(n_folds=2, seed=1))
    for folder in ("ingest", "dedup", "folds", "preprocess", "final"):
        (root / folder).mkdir(parents=True)
    manifest.to_parquet(root / "ingest" / "manifest.parquet")
    items.to_parquet(root / "dedup" / "items.parquet")
    (root / "dedup" / "summary.json").write_text(json.dumps(dedup_summary))
    folds.to_csv(root / "folds" / "folds.csv", index=False)
    (root / "folds" / "summary.json").write_text(json.dumps(folds_summary))
    (root / "preprocess" / "stats.json").write_text(json.dumps({"classes": ["mask"]}))

    ids = folds[["id", "fold"]].sort_values("id").reset_index(drop=True)
    truths = original_truths(manifest, items, ids["id"])
    probs = truths[:, None].astype(np.float32) * 0.9
    probs[ids["id"] == WORST_ID] = 0.0
    _write_candidate(root, NASTY, ids, probs, truths)
    _write_candidate(root, "stack_gate", ids, np.zeros_like(probs), truths)
    # Fold 0 still rises at its last epoch after 12 optimizer steps (undertrained, too few
    # steps); fold 1 has levelled off after 1000 steps (healthy).
    curves = {0: [0.2, 0.4, 0.5], 1: [0.2, 0.4, 0.5, 0.55, 0.6, 0.61, 0.61, 0.6, 0.61, 0.605]}
    for fold, kaggle in curves.items():
        history = root / "models" / NASTY / "round0" / f"fold{fold}"
        history.mkdir(parents=True)
        epochs = np.arange(1, len(kaggle) + 1)
        pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": 1.0 / epochs,
                "val_loss": 1.1 - np.array(kaggle),
                "val_dice": np.array(kaggle) + 0.1,
                "val_kaggle": kaggle,
            }
        ).to_csv(history / "history.csv", index=False)
        metrics = {"monitor": "kaggle", "optimizer_steps": 12 if fold == 0 else 1000}
        (history / "metrics.json").write_text(json.dumps(metrics))
    class_dir = root / "stack" / "round0" / "class_0"
    class_dir.mkdir(parents=True)
    importances = pd.DataFrame({"feature": ["f_a", "f_b"], "importance": [0.75, 0.25]})
    importances.to_csv(class_dir / "gate_importances.csv", index=False)
    # Left by an earlier run with the pixel blender: stack_pixel is no candidate here
    # (stack.pixel_blender: false), so the report must not show it.
    importances.to_csv(class_dir / "blender_importances.csv", index=False)

    table = constant_baselines(stage_table([(NASTY, 0), ("stack_gate", 0)], root), root)
    chosen = choose_candidate(table)
    table["chosen"] = table["candidate"] == chosen["candidate"]
    table.to_csv(root / "final" / "stages.csv", index=False)
    choice = {
        "candidate": chosen["candidate"],
        "round": 0,
        "metric": "kaggle",
        "tuned_oof_score": float(chosen["tuned"]),
        "delta_vs_best_single": 0.0,
        "reason": "best tuned OOF score",
    }
    (root / "final" / "choice.json").write_text(json.dumps(choice))
    return root


def test_report_has_every_section_and_only_embedded_pngs(results: Path) -> None:
    page = build_report(results)
    parsed = _parse(page)
    assert set(SECTIONS) <= set(parsed.ids)
    # strata, learning curves, OOF bars, 2 grids, the gate's importances, 3 cases
    assert len(parsed.sources) == 9
    for source in parsed.sources:
        assert source.startswith("data:image/png;base64,")
        png = base64.b64decode(source.split(",", 1)[1], validate=True)
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded is not None and min(decoded.shape[:2]) > 50
    lowered = page.lower()
    for external in ("http:", "https:", "<script", "<link", "@import", "url("):
        assert external not in lowered


def test_text_from_artifacts_is_escaped(results: Path) -> None:
    page = build_report(results)
    assert NASTY not in page and "<b>" not in page
    assert "net&lt;b&gt;&amp;&quot;x" in page


def test_cases_are_the_best_median_and_worst_oof_images(results: Path) -> None:
    page = build_report(results)
    assert f"worst: {WORST_ID} (Kaggle 0.000" in page
    # Every other image is perfect; the best is the one with the most foreground.
    assert "best: img08 (Kaggle 1.000" in page
    assert "median: " in page and "(Kaggle 1.000" in page.split("median: ", 1)[1]


def test_stacking_section_says_when_stacking_did_not_run(results: Path) -> None:
    stages = pd.read_csv(results / "final" / "stages.csv")
    stages[stages["candidate"] != "stack_gate"].to_csv(
        results / "final" / "stages.csv", index=False
    )
    page = build_report(results)
    assert "stacking did not run" in page
    assert len(_parse(page).sources) == 7  # no grid and no importances of the stack


def _add_stack_pixel(results: Path) -> None:
    """A stack_pixel candidate (predicting nothing, as the gate) in the stage table."""
    ids = pd.read_csv(results / "oof" / "stack_gate" / "round0" / "oof_ids.csv", dtype={"id": str})
    probs = np.load(results / "oof" / "stack_gate" / "round0" / "oof_probs.npy")
    manifest = pd.read_parquet(results / "ingest" / "manifest.parquet")
    items = pd.read_parquet(results / "dedup" / "items.parquet")
    truths = original_truths(manifest, items, ids["id"])
    _write_candidate(results, "stack_pixel", ids, probs.astype(np.float32), truths)
    chosen = pd.read_csv(results / "final" / "stages.csv").set_index("candidate")["chosen"]
    pairs = [(NASTY, 0), ("stack_gate", 0), ("stack_pixel", 0)]
    table = constant_baselines(stage_table(pairs, results), results)
    table["chosen"] = table["candidate"].map(chosen).fillna(False).astype(bool)
    table.to_csv(results / "final" / "stages.csv", index=False)


def test_stacking_section_shows_the_blender_when_stack_pixel_is_a_candidate(
    results: Path,
) -> None:
    without = build_report(results)
    assert "image-level gate, class mask" in without
    assert "pixel-level blender" not in without
    _add_stack_pixel(results)
    page = build_report(results)
    section = page.split('<section id="stacking">', 1)[1].split("</section>", 1)[0]
    assert "image-level gate, class mask, round 0" in section
    assert "pixel-level blender, class mask, round 0" in section
    # ... and its grid: 9 images of the gate-only page, + 1 grid + 1 importance chart.
    assert len(_parse(page).sources) == 11
    (results / "stack" / "round0" / "class_0" / "blender_importances.csv").unlink()
    with pytest.raises(SegflowError, match=r"blender_importances\.csv does not exist"):
        build_report(results)


@pytest.mark.parametrize(
    "relative",
    [
        "postprocess/stack_gate/round0/grid.csv",
        f"models/{NASTY}/round0/fold1/history.csv",
        f"models/{NASTY}/round0/fold0/metrics.json",
        "stack/round0/class_0/gate_importances.csv",
        "final/stages.csv",
    ],
)
def test_a_missing_artifact_is_named(results: Path, relative: str) -> None:
    (results / relative).unlink()
    with pytest.raises(SegflowError, match="does not exist") as error:
        build_report(results)
    assert str(results / relative) in str(error.value)


def test_cli_writes_the_report_atomically(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report" / "report.html"
    assert main(["report", "--results-dir", str(results), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary left
    (results / "final" / "choice.json").unlink()
    assert main(["report", "--results-dir", str(results), "--out", str(out)]) == 2
    assert "choice.json does not exist" in capsys.readouterr().err
    assert out.read_text().startswith("<!DOCTYPE html>")  # the old report is untouched


ESCAPED = "net&lt;b&gt;&amp;&quot;x"


def test_constant_predictions_are_scored_on_the_oof_truths(results: Path) -> None:
    stages = pd.read_csv(results / "final" / "stages.csv").set_index("candidate")
    # 4 of the 10 masks are empty: predicting nothing scores 0.4 under the Kaggle metric; no
    # mask covers more than 95% of its image, so predicting everything scores 0.
    assert stages["const_empty"].tolist() == [pytest.approx(0.4)] * 2
    assert stages["const_full"].tolist() == [0.0, 0.0]
    # The stacked gate predicts nothing: it is the all-empty prediction, gain 0.
    assert stages.loc["stack_gate", "gain_vs_constant"] == pytest.approx(0.0)
    assert bool(stages.loc["stack_gate", "near_constant"])
    # The experiment misses one image of ten: a gain of 0.5 over all-empty, well above noise.
    assert stages.loc[NASTY, "gain_vs_constant"] == pytest.approx(0.5)
    assert stages.loc[NASTY, "noise"] < 0.5 and not bool(stages.loc[NASTY, "near_constant"])


def test_report_and_summary_list_the_flags_with_their_numbers(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = build_report(results)
    section = page.split('<section id="diagnostics">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Diagnostics</h2>" in page
    assert (
        f"{ESCAPED} round 0 fold 0: undertrained: raise epochs or budget (best val_kaggle "
        "0.5000 at epoch 3 of 3, last-3 trend +0.1500/epoch)" in section
    )
    assert f"{ESCAPED} round 0 fold 0: too few optimizer steps" in section
    assert "12 optimizer steps in 3 epochs &lt; 300" in section
    assert "stack_gate round 0: no better than a constant prediction" in section
    assert "all-empty 0.4000, all-foreground 0.0000; gain +0.0000" in section
    assert "fold 1:" not in section and f"{ESCAPED} round 0:" not in section  # healthy ones
    assert "<h3>Folds</h3>" in section and "Candidates against constant predictions" in section

    stats = {"classes": ["mask"], "n_train": 10, "n_test": 0, "height": 24, "width": 24}
    stats |= {"channels": 1, "dtype": "uint8"}  # what the summary's preprocess line reads
    (results / "preprocess" / "stats.json").write_text(json.dumps(stats))
    assert main(["summary", str(results)]) == 0
    out = capsys.readouterr().out
    assert "Diagnostics (2 folds, 2 candidates checked" in out
    assert f"! {NASTY} round 0 fold 0: undertrained: raise epochs or budget" in out
    assert f"! {NASTY} round 0 fold 0: too few optimizer steps" in out
    assert "! stack_gate round 0: no better than a constant prediction" in out
    assert out.count("! ") == 3
    assert out == results_summary(results) + "\n"


def test_report_says_when_the_stage_table_predates_the_constants(results: Path) -> None:
    stages = pd.read_csv(results / "final" / "stages.csv")
    stages.drop(columns=["near_constant"]).to_csv(results / "final" / "stages.csv", index=False)
    page = build_report(results)
    assert "no constant-prediction columns" in page
    assert "no better than a constant" not in page


def test_pick_cases_prefers_visible_images_among_ties() -> None:
    scores = np.array([1.0, 1.0, 0.0, 0.5, 0.0, 1.0])
    areas = np.array([0, 40, 0, 10, 30, 5])
    assert pick_cases(scores, areas) == {"best": 1, "median": 0, "worst": 4}
    assert pick_cases(np.array([0.7]), np.array([3])) == {"best": 0}
    with pytest.raises(SegflowError, match="no OOF images"):
        pick_cases(np.array([]), np.array([]))


def test_per_image_kaggle_is_the_mean_over_classes() -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2] = 0b01  # class 0 in image 0
    truth[0, 2:] = 0b10  # class 1 in image 0
    prediction = np.zeros((2, 2, 4, 4), np.uint8)
    prediction[0, 0, :2] = 1  # class 0 right, class 1 missed
    scores = per_image_kaggle(prediction, truth)
    assert scores.tolist() == [0.5, 1.0]  # image 1: both classes empty and predicted empty


def test_figures_reject_inconsistent_inputs() -> None:
    with pytest.raises(SegflowError, match="lacks columns"):
        grid_heatmap_png(pd.DataFrame({"threshold": [0.5], "score": [1.0]}), "g")
    with pytest.raises(SegflowError, match="do not match"):
        overlay_png(np.zeros((8, 8), np.uint8), np.zeros((1, 8, 8)), np.zeros((1, 4, 4)), "o")
    png = overlay_png(
        np.zeros((8, 16, 3), np.uint16), np.ones((2, 8, 16), bool), np.zeros((2, 8, 16), bool), "o"
    )
    assert png.startswith(b"\x89PNG")


def test_figure_text_from_the_config_never_starts_mathtext() -> None:
    history = pd.DataFrame(
        {
            "epoch": [1, 2],
            "train_loss": [1.0, 0.5],
            "val_loss": [1.0, 0.6],
            "val_kaggle": [0.1, 0.2],
        }
    )
    png = learning_curves_png({0: history}, r"exp $\notacommand$ round 0")
    assert png.startswith(b"\x89PNG")


def test_heat_map_outlines_the_tuned_cell_which_must_be_in_the_grid() -> None:
    grid = pd.DataFrame(
        {"threshold": [0.3, 0.3, 0.5, 0.5], "min_area": [0, 5] * 2, "score": [1.0, 1.0, 0.5, 0.2]}
    )
    assert grid_heatmap_png(grid, "g", {"mask": (0.3, 5)}).startswith(b"\x89PNG")
    with pytest.raises(SegflowError, match=r"threshold 0\.4 was chosen but is not in the grid"):
        grid_heatmap_png(grid, "g", {"mask": (0.4, 5)})
