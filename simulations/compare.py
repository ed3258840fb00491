"""Run a comparison grid, cell by cell, resumably; then write its results and report.

Each cell is an ordinary run (the Simulation Engine, or the central baseline) with its
own folder under ``OUT/cells/``, holding the usual outputs plus ``cell.json``: the
exact run config and package versions it ran with. A cell whose ``summary.json``
exists and whose config is unchanged is not run again, so re-running the same
command after an interruption runs only what is missing.
"""

from __future__ import annotations

import json
import platform
import re
import time
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from fedspeaker.config import RunSettings, saved_run_config
from fedspeaker.errors import FedSpeakerError
from simulations.central import run_central
from simulations.compare_report import write_outputs
from simulations.grid import CENTRAL, Cell, ComparisonGrid
from simulations.launch import run_federation
from simulations.results import CellResult, cell_dir, collect_results

PACKAGES = ("torch", "torchaudio", "flwr", "flwr-datasets", "opacus", "numpy", "soundfile")
Runner = Callable[[Cell, RunSettings, Callable[[str], None]], Any]


def default_runner(cell: Cell, settings: RunSettings, on_round: Callable[[str], None]) -> None:
    """The central baseline in this process; a federation through the Simulation Engine."""
    (run_central if cell.strategy == CENTRAL else run_federation)(settings, on_round=on_round)


def run_grid(grid: ComparisonGrid, out: Path, overrides: dict[str, Any] | None = None,
             runner: Runner = default_runner, show: Callable[[str], None] = print) -> list[CellResult]:
    """Run every missing cell, then (re)write results.csv, report.md and the plots."""
    overrides = overrides or {}
    cells = grid.cells()
    planned = [(cell, grid.settings(cell, overrides, cell_dir(out, cell))) for cell in cells]
    versions = package_versions()
    failed: list[str] = []
    took: list[float] = []  # seconds of each cell run by this command, for the time left
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
        took.append(record["seconds"])
        show(f"{tag} {cell.label}: done in {record['seconds']:.0f} s; "
             + time_left(took, [s for _, s in planned[number:]], len(cells)))
    results = collect_results(grid, out)
    write_outputs(grid, results, out, failed)
    if failed:
        raise FedSpeakerError(f"{len(failed)} of {len(cells)} cell(s) failed: {'; '.join(failed)}. "
                              f"The others are in {out}; re-run the same command to retry them")
    return results


def time_left(took: list[float], rest: list[RunSettings], total: int) -> str:
    """'7 of 9 cells done, about 3 min left': the cells still to run at the mean time of
    those this command ran."""
    todo = sum(1 for settings in rest if not is_done(settings.out_dir_path, settings))
    left = todo * sum(took) / len(took)
    return f"{total - todo} of {total} cells done, about {_duration(left)} left"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 \
        else f"{seconds:.0f} s"


def is_done(folder: Path, settings: RunSettings) -> bool:
    """Finished with exactly these settings (a changed grid or --set runs it again).

    An option added to fedspeaker after the cell ran counts as what the cell ran with; cells copied
    from another comparison's folder are reused.
    """
    try:
        recorded = json.loads((folder / "cell.json").read_text())["run_config"]
    except (OSError, ValueError, KeyError):
        return False
    def comparable(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k != "out-dir"}  # cells may be moved or copied

    return ((folder / "summary.json").exists() and comparable(
        saved_run_config(recorded)) == comparable(settings.to_run_config()))


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
