#!/usr/bin/env bash
# One data point for strategy selection on SmolLM2 (n = 8): the paper's angular rule against the
# exact calibration-loss search, judged on held-out LAMBADA text (calibration: CoQA stories).
set -euo pipefail
OUT=${1:-bench/results/selection-smollm2}
LP=".venv/bin/layerprune"
export OMP_NUM_THREADS=1
for strategy in angular loss; do
  $LP prune smollm2-135m --n 8 --strategy "$strategy" --samples 32 --seq-len 256 --out "$OUT/$strategy" --overwrite
  $LP evaluate "$OUT/$strategy" --tasks loss --out "$OUT/$strategy-loss.json"
done
