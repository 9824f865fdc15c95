"""Write a random-weight Llama checkpoint of about 2.3B parameters (9.3 GB in fp32, 4.6 GB in bf16), in shards,
one shard at a time (this script holds at most one shard in memory), with SmolLM2's tokenizer.

It stands in for a model larger than the memory a run is given (issue 6): weights are random,
so only time, memory and agreement between methods mean anything, not the distances.

python bench/make_large_model.py /tmp/llama-2b --shard-gb 2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from layerprune.runtime.models import resolve_model


def tensors(config: LlamaConfig):
    """(name, shape) of every weight, in checkpoint order."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, shape in (
            ("self_attn.q_proj.weight", (h, h)),
            ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)),
            ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (i, h)),
            ("mlp.up_proj.weight", (i, h)),
            ("mlp.down_proj.weight", (h, i)),
            ("input_layernorm.weight", (h,)),
            ("post_attention_layernorm.weight", (h,)),
        ):
            yield prefix + name, shape
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bf16: as most hub models")
    args = parser.parse_args()
    tokenizer_src = resolve_model("smollm2-135m")
    config = LlamaConfig(
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=args.layers,
        num_attention_heads=20,
        num_key_value_heads=4,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype=args.dtype,
    )
    args.out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(args.out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shards.append(name)
        shard, shard_bytes = {}, 0

    total = 0
    for name, shape in tensors(config):
        tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        tensor = tensor.to(getattr(torch, args.dtype))
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > args.shard_gb * 2**30:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    # name shards as transformers does: model-0000k-of-0000N.safetensors
    final = {s: s.replace(".safetensors", f"-of-{len(shards):05d}.safetensors") for s in shards}
    for old, new in final.items():
        (args.out / old).rename(args.out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(args.out)
    for side in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / side, args.out / side)
    print(f"wrote {args.out}: {total / 1e9:.2f} GB of {args.dtype} in {len(shards)} shards")


if __name__ == "__main__":
    main()
