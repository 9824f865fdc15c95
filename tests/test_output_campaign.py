"""The hostile-user campaign, on outputs and links (hypothesis): every writer gets a destination of
a random kind, and prune and analyze get GGUF files with random bytes changed.

Invariants, for every example: exit 0 with a correct output, or exit 1 with one `error:` line; no
file outside the destination changed and nothing new outside it; nothing left behind (no scratch
folder, lock or journal); the inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import HEAL_TEXT, save_tiny, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_destinations import LEFTOVERS
from test_gguf import tiny_gguf
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.io.gguf_reading import RECORD_KEY, read_gguf

pytestmark = pytest.mark.slow  # several processes, kill campaigns or whole sweeps: not in make test-fast

CAMPAIGN = settings(  # CAMPAIGN_EXAMPLES: fewer examples for a quick look
    max_examples=int(os.environ.get("CAMPAIGN_EXAMPLES", 1000)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KINDS = ["absent", "foreign file", "foreign folder", "empty folder", "own output", "own output as input",
         "symlink to an input file", "symlink to an input folder", "hard link to an input file", "symlink loop",
         "dangling symlink", "fifo", "inside an input", "holds an input", "the current folder",
         "own output an input's file links into"]  # fmt: skip
# (command line, output name, check of a written output)
WRITERS = {
    "prune": (["prune", "ROOT/model", "--layers", "1"], "out"),
    "prune-gguf": (["prune", "ROOT/tiny.gguf", "--layers", "1"], "out.gguf"),
    "evaluate": (["evaluate", "ROOT/model", "--tasks", "loss", "--limit", "2", "--seq-len", "16", "--loss-data",
                  "ROOT/text.txt"], "results.json"),
    "analyze": (["analyze", "ROOT/model", "--data", "ROOT/text.txt", "--samples", "2", "--seq-len", "16"], "dist"),
}  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    save_tiny(tiny_model("llama", seed=1), root / "model")
    tiny_gguf(root / "tiny.gguf", blocks=4)
    (root / "text.txt").write_text(HEAL_TEXT)
    return root


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every file and link under `root` but `skip` (the destination), with a digest of its content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == skip or skip in path.parents:
                continue
            relative = str(path.relative_to(root))
            if path.is_symlink():
                found[relative] = "-> " + os.readlink(path)
            elif path.is_file():
                found[relative] = hashlib.sha1(path.read_bytes()).hexdigest()
            elif not path.is_dir():
                found[relative] = "special"
    return found


def written(writer: str, out: Path) -> bool:
    """Whether `out` holds a complete output of `writer` from this example's command."""
    try:
        if writer == "prune":
            return json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1]
        if writer == "prune-gguf":
            return json.loads(read_gguf(out).get_field(RECORD_KEY).contents())["removed_layers"] == [1]
        if writer == "evaluate":
            return json.loads(out.read_text())["tasks"]["loss"]["n"] == 2
        return json.loads((out / "distances.json").read_text())["num_layers"] == 6
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def make_destination(root: Path, writer: str, kind: str, stem: str, depth: int) -> tuple[Path, list[str]]:
    """The destination of this example, made as `kind`, named `stem` below `depth` folders that do
    not exist yet (for the kinds that make it); returns it and the command's arguments."""
    args, name = WRITERS[writer]
    args = list(args)
    folder = root / "work"
    if kind in ("absent", "own output", "own output as input"):
        folder = folder.joinpath(*[f"new{i}" for i in range(depth)])
    out = folder / (stem + Path(name).suffix)
    model_input = "tiny.gguf" if writer == "prune-gguf" else "model"
    if kind in ("own output", "own output as input", "own output an input's file links into"):
        made = CliRunner().invoke(app, [a.replace("ROOT", str(root)) for a in args] + ["--out", str(out)])
        assert made.exit_code == 0, made.output
        if kind == "own output as input":  # the output of an earlier run is this run's input, and its destination
            args[1] = str(out)
        elif kind == "own output an input's file links into":  # the input's shard now lives in the output
            shard, inside = root / "model" / "model.safetensors", (out if out.is_dir() else out.parent) / "shard"
            shutil.move(shard, inside)
            shard.symlink_to(inside)
    elif kind == "foreign file":
        out.write_text("the user's own notes")
    elif kind == "foreign folder":
        out.mkdir()
        (out / "thesis.tex").write_text("keep")
    elif kind == "empty folder":
        out.mkdir()
    elif kind == "symlink to an input file":
        out.symlink_to(root / ("tiny.gguf" if writer == "prune-gguf" else "model/model.safetensors"))
    elif kind == "symlink to an input folder":
        out.symlink_to(root / "model")
    elif kind == "hard link to an input file":
        os.link(root / ("tiny.gguf" if writer == "prune-gguf" else "model/config.json"), out)
    elif kind == "symlink loop":
        out.symlink_to(out)
    elif kind == "dangling symlink":
        out.symlink_to(root / "nowhere")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "inside an input":
        out = root / model_input / name if writer != "prune-gguf" else root / "model" / name
    elif kind == "holds an input":
        out = root
    elif kind == "the current folder":
        out = root / "work"
    return out, [a.replace("ROOT", str(root)) for a in args]


@CAMPAIGN
@given(
    writer=st.sampled_from(sorted(WRITERS)),
    kind=st.sampled_from(KINDS),
    overwrite=st.booleans(),
    stem=st.text(alphabet="aé_- .0", min_size=1, max_size=10).filter(lambda t: t.strip(". ") and "/" not in t),
    depth=st.integers(0, 2),
)
def test_every_writer_into_every_kind_of_destination(pristine, monkeypatch, writer, kind, overwrite, stem, depth):
    root = Path(tempfile.mkdtemp(dir=pristine.parent))
    try:
        for name in ("model", "tiny.gguf", "text.txt"):
            (shutil.copytree if name == "model" else shutil.copy2)(pristine / name, root / name)
        (root / "work").mkdir()
        monkeypatch.chdir(root / "work")
        out, args = make_destination(root, writer, kind, stem, depth)
        existed = out.exists() or out.is_symlink()
        before = snapshot(root, out)
        done = CliRunner().invoke(app, [*args, "--out", str(out)] + (["--overwrite"] if overwrite else []))
        if done.exit_code == 0:
            assert written(writer, out), (kind, done.output)
            replaceable = ["own output", "empty folder"]
            if Path(WRITERS[writer][1]).suffix:  # a file output: the input's file links beside it, not into it
                replaceable.append("own output an input's file links into")
            assert not existed or (overwrite and kind in replaceable), (kind, done.output)
        else:
            assert done.exit_code == 1, (kind, done.output)
            assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, (kind, done.stderr)
        assert snapshot(root, out) == before, f"{kind}: a file outside the destination changed"
        left = [p for p in root.rglob("*") if any(m in p.name for m in LEFTOVERS)]
        assert left == [], (kind, left)
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def gguf_source(pristine):
    return pristine / "tiny.gguf"


def corrupt(data: bytearray, draw, where: str) -> None:
    """Change the bytes of one region of a GGUF as a disk or a hand would."""
    header_end = 24
    info_end = data.find(b"output_norm.weight") + 40  # past the tensor-info table of the tiny GGUF
    spans = {"header": (0, header_end), "metadata": (header_end, data.find(b"blk.0.attn_q")),
             "tensor info": (data.find(b"token_embd.weight") - 8, info_end), "data": (info_end, len(data))}  # fmt: skip
    span = spans[where]
    how = draw(st.sampled_from(["flip", "byte", "truncate"]))
    if how == "truncate":
        del data[draw(st.integers(span[0], span[1] - 1)) :]
        return
    at = draw(st.integers(span[0], span[1] - 1))
    data[at] = data[at] ^ (1 << draw(st.integers(0, 7))) if how == "flip" else draw(st.integers(0, 255))


def damaged_bytes(reader, name: str) -> bytes:
    return next(t for t in reader.tensors if t.name == name).data.tobytes()


@CAMPAIGN
@given(where=st.sampled_from(["header", "metadata", "tensor info", "data"]), data=st.data())
def test_a_corrupted_gguf_is_pruned_correctly_or_refused(gguf_source, tmp_path_factory, where, data):
    from layerprune.io.gguf_reading import BLOCK

    root = tmp_path_factory.mktemp("corrupt")
    bytes_ = bytearray(gguf_source.read_bytes())
    corrupt(bytes_, data.draw, where)
    source = root / "bad.gguf"
    source.write_bytes(bytes(bytes_))
    done = CliRunner().invoke(app, ["prune", str(source), "--layers", "1", "--out", str(root / "out.gguf")])
    if done.exit_code == 0:
        # The damage was where no reader can see it: a metadata value, a tensor's bytes, or a type
        # that keeps the tensor's size. Names and shapes must be the pristine file's, minus the cut;
        # types and bytes the damaged source's own (the prune copies them as they are).
        pristine, damaged, pruned = (read_gguf(p) for p in (gguf_source, source, root / "out.gguf"))
        types = {t.name: int(t.tensor_type) for t in damaged.tensors}
        expected = {}
        for tensor in pristine.tensors:
            match = BLOCK.match(tensor.name)
            if match and int(match.group(1)) == 1:
                continue
            layer = int(match.group(1)) if match else None
            name = f"blk.{layer - (layer > 1)}.{match.group(2)}" if match else tensor.name
            expected[name] = (types[tensor.name], tuple(tensor.shape), bytes(damaged_bytes(damaged, tensor.name)))
        got = {t.name: (int(t.tensor_type), tuple(t.shape), bytes(t.data.tobytes())) for t in pruned.tensors}
        assert got == expected
    else:
        assert done.exit_code == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.output
        assert sorted(p.name for p in root.iterdir()) == ["bad.gguf"]
    shutil.rmtree(root)


@pytest.mark.parametrize("dimension", [0, 4])
def test_a_last_tensor_whose_shape_shrank_is_refused(gguf_source, tmp_path, dimension):
    """The campaign's find: the last tensor's dimension damaged from 8 to 0 (or 4) still lays every
    tensor end to end (its lost bytes past the end, or looking like padding); the final norm's width
    is not the model's."""
    data = bytearray(gguf_source.read_bytes())
    entry = data.find(b"output_norm.weight") + len(b"output_norm.weight")
    assert int.from_bytes(data[entry : entry + 4], "little") == 1  # one dimension, then its size
    assert int.from_bytes(data[entry + 4 : entry + 12], "little") == 8
    data[entry + 4 : entry + 12] = dimension.to_bytes(8, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    done = CliRunner().invoke(app, ["prune", str(tmp_path / "bad.gguf"), "--layers", "1", "--out",
                                    str(tmp_path / "out.gguf")])  # fmt: skip
    assert done.exit_code == 1 and done.stderr.count("\n") == 1, done.output
    assert "bytes past its last tensor's end" in done.stderr or "not the model's width 8" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
