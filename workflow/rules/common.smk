import json
import os
import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from segflow.artifacts.layout import candidate_dir
from segflow.core.config_check import check_config, train_folds
from segflow.model.experiment import (
    EXPERIMENT_NAME_PATTERN,
    check_experiment_names,
    check_init_from,
)
from segflow.core.data_stamp import CACHE_NAME, data_stamp as content_stamp, demo_stamp
from segflow.ensemble.pseudo import check_pseudo_uncertainty
from segflow.ensemble.stacking.stackers import STACKER_OPTIONS, candidate_name
from segflow.data.ingest import count_images
from segflow.stages import stage_fingerprint
from segflow.core.fingerprint import CACHE_NAME as FINGERPRINT_CACHE, use_disk_cache
from segflow.model.training.refit import check_refit, refit_enabled
from segflow.model.resolution_plan import RESOLUTION_KEYS, check_resolution_config
from segflow.search.space import check_search, study_id

# Every stage's code fingerprint, kept between invocations (dry runs included) until a byte of
# the package changes: parsing the package costs ~2 s per invocation otherwise.
use_disk_cache(os.path.join(".snakemake", "segflow", FINGERPRINT_CACHE))

# One line naming the bad key first; snakemake's validate then fills in the defaults.
check_config(config, workflow.source_path("../schemas/config.schema.yaml"))
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


def section_flags(section, exclude=(), extra=""):
    """A config section as flags (cli_flags), without the `exclude` keys, followed by `extra`
    (flags already quoted: train_folds_flag's)."""
    return (
        cli_flags({k: v for k, v in config[section].items() if k not in exclude})
        + extra
    )


# The dedup section's near-duplicate options group fold members only: make_folds reads them,
# not dedup, so an edit reruns the folds alone (segflow.data.dedup.near_fold_groups).
NEAR_DUPLICATE_KEYS = ("near_duplicates", "near_max_distance")


def near_duplicate_flags():
    return cli_flags({k: config["dedup"][k] for k in NEAR_DUPLICATE_KEYS})


def dicom_flags():
    """The DICOM reading flags of the stages that decode images; --dicom-orientation only
    when set, so the command lines of data without it stay as they were."""
    flags = cli_flags(
        {
            "dicom_window_center": DATA["dicom_window_center"],
            "dicom_window_width": DATA["dicom_window_width"],
        }
    )
    return flags + (" --dicom-orientation" if DATA["dicom_orientation"] else "")


# search.<study>: a hyperparameter search whose best trial trains as experiment <study>
# (workflow/rules/search.smk). Its jobs' shape (refit, init_from) is the base experiment's: a
# study cannot search those fields; what it trains is read from best.json (experiment_json).
SEARCH = config["search"]
check_search(SEARCH, config["experiments"], config["folds"]["n_folds"])
EXPERIMENTS = {
    **config["experiments"],
    **{name: config["experiments"][study["base"]] for name, study in SEARCH.items()},
}
# One line naming experiments.<name> for a name that no rule's {experiment} wildcard matches.
check_experiment_names(EXPERIMENTS, config["run_experiments"])
# One line naming the key: init_from to an unknown experiment, itself or in a cycle, to another
# network; a refit that needs a validation fold (scheduler plateau); refit.test_models auto
# without budget.minutes.
check_init_from(EXPERIMENTS)
check_refit(EXPERIMENTS, config["budget"]["minutes"])
# The full refit's folder, next to fold0 ... fold<n-1> under models/ and test/.
FULL = "full"


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
# Second-level candidates share the experiments' artifact layout (oof/, test/, postprocess/,
# submission/), so their names are reserved and the base rules only match real experiments.
SECOND_LEVEL = ("ensemble", "stack_gate", "stack_pixel")
EXPERIMENT_PATTERN = "|".join(re.escape(name) for name in EXPERIMENTS)
PSEUDO = config["pseudo"]
# pseudo.uncertainty mc_dropout reads the uncertainty.npy only MC-dropout predictions write.
check_pseudo_uncertainty(PSEUDO, config["predict"])
ROUNDS = list(range(PSEUDO["rounds"] + 1))
FINAL_ROUND = ROUNDS[-1]
STACK = config["stack"]
# One stack job per stacked candidate: the gate, and the pixel blender unless
# stack.pixel_blender is false (then no stack_pixel candidate anywhere).
STACKERS = (
    (["gate", "pixel"] if STACK["pixel_blender"] else ["gate"])
    if STACK["enabled"]
    else []
)


def check_reserved_names():
    reserved = sorted(set(EXPERIMENTS) & set(SECOND_LEVEL))
    if reserved:
        raise ValueError(
            f"experiment name {reserved[0]!r} is reserved for a second-level stage; rename it"
        )


check_reserved_names()


def candidates():
    """(name, round) of everything scored on OOF: each experiment and the ensemble per round,
    the stacked models on the final round."""
    pairs = [(name, r) for r in ROUNDS for name in [*RUN_EXPERIMENTS, "ensemble"]]
    pairs += [(candidate_name(stacker), FINAL_ROUND) for stacker in STACKERS]
    return pairs


def stack_inputs(wildcards):
    """The ensemble's OOF that the gate gates (final round); the pixel blender reads the
    experiments only, so a change of the ensemble does not refit it."""
    if wildcards.stacker != "gate":
        return {}
    return {
        "base_oof": result("oof", "ensemble", f"round{FINAL_ROUND}", "oof_probs.npy"),
    }


def apply_stack_inputs(wildcards):
    """The ensemble's test prediction that the fitted gate gates; nothing for the blender."""
    if wildcards.stacker != "gate":
        return {}
    return {
        "base_test": result("test", "ensemble", f"round{FINAL_ROUND}", "probs.npy"),
    }


def stack_flags(wildcards):
    """The stack options this stacker reads (STACKER_OPTIONS), as `segflow stack` flags: an
    edit of another one (pixels_per_image for the gate) leaves the job's params alone.
    """
    return cli_flags({k: STACK[k] for k in STACKER_OPTIONS[wildcards.stacker]})


def stack_base_flags(wildcards, input):
    """`--base-oof-dir D` of the ensemble for the gate's fit, else nothing."""
    if wildcards.stacker != "gate":
        return ""
    return f"--base-oof-dir {shlex.quote(os.path.dirname(input.base_oof))}"


def apply_stack_base_flags(wildcards, input):
    """`--base-test-dir D` of the ensemble for the gate's apply, else nothing."""
    if wildcards.stacker != "gate":
        return ""
    return f"--base-test-dir {shlex.quote(os.path.dirname(input.base_test))}"


def watershed_tuned():
    """The submission splits touching objects (submission.instances and split_touching): then
    tune_postprocess tunes the watershed too (postprocess.min_distances, compactnesses).
    """
    return config["submission"]["instances"] and config["submission"]["split_touching"]


def watershed_object_csv():
    """The RLE CSV whose rows are the true objects (binary data from an RLE CSV, DSB style),
    else None (the objects are the truth masks' connected components)."""
    if DEMO["enabled"] or DATA["mask_source"] != "rle_csv" or DATA["classes"]:
        return None
    return DATA["rle_csv"]


def watershed_inputs(wildcards):
    """tune_postprocess's object RLE CSV when it tunes the watershed from one, else nothing."""
    if not watershed_tuned() or watershed_object_csv() is None:
        return {}
    return {
        "object_rle_csv": ancient(watershed_object_csv()),
        "manifest": rules.ingest_train.output.manifest,
        "dedup_items": rules.dedup.output.dedup_items,
    }


def watershed_flags():
    """tune_postprocess's watershed grid and object CSV flags (with the manifest and dedup items
    that match the CSV's ids, inputs by watershed_inputs), or nothing (no split)."""
    if not watershed_tuned():
        return ""
    post = config["postprocess"]
    options = {k: post[k] for k in ("min_distances", "compactnesses")}
    if watershed_object_csv() is not None:
        options.update(
            object_rle_csv=watershed_object_csv(),
            object_rle_id_column=DATA["rle_id_column"],
            object_rle_column=DATA["rle_column"],
            object_rle_order=DATA["rle_order"],
            object_rle_start=DATA["rle_start"],
            manifest=rules.ingest_train.output.manifest,
            dedup_items=rules.dedup.output.dedup_items,
        )
    return cli_flags(options)


def submit_flag():
    """`--force name:round` when the config names the candidate to submit (checked against
    the candidates here, before any job runs), else nothing: the best on OOF is chosen.
    """
    forced = config["submit_experiment"]
    if forced is None:
        return ""
    known = [f"{name}:{r}" for name, r in candidates()]
    if forced not in known:
        raise ValueError(
            f"config submit_experiment {forced!r} is not a candidate; candidates: {', '.join(known)}"
        )
    return f"--force {shlex.quote(forced)}"


def pseudo_dir(round):
    return result("pseudo", f"round{round}")


def pseudo_inputs(wildcards):
    """A pseudo-labelling round trains on round r-1's selection; round 0 on real labels only."""
    if int(wildcards.round) == 0:
        return {}
    return {
        "pseudo_selection": os.path.join(pseudo_dir(wildcards.round), "selection.csv"),
        "pseudo_targets": os.path.join(pseudo_dir(wildcards.round), "targets.npy"),
        # The selected test images themselves: a round >= 1 depends on the test set.
        "test_images": result("preprocess", "test_images.npy"),
        "test_index": result("preprocess", "test_index.parquet"),
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
    """An experiment's test predictions (per model), or a second-level stage's merged one."""
    if wildcards.experiment in SECOND_LEVEL:
        return [
            str(candidate_dir(RESULTS, "test", wildcards.experiment, wildcards.round))
        ]
    return test_model_dirs(wildcards.experiment, wildcards.round)


def test_model_dirs(experiment, round):
    """The test predictions merged into an experiment's: its folds', or with refit.enabled
    those that refit.test_models names (the full refit's, or the folds' and the refit's; auto:
    as the budget's plan chose).
    """
    folds = fold_dirs("test", experiment, round)
    test_models = refit_choice(experiment)
    if test_models in (None, "folds"):
        return folds
    full = [result("test", experiment, f"round{round}", FULL)]
    return full if test_models == "full" else folds + full


def refit_choice(experiment):
    """An experiment's refit.test_models (full, folds or both), None without a refit. auto is
    read from the budget's plan: plan_budget is then a checkpoint, and the jobs asking wait for
    it (None: the plan chose the folds and trains no refit)."""
    refit = EXPERIMENTS[experiment]["refit"]
    if not refit["enabled"]:
        return None
    if refit["test_models"] != "auto":
        return refit["test_models"]
    if experiment not in REFIT_AUTO:
        raise ValueError(
            f"experiments.{experiment}.refit.test_models: auto is chosen by the budget's plan, "
            "which plans the run experiments only; add it to run_experiments"
        )
    from segflow.model.budget import read_plan, refit_test_models

    plan = checkpoints.plan_budget.get().output.plan
    return refit_test_models(read_plan(plan), experiment, where=plan)


def experiment_dirs(kind, round):
    """oof/ or test/ folders of every run experiment for one round (test: per model)."""
    if kind == "oof":
        return [
            str(candidate_dir(RESULTS, "oof", name, round)) for name in RUN_EXPERIMENTS
        ]
    return [d for name in RUN_EXPERIMENTS for d in test_model_dirs(name, round)]


def init_inputs(wildcards):
    """train_fold / train_full: the model that train.init_from names, of the same round and
    fold (a refit: that experiment's refit), so it is trained first and a change retrains this.
    """
    source = EXPERIMENTS[wildcards.experiment].get("train", {}).get("init_from")
    if source is None:
        return {}
    member = f"fold{wildcards.fold}" if hasattr(wildcards, "fold") else FULL
    return {
        "init_checkpoint": result(
            "models", source, f"round{wildcards.round}", member, "model.pt"
        )
    }


def init_flags(wildcards, input):
    """`--init-checkpoint PATH` when the job starts from init_inputs' model, else nothing."""
    path = getattr(input, "init_checkpoint", None)
    return "" if path is None else f"--init-checkpoint {shlex.quote(path)}"


def refit_fold_metrics(wildcards):
    """The trained folds' metrics.json, whose best epochs set a full refit's epoch count."""
    return [
        result(
            "models",
            wildcards.experiment,
            f"round{wildcards.round}",
            f"fold{fold}",
            "metrics.json",
        )
        for fold in TRAIN_FOLDS
    ]


def refit_models(wildcards):
    """The full refit models of the run experiments with refit.enabled, every round (built
    even when refit.test_models is folds; not when auto chose the folds)."""
    return [
        result("models", name, f"round{r}", FULL, "model.pt")
        for r in ROUNDS
        for name in RUN_EXPERIMENTS
        if refit_choice(name) is not None
    ]


N_FOLDS = config["folds"]["n_folds"]
# folds.train_folds: the folds that train and predict (every fold when null; one line naming the
# key for a bad list). Every fold-wise input (fold_dirs, refit_fold_metrics, the report's
# models, the budget's trainings: train_folds_flag) derives from this one list.
TRAIN_FOLDS = train_folds(config["folds"])


def train_folds_flag():
    """` --train-folds K ...` for the planning jobs when folds.train_folds is set, else nothing
    (so the jobs of a run with every fold are unchanged)."""
    if config["folds"]["train_folds"] is None:
        return ""
    return " --train-folds " + " ".join(str(fold) for fold in TRAIN_FOLDS)


GPUS = config["gpus"]


def result(*parts):
    return str(Path(RESULTS, *parts))


BUDGET = config["budget"]
BUDGET_PLAN = result("budget", "plan.json") if BUDGET["minutes"] is not None else None
# Run experiments whose refit.test_models is auto (needs the budget: check_refit). Only with
# one is plan_budget a checkpoint (budget.smk): the DAG past it follows the plan's choice.
REFIT_AUTO = [
    name
    for name in RUN_EXPERIMENTS
    if refit_enabled(EXPERIMENTS[name])
    and EXPERIMENTS[name]["refit"]["test_models"] == "auto"
]


def budget_inputs(wildcards):
    """The time budget's plan for a run experiment's training (a fold or its full refit);
    nothing when budget.minutes is null (the DAG is then the one without a budget) or for an
    experiment outside the run (a refit then trains its folds' median best epoch).
    """
    if BUDGET_PLAN is None or wildcards.experiment not in RUN_EXPERIMENTS:
        return {}
    return {"plan": BUDGET_PLAN}


def budget_flags(wildcards):
    """`--plan plan.json --round r` when the training follows the budget's plan, else nothing."""
    if not budget_inputs(wildcards):
        return ""
    return f"--plan {shlex.quote(BUDGET_PLAN)} --round {int(wildcards.round)}"


def budget_experiments():
    """The run experiments as JSON: a params value, so editing one re-plans the budget.
    As experiment_json (the plan's experiment hash leaves `refit` out), with `refit` only when
    enabled: the refit is planned with its folds, and a disabled one changes no plan.
    """
    return json.dumps(
        {
            name: (
                EXPERIMENTS[name]
                if refit_enabled(EXPERIMENTS[name])
                else fold_values(name)
            )
            for name in RUN_EXPERIMENTS
        },
        sort_keys=True,
    )


# budget.sizes: the plan_resolution job chooses preprocess's size (one line naming a bad key).
check_resolution_config(BUDGET, config["preprocess"])
RESOLUTION = (
    result("budget", "resolution.json") if BUDGET["sizes"] is not None else None
)


def resolution_inputs(wildcards):
    """preprocess_train's size choice: nothing without budget.sizes (today's DAG)."""
    return {} if RESOLUTION is None else {"resolution": RESOLUTION}


def resolution_flags():
    """`--resolution resolution.json` when the budget chooses the size, else nothing."""
    return "" if RESOLUTION is None else f"--resolution {shlex.quote(RESOLUTION)}"


CLUSTER = config["cluster"]
# Rules that may run on a GPU; every other one is CPU-only and never asks for one.
GPU_RULES = (
    "train_fold",
    "train_full",
    "predict_oof",
    "predict_test",
    "predict_test_full",
    "plan_budget",
    "plan_resolution",
    "search_worker",
)
GPU_KEYS = ("gpu", "gpu_model", "gres")
# Rules that called job_resources(): check_cluster_rules() matches cluster.rules against them.
RESOURCE_RULES = set()


def cluster_setting(rule_name, key):
    """cluster.rules.<rule_name>.<key>, else the cluster-wide cluster.<key> (None when unset)."""
    value = CLUSTER["rules"].get(rule_name, {}).get(key)
    return CLUSTER.get(key) if value is None else value


def rule_threads(rule_name, default):
    """Threads of a rule: cluster.rules.<rule_name>.cpus_per_task when set (sbatch
    --cpus-per-task follows threads, so the two never disagree), else ``default``."""
    return CLUSTER["rules"].get(rule_name, {}).get("cpus_per_task", default)


def job_resources(rule_name, mem_mb, runtime):
    """Scheduler resources of a rule: memory (scaled by the attempt, so a job that ran out of
    memory is retried with more), runtime in minutes, and the partition, account and GPU
    request of the `cluster` config section (names the SLURM executor plugin reads)."""
    RESOURCE_RULES.add(rule_name)
    override = CLUSTER["rules"].get(rule_name, {})
    if rule_name not in GPU_RULES:
        asked = [key for key in GPU_KEYS if override.get(key) is not None]
        if asked:
            raise ValueError(
                f"config cluster.rules.{rule_name}.{asked[0]}: {rule_name} runs on the CPU only; "
                f"GPUs can be requested for {', '.join(GPU_RULES)}"
            )
    base_mem = override.get("mem_mb", mem_mb)
    resources = {
        "mem_mb": lambda wildcards, attempt: base_mem * attempt,
        "runtime": override.get("runtime", runtime),
    }
    gpu, gres = 0, None
    if rule_name in GPU_RULES:
        gres = cluster_setting(rule_name, "gres")
        gpu = cluster_setting(rule_name, "gpu")
        if gpu is None:  # follow `gpus`: this machine's GPUs, one per job
            gpu = 1 if GPUS else 0
        if gres is not None:  # a raw --gres replaces --gpus
            resources["gres"] = gres
            gpu = 0
        elif gpu and cluster_setting(rule_name, "gpu_model"):
            resources["gpu_model"] = cluster_setting(rule_name, "gpu_model")
        # `gpu` also bounds concurrent GPU jobs of a local run (--resources gpu=N).
        resources["gpu"] = gpu
    on_gpu = bool(gpu or gres)
    partition = (
        CLUSTER["rules"].get(rule_name, {}).get("partition")
        or (CLUSTER["gpu_partition"] if on_gpu else None)
        or CLUSTER["partition"]
    )
    if partition:
        resources["slurm_partition"] = partition
    account = cluster_setting(rule_name, "account")
    if account:
        resources["slurm_account"] = account
    return resources


def check_cluster_rules():
    """Every rule named in cluster.rules must exist (a typo would silently change nothing)."""
    unknown = sorted(set(CLUSTER["rules"]) - RESOURCE_RULES)
    if unknown:
        raise ValueError(
            f"config cluster.rules names unknown rule {unknown[0]!r}; "
            f"rules: {', '.join(sorted(RESOURCE_RULES))}"
        )


DATA_KEYS = ("train_images", "test_images", "train_masks", "rle_csv", "metadata_csv")
# The data keys of each ingest job's files: the test side reads the test folder (and the
# metadata of its ids), the train side everything else.
INGEST_PATHS = {
    "train": ("train_images", "train_masks", "rle_csv", "metadata_csv"),
    "test": ("test_images", "metadata_csv"),
}
# The data section's keys ingest_test passes (its flags: a train-only option reruns no test job).
TEST_INGEST_KEYS = (
    "test_images",
    "metadata_csv",
    "metadata_id_column",
    "dicom_window_center",
    "dicom_window_width",
    "dicom_series",
    "dicom_orientation",
    "max_pixels",
    "data_root",
)


def ingest_test_flags():
    """The data options ingest_test passes (TEST_INGEST_KEYS), as flags."""
    return cli_flags({key: DATA[key] for key in TEST_INGEST_KEYS})


def ingest_inputs(split):
    """The input function of ingest_<split>: the demo folder (built by generate_demo_data) or
    the user's paths of that side. The user's paths are `ancient`: their modification times
    rerun nothing (a `touch`, a copy), their contents do, through `data_stamp`."""

    def inputs(wildcards):
        if DEMO["enabled"]:
            return {"dataset": DEMO["out_dir"]}
        return {key: ancient(DATA[key]) for key in INGEST_PATHS[split] if DATA.get(key)}

    return inputs


def data_stamp(split):
    """The params function of ingest_<split>: a hash of that side's data files' contents
    (files overwritten in place included; times left out), so a test-folder edit reruns the
    test side only. The per-file hashes are cached next to Snakemake's own record of this
    param, in the working directory's .snakemake/ (results/ holds artifacts only, and results
    folders are compared and shared). The demo folder gives "demo" for both sides while it
    holds what generate_demo_data wrote, else one hash of the whole folder
    (segflow.core.data_stamp)."""

    def stamp(wildcards):
        cache = os.path.join(".snakemake", "segflow", CACHE_NAME)
        if DEMO["enabled"]:
            options = {k: v for k, v in DEMO.items() if k not in ("enabled", "out_dir")}
            return demo_stamp(DEMO["out_dir"], options, cache=cache)
        return content_stamp(
            *(DATA[key] for key in INGEST_PATHS[split] if DATA.get(key)), cache=cache
        )

    return stamp


def test_image_count():
    """The number of test images (the time budget plans their prediction): the demo's
    configured count, else the image files in data.test_images (none: 0). Their count only,
    never their contents: replacing test images re-plans nothing, a new count re-plans (and
    so retrains under a budget)."""
    if DEMO["enabled"]:
        return DEMO["n_test"] if DATA.get("test_images") else 0
    return count_images(DATA.get("test_images"))


def experiment_json(wildcards):
    """The experiment's config as JSON: a params value, so editing it retrains that experiment.
    Without `refit`: which models predict the test set is no part of what a fold trains.
    """
    if wildcards.experiment not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {wildcards.experiment!r}; configured: {', '.join(EXPERIMENTS)}"
        )
    if wildcards.experiment in SEARCH:
        return search_best_json(wildcards.experiment)
    return json.dumps(fold_values(wildcards.experiment), sort_keys=True)


def fold_values(name):
    """An experiment's config without `refit`: what its folds train (the refit's own options
    decide no fold's weights)."""
    return {k: v for k, v in EXPERIMENTS[name].items() if k != "refit"}


def fold_dirs(kind, experiment, round):
    """The per-fold output folders of predict_oof / predict_test for one experiment and round:
    the trained folds' (TRAIN_FOLDS) only."""
    return [
        str(candidate_dir(RESULTS, kind, experiment, round) / f"fold{fold}")
        for fold in TRAIN_FOLDS
    ]


def check_demo_paths():
    """With the demo on, every data path must lie inside the generated folder."""
    if not DEMO["enabled"]:
        return
    root = Path(DEMO["out_dir"]).resolve()
    for key in DATA_KEYS:
        value = DATA.get(key)
        if value and root not in Path(value).resolve().parents:
            raise ValueError(
                f"config data.{key} = {value!r} is outside demo.out_dir = {DEMO['out_dir']!r}; "
                "set demo.enabled: false to use your own data"
            )


check_demo_paths()


def bundle_test_dirs(wildcards):
    """The test prediction folders of every experiment and round (the chosen candidate's
    models among them): segflow export bundles the models behind the chosen one's."""
    return [d for r in ROUNDS for d in experiment_dirs("test", r)]


def bundle_models(wildcards):
    """The model.pt behind each of bundle_test_dirs (test/<name>/round<r>/<member> ->
    models/<name>/round<r>/<member>/model.pt)."""
    models = []
    for directory in bundle_test_dirs(wildcards):
        member, round_dir, name = Path(directory).parts[-1:-4:-1]
        models.append(result("models", name, round_dir, member, "model.pt"))
    return models


def search_json(study):
    """A study's settings as `segflow search-worker` / `search-summary` take them: a params
    value, so editing the space, the base experiment or n_trials reruns the workers (a new
    study id, or the same study continued); `workers` is left out (one more worker finds the
    study done)."""
    settings = SEARCH[study]
    base = config["experiments"][settings["base"]]
    ident = study_id(study, settings, base)
    keys = (
        "space",
        "sampler",
        "pruner",
        "pruner_startup_trials",
        "n_trials",
        "folds",
        "trial_epochs",
        "seed",
        "storage",
        "heartbeat_seconds",
    )
    return json.dumps(
        {
            **{key: settings[key] for key in keys},
            "name": study,
            "study_id": ident,
            "experiment": {k: v for k, v in base.items() if k != "refit"},
            # Outside the declared outputs: a failed worker's study must survive it.
            "journal": result("search", study, f"{ident}.journal"),
        },
        sort_keys=True,
    )


def search_worker_threads(wildcards):
    """A worker's threads: cluster.rules.search_worker.cpus_per_task, else its share of
    max_threads (so the study's workers run at once on a CPU-only machine too)."""
    share = max(1, MAX_THREADS // SEARCH[wildcards.study]["workers"])
    return rule_threads("search_worker", share)


def search_inputs(wildcards):
    """train_fold / train_full of a study's best experiment wait for its search_summary
    checkpoint; once it is done, nothing: training is keyed by best.json's content (the
    experiment params), not by the file's time, so a rerun search with the same best retrains
    nothing."""
    if wildcards.experiment in SEARCH:
        checkpoints.search_summary.get(study=wildcards.experiment)
    return {}


def search_best_json(study):
    """The best experiment of a study (best.json's `experiment`) as experiment_json gives it."""
    best = checkpoints.search_summary.get(study=study).output.best
    values = json.loads(Path(best).read_text())["experiment"]
    return json.dumps({k: v for k, v in values.items() if k != "refit"}, sort_keys=True)


def search_files(*names):
    """search/<study>/<name> of the run experiments that are studies (choose, report)."""
    return [
        result("search", study, name)
        for study in SEARCH
        if study in RUN_EXPERIMENTS
        for name in names
    ]


def check_search_budget():
    """A time budget plans from the experiments' config; a study's is known after its search."""
    studies = [study for study in SEARCH if study in RUN_EXPERIMENTS]
    if studies and BUDGET_PLAN is not None:
        raise ValueError(
            f"config search.{studies[0]}: budget.minutes cannot plan a search study's training "
            "yet; set budget.minutes: null or leave the study out of run_experiments"
        )


check_search_budget()
