"""A run's report starts from round 0, the starting model, in every output."""

from __future__ import annotations

import csv
import math

from fedspeaker.reporting.run_report import RunReport, progress_line


def test_round_zero_is_the_first_row_line_and_point(tmp_path):
    start = {"round": 0, "accuracy": 0.05, "voiceprint_accuracy": 0.93, "eer": 0.145, "min_dcf": 0.97,
             "round_seconds": 0.2, "seconds": 0.2}
    trained = [{"round": r, "accuracy": 0.3 * r, "voiceprint_accuracy": 0.93, "eer": 0.14, "min_dcf": 0.96,
                "epsilon_max": 2.0 * r, "epsilon_mean": 1.5 * r, "clients": 10, "round_seconds": 1.0,
                "seconds": 1.0 + r} for r in (1, 2)]
    report = RunReport(tmp_path)
    for row in [start, *trained]:
        report.add_round(row)
    report.finish({"title": "t", "data": {"training_speakers": 26}}, {"state_dict": {}})
    rows = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert math.isnan(float(rows[0]["epsilon_max"]))  # nothing spent before the first round
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "global_model.pt").exists()
    assert "the starting model" in progress_line(start)
    assert "voiceprint 0.930" in progress_line(trained[0]) and "training head 0.300" in progress_line(trained[0]) and "minDCF 0.960" in progress_line(trained[0])
