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

import torch

from layerprune.analysis import measure
from layerprune.data import load_documents
from layerprune.evaluation import evaluate
from layerprune.models import load_model
from layerprune.selection import calibration_batches, select_by_loss
from layerprune.surgery import prune_model


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
    heldout: dict[tuple[int, ...], float] = {}

    def heldout_loss(block: list[int]) -> float:
        if tuple(block) not in heldout:
            pruned = prune_model(copy.deepcopy(model), block)
            record = evaluate(pruned, ["loss"], limit=args.heldout, tokenizer=tokenizer)
            heldout[tuple(block)] = record["tasks"]["loss"]["loss"]
        return heldout[tuple(block)]

    print(f"{args.model}, n = {args.n}, calibration: {args.data} from document {args.skip}")
    print(f"held-out: the first {args.heldout} LAMBADA passages")
    print("| calibration | angular block | held-out | loss block | calibration loss | held-out | passes, s |")
    print("|---|---|---|---|---|---|---|")
    for samples in map(int, args.samples.split(",")):
        batches = calibration_batches(tokenizer, documents, samples, args.seq_len, 8)
        angular, _ = measure(model, batches, progress=False)
        start = min(range(len(angular[args.n]) - 1), key=angular[args.n].__getitem__)
        angular_block = list(range(start, start + args.n))
        chosen = select_by_loss(model, batches, args.n, "loss")
        calibration = min(c["loss"] for c in chosen.candidates)
        print(
            f"| {samples} × {args.seq_len} | {angular_block[0]}–{angular_block[-1]} "
            f"| {heldout_loss(angular_block):.3f} "
            f"| {chosen.removed[0]}–{chosen.removed[-1]} | {calibration:.3f} | {heldout_loss(chosen.removed):.3f} "
            f"| {chosen.forward_passes:.1f}, {chosen.seconds:.0f} |",
            flush=True,
        )
    for spec in filter(None, args.blocks.split(",")):
        first, last = map(int, spec.split("-"))
        print(f"block {first}–{last}: held-out loss {heldout_loss(list(range(first, last + 1))):.3f}", flush=True)


if __name__ == "__main__":
    main()
