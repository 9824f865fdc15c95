"""Analysis one layer at a time (--offload) gives the in-memory results, within a memory budget."""

import glob
import tempfile

import pytest
from conftest import save_tiny, tiny_model, tiny_tokenizer

from layerprune.analysis import analyze, measure
from layerprune.data import token_batches
from layerprune.errors import LayerpruneError
from layerprune.streaming import measure_streaming

DOCS = ["The quick brown fox jumps over the lazy dog.", "A b c", "Layer pruning removes whole blocks.", "Short."]


def test_offload_equals_in_memory(family, tmp_path):
    model = tiny_model(family)
    src = save_tiny(model, tmp_path / "model", shard_size="60KB")
    batches = token_batches(tiny_tokenizer(), DOCS, 4, 40, 3)
    expected_angular, expected_bi = measure(model, batches, progress=False)
    angular, block_influence = measure_streaming(src, batches, progress=False)
    for n, row in expected_angular.items():
        assert angular[n] == pytest.approx(row, abs=1e-6)
    assert block_influence == pytest.approx(expected_bi, abs=1e-6)


def test_states_spill_to_disk_past_the_budget_and_are_cleaned_up(tmp_path, monkeypatch):
    model = tiny_model("llama")
    src = save_tiny(model, tmp_path / "model")
    batches = token_batches(tiny_tokenizer(), DOCS, 4, 40, 1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spill-root"))
    (tmp_path / "spill-root").mkdir()
    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    layer_mib = 0.15  # one tiny layer is about 0.14 MiB in fp32: almost no room for states
    angular, _ = measure_streaming(src, batches, memory_budget=layer_mib * 2**20, progress=False)
    assert angular[1] == pytest.approx(measure(model, batches, progress=False)[0][1], abs=1e-6)
    assert len(made) == 1 and "layerprune-spill-" in made[0], "the states should have spilled to disk"
    assert glob.glob(str(tmp_path / "spill-root" / "layerprune-spill-*")) == []


def test_a_budget_smaller_than_one_layer_says_what_is_needed(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "model")
    batches = token_batches(tiny_tokenizer(), DOCS, 2, 20, 2)
    with pytest.raises(LayerpruneError, match=r"0.0 MiB is smaller than one layer: at least 0.1 MiB is needed"):
        measure_streaming(src, batches, memory_budget=1000, progress=False)


def test_analyze_with_offload_records_it(tmp_path):
    src = save_tiny(tiny_model("gemma3_text"), tmp_path / "model")
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    offloaded = analyze(src, data=data, samples=4, seq_len=32, offload=True, progress=False)
    in_memory = analyze(src, data=data, samples=4, seq_len=32, offload=False, progress=False)
    assert offloaded.extra == {"offload": True} and in_memory.extra == {"offload": False}
    assert offloaded.best == in_memory.best
