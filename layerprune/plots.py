"""Figures: the angular-distance heatmap of the paper (its Figure 2 style)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .analysis import AnalysisResult


def angular_heatmap(result: AnalysisResult, path: str | Path) -> Path:
    """d(l, n) with the start layer l across and the block size n up; the best l per n is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    num_layers = result.num_layers
    grid = np.full((num_layers - 1, num_layers), np.nan)
    for n, row in result.angular.items():
        grid[n - 1, : len(row)] = row
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    image = ax.imshow(
        grid, origin="lower", aspect="auto", cmap="viridis_r", extent=(-0.5, num_layers - 0.5, 0.5, num_layers - 0.5)
    )
    best = result.best
    ax.plot([best[n] for n in best], list(best), "r.", markersize=5, label="smallest d for each n")
    ax.set_xlabel("start layer l")
    ax.set_ylabel("block size n (layers removed)")
    ax.set_title(f"Angular distance d(l, n): {Path(result.model).name or result.model}", fontsize=10)
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
