"""Privacy against utility: the same federation at several privacy levels, audited.

A privacy sweep is a comparison grid (simulations/compare.py: same shards, seeds and
initial model in every cell, resumable) whose scenarios are privacy levels: no DP,
sample-level DP at each target epsilon, device-level DP at each noise multiplier. Each
cell's global model is then attacked (simulations/audit.py) and the results are
written as privacy.csv, privacy.md and privacy.png.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fedspeaker.privacy.audit import AuditResult, audit_run
from fedspeaker.reporting.plots import pyplot
from simulations.compare import run_grid
from simulations.grid import ComparisonGrid
from simulations.results import CellResult, cell_dir

NON_PRIVATE = "no-dp"


def sweep_grid(epsilons: list[float], device_noises: list[float], seeds: list[int],
               options: dict[str, Any] | None = None) -> ComparisonGrid:
    scenarios: dict[str, dict[str, Any]] = {NON_PRIVATE: {"dp": False}}
    scenarios |= {f"epsilon-{e:g}": {"dp": True, "epsilon": e} for e in epsilons}
    scenarios |= {f"device-noise-{z:g}": {"dp": False, "device-dp": "server-fixed",
                                          "device-noise-multiplier": z} for z in device_noises}
    return ComparisonGrid(name="privacy-sweep",
                description="FedAvg without DP, with sample-level DP-SGD at each target epsilon, "
                            "and with device-level DP (Flower's server-side fixed clipping) at each "
                            "noise multiplier",
                strategies=["fedavg"], seeds=seeds, central=False,
                # the audit attacks the model whose (final-round) figures the sweep reports
                options={"release": "last", **(options or {})},
                partitions={"default": {}}, scenarios=scenarios)


def run_sweep(grid: ComparisonGrid, out: Path, overrides: dict[str, Any] | None = None,
              show: Callable[[str], None] = print) -> list[dict[str, Any]]:
    _adopt_renamed_cells(grid, out, show)
    results = run_grid(grid, out, overrides, show=show)
    rows = []
    for r in results:
        show(f"auditing {r.scenario} seed {r.seed}")
        audit = audit_run(cell_dir(out, r.cell) / "global_model.pt")
        rows.append(_row(r, audit))
    write_privacy_outputs(grid, rows, out)
    return rows


def _adopt_renamed_cells(grid: ComparisonGrid, out: Path, show: Callable[[str], None]) -> None:
    """A sweep run before device-level DP had one name kept its cells as user-noise-Z: move
    them to device-noise-Z, so that the same sweep resumes instead of running them again."""
    for cell in grid.cells():
        old = cell_dir(out, replace(cell, scenario=cell.scenario.replace("device-noise-", "user-noise-", 1)))
        new = cell_dir(out, cell)
        if old != new and old.is_dir() and not new.exists():
            old.rename(new)
            show(f"{old.name}: renamed {new.name}")


def _row(r: CellResult, audit: AuditResult) -> dict[str, Any]:
    device_eps = r.rounds[-1].get("device_epsilon", math.nan) if r.rounds else math.nan
    return {"scenario": r.scenario, "seed": r.seed, "sample_epsilon": r.max_epsilon,
            "device_epsilon": device_eps, "accuracy": r.final_accuracy, "eer": r.final_eer,
            "loss_attack_auc": audit.loss_auc, "enrolment_attack_auc": audit.enrolment_auc,
            "members": audit.members, "nonmembers": audit.nonmembers}


def write_privacy_outputs(grid: ComparisonGrid, rows: list[dict[str, Any]], out: Path) -> None:
    with open(out / "privacy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {s: _means([r for r in rows if r["scenario"] == s]) for s in grid.scenarios
               if any(r["scenario"] == s for r in rows)}
    (out / "privacy.md").write_text(privacy_markdown(grid, summary))
    plot_privacy(summary, out / "privacy.png")


def null_auc_stderr(members: float, nonmembers: float) -> float:
    """Standard error of the AUC when members and non-members are exchangeable."""
    return math.sqrt((members + nonmembers + 1) / (12 * members * nonmembers))


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("sample_epsilon", "device_epsilon", "accuracy", "eer", "loss_attack_auc", "enrolment_attack_auc",
            "members", "nonmembers")
    return {k: statistics.fmean(r[k] for r in rows) for k in keys} | {"runs": len(rows)}


def privacy_markdown(grid: ComparisonGrid, summary: dict[str, dict[str, float]]) -> str:
    base = summary.get(NON_PRIVATE)
    lines = ["# Privacy sweep", "", grid.description + ".", "",
             f"Seeds {', '.join(map(str, grid.seeds))} (means shown). Membership inference: members "
             "are the utterances clients trained on, non-members held-out utterances of the same "
             "speakers; AUC 0.5 means the attacker cannot tell them apart.", "",
             "| privacy | sample-level ε (max client) | device-level ε | accuracy | ÷ no DP | EER "
             "| loss-attack AUC | enrolment-attack AUC |", "|---|---|---|---|---|---|---|---|"]
    for name, m in summary.items():
        ratio = f"{m['accuracy'] / base['accuracy']:.2f}" if base and base["accuracy"] else "–"
        lines.append(f"| {name} | {_num(m['sample_epsilon'])} | {_num(m['device_epsilon'])} | "
                     f"{m['accuracy']:.3f} | {ratio} | {m['eer']:.3f} | {m['loss_attack_auc']:.3f} | "
                     f"{m['enrolment_attack_auc']:.3f} |")
    if base:
        noise = null_auc_stderr(base["members"], base["nonmembers"])
        lines += ["", f"Under no leakage an AUC on these {base['members']:.0f} members and "
                  f"{base['nonmembers']:.0f} non-members varies by about ±{noise:.3f} (one standard "
                  "error); gaps smaller than twice that are noise."]
        for attack in ("loss_attack_auc", "enrolment_attack_auc"):
            if abs(base[attack] - 0.5) < 2 * noise:
                lines.append(f"- Without DP the {attack.replace('_', ' ')} is {base[attack]:.3f}, "
                             "within noise of 0.5: this attack finds no measurable leakage for DP "
                             "to remove here.")
        for name, m in summary.items():
            if name == NON_PRIVATE:
                continue
            for attack in ("loss_attack_auc", "enrolment_attack_auc"):
                gap = base[attack] - 0.5
                moved = (base[attack] - m[attack]) / gap if abs(gap) > 1e-9 else math.nan
                lines.append(f"- {name}: {attack.replace('_', ' ')} {base[attack]:.3f} → "
                             f"{m[attack]:.3f}" + (f" ({moved:.0%} of the way to 0.5)"
                                                   if not math.isnan(moved) else ""))
    return "\n".join(lines) + "\n"


def plot_privacy(summary: dict[str, dict[str, float]], path: Path) -> None:
    plt = pyplot()

    sample = sorted((m["sample_epsilon"], m) for name, m in summary.items() if name.startswith("epsilon-"))
    device = sorted((m["device_epsilon"], m) for name, m in summary.items()
                    if name.startswith("device-") and not math.isnan(m["device_epsilon"]))
    base = summary.get(NON_PRIVATE)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "accuracy", "identification accuracy"),
                           (axes[1], "eer", "verification EER"),
                           (axes[2], "loss_attack_auc", "membership attack AUC (loss)")):
        for points, marker, name in ((sample, "o", "sample-level DP-SGD"), (device, "s", "device-level DP")):
            if points:
                ax.plot([e for e, _ in points], [m[key] for _, m in points], marker=marker, label=name)
        if base:
            ax.axhline(base[key], ls="--", c="gray", lw=1, label="no DP")
        if key == "loss_attack_auc":
            ax.axhline(0.5, ls=":", c="black", lw=1, label="chance")
            values = [m[key] for m in summary.values()]
            ax.set_ylim(min(0.4, *values) - 0.02, max(0.7, *values) + 0.02)  # show the scale of 0.5..1
        ax.set_xscale("log")
        ax.set_xlabel("ε spent (log scale)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"
