"""Every writer killed at every publish step (SIGKILL through the `destinations` fault hook), and
every writer raced by a second one into the same destination.

After a kill, the destination must hold the old output or the new one, complete; a rerun must
succeed; then nothing may be left (no scratch folder, journal, lock or child process), and the input
must be unchanged. Writers run in forked children, so each kill costs no interpreter start.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import HEAL_TEXT, folder_digest, save_tiny, tiny_model
from test_gguf import tiny_gguf

import layerprune.io.destinations as destinations
from layerprune.errors import LayerpruneError, describe
from layerprune.io.checkpoint import read_record, validate_checkpoint
from layerprune.io.gguf_reading import RECORD_KEY, read_gguf

pytestmark = pytest.mark.slow  # several processes, kill campaigns or whole sweeps: not in make test-fast

LEFTOVERS = (".tmp.", ".writer", ".lock", ".publish", ".old.", ".convert.", ".heal-work")


def forked(work: Callable[[], object], fault_at: int | None = None, log: Path | None = None) -> tuple[int, str]:
    """Run `work` in a forked child: (exit code, error line); -9 when the fault hook killed it."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def child() -> None:
        destinations._steps = 0
        os.environ.pop("LAYERPRUNE_FAULT_AT", None)
        if fault_at is not None:
            os.environ["LAYERPRUNE_FAULT_AT"] = str(fault_at)
        if log is not None:
            os.environ["LAYERPRUNE_FAULT_LOG"] = str(log)
        try:
            work()
        except BaseException as err:  # noqa: BLE001 (the parent reads it as the CLI would print it)
            writer.send(describe(err)[0])
            os._exit(describe(err)[1])
        os._exit(0)

    process = context.Process(target=child)
    process.start()
    process.join(600)
    assert process.exitcode is not None, "the writer hung"
    return process.exitcode, reader.recv() if reader.poll() else ""


@dataclass
class Writer:
    """One kind of output: how to write its old and new versions into `out`, and how to tell which
    one a path holds (None: not a complete output of either)."""

    name: str
    out: str
    write: Callable[[Path, Path, str, bool], object]  # (root, out, "old" | "new", overwrite)
    identify: Callable[[Path], str | None]
    overwrites: bool = True


def _folder_version(out: Path, read: Callable[[dict], object], versions: dict[object, str]) -> str | None:
    try:
        validate_checkpoint(out)
        return versions.get(read(read_record(out) or {}))
    except (LayerpruneError, OSError, KeyError, TypeError):
        return None


def _gguf_version(out: Path, read: Callable[[dict], object], versions: dict[object, str]) -> str | None:
    try:
        field = read_gguf(out).get_field(RECORD_KEY)
        return versions.get(read(json.loads(field.contents())))
    except (LayerpruneError, OSError, KeyError, TypeError, AttributeError, ValueError):
        return None


def _prune(root: Path, out: Path, version: str, overwrite: bool) -> object:
    from layerprune import prune

    return prune(root / "model", out, layers=[1] if version == "old" else [2], overwrite=overwrite)


def _prune_gguf(root: Path, out: Path, version: str, overwrite: bool) -> object:
    from layerprune import prune

    return prune(root / "tiny.gguf", out, layers=[0] if version == "old" else [1], overwrite=overwrite)


def _heal(root: Path, out: Path, version: str, overwrite: bool) -> object:
    from layerprune.healing.lora import HealConfig, heal

    config = HealConfig(steps=1 if version == "old" else 2, batch_size=2, grad_accum=1, seq_len=32,
                        data=str(root / "heal.txt"), quant=False)  # fmt: skip
    return heal(root / "model", out, config, overwrite=overwrite)


def _export_bits(root: Path, out: Path, version: str, overwrite: bool) -> object:
    from layerprune.recipes.export import export_quantized

    return export_quantized(root / "model", out, "int8" if version == "old" else "nf4", overwrite=overwrite)


def _export_gguf(root: Path, out: Path, version: str, overwrite: bool) -> object:
    from layerprune.recipes.export import export_gguf

    return export_gguf(root / "bpe-model", out, "f32" if version == "old" else "f16", overwrite=overwrite)


def bpe_model(folder: Path) -> None:
    """A tiny Llama with SmolLM2's tokenizer (read from its packaged GGUF), which llama.cpp's
    converter knows, unlike the tiny byte-level one."""
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.runtime.models import BUILTIN_MODELS

    gguf = BUILTIN_MODELS["smollm2-135m"].locate()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = tiny_config("llama")
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tokenizer), 1, 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _evaluate(root: Path, out: Path, version: str, overwrite: bool) -> object:
    from layerprune.evaluation.harness import evaluate

    limit = 2 if version == "old" else 3
    return evaluate(root / "model", tasks=["loss"], limit=limit, loss_data=str(root / "heal.txt"), seq_len=32,
                    out=out, overwrite=overwrite)  # fmt: skip


def _results_version(out: Path) -> str | None:
    try:
        return {2: "old", 3: "new"}.get(json.loads(out.read_text())["settings"]["limit"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


WRITERS = [
    Writer("prune", "out", _prune,
           lambda out: _folder_version(out, lambda r: tuple(r["removed_layers"]), {(1,): "old", (2,): "new"})),
    Writer("prune-gguf", "out.gguf", _prune_gguf,
           lambda out: _gguf_version(out, lambda r: tuple(r["removed_layers"]), {(0,): "old", (1,): "new"})),
    Writer("heal", "healed", _heal,
           lambda out: _folder_version(out, lambda r: r["healing"]["config"]["steps"], {1: "old", 2: "new"})),
    Writer("export-bits", "bits", _export_bits,
           lambda out: _folder_version(out, lambda r: r["quantization"]["scheme"], {"int8": "old", "nf4": "new"})),
    Writer("export-gguf", "model.gguf", _export_gguf,
           lambda out: _gguf_version(out, lambda r: r["gguf_export"]["outtype"], {"f32": "old", "f16": "new"})),
    Writer("evaluate", "results.json", _evaluate, _results_version),
]  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    save_tiny(tiny_model("llama", seed=1), root / "model", shard_size="60KB")
    tiny_gguf(root / "tiny.gguf", blocks=4)
    (root / "heal.txt").write_text(HEAL_TEXT)
    return root


def fresh(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(pristine, root)
    return root


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if any(m in p.name for m in LEFTOVERS))


def converter_children(root: Path) -> list[str]:
    """Processes still running llama.cpp's converter on a file under `root`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "convert_hf_to_gguf" in command and str(root) in command:
            found.append(command)
    return found


def inputs_digest(root: Path) -> tuple[str, bytes, bytes]:
    return folder_digest(root / "model"), (root / "tiny.gguf").read_bytes(), (root / "heal.txt").read_bytes()


def needs(writer: Writer, root: Path) -> None:
    """Skip the GGUF export where llama.cpp's converter is not installed; else make its model."""
    if writer.name == "export-gguf":
        from layerprune.recipes.export import converter_dir

        try:
            converter_dir()
        except LayerpruneError as err:
            pytest.skip(str(err))
        if not (root / "bpe-model").is_dir():
            bpe_model(root / "bpe-model")


@pytest.mark.parametrize("mode", ["new", "overwrite", "overwrite-journal"])
@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_a_kill_at_every_publish_step_loses_nothing(pristine, tmp_path, writer, mode, monkeypatch):
    """`overwrite-journal`: on a file system that cannot swap two folders in one step."""
    needs(writer, pristine)
    if mode == "overwrite-journal":
        if writer.out.endswith((".gguf", ".json")):
            pytest.skip("a file is replaced by one rename")
        if writer.name != "prune":
            pytest.skip("every folder is published by the same steps: killed at each of them with prune")
        monkeypatch.setattr(destinations, "_exchange", lambda first, second: False)  # forked children inherit it
    root = fresh(pristine, tmp_path)
    out = root / writer.out
    before = inputs_digest(root)
    overwrite = mode != "new"

    old = tmp_path / "old"
    if overwrite:  # written once, copied back before each kill
        assert forked(lambda: writer.write(root, out, "old", False))[0] == 0
        shutil.copytree(out, old) if out.is_dir() else shutil.copy2(out, old)

    def prepare() -> None:
        for path in root.iterdir():
            if path.name not in ("model", "bpe-model", "tiny.gguf", "heal.txt"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if overwrite:
            shutil.copytree(old, out) if old.is_dir() else shutil.copy2(old, out)
            assert writer.identify(out) == "old"

    prepare()
    log = tmp_path / "steps.log"
    code, error = forked(lambda: writer.write(root, out, "new", overwrite), log=log)
    assert code == 0, error
    steps = log.read_text().splitlines()
    assert writer.identify(out) == "new" and len(steps) >= 2, steps
    print(f"{writer.name} {mode}: killed at each of {len(steps)} steps: {', '.join(steps)}")
    for at in range(1, len(steps) + 1):
        prepare()
        code, error = forked(lambda: writer.write(root, out, "new", overwrite), fault_at=at)
        assert code == -signal.SIGKILL, (at, steps[at - 1], code, error)
        held = writer.identify(out) if out.exists() else "absent"
        allowed = {"old", "new"} if overwrite else {"absent", "new"}
        if held == "absent" and overwrite:  # between the journal's two renames: what any later run finishes
            assert (root / f".{out.name}.publish").is_file(), f"killed at step {at}: no output and no journal"
            destinations.recover(root)
            held = writer.identify(out) if out.exists() else "absent"
        assert held in allowed, f"killed at step {at} ({steps[at - 1]}): the destination holds {held}"
        for _ in range(50):  # a child process dies with its parent, within moments
            if not converter_children(root):
                break
            time.sleep(0.1)
        assert not converter_children(root), f"killed at step {at}: the converter outlived its parent"
        code, error = forked(lambda: writer.write(root, out, "new", True))
        assert code == 0, (at, steps[at - 1], error)
        assert writer.identify(out) == "new"
        assert leftovers(root) == [], f"killed at step {at} ({steps[at - 1]}), then rerun: {leftovers(root)}"
        assert inputs_digest(root) == before


def test_a_sweep_killed_at_every_step_resumes_to_the_same_results(setup, tmp_path):
    from conftest import sweep_config

    from layerprune.sweep.run import run_sweep

    base, text = setup
    config = sweep_config(text, ns=(0, 1), strategies=("deepest",), heal=False, tasks=("loss",), limit=3,
                          sensitivity=False)  # fmt: skip
    before = folder_digest(base)
    reference, log = tmp_path / "reference", tmp_path / "steps.log"
    assert forked(lambda: run_sweep(base, reference, config, progress=False), log=log)[0] == 0
    steps = log.read_text().splitlines()
    print(f"sweep: killed at each of {len(steps)} steps")

    def results(folder: Path) -> list[dict]:
        rows = json.loads((folder / "results.json").read_text())
        kept = ("strategy", "n", "healed", "layers_removed", "tasks")  # not the timings
        return [{k: row[k] for k in kept} for row in rows]

    for at in range(1, len(steps) + 1):
        out = tmp_path / f"killed-{at}"
        code, _ = forked(lambda: run_sweep(base, out, config, progress=False), fault_at=at)  # noqa: B023
        assert code == -signal.SIGKILL, (at, steps[at - 1])
        code, error = forked(lambda: run_sweep(base, out, config, progress=False))  # noqa: B023
        assert code == 0, (at, error)
        assert results(out) == results(reference), f"killed at step {at} ({steps[at - 1]})"
        assert leftovers(tmp_path) == [] and folder_digest(base) == before
        shutil.rmtree(out)


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_two_writers_into_one_destination_give_one_result(pristine, tmp_path, writer):
    """The first holds the destination from before its first byte of work; the second is refused
    with the lock's message, and nothing of it is left."""
    needs(writer, pristine)
    root = fresh(pristine, tmp_path)
    out = root / writer.out
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    real_hold = destinations.hold

    def slow_first() -> None:  # holds the lock, then waits for the second writer to be refused
        from contextlib import contextmanager

        @contextmanager
        def hold_and_wait(path: Path):
            with real_hold(path):
                started.set()
                release.wait(120)
                yield

        destinations.hold = hold_and_wait
        writer.write(root, out, "old", False)

    first = context.Process(target=lambda: (slow_first(), os._exit(0)))
    first.start()
    assert started.wait(120)
    code, error = forked(lambda: writer.write(root, out, "new", False))
    release.set()
    first.join(600)
    assert first.exitcode == 0
    assert code == 1 and error.startswith("another layerprune (pid ") and "is writing" in error, error
    assert writer.identify(out) == "old" and leftovers(root) == []


def test_a_lock_left_by_a_killed_holder_is_reclaimed(tmp_path):
    out = tmp_path / "out"

    def die_holding() -> None:
        held = destinations.hold(out)
        held.__enter__()
        os.kill(os.getpid(), signal.SIGKILL)

    code, _ = forked(die_holding)
    assert code == -signal.SIGKILL and (tmp_path / ".out.lock").exists()
    with destinations.hold(out):
        pass
    assert list(tmp_path.iterdir()) == []


if sys.platform != "linux":  # the fault hook and /proc are Linux's
    pytestmark = [pytest.mark.slow, pytest.mark.skip("Linux only")]
