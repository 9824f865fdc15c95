"""Peak memory and time of the analysis with and without --offload, each in its own process.

A third process only loads the tokenizer and tokenizes the calibration data, as every analysis
does first: its peak is the floor that neither mode can go below (Python, torch, transformers,
and for Gemma 3 a 262k-token tokenizer).

python bench/bench_offload.py smollm2-135m gemma3-270m --samples 16 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PRELUDE = """
import json, resource, time, torch
torch.set_num_threads(1)
from layerprune import analyze
start = time.perf_counter()
"""
RESULT = """
print(json.dumps({{"seconds": time.perf_counter() - start, "best8": {best8},
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
ANALYZE = """
result = analyze({model!r}, samples={samples}, seq_len={seq_len}, offload={offload}, progress=False)
"""
TOKENIZE_ONLY = """
from transformers import AutoTokenizer
from layerprune.data import load_documents, token_batches
from layerprune.runtime.models import resolve_model
tokenizer = AutoTokenizer.from_pretrained(resolve_model({model!r}))
batches = token_batches(tokenizer, load_documents("coqa"), {samples}, {seq_len}, 8)
"""


def run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    print(f"{'model':14} {'mode':14} {'peak RSS MB':>12} {'above floor':>12} {'seconds':>8}  l*(8)")
    for model in args.models:
        options = {"model": model, "samples": args.samples, "seq_len": args.seq_len}
        floor = run(PRELUDE + TOKENIZE_ONLY.format(**options) + RESULT.format(best8="None"))
        rows = {"tokenize only": floor}
        for offload in (False, True):
            code = PRELUDE + ANALYZE.format(**options, offload=offload) + RESULT.format(best8="result.best.get(8)")
            rows["offload" if offload else "in memory"] = run(code)
        for mode, r in rows.items():
            above = r["peak_rss_mb"] - floor["peak_rss_mb"]
            print(f"{model:14} {mode:14} {r['peak_rss_mb']:>12.0f} {above:>12.0f} {r['seconds']:>8.1f}  {r['best8']}")
