#!/usr/bin/env bash
# Issue 7's comparison: every strategy at n covering about 10-40% of the layers, judged on held-out
# LAMBADA loss and 0-shot SciQ/PIQA/ARC-Easy, before and after an equal short healing run.
# Calibration (analysis and loss scoring): CoQA stories; healing: CoQA; held-out: LAMBADA.
#   bash bench/selection_sweeps.sh smollm2   # or gemma3; resumes if interrupted
# Points whose strategies remove the same layers are computed once (`same_as` in results.json).
set -euo pipefail
LP=".venv/bin/layerprune"
export OMP_NUM_THREADS=1
STRATEGIES=deepest,angular,bi,angular-rerank,loss,iterative
HEAL=(--heal --heal-no-quant --heal-steps 10 --heal-lr 2e-3 --heal-batch-size 4 --heal-grad-accum 1 --heal-seq-len 128)
case "${1:-smollm2}" in
  smollm2)  # 30 layers: 10%, 23%, 40%
    $LP sweep smollm2-135m --out bench/results/selection-smollm2 --n 3,7,12 --strategies $STRATEGIES \
      --samples 16 --seq-len 128 --tasks sciq,piqa,arc_easy,loss --limit 50 "${HEAL[@]}" ;;
  gemma3)  # 18 layers: 11%, 22%, 39%
    $LP sweep gemma3-270m --out bench/results/selection-gemma3 --n 2,4,7 --strategies $STRATEGIES \
      --samples 16 --seq-len 128 --tasks sciq,piqa,arc_easy,loss --limit 25 "${HEAL[@]}" ;;
esac
