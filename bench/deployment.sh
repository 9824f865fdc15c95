#!/usr/bin/env bash
# Issue 8: what pruning buys, alone and with 4-bit quantization, on both packaged models.
# Four models each: full, pruned (+ a short heal), quantized (NF4), pruned + quantized (NF4).
# For SmolLM2 the last is written in one command by `prune --heal --quantize`; for Gemma (slower
# to heal on a CPU) by `export` of the pruned model, which gives the same (the heal is seeded).
# Then, for the four:
# size, peak memory, prefill/decode speed and time to first token (`bench`, side by side in one
# run), and held-out loss + SciQ/PIQA 0-shot (`evaluate`, same documents for all four).
#   bash bench/deployment.sh smollm2   # or gemma3
set -euo pipefail
LP=".venv/bin/layerprune"
export OMP_NUM_THREADS=1
case "${1:-smollm2}" in
  smollm2) MODEL=smollm2-135m; N=8; LIMIT=100 ;;   # 8 of 30 layers (27%)
  gemma3)  MODEL=gemma3-270m;  N=5; LIMIT=50 ;;    # 5 of 18 layers (28%); 262k vocabulary: slower
esac
OUT=bench/results/deployment-$1
mkdir -p "$OUT"
HEAL=(--heal --heal-no-quant --heal-steps 20 --heal-lr 2e-3 --heal-batch-size 4 --heal-grad-accum 1 --heal-seq-len 256)
PRUNE=("$MODEL" --n "$N" --strategy angular --samples 32 --seq-len 128 "${HEAL[@]}")
[ -d "$OUT/pruned" ] || $LP prune "${PRUNE[@]}" --out "$OUT/pruned"
if [ ! -d "$OUT/pruned-nf4" ]; then
  if [ "$1" = smollm2 ]; then $LP prune "${PRUNE[@]}" --out "$OUT/pruned-nf4" --quantize nf4
  else $LP export "$OUT/pruned" --out "$OUT/pruned-nf4" --quantize nf4; fi
fi
[ -d "$OUT/full-nf4" ] || $LP export "$MODEL" --out "$OUT/full-nf4" --quantize nf4
$LP bench "$MODEL" "$OUT/pruned" "$OUT/full-nf4" "$OUT/pruned-nf4" --prompt-tokens 128 --new-tokens 32 \
  --batch-size 1 --repeats 5 --out "$OUT/bench"
for m in full pruned full-nf4 pruned-nf4; do
  src="$OUT/$m"; [ "$m" = full ] && src="$MODEL"
  [ -f "$OUT/eval-$m.json" ] || $LP evaluate "$src" --tasks sciq,piqa,loss --limit "$LIMIT" --out "$OUT/eval-$m.json"
done
