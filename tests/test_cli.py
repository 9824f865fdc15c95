"""The command line: real runs on tiny checkpoints, and one-line errors for bad input."""

import json

import pytest
from conftest import folder_digest, save_tiny, tiny_model
from typer.testing import CliRunner

from layerprune.cli import app


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("ckpt") / "model")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_prune_deepest_from_the_cli(checkpoint, tmp_path):
    result = run("prune", checkpoint, "--out", tmp_path / "out", "--n", 2, "--strategy", "deepest")
    assert result.exit_code == 0, result.output
    assert "removed 2 of 6 layers (deepest): [3, 4]" in result.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_models_lists_the_builtins():
    result = run("models")
    assert result.exit_code == 0
    assert "smollm2-135m" in result.stdout and "gemma3-270m" in result.stdout and "cache:" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--n", 0, "--strategy", "deepest"], "n must be between 1 and 5"),
        (["--n", 6, "--strategy", "deepest"], "n must be between 1 and 5"),
        (["--layers", "4-9"], "out of range"),
        (["--layers", "5"], "final layer"),
        (["--fraction", 1.5, "--strategy", "deepest"], "fraction must be in (0, 1)"),
        (["--n", 2, "--strategy", "wrong"], "unknown strategy"),
        (["--n", 2, "--layers", "1"], "exactly one of"),
    ],
)
def test_prune_refuses_impossible_layers(checkpoint, tmp_path, args, fragment):
    before = folder_digest(checkpoint)
    result = run("prune", checkpoint, "--out", tmp_path / "out", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    assert folder_digest(checkpoint) == before


def test_prune_refuses_an_existing_output(checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("prune", checkpoint, "--out", tmp_path / "out", "--n", 1, "--strategy", "deepest")
    assert_one_line_error(result, "already exists", "--overwrite")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("damage", ["truncate", "garble_header"])
def test_corrupted_safetensors_is_refused(tmp_path, damage):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\x00garbage" + data[16:])
    before = folder_digest(src)
    result = run("prune", src, "--out", tmp_path / "out", "--n", 1, "--strategy", "deepest")
    assert_one_line_error(result, "corrupted safetensors file")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    result = run("analyze", src, "--out", tmp_path / "an", "--data", "coqa", "--samples", 2)
    assert_one_line_error(result, "corrupted safetensors file")
    assert not (tmp_path / "an").exists()
    assert folder_digest(src) == before


def test_empty_data_is_refused(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    result = run("analyze", checkpoint, "--out", tmp_path / "an", "--data", empty)
    assert_one_line_error(result, "holds no text")
    result = run("analyze", checkpoint, "--out", tmp_path / "an", "--data", tmp_path / "missing.txt")
    assert_one_line_error(result, "not found", "coqa")
    assert not (tmp_path / "an").exists()


def test_a_gguf_that_is_not_one_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all" * 10)
    result = run("prune", fake, "--out", tmp_path / "out", "--n", 1, "--strategy", "deepest")
    assert_one_line_error(result, "is not a GGUF file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_missing_model_and_unsupported_family_are_refused(tmp_path):
    result = run("prune", tmp_path / "nowhere", "--out", tmp_path / "out", "--n", 1, "--strategy", "deepest")
    assert_one_line_error(result, "not found", "smollm2-135m")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert", "num_hidden_layers": 4})
    )
    result = run("prune", bert, "--out", tmp_path / "out", "--n", 1, "--strategy", "deepest")
    assert_one_line_error(result, "unsupported architecture", "llama", "gpt2")
    assert not (tmp_path / "out").exists()
