"""The cost ledger: seconds by phase, and tokens through layers and heads counted exactly."""

import time

import torch
from conftest import tiny_model

from layerprune.cut.surgery import pruned_in_place
from layerprune.measure.cost import Ledger


def test_tokens_through_layers_and_heads_are_counted_and_a_cut_counts_its_kept_layers():
    model, reference = tiny_model("llama", seed=1).eval(), tiny_model("llama", seed=2).eval()
    ids = torch.randint(3, 200, (2, 7))
    ledger = Ledger()
    with torch.no_grad():
        with ledger.counting(model, model):  # a model named twice is counted once
            model(input_ids=ids)
        assert (ledger.layer_tokens, ledger.head_tokens) == (6 * 14, 14)
        with ledger.counting(model, reference), pruned_in_place(model, [1, 2]):
            model(input_ids=ids)
            reference(input_ids=ids)
    assert (ledger.layer_tokens, ledger.head_tokens) == (6 * 14 + 4 * 14 + 6 * 14, 3 * 14)
    assert ledger.record(6)["full_passes"] == round((16 * 14) / 6, 1)
    model(input_ids=ids)  # outside the block: no longer counted
    assert ledger.layer_tokens == 16 * 14


def test_phases_add_up_and_the_record_totals_them():
    ledger = Ledger()
    for _ in range(2):
        with ledger.phase("heal"):
            time.sleep(0.02)
    with ledger.phase("load"):
        pass
    record = ledger.record(6)
    assert record["seconds"]["heal"] >= 0.04 and set(record["seconds"]) == {"heal", "load"}
    assert record["total_seconds"] == round(sum(record["seconds"].values()), 1)
