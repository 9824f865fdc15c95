"""The cache of converted models: listed with sizes, cleared by name or whole, never mid-write."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.runtime.models import cache_entries, clear_cache

HOLDER = """
import sys, time
from pathlib import Path
from layerprune.io.destinations import hold
with hold(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
    (tmp_path / "converted" / "model-a").mkdir(parents=True)
    (tmp_path / "converted" / "model-a" / "model.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "converted" / "model-a" / "config.json").write_text("{}")
    (tmp_path / "converted" / ".model-b.tmp.123").mkdir()  # a conversion in progress
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.gguf").write_bytes(b"g" * 1000)
    return tmp_path


def test_the_cache_lists_complete_entries_with_their_sizes(cache):
    assert [(e.name, e.size) for e in cache_entries()] == [("converted/model-a", 3002), ("gguf/model.gguf", 1000)]
    shown = CliRunner().invoke(app, ["cache"])
    assert shown.exit_code == 0 and "converted/model-a" in shown.stdout and "in all, in " in shown.stdout


def test_clearing_removes_what_is_named_or_everything_and_refuses_what_is_being_written(cache):
    with pytest.raises(LayerpruneError, match="no cache entry 'nope'"):
        clear_cache(["nope"])
    assert [e.name for e in clear_cache(["model.gguf"])] == ["gguf/model.gguf"]
    assert not (cache / "gguf" / "model.gguf").exists() and (cache / "converted" / "model-a").is_dir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache / "converted" / "model-a")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LayerpruneError, match="another layerprune .* is writing"):
            clear_cache()
    finally:
        holder.kill()
        holder.wait()
    done = CliRunner().invoke(app, ["cache", "--clear"])
    assert done.exit_code == 0 and "removed 1 entries" in done.stdout
    assert cache_entries() == [] and (cache / "converted" / ".model-b.tmp.123").is_dir(), "a live conversion stays"
