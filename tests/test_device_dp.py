"""Device-level DP (DP-FedAvg): the server's sampling is seeded and what was asked for, the
epsilon claimed is the accountant's for that sampling and for the rounds that ran (each
expected value computed here, independently, with the accountants themselves), the
release divides by a denominator fixed in advance with at least the accounted noise, and
a checkpoint carries the accounting on."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant as GoogleRdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdp
from opacus.accountants import PRVAccountant, RDPAccountant

from fedspeaker.config import RunSettings
from fedspeaker.errors import ConfigError
from fedspeaker.privacy.accounting import device_epsilon
from fedspeaker.privacy.guarantee import guarantee_sentence
from fedspeaker.wire import UNIT_WEIGHT
from server.checkpoint import Checkpoint, restore_strategy_state, strategy_state
from server.sampling import sample_clients
from server.strategies import build_strategy, device_epsilon_of

pytestmark = pytest.mark.usefixtures("flower_task_identity")

DELTA = 1e-5


class Grid:
    """Just enough of a Flower Grid: ``n`` connected simulated nodes with scattered ids
    (new ones at each launch, as Flower's simulation makes them), node i holding
    partition i and saying so when asked."""

    def __init__(self, n: int, launch: int = 0) -> None:
        self.ids = [(1_000_003 + 7919 * launch) * (i + 1) % 2_147_483_647 for i in range(n)]
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def send_and_receive(self, messages, *, timeout=None):
        answers = []
        for m in messages:
            assert m.metadata.message_type == "query.partition"
            self.queries += 1
            answers.append(Message(RecordDict({"node": ConfigRecord(
                {"partition-id": self.ids.index(m.metadata.dst_node_id)})}), reply_to=m))
        return answers


def reply(to: Message, weights: np.ndarray) -> Message:
    metrics = {"num-examples": 10, UNIT_WEIGHT: 1}
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
                               "metrics": MetricRecord(metrics)}), reply_to=to)


def run_round(strategy, server_round: int, grid: Grid, start: np.ndarray,
              update=lambda node: np.full(4, 0.1)) -> tuple[list[int], np.ndarray]:
    """One round: who was asked, and the model released."""
    sent = list(strategy.configure_train(server_round, ArrayRecord({"w": Array(start.astype(np.float32))}),
                                         ConfigRecord(), grid))
    replies = [reply(m, start + update(m.metadata.dst_node_id)) for m in sent]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return [m.metadata.dst_node_id for m in sent], (arrays["w"].numpy() if arrays is not None else start)


def device_settings(**changes) -> RunSettings:
    base = dict(num_clients=20, fraction_train=0.25, device_dp="server-fixed", device_noise_multiplier=1.3,
                device_clip_norm=0.5, delta=DELTA, dp=False)
    return RunSettings(**{**base, **changes})


# ------------------------------------------------------------------ sampling


def test_the_same_seed_draws_the_same_clients_and_another_seed_others() -> None:
    nodes = Grid(50).get_node_ids()
    for how in ("fixed", "poisson"):
        draws = [sample_clients(nodes, how=how, fraction=0.2, seed=3, server_round=r) for r in range(1, 6)]
        again = [sample_clients(list(reversed(nodes)), how=how, fraction=0.2, seed=3, server_round=r)
                 for r in range(1, 6)]
        assert draws == again  # the node order Flower hands over does not matter
        assert draws != [sample_clients(nodes, how=how, fraction=0.2, seed=4, server_round=r)
                         for r in range(1, 6)]
        assert len({tuple(d) for d in draws}) == 5  # a new draw every round


def test_fixed_sampling_takes_flowers_number_without_replacement() -> None:
    nodes = Grid(23).get_node_ids()
    for fraction, min_nodes, want in ((0.25, 1, 5), (0.01, 3, 3), (1.0, 1, 23)):
        drawn = sample_clients(nodes, how="fixed", fraction=fraction, min_nodes=min_nodes, seed=0,
                               server_round=1)
        assert len(drawn) == len(set(drawn)) == want and set(drawn) <= set(nodes)


def test_poisson_sampling_draws_each_client_with_probability_q() -> None:
    nodes, q, rounds = Grid(1000).get_node_ids(), 0.05, 200
    counts = np.zeros(len(nodes))
    sizes = []
    for r in range(1, rounds + 1):
        drawn = set(sample_clients(nodes, how="poisson", fraction=q, seed=0, server_round=r))
        sizes.append(len(drawn))
        counts += [n in drawn for n in nodes]
    rate = sum(sizes) / (rounds * len(nodes))
    assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / (rounds * len(nodes)))  # 4 standard errors
    assert len(set(sizes)) > 5  # the number varies from round to round, as Poisson's does
    # every client is drawn at about the same rate: per-client counts ~ Binomial(200, q)
    assert abs(counts.mean() - rounds * q) < 0.5 and counts.std() == pytest.approx(
        math.sqrt(rounds * q * (1 - q)), rel=0.15)


def test_the_server_asks_exactly_the_clients_drawn() -> None:
    grid = Grid(40)
    partitions = {node: i for i, node in enumerate(grid.ids)}
    for how in ("fixed", "poisson"):
        settings = device_settings(num_clients=40, client_sampling=how, seed=7)
        strategy = build_strategy(settings)
        for r in (1, 2, 3):
            asked, _ = run_round(strategy, r, grid, np.zeros(4))
            assert sorted(asked) == sorted(sample_clients(grid.get_node_ids(), how=how, fraction=0.25, seed=7,
                                                          server_round=r, partitions=partitions))


@pytest.mark.parametrize("how", ["fixed", "poisson"])
def test_a_simulation_draws_the_same_partitions_whatever_node_ids_its_launch_got(how: str) -> None:
    """Flower's simulation gives its nodes new random ids at every launch; the draw goes by
    partition id (asked once of each node), so the same seed trains the same clients."""

    def drawn_partitions(launch: int) -> list[list[int]]:
        grid, strategy = Grid(40, launch), build_strategy(device_settings(num_clients=40, client_sampling=how))
        rounds = [sorted(grid.ids.index(n) for n in run_round(strategy, r, grid, np.zeros(4))[0])
                  for r in (1, 2, 3)]
        assert grid.queries == 40  # each node asked once, in the first round
        return rounds

    first, second = drawn_partitions(0), drawn_partitions(1)
    assert Grid(40, 0).ids != Grid(40, 1).ids
    assert first == second
    assert first[0] != first[1]  # and a different draw each round


def test_poisson_sampling_refuses_a_minimum_it_cannot_keep_and_secagg() -> None:
    with pytest.raises(ConfigError, match="^client-sampling=poisson .* min-train-nodes"):
        RunSettings(num_clients=10, client_sampling="poisson", min_train_nodes=2).validate()
    with pytest.raises(ConfigError, match="secagg"):
        RunSettings(client_sampling="poisson", secagg=True).validate()


# ------------------------------------------------------------------ the epsilon claimed


def test_fixed_sampling_epsilon_is_the_without_replacement_bound() -> None:
    settings = device_settings()
    strategy, grid = build_strategy(settings), Grid(20)
    for r in (1, 2, 3):
        run_round(strategy, r, grid, np.zeros(4))
    # by hand: m = 5 of N = 20 without replacement, replace-one neighbours, where the sum
    # of updates clipped to C moves by up to 2C: noise multiplier 1.3 / 2 relative to that
    expected = GoogleRdp(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    expected.compose(dp_accounting.SampledWithoutReplacementDpEvent(20, 5, dp_accounting.GaussianDpEvent(0.65)), 3)
    assert device_epsilon_of(strategy) == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)
    # amplification credited: less than the same rounds without sampling, same neighbours
    unsampled = GoogleRdp(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    unsampled.compose(dp_accounting.GaussianDpEvent(0.65), 3)
    assert device_epsilon_of(strategy) < unsampled.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant, opacus", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_poisson_sampling_epsilon_is_opacus_at_rate_q(accountant: str, opacus) -> None:
    settings = device_settings(client_sampling="poisson", accountant=accountant)
    strategy, grid = build_strategy(settings), Grid(20)
    for r in range(1, 5):
        run_round(strategy, r, grid, np.zeros(4))
    expected = opacus()
    expected.history = [(1.3, 0.25, 4)]  # rate q whatever each draw's size was, every round run
    assert device_epsilon_of(strategy) == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)


def test_no_amplification_is_what_flowers_accountant_claims() -> None:
    flower = FlowerRdp(PrivacyConfig(target_delta=DELTA, population_size=1000,
                                     neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                     sampling_method=SamplingMethod.NO_AMPLIFICATION))
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=50, population_size=1000), count=50)
    # no amplification: every round a Gaussian on the sum, add-or-remove neighbours
    ours = GoogleRdp(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    ours.compose(dp_accounting.GaussianDpEvent(1.0), 50)
    assert ours.get_epsilon(DELTA) == pytest.approx(flower.get_epsilon(DELTA), rel=1e-9)


def test_an_empty_poisson_round_still_counts_and_still_releases_noise() -> None:
    settings = device_settings(num_clients=10, fraction_train=0.05, client_sampling="poisson")
    strategy, grid = build_strategy(settings), Grid(10)
    sizes = [len(sample_clients(grid.get_node_ids(), how="poisson", fraction=0.05, seed=0, server_round=r))
             for r in range(1, 9)]
    empty = sizes.index(0) + 1
    for r in range(1, empty + 1):
        asked, released = run_round(strategy, r, grid, np.zeros(4))
    assert asked == [] and len(strategy.device_dp.releases) == empty
    assert np.all(released != 0)  # noise alone, std noise * clip / (q N)
    expected = RDPAccountant()
    expected.history = [(1.3, 0.05, empty)]
    assert device_epsilon_of(strategy) == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)


def test_adaptive_clipping_and_robust_aggregation_claim_no_epsilon() -> None:
    for changes in ({"device_dp": "server-adaptive"}, {"strategy": "fedmedian"}, {"device_dp": "off"}):
        assert math.isnan(device_epsilon_of(build_strategy(device_settings(**changes))))


# ------------------------------------------------------------------ the release


def test_the_release_divides_the_sum_by_the_fixed_denominator() -> None:
    # Poisson: q N = 5 expected; whoever is drawn, the sum of the clipped updates is
    # divided by 5, not by the number drawn (the noise here is negligible)
    settings = device_settings(client_sampling="poisson", device_noise_multiplier=1e-9, device_clip_norm=10.0)
    strategy, grid = build_strategy(settings), Grid(20)
    for r in (1, 2, 3):
        asked, released = run_round(strategy, r, grid, np.zeros(4), update=lambda node: np.full(4, 1.0))
        np.testing.assert_allclose(released, np.full(4, len(asked) / 5), rtol=1e-5)
    # fixed: a client that sits out or drops adds nothing, and the others are still divided by m
    settings = device_settings(device_noise_multiplier=1e-9, device_clip_norm=10.0)
    strategy = build_strategy(settings)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                                         ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, [reply(m, np.full(4, 1.0)) for m in sent[:3]])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 3 / 5), rtol=1e-5)


@pytest.mark.parametrize("how, replies", [("fixed", 5), ("fixed", 2), ("poisson", None)])
def test_the_noise_on_the_sum_is_what_is_accounted(how: str, replies: int | None) -> None:
    noise, clip = 1.3, 0.5
    settings = device_settings(client_sampling=how, device_dp="client-fixed", device_noise_multiplier=noise,
                               device_clip_norm=clip)
    strategy, grid = build_strategy(settings), Grid(20)
    start = ArrayRecord({"w": Array(np.zeros(200_000, np.float32))})
    np.random.seed(0)
    sent = list(strategy.configure_train(1, start, ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, [reply(m, np.zeros(200_000)) for m in sent[:replies]])
    # the released change is (0 + N(0, (noise clip)^2)) / denominator, the denominator fixed
    # in advance (m = 5 drawn, or q N = 5 expected), however many replied
    assert arrays["w"].numpy().std() == pytest.approx(noise * clip / 5, rel=0.01)
    if how == "poisson":
        assert len(sent) != 5  # this draw tests the rescaling


# ------------------------------------------------------------------ resume


def test_a_checkpoint_carries_the_device_accounting_on(tmp_path: Path) -> None:
    settings = device_settings(client_sampling="poisson", out_dir=str(tmp_path))
    original, grid = build_strategy(settings), Grid(20)
    for r in (1, 2):
        run_round(original, r, grid, np.zeros(4))
    Checkpoint(round=2, arrays={"w": np.zeros(4)}, strategy=strategy_state(original), rows=[], seconds=1.0,
               federation_id="f", run_config=settings.to_run_config()).save(tmp_path)
    resumed = build_strategy(settings)
    restore_strategy_state(resumed, Checkpoint.read(tmp_path).strategy)
    resumed.round_offset = 2  # what server/app.py sets: Flower counts the rest from 1
    assert device_epsilon_of(resumed) == pytest.approx(device_epsilon_of(original))
    asked, _ = run_round(resumed, 1, grid, np.zeros(4))  # round 3 of the run
    assert sorted(asked) == sample_clients(grid.get_node_ids(), how="poisson", fraction=0.25, seed=0,
                                           server_round=3)
    expected = RDPAccountant()
    expected.history = [(1.3, 0.25, 3)]
    assert device_epsilon_of(resumed) == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)


# ------------------------------------------------------------------ in words


@pytest.mark.parametrize("how, words", [("fixed", "without replacement"), ("poisson", "Poisson")])
def test_the_summary_names_unit_epsilon_delta_accountant_and_sampling(how: str, words: str) -> None:
    text = guarantee_sentence(device_settings(client_sampling=how), math.nan, device_epsilon=3.21)
    assert "device-level (epsilon=3.21, delta=1e-05)" in text and "the unit is one device" in text
    assert words in text and ("dp_accounting's RDP" if how == "fixed" else "Opacus's RDP") in text
    assert "noise multiplier 1.3" in text and "clipping norm 0.5" in text
