"""The sweep report: rebuilt from stored results only, self-contained, and right cell by cell."""

import html
import json
import shutil
import subprocess

import pytest

from layerprune import __version__
from layerprune.errors import LayerpruneError
from layerprune.selection.strategies import STRATEGIES
from layerprune.sweep.report import write_report

pytestmark = pytest.mark.slow  # several processes, kill campaigns or whole sweeps: not in make test-fast


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed (make test installs it)"
    return found


def rendered(page: str, tmp_path, script: str) -> str:
    """The page's DOM after headless Chromium ran it with `script` (which writes into #probe)."""
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.replace("</body>", f"<pre id=probe></pre><script>window.onload=()=>{{{script}}}</script></body>")
    )
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([chromium(), *flags, probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    return html.unescape(dom.split('<pre id="probe">')[1].split("</pre>")[0])


def rendered_tables(page: str, tmp_path) -> dict[str, list[list[str]]]:
    """Every table with an id, as Chromium lays it out: rows of the cells' rendered text."""
    script = (
        "const t={};for(const table of document.querySelectorAll('table[id]')){t[table.id]=[...table.rows]"
        ".map(r=>[...r.cells].map(c=>c.innerText.trim()))};document.getElementById('probe').textContent=JSON.stringify(t)"
    )
    return json.loads(rendered(page, tmp_path, script))


def test_the_cost_table_shows_each_points_seconds_and_work(finished, tmp_path):
    tables = rendered_tables((finished / "report.html").read_text(), tmp_path)
    head, *rows = tables["cost"]
    results = json.loads((finished / "results.json").read_text())
    assert head[0] == "point" and head[-2:] == ["seconds", "full-model token passes"] and "heal" in head
    assert len(rows) == len(results) and rows[0][0] == "full model"
    for row, result in zip(rows, results, strict=True):
        assert float(row[-2]) == pytest.approx(result["cost"]["total_seconds"], abs=0.051)
        assert float(row[-1].replace(",", "")) == pytest.approx(result["cost"]["full_passes"], abs=0.51)


def test_the_rendered_numbers_table_matches_the_results_cell_by_cell(finished, tmp_path):
    tables = rendered_tables((finished / "report.html").read_text(), tmp_path)
    head, *rows = tables["numbers"]
    results = json.loads((finished / "results.json").read_text())
    assert len(rows) == len(results) and all(len(row) == len(head) for row in rows)
    for row, result in zip(rows, results, strict=True):
        cell = dict(zip(head, row, strict=True))
        tasks = result["tasks"]
        assert cell["strategy"] == result["strategy"] and int(cell["n"]) == result["n"]
        assert float(cell["fraction"]) == pytest.approx(result["fraction"], abs=0.005)
        assert cell["healed"] == ("yes" if result["healed"] else "no")
        assert cell["layers removed"] == (" ".join(map(str, result["layers_removed"])) or "–")
        assert float(cell["params (M)"]) == pytest.approx(result["parameters"] / 1e6, abs=0.05)
        assert float(cell["size (MB)"]) == pytest.approx(result["size_mb"], abs=0.05)
        assert float(cell["decode tok/s"]) == pytest.approx(result["decode_tokens_per_s"], abs=0.05)
        accuracy, error = map(float, cell["arc_easy acc"].split(" ± "))
        assert accuracy == pytest.approx(tasks["arc_easy"]["acc"], abs=5e-4)
        assert error == pytest.approx(tasks["arc_easy"]["acc_stderr"], abs=5e-4)
        loss, error = map(float, cell["loss"].split(" ± "))
        assert loss == pytest.approx(tasks["loss"]["loss"], abs=5e-4)
        assert error == pytest.approx(tasks["loss"]["loss_stderr"], abs=5e-4)
        assert float(cell["loss / ln V"]) == pytest.approx(tasks["loss"]["loss_normalized"], abs=5e-4)
        if "kld" not in tasks:  # the full model: no divergence from itself is measured
            assert result["n"] == 0 and cell["kld"] == cell["top-1 agree"] == "–"
        else:
            kld, error = map(float, cell["kld"].split(" ± "))
            assert kld == pytest.approx(tasks["kld"]["kld"], abs=5e-5)
            assert error == pytest.approx(tasks["kld"]["kld_stderr"], abs=5e-5)
            assert float(cell["top-1 agree"]) == pytest.approx(tasks["kld"]["top1_agreement"], abs=5e-4)
        assert float(cell["seconds"]) == result["seconds"]


def test_the_rendered_comparisons_are_the_paired_bootstrap_of_the_stored_documents(finished, tmp_path):
    from layerprune.evaluation.tasks import task_of
    from layerprune.evaluation.uncertainty import compare

    tables = rendered_tables((finished / "report.html").read_text(), tmp_path)
    head, *rows = tables["comparisons"]
    results = json.loads((finished / "results.json").read_text())
    full = next(r for r in results if r["n"] == 0)
    checked = 0
    for row in rows:
        cell = dict(zip(head, row, strict=True))
        if cell["task"] == "kld":
            continue
        strategy, healed = cell["series"].removesuffix(" + healing"), cell["series"].endswith("healing")
        point = next(
            r for r in results if r["strategy"] == strategy and r["n"] == int(cell["n"]) and r["healed"] == healed
        )
        task = cell["task"]
        expected = compare(task_of(task).documents(full["tasks"][task]), task_of(task).documents(point["tasks"][task]),
                           higher_is_better=task != "loss")  # fmt: skip
        low, high = (float(x) for x in cell["paired 95% CI"].strip("[]").split(", "))
        assert (low, high) == pytest.approx(expected.change_interval, abs=5e-5)
        assert float(cell["change"]) == pytest.approx(expected.change, abs=5e-5)
        assert cell["verdict"].split(" ")[0] in ("within", "beyond", "undecided")
        checked += 1
    assert checked == 2 * 8  # arc_easy and loss, at each of the 8 pruned points


def test_the_report_explains_the_strategies_and_healing_it_used(finished):
    page = (finished / "report.html").read_text()
    for name in ("angular", "deepest"):
        assert STRATEGIES[name].help.split(" (")[0] in page
    assert "LoRA on the unquantized model" in page and "QLoRA" not in page  # the sweep healed with --no-quant


def test_a_folder_without_results_is_refused(tmp_path):
    with pytest.raises(LayerpruneError, match="holds no sweep results"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2")
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(LayerpruneError, match="results.json is not a valid sweep results file"):
        write_report(tmp_path)


def test_report_opens_in_headless_chromium_with_every_image(finished, tmp_path):
    page = (finished / "report.html").read_text()
    assert "how far can i prune" in page.lower() and "http" not in page.split("<body>")[1]
    script = (
        "document.getElementById('probe').textContent=[...document.images]"
        ".map(i=>i.alt+':'+(i.complete&&i.naturalWidth>100&&i.naturalHeight>100?'ok':'broken')).join(',')"
    )
    states = dict(item.split(":") for item in rendered(page, tmp_path, script).split(","))
    expected = {"acc-arc_easy", "change-arc_easy", "loss-loss", "change-loss", "kld", "sensitivity", "heatmap"}
    assert set(states) == expected and set(states.values()) == {"ok"}, states


def synthetic_rows(drops, documents=400, seed=0):
    """A full model right on 70% of documents, and one deepest-pruned point per drop, each losing
    that share of the full model's right answers (paired: the same documents)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = [f"t/{i}" for i in range(documents)]
    full = rng.random(documents) < 0.7

    def row(n, correct):
        values = [float(v) for v in correct]
        return {"strategy": "deepest" if n else "full", "n": n, "fraction": n / 10, "healed": False,
                "tasks": {"t": {"acc": sum(values) / documents, "n": documents,
                                "documents": {"id": ids, "correct": values}}}}  # fmt: skip

    return [row(0, full)] + [row(n + 1, full & (rng.random(documents) >= drop)) for n, drop in enumerate(drops)]


def test_how_far_walks_up_until_a_point_is_beyond_or_undecided():
    from layerprune.evaluation.harness import Tolerance
    from layerprune.sweep.report import how_far

    limits = Tolerance(tolerance=0.05)
    decided = how_far(synthetic_rows([0.0, 0.0, 0.5, 0.0]), "t", limits)["deepest"]
    assert decided.fraction == 0.2 and decided.undecided_at is None  # 0.4 would pass, but 0.3 did not
    everything = how_far(synthetic_rows([0.0, 0.0]), "t", limits)["deepest"]
    assert everything.fraction == 0.2 and everything.every_point_within
    assert everything.text() == "up to 2 of 10 layers (20%) (every cut tried)"
    unsure = how_far(synthetic_rows([0.0, 0.06, 0.5]), "t", limits)["deepest"]
    assert unsure.fraction == 0.1 and unsure.undecided_at == 0.2 and unsure.documents_to_decide > 400
    assert unsure.text().startswith("up to 1 of 10 layers (10%); undecided at 2 of 10 layers (20%): about ")
    assert unsure.text().endswith(" documents would likely decide")


def test_the_headline_answers_in_layers_and_never_asks_for_more_documents_than_a_task_has():
    from layerprune.evaluation.harness import Tolerance
    from layerprune.sweep.report import headline

    limits = Tolerance(tolerance=0.05)
    assert headline(synthetic_rows([0.0, 0.0, 0.5]), "t", limits) == (
        "You can remove up to 2 of 10 layers (20%) and keep t within 5% of the full model, with 95% confidence "
        "(deepest)."
    )
    rows = synthetic_rows([0.06, 0.5])
    assert headline(rows, "t", limits).startswith("No cut is shown to keep t within 5% of the full model; for the ")
    assert "about " in headline(rows, "t", limits)
    for row in rows:
        row["tasks"]["t"]["available"] = 450  # fewer than the comparison would need
    assert headline(rows, "t", limits) == (
        "No cut is shown to keep t within 5% of the full model; for the smallest, the task's 450 documents are too "
        "few to decide."
    )
    assert headline(synthetic_rows([0.5]), "t", limits) == (
        "No cut tried keeps t within 5% of the full model: the smallest is beyond it."
    )


def test_the_rendered_answer_is_one_sentence_per_task_then_a_table_with_headers(finished, tmp_path):
    from layerprune.evaluation.harness import Tolerance
    from layerprune.sweep.report import headline, how_far

    page = (finished / "report.html").read_text()
    results = json.loads((finished / "results.json").read_text())
    head, *rows = rendered_tables(page, tmp_path)["how-far"]
    labels = ["angular", "angular + healing", "deepest", "deepest + healing"]
    assert head == ["task", *labels] and [row[0] for row in rows] == ["arc_easy", "loss", "kld"]
    for task, *cells in rows:
        answers = how_far(results, task, Tolerance())
        assert cells == [answers[label].text() for label in labels]
        assert all(" layers (" in cell or cell.startswith("no cut") for cell in cells)
    script = "document.getElementById('probe').textContent=document.getElementById('headline').innerText"
    sentences = rendered(page, tmp_path, script).strip().splitlines()
    assert sentences == [f"{task}: {headline(results, task, Tolerance())}" for task in ("arc_easy", "loss", "kld")]
    assert "None" not in page.split("id=settings")[1] and "True" not in page.split("id=settings")[1]
    settings = dict(rendered_tables(page, tmp_path)["settings"])
    assert settings["report written by"] == f"layerprune {__version__}"
    assert settings["results computed with layerprune"] == results[0]["versions"]["layerprune"]


def test_the_report_command_prints_the_answer_per_task(finished, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from layerprune.cli import app
    from layerprune.evaluation.harness import Tolerance
    from layerprune.sweep.report import headline

    folder = tmp_path / "sweep"
    shutil.copytree(finished, folder)
    done = CliRunner().invoke(app, ["report", str(folder)])
    results = json.loads((folder / "results.json").read_text())
    expected = [f"{task}: {headline(results, task, Tolerance())}" for task in ("arc_easy", "loss", "kld")]
    assert done.exit_code == 0 and done.stdout.splitlines() == [*expected, f"wrote {folder / 'report.html'}"]
