"""How much calibration a linear repair needs, and which ridge suits a small calibration.

python bench/repair_calibration.py --model smollm2-135m --layers 11-18 --docs 8,16,32,64,128,256 \
    --ridges 1e-4,1e-3,1e-2,1e-1 --limit 100 --out /tmp/repair/calibration-smollm2-11-18.json

One pass of the full model over the largest calibration (CoQA, the analysis's default text, 256
tokens per document) sums the repair statistics of the block chunk by chunk, so the sums of the
first k documents, for every k asked, come from that one pass; the time each prefix's pass took is
recorded. For each k and each ridge share, the closed-form map is fitted, folded into a copy of the
model, the block is cut, and the LAMBADA loss is measured on the first `--limit` passages, paired
against the cut unrepaired on the same passages. Families whose MLP term passes through a norm
(Gemma 2/3, OLMo 2) are fitted through it by gradient steps, as `prune --repair linear` fits them,
on every token of the first k documents (the repair itself keeps at most `repair.SAMPLE_TOKENS`);
the ridge only sets their starting point, so they get one row per k.

python bench/repair_calibration.py --model gemma3-270m --layers 13-16 --docs 8,16,32,64,128,256 \
    --limit 100 --out /tmp/repair/calibration-gemma3-13-16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any


def losses(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    from layerprune.evaluation.harness import document_losses
    from layerprune.evaluation.uncertainty import Documents

    rows = document_losses(model, tokenizer, texts, 256, 8)
    return Documents(tuple(map(str, range(len(rows)))), tuple(r[0] for r in rows), tuple(float(r[1]) for r in rows))


def main() -> None:
    import torch

    from layerprune.architectures import find_architecture
    from layerprune.cut.surgery import prune_model
    from layerprune.data import Calibration
    from layerprune.evaluation.harness import text_documents
    from layerprune.evaluation.uncertainty import compare
    from layerprune.healing import repair
    from layerprune.runtime.models import load_model, resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="11-18", help="the removed block, first-last")
    parser.add_argument("--docs", default="8,16,32,64,128,256")
    parser.add_argument("--ridges", default="1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    first, last = map(int, args.layers.split("-"))
    removed, sizes = list(range(first, last + 1)), sorted(int(k) for k in args.docs.split(","))
    ridges = [float(r) for r in args.ridges.split(",")]

    model, tokenizer = load_model(resolve_model(args.model))
    arch = find_architecture(model.config)
    through = repair.through_norm(arch)
    if through:
        ridges = [repair.RIDGE]
    _, texts = text_documents("lambada", args.limit)
    calibration = Calibration(samples=sizes[-1])
    batches = calibration.batches(tokenizer)
    cut = copy.deepcopy(model)
    prune_model(cut, removed)
    unrepaired = losses(cut, tokenizer, texts)
    full = losses(model, tokenizer, texts)
    del cut

    snapshots, parts, seconds, seen = {}, [], 0.0, 0
    keep = 10**9 if through else 0  # a fit through the norm takes every token's rows
    for batch in batches:
        started = time.perf_counter()
        parts += repair.collect(model, [batch], [(first, last + 1)], keep_samples=keep, progress=False)
        seconds += time.perf_counter() - started
        seen += len(batch["input_ids"])
        if seen in sizes:
            snapshots[seen] = (repair.pooled(parts, keep), seconds)
    rows = []
    lost = unrepaired.estimate() - full.estimate()
    for docs, (stats, pass_seconds) in sorted(snapshots.items()):
        for share in ridges:
            started = time.perf_counter()
            if through:
                norm = arch.layer_list(model)[first - 1].get_submodule(arch.mlp_term)
                result = repair.fit_through_norm(stats, norm, cosine=False)
            else:
                result = repair.fit(stats, ridge=share)
            fit_seconds = time.perf_counter() - started
            repaired = copy.deepcopy(model)
            repair.fold(repaired, arch, first - 1, result)
            prune_model(repaired, removed)
            with torch.inference_mode():
                scored = losses(repaired, tokenizer, texts)
            change = compare(unrepaired, scored, higher_is_better=False)
            row = {"docs": docs, "tokens": stats.tokens, "ridge": share, "fit_residual": round(result.residual, 4),
                   "loss": round(scored.estimate(), 4), "change": round(change.change, 4),
                   "interval": [round(v, 4) for v in change.change_interval],
                   "recovered": round((unrepaired.estimate() - scored.estimate()) / lost, 3),
                   "pass_seconds": round(pass_seconds, 1), "fit_seconds": round(fit_seconds, 2)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            del repaired
    record = {"model": args.model, "layers": removed, "full_loss": full.estimate(), "cut_loss": unrepaired.estimate(),
              "passages": args.limit, "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
