"""The repair's wall time against a 20-step heal of the same cut, side by side in one process.

python bench/repair_time.py --model smollm2-135m --layers 11-18
python bench/repair_time.py --model gemma3-270m --layers 13-16
python bench/repair_time.py --model gemma3-270m --layers 13-16 --samples 8   # the repair's calibration
python bench/repair_time.py --model smollm2-135m --layers 11-18 --recipe qlora   # heal's default recipe

The model is loaded once and dropped, so that neither timed step pays for importing its modeling
code. The cut is pruned (no repair), then pruned with `--repair linear` (the time the record
states: model load, calibration pass and fit), then the plain cut is healed by 20 steps of a heal
recipe of `repair_grid.py`: `lora` (4 x 128 tokens, fp32 LoRA) or `qlora` (heal's default, QLoRA with
16 x 256 tokens a step). Prints the three times and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from repair_grid import HEALS, heal_config

    from layerprune import load_model, prune
    from layerprune.healing.lora import heal

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="11-18")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=64, help="the repair's calibration documents")
    parser.add_argument("--recipe", default="lora", choices=list(HEALS), help="the heal's recipe")
    parser.add_argument("--work", default="/tmp/repair-time")
    args = parser.parse_args()
    work, times = Path(args.work), {}
    load_model(args.model)  # imports the modeling code before anything is timed; the model is dropped
    started = time.perf_counter()
    cut = prune(args.model, work / "cut", layers=args.layers, overwrite=True, progress=False)
    times["prune"] = time.perf_counter() - started
    repaired = prune(args.model, work / "linear", layers=args.layers, repair="linear", samples=args.samples,
                     overwrite=True, progress=False)  # fmt: skip
    times["repair"] = repaired.record["repair"]["seconds"]
    started = time.perf_counter()
    heal(cut.path, work / "heal", heal_config(args.recipe, args.steps), overwrite=True)
    times["heal"] = time.perf_counter() - started
    ratio = {"repair_over_heal": round(times["repair"] / times["heal"], 3)}
    print(json.dumps({k: round(v, 1) for k, v in times.items()} | ratio))


if __name__ == "__main__":
    main()
