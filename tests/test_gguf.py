"""GGUF out: a GGUF pruned into a GGUF with its tensors' bytes unchanged, checked by transformers'
GGUF loader; any checkpoint exported through llama.cpp's converter; bad input refused in one line."""

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import folder_digest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.cut.gguf_surgery import RECORD_KEY, check_sliding_pattern, read_gguf
from layerprune.errors import LayerpruneError
from layerprune.runtime.models import gguf_file

runner = CliRunner()


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_gguf(path: Path, arch: str = "llama", blocks: int = 3, claimed: int | None = None, norm_size: int = 8) -> Path:
    """A small GGUF written with llama.cpp's writer: `blocks` layers of two F32 tensors each (a norm
    of `norm_size` floats, the model's width: 32 bytes fill the alignment, other sizes are padded),
    and a vocabulary."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.block_count", blocks if claimed is None else claimed)
    writer.add_array(f"{arch}.attention.head_count", [4 + layer for layer in range(blocks)])  # a per-layer array
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "", "héllo", "▁世界", "x" * 300])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.25, 0.0, 1e-3])
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.arange(8 * norm_size, dtype=np.float32).reshape(8, norm_size))  # width
    for layer in range(blocks):
        writer.add_tensor(f"blk.{layer}.attn_q.weight", np.full((8, 8), layer, dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.full((norm_size,), 10 + layer, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.arange(norm_size, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_keeps_its_tensors_bytes_renumbered_and_its_metadata_cut(tmp_path):
    from layerprune import prune

    source = tiny_gguf(tmp_path / "tiny.gguf", blocks=4)
    result = prune(source, tmp_path / "out.gguf", layers=[1, 2])
    reader = read_gguf(tmp_path / "out.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["blk.0.attn_q.weight", "blk.0.ffn_norm.weight", "blk.1.attn_q.weight",
                               "blk.1.ffn_norm.weight", "output_norm.weight", "token_embd.weight"]  # fmt: skip
    assert tensors["blk.1.attn_q.weight"].data[0, 0] == 3 and tensors["blk.1.ffn_norm.weight"].data[0] == 13
    assert reader.get_field("llama.block_count").contents() == 2
    assert reader.get_field("llama.attention.head_count").contents() == [4, 7]
    record = json.loads(reader.get_field(RECORD_KEY).contents())
    assert record["removed_layers"] == [1, 2] == result.removed and record["kept_layers"] == [0, 3]


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(2, 6), norm_size=st.integers(1, 20), data=st.data())
def test_any_removal_keeps_every_other_byte_as_llama_cpps_own_reader_reads_it(blocks, norm_size, data):
    """Our reader (arrays read whole) and our writer (unchanged metadata and runs of tensors copied as
    bytes) against the package's own reader, element by element: only the cut changes."""
    from gguf import GGUFReader

    from layerprune.cut.gguf_surgery import prune_gguf

    removed = sorted(data.draw(st.sets(st.integers(0, blocks - 1), min_size=1, max_size=blocks - 1)))
    keep = [layer for layer in range(blocks) if layer not in removed]
    with tempfile.TemporaryDirectory() as tmp:
        source = tiny_gguf(Path(tmp) / "tiny.gguf", blocks=blocks, norm_size=norm_size)
        ours = read_gguf(source)
        original = GGUFReader(source)
        assert {k: f.contents() for k, f in ours.fields.items()} == {
            k: f.contents() for k, f in original.fields.items()
        }
        prune_gguf(source, Path(tmp) / "out.gguf", removed, {}, reader=ours)
        pruned = GGUFReader(Path(tmp) / "out.gguf")
        changed = {"GGUF.kv_count", "GGUF.tensor_count", "llama.block_count", "llama.attention.head_count", RECORD_KEY}
        assert {k: f.contents() for k, f in pruned.fields.items() if k not in changed} == {
            k: f.contents() for k, f in original.fields.items() if k not in changed
        }
        assert pruned.get_field("llama.attention.head_count").contents() == [4 + layer for layer in keep]
        old = {t.name: t for t in original.tensors}
        names = [t.name for t in pruned.tensors]
        expected = [n for n in old if not n.startswith("blk.") or int(n.split(".")[1]) in keep]
        assert len(names) == len(expected)
        for tensor, name in zip(pruned.tensors, expected, strict=True):
            if name.startswith("blk."):
                _, index, rest = name.split(".", 2)
                assert tensor.name == f"blk.{keep.index(int(index))}.{rest}"
            assert np.array_equal(tensor.data, old[name].data) and tensor.tensor_type == old[name].tensor_type


@pytest.mark.real
def test_smollm2s_pruned_gguf_is_its_quantized_bytes_and_gives_the_in_memory_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerprune import load_model, prune_model

    source = gguf_file("smollm2-135m")
    before = file_digest(source)
    done = runner.invoke(app, ["prune", "smollm2-135m", "--n", "4", "--strategy", "deepest", "--out",
                               str(tmp_path / "pruned.gguf")])  # fmt: skip
    assert done.exit_code == 0, done.stderr
    original, pruned = read_gguf(source), read_gguf(tmp_path / "pruned.gguf")
    old = {t.name: t for t in original.tensors}
    keep = json.loads(pruned.get_field(RECORD_KEY).contents())["kept_layers"]
    for tensor in pruned.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            name = f"blk.{keep[int(index)]}.{rest}"
        assert tensor.tensor_type == old[name].tensor_type and np.array_equal(tensor.data, old[name].data)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="pruned.gguf", dtype=torch.float32).eval()
    model, _ = load_model("smollm2-135m")
    prune_model(model, [25, 26, 27, 28])
    ids = torch.randint(10, 5000, (1, 80))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert file_digest(source) == before


@pytest.mark.real
def test_gemma3s_gguf_pruned_by_six_keeps_its_attention_pattern_past_the_window(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerprune import load_model, prune, prune_model

    result = prune("gemma3-270m", tmp_path / "pruned.gguf", n=6, strategy="deepest")
    assert result.removed == [11, 12, 13, 14, 15, 16]
    source, out = gguf_file("gemma3-270m"), tmp_path / "pruned.gguf"
    layer_bytes = sum(t.n_bytes for t in read_gguf(source).tensors if t.name.startswith("blk."))
    other_bytes = sum(t.n_bytes for t in read_gguf(source).tensors if not t.name.startswith("blk."))
    written = sum(t.n_bytes for t in read_gguf(out).tensors)
    share = (written - other_bytes) / layer_bytes
    print(f"gemma3 Q4_K_M: {source.stat().st_size} bytes -> {out.stat().st_size}; the layers' share "
          f"{layer_bytes} -> {written - other_bytes}: {share:.4f} of it (12/18 = {12 / 18:.4f})")  # fmt: skip
    assert written == other_bytes + layer_bytes * 12 // 18  # every layer of Gemma 3 holds the same bytes
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="pruned.gguf", dtype=torch.float32).eval()
    model, _ = load_model("gemma3-270m")
    prune_model(model, result.removed)
    assert loaded.config.layer_types == model.config.layer_types
    ids = torch.randint(10, 5000, (1, 600))  # longer than the 512-token sliding window
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_removal_that_moves_gemma3s_global_layers_is_refused_by_name():
    check_sliding_pattern("gemma3", 18, [i for i in range(18) if i not in range(11, 17)])  # 6: the pattern holds
    with pytest.raises(LayerpruneError, match="would change which layers use global attention .layer 17 among them"):
        check_sliding_pattern("gemma3", 18, [i for i in range(18) if i not in range(13, 17)])
    check_sliding_pattern("llama", 30, [0, 5, 29])  # no implicit pattern
    check_sliding_pattern("gemma2", 8, [0, 1, 4, 5, 6, 7])  # gemma2's period of 2, from its family file
    with pytest.raises(LayerpruneError, match="a period of 2"):
        check_sliding_pattern("gemma2", 8, [0, 2, 3, 4, 5, 6, 7])


def refused(tmp_path, args, message, source):
    """The command fails in one line with `message`, leaves nothing new and the source unchanged."""
    before, listing = file_digest(source), sorted(p.name for p in tmp_path.iterdir())
    done = runner.invoke(app, args)
    assert done.exit_code == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr, done.stderr
    assert file_digest(source) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


def test_bad_ggufs_and_outputs_are_one_line_with_nothing_left(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    miscounted = tiny_gguf(tmp_path / "miscounted.gguf", claimed=5)
    foreign = tiny_gguf(tmp_path / "foreign.gguf", arch="mamba")
    out = str(tmp_path / "out.gguf")
    refused(
        tmp_path, ["prune", str(truncated), "--layers", "1", "--out", out], "is not a readable GGUF file", truncated
    )
    header = good.read_bytes()
    for cut in ("héllo".encode(), np.float32(2.25).tobytes()):  # inside the string array, the float array
        inside = tmp_path / "cut.gguf"
        inside.write_bytes(header[: header.index(cut) + 2])
        refused(tmp_path, ["prune", str(inside), "--layers", "1", "--out", out], "it is truncated", inside)
    refused(tmp_path, ["prune", str(miscounted), "--layers", "1", "--out", out],
            "its block count (5) disagrees with its layer tensors (blk.0..blk.2)", miscounted)  # fmt: skip
    refused(tmp_path, ["prune", str(foreign), "--layers", "1", "--out", out],
            "GGUF architecture 'mamba' is not one layerprune knows the layers of", foreign)  # fmt: skip
    refused(tmp_path, ["prune", str(good), "--layers", "1", "--out", str(tmp_path / "out.onnx")],
            ".onnx names no format layerprune writes", good)  # fmt: skip
    refused(tmp_path, ["prune", str(good), "--layers", "1", "--out", str(good)], "is the input model", good)
    refused(tmp_path, ["prune", str(good), "--layers", "2", "--out", out], "final layer", good)


def test_an_existing_output_is_replaced_only_if_layerprune_wrote_it(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf")
    out = tmp_path / "out.gguf"
    assert runner.invoke(app, ["prune", str(good), "--layers", "0", "--out", str(out)]).exit_code == 0
    refused(tmp_path, ["prune", str(good), "--layers", "1", "--out", str(out)], "already exists", good)
    assert runner.invoke(app, ["prune", str(good), "--layers", "1", "--out", str(out), "--overwrite"]).exit_code == 0
    other = tiny_gguf(tmp_path / "other.gguf")
    refused(tmp_path, ["prune", str(good), "--layers", "1", "--out", str(other), "--overwrite"],
            "is a file layerprune did not write", good)  # fmt: skip


@pytest.mark.real
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_the_gguf_export_of_a_pruned_checkpoint_gives_its_logits(tmp_path, outtype):
    from transformers import AutoModelForCausalLM

    from layerprune import load_model, prune

    pruned = prune("smollm2-135m", tmp_path / "pruned", n=4, strategy="deepest").path
    done = runner.invoke(app, ["export", str(pruned), "--format", "gguf", "--outtype", outtype, "--out",
                               str(tmp_path / "model")])  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert (tmp_path / "model.gguf").is_file() and not list(tmp_path.glob(".model*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    model, _ = load_model(pruned)
    ids = torch.randint(10, 5000, (2, 64))
    with torch.no_grad():
        ours, theirs = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    kl = torch.nn.functional.kl_div(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), log_target=True,
                                    reduction="none").sum(-1).mean().item()  # fmt: skip
    print(f"{outtype}: max logit difference {(ours - theirs).abs().max().item():.4f}, mean KL {kl:.2e}")
    assert kl < (1e-3 if outtype == "f16" else 1e-2)
    if outtype == "f16":
        torch.testing.assert_close(ours, theirs, atol=0.1, rtol=0.02)
    record = json.loads(read_gguf(tmp_path / "model.gguf").get_field(RECORD_KEY).contents())
    assert record["gguf_export"]["outtype"] == outtype and record["removed_layers"] == [25, 26, 27, 28]


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_a_k_quant_export_is_quantized_by_llama_cpp_and_stays_close(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoModelForCausalLM

    from layerprune import load_model, prune

    pruned = prune("smollm2-135m", tmp_path / "pruned", n=4, strategy="deepest").path
    done = runner.invoke(app, ["export", str(pruned), "--format", "gguf", "--outtype", "q4_k_m", "--out",
                               str(tmp_path / "model.gguf")])  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "pruned"]
    reader = read_gguf(tmp_path / "model.gguf")
    types = {t.tensor_type for t in reader.tensors if t.name.startswith("blk.")}
    assert Q.Q4_K in types or Q.Q5_0 in types, types  # 576-wide rows fall back from k-quants, as llama.cpp does
    assert json.loads(reader.get_field(RECORD_KEY).contents())["gguf_export"]["outtype"] == "q4_k_m"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    model, _ = load_model(pruned)
    ids = torch.randint(10, 5000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    kl = torch.nn.functional.kl_div(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), log_target=True,
                                    reduction="none").sum(-1).mean().item()  # fmt: skip
    print(f"q4_k_m: {sorted(t.name for t in types)}, mean KL {kl:.2e}")
    assert kl < 0.15  # 4-bit weights: measured 0.08


def test_a_k_quant_without_llama_cpp_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    source = tiny_gguf(tmp_path / "tiny.gguf")
    before = file_digest(source)
    done = runner.invoke(app, ["prune", str(source), "--layers", "1", "--heal", "--format", "gguf", "--outtype",
                               "q4_k_m", "--out", str(tmp_path / "out.gguf")])  # fmt: skip
    assert done.exit_code == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "--outtype q4_k_m needs llama.cpp's quantizer: pip install llama-cpp-python" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"] and file_digest(source) == before
    done = runner.invoke(app, ["export", str(source), "--format", "gguf", "--outtype", "q9_x", "--out",
                               str(tmp_path / "out.gguf")])  # fmt: skip
    assert done.exit_code == 1 and "--outtype must be one of f16, bf16, q8_0, f32, q4_0" in done.stderr


def test_a_family_the_converter_does_not_know_is_named_in_one_line(tmp_path):
    from conftest import save_tiny, tiny_model

    folder = save_tiny(tiny_model("llama"), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NovelForCausalLM"]}))
    before = folder_digest(folder)
    done = runner.invoke(app, ["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert done.exit_code == 1 and done.stderr.count("\n") == 1
    assert "llama.cpp's converter does not support NovelForCausalLM" in done.stderr, done.stderr
    assert folder_digest(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.real
def test_a_sweep_exports_every_pruned_point_and_prune_heals_into_a_gguf(tmp_path):
    """The end of the pipeline is a GGUF file: unhealed points cut from the source GGUF (its
    quantization kept), healed ones converted; `prune --heal --format gguf` likewise."""
    short = ["--samples", "4", "--seq-len", "32", "--heal-steps", "1", "--heal-batch-size", "1", "--heal-grad-accum",
             "1", "--heal-seq-len", "32", "--heal-no-quant", "--heal-validation-sequences", "1"]  # fmt: skip
    args = ["sweep", "smollm2-135m", "--out", str(tmp_path / "sweep"), "--n", "0,2", "--strategies", "deepest",
            "--tasks", "loss", "--limit", "4", "--no-sensitivity", "--export", "gguf", *short]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.stderr
    folder = tmp_path / "sweep" / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == ["deepest-n2-healed.gguf", "deepest-n2.gguf"]
    unhealed, healed = read_gguf(folder / "deepest-n2.gguf"), read_gguf(folder / "deepest-n2-healed.gguf")
    source = {t.name: t.tensor_type for t in read_gguf(gguf_file("smollm2-135m")).tensors}
    assert {t.name: t.tensor_type for t in unhealed.tensors if not t.name.startswith("blk.2")} == {
        n: k for n, k in source.items() if not n.startswith("blk.2")
    }  # fmt: skip
    assert unhealed.get_field("llama.block_count").contents() == healed.get_field("llama.block_count").contents() == 28
    assert json.loads(healed.get_field(RECORD_KEY).contents())["healing"]["config"]["steps"] == 1
    heal_args = ["prune", "smollm2-135m", "--n", "2", "--strategy", "deepest", "--heal", "--format", "gguf", "--out",
                 str(tmp_path / "healed"), *short[4:]]  # fmt: skip
    done = runner.invoke(app, heal_args)
    assert done.exit_code == 0, done.stderr
    assert read_gguf(tmp_path / "healed.gguf").get_field("llama.block_count").contents() == 28
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed.gguf", "sweep"]
