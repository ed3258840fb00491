"""Every strategy name builds and aggregates a round; FedProx's term changes the update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedspeaker.config import STRATEGIES, RunSettings
from fedspeaker.training.local import LocalTrainer
from fedspeaker.privacy.ledger import PrivacyLedger
from server.strategies import build_strategy
from tests.conftest import EightNodes


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_and_aggregates_one_round(name: str) -> None:
    settings = RunSettings(strategy=name, num_clients=8)
    strategy = build_strategy(settings)
    global_arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), EightNodes()))
    assert len(sent) == 8
    if name == "fedprox":
        assert sent[0].content["config"]["proximal-mu"] == settings.proximal_mu
    rng = np.random.default_rng(0)
    replies = [
        Message(content=RecordDict({
            "arrays": ArrayRecord({"w": Array((1.0 + 0.1 * rng.standard_normal(4)).astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": 10 + i, "train-loss": 1.0 + 0.1 * i}),
        }), dst_node_id=i + 1, message_type="train")
        for i in range(8)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None, name
    w = arrays["w"].numpy()
    assert w.shape == (4,) and np.isfinite(w).all()
    assert np.abs(w).max() > 0  # moved away from the zero global model


def test_unknown_strategy_is_a_config_error() -> None:
    from fedspeaker.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy must be one of"):
        RunSettings.from_run_config({"strategy": "fedsgd"})


@pytest.mark.parametrize("dp", [False, True])
def test_proximal_term_pulls_the_update_towards_the_global_model(dp: bool) -> None:
    torch.set_num_threads(1)
    settings = RunSettings(model="tdnn", head_lr=0.0, dp=dp, epsilon=50.0, rounds=1, local_epochs=2, channels=16,
                           embedding_dim=16, crop_frames=60, batch_size=8, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(40, 80, generator=gen) for _ in range(24)]
    labels = [i % 3 for i in range(24)]

    def train(mu: float) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = LocalTrainer(settings, n_speakers=3)
        start = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        trainer.train(feats, labels, PrivacyLedger(), seed=3, proximal_mu=mu)
        return start, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    start, plain = train(0.0)
    start_again, proximal = train(5.0)
    assert torch.equal(start, start_again)
    assert not torch.allclose(plain, proximal)
    assert (proximal - start).norm() < (plain - start).norm()


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "krum"])
def test_aggregation_does_not_depend_on_the_order_replies_arrive_in(name: str) -> None:
    """Float sums depend on their order, and replies arrive in any order; the wrapper
    sorts them by content, so a run repeats (and a resumed run matches) bit for bit."""
    rng = np.random.default_rng(1)
    updates = [rng.standard_normal(1000).astype(np.float32) for _ in range(8)]

    def replies(order):
        return [Message(content=RecordDict({
            "arrays": ArrayRecord({"w": Array(updates[i])}),
            "metrics": MetricRecord({"num-examples": 10 + i, "train-loss": 1.0})}),
            dst_node_id=i + 1, message_type="train") for i in order]

    def aggregate(strategy, order):
        list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(1000, np.float32))}),
                                      ConfigRecord(), EightNodes()))
        return strategy.aggregate_train(1, replies(order))[0]["w"].numpy()

    settings = RunSettings(strategy=name, num_clients=8)
    forward, backward = range(8), [3, 7, 0, 5, 1, 6, 2, 4]
    np.testing.assert_array_equal(aggregate(build_strategy(settings), forward),
                                  aggregate(build_strategy(settings), backward))
    if name == "fedavg":  # Flower's own strategy, unwrapped, does depend on it
        assert not np.array_equal(aggregate(build_strategy(settings).strategy, forward),
                                  aggregate(build_strategy(settings).strategy, backward))


def test_the_wrappers_are_put_together_in_one_place_and_the_epsilon_found_under_them() -> None:
    import math

    import torch

    from server.device_eval import DeviceEvaluation
    from server.strategies import ScreenedStrategy, device_dp_of, device_epsilon_of

    settings = RunSettings(num_clients=8, device_dp="server-fixed", fraction_evaluate=0.5)
    with pytest.raises(ValueError, match="cohort"):
        build_strategy(settings)
    strategy = build_strategy(settings, cohort=lambda arrays: (0.5, torch.zeros(1, 2)),
                              on_counts=lambda server_round, totals: None, round_offset=3)
    assert isinstance(strategy, DeviceEvaluation) and isinstance(strategy.strategy, ScreenedStrategy)
    assert strategy.strategy.round_offset == 3
    device_dp = device_dp_of(strategy)
    assert device_dp is strategy.strategy.device_dp is not None
    device_dp.account((1.0, 4, 8, 0.5))
    assert device_epsilon_of(strategy) == device_dp.epsilon() > 0  # found under DeviceEvaluation too
    assert math.isnan(device_epsilon_of(build_strategy(settings.replace(device_dp="off"), cohort=lambda arrays: None,
                                                  on_counts=lambda server_round, totals: None)))


def test_the_round_metrics_count_every_reply_where_multikrum_keeps_six() -> None:
    """Flower's MultiKrum calls its train-metrics hook with the updates it selects; the
    round's figures (what Flower records as its train metrics, and the row) count every
    reply: the largest epsilon is that of a device whose update was left out."""
    seen = []
    settings = RunSettings(strategy="multikrum", num_clients=8, num_malicious=2, krum_select=6)
    strategy = build_strategy(settings, lambda rnd, replies, nodes, metrics: seen.append(metrics))
    list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord(),
                                  EightNodes()))
    rng = np.random.default_rng(2)

    def reply(i: int, weights: np.ndarray, epsilon: float) -> Message:
        return Message(content=RecordDict({
            "arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": float(i), "epsilon": epsilon})}),
            dst_node_id=i + 1, message_type="train")

    replies = [reply(i, 1 + 0.01 * rng.standard_normal(4), 1.0) for i in range(6)]
    replies += [reply(6, np.full(4, -50.0), 7.5), reply(7, np.full(4, 80.0), 6.0)]  # far off: left out
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.abs(arrays["w"].numpy() - 1).max() < 0.1  # MultiKrum aggregated the six near 1
    assert (metrics["clients"], metrics["epsilon_max"]) == (8, 7.5)
    assert metrics["train_loss"] == pytest.approx(3.5)  # 0..7, ten examples each
    assert metrics["upload_bytes"] == sum(len(r.content["arrays"]["w"].data) for r in replies)  # all eight
    assert len(seen) == 1 and seen[0] is metrics  # the row shows what Flower records
    _, flowers_own = strategy.strategy.aggregate_train(1, replies)  # Flower's hook: the six only
    assert (flowers_own["train-loss"], flowers_own["epsilon"]) == (pytest.approx(2.5), pytest.approx(1.0))
