"""A comparison's results: one row per finished cell, read back from the cells' folders."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedspeaker.reporting.run_report import read_rounds
from simulations.grid import CENTRAL, Cell, ComparisonGrid


@dataclass
class CellResult:
    """One row of results.csv."""

    strategy: str
    partition: str
    scenario: str
    seed: int
    start_accuracy: float  # round 0: the starting (pretrained) model, before any round
    start_voiceprint_accuracy: float
    start_eer: float
    final_accuracy: float
    final_voiceprint_accuracy: float
    final_eer: float
    final_min_dcf: float
    # the model the run saved (release=best: the best round by validation, round 0 included)
    released_round: float
    released_voiceprint_accuracy: float
    released_eer: float
    best_accuracy: float
    best_round: int
    rounds_to_90pct_central: float  # NaN: never reached, or no central baseline
    upload_bytes: int
    wall_seconds: float  # the whole cell, start-up of Flower and Ray included
    max_epsilon: float  # NaN: no DP
    # test-conditions: the mean EER over the degraded conditions (NaN: none scored)
    start_degraded_eer: float
    final_degraded_eer: float
    rounds: list[dict[str, float]]  # the cell's rounds.csv, for the plots; not a column

    @property
    def cell(self) -> Cell:
        return Cell(self.strategy, self.partition, self.scenario, self.seed)


def cell_dir(out: Path, cell: Cell) -> Path:
    """Where a comparison in ``out`` keeps one cell's run."""
    return out / "cells" / cell.key


def collect_results(grid: ComparisonGrid, out: Path) -> list[CellResult]:
    """A row per finished cell of the grid, in grid order."""
    finished = {}
    for cell in grid.cells():
        folder = cell_dir(out, cell)
        if (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
            record = json.loads((folder / "cell.json").read_text())
            summary["wall_seconds"] = record.get("seconds", summary["wall_seconds"])
            finished[cell] = (summary, read_rounds(folder / "rounds.csv"))
    central_accuracy = {(c.partition, c.seed): summary["final"]["accuracy"]
                        for c, (summary, _) in finished.items() if c.strategy == CENTRAL}
    results = []
    for cell, (summary, rows) in finished.items():
        target = 0.9 * central_accuracy.get((cell.partition, cell.seed), math.nan)
        reached = ([r["round"] for r in rows if r["round"] > 0 and r["accuracy"] >= target]
                   if cell.strategy != CENTRAL else [])
        eps = [r["epsilon_max"] for r in rows if not math.isnan(r.get("epsilon_max", math.nan))]
        results.append(CellResult(
            strategy=cell.strategy, partition=cell.partition, scenario=cell.scenario, seed=cell.seed,
            start_accuracy=_number(summary.get("start", {}).get("accuracy")),
            start_voiceprint_accuracy=_number(summary.get("start", {}).get("voiceprint_accuracy")),
            start_eer=_number(summary.get("start", {}).get("eer")),
            final_accuracy=summary["final"]["accuracy"],
            final_voiceprint_accuracy=_number(summary["final"].get("voiceprint_accuracy")),
            final_eer=summary["final"]["eer"], final_min_dcf=_number(summary["final"].get("min_dcf")),
            released_round=_number(summary.get("released", {}).get("round")),
            released_voiceprint_accuracy=_number(summary.get("released", {}).get("voiceprint_accuracy")),
            released_eer=_number(summary.get("released", {}).get("eer")),
            best_accuracy=summary["best_accuracy"], best_round=int(summary["best_round"]),
            rounds_to_90pct_central=reached[0] if reached else math.nan,
            upload_bytes=int(sum(r.get("upload_bytes", 0.0) for r in rows
                                 if not math.isnan(r.get("upload_bytes", math.nan)))),
            wall_seconds=summary["wall_seconds"],
            max_epsilon=max(eps) if eps else math.nan,
            start_degraded_eer=_number(summary.get("start", {}).get("degraded_eer_mean")),
            final_degraded_eer=_number(summary["final"].get("degraded_eer_mean")),
            rounds=rows,
        ))
    return results


def _number(value: float | None) -> float:
    """A figure from summary.json; NaN where a run made before it existed has none."""
    return math.nan if value is None else float(value)
