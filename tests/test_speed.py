"""Inference benchmark: every field for each model, and its command's table, JSON and chart."""

import json

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.evaluation.speed import InferenceSettings, benchmark


@pytest.mark.slow
def test_bench_reports_every_field_for_each_model(full_and_pruned):
    root, full, pruned = full_and_pruned
    results = benchmark([full, pruned], InferenceSettings(prompt_tokens=16, new_tokens=4, repeats=2))
    assert [r["num_layers"] for r in results] == [6, 3]
    assert results[1]["parameters"] < results[0]["parameters"]
    assert results[1]["disk_bytes"] < results[0]["disk_bytes"]
    for r in results:
        assert r["peak_memory_mb"] > 0 and r["device"] == "cpu"
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]


@pytest.mark.slow
def test_bench_cli_writes_table_json_and_chart(full_and_pruned, tmp_path):
    root, full, pruned = full_and_pruned
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



@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bench", "{tmp}/missing"], "not found"),
        (["bench", "{full}", "--new-tokens", "0"], "at least 1"),
        (["bench", "{full}", "--prompt-tokens", "-1"], "at least 1"),
    ],
)
def test_bad_input_gets_one_line(full_and_pruned, tmp_path, args, fragment):
    root, full, pruned = full_and_pruned
    result = CliRunner().invoke(app, [a.format(full=full, tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert_one_line_error(result, fragment)
