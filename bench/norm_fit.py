"""The fit through a norm (Gemma 2/3, OLMo 2): batch size and learning rate, held-out residual and time.

python bench/norm_fit.py --model gemma3-270m --layers 13-16 --settings 4096:3e-3,1024:1e-2

One pass of the full model collects the block's kept tokens (as `prune --repair` does). The fit
(`repair.fit_through_norm`, NORM_STEPS steps of Adam) then runs once per setting (tokens per batch
and learning rate) on the first 80% of those tokens, side by side in this one process, and each
map is scored on the last 20%: the least-squares residual (1 is the cut unrepaired) and the cosine
distance, with the fit's wall time. `--cosine` fits the cosine objective instead.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace


def main() -> None:
    import torch

    from layerprune.data import Calibration
    from layerprune.healing import repair
    from layerprune.runtime.models import load_model, resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--layers", default="13-16", help="the removed block, first-last")
    parser.add_argument("--settings", default="4096:3e-3,1024:1e-2", help="batch:learning-rate, comma-separated")
    parser.add_argument("--cosine", action="store_true")
    args = parser.parse_args()
    first, last = map(int, args.layers.split("-"))

    model, tokenizer = load_model(resolve_model(args.model))
    arch = repair.find_architecture(model.config)
    if not repair.through_norm(arch):
        raise SystemExit(f"{args.model}: its MLP term is not a norm's output; the closed form fits it")
    whole = repair.collect(model, Calibration().batches(tokenizer), [(first, last + 1)], repair.SAMPLE_TOKENS,
                           progress=False)[0]  # fmt: skip
    norm = arch.layer_list(model)[first - 1].get_submodule(arch.mlp_term)
    rest, y, x = (torch.cat([s[i] for s in whole.samples]) for i in range(3))
    split = int(0.8 * len(y))
    train = replace(whole, samples=[(rest[:split], y[:split], x[:split])])
    held = slice(split, None)
    with torch.no_grad():
        unrepaired = ((rest[held] + norm(y[held]) - x[held]) ** 2).sum()
    for setting in args.settings.split(","):
        batch, rate = setting.split(":")
        repair.NORM_BATCH, repair.NORM_LR = int(batch), float(rate)
        started = time.perf_counter()
        result = repair.fit_through_norm(train, norm, args.cosine)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            mapped = rest[held] + repair.mapped_term(model, arch, result, norm(y[held]), y[held])
            residual = float(((mapped - x[held]) ** 2).sum() / unrepaired)
            distance = float((1 - torch.nn.functional.cosine_similarity(mapped, x[held], dim=-1)).mean())
        print(json.dumps({"batch": int(batch), "lr": float(rate), "steps": repair.NORM_STEPS, "cosine": args.cosine,
                          "train_residual": round(result.residual, 5), "held_out_residual": round(residual, 5),
                          "held_out_cosine_distance": round(distance, 5), "seconds": round(seconds, 1),
                          "threads": torch.get_num_threads()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
