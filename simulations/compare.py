"""Run a comparison grid, cell by cell, resumably; then write its results and report.

Each cell is an ordinary run (the Simulation Engine, or the central baseline) with its
own folder under ``OUT/cells/``, holding the usual outputs plus ``cell.json``: the
exact run config and package versions it ran with. A cell whose ``summary.json``
exists and whose config is unchanged is not run again, so re-running the same
command after an interruption runs only what is missing.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from fedspeaker.config import RunSettings
from fedspeaker.errors import FedSpeakerError
from fedspeaker.report import read_rounds
from simulations.grid import CENTRAL, Cell, Grid

PACKAGES = ("torch", "torchaudio", "flwr", "flwr-datasets", "opacus", "numpy", "soundfile")
Runner = Callable[[Cell, RunSettings, Callable[[str], None]], Any]


@dataclass
class CellResult:
    """One row of results.csv."""

    strategy: str
    partition: str
    scenario: str
    seed: int
    final_accuracy: float
    final_eer: float
    best_accuracy: float
    best_round: int
    rounds_to_90pct_central: float  # NaN: never reached, or no central baseline
    upload_bytes: int
    wall_seconds: float  # the whole cell, start-up of Flower and Ray included
    max_epsilon: float  # NaN: no DP
    rounds: list[dict[str, float]]  # the cell's rounds.csv, for the plots; not a column

    @property
    def cell(self) -> Cell:
        return Cell(self.strategy, self.partition, self.scenario, self.seed)


def default_runner(cell: Cell, settings: RunSettings, on_round: Callable[[str], None]) -> None:
    """The central baseline in this process; a federation through the Simulation Engine."""
    from simulations.central import run_central
    from simulations.launch import run_federation

    (run_central if cell.strategy == CENTRAL else run_federation)(settings, on_round=on_round)


def run_grid(grid: Grid, out: Path, overrides: dict[str, Any] | None = None,
             runner: Runner = default_runner, show: Callable[[str], None] = print) -> list[CellResult]:
    """Run every missing cell, then (re)write results.csv, report.md and the plots."""
    from simulations.compare_report import write_outputs

    overrides = overrides or {}
    cells = grid.cells()
    planned = [(cell, grid.settings(cell, overrides, cell_dir(out, cell))) for cell in cells]
    versions = package_versions()
    failed: list[str] = []
    for number, (cell, settings) in enumerate(planned, 1):
        tag = f"[{number}/{len(cells)}]"
        folder = settings.out_dir_path
        if is_done(folder, settings):
            show(f"{tag} {cell.label}: done earlier, kept")
            continue
        show(f"{tag} {cell.label}: running")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").unlink(missing_ok=True)
        record = {"cell": asdict(cell), "grid": grid.name, "run_config": settings.to_run_config(),
                  "versions": versions, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (folder / "cell.json").write_text(json.dumps(record, indent=2) + "\n")
        started = time.monotonic()
        try:
            runner(cell, settings,
                   lambda line, tag=tag, rounds=settings.rounds: show(f"{tag} {_of_rounds(line, rounds)}"))
        except FedSpeakerError as exc:  # one broken cell must not cost the others
            failed.append(cell.label)
            show(f"{tag} {cell.label}: FAILED: {exc}")
            continue
        record["seconds"] = round(time.monotonic() - started, 2)  # start-up included
        (folder / "cell.json").write_text(json.dumps(record, indent=2) + "\n")
    results = collect_results(grid, out)
    write_outputs(grid, results, out, failed)
    if failed:
        raise FedSpeakerError(f"{len(failed)} of {len(cells)} cell(s) failed: {'; '.join(failed)}. "
                              f"The others are in {out}; re-run the same command to retry them")
    return results


def cell_dir(out: Path, cell: Cell) -> Path:
    """Where a comparison in ``out`` keeps one cell's run."""
    return out / "cells" / cell.key


def is_done(folder: Path, settings: RunSettings) -> bool:
    """Finished with exactly these settings (a changed grid or --set runs it again).

    An option added to fedspeaker after the cell ran counts as its default; cells copied
    from another comparison's folder are reused.
    """
    try:
        recorded = json.loads((folder / "cell.json").read_text())["run_config"]
    except (OSError, ValueError, KeyError):
        return False
    def comparable(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k != "out-dir"}  # cells may be moved or copied

    return ((folder / "summary.json").exists() and comparable(
        {**RunSettings().to_run_config(), **recorded}) == comparable(settings.to_run_config()))


def collect_results(grid: Grid, out: Path) -> list[CellResult]:
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
        reached = [r["round"] for r in rows if r["accuracy"] >= target] if cell.strategy != CENTRAL else []
        eps = [r["epsilon_max"] for r in rows if not math.isnan(r.get("epsilon_max", math.nan))]
        results.append(CellResult(
            strategy=cell.strategy, partition=cell.partition, scenario=cell.scenario, seed=cell.seed,
            final_accuracy=summary["final"]["accuracy"], final_eer=summary["final"]["eer"],
            best_accuracy=summary["best_accuracy"], best_round=int(summary["best_round"]),
            rounds_to_90pct_central=reached[0] if reached else math.nan,
            upload_bytes=int(sum(r.get("upload_bytes", 0.0) for r in rows
                                 if not math.isnan(r.get("upload_bytes", math.nan)))),
            wall_seconds=summary["wall_seconds"],
            max_epsilon=max(eps) if eps else math.nan,
            rounds=rows,
        ))
    return results


def package_versions() -> dict[str, str]:
    """What a cell ran with: Python, platform, the packages that shape results, the commit."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        versions["fedspeaker-commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        versions["fedspeaker-commit"] = "unknown"
    return versions


def _of_rounds(line: str, rounds: int) -> str:
    """'round   3  ...' -> 'round 3/15  ...', so the display says how far the cell is."""
    return re.sub(r"^round\s+(\d+)", lambda m: f"round {m[1]}/{rounds}", line)
