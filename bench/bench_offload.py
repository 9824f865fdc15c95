"""Peak memory and time of the analysis with and without --offload, each in its own process.

python bench/bench_offload.py smollm2-135m gemma3-270m --samples 16 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SCRIPT = """
import json, resource, time, torch
torch.set_num_threads(1)
from layerprune import analyze
start = time.perf_counter()
result = analyze({model!r}, samples={samples}, seq_len={seq_len}, offload={offload}, progress=False)
print(json.dumps({{"seconds": time.perf_counter() - start, "best8": result.best.get(8),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    print(f"{'model':14} {'mode':10} {'peak RSS MB':>12} {'seconds':>8}  l*(8)")
    for model in args.models:
        for offload in (False, True):
            code = SCRIPT.format(model=model, samples=args.samples, seq_len=args.seq_len, offload=offload)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            mode = "offload" if offload else "in memory"
            print(f"{model:14} {mode:10} {r['peak_rss_mb']:>12.0f} {r['seconds']:>8.1f}  {r['best8']}")
