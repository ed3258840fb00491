"""A run that trains nobody fails, and says why: the round's clients counted by reason,
RUN FAILED in the summary, a non-zero exit. Fake replies; no federation is launched."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedspeaker import wire
from fedspeaker.cli import runs
from fedspeaker.config import RunSettings
from fedspeaker.reporting.run_report import progress_line
from server import app as server_app
from server.outcomes import DROPPED, NO_REPLY, SAT_OUT, failure_message, round_outcome, run_outcome
from server.strategies import ScreenedStrategy, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def trained(value: float = 1.0, node: int = 7) -> Message:
    return Message(content=RecordDict({
        wire.ARRAYS: ArrayRecord({"w": Array(np.full(2, value, np.float32))}),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 1.0})}),
        dst_node_id=node, message_type="train")


def refused(reason: str = "policy: dp-off") -> Message:
    """A device policy's refusal as issue 18 sends it: no arrays, a refusal record."""
    return Message(content=RecordDict({wire.REFUSAL: ConfigRecord({wire.REASON: reason})}),
                   dst_node_id=8, message_type="train")


def sat_out() -> Message:
    return Message(content=RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0, wire.SAT_OUT: 1,
                                                                   wire.EPSILON: 7.9})}),
                   dst_node_id=9, message_type="train")


def flower_error(reason: str = "APP REFUSED: not signed by the operator") -> Message:
    """What Flower hands the server for a device whose ClientApp never replied."""
    asked = Message(content=RecordDict({}), dst_node_id=10, message_type="train")
    return Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=asked)


def test_round_outcome_counts_every_reason() -> None:
    nan = trained(np.nan)
    outcome = round_outcome(7, [trained(), refused(), refused("policy: no-secagg"), sat_out(),
                                flower_error(), nan], dropped=[nan])
    assert outcome.asked == 7 and outcome.trained == 1
    # 7 asked, 6 replies: the missing one counts as no reply
    assert outcome.not_trained == Counter({"policy": 2, SAT_OUT: 1, NO_REPLY: 2, DROPPED: 1})
    assert outcome.details["policy: dp-off"] == 1 and outcome.details["policy: no-secagg"] == 1
    assert any("APP REFUSED" in text and text.startswith(NO_REPLY) for text in outcome.details)
    assert outcome.describe() == "1 dropped, 2 no-reply/error, 2 policy, 1 sat-out"


def test_an_app_the_device_refused_counts_as_a_refusal() -> None:
    from server.outcomes import APP_REFUSED, row_counts

    # Flower's runner words our app check's exception so (fedspeaker/deploy/apprunner.py)
    refusal = flower_error("<class 'fedspeaker.deploy.appsign.AppVerificationError'>:<'the bundle's "
                           "signature does not verify'>")
    outcome = round_outcome(2, [refusal, flower_error("<class 'ZeroDivisionError'>:<'division by zero'>")])
    assert outcome.not_trained == Counter({APP_REFUSED: 1, NO_REPLY: 1})
    assert outcome.details == Counter({
        "app-refused: the device refused the app (not signed by the operator): the bundle's signature "
        "does not verify": 1,
        f"no-reply/error: Flower error {ErrorCode.CLIENT_APP_CRASHED}: <class 'ZeroDivisionError'>:<'division by zero'>": 1})
    counts = row_counts(outcome)
    assert counts["refused"] == 1 and counts["no_reply"] == 1 and counts["clients"] == 0


def test_refusal_kind_is_the_text_before_the_colon() -> None:
    outcome = round_outcome(2, [refused("hardware: too little memory"), refused("no colon here")])
    assert outcome.not_trained == Counter({"hardware": 1, "no colon here": 1})


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_screened_strategy_reports_the_round_and_keeps_refusals_out_of_the_average() -> None:
    seen = []
    strategy = build_strategy(RunSettings(num_clients=3), on_outcome=lambda r, o: seen.append((r, o)))
    assert isinstance(strategy, ScreenedStrategy)
    sent = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    messages = list(strategy.configure_train(1, sent, ConfigRecord({}), FakeGrid([1, 2, 3])))
    assert len(messages) == 3
    arrays, _ = strategy.aggregate_train(1, [trained(4.0), refused(), flower_error()])
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 4.0])  # the one that trained, alone
    (server_round, outcome), = seen
    assert server_round == 1 and outcome.asked == 3 and outcome.trained == 1
    assert outcome.not_trained == Counter({"policy": 1, NO_REPLY: 1})


def test_a_round_of_refusals_only_leaves_the_model() -> None:
    strategy = build_strategy(RunSettings(num_clients=2))
    strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord({}),
                             FakeGrid([1, 2]))
    arrays, metrics = strategy.aggregate_train(1, [refused(), flower_error()])
    assert arrays is None and (metrics["clients"], metrics["refused"], metrics["no_reply"]) == (0, 1, 1)


def rows(*clients: float) -> list[dict[str, float]]:
    return [{"round": 0.0}] + [{"round": float(i + 1), "clients": c} for i, c in enumerate(clients)]


def test_run_outcome() -> None:
    details = Counter({"no-reply/error: Flower error 8: APP REFUSED": 6})
    failed = run_outcome(rows(0, 0, 0), 3, details)
    assert failed["status"] == "failed" and failed["rounds_trained"] == 0
    assert failed["not_trained"] == {NO_REPLY: 6}
    assert "starting model" in failed["released_model"]
    assert "RUN FAILED" in failure_message(failed) and "APP REFUSED" in failure_message(failed)
    assert run_outcome(rows(0, 2, 0), 3, details)["status"] == "trained"
    assert run_outcome(rows(), 0, Counter())["status"] == "nothing asked"
    assert run_outcome(rows(math.nan), 1, Counter())["status"] == "failed"


def test_round_line_names_who_did_not_train() -> None:
    row = {"round": 2.0, "accuracy": 0.1, "eer": 0.2, "round_seconds": 1.0, "clients": 0.0, "asked": 3.0,
           "sat_out": 1.0, "refused": 1.0, "no_reply": 1.0, "dropped": 0.0}
    line = progress_line(row)
    assert "clients 0 of 3 (not trained: 1 sat out for budget, 1 refused, 1 no reply/error)" in line


class _Report:
    def __init__(self, out: Path, rows: list[dict[str, float]]) -> None:
        self.out, self.rows = out, rows

    def finish(self, summary: dict, bundle: dict) -> None:
        (self.out / "summary.json").write_text(json.dumps(summary))


def tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int, clients: list[float]):
    """A RoundTracker at the end of a run, its scoring and summary stubbed."""
    monkeypatch.setattr(server_app.RoundTracker, "score", lambda self: {})
    monkeypatch.setattr(server_app, "run_summary", lambda *a, **k: {"final": {}})
    monkeypatch.setattr(server_app, "model_bundle", lambda *a, **k: {})
    t = object.__new__(server_app.RoundTracker)
    t.settings, t.report, t.started = RunSettings(rounds=rounds), _Report(tmp_path, rows(*clients)), 0.0
    t.model = type("M", (), {"load_state_dict": lambda self, state: None})()
    t.data = type("D", (), {"split": type("S", (), {"speakers": []})()})()
    t.__dict__["evaluation"] = None
    t.simulated, t.reported_epsilon, t.devices_sat_out = True, {}, set()
    t.not_trained = Counter({"no-reply/error: Flower error 8: APP REFUSED": 2 * rounds})
    return t


def test_server_fails_a_run_that_trained_nobody(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = tracker(tmp_path, monkeypatch, 2, [0, 0])
    with pytest.raises(server_app.RunFailed, match="RUN FAILED.*APP REFUSED"):
        t.finish(ArrayRecord({}))
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"]["status"] == "failed"


@pytest.mark.parametrize("rounds, clients", [(2, [0, 1]), (0, [])])
def test_server_passes_a_run_that_trained_or_was_asked_nothing(tmp_path: Path, monkeypatch, rounds, clients
                                                               ) -> None:
    tracker(tmp_path, monkeypatch, rounds, clients).finish(ArrayRecord({}))
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"]["status"] != "failed"


@pytest.mark.parametrize("status, code", [("failed", 1), ("trained", 0), ("nothing asked", 0)])
def test_simulate_exit_status_follows_the_outcome(tmp_path: Path, status: str, code: int,
                                                  capsys: pytest.CaptureFixture) -> None:
    outcome = run_outcome(rows(0) if status == "failed" else rows(1), 0 if status == "nothing asked" else 1,
                          Counter({"policy: dp-off": 2}))
    summary = {"final": {"accuracy": 0.1, "eer": 0.2}, "wall_seconds": 1.0, "best_accuracy": 0.1,
               "best_round": 0, "privacy": "none", "data": {"skipped_files": 0}, "outcome": outcome}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert runs._finish(RunSettings(out_dir=str(tmp_path))) == code
    assert ("RUN FAILED" in capsys.readouterr().err) == (code == 1)


def test_rounds_zero_is_accepted_on_the_command_line(tmp_path: Path) -> None:
    from fedspeaker.cli.main import _parser
    from fedspeaker.errors import ConfigError

    def settings(rounds: str) -> RunSettings:
        return runs._settings(_parser().parse_args(["simulate", "--rounds", rounds, "--out", str(tmp_path)]))

    assert settings("0").rounds == 0
    with pytest.raises(ConfigError, match="^rounds must be at least 0, got -1"):
        settings("-1")
