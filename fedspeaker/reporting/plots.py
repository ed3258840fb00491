"""Plots of a run's rounds; matplotlib set up once for every plot fedspeaker draws."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no screen), imported when needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, float]], path: Path, title: str = "",
                chance: float | None = None) -> None:
    plt = pyplot()
    panels = [("accuracy", "identification accuracy", (0, 1)), ("eer", "verification EER", (0, 0.5))]
    if any(not math.isnan(r.get("epsilon_max", math.nan)) for r in rows):
        panels.append(("epsilon_max", "client ε spent (max, mean)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    x = [r["round"] for r in rows]
    for ax, (key, label, limits) in zip(axes, panels):
        ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=key.replace("_", " "))
        if key == "accuracy" and chance:
            ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
            ax.legend()
        if key == "epsilon_max":
            ax.plot(x, [r["epsilon_mean"] for r in rows], marker="o", ms=3, label="epsilon mean")
            ax.legend()
        if limits:
            ax.set_ylim(*limits)
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
