"""The epsilon budget: a client stops exactly before the round that would exceed it,
says so, and the server leaves it out of the aggregate and counts it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.training.local import LocalTrainer, dp_plan
from fedspeaker.model import build_model
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.wire import NUM_EXAMPLES, SAT_OUT
from server.client_metrics import train_metrics
from server.strategies import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread")


def settings_for(corpus_root, cache_dir, budget: float) -> RunSettings:
    return RunSettings(model="tdnn", head_lr=0.0, data_dir=str(corpus_root), cache_dir=str(cache_dir), num_clients=1,
                       partition="iid", noise_multiplier=1.0, rounds=6, local_epochs=1,
                       channels=16, embedding_dim=16, crop_frames=40, batch_size=8,
                       epsilon_budget=budget)


def expected_epsilons(n_examples: int, batch_size: int, rounds: int, delta: float) -> list[float]:
    """Opacus's own accountant over the steps each round takes: ceil(n/b) Poisson batches."""
    batches = math.ceil(n_examples / batch_size)
    epsilons = []
    for k in range(1, rounds + 1):
        acct = RDPAccountant()
        acct.history = [(1.0, 1 / batches, batches * k)]
        epsilons.append(acct.get_epsilon(delta))
    return epsilons


def test_client_sits_out_exactly_when_its_next_round_would_exceed_the_budget(synthetic_corpus, cache_dir):
    from client.app import train

    probe = settings_for(synthetic_corpus.root, cache_dir, budget=0.0)
    data = load_speaker_data(probe)
    n_train = len(data.split.train)
    eps = expected_epsilons(n_train, 8, 5, probe.delta)
    budget = (eps[1] + eps[2]) / 2  # two rounds fit, a third would not
    settings = settings_for(synthetic_corpus.root, cache_dir, budget)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=settings.to_run_config())
    model = build_model(settings, data.n_speakers)
    replies = []
    for server_round in range(1, 5):
        msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                          "config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=1, message_type="train")
        replies.append(train(msg, context).content)

    sat = [bool(r["metrics"].get(SAT_OUT, 0)) for r in replies]
    assert sat == [False, False, True, True]
    reported = [float(r["metrics"]["epsilon"]) for r in replies]
    assert reported[:2] == pytest.approx(eps[:2], rel=1e-6)
    assert reported[2] == reported[3] == pytest.approx(eps[1], rel=1e-6)  # spends nothing more
    assert max(reported) <= budget
    assert "arrays" not in replies[2]  # no weights leave a client that did not train


def test_plan_matches_the_steps_training_takes() -> None:
    settings = RunSettings(model="tdnn", head_lr=0.0, noise_multiplier=1.3, local_epochs=2, channels=16, embedding_dim=16,
                           crop_frames=40, batch_size=8)
    feats = [torch.randn(40, 50) for _ in range(21)]
    labels = [i % 3 for i in range(21)]
    for fraction in (1.0, 0.25):
        trainer, ledger = LocalTrainer(settings, 3), PrivacyLedger()
        planned = dp_plan(trainer.settings, len(feats), step_fraction=fraction)
        before = ledger.epsilon_after(planned, settings.delta)
        trainer.train(feats, labels, ledger, seed=0, step_fraction=fraction)
        assert ledger.history == [tuple(planned)]
        assert ledger.epsilon(settings.delta) == pytest.approx(before)


def test_server_leaves_sat_out_replies_out_and_counts_them() -> None:
    seen = []
    strategy = build_strategy(RunSettings(), lambda rnd, replies, nodes, metrics: seen.append(replies))

    def reply(value: float, examples: int) -> Message:
        return Message(content=RecordDict({
            "arrays": ArrayRecord({"w": Array(np.full(2, value, np.float32))}),
            "metrics": MetricRecord({"num-examples": examples, "epsilon": 1.0})}),
            dst_node_id=3, message_type="train")

    resting = Message(content=RecordDict({"metrics": MetricRecord(
        {"num-examples": 0, SAT_OUT: 1, "epsilon": 2.5})}), dst_node_id=4, message_type="train")
    arrays, _ = strategy.aggregate_train(1, [reply(1.0, 1), reply(3.0, 1), resting])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    assert len(seen[0]) == 3  # the observer (and so the epsilon statistics) sees it


def test_round_statistics_count_sat_out_clients_and_their_epsilon() -> None:
    from server.app import RoundTracker

    tracker = RoundTracker(RunSettings(), data=None, model=None, report=None)
    trained = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                          "metrics": MetricRecord({"num-examples": 10, "train-loss": 2.0, "epsilon": 3.0})})
    resting = RecordDict({"metrics": MetricRecord({"num-examples": 0, SAT_OUT: 1, "epsilon": 5.0})})
    replies = [trained, resting, resting]
    tracker.observe_replies(4, replies, [1, 2, 3], train_metrics(replies, NUM_EXAMPLES))
    m = tracker.client_metrics
    assert (m["clients"], m["sat_out"], m["epsilon_max"], m["train_loss"]) == (1, 2, 5.0, 2.0)
    assert m["epsilon_mean"] == pytest.approx(13 / 3)
    assert m["upload_bytes"] == len(trained["arrays"]["w"].data) > 16  # only the trained one uploads
    tracker.observe_replies(5, [resting], [2], train_metrics([resting], NUM_EXAMPLES))  # everyone out: no loss to average, no crash
    assert tracker.client_metrics["clients"] == 0 and math.isnan(tracker.client_metrics["train_loss"])
