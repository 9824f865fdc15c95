"""Inference benchmark fields, and quantized exports that load and generate."""

import json

import pytest
import torch
from conftest import folder_digest, save_tiny, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune import prune
from layerprune.cli import app
from layerprune.deployment import InferenceSettings, benchmark, export_quantized
from layerprune.errors import LayerpruneError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    full = save_tiny(tiny_model("llama", seed=8), root / "full")
    pruned = prune(full, root / "pruned", layers=[1, 2, 3]).path
    return root, full, pruned


@pytest.mark.slow
def test_bench_reports_every_field_for_each_model(models):
    root, full, pruned = models
    results = benchmark([full, pruned], InferenceSettings(prompt_tokens=16, new_tokens=4, repeats=2))
    assert [r["num_layers"] for r in results] == [6, 3]
    assert results[1]["parameters"] < results[0]["parameters"]
    assert results[1]["disk_bytes"] < results[0]["disk_bytes"]
    for r in results:
        assert r["peak_memory_mb"] > 0 and r["device"] == "cpu"
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]


@pytest.mark.slow
def test_bench_cli_writes_table_json_and_chart(models, tmp_path):
    root, full, pruned = models
    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(full),
            str(pruned),
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.stdout and "pruned" in result.stdout
    assert len(json.loads((tmp_path / "b" / "bench.json").read_text())["models"]) == 2
    assert (tmp_path / "b" / "bench.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_export_loads_and_generates(models, tmp_path, scheme):
    root, full, pruned = models
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
        (["bench", "{tmp}/missing"], "not found"),
        (["bench", "{full}", "--new-tokens", "0"], "at least 1"),
        (["bench", "{full}", "--prompt-tokens", "-1"], "at least 1"),
    ],
)
def test_bad_input_gets_one_line(models, tmp_path, args, fragment):
    root, full, pruned = models
    result = CliRunner().invoke(app, [a.format(full=full, tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.unquantized").exists()


def test_export_where_bitsandbytes_cannot_run_names_the_machine(models, tmp_path, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(LayerpruneError, match="CUDA GPUs"):
        export_quantized(models[1], tmp_path / "q", "nf4")
