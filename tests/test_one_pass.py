"""Many cuts of one model evaluated in one pass: the same numbers as each cut evaluated on its own
(lm-eval's HF model on the model pruned in place), for less model work."""

from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from layerprune.config import build
from layerprune.cut.surgery import pruned_in_place
from layerprune.evaluation.harness import EvalConfig, closeness, evaluate, logits_of
from layerprune.evaluation.one_pass import FULL, OnePass, evaluate_variants
from layerprune.evaluation.tasks import TEXT_TASKS

CUTS = [(4,), (1, 2), (0, 3), (2, 3, 4)]  # sizes 1-3, starts 0-4, one not contiguous
TEXTS = [f"Passage {i}: the cat sat on the mat while the dog slept by the warm door. " * (1 + i % 3) for i in range(5)]


def cut(model, removed):
    return pruned_in_place(model, list(removed)) if removed else nullcontext()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "gpt_neox"])
def test_every_variant_computes_what_it_computes_alone(family):
    """Each cut, and a model with weights of its own (as a healed one), gives the log-likelihoods
    lm-eval's HF model scores alone (sliding windows included: 8 tokens, on longer inputs), the
    same losses, and KL to the full model on the same batch."""
    from lm_eval.models.huggingface import HFLM


    model, own, tokenizer = tiny_model(family, seed=3), tiny_model(family, seed=4), tiny_tokenizer()
    engine = OnePass(model, CUTS, {"healed": own})
    generator = torch.Generator().manual_seed(0)
    requests = [
        (torch.randint(3, 272, (int(c),), generator=generator).tolist(), torch.randint(3, 272, (k,)).tolist())
        for c, k in zip(torch.randint(5, 40, (9,), generator=generator), [1, 2, 3] * 3, strict=True)
    ]
    together = engine.loglikelihoods(requests, engine.variants, batch_size=4, max_length=512)
    found = engine.text_tasks(tokenizer, TEXTS, 40, 2, {c: {"loss", "kld"} if c else {"loss"} for c in engine.variants})
    assert engine.variants == [FULL, *CUTS, "healed"]
    for variant in engine.variants:
        subject = own if variant == "healed" else model
        with cut(model, () if variant == "healed" else variant):
            lm = HFLM(pretrained=subject, tokenizer=tokenizer, batch_size=3, device="cpu")
            alone = lm._loglikelihood_tokens([(("", ""), c, k) for c, k in requests], disable_tqdm=True)
            losses, divergences = [], []
            for text in TEXTS:
                batch = tokenizer([text], truncation=True, max_length=40, return_tensors="pt")
                with torch.inference_mode():
                    logits = subject(**batch).logits
                    losses += TEXT_TASKS["loss"].rows(logits, None, batch)
                    if variant == "healed":
                        divergences += TEXT_TASKS["kld"].rows(logits, model(**batch).logits, batch)
        assert [g for _, g in together[variant]] == [g for _, g in alone]
        assert max(abs(a - b) for (a, _), (b, _) in zip(together[variant], alone, strict=True)) < 1e-4
        assert [n for _, n in found[variant]["loss"]] == [n for _, n in losses]
        assert max(abs(a - b) for (a, _), (b, _) in zip(found[variant]["loss"], losses, strict=True)) < 1e-4
        if variant:
            assert all(kl > 0 for kl, *_ in found[variant]["kld"])
        if variant == "healed":  # against the full model's logits of the same batch
            assert [r[1:3] for r in found[variant]["kld"]] == [r[1:3] for r in divergences]
            assert [r[0] for r in found[variant]["kld"]] == pytest.approx([r[0] for r in divergences], rel=1e-4)


def test_a_variant_with_its_own_weights_alone_needs_no_full_pass_unless_kld_asks():
    """Only own-weight variants, and no kld: the full model does not run; with kld it runs once."""
    model, own, tokenizer = tiny_model("llama", seed=3), tiny_model("llama", seed=4), tiny_tokenizer()
    engine = OnePass(model, [], {"healed": own})
    engine.text_tasks(tokenizer, TEXTS, 40, 2, {"healed": {"loss"}})
    assert engine.ledgers[FULL].layer_tokens == 0 and engine.ledgers["healed"].layer_tokens > 0
    engine.text_tasks(tokenizer, TEXTS, 40, 2, {"healed": {"kld"}})
    assert engine.ledgers[FULL].layer_tokens == engine.ledgers["healed"].layer_tokens / 2


def test_the_work_is_one_full_pass_and_each_cut_s_suffix():
    """K cuts cost 1 + the sum of their suffix fractions full passes, counted by the ledgers."""
    model, tokenizer = tiny_model("llama", seed=3), tiny_tokenizer()
    engine = OnePass(model, CUTS)
    engine.text_tasks(tokenizer, TEXTS, 40, 2, {c: {"loss"} for c in engine.variants})
    full = engine.ledgers[FULL]
    assert full.layer_tokens == 6 * full.head_tokens > 0
    for removed in CUTS:
        suffix = engine.suffix(removed)
        assert suffix == [i for i in range(removed[0], 6) if i not in removed]
        assert engine.ledgers[removed].layer_tokens == len(suffix) * full.head_tokens
    total = sum(ledger.layer_tokens for ledger in engine.ledgers.values())
    assert total == full.layer_tokens * (1 + sum(len(engine.suffix(c)) for c in CUTS) / 6)
    assert total < full.layer_tokens * (1 + len(CUTS)) * 0.6  # one by one: K + 1 passes


def _alone(model, tokenizer, removed, config):
    """The per-point path a sweep took before: lm-eval's HF model on the model cut in place, and
    kld against the full model run again."""
    with cut(model, removed):
        result = evaluate(model, config=replace(config, tasks=("sciq", "piqa", "loss")), tokenizer=tokenizer)

    def own(batch):
        with cut(model, removed):
            return logits_of(model)(batch)

    vocab = model.config.get_text_config().vocab_size
    result["tasks"]["kld"] = closeness(own, logits_of(model), tokenizer, vocab, config) if removed else None
    return result["tasks"]


@pytest.mark.real
@pytest.mark.parametrize("name,limit", [("smollm2", 4), ("gemma3", 2)])
def test_packaged_models_give_the_per_point_results(name, limit, request):
    """SmolLM2 and Gemma 3 (sliding-window layers): per-document log-likelihoods to 1e-4, acc and
    acc_norm exactly, loss and KL to 1e-5, for cuts of several sizes and starts."""
    from layerprune.runtime.models import load_model

    model, tokenizer = load_model(request.getfixturevalue(name))
    layers = model.config.num_hidden_layers
    cuts = [tuple(range(layers - 6, layers - 2)), (2, 7, 9)] + ([(3, 4, 5)] if name == "smollm2" else [])
    config = build(EvalConfig, {"tasks": ("sciq", "piqa", "loss", "kld"), "limit": limit, "batch_size": 4})
    together = evaluate_variants(OnePass(model, cuts), tokenizer, config, dict.fromkeys([FULL, *cuts]))
    for removed in [FULL, *cuts]:
        alone, ours = _alone(model, tokenizer, removed, config), together[removed]["tasks"]
        for task in ("sciq", "piqa"):
            a, b = alone[task]["documents"], ours[task]["documents"]
            assert a["id"] == b["id"] and a["correct"] == b["correct"] and a["correct_norm"] == b["correct_norm"]
            assert max(abs(x - y) for x, y in zip(a["loglik"], b["loglik"], strict=True)) < 1e-4
            assert (alone[task]["acc"], alone[task]["acc_norm"]) == (ours[task]["acc"], ours[task]["acc_norm"])
            assert alone[task]["acc_stderr"] == pytest.approx(ours[task]["acc_stderr"], abs=1e-12)
        assert ours["loss"]["loss"] == pytest.approx(alone["loss"]["loss"], abs=1e-5)
        assert ("kld" in ours) == bool(removed)
        if removed:
            assert ours["kld"]["kld"] == pytest.approx(alone["kld"]["kld"], abs=1e-5)
            assert ours["kld"]["top1_agreement"] == alone["kld"]["top1_agreement"]


def _peak_allocated(work) -> int:
    """The most bytes torch's CPU allocator held at once during `work()`, beyond what it held before
    (from the profiler's allocation and free events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_memory_beyond_the_models_is_one_batch_s_logits_and_a_state_per_cut_start():
    """The stated bound: at most 4 batches of logits (the full model's, one variant's, and their
    log-softmax) plus one residual state per distinct cut start and 2 more; a cut adds only its
    start's state, and a model with weights of its own adds nothing that stays."""
    model, own, tokenizer = tiny_model("llama", seed=3), tiny_model("llama", seed=4), tiny_tokenizer()
    rows, length = 4, 40
    texts = [text * 3 for text in TEXTS[:rows]]  # each at least `length` tokens: full batches
    logits = rows * length * model.config.vocab_size * 4
    state = rows * length * model.config.hidden_size * 4
    peaks = {}
    for cuts in ([(4,)], CUTS, [*CUTS, (1,), (3,)]):
        for extra in ({}, {"healed": own}):
            engine = OnePass(model, cuts, extra)
            wanted = {c: {"loss", "kld"} if c else {"loss"} for c in engine.variants}
            peaks[len(cuts), bool(extra)] = peak = _peak_allocated(
                lambda e=engine, w=wanted: e.text_tasks(tokenizer, texts, length, rows, w)
            )
            starts = len({c[0] for c in cuts})
            assert peak <= 4 * logits + (starts + 2) * state, (cuts, extra, peak)
    for (k, extra), peak in peaks.items():  # adding cuts: no more than the states at their new starts
        assert peak - peaks[1, extra] <= len({c[0] for c in [*CUTS, (1,), (3,)][:k]}) * state
    assert all(peaks[k, True] - peaks[k, False] <= state for k in (1, 4, 6))


def test_a_model_healed_near_its_cut_resumes_from_the_full_model_s_prefix():
    """A model whose first layers are the full model's, bitwise (as one healed with --target-layers
    near-cut), runs only from its first changed layer, from the full model's residual stream there,
    and computes what it computes alone; a model with other embeddings runs whole."""
    import copy

    from lm_eval.models.huggingface import HFLM

    from layerprune.evaluation.one_pass import shared_prefix

    model, tokenizer = tiny_model("llama", seed=3), tiny_tokenizer()
    near, other = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        near.model.layers[3].mlp.down_proj.weight.mul_(1.5)  # the adapted layer: 3 of 6
        other.model.embed_tokens.weight.add_(0.01)
    assert (shared_prefix(model, near), shared_prefix(model, other), shared_prefix(model, model)) == (3, 0, 5)
    engine = OnePass(model, [(4,)], {"near": near, "other": other})
    requests = [([5 + i, 9, 17 + i, 30, 41], [60 + i, 7]) for i in range(6)]
    together = engine.loglikelihoods(requests, ["near", "other"], batch_size=4, max_length=512)
    found = engine.text_tasks(tokenizer, TEXTS, 40, 2, {"near": {"loss"}, "other": {"loss"}})
    for name, subject in (("near", near), ("other", other)):
        lm = HFLM(pretrained=subject, tokenizer=tokenizer, batch_size=3, device="cpu")
        alone = lm._loglikelihood_tokens([(("", ""), c, k) for c, k in requests], disable_tqdm=True)
        assert max(abs(a - b) for (a, _), (b, _) in zip(together[name], alone, strict=True)) < 1e-4
        losses = []
        for text in TEXTS:
            batch = tokenizer([text], truncation=True, max_length=40, return_tensors="pt")
            with torch.inference_mode():
                losses += TEXT_TASKS["loss"].rows(subject(**batch).logits, None, batch)
        assert max(abs(a - b) for (a, _), (b, _) in zip(found[name]["loss"], losses, strict=True)) < 1e-4
    ledgers = engine.ledgers
    assert ledgers["near"].layer_tokens == 3 * ledgers["near"].head_tokens > 0  # layers 3-5 only
    assert ledgers["other"].layer_tokens == 6 * ledgers["other"].head_tokens
