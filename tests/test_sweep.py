"""The sweep: every point evaluated once, resumable, refuses mixed settings."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import sweep_config as config

import layerprune.healing.repair as repair_module
import layerprune.sweep.run as sweep_module
from layerprune.errors import LayerpruneError
from layerprune.runtime.models import load_model
from layerprune.selection.strategies import STRATEGIES, Choice
from layerprune.sweep.run import run_sweep

pytestmark = pytest.mark.slow  # several processes, kill campaigns or whole sweeps: not in make test-fast


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
        assert set(r["tasks"]) - {"kld"} == {"arc_easy", "loss"} and r["tasks"]["arc_easy"]["n"] == 6
        assert ("healing" in r) == r["healed"]
        assert ("kld" in r["tasks"]) == (r["n"] > 0) and (r["n"] == 0 or r["tasks"]["kld"]["kld"] > 0)
        assert len(r["tasks"]["arc_easy"]["documents"]["correct"]) == 6 == len(r["tasks"]["loss"]["documents"]["loss"])
    assert all(r["versions"]["layerprune"] and r["settings"]["limit"] == 6 for r in rows)  # as evaluate records
    deepest = next(r for r in rows if r["strategy"] == "deepest" and r["n"] == 2)
    assert deepest["layers_removed"] == [3, 4]
    for r in rows:  # what each point cost: a twin nothing; the others each task's time and their tokens
        cost = r["cost"]
        if "same_as" in r:
            assert cost["total_seconds"] == 0 and cost["layer_tokens"] == 0
            continue
        if r["healed"]:  # its own model beside the others, with a share of the full model's pass for kld
            own = (6 - r["n"]) * cost["head_tokens"]
            assert own < cost["layer_tokens"] < own + 6 * cost["head_tokens"]
        else:  # side by side: the full model's pass is the full point's; a cut runs only what follows its prefix
            suffix = [i for i in range(min(r["layers_removed"], default=0), 6) if i not in r["layers_removed"]]
            assert cost["layer_tokens"] == len(suffix) * cost["head_tokens"]
        assert {"evaluate arc_easy", "evaluate loss+kld"} <= set(cost["seconds"])
        assert ({"prune", "heal", "load"} <= set(cost["seconds"])) == r["healed"]
        assert cost["full_passes"] == round(cost["layer_tokens"] / 6, 1) > 0
    assert full["cost"]["layer_tokens"] == 6 * full["cost"]["head_tokens"]  # every head pass after 6 layers
    header = (finished / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["strategy", "n", "fraction"] and "arc_easy_acc" in header and "loss_normalized" in header
    assert "decode_tokens_per_s" in header and "size_mb" in header and "kld" in header and "top1_agreement" in header
    sensitivity = json.loads((finished / "sensitivity" / "sensitivity.json").read_text())
    assert set(sensitivity["tasks"]) == {"arc_easy", "loss"} and sensitivity["tasks"]["arc_easy"]["documents"] == 6
    assert len((finished / "results.csv").read_text().splitlines()) == 1 + len(rows)
    assert not (finished / "work").exists()


def test_rerun_computes_only_missing_points(setup, finished, tmp_path, monkeypatch):
    base, text = setup
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    (out / "points" / "deepest-n2-healed.json").unlink()  # as if killed before this point
    calls = []
    real = sweep_module._row
    monkeypatch.setattr(sweep_module, "_row", lambda point, *a: calls.append(point.key) or real(point, *a))
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
    real = sweep_module._row
    monkeypatch.setattr(sweep_module, "_row", lambda point, *a: calls.append(point.key) or real(point, *a))
    for name in ("deepest", "bi"):  # both strategies agree
        monkeypatch.setitem(STRATEGIES, name, replace(STRATEGIES[name], choose=lambda request: Choice([4])))
    out = run_sweep(base, tmp_path / "sweep", config(text, ns=(1,), strategies=("deepest", "bi")), progress=False).path
    rows = {(r["strategy"], r["healed"]): r for r in json.loads((out / "results.json").read_text())}
    assert rows["deepest", False]["layers_removed"] == rows["bi", False]["layers_removed"] == [4]
    assert calls == ["full-n0", "deepest-n1", "deepest-n1-healed"]
    assert rows["bi", True]["same_as"] == "deepest" and rows["bi", True]["tasks"] == rows["deepest", True]["tasks"]


def test_repairs_are_an_axis_of_points_compared_with_their_unrepaired_cut(setup, finished, tmp_path, monkeypatch):
    """Adding --repairs none,linear to a stored sweep computes only the repaired points (healed from
    the repaired weights), and the report draws them and compares each with its cut unrepaired."""
    base, text = setup
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    calls = []
    real = sweep_module._row
    monkeypatch.setattr(sweep_module, "_row", lambda point, *a: calls.append(point.key) or real(point, *a))
    loads = []  # the repairs read the base model the sweep holds; none loads it again
    monkeypatch.setattr(repair_module, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    run_sweep(base, out, config(text, strategies=("deepest",), repairs=("none", "linear")), progress=False)
    assert sorted(calls) == ["deepest-n1-linear", "deepest-n1-linear-healed", "deepest-n2-linear",
                             "deepest-n2-linear-healed"]  # fmt: skip
    assert loads == []
    stored = json.loads((out / "results.json").read_text())
    rows = {(r["strategy"], r["n"], r["repair"], r["healed"]): r for r in stored}
    for n, healed in ((1, False), (1, True), (2, False), (2, True)):
        repaired, plain = rows["deepest", n, "linear", healed], rows["deepest", n, "none", healed]
        assert repaired["layers_removed"] == plain["layers_removed"]
        assert [b["block"] for b in repaired["repair_record"]["blocks"]] == [[6 - n - 1, 6 - 2]]
        assert repaired["repair_record"]["blocks"][0]["fit_residual"] < 1
        assert ("healing" in repaired) == healed
        assert repaired["tasks"]["loss"]["loss"] != plain["tasks"]["loss"]["loss"], "the repair changed the model"
    assert "repair" in (out / "results.csv").read_text().splitlines()[0].split(",")
    report = (out / "report.html").read_text()
    table = report[report.index("<table id=repairs>") :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + 4 * 3  # a head, then 4 repaired points x (arc_easy, loss, kld)
    assert "deepest + linear repair + healing" in table and "deepest + linear repair" in report


def test_a_rerun_without_the_sensitivity_map_reuses_every_stored_result(setup, finished, tmp_path, monkeypatch):
    """--no-sensitivity (or an earlier version's record that stored it as a setting) is no reason to refuse."""
    base, text = setup
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    record = json.loads((out / "sweep.json").read_text())
    record["settings"]["sensitivity"] = True  # as versions before 0.2.1 stored it
    (out / "sweep.json").write_text(json.dumps(record))
    before = (out / "results.json").read_text()
    calls = []
    monkeypatch.setattr(sweep_module, "_row", lambda point, *a: calls.append(point.key))
    run_sweep(base, out, config(text, sensitivity=False), progress=False)
    assert calls == [] and (out / "results.json").read_text() == before


def test_changed_settings_are_refused(setup, finished):
    base, text = setup
    before = (finished / "results.json").read_text()
    with pytest.raises(LayerpruneError, match="other settings.*limit"):
        run_sweep(base, finished, config(text, limit=7), progress=False)
    assert (finished / "results.json").read_text() == before


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"ns": (), "fractions": (0.1, 1.0)}, r"--fraction must be in \[0, 1\)"),
        ({"ns": (0, 5)}, "cannot be removed"),
        ({"strategies": ("nope",)}, "unknown strategy"),
        ({"limit": 0}, "at least 1"),
        ({"repairs": ("magic",)}, "--repairs takes none, linear, cosine"),
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
        if "points" in path.parts:  # the point file, written in its scratch folder there
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_space_for_new_points)
    with pytest.raises(LayerpruneError, match="disk full writing angular-n3.json; results stored before are intact"):
        run_sweep(base, out, config(text, ns=(0, 1, 2, 3)), progress=False)
    assert {p.name: p.read_text() for p in (out / "points").iterdir()} == stored


def test_a_sweep_folder_inside_the_model_or_of_other_files_is_refused(setup, tmp_path):
    from conftest import folder_digest

    base, text = setup
    before = folder_digest(base)
    with pytest.raises(LayerpruneError, match="must not be inside the input model"):
        run_sweep(base, base / "sweep", config(text), progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(LayerpruneError, match="holds files that are not layerprune's"):
        run_sweep(base, tmp_path / "mine", config(text), progress=False)
    assert folder_digest(base) == before and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_two_shards_at_once_into_one_folder_give_the_single_run_results(setup, finished, tmp_path):
    """As two Slurm array tasks would: at the same moment, into one folder; then `layerprune report`."""
    import csv
    import os
    import subprocess
    import sys

    base, text = setup
    settings = config(text)
    flags = ["--n", "0,1,2", "--strategies", "angular,deepest", "--tasks", "arc_easy,loss,kld", "--limit", "6",
             "--data", str(text), "--samples", "8", "--seq-len", "32", "--heal-steps", "2", "--heal-batch-size", "2",
             "--heal-grad-accum", "1", "--heal-seq-len", "32", "--heal-data", str(text), "--heal-no-quant"]  # fmt: skip
    assert settings.limit == 6 and settings.calibration.samples == 8  # the flags say what `finished` used
    command = [sys.executable, "-m", "layerprune", "sweep", str(base), "--out", str(tmp_path / "sharded"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shards = [subprocess.Popen([*command, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for i in (1, 2)]  # fmt: skip
    outputs = [shard.communicate(timeout=900) for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("the last shard to finish writes the report" in out for out, _ in outputs) == 1
    report = subprocess.run([sys.executable, "-m", "layerprune", "report", str(tmp_path / "sharded")], env=env)
    assert report.returncode == 0
    timing = {"seconds", "decode_tokens_per_s"}  # wall-clock figures differ from run to run by nature

    def table(folder):
        rows = list(csv.DictReader((folder / "results.csv").read_text().splitlines()))
        return [{k: v for k, v in row.items() if k not in timing and not k.startswith("healing")} for row in rows]

    assert table(tmp_path / "sharded") == table(finished)
    assert len(list((tmp_path / "sharded" / "points").glob("*.json"))) == 9


def test_under_torchrun_each_process_takes_its_own_shard_alone(setup, finished, tmp_path):
    """One point per process, healing included (no DDP between them), and the same results."""
    import csv
    import os
    import subprocess
    import sys

    base, text = setup
    flags = ["--counts", "0,1,2", "--strategies", "angular,deepest", "--tasks", "arc_easy,loss,kld", "--limit", "6",
             "--data", str(text), "--samples", "8", "--seq-len", "32", "--heal-steps", "2", "--heal-batch-size", "2",
             "--heal-grad-accum", "1", "--heal-seq-len", "32", "--heal-data", str(text), "--heal-no-quant"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "layerprune", "sweep", str(base), "--out", str(tmp_path / "s"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    timing = {"seconds", "decode_tokens_per_s"}

    def table(folder):
        rows = list(csv.DictReader((folder / "results.csv").read_text().splitlines()))
        return [{k: v for k, v in row.items() if k not in timing} for row in rows]

    assert table(tmp_path / "s") == table(finished)


def test_limit_auto_evaluates_in_rounds_until_each_task_decides(setup, tmp_path):
    from layerprune.evaluation.harness import judge

    base, text = setup
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(f"Held-out note {i}: the {'big ' * (i % 6)}cat sat on the mat." for i in range(90)))
    settings = config(text, ns=(0, 1, 3), strategies=("deepest",), heal=False, tasks=("arc_easy", "loss", "kld"),
                      limit="auto:300", loss_data=str(heldout), sensitivity_limit=30)  # fmt: skip
    run_sweep(base, tmp_path / "auto", settings, progress=False)
    rows = json.loads((tmp_path / "auto" / "results.json").read_text())
    orders = sweep_module.document_orders(settings)
    full = next(r for r in rows if r["n"] == 0)
    for row in rows:
        for task, result in row["tasks"].items():
            ids = result["documents"]["id"]
            if row["n"]:  # the full model is extended to whatever the points need
                assert len(ids) == min(20 * 2 ** (result["rounds"] - 1), len(orders[task]))  # 20, 40, ... or all
            assert set(ids) == set(orders[task][: len(ids)])  # the first of one fixed order
            if task != "kld":  # the full model covers every point (kld compares with it directly)
                assert set(ids) <= set(full["tasks"][task]["documents"]["id"])
            if row["n"]:
                decided = judge(task, full["tasks"].get(task), result, settings.verdicts).verdict.state != "undecided"
                assert decided or len(ids) == len(orders[task]), (row["n"], task)
    assert len(orders["loss"]) == 90 and len(orders["arc_easy"]) == 300  # all 90; the first 300 of 570
    # the sensitivity map: as many documents as any point needed, at most --sensitivity-limit
    mapped = json.loads((tmp_path / "auto" / "sensitivity" / "sensitivity.json").read_text())["tasks"]
    for task in ("arc_easy", "loss"):
        needed = max(len(r["tasks"][task]["documents"]["id"]) for r in rows if r["n"])
        assert mapped[task]["documents"] == min(30, needed), (task, needed)


def test_limit_auto_needs_twenty_documents_per_task(setup, tmp_path):
    base, text = setup
    few = tmp_path / "few.txt"
    few.write_text("\n\n".join(f"Note {i}." for i in range(12)))
    settings = config(text, heal=False, tasks=("loss",), limit="auto", loss_data=str(few))
    with pytest.raises(LayerpruneError, match="--limit auto needs at least 20 documents per task; loss has 12"):
        run_sweep(base, tmp_path / "auto", settings, progress=False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tolerance", "0"], "--tolerance must be between 0 and 1 (0.05 is 5%), got 0.0"),
        (["--tolerance", "1"], "--tolerance must be between 0 and 1 (0.05 is 5%), got 1.0"),
        (["--kl-threshold", "-1"], "--kl-threshold must be above 0, got -1.0"),
        (["--limit", "most"], "--limit must be a whole number, auto or auto:N, got 'most'"),
        (["--limit", "auto:10"], "--limit auto:N needs a whole number N of at least 20, got 'auto:10'"),
    ],
)
def test_bad_tolerances_and_limits_are_one_line(setup, tmp_path, flags, message):
    from typer.testing import CliRunner

    from layerprune.cli import app

    base, _ = setup
    result = CliRunner().invoke(app, ["sweep", str(base), "--out", str(tmp_path / "s"), "--n", "0,1", *flags])
    assert result.exit_code == 1 and result.stderr == f"error: {message}\n"
    assert not (tmp_path / "s").exists()


def test_a_point_healed_near_its_cut_runs_from_the_full_model_s_prefix(setup, tmp_path):
    """--heal-target-layers near-cut: the healed model shares the layers before the cut with the full
    model, bitwise, so it is evaluated from the full model's residual stream there."""
    base, text = setup
    settings = config(text, ns=(0, 2), strategies=("angular",), tasks=("loss", "kld"), sensitivity=False)
    settings = replace(settings, heal_config=replace(settings.heal_config, target_layers="near-cut"))
    rows = json.loads((run_sweep(base, tmp_path / "s", settings, progress=False).path / "results.json").read_text())
    healed = next(r for r in rows if r["healed"])
    shared = max(min(healed["layers_removed"]) - 1, 0)  # the layer before the cut is adapted, and those after
    cost = healed["cost"]  # its layers from the first adapted one, and the full model's pass (kld, its prefix)
    assert 2 * cost["layer_tokens"] == (4 - shared + 6) * cost["head_tokens"] > 0, shared
    assert healed["tasks"]["kld"]["kld"] > 0 and healed["healing"]["config"]["target_layers"] == "near-cut"


def test_the_evaluation_s_own_settings_reach_every_point_and_are_kept(setup, tmp_path):
    """The sweep nests the evaluation's settings (`--eval-seq-len`, `--num-fewshot`, ...): each point
    is measured with them, a rerun that changes one is refused, and one that changes only the batch is not."""
    base, text = setup
    out = tmp_path / "sweep"
    settings = config(text, ns=(0, 1), strategies=("deepest",), heal=False, sensitivity=False, tasks=("loss",),
                      eval_seq_len=9, num_fewshot=1)  # fmt: skip
    run_sweep(base, out, settings, progress=False)
    rows = json.loads((out / "results.json").read_text())
    for row in rows:
        assert row["settings"]["seq_len"] == 9 and row["settings"]["num_fewshot"] == 1
        assert max(row["tasks"]["loss"]["documents"]["tokens"]) == 8  # 9 tokens: 8 predicted
    with pytest.raises(LayerpruneError, match="other settings.*eval_seq_len"):
        run_sweep(base, out, replace(settings, evaluation=replace(settings.evaluation, seq_len=10)), progress=False)
    run_sweep(base, out, replace(settings, evaluation=replace(settings.evaluation, batch_size=3)), progress=False)


def test_points_are_chosen_as_prune_chooses_them_with_the_sweep_s_prune_settings(setup, tmp_path):
    """The sweep nests prune's settings: --seed and --candidates reach the strategies, and every
    point removes what `prune` with the same settings removes."""
    from layerprune.recipes.pipeline import choose_layers

    base, text = setup
    settings = config(text, ns=(0, 2), strategies=("random", "angular-rerank"), heal=False, sensitivity=False,
                      tasks=("loss",), seed=5, candidates=2)  # fmt: skip
    out = run_sweep(base, tmp_path / "sweep", settings, progress=False).path
    rows = {r["strategy"]: r for r in json.loads((out / "results.json").read_text()) if r["n"]}
    for strategy in ("random", "angular-rerank"):
        alone = replace(settings.prune, strategy=strategy, n=2)
        removed, selection = choose_layers(6, lambda: base, alone, progress=False)
        assert rows[strategy]["layers_removed"] == removed, strategy
        stored = json.loads((out / "selections" / f"{strategy}-n2.json").read_text())
        assert stored["removed"] == removed and stored.get("seed") == selection.get("seed")
    assert len(json.loads((out / "selections" / "angular-rerank-n2.json").read_text())["candidates"]) == 2


def test_decode_speed_is_measured_once_per_shape_and_shared_by_its_points(finished):
    """Points that keep as many layers (healed or not, whichever layers) run the same per token: one
    measurement each, named by the point that made it."""
    rows = json.loads((finished / "results.json").read_text())
    for n in {r["n"] for r in rows}:
        same = [r for r in rows if r["n"] == n]
        assert len({(r["decode_tokens_per_s"], r["decode_shape"], r["decode_measured_on"]) for r in same}) == 1
        key = lambda r: sweep_module.Point(r["strategy"], r["n"], r["healed"], r["repair"]).key  # noqa: E731
        measured = [r for r in same if r["decode_measured_on"] == key(r)]
        assert len(measured) == 1, n
        assert "decode speed" in measured[0]["cost"]["seconds"]
        assert all("decode speed" not in r["cost"]["seconds"] for r in same if r is not measured[0])
    assert len({r["decode_shape"] for r in rows}) == len({r["n"] for r in rows})
