"""The sweep report: one self-contained HTML file (images inline) rebuilt from stored results only.

It never runs a model: `layerprune report DIR` rebuilds it from DIR/results.json,
DIR/sweep.json and DIR/analysis/ at any time.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerprune._version import __version__
from layerprune.errors import LayerpruneError
from layerprune.evaluation.harness import Judgement, Tolerance, judge
from layerprune.evaluation.tasks import KLD_TASK, LOSS_TASK, TEXT_TASKS, task_of
from layerprune.evaluation.uncertainty import METHOD, break_point, compare
from layerprune.io.checkpoint import read_json
from layerprune.io.destinations import write_atomically
from layerprune.plots import metric_by_fraction, series, series_label
from layerprune.selection.strategies import STRATEGIES


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _qa_tasks(rows: list[dict]) -> list[str]:
    return sorted({t for r in rows for t, m in r["tasks"].items() if "acc" in m})


def _measured(rows: list[dict]) -> list[str]:
    """Every task the sweep measured: QA tasks, then loss and kld."""
    return _qa_tasks(rows) + [t for t in TEXT_TASKS if any(t in r["tasks"] for r in rows)]


def _full(rows: list[dict]) -> dict:
    return next(r for r in rows if r["n"] == 0)


def judgements(rows: list[dict], task: str, limits: Tolerance) -> dict[str, list[Judgement]]:
    """Per series, each point's judgement on `task` (see `harness.judge`)."""
    full = _full(rows)["tasks"].get(task)
    return {
        label: [judge(task, full, r["tasks"][task], limits) for r in points] for label, points in series(rows).items()
    }


@dataclass(frozen=True)
class Answer:
    """How far one series can be pruned on one task: `fraction` is decided, or the data cannot
    tell beyond it (`undecided_at`, and the documents that would likely decide)."""

    fraction: float
    layers: int  # the full model's
    undecided_at: float | None = None
    documents_to_decide: int | None = None
    every_point_within: bool = False
    available: int | None = None  # the task's documents

    def cut(self, fraction: float) -> str:
        return f"{round(fraction * self.layers)} of {self.layers} layers ({fraction:.0%})"

    def text(self) -> str:
        shown = f"up to {self.cut(self.fraction)}" if self.fraction else "no cut"
        if self.undecided_at is None:
            return shown + (" (every cut tried)" if self.every_point_within else "")
        return f"{shown}; undecided at {self.cut(self.undecided_at)}: {self.need()}"

    def need(self) -> str:
        """What would decide an undecided point: documents, capped at what the task has."""
        if self.documents_to_decide and self.available and self.documents_to_decide > self.available:
            return f"the task's {self.available} documents are too few to decide"
        if self.documents_to_decide:
            return f"about {self.documents_to_decide} documents would likely decide"
        return "far more documents would be needed"


def how_far(rows: list[dict], task: str, limits: Tolerance) -> dict[str, Answer]:
    """Per series: the largest fraction removed whose one-sided 95% upper bound of the harm is
    within the tolerance (kld: of the KL divergence, within the threshold), with every smaller
    fraction within it too. An undecided point stops the walk, and the answer says so."""
    answers = {}
    layers = _full(rows).get("num_layers") or round(next(r["n"] / r["fraction"] for r in rows if r["n"]))
    for (label, points), found in zip(series(rows).items(), judgements(rows, task, limits).values(),
                                      strict=True):  # fmt: skip
        best = 0.0
        answer = None
        for row, judgement in zip(points, found, strict=True):
            if judgement.verdict.state == "within":
                best = row["fraction"]
                continue
            if judgement.verdict.state == "undecided":
                available = row["tasks"][task].get("available")
                answer = Answer(best, layers, row["fraction"], judgement.verdict.documents_to_decide,
                                available=available)  # fmt: skip
            break
        answers[label] = answer or Answer(best, layers, every_point_within=best == points[-1]["fraction"])
    return answers


def _value(task: str, result: dict) -> float:
    return result[task_of(task).metric]


def break_points(rows: list[dict], task: str) -> dict[str, float | None]:
    """Per series: where the curve of `task` against the fraction removed breaks (the knot of a
    two-piece linear fit through the full model and every point; see `uncertainty.break_point`)."""
    full = _full(rows)["tasks"].get(task)
    start = 0.0 if task_of(task).reference else (_value(task, full) if full else None)  # its KL from itself: 0
    found = {}
    for label, points in series(rows).items():
        pairs = ([(0.0, start)] if start is not None else []) + [(r["fraction"], _value(task, r["tasks"][task]))
                                                                 for r in points]  # fmt: skip
        found[label] = break_point([x for x, _ in pairs], [y for _, y in pairs])
    return found


def _table(rows: list[dict], tasks: list[str]) -> str:
    head = [
        "strategy",
        "n",
        "fraction",
        "repair",
        "healed",
        "layers removed",
        "params (M)",
        "size (MB)",
        "decode tok/s",
    ]
    head += [f"{t} acc" for t in tasks] + ["loss", "loss / ln V", "kld", "top-1 agree", "seconds"]
    lines = ["<table id=numbers><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        loss, kld = r["tasks"].get(LOSS_TASK), r["tasks"].get(KLD_TASK)
        cells = [
            r["strategy"],
            r["n"],
            f"{r['fraction']:.2f}",
            r.get("repair", "none"),
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
            f"{loss['loss']:.3f} ± {loss.get('loss_stderr') or 0:.3f}" if loss else "–",
            f"{loss['loss_normalized']:.3f}" if loss else "–",
            f"{kld['kld']:.4f} ± {kld.get('kld_stderr') or 0:.4f}" if kld else "–",
            f"{kld['top1_agreement']:.3f}" if kld else "–",
            r["seconds"],
        ]
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def _comparisons(rows: list[dict], tasks: list[str], limits: Tolerance) -> str:
    """One row per pruned point and task: the paired change from the full model with its interval,
    the unpaired interval beside it, the harm's one-sided bounds and the verdict."""
    head = ["series", "n", "fraction", "task", "documents", "full", "pruned", "change", "paired 95% CI",
            "unpaired 95% CI", "harm bounds (95%, one-sided)", "verdict"]  # fmt: skip
    lines = ["<table id=comparisons><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    curves = series(rows)
    for task in tasks:
        for label, found in judgements(rows, task, limits).items():
            for row, judgement in zip(curves[label], found, strict=True):
                c = judgement.comparison
                result = row["tasks"][task]
                cells = [label, row["n"], f"{row['fraction']:.2f}", task, result["n"]]
                if c is not None:
                    cells += [f"{c.reference:.4f}", f"{c.candidate:.4f}", f"{c.change:+.4f}",
                              "[{:+.4f}, {:+.4f}]".format(*c.change_interval),
                              "[{:+.4f}, {:+.4f}]".format(*c.unpaired_interval)]  # fmt: skip
                else:
                    cells += ["0", f"{judgement.harm:.4f}", f"{judgement.harm:+.4f}", "–", "–"]
                cells += ["[{:.3f}, {:.3f}]".format(*judgement.bounds), _verdict_text(judgement)]
                lines.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def _repair_comparisons(rows: list[dict], tasks: list[str]) -> str:
    """One row per repaired point and task: its paired change from the same cut unrepaired (same
    strategy, n and healing), on the documents both evaluated."""
    plain = {(r["strategy"], r["n"], r["healed"]): r for r in rows if r["n"] and r.get("repair", "none") == "none"}
    head = ["series", "n", "task", "documents", "unrepaired", "repaired", "change", "paired 95% CI"]
    lines = ["<table id=repairs><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in (r for r in rows if r["n"] and r.get("repair", "none") != "none"):
        other = plain.get((row["strategy"], row["n"], row["healed"]))
        for task in tasks:
            if other is None or task not in row["tasks"] or task not in other["tasks"]:
                continue
            kind = task_of(task)
            c = compare(kind.documents(other["tasks"][task]), kind.documents(row["tasks"][task]),
                        higher_is_better=kind.higher_is_better)  # fmt: skip
            cells = [series_label(row), row["n"], task, c.documents, f"{c.reference:.4f}", f"{c.candidate:.4f}",
                     f"{c.change:+.4f}", "[{:+.4f}, {:+.4f}]".format(*c.change_interval)]  # fmt: skip
            lines.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def _repair_section(rows: list[dict], tasks: list[str]) -> str:
    if all(r.get("repair", "none") == "none" for r in rows):
        return ""
    return f"""<h2>Repair against the same cut unrepaired</h2>
<p>Each repaired point against the point that removed the same layers by the same strategy without
repair (and healed alike), on the documents both evaluated: the change (accuracy: higher is better;
loss and kld: lower is better) with its paired 95% interval. An interval that includes zero
does not decide.</p>
{_repair_comparisons(rows, tasks)}"""


def _verdict_text(judgement: Judgement) -> str:
    state = judgement.verdict
    if state.state != "undecided":
        return state.state
    return f"undecided (~{state.documents_to_decide} docs)" if state.documents_to_decide else "undecided"


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


def _healing_method(sweep: dict, rows: list[dict]) -> str:
    """How the sweep's points were healed, in a sentence that fits the run."""
    if not any(r["healed"] for r in rows):
        return "No point was healed (the sweep ran with --no-heal)."
    heal = sweep.get("config", {}).get("heal_config") or sweep.get("settings", {}).get("heal_config") or {}
    method = "QLoRA: LoRA on the 4-bit NF4 model" if heal.get("quant", True) else "LoRA on the unquantized model"
    return f"Healed points are fine-tuned after the cut ({method})."


OLD_RESULTS = (
    "<p><b>Not available:</b> these results keep no per-document figures (the sweep was made by a "
    "layerprune older than 0.2), so no paired comparison can be made; run the sweep again to get them.</p>"
)


def _plots(rows: list[dict], tasks: list[str], figures: Path, limits: Tolerance, paired: bool) -> list[Path]:
    """Per task: the metric with its 95% interval, and (with per-document results) its paired
    change from the full model."""
    tolerance, kl_threshold = limits.tolerance, limits.kl_threshold
    full = _full(rows)["tasks"]
    plots = []
    for task in tasks:
        breaks = {k: v for k, v in break_points(rows, task).items() if v is not None}
        if task_of(task).reference and paired:
            bounds = {id(r): judge(task, None, r["tasks"][task], limits).bounds
                      for r in rows if r["n"]}  # fmt: skip
            value = lambda r, b=bounds, t=task: (r["tasks"][t]["kld"], *b[id(r)]) if r["n"] else 0.0  # noqa: E731
            plots.append(metric_by_fraction(rows, value, "mean KL divergence (nats/token)",
                         "KL divergence from the full model (95% bootstrap bounds)", figures / "kld.png",
                         (kl_threshold, f"threshold ({kl_threshold:g})"), breaks))  # fmt: skip
            continue
        metric = task_of(task).metric

        def spread(r: dict, t: str = task, m: str = metric) -> tuple[float, float, float]:
            result = r["tasks"][t]
            half = 1.96 * (result.get(f"{m}_stderr") or 0.0)
            return result[m], result[m] - half, result[m] + half

        chance = full.get(task, {}).get("chance")
        plots.append(metric_by_fraction(rows, spread, "accuracy" if metric == "acc" else "next-token loss",
                     f"{task}: {'accuracy' if metric == 'acc' else 'held-out loss'} (± 1.96 s.e.)",
                     figures / f"{metric}-{task}.png", (chance, f"chance ({chance:.2f})") if chance else None,
                     breaks))  # fmt: skip
        if not paired:
            continue
        changes = {id(r): j.comparison for label, found in judgements(rows, task, limits).items()
                   for r, j in zip(series(rows)[label], found, strict=True)}  # fmt: skip

        def change(r: dict, c: dict = changes) -> Any:
            found = c.get(id(r))
            return (found.change, *found.change_interval) if found else 0.0

        limit = -tolerance * full[task][metric] if metric == "acc" else tolerance * full[task][metric]
        plots.append(metric_by_fraction(rows, change, f"change in {metric} from the full model",
                     f"{task}: paired change, 95% CI", figures / f"change-{task}.png",
                     (limit, f"tolerance ({tolerance:.0%})")))  # fmt: skip
    return plots


def headline(rows: list[dict], task: str, limits: Tolerance) -> str:
    """One sentence that answers how far the model can be pruned for `task`, by its best series."""
    return _sentence(task, how_far(rows, task, limits), limits)


def _sentence(task: str, found: dict[str, Answer], limits: Tolerance) -> str:
    """`headline` from the task's answers per series (`how_far`)."""
    label, best = max(found.items(), key=lambda item: item[1].fraction)
    within = f"mean KL divergence within {limits.kl_threshold:g} nats" if task_of(task).reference else (
        f"{task} within {limits.tolerance:.0%} of the full model")  # fmt: skip
    if best.fraction:
        return f"You can remove up to {best.cut(best.fraction)} and keep {within}, with 95% confidence ({label})."
    undecided = [a for a in found.values() if a.undecided_at is not None]
    if undecided:
        return f"No cut is shown to keep {within}; for the smallest, {min(undecided, key=_need).need()}."
    return f"No cut tried keeps {within}: the smallest is beyond it."


def answers(out: str | Path, limits: Tolerance | None = None) -> list[str]:
    """A stored sweep's answer, one line per task ("how far can I prune"), for the terminal."""
    rows = read_json(Path(out) / "results.json", "sweep results file")
    if not all("documents" in result for r in rows for result in r["tasks"].values()):
        return []  # a sweep older than 0.2 keeps no per-document figures: no paired answer
    return [f"{task}: {headline(rows, task, limits or Tolerance())}" for task in _measured(rows)]


def _need(answer: Answer) -> int:
    return answer.documents_to_decide or 2**62


def _how_far_section(rows: list[dict], tasks: list[str], limits: Tolerance) -> str:
    found = {task: how_far(rows, task, limits) for task in tasks}  # each: a paired bootstrap per point
    sentences = "".join(f"<li><b>{html.escape(task)}</b>: {html.escape(_sentence(task, found[task], limits))}</li>"
                        for task in tasks)  # fmt: skip
    labels = list(series(rows))
    head = "<tr><th>task</th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    lines = []
    for task in tasks:
        cells = "".join(f"<td>{html.escape(found[task][label].text())}</td>" for label in labels)
        lines.append(f"<tr><th>{html.escape(task)}</th>{cells}</tr>")
    return f"<ul id=headline>{sentences}</ul><table id=how-far>{head}{''.join(lines)}</table>"


def _breaks_section(rows: list[dict], tasks: list[str]) -> str:
    found = {task: break_points(rows, task) for task in tasks}
    labels = list(series(rows))
    head = "<tr><th>series</th>" + "".join(f"<th>{html.escape(t)}</th>" for t in tasks) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(f"<td>{'–' if found[t][label] is None else f'{found[t][label]:.2f}'}</td>" for t in tasks)
        + "</tr>"
        for label in labels
    )
    sentences = []
    qa = [t for t in tasks if not task_of(t).text]
    for label in labels:
        loss_break = found.get(LOSS_TASK, {}).get(label)
        qa_breaks = [f"{t} at {found[t][label]:.2f}" for t in qa if found[t][label] is not None]
        if loss_break is not None and qa_breaks:
            sentences.append(f"{label}: the loss breaks at {loss_break:.2f}; the accuracies: {', '.join(qa_breaks)}.")
    return f"<table id=breaks>{head}{body}</table>" + (
        "<p>" + html.escape(" ".join(sentences)) + "</p>" if sentences else ""
    )


def _sensitivity_section(out: Path) -> str:
    path = out / "sensitivity" / "sensitivity.json"
    if not path.is_file():
        return "<p>(no sensitivity map stored)</p>"
    record = read_json(path, "sensitivity file")
    items = []
    for task, result in record["tasks"].items():
        worst = sorted(result["layers"], key=lambda layer: -layer["harm"])[:3]
        listed = ", ".join(
            "layer {} ({:+.1%}, 95% CI {:+.1%} to {:+.1%})".format(w["layer"], w["harm"], *w["harm_interval"])
            for w in worst
        )
        items.append(f"<li><b>{html.escape(task)}</b> ({result['documents']} documents): {html.escape(listed)}</li>")
    image = out / "sensitivity" / "sensitivity.png"
    return (f"<p>Each layer removed alone; the relative harm to each task (positive: worse), paired over the "
            f"same documents. The layers that matter most:</p><ul>{''.join(items)}</ul>"
            + (_image(image) if image.is_file() else ""))  # fmt: skip


def _cost_section(out: Path, rows: list[dict]) -> str:
    """What the sweep cost: per point, seconds by phase and model work in full-model token passes
    (`cost.Ledger`); the shared analysis and sensitivity map apart; the totals."""
    costed = [r for r in rows if "cost" in r]
    if not costed:
        return "<p>(these results record no costs: the sweep was made by an older layerprune)</p>"
    phases = sorted({p for r in costed for p in r["cost"]["seconds"]}, key=_phase_order)
    head = ["point", *phases, "seconds", "full-model token passes"]
    lines = ["<table id=cost><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in costed:
        label = "full model" if not r["n"] else f"{series_label(r)}, n = {r['n']}"
        cells = [label, *(f"{r['cost']['seconds'].get(p, 0):.1f}" for p in phases)]
        cells += [f"{r['cost']['total_seconds']:.1f}", f"{r['cost']['full_passes']:,.0f}"]
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    shared = {"analysis": _stored_seconds(out / "analysis" / "distances.json", ("extra", "seconds"))}
    shared["sensitivity map"] = _stored_seconds(out / "sensitivity" / "sensitivity.json", ("seconds",))
    points = sum(r["cost"]["total_seconds"] for r in costed)
    total = points + sum(s for s in shared.values() if s is not None)
    apart = ", ".join(f"{name} {s:.0f} s" for name, s in shared.items() if s is not None)
    lines.append("</table>")
    return (
        f"<p>Wall time by phase, and the model work of evaluation counted as tokens through the full "
        f"model's layers (padding included). Unhealed points are evaluated side by side: the full model's "
        f"pass is the full point's work, and each cut counts only the layers it runs after the full model's "
        f"prefix; a healed or repaired point counts its own passes, and for kld its reference's too. Points "
        f"{points:.0f} s" + (f"; shared: {apart}" if apart else "") + f"; in all {total:.0f} s "
        f"({total / 60:.1f} min). Twin points (another strategy's same layers) cost nothing.</p>" + "\n".join(lines)
    )


def _phase_order(phase: str) -> tuple[int, str]:
    order = ["prune", "prune and repair", "heal", "load"]
    return (order.index(phase), phase) if phase in order else (len(order) + (phase == "decode speed"), phase)


def _stored_seconds(path: Path, keys: tuple[str, ...]) -> float | None:
    """A stored record's seconds, if it has them (older records do not)."""
    if not path.is_file():
        return None
    value: Any = read_json(path, "stored record")
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _setting(value: Any) -> str:
    """A setting as a person reads it: yes/no, "not set", lists and nested settings flattened."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(_setting, value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "not set" if value is None else str(value)


def _settings_table(sweep: dict, versions: dict | None) -> str:
    settings = {**sweep.get("config", sweep["settings"])}
    settings.update({f"results computed with {k}": v for k, v in (versions or {}).items()})
    settings["report written by"] = f"layerprune {__version__}"  # a report rebuilt later says so
    return (
        "<table id=settings>"
        + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_setting(v))}</td></tr>" for k, v in settings.items()
        )
        + "</table>"
    )


def write_report(out: str | Path, limits: Tolerance | None = None) -> Path:
    """Build DIR/report.html (and the figures under DIR/figures/) from the stored sweep results."""
    limits = limits or Tolerance()
    tolerance, kl_threshold = limits.tolerance, limits.kl_threshold
    out = Path(out)
    if not (out / "results.json").is_file() or not (out / "sweep.json").is_file():
        raise LayerpruneError(f"{out} holds no sweep results (results.json, sweep.json)")
    rows = read_json(out / "results.json", "sweep results file")
    sweep = read_json(out / "sweep.json", "sweep settings file")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    tasks = _measured(rows)
    paired = all("documents" in result for r in rows for result in r["tasks"].values())
    plots = _plots(rows, tasks, figures, limits, paired)
    heatmap = out / "analysis" / "heatmap.png"
    name = html.escape(sweep["model"])
    documents = sorted({r["tasks"][t]["n"] for r in rows for t in tasks if t in r["tasks"]})
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>layerprune sweep: {name}</title>
<style>{STYLE}</style></head><body>
<h1>Layer pruning sweep: {name}</h1>
<p>Each point removes n layers by a strategy and is evaluated. {html.escape(_healing_method(sweep, rows))}
Accuracy should stay flat, then collapse to chance; healed loss should grow slowly. The strategies:</p>
<ul>{_strategy_items(rows)}</ul>
<h2>How far can I prune?</h2>
<p>For each task, the largest fraction of layers removed at which the one-sided 95% upper bound of
the harm is within {tolerance:.0%} of the full model (accuracy: relative drop; loss: relative rise;
kld: mean KL divergence within {kl_threshold:g} nats per token), with every smaller fraction within
it too. Each point is compared with the full model on the same documents, by a
{html.escape(METHOD)}. Where the data cannot decide, the answer says so, with the documents that
would likely decide (the bound narrows as 1/&radic;documents). Documents per task and point:
{", ".join(map(str, documents))}.</p>
{_how_far_section(rows, tasks, limits) if paired else OLD_RESULTS}
<h2>Accuracy, loss and closeness against the fraction removed</h2>
<p>Error bars: 95% intervals. The "paired change" figures show each point's difference from the
full model on the same documents; dotted vertical lines mark each curve's break point.</p>
<div class="grid">{"".join(_image(p) for p in plots)}</div>
<h2>Where do loss and accuracy break?</h2>
<p>The fraction at which each curve breaks: the knot of the best continuous two-piece linear fit
(least squares, the knot tried at each measured fraction). With few fractions, a break is located
only to within their spacing; it describes the curve and is not a test.</p>
{_breaks_section(rows, tasks)}
<h2>Where does knowledge sit?</h2>
{_sensitivity_section(out)}
<h2>Angular distance between layers</h2>
{_image(heatmap) if heatmap.is_file() else "<p>(no analysis stored)</p>"}
<h2>Paired comparisons with the full model</h2>
{_comparisons(rows, tasks, limits) if paired else OLD_RESULTS}
{_repair_section(rows, tasks) if paired else ""}
<h2>All numbers</h2>
{_table(rows, _qa_tasks(rows))}
<h2>What it cost</h2>
{_cost_section(out, rows)}
<h2>Settings and versions</h2>
{_settings_table(sweep, rows[0].get("versions"))}
</body></html>"""
    path = out / "report.html"
    write_atomically(path, body)  # shards that finish together each write it whole
    return path
