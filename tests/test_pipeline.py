"""Recipes: choose then cut, prune then heal, then quantize; every output carries its record."""

import json
import os

import pytest
from conftest import folder_digest, save_tiny, tiny_config, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.recipes.pipeline import prune

DOCS = [f"Calibration text number {i}: the quick brown fox jumps over the lazy dog again." for i in range(6)]


def test_pruning_a_pruned_model_keeps_history(tmp_path):
    src = save_tiny(tiny_model("qwen2"), tmp_path / "src")
    once = prune(src, tmp_path / "once", n=1, strategy="deepest").path
    twice = prune(once, tmp_path / "twice", layers=[0]).path
    record = json.loads((twice / "layerprune.json").read_text())
    assert record["num_layers_before"] == 5 and record["num_layers_after"] == 4
    assert record["history"][0]["removed_layers"] == [4]
    full_types = tiny_config("qwen2").layer_types
    assert len(set(full_types)) == 2
    assert AutoModelForCausalLM.from_pretrained(twice).config.layer_types == [full_types[i] for i in (1, 2, 3, 5)]


def test_prune_with_a_loss_strategy_records_every_candidate(tmp_path):
    src = save_tiny(tiny_model("llama", seed=7), tmp_path / "src")
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    out = prune(src, tmp_path / "out", n=2, strategy="loss", data=str(data), samples=6, seq_len=40, progress=False).path
    record = json.loads((out / "layerprune.json").read_text())
    scored = record["selection"]["candidates"]
    assert len(scored) == 4 and record["removed_layers"] == min(scored, key=lambda c: c["loss"])["layers"]
    assert record["selection"]["forward_passes"] > 0


def test_prune_without_progress_prints_no_bar_of_its_own_or_of_transformers(tmp_path, capfd):
    """`progress=False` hides transformers' "Loading weights" bar too, and only while it runs."""
    from transformers.utils import logging as transformers_logging

    src = save_tiny(tiny_model("llama", seed=7), tmp_path / "src")
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    capfd.readouterr()
    prune(src, tmp_path / "out", n=2, strategy="loss", repair="linear", data=str(data), samples=6, seq_len=40,
          progress=False)  # fmt: skip
    assert capfd.readouterr().err == ""
    assert transformers_logging.is_progress_bar_enabled()
    prune(src, tmp_path / "shown", n=2, strategy="loss", data=str(data), samples=6, seq_len=40)
    assert "Loading weights" in capfd.readouterr().err


def test_too_little_calibration_data_is_refused(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    data = tmp_path / "tiny.txt"
    data.write_text("too short")
    with pytest.raises(LayerpruneError, match="too small to score blocks"):
        prune(src, tmp_path / "out", n=2, strategy="loss", data=str(data), seq_len=64, progress=False)
    assert not (tmp_path / "out").exists()


def test_loss_strategies_say_when_the_model_would_not_fit_in_memory(tmp_path, monkeypatch):
    import layerprune.runtime.memory

    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    monkeypatch.setattr(layerprune.runtime.memory, "memory_available", lambda: 10_000)
    with pytest.raises(LayerpruneError, match="whole model in memory.*use angular or bi"):
        prune(src, tmp_path / "out", n=2, strategy="loss", progress=False)
    assert not (tmp_path / "out").exists()


def test_prune_heal_and_quantize_from_the_cli(base, text, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "prune",
            str(base),
            "--out",
            str(tmp_path / "ph"),
            "--n",
            "2",
            "--strategy",
            "deepest",
            "--heal",
            "--heal-steps",
            "4",
            "--heal-seq-len",
            "64",
            "--heal-data",
            str(text),
            "--heal-no-quant",
            "--heal-batch-size",
            "2",
            "--heal-grad-accum",
            "1",
            "--quantize",
            "nf4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "removed 2 of 6 layers (deepest): [3, 4]" in result.stdout and "healed (LoRA, 4 steps)" in result.stdout
    record = json.loads((tmp_path / "ph" / "layerprune.json").read_text())
    assert record["removed_layers"] == [3, 4] and record["healing"]["config"]["steps"] == 4
    assert record["quantization"]["scheme"] == "nf4"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ph")
    assert loaded.config.num_hidden_layers == 4 and loaded.config.quantization_config.load_in_4bit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "heal.txt", "ph"]  # no staging left


def test_prune_with_quantize_writes_the_pruned_model_quantized(tmp_path):
    full = save_tiny(tiny_model("llama", seed=8), tmp_path / "full")
    before = folder_digest(full)
    args = ["prune", str(full), "--out", str(tmp_path / "q"), "--layers", "1-3", "--quantize", "int8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "removed 3 of 6 layers" in result.stdout and "int8" in result.stdout
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.config.num_hidden_layers == 3 and loaded.config.quantization_config.load_in_8bit
    record = json.loads((tmp_path / "q" / "layerprune.json").read_text())
    assert record["removed_layers"] == [1, 2, 3]
    assert record["quantization"] == {"scheme": "int8", "backend": "bitsandbytes", "device": "cpu", "dtype": "float32",
                                      "device_map": None}  # fmt: skip
    assert folder_digest(full) == before and sorted(p.name for p in tmp_path.iterdir()) == ["full", "q"]
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "q").iterdir():  # a checkpoint others can read, as the umask allows
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
