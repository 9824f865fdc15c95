#!/usr/bin/env bash
# The full runs behind docs/results/: the paper's sweep on both packaged models.
#   bash bench/full_sweeps.sh smollm2   # or gemma3
# Settings are sized for a 2-core CPU (healing is plain fp32 LoRA: 4-bit QLoRA is several times
# slower on a CPU); each run resumes if interrupted.
set -euo pipefail
LP=".venv/bin/layerprune"
export OMP_NUM_THREADS=1
case "${1:-smollm2}" in
  smollm2)
    $LP sweep smollm2-135m --out bench/results/sweep-smollm2 \
      --fractions 0,0.1,0.3,0.5 --strategies angular,deepest \
      --tasks sciq,piqa,arc_easy,loss --limit 60 \
      --heal --heal-no-quant --heal-steps 20 --heal-lr 2e-3 --heal-batch-size 4 --heal-grad-accum 1 --heal-seq-len 256 ;;
  gemma3)
    $LP sweep gemma3-270m --out bench/results/sweep-gemma3 \
      --fractions 0,0.22,0.44 --strategies angular,deepest \
      --tasks piqa,arc_easy,loss --limit 40 \
      --heal --heal-no-quant --heal-steps 10 --heal-lr 2e-3 --heal-batch-size 4 --heal-grad-accum 1 --heal-seq-len 128 ;;
esac
