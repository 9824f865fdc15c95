"""Analysis one layer at a time (--offload) gives the in-memory results, within a memory budget."""

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import save_tiny, tiny_model, tiny_tokenizer
from reference import assert_same_tables

import layerprune.measure.streaming as streaming
from layerprune.data import token_batches
from layerprune.errors import LayerpruneError
from layerprune.io.destinations import WRITER_SUFFIX, scratch_folder
from layerprune.measure.analysis import analyze, layer_distances
from layerprune.measure.streaming import SPILL_PREFIX, layer_distances_streamed, remove_stale_spills

DOCS = ["The quick brown fox jumps over the lazy dog.", "A b c", "Layer pruning removes whole blocks.", "Short."]


def test_offload_equals_in_memory(family, tmp_path):
    model = tiny_model(family)
    src = save_tiny(model, tmp_path / "model", shard_size="60KB")
    batches = token_batches(tiny_tokenizer(), DOCS, 4, 40, 3)
    expected_angular, expected_bi = layer_distances(model, batches, progress=False)
    angular, block_influence = layer_distances_streamed(src, batches, progress=False)
    assert_same_tables((angular, block_influence), (expected_angular, expected_bi), 1e-6)


def test_states_spill_to_disk_past_the_budget_and_are_cleaned_up(tmp_path, monkeypatch):
    model = tiny_model("llama")
    src = save_tiny(model, tmp_path / "model")
    batches = token_batches(tiny_tokenizer(), DOCS, 4, 40, 1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spill-root"))
    (tmp_path / "spill-root").mkdir()
    made = []
    real = streaming.scratch_folder
    monkeypatch.setattr(streaming, "scratch_folder", lambda parent, prefix: made.append(real(parent, prefix)) or made[-1])  # noqa: E501
    layer_mib = 0.15  # one tiny layer is about 0.14 MiB in fp32: almost no room for states
    angular, _ = layer_distances_streamed(src, batches, memory_budget=layer_mib * 2**20, progress=False)
    assert angular[1] == pytest.approx(layer_distances(model, batches, progress=False)[0][1], abs=1e-6)
    assert len(made) == 1 and made[0].name.startswith("layerprune-spill-"), "the states should have spilled to disk"
    assert glob.glob(str(tmp_path / "spill-root" / "layerprune-spill-*")) == []


def test_a_budget_smaller_than_one_layer_says_what_is_needed(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "model")
    batches = token_batches(tiny_tokenizer(), DOCS, 2, 20, 2)
    with pytest.raises(LayerpruneError, match=r"0.0 MiB is smaller than one layer: at least 0.1 MiB is needed"):
        layer_distances_streamed(src, batches, memory_budget=1000, progress=False)


def test_analyze_with_offload_records_it(tmp_path):
    src = save_tiny(tiny_model("gemma3_text"), tmp_path / "model")
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    offloaded = analyze(src, data=data, samples=4, seq_len=32, offload=True, progress=False)
    in_memory = analyze(src, data=data, samples=4, seq_len=32, offload=False, progress=False)
    assert offloaded.extra["offload"] is True and in_memory.extra["offload"] is False
    assert offloaded.extra["device"] == in_memory.extra["device"] == "cpu"
    assert offloaded.best == in_memory.best


@pytest.mark.slow
def test_spill_files_are_removed_when_the_run_is_terminated(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "model")
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    script = f"""
import glob, os, signal, tempfile
import layerprune.measure.streaming as streaming
from layerprune.measure.analysis import analyze
from layerprune.cli import _terminate
signal.signal(signal.SIGTERM, _terminate)  # as the CLI's entry point does
calls, real = [], streaming.run_layers
def run(*args):
    calls.append(1)
    if len(calls) == 8:  # mid-analysis, with states spilled
        print("spilled", len([p for p in glob.glob(tempfile.gettempdir() + "/{SPILL_PREFIX}*") if os.path.isdir(p)]))
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
streaming.run_layers = run
try:
    analyze({str(src)!r}, data={str(data)!r}, samples=4, seq_len=32, batch_size=1, offload=True,
            memory_budget_mb=0.15, progress=False)
except KeyboardInterrupt:
    print("interrupted")
"""
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(spill_root)}
    )
    assert "spilled 1" in done.stdout and "interrupted" in done.stdout, done.stderr
    assert list(spill_root.iterdir()) == []


def test_spills_of_killed_runs_are_removed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    alive = scratch_folder(tmp_path, SPILL_PREFIX)  # a run still going: this one
    dead = scratch_folder(tmp_path, SPILL_PREFIX)
    writer = dead.with_name(dead.name + WRITER_SUFFIX)
    writer.write_text(json.dumps({**json.loads(writer.read_text()), "pid": 999999999}))  # no such process
    for folder in (dead, alive):
        (folder / "0.pt").write_bytes(b"state")
    assert remove_stale_spills() == [dead]
    assert not dead.exists() and alive.exists()


def test_only_the_embedding_rows_the_data_uses_are_read(tmp_path):
    """A large vocabulary's table would outweigh a layer: the model gets only the used rows, and
    the renumbered ids give the same embeddings."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.io.checkpoint import read_header, shard_files
    from layerprune.measure.streaming import _used_embeddings

    model = tiny_model("gemma3_text")  # its embedding also scales by sqrt(hidden size)
    src = save_tiny(model, tmp_path / "model", shard_size="60KB")
    batches = token_batches(tiny_tokenizer(), DOCS, 4, 40, 3)
    entries = {k: e for shard in shard_files(src) for k, e in read_header(shard)[0].items()}
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    renumbered, loaded = _used_embeddings(empty, entries, batches)
    used = torch.unique(torch.cat([b["input_ids"].flatten() for b in batches]))
    assert loaded == ["model.embed_tokens.weight"]
    assert empty.get_input_embeddings().weight.shape == (len(used), 64) and len(used) < model.config.vocab_size
    with torch.no_grad():
        for before, after in zip(batches, renumbered, strict=True):
            expected = model.get_input_embeddings()(before["input_ids"])
            torch.testing.assert_close(empty.get_input_embeddings()(after["input_ids"]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("budget_layers", [None, 1.1])  # the next layer read ahead, or (budget of one layer) not
def test_offload_in_bf16_equals_in_memory_bf16(tmp_path, budget_layers):
    import torch

    from layerprune.architectures import find_architecture
    from layerprune.io.checkpoint import tensor_entries
    from layerprune.measure.streaming import _layer_bytes
    from layerprune.runtime.devices import Plan

    model = tiny_model("qwen3").to(torch.bfloat16)
    src = save_tiny(model, tmp_path / "model")
    batches = token_batches(tiny_tokenizer(), DOCS, 4, 40, 2)
    expected_angular, expected_bi = layer_distances(model, batches, progress=False)
    budget = None
    if budget_layers:
        layer = _layer_bytes(tensor_entries(src), find_architecture(model.config), 0, "bfloat16")
        budget = budget_layers * layer + 2**20  # room for one layer and the states, not for two layers
    angular, block_influence = layer_distances_streamed(src, batches, budget, Plan("cpu", "bfloat16"), progress=False)
    assert_same_tables((angular, block_influence), (expected_angular, expected_bi), 2e-3)
