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


LABELS = {"accuracy": "training head", "voiceprint_accuracy": "voiceprint", "eer": "EER", "min_dcf": "minDCF",
          "degraded_eer_mean": "EER, degraded (mean of test-conditions)"}


def plot_curves(rows: list[dict[str, float]], path: Path, title: str = "",
                chance: float | None = None) -> None:
    """Accuracy (head and voiceprint), EER and minDCF, and epsilon against rounds; round 0
    is the starting model, drawn as a dotted line across each panel."""
    plt = pyplot()
    # the deployment's figures first; EER/minDCF zoomed to the data, where differences show
    panels = [(("eer", "min_dcf", "degraded_eer_mean"), "unseen-speaker EER, minDCF", None),
              (("voiceprint_accuracy", "accuracy"), "identification (voiceprint; training head)", (0, 1))]
    if any(not math.isnan(r.get("epsilon_max", math.nan)) for r in rows):
        panels.append((("epsilon_max", "epsilon_mean"), "client ε spent (max, mean)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    start = rows[0] if rows and rows[0]["round"] == 0 else None
    for ax, (keys, label, limits) in zip(axes, panels):
        for key in keys:
            values = [r.get(key, math.nan) for r in rows]
            if all(math.isnan(v) for v in values):
                continue
            line, = ax.plot([r["round"] for r in rows], values, marker="o", ms=3,
                            label=LABELS.get(key, key.replace("_", " ")))
            if start is not None and not math.isnan(start.get(key, math.nan)):
                ax.axhline(start[key], ls=":", c=line.get_color(), lw=1.2, label=f"{key.replace('_', ' ')}, round 0")
        if keys[1] == "accuracy" and chance:
            ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
        if limits:
            ax.set_ylim(*limits)
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
