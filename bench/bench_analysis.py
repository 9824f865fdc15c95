"""Time and peak memory of the full angular table (every n), side by side with:

- floor: one plain forward pass of the decoder over the same batches with `output_hidden_states`;
- pruneme: PruneMe's method, one full forward pass of the causal LM per block size n;
- short-transformers 1.0.0 (pip), at its batch size of 1, when `--short-transformers DIR` names
  a folder it was installed into (`pip install --no-deps --target DIR short-transformers seaborn`).

Each method runs in its own process (peak RSS of that process); timed work excludes loading.
Also reports whether each method chooses the same block l*(n) as layerprune for every n.

python bench/bench_analysis.py smollm2-135m --samples 16 --seq-len 128 --rounds 3 \
    --short-transformers /tmp/st-lib
python bench/bench_analysis.py gemma3-270m --rounds 5 --methods floor,layerprune   # against the floor only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, math, resource, sys, time, torch
torch.set_num_threads(1)
from layerprune.measure.analysis import layer_distances
from layerprune.data import load_documents, token_batches
from layerprune.runtime.models import load_model, resolve_model

method, model_name, samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model, tokenizer = load_model(resolve_model(model_name))
documents = load_documents("coqa")
batches = token_batches(tokenizer, documents, samples, seq_len, 8)
L = model.config.num_hidden_layers


def last_token_table(states_per_batch):
    # mean angular distance between the final-token states at l and l+n, for every (l, n)
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    count = 0
    for states, mask in states_per_batch:
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
        rows = torch.stack([s[torch.arange(s.shape[0]), last] for s in states], 1).double()
        unit = torch.nn.functional.normalize(rows, dim=-1)
        total += (torch.arccos((unit @ unit.transpose(1, 2)).clamp(-1, 1)) / math.pi).sum(0)
        count += rows.shape[0]
    mean = total / count
    return {n: [float(mean[l, l + n]) for l in range(L - n + 1)] for n in range(1, L)}


def best(table):
    return {n: min(range(len(v) - 1), key=v.__getitem__) for n, v in table.items() if len(v) > 1}


start = time.perf_counter()
if method == "layerprune":
    angular, _ = layer_distances(model, batches, progress=False)
    choice = best(angular)
elif method == "floor":
    with torch.inference_mode():
        for batch in batches:
            model.base_model(**batch, output_hidden_states=True, use_cache=False)
    choice = {}
elif method == "pruneme":
    # PruneMe (arcee-ai): compute_block_similarity runs the dataset through the whole causal LM
    # with output_hidden_states once per layers_to_skip = n, and keeps only that n's distances.
    choice = {}
    with torch.inference_mode():
        for n in range(1, L):
            collected = []
            for batch in batches:
                out = model(**batch, output_hidden_states=True, use_cache=False)
                collected.append((out.hidden_states, batch["attention_mask"]))
            choice[n] = best(last_token_table(collected))[n]
elif method == "short-transformers":
    from short_transformers import ShortTransformer
    from short_transformers.utils import get_best_pruning_start

    # transformers 5 decoder layers return a tensor; short-transformers indexes result[0] as in
    # transformers 4 (a tuple). The shim gives it a tuple and hands the model back the tensor.
    for layer in model.model.layers:
        plain = layer.forward
        layer.forward = lambda *a, _f=plain, **k: (_f(*a, **k),)
    model = ShortTransformer.from_model(model)
    for layer in model.model.layers:
        wrapped = layer.forward
        layer.forward = lambda *a, _f=wrapped, **k: _f(*a, **k)[0]
    dataset = [{"text": d} for d in documents[:samples]]
    result = model.analyse_layers(dataset=dataset, tokenizer=tokenizer, key="text", limit=samples, max_length=seq_len)
    choice = {n: int(get_best_pruning_start(result, n)) for n in range(1, L - 1)}
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"seconds": seconds, "choice": choice, "layers": L, "peak_rss_mb": rss}))
"""


def run(method: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if method == "short-transformers":
        env["PYTHONPATH"] = args.short_transformers
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, method, args.model, str(args.samples), str(args.seq_len)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = proc.communicate()
    if proc.returncode:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["choice"] = {int(k): v for k, v in result["choice"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short-transformers", default=None, help="folder short-transformers is installed in")
    parser.add_argument("--methods", default="floor,layerprune,pruneme", help="comma-separated, floor first")
    args = parser.parse_args()
    methods = args.methods.split(",") + (["short-transformers"] if args.short_transformers else [])
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_ in range(args.rounds):  # alternate, so load on the machine hits every method alike
        for method in methods:
            if method in ("pruneme", "short-transformers") and round_:
                continue  # slow methods: one round
            runs[method].append(run(method, args))
    ours = runs["layerprune"][0]["choice"]
    floor = statistics.median(r["seconds"] for r in runs["floor"])
    report = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "methods": {}}
    print(f"{args.model}, {args.samples} x {args.seq_len} tokens, one thread")
    print(f"{'method':20} {'seconds':>9} {'x floor':>8} {'peak RSS MB':>12}  agrees with layerprune on l*(n)")
    for method in methods:
        done = [r for r in runs[method] if "error" not in r]
        if not done:
            print(f"{method:20} failed: {runs[method][0]['error']}")
            report["methods"][method] = runs[method][0]
            continue
        seconds = statistics.median(r["seconds"] for r in done)
        rss = max(r["peak_rss_mb"] for r in done)
        choice = done[0]["choice"]
        same = [n for n in choice if choice[n] == ours.get(n)]
        agree = f"{len(same)}/{len(choice)} n" if choice else "-"
        if method == "short-transformers":  # its row n holds blocks of n + 1 layers (an off-by-one)
            shifted = [n for n in choice if choice[n] == ours.get(n + 1)]
            agree += f"; its n = our n + 1 on {len(shifted)}/{len(choice)}"
        print(f"{method:20} {seconds:>9.1f} {seconds / floor:>8.2f} {rss:>12.0f}  {agree}")
        report["methods"][method] = {
            "seconds": [r["seconds"] for r in done],
            "ratio_to_floor": seconds / floor,
            "peak_rss_mb": rss,
            "choice": choice,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
