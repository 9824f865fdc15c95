"""Several processes on the CPU (gloo), launched by torchrun as users launch them on GPUs:
healing and prune --heal give one checkpoint, equal to a single process's; a killed rank resumes."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # several processes, kill campaigns or whole sweeps: not in make test-fast

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# LoRA dropout off: its random masks are the one thing two processes cannot share with one
HEAL = ["--no-quant", "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--dropout", "0", "--lr", "5e-3"]
TOLERANCE = 1e-6  # two processes against one: measured equal to the bit on the CPU


def run(command, cwd, **env):
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env}
    )
    return done


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same_weights(first, second):
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOLERANCE


@pytest.fixture
def workdir(tmp_path, base, text):
    shutil.copy(text, tmp_path / "text.txt")
    return tmp_path


def test_torchrun_heal_writes_one_checkpoint_equal_to_one_process_with_twice_the_accumulation(workdir):
    two = run([*TORCHRUN, "-m", "layerprune", "heal", "base", "--out", "two", *HEAL, "--data", "text.txt",
               "--grad-accum", "1"], workdir)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote two") == 1, "one process reports"
    one = run([sys.executable, "-m", "layerprune", "heal", "base", "--out", "one", *HEAL, "--data", "text.txt",
               "--grad-accum", "2"], workdir)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(workdir / "two", workdir / "one")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights(workdir / "two")[key], weights(workdir / "base")[key]), "healing changed it"
    assert sorted(p.name for p in workdir.iterdir()) == ["base", "heal.txt", "one", "text.txt", "two"]


def test_torchrun_prune_and_heal_prunes_once(workdir):
    # --count, not --n: torchrun's own parser takes --n for an abbreviation of its options
    heal = [f"--heal-{a[2:]}" if a.startswith("--") else a for a in HEAL]
    prune = ["prune", "base", "--count", "2", "--strategy", "deepest", "--heal", *heal, "--heal-data", "text.txt"]
    two = run([*TORCHRUN, "-m", "layerprune", *prune, "--out", "two", "--heal-grad-accum", "1"], workdir)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("removed 2 of 6 layers (deepest): [3, 4]") == 1
    one = run([sys.executable, "-m", "layerprune", *prune, "--out", "one", "--heal-grad-accum", "2"], workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(workdir / "two", workdir / "one")
    assert sorted(p.name for p in workdir.iterdir()) == ["base", "heal.txt", "one", "text.txt", "two"]


def test_a_rank_killed_mid_run_is_resumed_by_the_same_command(workdir):
    killer = workdir / "kill_rank_1.py"
    killer.write_text(
        textwrap.dedent("""
        import os, signal, sys
        import layerprune.healing.lora as healing
        real = healing._progress_callback
        def progress(*args):
            callback = real(*args)
            def on_step_end(args, state, control, **kwargs):
                if state.global_step == 3 and os.environ["RANK"] == "1":
                    os.kill(os.getpid(), signal.SIGKILL)  # as a lost node: no handler runs
            callback.on_step_end = on_step_end
            return callback
        healing._progress_callback = progress
        from layerprune.cli import main
        sys.argv = ["layerprune", *sys.argv[1:]]
        main()
    """)
    )
    args = ["heal", "base", "--out", "resumed", *HEAL, "--data", "text.txt", "--grad-accum", "1", "--save-every", "2"]
    killed = run([*TORCHRUN, str(killer), *args], workdir)
    assert killed.returncode != 0 and not (workdir / "resumed").exists()
    assert (workdir / ".resumed.heal-work" / "checkpoints" / "checkpoint-2").is_dir()
    again = run([*TORCHRUN, "-m", "layerprune", *args], workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    straight = run([*TORCHRUN, "-m", "layerprune", *[a if a != "resumed" else "straight" for a in args]], workdir)
    assert straight.returncode == 0
    assert_same_weights(workdir / "resumed", workdir / "straight")
    assert not (workdir / ".resumed.heal-work").exists()


def test_torchrun_evaluate_gives_the_single_process_results(workdir):
    import json

    tasks = ["--tasks", "arc_easy,loss", "--limit", "12", "--batch-size", "4"]
    two = run([*TORCHRUN, "-m", "layerprune", "evaluate", "base", *tasks, "--out", "two.json"], workdir)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("arc_easy") == 1, "one process reports"
    assert "24/24" in two.stderr and "48/48" not in two.stderr, "each process scores half of the 48 requests"
    one = run([sys.executable, "-m", "layerprune", "evaluate", "base", *tasks, "--out", "one.json"], workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    split, whole = (json.loads((workdir / f"{name}.json").read_text()) for name in ("two", "one"))
    assert split["placement"]["processes"] == 2 and whole["placement"]["processes"] == 1
    assert split["tasks"]["arc_easy"]["acc"] == whole["tasks"]["arc_easy"]["acc"]
    assert split["tasks"]["arc_easy"]["n"] == whole["tasks"]["arc_easy"]["n"] == 12
    assert split["tasks"]["loss"] == whole["tasks"]["loss"]  # the same batches, each on one process: to the bit


def test_the_readme_commands_run_as_written_with_two_processes(workdir):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    block = readme.split("**Several GPUs or machines.**")[1].split("```bash\n")[1].split("```")[0]
    commands = [line.split() for line in block.splitlines() if line.startswith("torchrun")]
    assert len(commands) == 4
    for command in commands:
        assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node", "8"]
        done = run([*TORCHRUN, *command[4:]], workdir)
        errors = [line for line in done.stderr.splitlines() if "terminate" in line or "rror" in line]
        assert done.returncode == 0, (command[5:8], errors[:10], done.stderr[-1500:])
    for written in ("healed", "pruned-healed", "results.json", "sweep/report.html"):
        assert (workdir / written).exists(), written
