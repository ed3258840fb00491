"""Under client sampling a device's DP-SGD noise is planned for the rounds it will
actually train, and its ledger still never passes the target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.model import build_model
from fedspeaker.privacy.dpsgd import calibrate_noise
from fedspeaker.reporting.run_report import epsilon_spread
from fedspeaker.training.local import dp_plan, planned_rounds, spend_cap
from server.client_metrics import train_metrics
from server.sampling import sample_clients

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread")

THOUSAND = dict(num_clients=1000, fraction_train=0.05, client_sampling="poisson", rounds=50)


def test_the_plan_covers_the_rounds_a_device_is_expected_to_train():
    settings = RunSettings(**THOUSAND)
    assert planned_rounds(settings) == 3  # 2.5 expected, rounded up (plan-margin 0)
    spread = math.sqrt(50 * 0.05 * 0.95)
    assert planned_rounds(settings.replace(plan_margin=1.0)) == math.ceil(2.5 + spread) == 5
    assert planned_rounds(settings.replace(plan_margin=100.0)) == 50  # never more than the run
    assert planned_rounds(RunSettings(rounds=10)) == 10  # everyone trains every round
    assert planned_rounds(RunSettings(num_clients=20, fraction_train=0.1, rounds=10)) == 1  # 2 of 20 a round
    assert planned_rounds(RunSettings(num_clients=20, fraction_train=0.1, rounds=10, secagg=True)) == 10
    # the noise is that of the planned epochs, not of every round of the run
    plan = dp_plan(settings, 3)
    # (for the run's epsilon less the scoring back end's share)
    assert plan.noise_multiplier == pytest.approx(calibrate_noise(settings.dpsgd_epsilon, 1e-5, plan.sample_rate,
                                                                  3, "rdp"))
    assert plan.noise_multiplier < calibrate_noise(8.0, 1e-5, plan.sample_rate, 50, "rdp") / 2


def test_the_plan_matches_the_participation_the_seeded_draw_gives():
    settings = RunSettings(**THOUSAND)
    nodes = list(range(1000))
    draws = np.zeros(1000)
    for server_round in range(1, 51):
        for node in sample_clients(nodes, how="poisson", fraction=0.05, seed=0, server_round=server_round):
            draws[node] += 1
    assert draws.mean() == pytest.approx(2.5, rel=0.1)
    beyond = float((draws > planned_rounds(settings)).mean())
    assert 0.0 < beyond < 0.3  # some devices are drawn more often than planned; they sit out
    assert float((draws > planned_rounds(settings.replace(plan_margin=1.0))).mean()) < 0.05


def test_the_cap_is_the_target_wherever_the_plan_is_shorter_than_the_run():
    assert spend_cap(RunSettings(**THOUSAND)) == 8.0
    assert spend_cap(RunSettings(**THOUSAND, epsilon_budget=3.0)) == 3.0
    assert spend_cap(RunSettings()) == 0.0  # every client every round: its plan is the run
    assert spend_cap(RunSettings(**THOUSAND, noise_multiplier=1.0)) == 0.0  # no target to keep
    assert spend_cap(RunSettings(**THOUSAND, dp=False)) == 0.0


def test_a_device_drawn_more_often_than_planned_sits_out_and_never_passes_the_target(
        synthetic_corpus, cache_dir, tmp_path):
    from client.app import train

    settings = RunSettings(model="tdnn", head_lr=0.0, data_dir=str(synthetic_corpus.root),
                           cache_dir=str(cache_dir), num_clients=20, fraction_train=0.1, rounds=10,
                           epsilon=4.0, plan_margin=1.0, channels=16, embedding_dim=16, crop_frames=40, batch_size=8)
    assert planned_rounds(settings) == 2
    context = Context(run_id=3, node_id=1, state=RecordDict(), run_config=settings.to_run_config(),
                      node_config={"data-dir": str(synthetic_corpus.root), "state-dir": str(tmp_path / "phone")})
    model = build_model(settings, len(synthetic_corpus.speakers))
    replies = []
    for server_round in (1, 4, 6, 9):  # drawn four times, planned for two
        msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({
            wire.SERVER_ROUND: server_round, wire.SPEAKERS: synthetic_corpus.speakers,
            wire.FEDERATION_ID: "fed"})}), dst_node_id=1, message_type="train")
        replies.append(train(msg, context).content)
    sat = [bool(r["metrics"].get(wire.SAT_OUT, 0)) for r in replies]
    assert sat == [False, False, True, True]
    eps = [float(r["metrics"][wire.EPSILON]) for r in replies]
    assert max(eps) <= 4.0
    # the two rounds it trained spent (nearly) all of the target that DP-SGD has (the back
    # end's releases, not asked for here, have the rest)
    assert eps[1] >= 0.9 * settings.dpsgd_epsilon
    assert all("arrays" not in r for r in replies[2:])


def test_the_server_reports_the_spread_of_epsilon_over_devices():
    from server.app import RoundTracker

    settings = RunSettings(**THOUSAND)
    tracker = RoundTracker(settings, data=None, model=None, report=None)

    def reply(eps: float, sat: int = 0) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": 3, wire.EPSILON: eps, wire.SAT_OUT: sat})})

    for server_round, replies, nodes in ((1, [reply(2.0), reply(3.0)], [11, 12]),
                                         (2, [reply(5.0), reply(7.9, sat=1)], [11, 13])):
        tracker.observe_replies(server_round, replies, nodes, train_metrics(replies, wire.NUM_EXAMPLES))
    assert tracker.reported_epsilon == {11: 5.0, 12: 3.0, 13: 7.9}
    spread = epsilon_spread(settings, list(tracker.reported_epsilon.values()), len(tracker.devices_sat_out))
    assert spread == {"devices": 3, "min": 3.0, "median": 5.0, "max": 7.9, "target": 8.0, "sat_out_for_budget": 1}
    assert epsilon_spread(settings, [], 0) is None
