import copy
import json
import re

import pytest
import torch
from conftest import folder_digest, save_tiny, tiny_config, tiny_model
from reference import greedy
from transformers import AutoConfig, AutoModelForCausalLM

from layerprune.cut.surgery import prune_checkpoint, prune_model
from layerprune.errors import LayerpruneError, LayerpruneWarning
from layerprune.io.checkpoint import read_header, shard_files
from layerprune.layer_sets import parse_layers

IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 8, 10, 6, 12, 13, 5, 9, 14, 3, 2, 7, 15, 16, 4, 8, 20, 21]])


def cut(src, out, layers, overwrite=False):
    """Remove `layers` from the checkpoint `src` into `out` (surgery alone: no strategy)."""
    prune_checkpoint(src, out, layers, {"strategy": "explicit"}, overwrite=overwrite)
    return out


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_parse_layers():
    assert parse_layers("20-23") == [20, 21, 22, 23]
    assert parse_layers("3, 5,7-9,5") == [3, 5, 7, 8, 9]
    with pytest.raises(LayerpruneError):
        parse_layers("a-b")


@pytest.mark.parametrize("removed", [[0, 1], [2, 3], [1, 3, 4]])
def test_disk_prune_equals_in_memory_prune(family, removed, tmp_path):
    model = tiny_model(family)
    src = save_tiny(model, tmp_path / "src", shard_size="60KB")
    assert len(shard_files(src)) > 2, "the input should be sharded"
    before = folder_digest(src)
    out = cut(src, tmp_path / "out", removed)
    assert folder_digest(src) == before
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    in_memory = prune_model(copy.deepcopy(model), removed)
    assert loaded.config.num_hidden_layers == 6 - len(removed)
    torch.testing.assert_close(logits(loaded), logits(in_memory), rtol=0, atol=0)
    assert not torch.allclose(logits(loaded), logits(model))
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_layers"] == removed and record["num_layers_after"] == 6 - len(removed)
    assert (out / "tokenizer_config.json").is_file()
    shards = shard_files(out)
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert all(read_header(s)[1]["layerprune_removed_layers"] == ",".join(map(str, removed)) for s in shards)


def test_in_memory_prune_renumbers_layers_and_slices_config(family):
    model = prune_model(tiny_model(family), [0, 2])
    layers = [m for name, m in model.named_modules() if name.count(".") == 2 and name.split(".")[-1].isdigit()]
    assert len(layers) == 4
    indices = [
        [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)] for layer in layers
    ]
    assert all(set(idx) == {i} for i, idx in enumerate(indices))
    full_types = getattr(tiny_config(family), "layer_types", None)
    if full_types is not None:
        assert model.config.layer_types == [full_types[i] for i in (1, 3, 4, 5)]


def test_generate_with_cache_equals_greedy_without_cache(family):
    model = prune_model(tiny_model(family), [0, 3])
    prompt = IDS[:, :12]  # past the sliding window of 8 in the sliding families
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(cached, greedy(model, prompt, 10))


def test_gemma3_is_correct_beyond_the_sliding_window():
    """The pruned model equals a model built fresh with the sliced layer_types; the unsliced config does not."""
    model = tiny_model("gemma3_text")
    full_types = list(model.config.layer_types)
    pruned = prune_model(copy.deepcopy(model), [1, 2])
    config = tiny_config("gemma3_text")
    config.num_hidden_layers = 4
    config.layer_types = [full_types[i] for i in (0, 3, 4, 5)]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fresh.load_state_dict(pruned.state_dict())
    long_ids = torch.arange(3, 43).unsqueeze(0)  # 40 tokens, sliding window 8
    torch.testing.assert_close(logits(pruned, long_ids), logits(fresh, long_ids), rtol=0, atol=1e-6)
    unsliced = tiny_config("gemma3_text")
    unsliced.num_hidden_layers = 4
    unsliced.layer_types = full_types[:4]  # the silent bug: layer types not sliced
    assert unsliced.layer_types != fresh.config.layer_types
    wrong = AutoModelForCausalLM.from_config(unsliced, dtype=torch.float32).eval()
    wrong.load_state_dict(pruned.state_dict())
    assert not torch.allclose(logits(wrong, long_ids), logits(pruned, long_ids), atol=1e-3)


def test_overwrite_replaces_only_on_success(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    cut(src, out, [1])
    with pytest.raises(LayerpruneError, match="already exists"):
        cut(src, out, [2])
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1]
    cut(src, out, [2], overwrite=True)
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], "no temporary folder left behind"


def test_output_inside_the_input_is_refused(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    before = folder_digest(src)
    for out in (src / "pruned", src, tmp_path):
        with pytest.raises(LayerpruneError):
            cut(src, out, [1], overwrite=True)
    assert folder_digest(src) == before


def test_a_checkpoint_without_safetensors_is_pruned_in_memory(tmp_path):
    model = tiny_model("llama")
    src = tmp_path / "src"
    src.mkdir()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    out = cut(src, tmp_path / "out", [1, 2])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded), logits(prune_model(copy.deepcopy(model), [1, 2])))


def test_disk_prune_without_copy_file_range_writes_the_same_bytes(tmp_path, monkeypatch):
    import os

    src = save_tiny(tiny_model("llama"), tmp_path / "src", shard_size="60KB")
    fast = cut(src, tmp_path / "fast", [1, 2])

    def unavailable(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "copy_file_range", unavailable)
    slow = cut(src, tmp_path / "slow", [1, 2])
    shards = sorted(p.name for p in fast.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in slow.glob("*.safetensors"))
    for name in shards:
        assert (fast / name).read_bytes() == (slow / name).read_bytes()


def test_a_per_layer_list_left_to_be_derived_is_written_out(tmp_path):
    """Without `layer_types` in config.json, Gemma 3 derives it from the pattern for however many
    layers there are; the pruned config must list the kept layers' own types instead."""
    src = save_tiny(tiny_model("gemma3_text"), tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    full_types = raw.pop("layer_types")
    (src / "config.json").write_text(json.dumps(raw))
    assert AutoConfig.from_pretrained(src).layer_types == full_types, "transformers derives the same list"
    out = cut(src, tmp_path / "out", [0, 1])
    kept_types = [full_types[i] for i in (2, 3, 4, 5)]
    assert json.loads((out / "config.json").read_text())["layer_types"] == kept_types
    derived_for_four = AutoConfig.for_model("gemma3_text", num_hidden_layers=4, sliding_window_pattern=3).layer_types
    assert derived_for_four != kept_types, "re-deriving for fewer layers would be wrong"


def test_a_bin_checkpoint_with_missing_weights_is_refused(tmp_path):
    """transformers would fill the missing tensor with random values and only warn."""
    model = tiny_model("llama")
    src = tmp_path / "src"
    src.mkdir()
    model.config.save_pretrained(src)
    state = model.state_dict()
    del state["model.layers.2.mlp.up_proj.weight"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(LayerpruneError, match="do not match its config: missing_keys model.layers.2.mlp.up_proj"):
        cut(src, tmp_path / "out", [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_bin_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this ran while loading",))

    model = tiny_model("llama")
    src = tmp_path / "src"
    src.mkdir()
    model.config.save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    with pytest.raises(LayerpruneError, match="could not load the model in .*Unpickling"):
        cut(src, tmp_path / "out", [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("3-", "'3-' is not a layer or a range"),
        ("1,,2", "an empty item is not a layer or a range"),
        ("4-2", "runs backwards; write it 2-4"),
        ("0-99999999999999999", "out of range: the model has layers 0..5"),
        ("", "no layers in ''"),
    ],
)
def test_layer_lists_are_checked_before_they_are_expanded(spec, fragment):
    with pytest.raises(LayerpruneError, match=re.escape(fragment)):
        parse_layers(spec, 6)


def test_a_layer_named_twice_is_removed_once_with_a_warning():
    with pytest.warns(LayerpruneWarning, match="name some layer twice"):
        assert parse_layers("1-3,2", 6) == [1, 2, 3]


def test_pruning_in_place_for_a_while_leaves_the_model_exactly_as_it_was(family):
    from layerprune.cut.surgery import pruned_in_place

    model = tiny_model(family)
    before = logits(model)
    config_before = model.config.to_dict()
    expected = logits(prune_model(copy.deepcopy(model), [1, 3]))
    with pruned_in_place(model, [1, 3]) as pruned:
        assert pruned is model
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
        prompt = IDS[:, :12]
        with torch.no_grad():
            cached = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert torch.equal(cached, greedy(model, prompt, 6))
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    assert model.config.to_dict() == config_before
    with torch.no_grad():
        cached = model.generate(IDS[:, :12], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(cached, greedy(model, IDS[:, :12], 6)), "layer_idx restored for the KV cache"
