"""GGUF to GGUF pruning against `cp` of the same file, side by side: time and peak memory.

python bench/gguf_prune.py --rounds 5

For each packaged GGUF, in alternation (so both see the same page cache and load): `cp` of the
file, and `layerprune prune FILE --layers ... --out OUT.gguf` as a Python call (interpreter start
and library imports excluded; both run in fresh processes whose peak resident memory, VmHWM, is
read before and after). `cp` is `shutil.copyfile` (sendfile, as coreutils' cp copies in the
kernel). Gemma 3 loses 6 layers (a block of 6 keeps its attention pattern), SmolLM2 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
mode, source, out, layers = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
if mode == "prune":
    import gguf  # the libraries load before the clock starts, as the interpreter does
    from layerprune.cut.gguf_surgery import prune_gguf
def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
before = peak_kib()
started = time.perf_counter()
if mode == "cp":
    shutil.copyfile(source, out)
else:
    prune_gguf(source, out, layers, {}, overwrite=True)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib() / 1024, "growth_mib": (peak_kib() - before) / 1024}))
"""


def main() -> None:
    from layerprune.runtime.models import gguf_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {"smollm2-135m": list(range(25, 29)), "gemma3-270m": list(range(11, 17))}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layers in cases.items():
            source = gguf_file(name)
            runs: dict[str, list[dict]] = {"cp": [], "prune": []}
            for _ in range(args.rounds):
                for mode in runs:
                    out = Path(tmp) / f"{mode}.gguf"
                    command = [sys.executable, "-c", CHILD, mode, str(source), str(out), json.dumps(layers)]
                    done = subprocess.run(command, capture_output=True, text=True, check=True)
                    runs[mode].append(json.loads(done.stdout))
                    size = out.stat().st_size
                    out.unlink()
                    runs[mode][-1]["bytes"] = size
            cp, prune = (statistics.median(r["seconds"] for r in runs[m]) for m in ("cp", "prune"))
            ratios = [p["seconds"] / c["seconds"] for c, p in zip(runs["cp"], runs["prune"], strict=True)]
            growth = {m: max(r["growth_mib"] for r in runs[m]) for m in runs}
            print(f"{name}: {source.stat().st_size / 2**20:.1f} MiB -> {runs['prune'][0]['bytes'] / 2**20:.1f} MiB; "
                  f"cp {cp:.3f} s, prune {prune:.3f} s (median of {args.rounds}); prune / cp per round "
                  f"{min(ratios):.1f}-{max(ratios):.1f}; peak RSS growth: cp {growth['cp']:.0f} MiB, "
                  f"prune {growth['prune']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
