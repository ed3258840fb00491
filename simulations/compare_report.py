"""What a comparison leaves: results.csv, report.md and PNG plots.

results.csv has a row per run; report.md aggregates over seeds (mean ± std), marks the
best value of each column within a partition and scenario, and ranks the strategies.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

from fedspeaker.reporting.plots import pyplot
from simulations.grid import CENTRAL, ComparisonGrid
from simulations.results import CellResult

COLUMNS = [f.name for f in fields(CellResult) if f.name != "rounds"]


def write_outputs(grid: ComparisonGrid, results: list[CellResult], out: Path, failed: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(results, out / "results.csv")
    (out / "report.md").write_text(report_markdown(grid, results, failed))
    if results:
        plot_strategy_curves(grid, results, out)
        plot_final_accuracy(grid, results, out / "final_accuracy.png")


def write_results_csv(results: list[CellResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in results:
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else
                             f"{v:.6g}" if isinstance(v, float) else v
                             for v in (getattr(r, c) for c in COLUMNS)])


@dataclass
class Summary:
    """One strategy in one partition/scenario, over its seeds."""

    strategy: str
    runs: list[CellResult]

    def values(self, column: str) -> list[float]:
        return [v for v in (float(getattr(r, column)) for r in self.runs) if not math.isnan(v)]

    def mean(self, column: str) -> float:
        values = self.values(column)
        return statistics.fmean(values) if values else math.nan

    def text(self, column: str, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
        values = [v * scale for v in self.values(column)]
        if not values:
            return "–"
        text = fmt.format(statistics.fmean(values))
        if len(values) > 1:
            text += " ± " + fmt.format(statistics.stdev(values))
        if len(values) < len(self.runs):
            text += f" ({len(values)}/{len(self.runs)} runs)"
        return text


# column, header, format, which is best (max/min/None), scale
TABLE = [
    ("final_accuracy", "final training head accuracy", "{:.3f}", max, 1.0),
    ("final_voiceprint_accuracy", "final voiceprint accuracy", "{:.3f}", max, 1.0),
    ("final_eer", "final EER", "{:.3f}", min, 1.0),
    ("final_min_dcf", "final minDCF", "{:.3f}", min, 1.0),
    ("final_degraded_eer", "final degraded EER (test-conditions' mean)", "{:.3f}", min, 1.0),
    ("released_eer", "released model's EER", "{:.3f}", min, 1.0),
    ("released_round", "released round", "{:.1f}", None, 1.0),
    ("best_accuracy", "best training head accuracy", "{:.3f}", max, 1.0),
    ("rounds_to_90pct_central", "rounds to 90 % of central", "{:.1f}", min, 1.0),
    ("upload_bytes", "MB uploaded", "{:.1f}", None, 1e-6),
    ("wall_seconds", "wall s", "{:.0f}", None, 1.0),
    ("max_epsilon", "max client ε", "{:.2f}", None, 1.0),
]


def groups(grid: ComparisonGrid, results: list[CellResult]) -> dict[tuple[str, str], list[Summary]]:
    """(partition, scenario) -> one Summary per strategy that has finished runs."""
    table: dict[tuple[str, str], list[Summary]] = {}
    for partition in grid.partitions:
        for scenario in grid.scenarios:
            summaries = [Summary(s, [r for r in results if (r.partition, r.scenario, r.strategy)
                                     == (partition, scenario, s)]) for s in grid.strategies]
            table[(partition, scenario)] = [s for s in summaries if s.runs]
    return table


def central_summary(results: list[CellResult], partition: str) -> Summary:
    return Summary(CENTRAL, [r for r in results if r.strategy == CENTRAL and r.partition == partition])


def report_markdown(grid: ComparisonGrid, results: list[CellResult], failed: list[str]) -> str:
    expected = len(grid.cells())
    lines = [f"# Comparison: {grid.name}", "", grid.description, "",
             f"{len(results)} of {expected} runs finished; seeds {', '.join(map(str, grid.seeds))}; "
             "mean ± std over seeds; **bold** is the best value of a column within its table "
             "(the central baseline is not ranked). Ratios divide by the same strategy under "
             f"the reference scenario `{grid.reference_scenario}`.", ""]
    if failed:
        lines += [f"Failed (re-run the same command to retry): {'; '.join(failed)}", ""]
    by_group = groups(grid, results)
    reference_accuracy = {(p, s.strategy): s.mean("final_accuracy")
                          for (p, scenario), summaries in by_group.items()
                          if scenario == grid.reference_scenario for s in summaries}
    for (partition, scenario), summaries in by_group.items():
        if not summaries:
            continue
        lines += [f"## {partition} / {scenario}", ""]
        header = ["strategy"] + [t[1] for t in TABLE] + [f"accuracy ÷ {grid.reference_scenario}"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        best = {column: pick(vals) for column, _, _, pick, _ in TABLE if pick
                for vals in [[s.mean(column) for s in summaries if not math.isnan(s.mean(column))]]
                if vals}
        for s in summaries:
            cells = [s.strategy]
            for column, _, fmt, _, scale in TABLE:
                text = s.text(column, fmt, scale)
                cells.append(f"**{text}**" if column in best and len(summaries) > 1
                             and s.mean(column) == best[column] else text)
            ref = reference_accuracy.get((partition, s.strategy), math.nan)
            cells.append(f"{s.mean('final_accuracy') / ref:.2f}" if ref and not math.isnan(ref) else "–")
            lines.append("| " + " | ".join(cells) + " |")
        start = Summary("start", [r for s in summaries for r in s.runs])
        lines.append("| *round 0: the starting model* | " + " | ".join(
            [start.text(f"start_{c.removeprefix('final_')}", fmt, scale)
             if c in ("final_accuracy", "final_voiceprint_accuracy", "final_eer", "final_degraded_eer") else "–"
             for c, _, fmt, _, scale in TABLE]) + " | – |")
        central = central_summary(results, partition)
        if central.runs:
            lines.append("| *central baseline* | " + " | ".join(
                [central.text(c, fmt, scale) if c in ("final_accuracy", "final_voiceprint_accuracy",
                                                           "final_eer", "final_min_dcf", "final_degraded_eer",
                                                           "best_accuracy",
                                                           "wall_seconds", "max_epsilon") else "–"
                 for c, _, fmt, _, scale in TABLE]) + " | – |")
        ranking = sorted(summaries, key=lambda s: -s.mean("final_accuracy"))
        lines += ["", "Ranking by final accuracy: " + ", ".join(
            f"{i}. {s.strategy} ({s.mean('final_accuracy'):.3f})" for i, s in enumerate(ranking, 1)), ""]
    lines += overall_ranking(by_group)
    return "\n".join(lines) + "\n"


def overall_ranking(by_group: dict[tuple[str, str], list[Summary]]) -> list[str]:
    """Mean rank by final accuracy over every partition/scenario a strategy ran in."""
    ranks: dict[str, list[int]] = {}
    for summaries in by_group.values():
        for rank, s in enumerate(sorted(summaries, key=lambda s: -s.mean("final_accuracy")), 1):
            ranks.setdefault(s.strategy, []).append(rank)
    if len(by_group) < 2 or not ranks:
        return []
    order = sorted(ranks, key=lambda name: statistics.fmean(ranks[name]))
    return ["## Overall", "", "Mean rank by final accuracy over all partitions and scenarios: "
            + ", ".join(f"{name} {statistics.fmean(ranks[name]):.1f}" for name in order), ""]


def plot_strategy_curves(grid: ComparisonGrid, results: list[CellResult], out: Path) -> None:
    """accuracy and EER against rounds, one figure per partition/scenario: a line per
    strategy (mean over seeds) with a band from the lowest to the highest seed."""
    plt = pyplot()
    for (partition, scenario), summaries in groups(grid, results).items():
        if not summaries:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, label in ((axes[0], "accuracy", "identification accuracy"),
                               (axes[1], "eer", "verification EER")):
            for s in summaries:
                _band(ax, [r.rounds for r in s.runs], key, s.strategy)
            central = central_summary(results, partition)
            if central.runs:
                ax.axhline(central.mean("final_accuracy" if key == "accuracy" else "final_eer"),
                           ls="--", c="gray", lw=1, label="central")
            ax.set_xlabel("round")
            ax.set_title(label)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{partition} / {scenario} ({len(grid.seeds)} seed(s): line = mean, band = range)")
        fig.tight_layout()
        fig.savefig(out / f"curves_{_safe(partition)}_{_safe(scenario)}.png", dpi=110)
        plt.close(fig)


def _band(ax, runs: list[list[dict[str, float]]], key: str, label: str) -> None:
    rounds = sorted({int(r["round"]) for rows in runs for r in rows})
    per_round = [[row[key] for rows in runs for row in rows if int(row["round"]) == n] for n in rounds]
    mean = [statistics.fmean(v) for v in per_round]
    line, = ax.plot(rounds, mean, label=label, lw=1.6)
    if len(runs) > 1:
        ax.fill_between(rounds, [min(v) for v in per_round], [max(v) for v in per_round],
                        color=line.get_color(), alpha=0.18, lw=0)


def plot_final_accuracy(grid: ComparisonGrid, results: list[CellResult], path: Path) -> None:
    """Grouped bars: final accuracy of each strategy under each scenario (attacks included),
    error bars = std over seeds; one panel per partition."""
    plt = pyplot()
    by_group = groups(grid, results)
    partitions = [p for p in grid.partitions if any(by_group[(p, s)] for s in grid.scenarios)]
    panel_width = max(6.0, 0.35 * len(grid.scenarios) * len(grid.strategies) + 1.5)
    fig, axes = plt.subplots(1, len(partitions), figsize=(panel_width * len(partitions), 4),
                             squeeze=False)
    width = 0.8 / len(grid.strategies)
    for ax, partition in zip(axes[0], partitions):
        for i, strategy in enumerate(grid.strategies):
            means, errors = [], []
            for scenario in grid.scenarios:
                s = next((s for s in by_group[(partition, scenario)] if s.strategy == strategy), None)
                values = s.values("final_accuracy") if s else []
                means.append(statistics.fmean(values) if values else 0.0)
                errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.bar([x + i * width for x in range(len(grid.scenarios))], means, width, yerr=errors,
                   capsize=2, label=strategy)
        central = central_summary(results, partition)
        if central.runs:
            ax.axhline(central.mean("final_accuracy"), ls="--", c="gray", lw=1, label="central")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(grid.scenarios))], list(grid.scenarios),
                      rotation=15)
        ax.set_ylabel("final identification accuracy")
        ax.set_title(partition)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)

