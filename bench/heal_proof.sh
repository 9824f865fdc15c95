#!/usr/bin/env bash
# Healing proof on the packaged SmolLM2-135M: prune 8 of 30 layers with `deepest`, heal with
# QLoRA on CoQA stories, and measure held-out loss on LAMBADA passages (disjoint from CoQA).
#   bash bench/heal_proof.sh [OUT_DIR] [STEPS]
set -euo pipefail
OUT=${1:-bench/results/heal-proof}
STEPS=${2:-60}
LP=".venv/bin/layerprune"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
$LP prune smollm2-135m --strategy deepest --n 8 --out "$OUT/pruned" --overwrite
$LP heal "$OUT/pruned" --out "$OUT/healed" --steps "$STEPS" --batch-size 4 --grad-accum 1 --seq-len 256 \
    --save-every 20 --overwrite
for model in smollm2-135m "$OUT/pruned" "$OUT/healed"; do
  $LP evaluate "$model" --tasks loss --out "$OUT/$(basename "$model")-loss.json"
done
