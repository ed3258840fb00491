"""A run's report starts from round 0, the starting model, in every output."""

from __future__ import annotations

import csv
import math

from fedspeaker.reporting.run_report import RunReport, progress_line, read_rounds


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


def test_a_rounds_csv_from_before_the_rename_reads_back_under_the_new_names(tmp_path):
    (tmp_path / "rounds.csv").write_text("round,accuracy,user_epsilon\n1,0.5,2.25\n")
    assert read_rounds(tmp_path / "rounds.csv") == [{"round": 1.0, "accuracy": 0.5, "device_epsilon": 2.25}]


def test_tensorboard_event_files_hold_the_rounds_csv_figures(tmp_path):
    """Read back with TensorBoard's own event reader: every finite figure of rounds.csv
    is a scalar at its round, and the run config is the run's hyper-parameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedspeaker.reporting.tensorboard import tag

    rows = [{"round": r, "accuracy": 0.05 + 0.3 * r, "voiceprint_accuracy": 0.93 - 0.01 * r, "eer": 0.145 / (r + 1),
             "min_dcf": 0.97, "far": 0.01 * r, "frr": 0.2, "clients": 10 - r, "upload_bytes": 2.9e6 * r,
             "round_seconds": 1.5, "seconds": 1.0 + r, **({"epsilon_max": 2.0 * r} if r else {})}
            for r in range(3)]
    report = RunReport(tmp_path, run_config={"strategy": "fedavg", "rounds": 2, "dp": True, "data-dir": ""})
    for row in rows:
        report.add_round(row)
    report.finish({"title": "t", "data": {"training_speakers": 26}}, {"state_dict": {}})

    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    written = {(t, e.step): e.value for t in board.Tags()["scalars"] for e in board.Scalars(t)}
    expected = {(tag(column), int(float(r["round"]))): float(value)
                for r in csv.DictReader(open(tmp_path / "rounds.csv"))
                for column, value in r.items() if column != "round" and not math.isnan(float(value))}
    assert set(written) == set(expected)
    assert ("verification/eer", 2) in written and ("privacy/epsilon_max", 0) not in written  # NaN: left out
    for key, value in expected.items():
        assert math.isclose(written[key], value, rel_tol=1e-5), key
    # the run config, as this run's hyper-parameters (not a sub-run of its own)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        board.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert start.hparams["strategy"].string_value == "fedavg" and start.hparams["rounds"].number_value == 2
    assert start.hparams["dp"].string_value == "true"


def test_a_resumed_report_writes_its_tensorboard_history_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunReport(tmp_path)
    first.add_round({"round": 0, "eer": 0.2, "accuracy": 0.1, "round_seconds": 1.0, "seconds": 1.0})
    resumed = RunReport(tmp_path, first.rows)  # the server restarted: history first, then new rounds
    resumed.add_round({"round": 1, "eer": 0.1, "accuracy": 0.2, "round_seconds": 1.0, "seconds": 2.0})
    resumed.board.close()
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [(e.step, round(e.value, 6)) for e in board.Scalars("verification/eer")] == [(0, 0.2), (1, 0.1)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
