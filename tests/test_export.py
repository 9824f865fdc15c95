"""Quantized exports that load and generate, and leave their input alone."""

import json

import pytest
import torch
from conftest import assert_one_line_error, folder_digest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.recipes.export import export_quantized


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_export_loads_and_generates(full_and_pruned, tmp_path, scheme):
    root, full, pruned = full_and_pruned
    before = folder_digest(pruned)
    out = export_quantized(pruned, tmp_path / scheme, scheme).path
    assert folder_digest(pruned) == before
    record = json.loads((out / "layerprune.json").read_text())
    assert record["quantization"]["scheme"] == scheme and record["removed_layers"] == [1, 2, 3]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.quantization_config.quant_method == "bitsandbytes"
    with torch.no_grad():
        generated = loaded.generate(torch.tensor([[1, 7, 9, 11]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < sum(
        p.stat().st_size for p in pruned.glob("*.safetensors")
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["export", "{full}", "--out", "{tmp}/q", "--quantize", "int3"], "unknown quantization 'int3'"),
        (["prune", "{full}", "--out", "{tmp}/q", "--n", "2", "--quantize", "int3"], "unknown quantization 'int3'"),
        (["heal", "{full}", "--out", "{tmp}/q", "--quantize", "fp2"], "unknown quantization 'fp2'"),
        (["export", "{tmp}/missing", "--out", "{tmp}/q"], "not found"),
    ],
)
def test_bad_input_gets_one_line(full_and_pruned, tmp_path, args, fragment):
    root, full, pruned = full_and_pruned
    result = CliRunner().invoke(app, [a.format(full=full, tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.unquantized").exists()


def test_export_where_bitsandbytes_cannot_run_names_the_machine(full_and_pruned, tmp_path, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(LayerpruneError, match="CUDA GPUs"):
        export_quantized(full_and_pruned[1], tmp_path / "q", "nf4")
