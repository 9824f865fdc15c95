"""Repair without training: the fitted map recovers a block that is linear in the MLP's term, the
folded checkpoint computes what the mapped model computes, statistics add up batch by batch, and
bad requests are one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import HEAL_TEXT, save_tiny, tiny_model, tiny_tokenizer

import layerprune.healing.repair as repair
import layerprune.runtime.memory as memory
from layerprune.architectures import find_architecture
from layerprune.cut.surgery import prune_model
from layerprune.data import token_batches
from layerprune.errors import LayerpruneError

DOCS = [f"Story {i}. The little cat sat on the warm mat while the old dog slept by the door." for i in range(24)]


def batches(count: int = 24, seq_len: int = 24):
    return token_batches(tiny_tokenizer(), DOCS, count, seq_len, 6)


class LinearInTheMlpTerm(torch.nn.Module):
    """A stand-in for a removed layer that adds A (T - I) to the stream: exactly what a map T on
    the previous layer's MLP term A does, so a repair can recover it to float tolerance."""

    def __init__(self, cell: dict, t: torch.Tensor) -> None:
        super().__init__()
        self.cell, self.t = cell, t

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.cell["A"] @ (self.t - torch.eye(len(self.t)))


def test_a_block_linear_in_the_mlp_term_is_recovered_exactly(monkeypatch):
    model = tiny_model("llama")
    arch = find_architecture(model.config)
    layers = arch.layer_list(model)
    d = model.config.hidden_size
    torch.manual_seed(1)
    t = torch.eye(d) + 0.3 * torch.randn(d, d) / d**0.5
    cell: dict = {}
    layers[2].mlp.register_forward_hook(lambda module, args, output: cell.update(A=output))
    layers[3] = LinearInTheMlpTerm(cell, t)
    ids = batches()[0]
    with torch.no_grad():
        expected = model(**ids).logits
    monkeypatch.setattr(repair, "RIDGE", 1e-12)
    fits = repair.repair_model(model, batches(), [3], "linear", progress=False)
    assert fits[0].residual < 1e-8 and torch.allclose(fits[0].map.float(), t, atol=1e-4)
    prune_model(model, [3])
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, expected, atol=1e-4, rtol=1e-4)


class ThroughTheNorm(torch.nn.Module):
    """A stand-in for a removed layer that swaps the previous layer's normed MLP term
    A = norm_w(Y) for norm_w*(Y M*): what a map M* before the norm, with the norm's weight w*, does."""

    def __init__(self, cell: dict, norm: torch.nn.Module, m: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.cell, self.m = cell, m
        self.norm = copy.deepcopy(norm)  # a copy: the original's hooks would see this call too
        with torch.no_grad():
            self.norm.weight.copy_(w)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states - self.cell["A"] + self.norm(self.cell["Y"] @ self.m)


def test_a_block_that_acts_through_the_norm_is_recovered_closely():
    """Gemma 3's MLP term is a norm's output: no map on it folds, so the map goes in before the
    norm and is fitted through it with the norm's weight. A planted block of that form is recovered
    far better than the per-channel scale (all that could be folded into the norm) recovers it."""
    model = tiny_model("gemma3_text")
    arch = find_architecture(model.config)
    layers = arch.layer_list(model)
    norm = layers[2].get_submodule(arch.mlp_term)
    d = model.config.hidden_size
    torch.manual_seed(1)
    m, w = torch.eye(d) + 0.3 * torch.randn(d, d) / d**0.5, norm.weight.detach() + 0.2 * torch.randn(d)
    cell: dict = {}
    layers[3] = ThroughTheNorm(cell, norm, m, w)
    norm.register_forward_hook(lambda module, args, output: cell.update(Y=args[0], A=output))
    ids = batches()[0]
    with torch.no_grad():
        expected = model(**ids).logits
    stats = repair.collect(model, batches(), [(3, 4)], progress=False)[0]
    diagonal = torch.diagonal(stats.ar) / torch.diagonal(stats.aa)  # the best per-channel scale on A
    scaled = repair._residual(stats, torch.diag(diagonal))
    fits = repair.repair_model(model, batches(), [3], "linear", progress=False)
    assert fits[0].norm_weight is not None and fits[0].residual < 0.05 < scaled, (fits[0].residual, scaled)
    unrepaired = tiny_model("gemma3_text")
    prune_model(model, [3])
    prune_model(unrepaired, [3])
    with torch.no_grad():
        error, cut = ((net(**ids).logits - expected).norm() for net in (model, unrepaired))
    assert error < 0.2 * cut, (error, cut)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("method", ["linear", "cosine"])
def test_the_folded_checkpoint_computes_what_the_mapped_model_computes(tmp_path, family, method):
    """The checkpoint written by `prune --repair` against the pruned model with A -> A T applied
    by a hook on the down projection; in Gemma 3 that output passes through the post-feed-forward
    norm, whose weight is fitted with the map."""
    from layerprune import load_model, prune

    src = save_tiny(tiny_model(family, seed=2), tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(HEAL_TEXT)
    done = prune(src, tmp_path / "out", layers=[2, 3], repair=method, data=str(text), samples=24, seq_len=24,
                 batch_size=6, progress=False)  # fmt: skip
    record = json.loads((tmp_path / "out" / "layerprune.json").read_text())["repair"]
    assert record["method"] == method and [b["block"] for b in record["blocks"]] == [[2, 3]]
    assert record["blocks"][0]["through_norm"] == (family == "gemma3_text") and record["blocks"][0]["fit_residual"] < 1
    model, tokenizer = load_model(src)
    fits = repair.repair_model(model, token_batches(tokenizer, text.read_text().split("\n\n"), 24, 24, 6), [2, 3],
                               method, progress=False)  # fmt: skip
    model, _ = load_model(src)  # unfolded, and pruned; the map applied by a hook instead
    arch = find_architecture(model.config)
    layer, mapped = arch.layer_list(model)[1], fits[0].map.float()
    layer.get_submodule(arch.repair_fold).register_forward_hook(lambda module, args, out: out @ mapped)
    if fits[0].norm_weight is not None:
        with torch.no_grad():
            layer.get_submodule(arch.mlp_term).weight.copy_(fits[0].norm_weight)
    prune_model(model, [2, 3])
    folded, _ = load_model(done.path)
    ids = batches()[0]
    with torch.no_grad():
        assert torch.allclose(folded(**ids).logits, model(**ids).logits, atol=2e-4, rtol=1e-4)


def test_statistics_summed_batch_by_batch_equal_one_batch():
    torch.manual_seed(0)
    a, h, x = (torch.randn(300, 16) for _ in range(3))
    whole, parts = repair.BlockStatistics(1, 2), repair.BlockStatistics(1, 2)
    whole.add(a, h, x, keep_samples=0)
    for chunk in range(0, 300, 70):
        parts.add(a[chunk : chunk + 70], h[chunk : chunk + 70], x[chunk : chunk + 70], keep_samples=0)
    assert torch.allclose(whole.aa, parts.aa) and torch.allclose(whole.ar, parts.ar)
    assert whole.rr == pytest.approx(parts.rr) and whole.tokens == parts.tokens == 300


def test_statistics_pooled_from_parts_equal_one_sum_with_the_kept_rows_in_order():
    torch.manual_seed(0)
    a, h, x = (torch.randn(300, 16) for _ in range(3))
    whole = repair.BlockStatistics(1, 2)
    whole.add(a, h, x, keep_samples=250)
    parts = [repair.BlockStatistics(1, 2) for _ in range(0, 300, 70)]
    for part, chunk in zip(parts, range(0, 300, 70), strict=True):
        part.add(a[chunk : chunk + 70], h[chunk : chunk + 70], x[chunk : chunk + 70], keep_samples=70)
    pooled = repair.pooled(parts, keep_samples=250)
    assert torch.allclose(whole.aa, pooled.aa) and torch.allclose(whole.ar, pooled.ar)
    assert whole.rr == pytest.approx(pooled.rr) and whole.tokens == pooled.tokens == 300
    for i in range(3):  # the first 250 rows of each kept tensor, as one sum over all keeps them
        assert torch.equal(torch.cat([s[i] for s in whole.samples]), torch.cat([s[i] for s in pooled.samples]))


def test_bad_repairs_are_one_line():
    model = tiny_model("llama")
    with pytest.raises(LayerpruneError, match="starts at layer 0"):
        repair.repair_model(model, batches(), [0, 1], "linear", progress=False)
    with pytest.raises(LayerpruneError, match="--repair must be one of"):
        repair.repair_model(model, batches(), [2], "magic", progress=False)
    few = repair.BlockStatistics(2, 3)
    few.add(*(torch.randn(5, model.config.hidden_size) for _ in range(3)), keep_samples=0)
    with pytest.raises(LayerpruneError, match=f"at least {model.config.hidden_size} calibration tokens, got 5"):
        repair.fit(few)
    zero = repair.BlockStatistics(2, 3)
    zero.add(torch.zeros(40, 8), torch.randn(40, 8), torch.randn(40, 8), keep_samples=0)
    with pytest.raises(LayerpruneError, match="MLP output is all zero"):
        repair.fit(zero)


def test_prune_with_repair_from_the_command_line_is_quiet_and_recorded(tmp_path):
    from typer.testing import CliRunner

    from layerprune.cli import app

    src = save_tiny(tiny_model("qwen3", seed=3), tmp_path / "model")
    (tmp_path / "text.txt").write_text(HEAL_TEXT)
    done = CliRunner().invoke(app, ["prune", str(src), "--out", str(tmp_path / "out"), "--layers", "3-4", "--repair",
                                    "linear", "--data", str(tmp_path / "text.txt"), "--samples", "24",
                                    "--seq-len", "24"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["repair"]["blocks"][0]["after_layer"] == 2


@pytest.mark.parametrize("strategy", ["angular", "loss"])
def test_a_prune_that_chooses_and_repairs_reads_the_model_once(tmp_path, monkeypatch, strategy):
    """The choice of layers and the repair share one load of the model (a load of a large model
    takes minutes), leave it unchanged, and write what a prune of the chosen layers writes."""
    from safetensors.torch import load_file

    import layerprune.measure.analysis as analysis
    import layerprune.recipes.pipeline as pipeline
    from layerprune import prune

    src = save_tiny(tiny_model("llama", seed=5), tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(HEAL_TEXT)
    loads, original = [], pipeline.load_model

    def counted(*args, **kwargs):
        loaded = original(*args, **kwargs)
        loads.append({k: v.clone() for k, v in loaded[0].state_dict().items()})
        loads[-1]["model"] = loaded[0]
        return loaded

    for module in (pipeline, analysis, repair):
        monkeypatch.setattr(module, "load_model", counted)
    settings = dict(repair="linear", data=str(text), samples=24, seq_len=24, progress=False)
    chosen = prune(src, tmp_path / "chosen", n=2, strategy=strategy, **settings)
    assert len(loads) == 1
    before, model = loads[0], loads[0].pop("model")
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # not folded into
    removed = chosen.record["removed_layers"]
    assert len(removed) == 2 and removed[0] > 0
    given = prune(src, tmp_path / "given", layers=removed, **settings)
    a, b = load_file(chosen.path / "model.safetensors"), load_file(given.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert chosen.record["repair"]["blocks"] == given.record["repair"]["blocks"]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_streamed_path_equals_the_in_memory_one(tmp_path, family):
    """`--offload` sums the same statistics one layer at a time, and writes the same checkpoint."""
    from safetensors.torch import load_file

    from layerprune import load_model, prune
    from layerprune.measure.streaming import LayerStream

    src = save_tiny(tiny_model(family, seed=4), tmp_path / "model")
    model, tokenizer = load_model(src)
    data = token_batches(tokenizer, DOCS, 24, 24, 6)
    blocks = [(2, 3), (4, 6)]
    in_memory = repair.collect(model, data, blocks, keep_samples=50, progress=False)
    streamed = repair.collect_streaming(LayerStream(src), data, blocks, keep_samples=50, progress=False)
    for one, other in zip(in_memory, streamed, strict=True):
        assert (one.start, one.end, one.tokens) == (other.start, other.end, other.tokens)
        assert one.tokens > 0
        assert torch.allclose(one.aa, other.aa, rtol=1e-5, atol=1e-6)
        assert torch.allclose(one.ar, other.ar, rtol=1e-5, atol=1e-6)
        assert one.rr == pytest.approx(other.rr, rel=1e-5)
        assert all(torch.allclose(s, t, atol=1e-5) for s, t in zip(one.samples[0], other.samples[0], strict=True))
    text = tmp_path / "text.txt"
    text.write_text(HEAL_TEXT)
    settings = dict(layers=[1, 3, 4], repair="linear", data=str(text), samples=24, seq_len=24, progress=False)
    plain = prune(src, tmp_path / "plain", offload=False, **settings)
    offloaded = prune(src, tmp_path / "offloaded", offload=True, **settings)
    assert offloaded.record["repair"]["offload"] and not plain.record["repair"]["offload"]
    with pytest.MonkeyPatch.context() as patch:  # too little memory for the whole model: streamed unasked
        patch.setattr(memory, "memory_available", lambda: 100_000)
        chosen = prune(src, tmp_path / "chosen", **settings)
    assert chosen.record["repair"]["offload"] is True
    assert load_file(chosen.path / "model.safetensors").keys() == load_file(offloaded.path / "model.safetensors").keys()
    a, b = load_file(plain.path / "model.safetensors"), load_file(offloaded.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert [b["block"] for b in offloaded.record["repair"]["blocks"]] == [[1, 1], [3, 4]]
    assert offloaded.record["repair"]["blocks"] == plain.record["repair"]["blocks"] or all(
        x["fit_residual"] == pytest.approx(y["fit_residual"], rel=1e-4)
        for x, y in zip(offloaded.record["repair"]["blocks"], plain.record["repair"]["blocks"], strict=True)
    )
