import pytest
from conftest import FAMILIES, tiny_model

from layerprune.architectures import all_architectures, find_architecture
from layerprune.errors import LayerpruneError


def test_every_family_file_loads_and_names_its_class():
    archs = all_architectures()
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "gpt2"} <= set(archs)
    classes = [c for a in archs.values() for c in a.architectures]
    assert len(classes) == len(set(classes)), "two families claim the same class"


def test_family_data_matches_the_real_module_tree(family):
    """Every declared path exists in a model of that family, and the layer count key is right."""
    model = tiny_model(family)
    arch = find_architecture(model.config)
    assert model.config.model_type in arch.model_types
    layers = model.get_submodule(arch.layers)
    assert len(layers) == arch.num_layers(model.config) == 6
    model.get_submodule(arch.final_norm)
    owner, _, attr = arch.layer_idx_attr.rpartition(".")
    assert getattr(layers[4].get_submodule(owner), attr) == 4
    for name in arch.mlp_modules:
        assert any(n.endswith(name) for n, _ in layers[0].named_modules()), name
    for key in model.state_dict():
        split = arch.split_layer_key(key)
        assert (split is not None) == key.startswith(arch.layer_key(0).rsplit("0.", 1)[0]), key
    for name in arch.per_layer_config_lists:
        assert len(getattr(model.config, name)) == 6


def test_layer_keys_without_the_base_prefix_are_recognised():
    gpt2 = all_architectures()["gpt2"]
    assert gpt2.split_layer_key("h.11.attn.c_attn.weight") == ("h.", 11, "attn.c_attn.weight")
    assert gpt2.split_layer_key("transformer.h.3.mlp.c_fc.bias") == ("transformer.h.", 3, "mlp.c_fc.bias")
    assert gpt2.split_layer_key("transformer.wte.weight") is None
    llama = all_architectures()["llama"]
    assert llama.split_layer_key("model.layers.10.mlp.up_proj.weight") == ("model.layers.", 10, "mlp.up_proj.weight")
    assert llama.split_layer_key("model.layers_norm.weight") is None


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(LayerpruneError) as err:
        find_architecture({"architectures": ["LlamaForCausalLn"], "model_type": "nope"})
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "gpt_neox" in message and "\n" not in message


def test_fixture_families_cover_every_declared_family():
    declared = {t for a in all_architectures().values() for t in a.model_types}
    assert declared == set(FAMILIES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.pop("layers"), r"missing \['layers'\]"),
        (lambda raw: raw.update(gguf="llama"), r"unknown \['gguf'\]"),
        (lambda raw: raw.update(mlp_modules="down_proj"), "mlp_modules must be a list of strings"),
        (lambda raw: raw.update(final_norm=3), "final_norm must be a non-empty string"),
        (lambda raw: raw.update(repair_fold_kind="bilinear"), "repair_fold_kind must be linear, conv1d or norm"),
        (lambda raw: raw.update(layer_key_template="model.layers."), r"layer_key_template needs one \$\{layer_index\}"),
        (lambda raw: raw.update(gguf_sliding_period="6"), "gguf_sliding_period must be a whole number"),
        (lambda raw: raw.pop("gguf_arch"), r"missing \['gguf_arch'\]"),
    ],
)
def test_a_family_file_is_checked_against_its_schema_in_one_line(change, message):
    import json
    from importlib import resources

    from layerprune.architectures import parse_family
    from layerprune.errors import LayerpruneError

    raw = json.loads(resources.files("layerprune._data.architectures").joinpath("llama.json").read_text())
    assert parse_family(dict(raw), "llama.json") == all_architectures()["llama"]
    change(raw)
    with pytest.raises(LayerpruneError, match=rf"family file llama.json: .*{message}"):
        parse_family(raw, "llama.json")
