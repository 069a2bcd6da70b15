"""Cluster execution: the `cluster` config section in the jobs' resources (dry runs), and the
workflow through `--profile profiles/slurm` on a real single-node SLURM started for the test
(tests/cluster/slurm.sh), whose artifacts must equal a local run's."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import DATA_ARTIFACTS, REPO_ROOT, copy_workflow, run_snakemake

from segflow.model.models import load_checkpoint

SLURM_SCRIPT = REPO_ROOT / "tests" / "cluster" / "slurm.sh"
SLURM_PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
GPU_RULES = {"train_fold", "predict_oof", "predict_test"}
CPU_RULES = {
    "ingest_train",
    "dedup",
    "preprocess_train",
    "make_folds",
    "stack",
}


def write_config(workdir: Path, overrides: dict) -> str:
    (workdir / "test.yaml").write_text(yaml.safe_dump(overrides))
    return "test.yaml"


def planned_resources(workdir: Path, *args: str) -> dict[str, dict[str, str]]:
    """Rule -> its first job's resources, as a dry run prints them."""
    result = run_snakemake(workdir, "--dry-run", *args)
    resources: dict[str, dict[str, str]] = {}
    rule = None
    for line in result.stdout.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"^\s+resources: (.*)$", line)):
            pairs = (item.split("=", 1) for item in match.group(1).split(", "))
            resources.setdefault(rule, dict(pairs))
    return resources


@pytest.fixture(scope="module")
def dry_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("dry"))


def test_cluster_section_reaches_the_job_resources(dry_workdir: Path) -> None:
    config = write_config(
        dry_workdir,
        {
            "cluster": {
                "partition": "cpu",
                "gpu_partition": "gpu",
                "gpu": 1,
                "gpu_model": "a100",
                "rules": {
                    "make_folds": {"mem_mb": 123, "runtime": 7, "partition": "short"},
                    "predict_test": {"gres": "gpu:v100:2"},
                },
            }
        },
    )
    resources = planned_resources(dry_workdir, "--configfile", config)
    assert set(resources) >= GPU_RULES | CPU_RULES
    for rule in ("train_fold", "predict_oof"):
        assert resources[rule]["gpu"] == "1", rule
        assert resources[rule]["gpu_model"] == "a100", rule
        assert resources[rule]["slurm_partition"] == "gpu", rule
    # A raw gres replaces --gpus (the local `gpu` count is then 0).
    assert resources["predict_test"]["gres"] == "gpu:v100:2"
    assert resources["predict_test"]["gpu"] == "0"
    assert resources["predict_test"]["slurm_partition"] == "gpu"
    for rule in CPU_RULES:
        assert not {"gpu", "gpu_model", "gres"} & set(resources[rule]), rule
        assert int(resources[rule]["mem_mb"]) > 0 and int(resources[rule]["runtime"]) > 0
    assert resources["ingest_train"]["slurm_partition"] == "cpu"
    assert resources["make_folds"]["mem_mb"] == "123"
    assert resources["make_folds"]["runtime"] == "7"
    assert resources["make_folds"]["slurm_partition"] == "short"


def test_without_a_cluster_section_no_job_asks_for_a_gpu_or_partition(dry_workdir: Path) -> None:
    resources = planned_resources(dry_workdir)
    for rule in GPU_RULES:
        assert resources[rule]["gpu"] == "0", rule
    for rule, values in resources.items():
        assert "slurm_partition" not in values and "slurm_account" not in values, rule
        assert "gpu_model" not in values and "gres" not in values, rule
    # `gpus` (this machine's GPUs) still gives each GPU job one.
    config = write_config(dry_workdir, {"gpus": 2})
    resources = planned_resources(dry_workdir, "--configfile", config)
    for rule in GPU_RULES:
        assert resources[rule]["gpu"] == "1", rule
    assert "gpu" not in resources["make_folds"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"ingest_train": {"gpu": 1}}, "ingest_train runs on the CPU only"),
        ({"stack": {"gres": "gpu:1"}}, "stack runs on the CPU only"),
        ({"train_folds": {"mem_mb": 10}}, "unknown rule 'train_folds'"),
    ],
)
def test_bad_cluster_rules_are_rejected(dry_workdir: Path, rules: dict, message: str) -> None:
    config = write_config(dry_workdir, {"cluster": {"rules": rules}})
    result = run_snakemake(dry_workdir, "--dry-run", "--configfile", config, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


# --------------------------------------------------------------------- a real SLURM cluster


def ensure_slurm_installed() -> None:
    """Install the Debian SLURM packages when missing; skip only where that is impossible."""
    if all(shutil.which(command) for command in SLURM_COMMANDS):
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM not installed and not root to apt-get install {SLURM_PACKAGES}")
    if not shutil.which("apt-get"):
        pytest.skip("SLURM not installed and no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"could not install SLURM ({' '.join(command)}): {result.stderr[-500:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_cluster():
    """A single-node SLURM cluster for this module; yields its slurm.conf."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root (it runs jobs as their submitter)")
    ensure_slurm_installed()
    # Not under tmp_path: pytest's folders are private to root, and munged runs as munge.
    state = Path(tempfile.mkdtemp(prefix="segflow-slurm-"))
    # Free ports: another test session on this machine may run its own cluster.
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    try:
        subprocess.run(
            [str(SLURM_SCRIPT), "start", str(state)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.CalledProcessError as error:
        subprocess.run([str(SLURM_SCRIPT), "stop", str(state)], env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)
        raise AssertionError(f"SLURM did not start:\n{error.stdout}\n{error.stderr}") from error
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(state / "slurm.conf"))
            # Wrappers that set SLURM_CONF: snakemake's jobstep drops it before a job's srun.
            patch.setenv("PATH", f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}")
            yield state / "slurm.conf"
    finally:
        subprocess.run([str(SLURM_SCRIPT), "stop", str(state)], env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)


TARGETS = (
    "results/preprocess/stats.json",
    "results/folds/folds.csv",
    "results/models/unet_lite0/round0/fold0/model.pt",
)
SUBMITTED_RULES = {
    "ingest_train",
    "dedup",
    "preprocess_train",
    "make_folds",
    "train_fold",
}
JOB_MEM_MB = 4000
SLURM_RUN = {
    "demo": {"n_train": 40, "n_test": 12, "seed": 5},
    "folds": {"n_folds": 2},
    "max_threads": 1,  # one CPU per job, and the same threads (same floats) in both runs
    "run_experiments": ["unet_lite0"],
    "experiments": {"unet_lite0": {"train": {"epochs": 1, "batch_size": 8}}},
    "pseudo": {"rounds": 0},
    "cluster": {
        "partition": "segflow",  # not the cluster's default: proves the config reaches sbatch
        # Well above a training job's peak (about 1.5 GB with its Snakemake job step): SLURM
        # enforces the limit, and a kill would show up as a retry.
        "rules": {rule: {"mem_mb": JOB_MEM_MB, "runtime": 20} for rule in SUBMITTED_RULES},
    },
}


# No accounting daemon here: squeue for job states (MinJobAge=300), no account. The first
# status check 1 s after a submission (the plugin then waits 10 s longer after each check that
# finds no job finished): the jobs here take seconds, and every check is a cheap squeue.
SLURM_FLAGS = (
    "--profile",
    "profiles/slurm",
    "--slurm-status-command",
    "squeue",
    "--slurm-no-account",
    "--slurm-init-seconds-before-status-checks",
    "1",
)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The targets run locally (no profile) with SLURM_RUN: the reference the cluster run must
    equal, and the finished data stages the memory-retry test starts from."""
    local = copy_workflow(tmp_path_factory.mktemp("slurm-local") / "local")
    # Targets first: --configfile takes every word after it.
    run_snakemake(local, *TARGETS, "--configfile", write_config(local, SLURM_RUN))
    return local


@pytest.mark.slurm
def test_slurm_profile_runs_jobs_through_sbatch_like_a_local_run(
    slurm_cluster: Path, local_run: Path, tmp_path: Path
) -> None:
    local = local_run
    cluster = copy_workflow(tmp_path / "cluster")
    logdir = tmp_path / "slurm-logs"
    result = run_snakemake(
        cluster,
        *TARGETS,
        *SLURM_FLAGS,
        "--slurm-logdir",
        str(logdir),
        "--slurm-keep-successful-logs",
        "--configfile",
        write_config(cluster, SLURM_RUN),
    )
    output = result.stdout + result.stderr
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", output)
    assert len(job_ids) == len(SUBMITTED_RULES), output[-3000:]

    # slurmctld's own record of those jobs.
    jobs = {
        rule: (job_id, state, partition, memory)
        for job_id, rule, state, partition, memory in slurm_jobs(job_ids)
    }
    assert set(jobs) == SUBMITTED_RULES  # generate_demo_data is a localrule: not submitted
    for rule, (job_id, state, partition, memory) in jobs.items():
        assert state == "COMPLETED", (rule, state)
        assert partition == "segflow", rule
        assert memory == f"{JOB_MEM_MB}M", rule
        assert list(logdir.rglob(f"{job_id}.log")), f"no SLURM log of job {job_id} ({rule})"

    manifests = [
        pd.read_parquet(root / "results/ingest/manifest.parquet").assign(
            image_path=lambda frame, root=root: frame["image_path"].map(
                lambda path: str(Path(path).relative_to(root))
            )
        )
        for root in (local, cluster)
    ]
    pd.testing.assert_frame_equal(*manifests)
    # The targets are train-side: the test side's arrays (preprocess_test) are not made.
    for relative in (r for r in DATA_ARTIFACTS if not r.startswith("preprocess/test_")):
        ours = (cluster / "results" / relative).read_bytes()
        assert ours == (local / "results" / relative).read_bytes(), relative

    fold = Path("results/models/unet_lite0/round0/fold0")
    model_local, _ = load_checkpoint(local / fold / "model.pt")
    model_cluster, _ = load_checkpoint(cluster / fold / "model.pt")
    local_state, cluster_state = model_local.state_dict(), model_cluster.state_dict()
    assert local_state.keys() == cluster_state.keys()
    for key, tensor in local_state.items():
        assert torch.equal(tensor, cluster_state[key]), key
    history_local = pd.read_csv(local / fold / "history.csv").drop(columns="seconds")
    history_cluster = pd.read_csv(cluster / fold / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history_local, history_cluster)
    assert len(history_cluster) == 1


def slurm_jobs(job_ids: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(job id, rule, state, partition, memory) of each job, as slurmctld reports them; the
    rule comes from the job's sbatch --comment."""
    queue = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%k|%T|%P|%m"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = []
    for line in queue.splitlines():
        job_id, comment, state, partition, memory = line.split("|")
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", comment).group(1)
        jobs.append((job_id, rule, state, partition, memory))
    return sorted(jobs, key=lambda job: int(job[0]))


# Below what `segflow folds` (and the Snakemake job step that starts it, ~200 MB each) needs:
# SLURM kills the first attempt, and the profile's retries ask for 2x, then 3x.
STARVED_MEM_MB = 150


@pytest.mark.slurm
def test_job_killed_for_memory_is_retried_with_more(
    slurm_cluster: Path, local_run: Path, tmp_path: Path
) -> None:
    """make_folds starved of memory on the cluster; its inputs (ingest, dedup) are the local
    run's, copied with Snakemake's records, so make_folds is the only job submitted."""
    workdir = tmp_path / "cluster"
    shutil.copytree(local_run, workdir, symlinks=True)  # copy2: the same mtimes
    shutil.rmtree(workdir / "results" / "folds")
    run = {
        **SLURM_RUN,
        "cluster": {"rules": {"make_folds": {"mem_mb": STARVED_MEM_MB}}},
    }
    result = run_snakemake(
        workdir,
        "results/folds/folds.csv",
        *SLURM_FLAGS,
        "--slurm-logdir",
        str(tmp_path / "slurm-logs"),
        "--configfile",
        write_config(workdir, run),
    )
    output = result.stdout + result.stderr
    jobs = slurm_jobs(re.findall(r"submitted with SLURM jobid (\d+)", output))
    attempts = [job for job in jobs if job[1] == "make_folds"]
    assert attempts == jobs and len(attempts) >= 2, (jobs, output[-3000:])
    # Each attempt asked for mem_mb x attempt; all but the last were killed by slurmstepd for
    # exceeding it (state FAILED without cgroups), the last completed.
    assert [memory for *_, memory in attempts] == [
        f"{STARVED_MEM_MB * attempt}M" for attempt in range(1, len(attempts) + 1)
    ]
    for job_id, _, state, _, _ in attempts[:-1]:
        log = next((tmp_path / "slurm-logs").rglob(f"{job_id}.log")).read_text()
        assert state == "FAILED" and "Exceeded job memory limit" in log, (job_id, state, log)
    assert attempts[-1][2] == "COMPLETED", attempts
    folds = pd.read_csv(workdir / "results/folds/folds.csv")
    assert len(folds) > 0 and set(folds["fold"]) == {0, 1}
