"""Markdown tables of a selection sweep (bench/selection_sweeps.sh): for each n and strategy, the
layers removed, held-out loss and 0-shot accuracy before and after healing, and selection cost.

python bench/selection_table.py bench/results/selection-smollm2
"""

from __future__ import annotations

import json
import math
import sys
from functools import cache
from pathlib import Path

from layerprune.architectures import find_architecture
from layerprune.io.checkpoint import read_header, shard_files
from layerprune.runtime.models import resolve_model

ORDER = ["deepest", "angular", "bi", "angular-rerank", "loss", "iterative"]


def spans(layers: list[int]) -> str:
    """[11, 12, 13, 20] -> '11–13, 20'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}–{layer}" if layer != start else f"{layer}")
            start = None
    return ", ".join(parts)


@cache
def layer_share(model: str) -> float:
    """The share of a full forward pass that the decoder layers take, by parameters per token: what
    the analysis costs (it runs no LM head). The head is the rest: for Gemma 3's 262k vocabulary,
    most of a pass."""
    path = resolve_model(model)
    config = json.loads((path / "config.json").read_text())
    arch = find_architecture(config)
    layers = sum(
        math.prod(entry.shape)
        for shard in shard_files(path)
        for key, entry in read_header(shard)[0].items()
        if arch.split_layer_key(key)
    )
    head = config["vocab_size"] * config["hidden_size"]
    return layers / (layers + head)


def cost(sweep: Path, strategy: str, n: int) -> str:
    if strategy == "deepest":
        return "0"
    model = json.loads((sweep / "sweep.json").read_text())["model"]
    analysis = layer_share(model)
    if strategy in ("angular", "bi"):
        return f"{analysis:.2f} (analysis)"
    stored = json.loads((sweep / "selections" / f"{strategy}-n{n}.json").read_text())
    passes = stored["forward_passes"] + (analysis if strategy == "angular-rerank" else 0)
    return f"{passes:.1f}, {stored['seconds']:.0f} s"


def table(sweep: Path) -> str:
    rows = json.loads((sweep / "results.json").read_text())
    tasks = [t for t in ("sciq", "piqa", "arc_easy") if t in rows[0]["tasks"]]
    by_key = {(r["strategy"], r["n"], r["healed"]): r for r in rows}
    full = by_key["full", 0, False]
    lines = [
        f"Full model: held-out loss {full['tasks']['loss']['loss']:.3f}; "
        + ", ".join(f"{t} {full['tasks'][t]['acc']:.2f}" for t in tasks),
        "",
        "| n | strategy | layers removed | held-out loss | healed | "
        + " | ".join(f"{t} (healed)" for t in tasks)
        + " | cost: passes, time |",
        "|---|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for n in sorted({r["n"] for r in rows if r["n"]}):
        pruned = {s: by_key.get((s, n, False)) for s in ORDER}
        best = min(r["tasks"]["loss"]["loss"] for r in pruned.values() if r)
        for strategy in ORDER:
            row, healed = pruned[strategy], by_key.get((strategy, n, True))
            if row is None:
                continue
            loss = row["tasks"]["loss"]["loss"]
            shown = f"**{loss:.3f}**" if loss == best else f"{loss:.3f}"
            healed_loss = f"{healed['tasks']['loss']['loss']:.3f}" if healed else "–"
            accuracy = [
                f"{row['tasks'][t]['acc']:.2f} ({healed['tasks'][t]['acc']:.2f})"
                if healed
                else f"{row['tasks'][t]['acc']:.2f}"
                for t in tasks
            ]
            lines.append(
                f"| {n} | `{strategy}` | {spans(row['layers_removed'])} | {shown} | {healed_loss} | "
                + " | ".join(accuracy)
                + f" | {cost(sweep, strategy, n)} |"
            )
    return "\n".join(lines)


def checks(sweep: Path) -> str:
    """Is each loss-scored strategy at least as good as `angular` on held-out text, for every n?"""
    rows = json.loads((sweep / "results.json").read_text())
    loss = {(r["strategy"], r["n"], r["healed"]): r["tasks"]["loss"]["loss"] for r in rows}
    out = []
    for strategy in ("loss", "angular-rerank", "iterative"):
        for healed in (False, True):
            ns = sorted(n for s, n, h in loss if s == strategy and h == healed and ("angular", n, h) in loss)
            if not ns:
                continue
            worse = [n for n in ns if loss[strategy, n, healed] > loss["angular", n, healed] + 1e-9]
            verdict = f"at least as good at every n ({ns})" if not worse else f"worse at n = {worse} of {ns}"
            out.append(f"- `{strategy}` vs `angular`, {'healed' if healed else 'pruned'}: {verdict}")
    return "\n".join(out)


if __name__ == "__main__":
    for folder in map(Path, sys.argv[1:]):
        print(f"## {folder.name}\n\n{table(folder)}\n\n{checks(folder)}\n")
