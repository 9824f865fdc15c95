"""The residual stream: hooks see resid[0..L], layers run from a recorded state, losses per token."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from reference import residual_states

from layerprune.architectures import find_architecture
from layerprune.data import token_batches
from layerprune.measure.residual import (
    last_token_index,
    next_token_losses,
    run_layers,
    slice_config,
    stream_modules,
    watching,
)


def test_the_hooks_see_every_residual_state_before_the_final_norm(family):
    model = tiny_model(family)
    arch = find_architecture(model.config)
    batch = token_batches(tiny_tokenizer(), ["Layer pruning removes whole blocks."], 1, 30, 1)[0]
    seen = {}
    with torch.no_grad(), watching(stream_modules(model, arch), lambda i, resid: seen.setdefault(i, resid)):
        model(**batch, use_cache=False)
    expected = residual_states(model, batch)
    assert sorted(seen) == list(range(7))
    for i, state in seen.items():
        torch.testing.assert_close(state.double(), expected[i])


def test_running_the_later_layers_from_a_recorded_state_equals_the_whole_model(family):
    model = tiny_model(family)
    arch = find_architecture(model.config)
    batch = token_batches(tiny_tokenizer(), ["The quick brown fox.", "Jumps."], 2, 30, 2)[0]
    whole = run_layers(model, arch, batch, None, range(6))
    middle = run_layers(model, arch, batch, None, range(3))
    torch.testing.assert_close(run_layers(model, arch, batch, middle, range(3, 6)), whole)
    assert arch.num_layers(model.config) == 6 and len(arch.layer_list(model)) == 6, "the model is restored"


def test_last_token_index_for_either_padding_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert last_token_index(torch.tensor([[0, 1, 1, 1]])).tolist() == [3]


def test_next_token_losses_are_the_cross_entropy_of_real_tokens():
    logits = torch.randn(2, 5, 11)
    batch = {"input_ids": torch.randint(0, 11, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    losses, mask = next_token_losses(logits, batch)
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    direct = torch.nn.functional.cross_entropy(logits[1, :2], batch["input_ids"][1, 1:3], reduction="sum")
    assert float(losses[1][mask[1]].sum()) == pytest.approx(float(direct), rel=1e-6)


def test_config_lists_are_sliced_in_dicts_and_objects():
    from conftest import tiny_config

    config = tiny_config("gemma3_text")
    arch = find_architecture(config)
    raw = config.to_dict()
    kept = [0, 2, 5]
    slice_config(config, kept, arch)
    slice_config(raw, kept, arch)
    full = tiny_config("gemma3_text").layer_types
    assert config.layer_types == raw["layer_types"] == [full[i] for i in kept]
    assert config.num_hidden_layers == raw["num_hidden_layers"] == 3
