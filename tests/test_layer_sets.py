"""One validator for which layers a cut removes: every entry point refuses the same mistake in the
same words."""

import pytest
from conftest import tiny_model, tiny_tokenizer

from layerprune.data import token_batches
from layerprune.errors import LayerpruneError
from layerprune.layer_sets import check_removal, layer_count
from layerprune.recipes.pipeline import PruneConfig
from layerprune.selection.scoring import select_by_loss
from layerprune.selection.strategies import select_layers
from layerprune.sweep.run import SweepConfig

FRACTION = r"--fraction must be in \(0, 1\): a share of the layers, got 1.5"
BOTH = "give exactly one of --layers, --n or --fraction"


@pytest.mark.parametrize(
    ("refuse", "message"),
    [
        (lambda: PruneConfig(fraction=1.5), FRACTION),
        (lambda: select_layers(6, fraction=1.5), FRACTION),
        (lambda: layer_count(6, None, 1.5), FRACTION),
        (lambda: SweepConfig(fractions=(0.0, 1.5)), r"--fraction must be in \[0, 1\): a share of the layers, got 1.5"),
        (lambda: PruneConfig(n=2, layers="1"), BOTH),
        (lambda: select_layers(6, n=2, layers="1"), BOTH),
        (lambda: select_layers(6, n=6, strategy="deepest"), "--n must be between 1 and 5 for a model of 6 layers"),
        (lambda: layer_count(6, 0, None), "--n must be between 1 and 5 for a model of 6 layers, got 0"),
        (lambda: select_layers(6, fraction=0.05), "--fraction 0.05 of 6 layers removes no layer"),
        (lambda: check_removal(6, [5]), r"removing the final layer \(5\) is refused"),
    ],
)
def test_each_entry_point_refuses_a_bad_layer_set_in_the_same_words(refuse, message):
    with pytest.raises(LayerpruneError, match=message):
        refuse()


def test_a_loss_search_states_its_own_limit_in_the_same_words():
    """A search scores the cut against a kept layer, so it removes at most all but two."""
    batches = token_batches(tiny_tokenizer(), ["the river runs past the mill"] * 2, 2, 16, 2)
    with pytest.raises(LayerpruneError, match="--n must be between 1 and 4 for a model of 6 layers, got 5"):
        select_by_loss(tiny_model("llama"), batches, n=5)
