"""The sweep report: one self-contained HTML file (images inline) rebuilt from stored results only.

It never runs a model: `layerprune report DIR` rebuilds it from DIR/results.json,
DIR/sweep.json and DIR/analysis/ at any time.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .checkpoint import read_json, write_atomically
from .errors import LayerpruneError
from .plots import metric_by_fraction
from .strategies import STRATEGIES

TOLERANCE = 0.05  # "within 5% of the full model's accuracy"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _qa_tasks(rows: list[dict]) -> list[str]:
    return sorted({t for r in rows for t, m in r["tasks"].items() if "acc" in m})


def how_far(rows: list[dict], task: str, tolerance: float = TOLERANCE) -> dict[str, float]:
    """Per strategy (and healed state): the largest fraction removed whose accuracy stays within
    `tolerance` (relative) of the full model's, with every smaller fraction also within it."""
    full = next(r for r in rows if r["n"] == 0)["tasks"][task]["acc"]
    floor = full * (1 - tolerance)
    answer: dict[str, float] = {}
    for strategy in sorted({r["strategy"] for r in rows if r["n"]}):
        for healed in (False, True):
            points = sorted(
                (r for r in rows if r["n"] and r["strategy"] == strategy and r["healed"] == healed),
                key=lambda r: r["n"],
            )
            if not points:
                continue
            best = 0.0
            for r in points:
                if r["tasks"][task]["acc"] < floor:
                    break
                best = r["fraction"]
            answer[f"{strategy}{' + healing' if healed else ''}"] = best
    return answer


def _table(rows: list[dict], tasks: list[str]) -> str:
    head = ["strategy", "n", "fraction", "healed", "layers removed", "params (M)", "size (MB)", "decode tok/s"]
    head += [f"{t} acc" for t in tasks] + ["loss", "loss / ln V", "seconds"]
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        loss = r["tasks"].get("loss", {})
        cells = [
            r["strategy"],
            r["n"],
            f"{r['fraction']:.2f}",
            "yes" if r["healed"] else "no",
            " ".join(map(str, r["layers_removed"])) or "–",
            f"{r['parameters'] / 1e6:.1f}",
            f"{r['size_mb']:.1f}",
            f"{r['decode_tokens_per_s']:.1f}",
        ]
        for t in tasks:
            m = r["tasks"].get(t, {})
            cells.append(f"{m['acc']:.3f} ± {m.get('acc_stderr') or 0:.3f}" if "acc" in m else "–")
        cells += [
            f"{loss['loss']:.3f}" if loss else "–",
            f"{loss['loss_normalized']:.3f}" if loss else "–",
            r["seconds"],
        ]
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.8em}"""


def _strategy_items(rows: list[dict]) -> str:
    """One line per strategy in the sweep, from the strategy registry."""
    names = sorted({r["strategy"] for r in rows if r["n"]})
    return "".join(
        f"<li><b>{html.escape(n)}</b>: {html.escape(STRATEGIES[n].help if n in STRATEGIES else '(not installed)')}</li>"
        for n in names
    )


def _healing_method(sweep: dict) -> str:
    heal = sweep.get("config", {}).get("heal_config") or sweep.get("settings", {}).get("heal_config") or {}
    return "QLoRA: LoRA on the 4-bit NF4 model" if heal.get("quant", True) else "LoRA on the unquantized model"


def write_report(out: str | Path, tolerance: float = TOLERANCE) -> Path:
    """Build DIR/report.html (and the figures under DIR/figures/) from the stored sweep results."""
    out = Path(out)
    if not (out / "results.json").is_file() or not (out / "sweep.json").is_file():
        raise LayerpruneError(f"{out} holds no sweep results (results.json, sweep.json)")
    rows = read_json(out / "results.json", "sweep results file")
    sweep = read_json(out / "sweep.json", "sweep settings file")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    tasks = _qa_tasks(rows)
    plots = []
    for task in tasks:
        chance = next((r["tasks"][task].get("chance") for r in rows if task in r["tasks"]), None)
        plots.append(
            metric_by_fraction(
                rows,
                lambda r, t=task: r["tasks"].get(t, {}).get("acc"),
                "accuracy",
                f"{task}: accuracy",
                figures / f"accuracy-{task}.png",
                chance,
            )
        )
    if any("loss" in r["tasks"] for r in rows):
        plots.append(
            metric_by_fraction(
                rows,
                lambda r: r["tasks"].get("loss", {}).get("loss_normalized"),
                "next-token loss / ln(vocab)",
                "held-out loss (normalized)",
                figures / "loss.png",
            )
        )
    heatmap = out / "analysis" / "heatmap.png"
    answers = "".join(
        f"<tr><td>{html.escape(t)}</td>"
        + "".join(f"<td>{html.escape(k)}: {v:.2f}</td>" for k, v in how_far(rows, t, tolerance).items())
        + "</tr>"
        for t in tasks
    )
    settings = json.dumps(
        {"settings": sweep.get("config", sweep["settings"]), "versions": rows[0].get("versions")}, indent=1
    )
    name = html.escape(sweep["model"])
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>layerprune sweep: {name}</title>
<style>{STYLE}</style></head><body>
<h1>Layer pruning sweep: {name}</h1>
<p>Each point removes n layers by a strategy, is evaluated, and with healing is fine-tuned first
({html.escape(_healing_method(sweep))}). Accuracy should stay flat, then collapse to chance;
healed loss should grow slowly. The strategies:</p>
<ul>{_strategy_items(rows)}</ul>
<h2>How far can I prune?</h2>
<p>Largest fraction of layers removed that keeps each task's accuracy within {tolerance:.0%} of
the full model's (and every smaller fraction within it too):</p>
<table>{answers}</table>
<h2>Accuracy and loss against the fraction removed</h2>
<div class="grid">{"".join(_image(p) for p in plots)}</div>
<h2>Angular distance between layers</h2>
{_image(heatmap) if heatmap.is_file() else "<p>(no analysis stored)</p>"}
<h2>All numbers</h2>
{_table(rows, tasks)}
<h2>Settings and versions</h2>
<pre>{html.escape(settings)}</pre>
</body></html>"""
    path = out / "report.html"
    write_atomically(path, body)  # shards that finish together each write it whole
    return path
