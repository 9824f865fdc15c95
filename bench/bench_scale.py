"""Issue 6 at scale, on a checkpoint larger than the memory it is given (see make_large_model.py).

memory-cap: `layerprune analyze` in a cgroup whose memory limit is below the model's fp32 size:
    with --offload, with --no-offload, and with neither (the automatic choice).
disk-prune: `layerprune prune --n N --strategy deepest` against `cp -r` of the same folder,
    alternating rounds, each timed with the `sync` that puts the bytes on disk; peak RSS of each.

sudo python bench/bench_scale.py memory-cap /tmp/llama-2b --limit-gb 3
python bench/bench_scale.py disk-prune /tmp/llama-2b --n 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERPRUNE = [sys.executable, "-m", "layerprune"]


def timed(command: list[str], cgroup: Path | None = None) -> dict:
    """Run `command`; its exit code, wall seconds (with a final sync) and peak RSS (kernel's count)."""

    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=enter_cgroup)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    subprocess.run(["sync"], check=True)
    return {
        "exit": os.waitstatus_to_exitcode(status),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "last_line": (output.strip().splitlines() or [""])[-1][-200:],
        "offload_announced": "one layer at a time" in output,
    }


def memory_cap(args: argparse.Namespace) -> dict:
    root = Path("/sys/fs/cgroup/memory")
    if not root.is_dir():
        raise SystemExit("needs a cgroup v1 memory controller at /sys/fs/cgroup/memory, and root")
    cgroup = root / "layerprune-bench"
    cgroup.mkdir(exist_ok=True)
    (cgroup / "memory.limit_in_bytes").write_text(str(int(args.limit_gb * 2**30)))
    common = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", "8"]
    runs = {}
    for mode in ("--offload", "--no-offload", "auto"):
        out = Path(tempfile.mkdtemp()) / "analysis"
        flags = [] if mode == "auto" else [mode]
        runs[mode] = timed([*LAYERPRUNE, "analyze", str(args.model), "--out", str(out), *common, *flags], cgroup)
        runs[mode]["wrote_distances"] = (out / "distances.json").is_file()
        shutil.rmtree(out.parent, ignore_errors=True)
    cgroup.rmdir()
    from layerprune.runtime.devices import model_bytes

    return {"model_fp32_gb": model_bytes(args.model, "float32") / 2**30, "limit_gb": args.limit_gb, "runs": runs}


def disk_prune(args: argparse.Namespace) -> dict:
    from layerprune.io.checkpoint import read_header, shard_files

    largest = max(e.length for s in shard_files(args.model) for e in read_header(s)[0].values())
    work = Path(tempfile.mkdtemp(dir=args.model.parent))
    commands = {
        "cp -r": ["cp", "-r", str(args.model), str(work / "copy")],
        "layerprune prune": [
            *LAYERPRUNE,
            "prune",
            str(args.model),
            "--out",
            str(work / "pruned"),
            "--n",
            str(args.n),
            "--strategy",
            "deepest",
        ],
    }
    baseline = timed([*LAYERPRUNE, "--help"])
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    subprocess.run(["cat", *map(str, shard_files(args.model))], stdout=subprocess.DEVNULL, check=True)  # warm cache
    for _ in range(args.rounds):
        for name, command in commands.items():
            runs[name].append(timed(command))
            shutil.rmtree(work / "copy", ignore_errors=True)
            shutil.rmtree(work / "pruned", ignore_errors=True)
    shutil.rmtree(work)
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    return {
        "model_gb": sum(p.stat().st_size for p in shard_files(args.model)) / 2**30,
        "shards": len(shard_files(args.model)),
        "largest_tensor_mb": largest / 2**20,
        "startup_peak_rss_mb": baseline["peak_rss_mb"],
        "startup_seconds": baseline["seconds"],  # the fixed start-up cost in the prune time (`layerprune --help`)
        "median_seconds": median,
        "ratio": median["layerprune prune"] / median["cp -r"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("memory-cap", "disk-prune"))
    parser.add_argument("model", type=Path)
    parser.add_argument("--limit-gb", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = memory_cap(args) if args.what == "memory-cap" else disk_prune(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
