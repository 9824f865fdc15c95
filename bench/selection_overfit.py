"""Does the `loss` search overfit its calibration data? For each calibration size, the block it
picks and that block's held-out loss, against `angular`'s block, on more held-out text than the
sweep used: the first LAMBADA passages. Calibration is CoQA by default; `--data lambada --skip 1000`
calibrates on other LAMBADA passages, to tell the calibration text's size from its kind.

python bench/selection_overfit.py gemma3-270m --n 2 --samples 16,48 --seq-len 128 --heldout 200
python bench/selection_overfit.py gemma3-270m --n 2 --samples 48 --data lambada --skip 1000 --heldout 200
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from layerprune.cut.surgery import prune_model
from layerprune.data import Calibration, load_documents
from layerprune.evaluation.harness import document_losses
from layerprune.layer_sets import parse_layers
from layerprune.measure.analysis import layer_distances
from layerprune.runtime.models import load_model
from layerprune.selection.scoring import calibration_batches, select_by_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--samples", default="16,48", help="calibration sizes, in documents")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=200, help="the first LAMBADA passages")
    parser.add_argument("--data", default="coqa", help="calibration corpus")
    parser.add_argument("--skip", type=int, default=0, help="calibration documents to skip first")
    parser.add_argument("--blocks", default="", help="more blocks to compare on held-out text, e.g. 7-8,8-9")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    documents = load_documents(args.data)[args.skip :]
    if args.data == "lambada" and args.skip < args.heldout:
        raise SystemExit("calibrating on LAMBADA needs --skip of at least --heldout, to stay disjoint")
    per_document: dict[tuple[int, ...], list[tuple[float, int]]] = {}

    def heldout_loss(block: list[int]) -> float:
        """Held-out loss with `block` removed, as `layerprune evaluate --tasks loss` computes it."""
        if tuple(block) not in per_document:
            pruned = prune_model(copy.deepcopy(model), block)
            per_document[tuple(block)] = document_losses(pruned, tokenizer, "lambada", args.heldout, 256, 8)
        scored = per_document[tuple(block)]
        return sum(s for s, _ in scored) / sum(c for _, c in scored)

    print(f"{args.model}, n = {args.n}, calibration: {args.data} from document {args.skip}")
    print(f"held-out: the first {args.heldout} LAMBADA passages")
    print("| calibration | angular block | held-out | loss block | calibration loss | held-out | passes, s |")
    print("|---|---|---|---|---|---|---|")
    for samples in map(int, filter(None, args.samples.split(","))):  # "" compares --blocks only
        batches = calibration_batches(Calibration(args.data, samples, args.seq_len, 8), tokenizer, documents)
        angular, _ = layer_distances(model, batches, progress=False)
        start = min(range(len(angular[args.n]) - 1), key=angular[args.n].__getitem__)
        angular_block = list(range(start, start + args.n))
        chosen = select_by_loss(model, batches, args.n, "loss")
        calibration = min(c["loss"] for c in chosen.scored)
        print(
            f"| {samples} × {args.seq_len} | {angular_block[0]}–{angular_block[-1]} "
            f"| {heldout_loss(angular_block):.3f} "
            f"| {chosen.removed[0]}–{chosen.removed[-1]} | {calibration:.3f} | {heldout_loss(chosen.removed):.3f} "
            f"| {chosen.forward_passes:.1f}, {chosen.seconds:.0f} |",
            flush=True,
        )
    blocks = [parse_layers(spec) for spec in filter(None, args.blocks.split(","))]
    for block in blocks:
        print(f"block {block[0]}–{block[-1]}: held-out loss {heldout_loss(block):.3f}", flush=True)
    if len(blocks) == 2:
        difference, stderr = paired_difference(*(per_document[tuple(b)] for b in blocks))
        print(f"difference, first block minus second: {difference:+.4f} ± {stderr:.4f} (paired standard error)")


def paired_difference(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> tuple[float, float]:
    """Difference of two token-weighted mean losses over the same documents, with its standard error
    from the per-document differences (ratio estimator)."""
    tokens = sum(c for _, c in a)
    mean_a, mean_b = sum(s for s, _ in a) / tokens, sum(s for s, _ in b) / tokens
    residuals = [(sa - mean_a * c) - (sb - mean_b * c) for (sa, c), (sb, _) in zip(a, b, strict=True)]
    n = len(residuals)
    return mean_a - mean_b, math.sqrt(n / (n - 1) * sum(r * r for r in residuals)) / tokens


if __name__ == "__main__":
    main()
