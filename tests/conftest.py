"""Shared fixtures: tiny models of every supported family built from configs, and the packaged real models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=272,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Per-family deviations from COMMON, so every family's tiny model has 6 layers.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3},
    "qwen3": {},
    "gemma2": {"sliding_window": 8},
    "gemma3_text": {"sliding_window": 8, "sliding_window_pattern": 3},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "gpt_neox": {"num_key_value_heads": None, "head_dim": None},
    "gpt2": {
        "n_embd": 64,
        "n_layer": 6,
        "n_head": 4,
        "n_positions": 512,
        "hidden_size": None,
        "intermediate_size": None,
        "num_hidden_layers": None,
        "num_attention_heads": None,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": None,
    },
}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    kwargs = {k: v for k, v in {**COMMON, **FAMILIES[model_type]}.items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    config.architectures = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    # random init with small std makes layers near-identity; widen it so layers differ
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer (3 specials + 256 bytes, BOS first) built in code, for the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(sorted(byte_chars))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def save_tiny(model, folder: Path, shard_size: str | None = None) -> Path:
    model.save_pretrained(folder, max_shard_size=shard_size) if shard_size else model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # side files that must travel with a pruned checkpoint
    return folder


def folder_digest(folder: Path) -> str:
    """A hash of every file's name and bytes, to prove an input was not changed."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from layerprune.runtime.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    from layerprune.runtime.models import resolve_model

    return resolve_model("gemma3-270m")


def sweep_config(text, **changes):
    """A sweep small enough for a test: 3 points per strategy, 2 healing steps, 6 documents per task."""
    from layerprune.config import build
    from layerprune.healing.lora import HealConfig
    from layerprune.sweep.run import SweepConfig

    heal = HealConfig(steps=2, batch_size=2, grad_accum=1, seq_len=32, data=str(text), quant=False)
    settings = dict(
        ns=(0, 1, 2),
        strategies=("angular", "deepest"),
        heal=True,
        heal_config=heal,
        tasks=("arc_easy", "loss", "kld"),
        limit=6,
        data=str(text),
        samples=8,
        seq_len=32,
    )
    return build(SweepConfig, {**settings, **changes})


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny base model and a text to calibrate and heal on, for sweeps."""
    root = tmp_path_factory.mktemp("sweep")
    base = save_tiny(tiny_model("qwen3", seed=2), root / "base")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Story {i}. The cat sat on the mat and looked at the dog. " * 3 for i in range(40)))
    return base, text


@pytest.fixture(scope="session")
def finished(setup, tmp_path_factory):
    """A finished sweep of the tiny model, shared by the sweep and report tests."""
    from layerprune.sweep.run import run_sweep

    base, text = setup
    out = tmp_path_factory.mktemp("run") / "sweep"
    run_sweep(base, out, sweep_config(text), progress=False)
    return out


HEAL_TEXT = "\n\n".join(
    f"Story {i}. The little cat sat on the warm mat while the old dog slept by the door. " * 2 for i in range(60)
)


@pytest.fixture
def base(tmp_path):
    """A tiny Llama checkpoint to heal."""
    return save_tiny(tiny_model("llama", seed=1), tmp_path / "base")


@pytest.fixture
def text(tmp_path):
    """Text to heal on."""
    path = tmp_path / "heal.txt"
    path.write_text(HEAL_TEXT)
    return path


@pytest.fixture(scope="module")
def full_and_pruned(tmp_path_factory):
    """A tiny llama saved to disk, and its copy without layers 1-3: (root, full, pruned)."""
    from layerprune import prune

    root = tmp_path_factory.mktemp("deploy")
    full = save_tiny(tiny_model("llama", seed=8), root / "full")
    pruned = prune(full, root / "pruned", layers=[1, 2, 3]).path
    return root, full, pruned


def assert_one_line_error(result, *fragments):
    """A command refused in one line, `error: ...`, with each fragment and no traceback."""
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
