"""Fault injection: corrupted checkpoints and hostile arguments, generated at random (hypothesis).

For every corrupted input the command must exit 1 with one `error: ...` line on stderr and no
traceback, leave no new file anywhere under the example's root, and leave the input's bytes as
they were. For random arguments, an independent oracle says whether each is valid: valid ones
must succeed and remove exactly the oracle's layers, invalid ones must fail as above.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from conftest import folder_digest, save_tiny, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.io.checkpoint import DTYPE_SIZES

LAYERS = 6
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DOCS = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(8))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny Llama checkpoint in three shards, and calibration text."""
    root = tmp_path_factory.mktemp("pristine")
    model = save_tiny(tiny_model("llama"), root / "model", shard_size="400KB")
    assert len(list(model.glob("*.safetensors"))) >= 3
    (root / "docs.txt").write_text(DOCS)
    return root


def fresh_root(pristine: Path) -> Path:
    """A new folder holding a copy of the pristine checkpoint (one per example)."""
    root = Path(tempfile.mkdtemp(dir=pristine.parent))
    shutil.copytree(pristine / "model", root / "model")
    shutil.copy(pristine / "docs.txt", root / "docs.txt")
    return root


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(root: Path, *args: str):
    return CliRunner().invoke(app, [a.replace("ROOT", str(root)) for a in args])


def assert_refused(root: Path, result, before_files: set[str], before_digest: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert everything_under(root) == before_files, "nothing new may be left behind"
    assert folder_digest(root / "model") == before_digest, "the input must be unchanged"


# --- corrupted checkpoints ------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_safetensors(path: Path, header: dict, body: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def corrupt_tensor(draw, header: dict) -> None:
    """Change one tensor's dtype, shape or offsets so that the header no longer fits its bytes."""
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    info = header[key]
    size = DTYPE_SIZES[info["dtype"]]
    count = 1
    for d in info["shape"]:
        count *= d
    kind = draw(st.sampled_from(["unknown dtype", "other size dtype", "shape", "offsets", "missing field"]))
    if kind == "unknown dtype":
        info["dtype"] = draw(st.text(min_size=1, max_size=6).filter(lambda t: t not in DTYPE_SIZES))
    elif kind == "other size dtype":
        info["dtype"] = draw(st.sampled_from(sorted(d for d, s in DTYPE_SIZES.items() if s != size)))
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 300), min_size=1, max_size=3).filter(lambda s: _prod(s) != count))
        info["shape"] = shape
    elif kind == "offsets":
        begin, end = info["data_offsets"]
        delta = draw(st.integers(-(10**6), 10**6).filter(lambda d: d != 0))
        info["data_offsets"] = draw(st.sampled_from([[begin, end + delta], [begin + delta, end], [end, begin]]))
        if info["data_offsets"] == [begin, end]:
            info["data_offsets"] = [begin, end + 1]
    else:
        del info[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]


def _prod(shape: list[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def damage(model: Path, kind: str, draw) -> None:
    """Damage a checkpoint folder in one of the ways a disk, a download or a hand can."""
    shards = sorted(model.glob("*.safetensors"))
    shard = draw(st.sampled_from(shards))
    if kind == "tensor":
        header, body = read_safetensors(shard)
        corrupt_tensor(draw, header)
        write_safetensors(shard, header, body)
    elif kind == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif kind == "header length":
        data = shard.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        wrong = draw(st.integers(0, 2**64 - 1).filter(lambda n: n != length))
        shard.write_bytes(struct.pack("<Q", wrong) + data[8:])
    elif kind == "header syntax":
        data = bytearray(shard.read_bytes())
        (length,) = struct.unpack("<Q", data[:8])
        structural = [i for i in range(8, 8 + length) if chr(data[i]) in '{}[]:,"']
        data[draw(st.sampled_from(structural))] = ord(draw(st.sampled_from(list("x;#@"))))
        shard.write_bytes(bytes(data))
    elif kind == "config":
        path = model / "config.json"
        config = json.loads(path.read_text())
        change = draw(st.sampled_from(["count", "count type", "syntax", "family"]))
        if change == "count":
            config["num_hidden_layers"] = draw(st.integers(-5, 10**9).filter(lambda n: n != LAYERS))
        elif change == "count type":
            config["num_hidden_layers"] = draw(st.sampled_from(["6", 6.5, None, [6], {"n": 6}, True, False, 0]))
        elif change == "family":
            config["architectures"] = [draw(st.text(min_size=1, max_size=12))]
            config["model_type"] = draw(st.text(min_size=1, max_size=12).filter(lambda t: t != "llama"))
        if change == "syntax":
            text = path.read_text()
            path.write_text(text[: draw(st.integers(0, len(text) - 2))])
        else:
            path.write_text(json.dumps(config))
    else:
        path = model / "model.safetensors.index.json"
        raw = json.loads(path.read_text())
        key = draw(st.sampled_from(sorted(raw["weight_map"])))
        change = draw(st.sampled_from(["outside", "missing", "not a map", "syntax"]))
        if change == "outside":
            raw["weight_map"][key] = draw(st.sampled_from(["../escape.safetensors", "/etc/passwd", "a/../../x"]))
        elif change == "missing":
            raw["weight_map"][key] = "model-00009-of-00009.safetensors"
        elif change == "not a map":
            raw["weight_map"] = draw(st.sampled_from([[], "weights", 3, None]))
        path.write_text(json.dumps(raw) if change != "syntax" else json.dumps(raw)[:-3])


KINDS = ["tensor", "truncate", "header length", "header syntax", "config", "index"]


@FUZZ
@given(kind=st.sampled_from(KINDS), command=st.sampled_from(["prune", "prune-bits", "analyze"]), data=st.data())
def test_a_corrupted_checkpoint_is_refused_in_one_line(pristine, kind, command, data):
    root = fresh_root(pristine)
    damage(root / "model", kind, data.draw)
    before_files, before_digest = everything_under(root), folder_digest(root / "model")
    args = {
        "prune": ["prune", "ROOT/model", "--out", "ROOT/out", "--n", "1", "--strategy", "deepest"],
        "prune-bits": ["prune", "ROOT/model", "--out", "ROOT/out", "--layers", "1-2"],
        "analyze": ["analyze", "ROOT/model", "--out", "ROOT/out", "--data", "ROOT/docs.txt", "--samples", "2",
                    "--seq-len", "16"],
    }[command]  # fmt: skip
    assert_refused(root, run(root, *args), before_files, before_digest)
    shutil.rmtree(root)


# --- hostile arguments ----------------------------------------------------------------------


def oracle_layers(spec: str) -> list[int] | None:
    """The layers `--layers spec` removes from a 6-layer model, or None if it must be refused."""
    if not re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", spec):
        return None
    chosen: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        low, high = int(first), int(last or first)
        if high < low or high >= LAYERS:
            return None
        chosen.update(range(low, high + 1))
    return sorted(chosen) if chosen and LAYERS - 1 not in chosen else None


layer_specs = st.one_of(
    st.text(alphabet="0123456789-, a", max_size=12),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=4).map(
        lambda pairs: ",".join(f"{a}-{b}" if a != b else str(a) for a, b in pairs)
    ),
    st.sampled_from(["3-", "-3", "1,,2", "3,3", "0-999999999999", "2-1", "1-2,2-3", " 4 ", "0-4"]),
)


@FUZZ
@given(spec=layer_specs)
def test_random_layer_lists_are_pruned_or_refused_as_the_oracle_says(pristine, spec):
    root = fresh_root(pristine)
    before_files, before_digest = everything_under(root), folder_digest(root / "model")
    result = run(root, "prune", "ROOT/model", "--out", "ROOT/out", "--layers", spec)
    expected = oracle_layers(spec)
    if expected is None:
        assert_refused(root, result, before_files, before_digest)
    else:
        assert result.exit_code == 0, (spec, result.output)
        assert json.loads((root / "out" / "layerprune.json").read_text())["removed_layers"] == expected
    shutil.rmtree(root)


@FUZZ
@given(
    count=st.one_of(
        st.tuples(st.just("--n"), st.integers(-(10**12), 10**12).map(str)),
        st.tuples(st.just("--n"), st.integers(-2, 8).map(str)),
        st.tuples(st.just("--fraction"), st.floats(allow_nan=True, allow_infinity=True).map(repr)),
        st.tuples(st.just("--fraction"), st.floats(-0.2, 1.2).map(repr)),
    )
)
def test_random_counts_are_pruned_or_refused_as_the_oracle_says(pristine, count):
    root = fresh_root(pristine)
    before_files, before_digest = everything_under(root), folder_digest(root / "model")
    option, value = count
    result = run(root, "prune", "ROOT/model", "--out", "ROOT/out", "--strategy", "deepest", option, value)
    number = float(value)
    n = int(number) if option == "--n" else (round(number * LAYERS) if 0 < number < 1 else 0)
    if 1 <= n <= LAYERS - 1:
        assert result.exit_code == 0, (count, result.output)
        removed = json.loads((root / "out" / "layerprune.json").read_text())["removed_layers"]
        assert removed == list(range(LAYERS - 1 - n, LAYERS - 1))
    else:
        assert_refused(root, result, before_files, before_digest)
    shutil.rmtree(root)


segments = st.text(alphabet="abcXYZ019._- ", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
out_names = st.one_of(
    st.lists(segments, min_size=1, max_size=3).map("/".join),
    st.sampled_from(["", ".", "..", "../model", "model", "model/inner", "file.txt", "file.txt/x", "x" * 300, "a/" * 3]),
)


@FUZZ
@given(name=out_names, overwrite=st.booleans())
def test_random_destinations_are_written_or_refused_cleanly(pristine, name, overwrite, monkeypatch):
    root = fresh_root(pristine)
    work = root / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "file.txt").write_text("a file of the user's own")
    before_files, before_digest = everything_under(root), folder_digest(root / "model")
    args = ["prune", "ROOT/model", "--out", name, "--layers", "1"] + (["--overwrite"] if overwrite else [])
    result = run(root, *args)
    if result.exit_code == 0:
        out = (work / name).resolve()
        assert out.is_relative_to(work) and out != work and not out.is_relative_to(root / "model")
        assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1]
    else:
        assert_refused(root, result, before_files, before_digest)
    shutil.rmtree(root)
