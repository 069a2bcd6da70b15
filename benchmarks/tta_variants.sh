#!/usr/bin/env bash
# TTA modes side by side on the models of one finished run: each variant reruns only the
# prediction side (predict_oof/test, evaluate, tuning, second level), never training.
#
# Usage: benchmarks/tta_variants.sh WORKDIR [CONFIG]   (WORKDIR: a clone where `make demo`,
# or `snakemake --configfile CONFIG`, has finished; CONFIG defaults to config/config.yaml)
# Prints, per variant, the summary's stage rows (raw and tuned OOF Kaggle metric).
set -euo pipefail
workdir=$(cd "$1" && pwd)
config=${2:-config/config.yaml}
out=$(mktemp -d)
cd "$workdir"
results=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['results_dir'])" "$config")

variant() {
  local name=$1
  shift
  printf '%s\n' "predict:" "$@" >"$out/$name.yaml"
  local start=$SECONDS
  snakemake --profile profiles/default --configfile "$config" "$out/$name.yaml" \
    --config gpus=0 --resources gpu=0 >"$out/$name.log" 2>&1
  echo "== $name ($((SECONDS - start)) s):" "$@"
  python -m segflow summary "$results" 2>/dev/null | grep '^| experiment\|^| stack_\|^| ensemble'
}

variant none "  tta: none"
variant hflip "  tta: hflip"
variant d4 "  tta: d4"
variant hflip-scales "  tta: hflip" "  tta_scales: [0.75, 1.0, 1.25]"
variant hflip-gmean "  tta: hflip" "  tta_merge: gmean"
variant d4-gmean "  tta: d4" "  tta_merge: gmean"
echo "(logs in $out; the last variant's predictions are left in $results)"
