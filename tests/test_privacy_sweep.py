"""The privacy sweep's grid and report, without starting federations."""

from __future__ import annotations

import math
from pathlib import Path


from simulations.privacy_sweep import (NON_PRIVATE, _adopt_renamed_cells, privacy_markdown, sweep_grid,
                                       write_privacy_outputs)
from simulations.results import cell_dir


def test_sweep_grid_has_one_scenario_per_privacy_level(tmp_path: Path) -> None:
    grid = sweep_grid([1.0, 8.0], [2.0], seeds=[0, 1])
    assert list(grid.scenarios) == [NON_PRIVATE, "epsilon-1", "epsilon-8", "device-noise-2"]
    assert grid.reference_scenario == NON_PRIVATE and not grid.central
    settings = {c.scenario: grid.settings(c, {"rounds": 3}, tmp_path) for c in grid.cells() if c.seed == 0}
    assert not settings[NON_PRIVATE].dp and settings[NON_PRIVATE].device_dp == "off"
    assert settings["epsilon-8"].dp and settings["epsilon-8"].epsilon == 8.0
    assert settings["device-noise-2"].device_dp == "server-fixed" and not settings["device-noise-2"].dp
    assert {s.rounds for s in settings.values()} == {3}
    assert len(grid.cells()) == 8


def test_a_sweep_from_before_the_rename_keeps_its_device_level_cells(tmp_path: Path) -> None:
    """Its cells were user-noise-Z: they move to device-noise-Z, so the sweep resumes them."""
    grid = sweep_grid([8.0], [2.0], seeds=[0])
    cell = next(c for c in grid.cells() if c.scenario == "device-noise-2")
    old = tmp_path / "cells" / cell.key.replace("device-noise-2", "user-noise-2")
    old.mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    said: list[str] = []
    _adopt_renamed_cells(grid, tmp_path, said.append)
    assert (cell_dir(tmp_path, cell) / "summary.json").exists() and not old.exists()
    assert said == [f"{old.name}: renamed {cell.key}"]
    _adopt_renamed_cells(grid, tmp_path, said.append)  # nothing left to move
    assert len(said) == 1


def row(scenario: str, seed: int, acc: float, auc: float, eps: float = math.nan,
        device_eps: float = math.nan) -> dict:
    return {"scenario": scenario, "seed": seed, "sample_epsilon": eps, "device_epsilon": device_eps,
            "accuracy": acc, "eer": 0.3, "loss_attack_auc": auc, "enrolment_attack_auc": 0.5,
            "members": 10, "nonmembers": 5}


def test_report_states_utility_and_how_far_dp_moved_the_attack(tmp_path: Path) -> None:
    grid = sweep_grid([8.0], [4.0], seeds=[0, 1])
    rows = [row(NON_PRIVATE, 0, 0.60, 0.62), row(NON_PRIVATE, 1, 0.62, 0.60),
            row("epsilon-8", 0, 0.30, 0.52, eps=7.9), row("epsilon-8", 1, 0.32, 0.50, eps=8.0),
            row("device-noise-4", 0, 0.5, 0.55, device_eps=9.0), row("device-noise-4", 1, 0.5, 0.55, device_eps=9.0)]
    for r in rows:
        r["members"], r["nonmembers"] = 800, 200
    write_privacy_outputs(grid, rows, tmp_path)
    report = (tmp_path / "privacy.md").read_text()
    assert "| epsilon-8 | 7.95 | – | 0.310 | 0.51 |" in report
    assert "| device-noise-4 | – | 9.00 | 0.500 | 0.82 |" in report
    # loss AUC 0.61 without DP, 0.51 at epsilon 8: 0.10 of the 0.11 gap to chance
    assert "epsilon-8: loss attack auc 0.610 → 0.510 (91% of the way to 0.5)" in report
    assert "about ±0.023" in report  # sqrt(1001 / (12 x 800 x 200))
    assert "enrolment attack auc is 0.500, within noise of 0.5" in report  # no leakage to remove
    assert "loss attack auc is" not in report  # 0.61 is far outside the noise
    assert (tmp_path / "privacy.png").stat().st_size > 10_000
    assert len((tmp_path / "privacy.csv").read_text().splitlines()) == 7


def test_report_without_a_non_private_run_still_renders() -> None:
    grid = sweep_grid([8.0], [], seeds=[0])
    text = privacy_markdown(grid, {"epsilon-8": {"sample_epsilon": 8.0, "device_epsilon": math.nan,
                                                 "accuracy": 0.3, "eer": 0.3, "loss_attack_auc": 0.5,
                                                 "enrolment_attack_auc": 0.5, "members": 10,
                                                 "nonmembers": 5, "runs": 1}})
    assert "| epsilon-8 | 8.00 | – | 0.300 | – |" in text
