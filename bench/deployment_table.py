"""Markdown table of bench/deployment.sh: size, memory and speed (`bench`) beside held-out loss and
accuracy (`evaluate`) for the full, pruned, quantized and pruned + quantized models.

python bench/deployment_table.py bench/results/deployment-smollm2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = ["full", "pruned", "full-nf4", "pruned-nf4"]
LABELS = {"full": "full", "pruned": "pruned + healed", "full-nf4": "NF4", "pruned-nf4": "pruned + healed + NF4"}


def table(folder: Path) -> str:
    bench = json.loads((folder / "bench" / "bench.json").read_text())
    models = bench["models"]  # in the order NAMES
    base = models[0]
    lines = [
        "| model | layers | parameters | disk MB | peak RSS MB | prefill tok/s | decode tok/s | first token s "
        "| held-out loss | SciQ | PIQA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in zip(NAMES, models, strict=True):
        tasks = json.loads((folder / f"eval-{name}.json").read_text())["tasks"]
        decode = row["decode_tokens_per_s"]
        lines.append(
            f"| {LABELS[name]} | {row['num_layers']} | {row['parameters'] / 1e6:.1f} M "
            f"| {row['disk_bytes'] / 2**20:.0f} ({row['disk_bytes'] / base['disk_bytes']:.2f}×) "
            f"| {row['peak_memory_mb']:.0f} "
            f"| {row['prefill_tokens_per_s']['median']:.0f} "
            f"| {decode['median']:.1f} ({decode['min']:.1f}–{decode['max']:.1f}) "
            f"| {row['time_to_first_token_s']['median']:.3f} "
            f"| {tasks['loss']['loss']:.3f} | {tasks['sciq']['acc']:.2f} | {tasks['piqa']['acc']:.2f} |"
        )
    settings = bench.get("settings", {})
    return "\n".join(lines) + (f"\n\nbench settings: {settings}" if settings else "")


if __name__ == "__main__":
    for folder in map(Path, sys.argv[1:]):
        print(f"## {folder.name}\n\n{table(folder)}\n")
