"""Figures from plain numbers: the paper's angular-distance heatmap, healing curves, the sweep's
metrics against the fraction removed (with their intervals), the layer x task sensitivity map,
and inference costs side by side.

A leaf module: it draws what it is given and imports nothing else of layerprune (nor torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def angular_heatmap(
    angular: dict[int, list[float]], best: dict[int, int], num_layers: int, title: str, path: str | Path
) -> Path:
    """d(l, n) with the start layer l across and the block size n up; the best l per n is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((num_layers - 1, num_layers), np.nan)
    for n, row in angular.items():
        grid[n - 1, : len(row)] = row
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    image = ax.imshow(
        grid, origin="lower", aspect="auto", cmap="viridis_r", extent=(-0.5, num_layers - 0.5, 0.5, num_layers - 0.5)
    )
    ax.plot([best[n] for n in best], list(best), "r.", markersize=5, label="smallest d for each n")
    ax.set_xlabel("start layer l")
    ax.set_ylabel("block size n (layers removed)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(image, ax=ax, label="arccos(cos)/π")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def loss_curves(curve: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Training and validation loss against the step of a healing run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, style in (("train", "-"), ("validation", "o-")):
        if curve.get(name):
            steps, losses = zip(*curve[name], strict=True)
            ax.plot(steps, losses, style, label=name, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.set_title("Healing", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def series_label(row: dict) -> str:
    """The curve a sweep point belongs to: its strategy, repair and healing."""
    repair = row.get("repair", "none")
    return (
        row["strategy"] + (f" + {repair} repair" if repair != "none" else "") + (" + healing" if row["healed"] else "")
    )


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """The pruned points of each curve (strategy, then unrepaired first, then unhealed first), in
    order of n."""
    lines: dict[str, list[dict]] = {}

    def order(row: dict) -> tuple:
        repair = row.get("repair", "none")
        return row["strategy"], repair != "none", repair, row["healed"], row["n"]

    for row in sorted((r for r in rows if r["n"]), key=order):
        lines.setdefault(series_label(row), []).append(row)
    return lines


def _series(rows: list[dict], value: Any) -> dict[str, list[tuple[float, Any]]]:
    """Each curve as (fraction, value) pairs, from the full model at fraction 0; points without a
    value are left out."""
    full = [r for r in rows if r["n"] == 0][:1]
    lines = {label: [(r["fraction"], value(r)) for r in full + points] for label, points in series(rows).items()}
    return {label: [(x, y) for x, y in pairs if y is not None] for label, pairs in lines.items()}


def metric_by_fraction(
    rows: list[dict],
    value: Any,
    ylabel: str,
    title: str,
    path: str | Path,
    line: tuple[float, str] | None = None,
    breaks: dict[str, float] | None = None,
) -> Path:
    """A metric against the fraction of layers removed, one line per strategy and healed state.

    `value(row)` gives the metric, or (metric, low, high) to draw a 95% interval as error bars;
    `line` draws a labelled horizontal line (chance, a tolerance); `breaks` marks each curve's
    break point (by label) with a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for index, (label, points) in enumerate(_series(rows, value).items()):
        xs = [x + (index - 1) * 0.004 for x, _ in points]  # a small offset keeps the error bars apart
        ys = [v[0] if isinstance(v, tuple) else v for _, v in points]
        low = [v[0] - v[1] if isinstance(v, tuple) else 0.0 for _, v in points]
        high = [v[2] - v[0] if isinstance(v, tuple) else 0.0 for _, v in points]
        drawn = ax.errorbar(xs, ys, yerr=[low, high], fmt="o--" if "healing" in label else "o-", label=label,
                            markersize=4, capsize=2, linewidth=1)  # fmt: skip
        if breaks and label in breaks:
            ax.axvline(breaks[label], color=drawn[0].get_color(), linestyle=":", linewidth=1, alpha=0.7)
    if line is not None:
        ax.axhline(line[0], color="grey", linestyle=":", label=line[1])
    ax.set_xlabel("fraction of layers removed")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def sensitivity_heatmap(grid: list[list[float]], tasks: list[str], title: str, path: str | Path) -> Path:
    """Layers down, tasks across: the relative harm of removing each single layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 0.5 + 0.18 * len(grid)), dpi=110)
    limit = max(float(np.nanmax(np.abs(values))), 1e-9)
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, origin="upper")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("layer removed")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="relative harm (+: worse)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def inference_bars(results: list[dict], path: str | Path) -> Path:
    """Side-by-side bars of size, peak memory and decode throughput for each benchmarked model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["model"]).name or r["model"] for r in results]
    panels = [
        ("parameters (M)", [r["parameters"] / 1e6 for r in results]),
        ("on-disk size (MB)", [r["disk_bytes"] / 2**20 for r in results]),
        ("peak memory (MB)", [r["peak_memory_mb"] for r in results]),
        ("decode tokens/s", [r["decode_tokens_per_s"]["median"] for r in results]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), dpi=110)
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
