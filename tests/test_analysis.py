import json

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer
from reference import assert_same_tables, direct_tables

from layerprune.data import token_batches
from layerprune.errors import LayerpruneError
from layerprune.measure.analysis import AnalysisResult, analyze, layer_distances

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A b c",
    "Layer pruning removes whole transformer blocks from a model, then heals it.",
    "Short one.",
    "Angular distance between residual streams tells which layers do little work in the end.",
]


def test_table_and_block_influence_match_a_direct_computation(family):
    model = tiny_model(family)
    batches = token_batches(tiny_tokenizer(), DOCS, samples=5, seq_len=40, batch_size=3)
    angular, block_influence = layer_distances(model, batches, progress=False)
    expected_angular, expected_bi = direct_tables(model, batches)
    assert sorted(angular) == list(range(1, 6))
    for n, row in expected_angular.items():
        assert len(angular[n]) == 6 - n + 1
        assert angular[n] == pytest.approx(row, abs=1e-6)
    assert block_influence == pytest.approx(expected_bi, abs=1e-6)


def test_padding_does_not_change_the_result():
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    one_by_one = layer_distances(model, token_batches(tokenizer, DOCS, 5, 40, 1), progress=False)
    padded = layer_distances(model, token_batches(tokenizer, DOCS, 5, 40, 5), progress=False)
    for n in one_by_one[0]:
        assert padded[0][n] == pytest.approx(one_by_one[0][n], abs=1e-6)
    assert padded[1] == pytest.approx(one_by_one[1], abs=1e-6)


def test_analyze_writes_json_csv_and_heatmap(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    result = analyze(
        tiny_model("qwen3"),
        data=data,
        samples=4,
        seq_len=32,
        batch_size=2,
        out=tmp_path / "an",
        tokenizer=tiny_tokenizer(),
        progress=False,
    )
    raw = json.loads((tmp_path / "an" / "distances.json").read_text())
    assert raw["num_layers"] == 6 and raw["samples"] == 4 and raw["data"] == str(data)
    assert set(raw["angular"]) == {str(n) for n in range(1, 6)}
    assert len(raw["block_influence"]) == 6
    for n, start in raw["best"].items():
        row = raw["angular"][n]
        assert row[start] == min(row)
    lines = (tmp_path / "an" / "distances.csv").read_text().splitlines()
    assert lines[0] == "n,l,angular_distance" and len(lines) == 1 + sum(6 - n + 1 for n in range(1, 6))
    png = (tmp_path / "an" / "heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert AnalysisResult.load(tmp_path / "an") == result


def test_best_start_keeps_the_final_layer_unless_allowed():
    angular = {1: [0.5, 0.4, 0.3, 0.1], 2: [0.5, 0.2, 0.1], 3: [0.4, 0.3]}
    result = AnalysisResult(num_layers=4, angular=angular, block_influence=[0.1] * 4)
    assert result.best == {1: 3, 2: 2, 3: 1}
    assert result.best_start(1) == 2 and result.best_start(2) == 1 and result.best_start(3) == 0
    assert result.best_start(2, allow_final=True) == 2


def test_identity_layers_have_zero_distance():
    """A layer whose output equals its input has d = 0 and BI = 0; the others do not."""
    model = tiny_model("llama")
    layer = model.model.layers[2]
    for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
        torch.nn.init.zeros_(module.weight)
    angular, block_influence = layer_distances(model, token_batches(tiny_tokenizer(), DOCS, 5, 40, 2), progress=False)
    assert angular[1][2] == pytest.approx(0.0, abs=1e-6)
    assert block_influence[2] == pytest.approx(0.0, abs=1e-6)  # float32 cosines
    assert min(angular[1][:2] + angular[1][3:]) > 0.01


def test_offload_is_chosen_when_the_model_would_not_fit(tmp_path, monkeypatch, capsys):
    import layerprune.runtime.memory as memory

    src = save_tiny(tiny_model("llama"), tmp_path / "model")
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    monkeypatch.setattr(memory, "memory_available", lambda: 100_000)  # less than the tiny model's weights
    result = analyze(src, data=data, samples=4, seq_len=32, progress=False)
    assert result.extra["offload"] is True and "one layer at a time (--offload)" in capsys.readouterr().out
    monkeypatch.setattr(memory, "memory_available", lambda: 2**40)
    assert analyze(src, data=data, samples=4, seq_len=32, progress=False).extra["offload"] is False


ANGULAR_TOLERANCE, BI_TOLERANCE = 0.01, 0.005  # bf16 against fp32; measured: at most 0.003 and 0.001


def test_bf16_on_the_cpu_gives_the_fp32_choices_within_a_stated_tolerance(family):
    import copy

    model = tiny_model(family)
    batches = token_batches(tiny_tokenizer(), DOCS * 2, 10, 40, 4)
    angular, block_influence = layer_distances(model, batches, progress=False)
    angular16, block_influence16 = layer_distances(copy.deepcopy(model).to(torch.bfloat16), batches, progress=False)
    for n, row in angular.items():
        assert angular16[n] == pytest.approx(row, abs=ANGULAR_TOLERANCE)
        best, best16 = min(range(len(row)), key=row.__getitem__), min(range(len(row)), key=angular16[n].__getitem__)
        assert best16 == best or row[best16] - row[best] <= 2 * ANGULAR_TOLERANCE, "the same block, or a near-tie"
    assert block_influence16 == pytest.approx(block_influence, abs=BI_TOLERANCE)


def test_a_model_dispatched_over_cpu_and_disk_gives_the_same_table(tmp_path):
    """accelerate's big-model dispatch moves each layer's inputs to its device; the hooks see the
    states wherever they are."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    src = save_tiny(model, tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)}
    dispatched = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert {getattr(layer, "_hf_hook", None) is not None for layer in dispatched.model.layers} == {True}
    batches = token_batches(tiny_tokenizer(), DOCS, 5, 40, 3)
    expected_angular, expected_bi = layer_distances(model, batches, progress=False)
    angular, block_influence = layer_distances(dispatched, batches, progress=False)
    assert_same_tables((angular, block_influence), (expected_angular, expected_bi), 1e-6)


def test_an_analysis_of_another_model_is_refused_even_with_as_many_layers(tmp_path):
    from layerprune import analyze, prune

    ours = save_tiny(tiny_model("llama", seed=1), tmp_path / "ours")
    other = save_tiny(tiny_model("qwen3", seed=1), tmp_path / "other")  # also 6 layers
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Line {i}: the cat sat on the mat by the door." for i in range(20)))
    analysis = analyze(ours, data=str(text), samples=8, seq_len=24, out=tmp_path / "analysis", progress=False)
    assert analysis.extra["fingerprint"]
    with pytest.raises(LayerpruneError, match="the analysis was computed for another model"):
        prune(other, tmp_path / "wrong", n=2, analysis=tmp_path / "analysis", progress=False)
    assert not (tmp_path / "wrong").exists()
    done = prune(ours, tmp_path / "right", n=2, analysis=tmp_path / "analysis", progress=False)
    assert done.removed == list(range(analysis.best_start(2), analysis.best_start(2) + 2))
