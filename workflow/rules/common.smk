import json
import os
import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from segflow.fingerprint import folder_stamp, stage_fingerprint

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
DEMO = config["demo"]
DATA = config["data"]
MAX_THREADS = config["max_threads"]
CONDA_ENV = "../../envs/segflow.yaml"


def cli_flags(options):
    """Render a config section as `segflow` flags: key `clip_limit` -> `--clip-limit VALUE`;
    a list (schema: minItems 1) gives one quoted value per item: `--classes a 'b c'`."""
    flags = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            flags.append(
                f"--{name} " + " ".join(shlex.quote(str(item)) for item in value)
            )
        else:
            flags.append(
                f"--{name} {shlex.quote('none' if value is None else str(value))}"
            )
    return " ".join(flags)


def section_flags(section, exclude=()):
    return cli_flags({k: v for k, v in config[section].items() if k not in exclude})


def dicom_flags():
    return cli_flags(
        {
            "dicom_window_center": DATA["dicom_window_center"],
            "dicom_window_width": DATA["dicom_window_width"],
        }
    )


EXPERIMENTS = config["experiments"]


def experiments_to_run():
    """The experiments the default target trains: run_experiments, or every configured one."""
    names = config["run_experiments"] or list(EXPERIMENTS)
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"config run_experiments names {unknown[0]!r}; configured: {', '.join(EXPERIMENTS)}"
        )
    return names


RUN_EXPERIMENTS = experiments_to_run()
SUBMIT_EXPERIMENT = config["submit_experiment"] or RUN_EXPERIMENTS[0]
# Second-level candidates share the experiments' artifact layout (oof/, test/, postprocess/,
# submission/), so their names are reserved and the base rules only match real experiments.
SECOND_LEVEL = ("ensemble", "stack_gate", "stack_pixel")
EXPERIMENT_PATTERN = "|".join(re.escape(name) for name in EXPERIMENTS)
PSEUDO = config["pseudo"]
ROUNDS = list(range(PSEUDO["rounds"] + 1))
FINAL_ROUND = ROUNDS[-1]
STACK = config["stack"]


def check_experiment_names():
    reserved = sorted(set(EXPERIMENTS) & set(SECOND_LEVEL))
    if reserved:
        raise ValueError(
            f"experiment name {reserved[0]!r} is reserved for a second-level stage; rename it"
        )


check_experiment_names()


def candidates():
    """(name, round) of everything scored on OOF: each experiment and the ensemble per round,
    the stacked models on the final round."""
    pairs = [(name, r) for r in ROUNDS for name in [*RUN_EXPERIMENTS, "ensemble"]]
    if STACK["enabled"]:
        pairs += [("stack_gate", FINAL_ROUND), ("stack_pixel", FINAL_ROUND)]
    return pairs


def pseudo_dir(round):
    return result("pseudo", f"round{round}")


def pseudo_inputs(wildcards):
    """A pseudo-labelling round trains on round r-1's selection; round 0 on real labels only."""
    if int(wildcards.round) == 0:
        return {}
    return {
        "pseudo_selection": os.path.join(pseudo_dir(wildcards.round), "selection.csv"),
        "pseudo_targets": os.path.join(pseudo_dir(wildcards.round), "targets.npy"),
    }


def pseudo_flags(wildcards):
    if int(wildcards.round) == 0:
        return ""
    return (
        f"--pseudo-dir {shlex.quote(pseudo_dir(wildcards.round))}"
        f" --max-pseudo-share {PSEUDO['max_pseudo_share']}"
        f" --pseudo-weight {PSEUDO['pseudo_weight']}"
    )


def test_prediction_dirs(wildcards):
    """An experiment's per-fold test predictions, or a second-level stage's merged one."""
    if wildcards.experiment in SECOND_LEVEL:
        return [result("test", wildcards.experiment, f"round{wildcards.round}")]
    return fold_dirs("test", wildcards.experiment, wildcards.round)


def experiment_dirs(kind, round):
    """oof/ or test/ folders of every run experiment for one round (test: per fold)."""
    if kind == "oof":
        return [result("oof", name, f"round{round}") for name in RUN_EXPERIMENTS]
    return [d for name in RUN_EXPERIMENTS for d in fold_dirs("test", name, round)]


N_FOLDS = config["folds"]["n_folds"]
GPUS = config["gpus"]
# Concurrent GPU jobs of this machine agree on who uses which GPU through locks in here.
GPU_LOCK_DIR = str(Path(config["results_dir"], ".gpu-locks"))


def result(*parts):
    return str(Path(RESULTS, *parts))


def ingest_inputs(wildcards):
    """The dataset itself: the demo folder (built by generate_demo_data) or the user's paths."""
    if DEMO["enabled"]:
        return {"dataset": DEMO["out_dir"]}
    keys = ("train_images", "test_images", "train_masks", "rle_csv", "metadata_csv")
    return {key: DATA[key] for key in keys if DATA.get(key)}


def data_stamp(wildcards):
    """A stamp of the user's data folders (files overwritten in place included); none for the
    demo, whose folder is this workflow's own output and tracked as such."""
    if DEMO["enabled"]:
        return "demo"
    keys = ("train_images", "test_images", "train_masks")
    return folder_stamp(*(DATA[key] for key in keys if DATA.get(key)))


def experiment_json(wildcards):
    """The experiment's config as JSON: a params value, so editing it retrains that experiment."""
    if wildcards.experiment not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {wildcards.experiment!r}; configured: {', '.join(EXPERIMENTS)}"
        )
    return json.dumps(EXPERIMENTS[wildcards.experiment], sort_keys=True)


def fold_dirs(kind, experiment, round):
    """The per-fold output folders of predict_oof / predict_test for one experiment and round."""
    return [
        result(kind, experiment, f"round{round}", f"fold{fold}")
        for fold in range(N_FOLDS)
    ]


def check_demo_paths():
    """With the demo on, every data path must lie inside the generated folder."""
    if not DEMO["enabled"]:
        return
    root = Path(DEMO["out_dir"]).resolve()
    for key in (
        "train_images",
        "test_images",
        "train_masks",
        "rle_csv",
        "metadata_csv",
    ):
        value = DATA.get(key)
        if value and root not in Path(value).resolve().parents:
            raise ValueError(
                f"config data.{key} = {value!r} is outside demo.out_dir = {DEMO['out_dir']!r}; "
                "set demo.enabled: false to use your own data"
            )


check_demo_paths()
