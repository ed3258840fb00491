"""Device-level DP with Flower's own wrappers: each mode runs a round, clipping bounds a
client's influence, and Flower's accountant reports a growing epsilon where it can."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedspeaker.config import DEVICE_DP, RunSettings
from fedspeaker.errors import ConfigError
from fedspeaker.privacy.guarantee import guarantee_sentence
from fedspeaker.wire import UNIT_WEIGHT
from server.strategies import build_strategy, device_epsilon_of

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def reply(to: Message, weights: np.ndarray, examples: int = 10) -> Message:
    metrics = {"num-examples": examples, UNIT_WEIGHT: 1, KEY_NORM_BIT: 1}
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
                               "metrics": MetricRecord(metrics)}), reply_to=to)


def one_round(settings: RunSettings, updates: list[np.ndarray], server_round: int = 1, strategy=None):
    strategy = strategy or build_strategy(settings)
    start = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    sent = list(strategy.configure_train(server_round, start, ConfigRecord(), Nodes(len(updates))))
    arrays, _ = strategy.aggregate_train(server_round, [reply(m, u) for m, u in zip(sent, updates)])
    return strategy, sent, arrays


@pytest.mark.parametrize("mode", [m for m in DEVICE_DP if m != "off"])
def test_every_device_dp_mode_wraps_a_strategy_and_aggregates_a_round(mode: str) -> None:
    settings = RunSettings(num_clients=4, device_dp=mode, device_noise_multiplier=0.5)
    _, sent, arrays = one_round(settings, [np.full(4, 0.1 * (i + 1)) for i in range(4)])
    assert arrays is not None and np.isfinite(arrays["w"].numpy()).all()
    if mode.startswith("client"):  # the server tells clients how to clip
        assert KEY_CLIPPING_NORM in sent[0].content["config"]


def test_server_side_clipping_bounds_each_clients_influence() -> None:
    settings = RunSettings(num_clients=3, device_dp="server-fixed", device_clip_norm=0.1,
                           device_noise_multiplier=1e-6)
    _, _, arrays = one_round(settings, [np.full(4, 50.0), np.full(4, 0.001), np.full(4, 0.001)])
    # the huge update is clipped to norm 0.1 (0.05 a component), the small ones are kept,
    # and all three count the same
    np.testing.assert_allclose(arrays["w"].numpy(), (0.05 + 0.002) / 3, rtol=1e-3)


def test_an_update_that_changes_nothing_does_not_stop_server_side_clipping() -> None:
    settings = RunSettings(num_clients=3, device_dp="server-fixed", device_clip_norm=0.1,
                           device_noise_multiplier=1e-6, strategy="fedmedian")
    _, _, arrays = one_round(settings, [np.zeros(4), np.full(4, 50.0), np.full(4, 50.0)])
    assert np.linalg.norm(arrays["w"].numpy()) == pytest.approx(0.1, rel=1e-3)


def test_flower_mod_clips_on_the_client_before_anything_leaves() -> None:
    start = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    msg = Message(RecordDict({"arrays": start, "config": ConfigRecord({KEY_CLIPPING_NORM: 0.5})}),
                  dst_node_id=1, message_type="train")
    out = fixedclipping_mod(msg, None, lambda m, c: reply(m, np.full(4, 3.0)))
    assert np.linalg.norm(out.content["arrays"]["w"].numpy()) == pytest.approx(0.5, rel=1e-5)


def test_flowers_accountant_reports_a_growing_epsilon_for_fixed_clipping_fedavg() -> None:
    settings = RunSettings(num_clients=4, device_dp="server-fixed", device_noise_multiplier=2.0)
    strategy = None
    epsilons = []
    for server_round in (1, 2, 3):
        strategy, _, _ = one_round(settings, [np.full(4, 0.1)] * 4, server_round, strategy)
        epsilons.append(device_epsilon_of(strategy))
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    no_account = build_strategy(settings.replace(strategy="fedmedian"))
    assert math.isnan(device_epsilon_of(no_account))  # Flower accounts for FedAvg only
    assert math.isnan(device_epsilon_of(build_strategy(RunSettings())))


def test_guarantee_names_both_kinds_of_dp() -> None:
    both = RunSettings(device_dp="server-fixed", device_noise_multiplier=2.0)
    text = guarantee_sentence(both, epsilon=7.5, device_epsilon=12.25)
    assert "sample-level (epsilon=7.50" in text and "device-level (epsilon=12.25" in text
    assert "no epsilon is claimed" in guarantee_sentence(both.replace(dp=False, strategy="krum"), 0.0)
    assert guarantee_sentence(RunSettings(dp=False), 0.0) == "no differential privacy"


@pytest.mark.parametrize("key, value", [("device-dp", "everywhere"), ("device-noise-multiplier", 0.0),
                                        ("device-clip-norm", -1.0)])
def test_bad_device_dp_values_name_the_option(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        RunSettings.from_run_config({key: value})


@pytest.mark.parametrize("other", [{"strategy": "krum"}, {"device-dp": "server-fixed"},
                                   {"epsilon-budget": 5.0}])
def test_secure_aggregation_refuses_what_needs_individual_updates(other: dict) -> None:
    with pytest.raises(ConfigError, match="secagg"):
        RunSettings.from_run_config({"secagg": True, **other})
    RunSettings.from_run_config({"secagg": True})  # plain FedAvg is fine
