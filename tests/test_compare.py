"""The comparison harness: grids, resume, results and report, with a stand-in runner.

The runner here writes what a run writes (rounds.csv, summary.json) with figures made
from the cell, so the harness's own logic is tested without starting federations;
tests/test_e2e.py runs a real grid through the Simulation Engine.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedspeaker import config
from fedspeaker.config import RunSettings
from fedspeaker.errors import ConfigError, FedSpeakerError
from fedspeaker.reporting.run_report import RunReport
from simulations.compare import collect_results, run_grid, time_left
from simulations.grid import CENTRAL, GRIDS_DIR, Cell, ComparisonGrid

STRATEGY_SKILL = {CENTRAL: 0.80, "fedavg": 0.60, "fedmedian": 0.50}


def small_grid(**changes) -> ComparisonGrid:
    grid = ComparisonGrid(name="t", description="test grid", strategies=["fedavg", "fedmedian"], seeds=[0, 1],
                options={"dp": False, "rounds": 4, "num-clients": 4},
                partitions={"iid": {"partition": "iid"}},
                scenarios={"clean": {}, "attack": {"byzantine-fraction": 0.25}})
    return ComparisonGrid(**{**grid.__dict__, **changes})


class FakeRunner:
    """Accuracy rises linearly to the strategy's skill, lower under attack, per seed."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.ran: list[Cell] = []
        self.fail = fail

    def __call__(self, cell: Cell, settings: RunSettings, on_round) -> None:
        self.ran.append(cell)
        if cell.label in self.fail:
            raise FedSpeakerError("the federation did not finish")
        final = STRATEGY_SKILL[cell.strategy] - 0.2 * settings.byzantine_fraction - 0.01 * cell.seed
        report = RunReport(settings.out_dir_path)
        for n in range(1, settings.rounds + 1):
            report.add_round({"round": n, "accuracy": final * n / settings.rounds, "eer": 0.3,
                              "upload_bytes": 1000.0 * settings.num_clients, "clients": 4})
            on_round(f"round {n:3d}  accuracy {final * n / settings.rounds:.3f}")
        (settings.out_dir_path / "summary.json").write_text(json.dumps({
            "final": {"accuracy": final, "eer": 0.3}, "best_accuracy": final,
            "released": {"round": 0 if settings.byzantine_fraction else settings.rounds, "eer": 0.25},
            "best_round": settings.rounds, "wall_seconds": 10.0}))


def test_every_shipped_grid_loads_and_every_cell_is_valid(tmp_path: Path) -> None:
    names = sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))
    assert {"default", "robust", "strategies", "attacks", "realistic", "smoke", "default-tdnn"} <= set(names)
    for name in names:
        grid = ComparisonGrid.load(name)
        for cell in grid.cells():
            settings = grid.settings(cell, {}, tmp_path / cell.key)  # raises on a bad option
            # the model people use, unless the grid's name says it is the TDNN's
            assert settings.model == ("tdnn" if "tdnn" in name else "ge2e"), (name, cell.label)


@pytest.mark.parametrize("name", ["default", "default-tdnn"])
def test_cells_of_one_seed_share_shards_model_and_roles(tmp_path: Path, name: str) -> None:
    grid = ComparisonGrid.load(name)
    by_seed: dict[int, set] = {}
    for cell in grid.cells():
        s = grid.settings(cell, {}, tmp_path)
        # what decides the split, shards, initial model and which clients attack or drop
        by_seed.setdefault(cell.seed, set()).add((s.seed, s.partition, s.alpha, s.num_clients,
                                                  s.channels, s.embedding_dim, s.unseen_speakers))
    assert len(by_seed) == len(grid.seeds) and all(len(v) == 1 for v in by_seed.values())
    central = [c for c in grid.cells() if c.strategy == CENTRAL]
    assert grid.cells()[: len(central)] == central  # baselines first
    assert len(grid.cells()) == len(grid.seeds) * (1 + len(grid.strategies) * len(grid.scenarios))


def test_command_line_options_reach_every_cell_but_not_strategy_or_seed(tmp_path: Path) -> None:
    grid = small_grid()
    cell = Cell("fedmedian", "iid", "attack", 1)
    s = grid.settings(cell, {"rounds": "7", "lr": "0.05"}, tmp_path)
    assert (s.rounds, s.lr, s.strategy, s.seed, s.byzantine_fraction) == (7, 0.05, "fedmedian", 1, 0.25)


def test_a_grid_layer_may_use_an_old_option_name_and_a_later_layer_still_wins(tmp_path: Path) -> None:
    grid = small_grid(options={"dp": False, "rounds": 4, "num-clients": 4, "user-dp": "server-fixed"},
                      scenarios={"clean": {}, "off": {"device-dp": "off"}})
    config._warn_once.cache_clear()  # another test may have said it already
    with pytest.warns(FutureWarning, match="'user-dp' is deprecated"):
        assert grid.settings(Cell("fedavg", "iid", "clean", 0), {}, tmp_path).device_dp == "server-fixed"
    assert grid.settings(Cell("fedavg", "iid", "off", 0), {}, tmp_path).device_dp == "off"
    overridden = grid.settings(Cell("fedavg", "iid", "clean", 0), {"device-dp": "client-fixed"}, tmp_path)
    assert overridden.device_dp == "client-fixed"


@pytest.mark.parametrize("text, message", [
    ('strategies = ["fedsgd"]', "cell .*fedsgd.*strategy must be one of fedavg"),
    ('strategies = ["fedavg"]\ncolour = "red"', "unknown key"),
    ('strategies = ["fedavg"]\n[scenarios]\nbad = { dropout = 2.0 }', "cell .*bad.*dropout must be in"),
    ('strategies = ["fedavg"]\n[scenarios]\nx = { seed = 3 }', "may not set strategy, seed"),
    ('strategies = [', "not valid TOML"),
])
def test_bad_grid_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        grid = ComparisonGrid.load(str(path))
        for cell in grid.cells():
            grid.settings(cell, {}, tmp_path)


def test_unknown_grid_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="default.*robust|robust.*default"):
        ComparisonGrid.load("no-such-grid")


def test_resume_runs_only_missing_or_changed_cells(tmp_path: Path) -> None:
    grid, out = small_grid(), tmp_path / "cmp"
    first = FakeRunner()
    run_grid(grid, out, runner=first, show=lambda line: None)
    assert len(first.ran) == len(grid.cells()) == 2 + 2 * 2 * 2

    again = FakeRunner()
    run_grid(grid, out, runner=again, show=lambda line: None)
    assert again.ran == []

    lost = grid.cells()[5]
    (out / "cells" / lost.key / "summary.json").unlink()  # interrupted mid-cell
    resumed = FakeRunner()
    run_grid(grid, out, runner=resumed, show=lambda line: None)
    assert resumed.ran == [lost]

    older = out / "cells" / grid.cells()[0].key / "cell.json"  # ran before an option existed
    record = json.loads(older.read_text())
    del record["run_config"]["min-train-nodes"]
    older.write_text(json.dumps(record))
    kept = FakeRunner()
    run_grid(grid, out, runner=kept, show=lambda line: None)
    assert kept.ran == []  # a missing option counts as its default

    changed = FakeRunner()
    run_grid(grid, out, {"rounds": "5"}, runner=changed, show=lambda line: None)
    assert len(changed.ran) == len(grid.cells())  # other settings: nothing is reused


def test_each_cell_records_its_config_and_package_versions(tmp_path: Path) -> None:
    grid = small_grid()
    run_grid(grid, tmp_path, runner=FakeRunner(), show=lambda line: None)
    cell = Cell("fedavg", "iid", "attack", 1)
    recorded = json.loads((tmp_path / "cells" / cell.key / "cell.json").read_text())
    assert recorded["run_config"] == grid.settings(cell, {}, tmp_path / "cells" / cell.key).to_run_config()
    assert recorded["cell"] == {"strategy": "fedavg", "partition": "iid", "scenario": "attack", "seed": 1}
    for package in ("python", "torch", "flwr", "opacus", "flwr-datasets"):
        assert recorded["versions"][package] not in ("", "not installed"), package


def test_results_and_report_have_one_row_per_cell(tmp_path: Path) -> None:
    grid = small_grid()
    lines: list[str] = []
    run_grid(grid, tmp_path, runner=FakeRunner(), show=lines.append)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == len(grid.cells())
    assert {"strategy", "partition", "scenario", "seed", "final_accuracy", "final_eer", "best_round",
            "rounds_to_90pct_central", "upload_bytes", "wall_seconds", "max_epsilon"} <= set(rows[0])
    row = next(r for r in rows if (r["strategy"], r["scenario"], r["seed"]) == ("fedavg", "clean", "0"))
    assert float(row["final_accuracy"]) == pytest.approx(0.60)
    assert float(row["upload_bytes"]) == 4 * 4000  # 4 rounds x 4 clients x 1000 bytes
    # central 0.80, so 90 % is 0.72: fedavg (0.60 at most) never gets there
    assert row["rounds_to_90pct_central"] == ""
    assert (row["released_round"], row["released_eer"]) == ("4", "0.25")
    # `tensorboard --logdir <comparison>` finds one run per cell, named by its folder
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    board.Reload()
    assert sorted(board.Runs()) == sorted(f"cells/{c.key}/tensorboard" for c in grid.cells())
    run = "cells/iid__clean__fedavg__seed0/tensorboard"
    accuracy = board.Scalars(run, "identification/accuracy")
    assert [round(e.value, 3) for e in accuracy] == [0.15, 0.3, 0.45, 0.6]

    report = (tmp_path / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| fed")]
    assert len(table_rows) == len(grid.strategies) * len(grid.scenarios)
    assert report.count("| *central baseline*") == len(grid.scenarios)
    # fedavg beats fedmedian in both scenarios: its mean accuracy is the bold one
    assert "| fedavg | **0.595 ± 0.007**" in report
    assert "1. fedavg (0.595), 2. fedmedian (0.495)" in report
    assert "| fedavg | **0.545 ± 0.007**" in report and "| 0.92 |" in report  # 0.545 / 0.595
    for name in ("curves_iid_clean.png", "curves_iid_attack.png", "final_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert any(line.startswith("[9/10] round 4/4") for line in lines)  # progress: cell and round
    # and how much is left: after the 9th cell, one more at the mean time of those run
    assert any(line.startswith("[9/10]") and "9 of 10 cells done, about" in line for line in lines)
    assert lines[-1].endswith("10 of 10 cells done, about 0 s left")


def test_time_left_counts_the_cells_still_to_run_at_the_mean_time_so_far(tmp_path: Path) -> None:
    grid = small_grid()
    rest = [grid.settings(cell, {}, tmp_path / cell.key) for cell in grid.cells()[-2:]]
    assert time_left([60.0, 120.0], rest, 10) == "8 of 10 cells done, about 3 min left"
    assert time_left([3000.0, 3000.0], rest * 2, 10) == "6 of 10 cells done, about 3.3 h left"


def test_rounds_to_90_percent_of_central(tmp_path: Path) -> None:
    grid = small_grid(strategies=["fedavg"], seeds=[0], scenarios={"clean": {}})
    STRATEGY_SKILL["fedavg"] = 0.78  # 90 % of 0.80 is 0.72: reached at round 4 of 0.195 a round
    try:
        run_grid(grid, tmp_path, runner=FakeRunner(), show=lambda line: None)
    finally:
        STRATEGY_SKILL["fedavg"] = 0.60
    (result,) = [r for r in collect_results(grid, tmp_path) if r.strategy == "fedavg"]
    assert result.rounds_to_90pct_central == 4
    assert math.isnan(result.max_epsilon)


def test_a_failed_cell_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    grid = small_grid()
    broken = Cell("fedmedian", "iid", "clean", 0)
    runner = FakeRunner(fail={broken.label})
    with pytest.raises(FedSpeakerError, match="1 of 10 cell\\(s\\) failed.*fedmedian"):
        run_grid(grid, tmp_path, runner=runner, show=lambda line: None)
    assert len(runner.ran) == len(grid.cells())
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == len(grid.cells()) - 1
    assert "Failed" in (tmp_path / "report.md").read_text()
    retry = FakeRunner()
    run_grid(grid, tmp_path, runner=retry, show=lambda line: None)
    assert retry.ran == [broken]
