"""Selection by calibration loss: the fast search equals brute force; iterative removal is a valid checkpoint."""

import copy
import json

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer
from reference import greedy
from transformers import AutoModelForCausalLM

from layerprune.architectures import find_architecture
from layerprune.cut.surgery import prune_model
from layerprune.data import token_batches
from layerprune.errors import LayerpruneError
from layerprune.measure.analysis import layer_distances
from layerprune.recipes.pipeline import prune
from layerprune.selection.scoring import nested_prefix, select_by_loss

DOCS = [f"Calibration text number {i}: the quick brown fox jumps over the lazy dog again." for i in range(6)]


def brute_force_sums(model, batches, removed):
    """The summed next-token loss of the model without `removed`, and the tokens it is over."""
    pruned = prune_model(copy.deepcopy(model), removed)
    total = tokens = 0
    for batch in batches:
        with torch.no_grad():
            logits = pruned(**batch, use_cache=False).logits[:, :-1]
        mask = batch["attention_mask"][:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        total += float(losses[mask].sum())
        tokens += int(mask.sum())
    return total, tokens


def brute_force_loss(model, batches, removed):
    total, tokens = brute_force_sums(model, batches, removed)
    return total / tokens


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_loss_search_equals_brute_force(family):
    model = tiny_model(family, seed=4)
    batches = token_batches(tiny_tokenizer(), DOCS, 6, 40, 4)
    selection = select_by_loss(model, batches, n=2)
    expected = {tuple(range(s, s + 2)): brute_force_loss(model, batches, list(range(s, s + 2))) for s in range(4)}
    assert [tuple(c["layers"]) for c in selection.scored] == list(expected)
    for candidate in selection.scored:
        assert candidate["loss"] == pytest.approx(expected[tuple(candidate["layers"])], rel=1e-5)
    assert tuple(selection.removed) == min(expected, key=expected.get)
    # cost: one pass over the 6 layers without the head, then per block the layers after it and the head
    layer = sum(p.numel() for p in find_architecture(model.config).layer_list(model)[0].parameters())
    head = model.get_output_embeddings().weight.numel()
    suffix_layers = 4 + 3 + 2 + 1
    expected_passes = ((6 + suffix_layers) * layer + 4 * head) / (6 * layer + head)
    assert selection.forward_passes == pytest.approx(expected_passes)
    assert selection.forward_passes < len(expected)  # cheaper than pruning and evaluating each block


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_loss_repair_scores_each_block_as_the_repaired_checkpoint_computes(family):
    """Each candidate's loss is the calibration loss of the model repaired for it and pruned, with
    the map `prune --repair linear` folds (`repair_model`): for Gemma 3, whose MLP term is a norm's
    output, the map fitted before that norm. The block at layer 0 has no layer to fold into."""
    from layerprune.healing.repair import repair_model

    model = tiny_model(family, seed=4)
    batches = token_batches(tiny_tokenizer(), DOCS * 8, 48, 40, 8)  # more tokens than hidden units
    selection = select_by_loss(model, batches, n=2, strategy="loss-repair", folds=1)  # fitted and scored on all
    assert [c["layers"] for c in selection.scored] == [[1, 2], [2, 3], [3, 4]]
    for candidate in selection.scored:
        repaired = copy.deepcopy(model)
        mapped = repair_model(repaired, batches, candidate["layers"], "linear", progress=False)[0]
        assert (mapped.norm_weight is not None) == (family == "gemma3_text")
        assert candidate["fit_residual"] == pytest.approx(mapped.residual, abs=1e-5)
        assert candidate["loss"] == pytest.approx(brute_force_loss(repaired, batches, candidate["layers"]), rel=1e-5)
    assert selection.removed == min(selection.scored, key=lambda c: c["loss"])["layers"]


@pytest.mark.parametrize("folds", [2, 4])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_loss_repair_scores_each_document_with_the_map_fitted_on_the_others(family, folds):
    """Cross-fitted (2 folds by default): the documents are dealt into folds in turn, and each fold's
    tokens are scored by the model repaired on the other folds' documents alone (fold by fold)."""
    from layerprune.healing.repair import repair_model

    model = tiny_model(family, seed=4)
    docs = [f"{text} Copy {i}." for i, text in enumerate(DOCS * 8)]  # 48 documents, no two alike
    batches = token_batches(tiny_tokenizer(), docs, 48, 40, 8)
    selection = select_by_loss(model, batches, n=2, strategy="loss-repair", folds=folds)
    for candidate in selection.scored:
        total = tokens = 0
        for k in range(folds):
            others = [doc for j in range(folds) if j != k for doc in docs[j::folds]]
            repaired = copy.deepcopy(model)
            repair_model(repaired, token_batches(tiny_tokenizer(), others, 48, 40, 8), candidate["layers"], "linear",
                         progress=False)  # fmt: skip
            scored = token_batches(tiny_tokenizer(), docs[k::folds], 48, 40, 8)
            fold_total, fold_tokens = brute_force_sums(repaired, scored, candidate["layers"])
            total, tokens = total + fold_total, tokens + fold_tokens
        assert candidate["loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_loss_repair_needs_a_document_per_fold():
    batches = token_batches(tiny_tokenizer(), DOCS, 1, 40, 1)
    with pytest.raises(LayerpruneError, match="at least 2 calibration documents"):
        select_by_loss(tiny_model("llama", seed=4), batches, n=2, strategy="loss-repair")


def test_angular_rerank_scores_the_k_most_similar_blocks():
    model = tiny_model("qwen3", seed=5)
    batches = token_batches(tiny_tokenizer(), DOCS, 6, 40, 3)
    angular, bi = layer_distances(model, batches, progress=False)
    from layerprune.measure.analysis import AnalysisResult

    analysis = AnalysisResult(num_layers=6, angular=angular, block_influence=bi)
    selection = select_by_loss(model, batches, n=2, strategy="angular-rerank", analysis=analysis, candidates=2)
    ranked = sorted(range(4), key=lambda s: angular[2][s])[:2]
    assert [c["layers"][0] for c in selection.scored] == ranked
    assert selection.removed == min(selection.scored, key=lambda c: c["loss"])["layers"]
    with pytest.raises(LayerpruneError, match="--candidates must be between 1 and 4"):
        select_by_loss(model, batches, n=2, strategy="angular-rerank", analysis=analysis, candidates=5)
    with pytest.raises(LayerpruneError, match="--candidates"):
        select_by_loss(model, batches, n=2, strategy="angular-rerank", analysis=analysis, candidates=0)


def test_iterative_removes_greedily_and_gives_a_valid_noncontiguous_checkpoint(tmp_path):
    model = tiny_model("llama", seed=6)
    batches = token_batches(tiny_tokenizer(), DOCS, 6, 40, 3)
    selection = select_by_loss(model, batches, n=3, strategy="iterative")
    first = min(range(5), key=lambda i: brute_force_loss(model, batches, [i]))
    assert selection.scored[0]["layers"] == [first]
    assert len(selection.removed) == 3 and 5 not in selection.removed
    src = save_tiny(model, tmp_path / "src")
    out = prune(src, tmp_path / "out", layers=selection.removed).path
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, prune_model(copy.deepcopy(model), selection.removed)(ids).logits)
        cached = loaded.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(cached, greedy(loaded, ids, 6))
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == selection.removed


def test_iterative_path_is_nested_so_a_smaller_n_is_its_prefix():
    model = tiny_model("llama", seed=6)
    batches = token_batches(tiny_tokenizer(), DOCS, 6, 40, 3)
    longer = select_by_loss(model, batches, n=3, strategy="iterative")
    shorter = select_by_loss(model, batches, n=2, strategy="iterative")
    prefix = nested_prefix(longer, 2)
    assert prefix.removed == shorter.removed and prefix.scored == longer.scored[:2]
    assert 0 < prefix.forward_passes == shorter.forward_passes < longer.forward_passes


LOSS_TOLERANCE = 0.03  # nats, bf16 against fp32; measured: at most 0.014 on the tiny models


def test_bf16_loss_search_agrees_with_fp32(family):
    model = tiny_model(family)
    batches = token_batches(tiny_tokenizer(), DOCS + DOCS[:2], 8, 40, 4)
    full = select_by_loss(model, batches, n=2)
    half = select_by_loss(copy.deepcopy(model).to(torch.bfloat16), batches, n=2)
    losses = {tuple(c["layers"]): c["loss"] for c in full.scored}
    for ours, theirs in zip(half.scored, full.scored, strict=True):
        assert ours["layers"] == theirs["layers"] and ours["loss"] == pytest.approx(theirs["loss"], abs=LOSS_TOLERANCE)
    near = losses[tuple(half.removed)] - losses[tuple(full.removed)] <= 2 * LOSS_TOLERANCE
    assert near, "the same block, or one whose fp32 loss is within the tolerance of the best"


@pytest.mark.parametrize(("strategy", "n", "passes"), [("loss", 2, 1), ("loss-repair", 2, 2), ("iterative", 3, 3)])
def test_a_search_shows_its_progress_in_calibration_batches(capsys, strategy, n, passes):
    model = tiny_model("llama", seed=4)
    batches = token_batches(tiny_tokenizer(), DOCS * 8, 48, 40, 8)
    select_by_loss(model, batches, n=n, strategy=strategy, progress=True)
    shown = capsys.readouterr().err
    assert f"{strategy} search" in shown and f"{passes * len(batches)}/{passes * len(batches)}" in shown
    select_by_loss(model, batches, n=n, strategy=strategy, progress=False)
    assert capsys.readouterr().err == ""
