"""The sweep report: rebuilt from stored results only, self-contained, and right cell by cell."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from layerprune.errors import LayerpruneError
from layerprune.report import write_report
from layerprune.strategies import STRATEGIES


class Tables(HTMLParser):
    """Every table of a page, as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None


def test_every_row_of_the_numbers_table_lines_up_with_its_header(finished):
    parser = Tables()
    parser.feed((finished / "report.html").read_text())
    head, *rows = parser.tables[-1]
    results = json.loads((finished / "results.json").read_text())
    assert len(rows) == len(results) and all(len(row) == len(head) for row in rows)
    for row, result in zip(rows, results, strict=True):
        cell = dict(zip(head, row, strict=True))
        assert cell["strategy"] == result["strategy"] and int(cell["n"]) == result["n"]
        assert float(cell["size (MB)"]) == pytest.approx(result["size_mb"], abs=0.05)
        assert float(cell["decode tok/s"]) == pytest.approx(result["decode_tokens_per_s"], abs=0.05)
        accuracy = float(cell["arc_easy acc"].split(" ± ")[0])
        assert accuracy == pytest.approx(result["tasks"]["arc_easy"]["acc"], abs=5e-4)
        assert float(cell["loss"]) == pytest.approx(result["tasks"]["loss"]["loss"], abs=5e-4)


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
