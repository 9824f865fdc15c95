"""The sweep: every point evaluated once, resumable, refuses mixed settings; the report opens in Chromium."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import save_tiny, tiny_model

import layerprune.sweep as sweep_module
from layerprune.errors import LayerpruneError
from layerprune.healing import HealConfig
from layerprune.sweep import SweepConfig, run_sweep


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    base = save_tiny(tiny_model("qwen3", seed=2), root / "base")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Story {i}. The cat sat on the mat and looked at the dog. " * 3 for i in range(40)))
    return base, text


def config(text, **changes):
    heal = HealConfig(steps=2, batch_size=2, grad_accum=1, seq_len=32, data=str(text), quant=False)
    settings = dict(
        ns=(0, 1, 2),
        strategies=("angular", "deepest"),
        heal=True,
        heal_config=heal,
        tasks=("arc_easy", "loss"),
        limit=6,
        data=str(text),
        samples=8,
        seq_len=32,
    )
    return SweepConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    base, text = setup
    out = tmp_path_factory.mktemp("run") / "sweep"
    run_sweep(base, out, config(text), progress=False)
    return out


def test_sweep_writes_one_row_per_point_and_a_report(finished):
    rows = json.loads((finished / "results.json").read_text())
    keys = {(r["strategy"], r["n"], r["healed"]) for r in rows}
    assert keys == {("full", 0, False)} | {(s, n, h) for s in ("angular", "deepest") for n in (1, 2) for h in (0, 1)}
    full = next(r for r in rows if r["n"] == 0)
    for r in rows:
        assert r["num_layers"] == 6 - r["n"] and len(r["layers_removed"]) == r["n"]
        assert r["parameters"] < full["parameters"] or r["n"] == 0
        assert r["size_mb"] < full["size_mb"] or r["n"] == 0
        assert r["decode_tokens_per_s"] > 0
        assert set(r["tasks"]) == {"arc_easy", "loss"} and r["tasks"]["arc_easy"]["n"] == 6
        assert ("healing" in r) == r["healed"]
    deepest = next(r for r in rows if r["strategy"] == "deepest" and r["n"] == 2)
    assert deepest["layers_removed"] == [3, 4]
    header = (finished / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["strategy", "n", "fraction"] and "arc_easy_acc" in header and "loss_normalized" in header
    assert "decode_tokens_per_s" in header and "size_mb" in header
    assert len((finished / "results.csv").read_text().splitlines()) == 1 + len(rows)
    assert not (finished / "work").exists()


def test_report_opens_in_headless_chromium_with_every_image(finished, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (make test installs it)"
    page = (finished / "report.html").read_text()
    assert "how far can i prune" in page.lower() and "<table>" in page and "http" not in page.split("<body>")[1]
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.onload=()=>{document.title='IMAGES '+[...document.images]"
        ".map(i=>i.complete&&i.naturalWidth>100&&i.naturalHeight>100?'ok':'broken').join(',')}</script>"
    )
    probe.write_text(page.replace("</body>", script + "</body>"))
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    title = dom.split("<title>")[1].split("</title>")[0]
    assert title.startswith("IMAGES ")
    states = title.removeprefix("IMAGES ").split(",")
    assert len(states) == 3 and set(states) == {"ok"}, title  # arc_easy accuracy, loss, heatmap: each decoded


def test_rerun_computes_only_missing_points(setup, finished, tmp_path, monkeypatch):
    base, text = setup
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    (out / "points" / "deepest-n2-healed.json").unlink()  # as if killed before this point
    calls = []
    real = sweep_module._run_point
    monkeypatch.setattr(sweep_module, "_run_point", lambda point, *a: calls.append(point.key) or real(point, *a))
    run_sweep(base, out, config(text, ns=(0, 1, 2, 3)), progress=False)
    missing = ["angular-n3", "angular-n3-healed", "deepest-n2-healed", "deepest-n3", "deepest-n3-healed"]
    assert set(calls) <= set(missing) and "angular-n3" in calls and "angular-n3-healed" in calls
    for key in set(missing) - set(calls):  # not recomputed: a stored point removed the same layers
        row = json.loads((out / "points" / f"{key}.json").read_text())
        twin = json.loads((out / "points" / f"{key.replace('deepest', row['same_as'])}.json").read_text())
        assert row["layers_removed"] == twin["layers_removed"] and row["tasks"] == twin["tasks"]
    assert len(json.loads((out / "results.json").read_text())) == 13


def test_points_that_remove_the_same_layers_are_computed_once(setup, tmp_path, monkeypatch):
    base, text = setup
    calls = []
    real = sweep_module._run_point
    monkeypatch.setattr(sweep_module, "_run_point", lambda point, *a: calls.append(point.key) or real(point, *a))
    monkeypatch.setattr("layerprune.surgery.select_layers", lambda *a, **k: [4])  # both strategies agree
    out = run_sweep(base, tmp_path / "sweep", config(text, ns=(1,), strategies=("deepest", "bi")), progress=False)
    rows = {(r["strategy"], r["healed"]): r for r in json.loads((out / "results.json").read_text())}
    assert rows["deepest", False]["layers_removed"] == rows["bi", False]["layers_removed"] == [4]
    assert calls == ["full-n0", "deepest-n1", "deepest-n1-healed"]
    assert rows["bi", True]["same_as"] == "deepest" and rows["bi", True]["tasks"] == rows["deepest", True]["tasks"]


def test_changed_settings_are_refused(setup, finished):
    base, text = setup
    before = (finished / "results.json").read_text()
    with pytest.raises(LayerpruneError, match="other settings.*limit"):
        run_sweep(base, finished, config(text, limit=7), progress=False)
    assert (finished / "results.json").read_text() == before


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"ns": (), "fractions": (0.1, 1.0)}, r"fractions must be in \[0, 1\)"),
        ({"ns": (0, 5)}, "cannot be removed"),
        ({"strategies": ("nope",)}, "unknown strategy"),
        ({"limit": 0}, "at least 1"),
    ],
)
def test_bad_sweeps_are_refused(setup, tmp_path, changes, fragment):
    base, text = setup
    with pytest.raises(LayerpruneError, match=fragment):
        run_sweep(base, tmp_path / "sweep", config(text, **changes), progress=False)
    assert not (tmp_path / "sweep" / "results.json").exists()


def test_sweep_with_a_loss_strategy_stores_its_selection(setup, tmp_path):
    base, text = setup
    out = tmp_path / "sweep"
    run_sweep(base, out, config(text, ns=(0, 2), strategies=("loss",), heal=False), progress=False)
    rows = json.loads((out / "results.json").read_text())
    selection = json.loads((out / "selections" / "loss-n2.json").read_text())
    assert len(selection["candidates"]) == 4  # blocks 0-1 .. 3-4; 4-5 holds the final layer
    assert next(r for r in rows if r["n"] == 2)["layers_removed"] == selection["removed"]


def test_a_full_disk_stops_with_one_line_and_keeps_stored_results(setup, finished, tmp_path, monkeypatch):
    import errno

    base, text = setup
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    stored = {p.name: p.read_text() for p in (out / "points").iterdir()}

    real_write = Path.write_text

    def no_space_for_new_points(path, *args, **kwargs):
        if path.parent.name == "points":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_space_for_new_points)
    with pytest.raises(LayerpruneError, match="disk full writing angular-n3.json; results stored before are intact"):
        run_sweep(base, out, config(text, ns=(0, 1, 2, 3)), progress=False)
    assert {p.name: p.read_text() for p in (out / "points").iterdir()} == stored
