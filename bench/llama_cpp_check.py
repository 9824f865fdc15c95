"""A pruned GGUF in llama.cpp itself: it loads, it generates, and its perplexity matches ours.

pip install llama-cpp-python     # builds llama.cpp from source (about 4 minutes on 2 cores here)
python bench/llama_cpp_check.py --passages 40
python bench/llama_cpp_check.py --passages 40 --repaired   # the repaired checkpoints' GGUF exports

Not part of CI: llama-cpp-python is no dependency of layerprune. For each packaged model, the GGUF
is pruned GGUF to GGUF (`deepest`: SmolLM2 loses 4 layers, Gemma 3 a block of 6, which keeps its
attention pattern), then both the original and the pruned file are loaded in llama.cpp and by
layerprune (transformers' GGUF loader, dequantized to fp32). Each LAMBADA passage is tokenized once,
by llama.cpp, and the same token ids go to both, so the per-passage losses pair up; the paired
bootstrap of `layerprune.evaluation.uncertainty` gives the difference's interval. llama.cpp multiplies the
quantized weights with quantized activations, so its loss differs from ours by a little; the
point is that pruning moves both by the same amount.

`--repaired` checks the export of a repaired cut instead (`prune --repair linear` on the layers of
REPAIRED, then `export --format gguf --outtype f16`): llama.cpp on the GGUF against transformers on
the repaired safetensors checkpoint in fp32, paired on the same token ids (goal: within 0.05 nat).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

CASES = {"smollm2-135m": 4, "gemma3-270m": 6}
REPAIRED = {"smollm2-135m": list(range(11, 19)), "gemma3-270m": list(range(13, 17))}  # the angular cuts, ~25%
MAX_TOKENS = 256
PROMPT = "The capital of France is"


def llama_cpp_losses(path: Path, passages: list[list[int]]) -> list[tuple[float, int]]:
    """(summed next-token loss, tokens) of each passage, by llama.cpp."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=MAX_TOKENS, logits_all=True, verbose=False)
    losses = []
    for ids in passages:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        losses.append((float(-logprobs[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1))
    print(f"  llama.cpp, {path.name}: {llm(PROMPT, max_tokens=20, temperature=0)['choices'][0]['text']!r}")
    return losses


def our_losses(path: Path, passages: list[list[int]]) -> list[tuple[float, int]]:
    """The same, by transformers in fp32: a checkpoint folder, or a GGUF through its GGUF loader
    (layerprune's evaluation path for a GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM

    where = {"gguf_file": path.name} if path.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if path.is_file() else path, dtype=torch.float32,
                                                 **where).eval()  # fmt: skip
    losses = []
    with torch.no_grad():
        for ids in passages:
            tokens = torch.tensor([ids])
            logits = model(input_ids=tokens).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum")
            losses.append((float(loss), len(ids) - 1))
    return losses


def as_documents(losses: list[tuple[float, int]]) -> Any:
    """Per-passage (summed loss, tokens) as the paired comparisons' Documents."""
    from layerprune.evaluation.uncertainty import Documents

    ids = tuple(map(str, range(len(losses))))
    return Documents(ids, tuple(s for s, _ in losses), tuple(float(t) for _, t in losses))


def repaired(texts: list[str], tmp: Path) -> None:
    """Each model's repaired cut, as a checkpoint (transformers) and as its f16 GGUF (llama.cpp)."""
    from llama_cpp import Llama

    from layerprune import prune
    from layerprune.evaluation.uncertainty import compare
    from layerprune.recipes.export import export_gguf

    for name, layers in REPAIRED.items():
        folder = prune(name, tmp / f"{name}-repaired", layers=layers, repair="linear", progress=False).path
        gguf = export_gguf(folder, tmp / f"{name}-repaired.gguf", outtype="f16").path
        vocab = Llama(str(gguf), vocab_only=True, verbose=False)
        passages = [vocab.tokenize(text.encode(), add_bos=True)[:MAX_TOKENS] for text in texts]
        print(f"{name}, layers {layers[0]}-{layers[-1]} removed and repaired: {len(texts)} LAMBADA passages")
        ours, theirs = as_documents(our_losses(folder, passages)), as_documents(llama_cpp_losses(gguf, passages))
        c = compare(ours, theirs, higher_is_better=False)
        low, high = c.change_interval
        print(f"  loss: checkpoint (transformers, fp32) {c.reference:.4f}, GGUF f16 (llama.cpp) {c.candidate:.4f}; "
              f"difference {c.change:+.4f} [{low:+.4f}, {high:+.4f}] (paired 95%)")  # fmt: skip


def main() -> None:
    from llama_cpp import Llama

    from layerprune import prune
    from layerprune.data import load_documents
    from layerprune.evaluation.uncertainty import compare
    from layerprune.runtime.models import gguf_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--repaired", action="store_true", help="check repaired cuts' GGUF exports instead")
    args = parser.parse_args()
    texts = load_documents("lambada")[: args.passages]
    with tempfile.TemporaryDirectory() as tmp:
        if args.repaired:
            repaired(texts, Path(tmp))
            return
        for name, n in CASES.items():
            source = gguf_file(name)
            pruned = prune(name, Path(tmp) / f"{name}-pruned.gguf", n=n, strategy="deepest").path
            vocab = Llama(str(source), vocab_only=True, verbose=False)
            passages = [vocab.tokenize(text.encode(), add_bos=True)[:MAX_TOKENS] for text in texts]
            print(f"{name}: {args.passages} LAMBADA passages, {sum(map(len, passages))} tokens; layers removed: {n}")
            results = {}
            for label, path in (("original", source), ("pruned", pruned)):
                for engine, losses in (("llama.cpp", llama_cpp_losses), ("ours", our_losses)):
                    results[label, engine] = as_documents(losses(path, passages))
            for label in ("original", "pruned"):
                c = compare(results[label, "ours"], results[label, "llama.cpp"], higher_is_better=False)
                low, high = c.change_interval
                print(f"  {label:8} loss: ours {c.reference:.4f}, llama.cpp {c.candidate:.4f}; llama.cpp - ours "
                      f"{c.change:+.4f} [{low:+.4f}, {high:+.4f}] (paired 95%)")  # fmt: skip
            for engine in ("ours", "llama.cpp"):
                c = compare(results["original", engine], results["pruned", engine], higher_is_better=False)
                print(f"  pruning's change in loss, {engine:9}: {c.change:+.4f} "
                      f"[{c.change_interval[0]:+.4f}, {c.change_interval[1]:+.4f}]")  # fmt: skip


if __name__ == "__main__":
    main()
