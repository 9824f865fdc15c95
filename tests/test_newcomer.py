"""What a newcomer gets: the core installed alone in a fresh virtual environment cuts models, and the
README's quick start runs exactly as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import venv
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("lm_eval", "peft", "bitsandbytes", "datasets")  # what the core must not bring


def _closure(name: str) -> set[str]:
    """The installed distributions `name` needs (its requirements, for this Python, recursively)."""
    found, todo = set(), [name]
    while todo:
        try:
            dist = distribution(todo.pop())
        except PackageNotFoundError:  # a requirement for another platform, not installed here
            continue
        if dist.metadata["Name"].lower() in found:
            continue
        found.add(dist.metadata["Name"].lower())
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _link_torch(site: Path, links: Path) -> None:
    """Make this environment's torch (installed first, as the README says) visible to the new one
    through a .pth file, so that pip resolves the rest but does not copy 1 GB again."""
    links.mkdir()
    for name in _closure("torch"):
        files = distribution(name).files or []
        for top in {Path(str(f)).parts[0] for f in files if not str(f).startswith("..")}:
            source = Path(distribution(name).locate_file(top))
            if source.exists() and not (links / top).exists():
                (links / top).symlink_to(source)
    (site / "torch-from-parent.pth").write_text(f"{links}\n")


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Path:
    """A fresh virtual environment holding layerprune's core alone (from a copy of this checkout)."""
    root = tmp_path_factory.mktemp("newcomer")
    source = root / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    _link_torch(site, root / "torch-links")
    install = [python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", source]
    done = subprocess.run(install, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return env_dir / "bin"


def _run(bin_dir: Path, cwd: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIRTUAL_ENV": str(bin_dir.parent)}
    command = [bin_dir / "layerprune", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.real
@pytest.mark.slow
def test_the_core_alone_analyzes_and_cuts_and_names_the_extra_each_other_command_needs(core, smollm2, tmp_path):
    from layerprune.runtime.models import gguf_file

    listed = subprocess.run([core / "python", "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    installed = {line.split("==")[0].lower().replace("-", "_") for line in listed.stdout.split()}
    assert "layerprune" in installed and not installed & set(EXTRAS_ONLY)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"The miller's {i}th sack of grain went down to the river market." for i in range(8)))
    steps = [
        ("analyze", smollm2, "--data", text, "--samples", 4, "--seq-len", 32, "--out", "analysis"),
        ("prune", smollm2, "--strategy", "deepest", "--n", 2, "--out", "deepest"),
        ("prune", smollm2, "--layers", "3,4", "--out", "layers"),
        ("prune", gguf_file("smollm2-135m"), "--layers", "3,4", "--out", "cut.gguf"),
        ("evaluate", "layers", "--tasks", "loss", "--loss-data", text, "--limit", 2),  # loss needs no extra
    ]
    for step in steps:
        done = _run(core, tmp_path, *step)
        assert done.returncode == 0, (step, done.stderr[-2000:])
    assert (tmp_path / "analysis" / "distances.json").is_file() and (tmp_path / "cut.gguf").is_file()
    needing = [
        (("evaluate", "layers", "--tasks", "arc_easy", "--limit", 2), "eval"),
        (("heal", "layers", "--out", "healed", "--data", text, "--steps", 1), "heal"),
        (("export", "layers", "--quantize", "nf4", "--out", "nf4"), "heal"),
    ]
    for args, extra in needing:
        done = _run(core, tmp_path, *args)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, (args, done.stderr[-2000:])
        assert f"pip install 'layerprune[{extra}]'" in done.stderr, done.stderr
    assert not (tmp_path / "healed").exists() and not (tmp_path / "nf4").exists()


def _quick_start() -> tuple[list[tuple[str, list[str]]], str]:
    """The README's quick start: its console commands with the output shown for each, and its Python."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    console = re.search(r"```console\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    steps: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps, python


NUMBER = r"(-?\d+(?:\.\d+)?)"


def _matches(shown: str, printed: str) -> bool:
    """Whether a printed line is the line the README shows: the same words, `...` standing for
    anything, and every number within 2% (the last digits move with the CPU's arithmetic)."""
    parts = re.split(rf"(\.\.\.|{NUMBER[1:-1]}|\s+)", shown.strip())
    pattern, numbers = "", []
    for part in filter(None, parts):
        if part == "...":
            pattern += ".*"
        elif re.fullmatch(NUMBER, part):
            pattern, numbers = pattern + NUMBER, [*numbers, float(part)]
        else:
            pattern += r"\s+" if part.isspace() else re.escape(part)
    found = re.fullmatch(pattern, printed.strip())
    return bool(found) and all(
        abs(float(got) - want) <= 0.02 * abs(want) + 1e-9 for got, want in zip(found.groups(), numbers, strict=True)
    )


@pytest.mark.real
@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(smollm2, tmp_path):
    steps, python = _quick_start()
    assert [command.split()[:2] for command, _ in steps] == [
        ["layerprune", "analyze"],
        ["layerprune", "prune"],
        ["layerprune", "evaluate"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command, shown in steps:
        args = shlex.split(command)[1:]
        done = subprocess.run([sys.executable, "-m", "layerprune", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])
        printed = done.stdout.splitlines()
        for line in (line for line in shown if line.strip() != "..."):  # in order, each matched once
            index = next((i for i, out in enumerate(printed) if _matches(line, out)), None)
            assert index is not None, (command, line, done.stdout)
            printed = printed[index + 1 :]
    (tmp_path / "api").mkdir()
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path / "api", env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "api" / "runs" / "smollm2-n8" / "layerprune.json").is_file()


def test_the_quick_start_matcher_reads_numbers_within_two_percent():
    assert _matches("8     11..18      0.1686", "8     11..18      0.1690")
    assert not _matches("8     11..18      0.1686", "8     11..18      0.1800")
    assert not _matches("removed 8 of 30 layers (angular): [11, 12]", "removed 8 of 30 layers (angular): [11, 13]")
    assert _matches("kld  20 KL 2.2 (against ...)", "kld 20 KL 2.21 (against /some/where)")
