#!/usr/bin/env bash
# Copy a finished sweep's small outputs (CSV, JSON, figures, report) under docs/results/NAME.
#   bash bench/publish_results.sh bench/results/sweep-smollm2 smollm2-135m
set -euo pipefail
src=$1; name=$2; dst=docs/results/$name
mkdir -p "$dst/figures"
cp "$src/results.csv" "$src/results.json" "$src/sweep.json" "$src/report.html" "$dst/"
cp "$src/analysis/distances.json" "$src/analysis/distances.csv" "$dst/"
cp "$src/analysis/heatmap.png" "$dst/figures/"
cp "$src"/figures/*.png "$dst/figures/"
if [ -d "$src/sensitivity" ]; then mkdir -p "$dst/sensitivity"; cp "$src"/sensitivity/* "$dst/sensitivity/"; fi
echo "published $dst"
