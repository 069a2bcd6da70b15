#!/usr/bin/env bash
# The prepared GPU check: one command, at most ~8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh [--dry] [OUT_DIR]
#
# Runs, in order, each under its own time limit:
#   1. the `gpu`-marked tests (pytest -m gpu),
#   2. benchmarks/bench_train.py at 128 and 256 px on 4,000 synthetic images (loader alone,
#      model step on device tensors, end to end, and the ratio), bf16 + channels-last on CUDA,
#   3. the TGS GPU recipe (config/examples/tgs-salt-gpu.yaml) with its budget cut to 2 minutes,
#      when its data is there (../shared/datasets/tgs-salt); else it says so (no-data),
# and writes every figure to OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md
# (default OUT_DIR: $OUT if set, else benchmarks/results/gpu_check).
#
# --dry runs the whole script on the CPU in a minute or two (tiny sizes and counts): the check
# of the script itself. Environment: PYTHON (default: python), SNAKEMAKE (default: snakemake).
set -uo pipefail

dry=0
if [[ "${1:-}" == "--dry" ]]; then
    dry=1
    shift
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/benchmarks/results/gpu_check}}"
python="${PYTHON:-python}"
snakemake="${SNAKEMAKE:-snakemake}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root" || exit 1
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

if ((dry)); then
    # the device input path forced on, so its code runs on the CPU too
    device=cpu sizes=32,64 images=256 seconds=1 workers=1 batch=8 path=on tgs_minutes=1
    tests_limit=120 bench_limit=150 tgs_limit=60
else
    device=cuda sizes=128,256 images=4000 seconds=4 workers="$(nproc)" batch=64 path=auto
    tgs_minutes=2
    tests_limit=100 bench_limit=210 tgs_limit=150
fi

started=$(date +%s)
step() { # name limit command...: run with a time limit, log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >>"$out/steps.txt"
    echo "gpu_check: $name rc=$rc ($(($(date +%s) - t0)) s), log $out/$name.log" >&2
}
: >"$out/steps.txt"

# 1. gpu-marked tests (they skip without CUDA, as in --dry on a CPU machine)
step gpu_tests "$tests_limit" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
    tests/test_device_augment.py

# 2. the training benchmark: loader, model step, end to end, ratio, at two sizes
step bench_train "$bench_limit" "$python" benchmarks/bench_train.py --device "$device" \
    --sizes "$sizes" --synthetic "$images" --seconds "$seconds" --workers "$workers" \
    --batch-size "$batch" --device-path "$path" --json "$out/bench_train.json"

# 3. the TGS GPU recipe, its budget cut to $tgs_minutes minute(s) (budget.minutes scales every
#    experiment's epochs to fit), results under OUT_DIR/tgs-salt-gpu
recipe=config/examples/tgs-salt-gpu.yaml
if [[ ! -f "$recipe" ]]; then
    echo "tgs_recipe missing 0" >>"$out/steps.txt"
elif [[ ! -d ../shared/datasets/tgs-salt/train/images ]]; then
    echo "tgs_recipe no-data 0" >>"$out/steps.txt"
else
    printf 'results_dir: %s\nbudget:\n  minutes: %s\n' "$out/tgs-salt-gpu" "$tgs_minutes" \
        >"$out/tgs-overlay.yaml"
    step tgs_recipe "$tgs_limit" "$snakemake" --profile profiles/default --cores all \
        --configfile "$recipe" "$out/tgs-overlay.yaml" --config gpus=1 --resources gpu=1
fi

"$python" - "$out" "$dry" "$(($(date +%s) - started))" <<'EOF'
import json
import subprocess
import sys
from pathlib import Path

out, dry, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, took = line.split()
    steps[name] = {"rc": rc, "seconds": int(took)}
try:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
except Exception as error:  # noqa: BLE001 - reported, not raised
    gpu = f"unknown ({error})"
bench = out / "bench_train.json"
figures = json.loads(bench.read_text())["bench_train"] if bench.is_file() else []
tests_log = out / "gpu_tests.log"
tests_tail = tests_log.read_text().strip().splitlines()[-1:] if tests_log.is_file() else []
commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
).stdout.strip()
tgs = {
    str(path.relative_to(out)): json.loads(path.read_text()).get("score")
    for path in sorted((out / "tgs-salt-gpu").glob("models/**/metrics.json"))
}
report = {
    "dry": dry,
    "gpu": gpu,
    "commit": commit,
    "total_seconds": seconds,
    "steps": steps,
    "gpu_tests": tests_tail[0] if tests_tail else "",
    "bench_train": figures,
    "tgs_fold_scores": tgs,
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
lines = [
    f"# GPU check{' (dry, CPU)' if dry else ''}",
    "",
    f"GPU: {gpu}; commit {commit}; {seconds} s in all.",
    "",
    "| step | rc | s |",
    "|---|---|---|",
    *(f"| {name} | {s['rc']} | {s['seconds']} |" for name, s in steps.items()),
    "",
    f"gpu tests: {report['gpu_tests']}",
    "",
    "| px | images | device path | loader img/s | step img/s | end-to-end img/s | ratio |",
    "|---|---|---|---|---|---|---|",
    *(
        f"| {f['size']} | {f['images']} | {f['device_path']} | {f['loader_images_per_s']:,.0f} "
        f"| {f['step_images_per_s']:,.0f} | {f['end_to_end_images_per_s']:,.0f} "
        f"| {f['ratio']:.2f} |"
        for f in figures
    ),
    "",
    "TGS recipe fold scores: "
    + (", ".join(f"{k}: {v}" for k, v in tgs.items()) or "none (see the steps table)"),
]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
failed = [name for name, s in steps.items() if s["rc"] not in ("0", "no-data", "missing")]
sys.exit(1 if failed or not figures else 0)
EOF
