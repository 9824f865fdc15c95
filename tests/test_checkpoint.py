"""Checkpoints on disk: headers validated before use, outputs that never clobber an input, and
staged writes that leave nothing behind: locked, reclaimed after a kill, clear on a full disk."""

import json
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import folder_digest, save_tiny, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.io.checkpoint import INDEX_NAME, read_header, shard_files, validate_checkpoint, write_weights
from layerprune.io.destinations import WRITER_SUFFIX, check_destination, staged


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


GOOD = {
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
}


def test_a_valid_header_is_read_with_absolute_offsets(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({**GOOD, "__metadata__": {"format": "pt"}}, bytes(22)))
    entries, metadata = read_header(path)
    start = 8 + len(json.dumps({**GOOD, "__metadata__": {"format": "pt"}}))
    assert metadata == {"format": "pt"} and entries["b"].start == start + 16 and entries["b"].length == 6


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"a": {"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}}, "unknown dtype 'Q4'"),
        ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, "does not fill its 16 bytes"),
        ({"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}, "does not fill its 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]}}, "not contiguous"),
        ({"a": {"dtype": "F32", "shape": [2, 2]}}, "needs exactly dtype, shape and data_offsets"),
        ({"b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}, "data ends at byte"),
    ],
)
def test_headers_that_disagree_with_their_bytes_are_refused(tmp_path, change, fragment):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({**GOOD, **change}, bytes(22)))
    with pytest.raises(LayerpruneError, match=fragment) as err:
        read_header(path)
    assert str(err.value).startswith(f"corrupted safetensors file {path}")


def test_an_index_that_points_outside_the_folder_is_refused(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src", shard_size="60KB")
    index = src / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    key = next(iter(raw["weight_map"]))
    (tmp_path / "elsewhere.safetensors").write_bytes((src / raw["weight_map"][key]).read_bytes())
    raw["weight_map"][key] = "../elsewhere.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(LayerpruneError, match="names a shard outside the checkpoint folder: '../elsewhere"):
        shard_files(src)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool]
SHAPES = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), SHAPES, st.booleans()), min_size=1, max_size=8),
       st.integers(1, 3), st.integers(0, 2**16))  # fmt: skip
def test_the_one_writer_writes_what_safetensors_reads_back(tmp_path_factory, specs, count, seed):
    """Tensors of any dtype and shape (0-d and empty included), from memory or copied as bytes from
    another file, in 1-3 shards: safetensors reads back each one equal, under Hugging Face's shard
    names, with the index (only) when there are several."""
    folder = tmp_path_factory.mktemp("written")
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": (torch.randint(0, 2, shape, generator=generator) if dtype == torch.bool else
                         torch.randn(shape, generator=generator) * 100).to(dtype)
               for i, (dtype, shape, _) in enumerate(specs)}  # fmt: skip
    save_file(tensors, folder / "source.safetensors")
    entries, _ = read_header(folder / "source.safetensors")
    from_files = [from_file for _, _, from_file in specs]
    sources = [(name, entries[name] if file else tensors[name]) for name, file in zip(tensors, from_files, strict=True)]
    shards = [sources[i::count] for i in range(count)]
    out = folder / "out"
    out.mkdir()
    total = write_weights(out, iter(shards), count, {"format": "pt"})
    read = {k: v for shard in shard_files(out) for k, v in load_file(shard).items()}
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert all(read[k].dtype == tensors[k].dtype and read[k].shape == tensors[k].shape for k in tensors)
    assert total == sum(t.numel() * t.element_size() for t in tensors.values())
    if count == 1:
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    else:
        index = json.loads((out / INDEX_NAME).read_text())
        assert index["metadata"]["total_size"] == total
        names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        assert sorted(p.name for p in out.glob("*.safetensors")) == names
        assert index["weight_map"] == {name: names[i % count] for i, (name, _) in enumerate(sources)}


def test_the_writer_refuses_fewer_shards_than_announced(tmp_path):
    with pytest.raises(RuntimeError, match="1 shards written where 2 were announced"):
        write_weights(tmp_path, iter([[("a", torch.zeros(2))]]), 2, {})


def test_a_config_that_miscounts_the_layers_is_refused(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    with pytest.raises(LayerpruneError, match="config.json counts 7 layers but the weights hold 6 layers"):
        validate_checkpoint(src)
    result = CliRunner().invoke(app, ["analyze", str(src), "--out", str(tmp_path / "an"), "--samples", "2"])
    assert result.exit_code == 1 and "counts 7 layers" in result.stderr and not (tmp_path / "an").exists()
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**12}))  # checked, not expanded
    for offload in ("--offload", "--no-offload"):
        args = ["analyze", str(src), "--out", str(tmp_path / "an"), "--samples", "2", offload]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "counts 1000000000000 layers" in result.stderr


def test_a_layer_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LayerpruneError, match="layer 3 has no tensor mlp.up_proj.weight"):
        validate_checkpoint(src)


# --- destinations ---------------------------------------------------------------------------


def fake_gguf(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("the user's own file")
    gguf = folder / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    return gguf


@pytest.mark.parametrize("form", ["absolute", "relative", "symlink"])
def test_the_folder_holding_an_input_gguf_is_never_replaced(tmp_path, monkeypatch, form):
    gguf = fake_gguf(tmp_path / "some")
    before = folder_digest(tmp_path / "some")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "some")
    out = {"absolute": str(tmp_path / "some"), "relative": "some", "symlink": "link"}[form]
    for args in (["--out", out], ["--out", f"{out}/model.gguf"]):
        result = CliRunner().invoke(app, ["prune", str(gguf), *args, "--layers", "3", "--overwrite"])
        assert result.exit_code == 1 and result.stderr.startswith("error: output "), result.output
        assert "input model" in result.stderr and "Traceback" not in result.output
    assert folder_digest(tmp_path / "some") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "some"]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("file.txt", "exists and is not a folder"),
        ("mine", "holds files that layerprune did not write"),
        (".", "is the current folder or holds it"),
        ("..", "is the current folder or holds it"),
    ],
)
def test_overwrite_replaces_only_what_layerprune_wrote(tmp_path, monkeypatch, name, fragment):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    work = tmp_path / "work" / "here"
    (work / "mine").mkdir(parents=True)
    (work / "file.txt").write_text("keep")
    (work / "mine" / "thesis.tex").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(LayerpruneError, match=fragment):
        check_destination(Path(name), [src], overwrite=True)


def test_a_second_writer_is_told_who_holds_the_destination(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    code = textwrap.dedent(f"""
        import pathlib, time
        from layerprune.io.destinations import hold
        with hold(pathlib.Path({str(tmp_path / "out")!r})):
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["prune", str(src), "--out", str(tmp_path / "out"), "--layers", "2"])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    assert f"another layerprune (pid {holder.pid}) is writing {tmp_path / 'out'}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "src"]  # the killed holder's
    rerun = CliRunner().invoke(app, ["prune", str(src), "--out", str(tmp_path / "out"), "--layers", "2"])
    assert rerun.exit_code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_concurrent_prunes_into_one_new_folder_give_one_result(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src", shard_size="60KB")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "layerprune", "prune", str(src), "--out", str(out)]
    runs = [
        subprocess.Popen([*command, "--layers", layers], stderr=subprocess.PIPE, text=True) for layers in ("1", "2")
    ]
    results = [(run.wait(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code)
    assert "is writing" in loser or "already exists" in loser, loser
    winner = json.loads((out / "layerprune.json").read_text())["removed_layers"]
    assert winner in ([1], [2]) and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_prune_killed_mid_write_is_reclaimed_by_the_next_run(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src", shard_size="60KB")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import layerprune.io.checkpoint as checkpoint
        real = checkpoint.write_shard
        def write_then_die(path, tensors, metadata):
            real(path, tensors, metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would
        checkpoint.write_shard = write_then_die
        from layerprune.cli import main
        import sys
        sys.argv = ["layerprune", "prune", {str(src)!r}, "--out", {str(out)!r}, "--layers", "1"]
        main()
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert any(name.startswith(".out.tmp.") and name.endswith(".writer") for name in left), left
    rerun = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "--layers", "1"])
    assert rerun.exit_code == 0, rerun.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_failed_write_removes_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError), staged(tmp_path / "a" / "b" / "out") as tmp:
        assert tmp.with_name(tmp.name + WRITER_SUFFIX).is_file()
        raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == []


def test_a_destination_below_a_file_is_refused_in_one_line(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    (tmp_path / "plain").write_text("a file")
    result = CliRunner().invoke(app, ["prune", str(src), "--out", str(tmp_path / "plain" / "out"), "--layers", "1"])
    assert result.exit_code == 1 and "is a file, not a folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "src"]


# --- full and read-only file systems (real ones: a small tmpfs) -----------------------------


@pytest.fixture
def mounted(tmp_path):
    """Mount a small tmpfs with the given options; skipped where this machine cannot mount one."""
    mounts = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def test_not_enough_space_is_said_before_writing(tmp_path, mounted):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    small = mounted("size=256k")
    result = CliRunner().invoke(app, ["prune", str(src), "--out", str(small / "out"), "--layers", "1"])
    assert result.exit_code == 1 and "not enough space for" in result.stderr and "MB is free there" in result.stderr
    assert list(small.iterdir()) == []


def test_a_disk_that_fills_up_mid_write_leaves_nothing(tmp_path, mounted, monkeypatch):
    import layerprune.io.destinations as destinations

    src = save_tiny(tiny_model("llama"), tmp_path / "src", shard_size="60KB")
    small = mounted("size=256k")
    monkeypatch.setattr(destinations, "_free_bytes", lambda folder: 2**40)  # as if space ran out after the check
    before = folder_digest(src)
    result = CliRunner().invoke(app, ["prune", str(src), "--out", str(small / "deep" / "out"), "--layers", "1"])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: disk full writing {small / 'deep' / 'out'}: it needs about")
    assert list(small.iterdir()) == [] and folder_digest(src) == before


def test_a_read_only_destination_is_one_line(tmp_path, mounted):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    readonly = mounted("ro,size=1m")
    result = CliRunner().invoke(app, ["prune", str(src), "--out", str(readonly / "out"), "--layers", "1"])
    assert result.exit_code == 1 and "read-only file system" in result.stderr and "Traceback" not in result.output
