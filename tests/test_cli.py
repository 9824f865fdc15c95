"""The command line: real runs on tiny checkpoints, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, folder_digest, save_tiny, tiny_config, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune.cli import app


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("ckpt") / "model")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="layerprune")


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
    assert_one_line_error(result, "holds files that layerprune did not write", "--overwrite")
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


def test_disk_prune_imports_neither_torch_nor_transformers(tmp_path):
    """config.json is edited as JSON: the start-up of torch and transformers is most of a small prune's time."""
    src = save_tiny(tiny_model("gemma3_text"), tmp_path / "src")
    out = str(tmp_path / "out")
    command = [sys.executable, "-X", "importtime", "-m", "layerprune", "prune", str(src), "--n", "2", "--out", out]
    done = subprocess.run([*command, "--strategy", "deepest"], capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "layerprune.cut.surgery" in imported and not {"torch", "transformers"} & imported
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    assert loaded.num_hidden_layers == 4
    assert loaded.layer_types == [tiny_config("gemma3_text").layer_types[i] for i in (0, 1, 2, 5)]


def test_a_bug_is_one_line_with_exit_2_and_a_traceback_only_when_debugging(checkpoint, tmp_path, monkeypatch):
    import layerprune.recipes.pipeline

    def broken(*args, **kwargs):
        raise TypeError("an internal mistake\nwith a second line")

    monkeypatch.setattr(layerprune.recipes.pipeline, "choose_layers", broken)
    args = ["prune", checkpoint, "--out", tmp_path / "out", "--n", 1, "--strategy", "deepest"]
    result = run(*args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "internal error, a bug in layerprune: TypeError: an internal mistake" in result.stderr
    assert "LAYERPRUNE_DEBUG=1" in result.stderr and "Traceback" not in result.output
    monkeypatch.setenv("LAYERPRUNE_DEBUG", "1")
    debug = run(*args)
    assert isinstance(debug.exception, TypeError)  # raised through: the traceback is shown
    assert not (tmp_path / "out").exists()


def test_a_layer_named_twice_is_a_one_line_warning_after_success(checkpoint, tmp_path):
    result = run("prune", checkpoint, "--out", tmp_path / "out", "--layers", "1-2,2")
    assert result.exit_code == 0
    assert result.stderr.strip() == "warning: layers '1-2,2' name some layer twice; each is removed once"
    assert "removed 2 of 6 layers (explicit): [1, 2]" in result.stdout


def test_analyze_into_an_existing_file_or_folder_is_refused(checkpoint, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = run("analyze", checkpoint, "--out", tmp_path / "taken", "--samples", 2)
    assert_one_line_error(result, "exists and is not a folder")
    (tmp_path / "done").mkdir()
    result = run("analyze", checkpoint, "--out", tmp_path / "done", "--samples", 2)
    assert_one_line_error(result, "already exists", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "taken"]


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda raw: raw["angular"]["2"].pop(), "row n = 2 of the angular table should have 5 distances"),
        (lambda raw: raw["block_influence"].pop(), "Block Influence should have 6 values"),
        (lambda raw: raw.pop("angular"), "KeyError"),
    ],
)
def test_a_damaged_analysis_file_is_refused_in_one_line(checkpoint, tmp_path, damage, fragment):
    out = tmp_path / "an"
    assert run("analyze", checkpoint, "--out", out, "--samples", 2, "--seq-len", 16).exit_code == 0
    raw = json.loads((out / "distances.json").read_text())
    damage(raw)
    (out / "distances.json").write_text(json.dumps(raw))
    result = run("prune", checkpoint, "--out", tmp_path / "p", "--n", 2, "--analysis", out / "distances.json")
    assert_one_line_error(result, "is not a layerprune distances.json", fragment)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_stopped_prune_leaves_nothing(checkpoint, tmp_path, signal_name):
    """A scheduler's SIGTERM and a closed terminal's SIGHUP clean up like Ctrl-C."""
    script = f"""
import os, signal, sys
import layerprune.io.checkpoint as checkpoint
def stop(*args):
    os.kill(os.getpid(), signal.{signal_name})
checkpoint.write_shard = stop
from layerprune.cli import main
sys.argv = ["layerprune", "prune", {str(checkpoint)!r}, "--out", {str(tmp_path / "out")!r}, "--layers", "1"]
main()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 130 and done.stderr.strip().endswith("interrupted"), done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_successful_heal_prints_only_its_own_lines_and_progress(tmp_path):
    """Success is quiet: the libraries' warnings (transformers, peft, bitsandbytes) appear only
    with --verbose."""
    from conftest import HEAL_TEXT

    src = save_tiny(tiny_model("llama", seed=1), tmp_path / "base")
    (tmp_path / "heal.txt").write_text(HEAL_TEXT)
    command = [sys.executable, "-m", "layerprune", "heal", str(src), "--data", str(tmp_path / "heal.txt"),
               "--no-quant", "--steps", "2", "--batch-size", "2", "--seq-len", "32"]  # fmt: skip
    quiet = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    lines = [line for line in quiet.stderr.replace("\r", "\n").splitlines() if line.replace("\x1b[A", "").strip()]
    assert all("%|" in line for line in lines), lines  # progress bars only
    for phase in ("validating", "heal", "merging"):  # no silent phase
        assert any(line.startswith(f"{phase}:") for line in lines), (phase, lines)
    assert quiet.stdout.splitlines()[-1] == f"wrote {tmp_path / 'a'}"
    verbose = [sys.executable, "-m", "layerprune", "--verbose", *command[3:], "--out", str(tmp_path / "b")]
    loud = subprocess.run(verbose, capture_output=True, text=True)
    assert loud.returncode == 0 and any("%|" not in line for line in loud.stderr.splitlines() if line.strip())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "model", "--nn", "3"], "No such option: --nn (Possible options: --n); see `layerprune prune -"),
        (["prune"], "Missing argument 'model'; see `layerprune prune --help`"),
        (["prune", "model", "--out", "x", "--n", "abc"], "Invalid value for '--n' / '--count'"),
        (["no-such-command"], "No such command 'no-such-command'; see `layerprune --help`"),
    ],
)
def test_option_errors_are_one_line_and_exit_1_like_every_user_error(args, message):
    result = run(*args)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_version_and_short_help():
    from layerprune import __version__

    version = run("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"layerprune {__version__}"
    for args in (["-h"], ["prune", "-h"], []):
        shown = run(*args)
        assert shown.exit_code == 0 and "Usage: layerprune" in shown.stdout
    assert "--repair" in run("prune", "-h").stdout
    assert "'layerprune[vllm]'" in run("evaluate", "-h").stdout  # not eaten as rich markup


def test_options_as_lm_eval_users_type_them(checkpoint, tmp_path):
    """`--seq_len` is `--seq-len`, and evaluate's `--output-path` is its `--out`; values are left alone."""
    done = run("prune", checkpoint, "--out", tmp_path / "out_folder", "--n", 1, "--strategy", "deepest",
               "--allow_final")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "out_folder" / "layerprune.json").read_text())["removed_layers"] == [4]
    text = tmp_path / "some_text.txt"
    text.write_text("\n\n".join(f"Passage {i} about the river and the mill." for i in range(6)))
    done = run("evaluate", tmp_path / "out_folder", "--tasks", "loss", "--loss_data", text, "--limit", 4,
               "--output-path", tmp_path / "results.json")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["loss"]["n"] == 4


def test_the_cli_reference_is_generated_from_the_commands_and_has_not_drifted():
    from pathlib import Path

    from layerprune.cli import reference

    written = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert written == reference(), "docs/cli.md is out of date: run `make docs`"
    assert "| `--repair` | none |" in written and "## `layerprune cache`" in written


WITHOUT_EXTRAS = """
import importlib.metadata, importlib.util, sys
from importlib.abc import MetaPathFinder

EXTRAS = ("lm_eval", "lm-eval", "datasets", "peft", "bitsandbytes")

class Missing(MetaPathFinder):  # as if layerprune were installed without its extras
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

def hidden(real, missing):
    def find(name, *args, **kwargs):
        if str(name).split(".")[0] in EXTRAS:
            return missing(name)
        return real(name, *args, **kwargs)
    return find

def not_found(name):
    raise importlib.metadata.PackageNotFoundError(name)

sys.meta_path.insert(0, Missing())
importlib.util.find_spec = hidden(importlib.util.find_spec, lambda name: None)  # what libraries probe with
importlib.metadata.version = hidden(importlib.metadata.version, not_found)
importlib.metadata.distribution = hidden(importlib.metadata.distribution, not_found)
from layerprune.cli import main
sys.argv = ["layerprune", *sys.argv[1:]]
main()
"""


def test_the_core_runs_without_the_extras_and_a_command_that_needs_one_names_it(checkpoint, tmp_path):
    def layerprune(*args):
        return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *map(str, args)], capture_output=True, text=True)

    done = layerprune("prune", checkpoint, "--out", tmp_path / "cut", "--n", 2, "--strategy", "deepest")
    assert done.returncode == 0 and (tmp_path / "cut" / "model.safetensors").is_file(), done.stderr
    analysis = layerprune("analyze", tmp_path / "cut", "--out", tmp_path / "analysis", "--samples", 4, "--seq-len", 16)
    assert analysis.returncode == 0 and (tmp_path / "analysis" / "distances.json").is_file(), analysis.stderr
    evaluated = layerprune("evaluate", tmp_path / "cut", "--tasks", "arc_easy", "--limit", 2)
    assert evaluated.returncode == 1 and evaluated.stderr == (
        "error: this needs lm_eval, which is not installed: pip install 'layerprune[eval]' (or layerprune[all])\n"
    ), "refused before any model loads"
    healed = layerprune("heal", tmp_path / "cut", "--out", tmp_path / "healed", "--no-quant", "--steps", 1)
    assert healed.returncode == 1 and healed.stderr.startswith("error: this needs peft") and "[heal]" in healed.stderr
    quantized = layerprune("export", tmp_path / "cut", "--quantize", "nf4", "--out", tmp_path / "q")
    assert quantized.returncode == 1 and "this needs bitsandbytes" in quantized.stderr, quantized.stderr
    assert not (tmp_path / "healed").exists() and not (tmp_path / "q").exists()


def test_options_take_underscores_and_values_stay_as_typed(tmp_path, monkeypatch):
    """`--allow_final` is `--allow-final`, as lm-eval users type options; a value that looks like an
    option (an output folder named `--a_`) is written where it says, not renamed."""
    model = save_tiny(tiny_model("llama", seed=1), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    result = run("prune", model, "--out", "--a_", "--layers", "1", "--allow_final")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "--a_" / "layerprune.json").is_file() and not (tmp_path / "--a-").exists()
