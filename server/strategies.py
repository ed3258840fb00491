"""Flower strategies by name: the one place a new strategy is added."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedspeaker.config import RunSettings
from fedspeaker import wire
from fedspeaker.privacy.accounting import device_epsilon
from server.fedaws import OwnClassVectors
from server.outcomes import RoundOutcome, round_outcome

ReplyObserver = Callable[[int, list[RecordDict], list[int]], None]  # round, replies, their nodes
OutcomeObserver = Callable[[int, RoundOutcome], None]


def build_strategy(settings: RunSettings, on_replies: ReplyObserver | None = None,
                   on_outcome: OutcomeObserver | None = None) -> Strategy:
    """The run's Flower strategy by name, weighted by examples, evaluated on the server.

    Each strategy's own hyperparameters come from the run config; a server learning
    rate of 0 keeps the strategy's own default (FedAvgM 1.0, FedAdam and FedAdagrad
    0.1, FedYogi 0.01).
    """
    s = settings
    common: dict[str, Any] = dict(
        # ScreenedStrategy draws each round's training clients (seeded, fixed or Poisson)
        # and shows the strategy only those, so the strategy takes every one it is shown
        fraction_train=1.0,
        fraction_evaluate=s.fraction_evaluate,  # devices scoring it on their own held-out audio
        min_train_nodes=1,
        min_available_nodes=1,  # ScreenedStrategy waits for num-clients before it draws
        # under user-level DP every client counts the same, as its analysis assumes
        weighted_by_key=wire.NUM_EXAMPLES if s.user_dp == "off" else wire.UNIT_WEIGHT,
    )
    server_lr = {"eta": s.server_lr} if s.server_lr else {}
    fedopt = dict(common, eta_l=s.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **server_lr)
    strategies: dict[str, Callable[[], Strategy]] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=s.proximal_mu),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=s.server_lr or 1.0,
                                   server_momentum=s.server_momentum),
        "fedadam": lambda: FedAdam(**fedopt),
        "fedyogi": lambda: FedYogi(**fedopt),
        "fedadagrad": lambda: FedAdagrad(**{k: v for k, v in fedopt.items()
                                            if k not in ("beta_1", "beta_2")}),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=s.trim_fraction),
        "krum": lambda: Krum(**common, num_malicious_nodes=s.num_malicious),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=s.num_malicious,
                                       num_nodes_to_select=s.krum_select),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=s.num_malicious),
        "qfedavg": lambda: QFedAvg(client_learning_rate=s.lr, q=s.q, train_loss_key=wire.TRAIN_LOSS,
                                   **common),
    }
    wrapped = with_user_dp(strategies[s.strategy](), s)
    if s.class_vectors == "own":
        wrapped = OwnClassVectors(wrapped, ceiling=s.spreadout_cosine, timeout=s.round_timeout)
    return ScreenedStrategy(wrapped, on_replies, drop_unchanged=s.user_dp.startswith("server"),
                            sampling=ClientSampling.of(s), device_dp=DeviceDP.of(s, wrapped),
                            on_outcome=on_outcome)


def with_user_dp(strategy: Strategy, s: RunSettings) -> Strategy:
    """Wrap in Flower's user-level DP strategy the run asks for (or none).

    Flower's wrappers clip and add the noise. The epsilon is fedspeaker's (DeviceDP, for
    fixed clipping around FedAvg, crediting the sampling done), not Flower's accountant,
    which claims no amplification by sampling. Adaptive clipping is accounted by no one.
    """
    if s.user_dp == "off":
        return strategy
    noise, clients = s.user_noise_multiplier, expected_clients(s)
    if s.user_dp in ("server-fixed", "client-fixed"):
        wrapper = (DifferentialPrivacyServerSideFixedClipping if s.user_dp == "server-fixed"
                   else DifferentialPrivacyClientSideFixedClipping)
        return wrapper(strategy, noise, s.user_clip_norm, clients)
    wrapper = (DifferentialPrivacyServerSideAdaptiveClipping if s.user_dp == "server-adaptive"
               else DifferentialPrivacyClientSideAdaptiveClipping)
    # Flower's default noise on the clipped count (clients / 20) must exceed half the
    # noise multiplier; take at least the noise multiplier itself
    return wrapper(strategy, noise, clients, initial_clipping_norm=s.user_clip_norm,
                   clipped_count_stddev=max(clients / 20, noise))


def expected_clients(s: RunSettings) -> int:
    """Clients a round trains: Flower's rule for a fixed number, the expected number (at
    least 1) under Poisson sampling. Flower's DP wrappers divide their noise by it."""
    if s.client_sampling == "poisson":
        return max(1, round(s.num_clients * s.fraction_train))
    return s.clients_per_round


def user_epsilon(strategy: Strategy) -> float:
    """Device-level epsilon so far, for the sampling done; NaN where nothing is accounted."""
    if isinstance(strategy, ScreenedStrategy):
        if strategy.device_dp is None:
            return math.nan
        return strategy.device_dp.epsilon(strategy.device_releases)
    while strategy is not None:  # a bare Flower wrapper given its own accountant
        if hasattr(strategy, "privacy_spent"):
            spent = strategy.privacy_spent()
            return float(spent.epsilon) if spent is not None else math.nan
        strategy = getattr(strategy, "strategy", None)
    return math.nan


@dataclass(frozen=True)
class ClientSampling:
    """Which clients train in a round: a fixed number drawn uniformly without replacement
    (Flower's rule for how many) or each client independently with probability
    ``fraction`` (Poisson). Seeded: the run's seed, the round and the sorted node ids
    decide the draw, so a resumed run draws what the first would have."""

    how: str  # "fixed" or "poisson"
    fraction: float
    min_nodes: int
    population: int  # clients to wait for before drawing
    seed: int
    timeout: float = 3600.0  # seconds to wait for the nodes' partition ids

    @classmethod
    def of(cls, s: RunSettings) -> "ClientSampling":
        return cls(how=s.client_sampling, fraction=s.fraction_train, min_nodes=s.min_train_nodes,
                   population=s.num_clients, seed=s.seed, timeout=s.round_timeout)

    def draw(self, grid: Grid, server_round: int, partitions: dict[int, int]) -> tuple[list[int], int]:
        """The round's clients and how many were connected, once ``population`` are.

        ``partitions`` (node id -> partition id, -1 for a real device) is kept up to date
        here: a simulation's node ids are new random numbers every launch, so the draw
        goes by partition id, which the nodes are asked for once (a query message)."""
        while len(nodes := list(grid.get_node_ids())) < self.population:
            flwr_log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                     len(nodes), self.population)
            time.sleep(1)
        takes_all = self.how == "fixed" and max(int(len(nodes) * self.fraction), self.min_nodes) >= len(nodes)
        if not takes_all:
            _ask_partitions(grid, [n for n in nodes if n not in partitions], partitions, self.timeout)
        chosen = sample_clients(nodes, how=self.how, fraction=self.fraction, min_nodes=self.min_nodes,
                                seed=self.seed, server_round=server_round, partitions=partitions)
        flwr_log(INFO, "configure_train: sampled %d of %d nodes (%s sampling)", len(chosen),
                 len(nodes), self.how)
        return chosen, len(nodes)


def _ask_partitions(grid: Grid, nodes: list[int], partitions: dict[int, int], timeout: float) -> None:
    """Each of ``nodes``'s partition id (-1: a device, or no answer), into ``partitions``."""
    if not nodes:
        return
    queries = [Message(RecordDict({}), dst_node_id=node, message_type=wire.QUERY_PARTITION) for node in nodes]
    partitions.update({node: -1 for node in nodes})
    for answer in grid.send_and_receive(queries, timeout=timeout):
        if answer.has_content() and wire.NODE in answer.content.config_records:
            partitions[answer.metadata.src_node_id] = int(answer.content[wire.NODE][wire.PARTITION_ID])


_SAMPLING_STREAM = 0x5A3B1E  # keeps the draw apart from other uses of the run's seed


def sample_clients(nodes: Sequence[int], *, how: str, fraction: float, min_nodes: int = 1,
                   seed: int, server_round: int, partitions: Mapping[int, int] | None = None) -> list[int]:
    """A round's clients from ``nodes``, the same for the same seed, round and nodes (in
    simulation, the same partitions: ``partitions`` maps node ids to partition ids).

    ``fixed``: max(int(len(nodes) * fraction), min_nodes) of them, uniformly without
    replacement (the number Flower's strategies sample). ``poisson``: each independently
    with probability ``fraction``, so the number varies and may be 0.
    """
    partitions = partitions or {}
    nodes = sorted(nodes, key=lambda n: (partitions.get(n, -1) < 0, partitions.get(n, -1), n))
    rng = np.random.default_rng([seed, server_round, _SAMPLING_STREAM])
    if how == "poisson":
        return [n for n, u in zip(nodes, rng.random(len(nodes))) if u < fraction]
    size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=size, replace=False))]


@dataclass(frozen=True)
class DeviceDP:
    """Device-level DP-FedAvg as the server runs it (Flower's fixed-clipping wrapper around
    FedAvg): how it releases a round and accounts for it. What it has released lives in
    ScreenedStrategy.device_releases, a plain list that a checkpoint keeps.

    The analysis is of the *sum* of the sampled devices' clipped updates plus Gaussian
    noise of std noise * clip, divided by a denominator fixed in advance: the sample size,
    or under Poisson sampling its expectation (McMahan et al. 2018, "Learning
    differentially private recurrent language models", the fixed-denominator estimator).
    Flower's wrapper averages the k updates it gets and adds noise of std
    noise * clip / num_sampled_clients; told k, that is noise * clip on their sum, and
    ``rescaled`` turns the average into the sum over the fixed denominator, which differs
    from k under Poisson sampling, dropouts and clients sitting out. Every round that
    runs is accounted, whether or not it released a model.
    """

    noise_multiplier: float
    clip_norm: float
    sampling: str
    fraction: float
    delta: float
    accountant: str

    @classmethod
    def of(cls, s: RunSettings, wrapped: Strategy) -> "DeviceDP | None":
        """The run's accounting, where its analysis holds (fixed clipping around FedAvg's
        own, linear, aggregation); None elsewhere."""
        inner = getattr(wrapped, "strategy", None)
        if s.user_dp not in ("server-fixed", "client-fixed") or not isinstance(inner, FedAvg) \
                or type(inner).aggregate_train is not FedAvg.aggregate_train:
            return None
        return cls(noise_multiplier=s.user_noise_multiplier, clip_norm=s.user_clip_norm,
                   sampling=s.client_sampling,
                   fraction=s.fraction_train, delta=s.delta, accountant=s.accountant)

    def epsilon(self, releases: Sequence[Sequence[float]]) -> float:
        return device_epsilon(sampling=self.sampling, releases=releases, delta=self.delta,
                              accountant=self.accountant)

    def round_release(self, sampled: int, population: int) -> tuple[float, int, int, float]:
        """One round as the accountant takes it: (noise, sampled, population, rate)."""
        rate = self.fraction if self.sampling == "poisson" else sampled / population
        return (self.noise_multiplier, sampled, population, rate)

    def denominator(self, sampled: int, population: int) -> float:
        """What the round's sum is divided by, fixed before anyone replies."""
        return self.fraction * population if self.sampling == "poisson" else float(sampled)

    def rescaled(self, averaged: ArrayRecord, sent: ArrayRecord, *, replies: int, denominator: float
                 ) -> ArrayRecord:
        """sent + (sum of the clipped updates + noise) / denominator, from Flower's noisy
        average of ``replies`` updates: sent + replies / denominator * (average - sent)."""
        if replies == denominator:
            return averaged  # exactly what Flower released
        return _arrays_like(sent, lambda g, key: g + replies / denominator
                            * (averaged[key].numpy().astype(np.float64) - g))

    def noise_only(self, sent: ArrayRecord, denominator: float) -> ArrayRecord:
        """The release of a round without updates (an empty Poisson draw): noise alone."""
        std = self.noise_multiplier * self.clip_norm / denominator
        # numpy's generator, like Flower's noise: a checkpoint keeps its state
        return _arrays_like(sent, lambda g, key: g + np.random.normal(0.0, std, g.shape))


def _arrays_like(sent: ArrayRecord, new: Callable[[np.ndarray, str], np.ndarray]) -> ArrayRecord:
    """``new(array as float64, key)`` for each of ``sent``'s arrays, in its dtype."""
    return ArrayRecord({key: Array(new(a.numpy().astype(np.float64), key).astype(a.numpy().dtype))
                        for key, a in sent.items()})


class ScreenedStrategy(Strategy):
    """Wraps a strategy: replies holding NaN or infinite weights are dropped, by node,
    replies of clients sitting out for their privacy budget are left out, and every
    reply received is shown to ``on_replies`` first. Who trained, and why the others did
    not (server/outcomes.py), goes to ``on_outcome`` once the round is screened.

    Like Flower's DifferentialPrivacy* wrappers, it delegates everything else, so one
    broken or hostile client costs its own update, not the round. The observer sees all
    replies, where a strategy's own metrics see only those it selects (Krum, Bulyan):
    a client's privacy spend and upload count whether or not it was selected.

    It also draws each round's training clients (``sampling``; the wrapped strategy sees
    only those) and, under device-level DP, releases and accounts each round (``device_dp``).
    """

    def __init__(self, strategy: Strategy, on_replies: ReplyObserver | None = None,
                 drop_unchanged: bool = False, *, sampling: ClientSampling | None = None,
                 device_dp: DeviceDP | None = None, on_outcome: OutcomeObserver | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.on_replies = on_replies
        self.on_outcome = on_outcome
        self.asked = 0  # train messages sent this round
        self.drop_unchanged = drop_unchanged  # Flower's server-side clipping divides by the change
        self.sampling = sampling  # None: the wrapped strategy samples, as Flower's do
        self.device_dp = device_dp
        self.device_releases: list[tuple[float, int, int, float]] = []  # what device_dp accounts
        self.sent: ArrayRecord | None = None
        self.drawn: tuple[int, int] | None = None  # this round's (sampled, connected) clients
        self.round_offset = 0  # rounds done before a resume: Flower counts from 1 again
        self.partitions: dict[int, int] = {}  # node id -> its partition id in simulation (-1: a device)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        server_round += self.round_offset
        if self.sampling is None:
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        else:
            nodes, connected = self.sampling.draw(grid, server_round, self.partitions)
            self.drawn = (len(nodes), connected)
            # a Poisson draw can be empty; under device-level DP it still releases
            messages = list(self.strategy.configure_train(server_round, arrays, config, _Drawn(grid, nodes))
                            ) if nodes else []
        self.asked = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        # in an order set by their content, not by arrival: Flower sums the updates in the
        # order given, and float sums depend on it, so a run (or a resumed run) repeats bit
        # for bit only this way
        replies = sorted(replies, key=_content_key)
        if self.on_replies:
            answered = [r for r in replies if r.has_content()]
            self.on_replies(server_round, [r.content for r in answered],
                            [r.metadata.src_node_id for r in answered])
        kept, dropped = [], []
        for reply in replies:
            if reply.has_content() and (wire.sent_no_weights(reply.content) or not reply.content.array_records):
                continue  # it spent its privacy budget, or its policy refused the run: no weights
            if self.drop_unchanged and reply.has_content() and _unchanged(reply.content, self.sent):
                flwr_log(WARNING, "round %d: left out the update of node %d: it did not change "
                         "the model", server_round, reply.metadata.src_node_id)
                dropped.append(reply)
                continue
            if reply.has_content() and not _all_finite(reply.content):
                flwr_log(WARNING, "round %d: dropped the update of node %d: it holds NaN or "
                         "infinite weights", server_round, reply.metadata.src_node_id)
                dropped.append(reply)
                continue
            kept.append(reply)
        if self.on_outcome:
            self.on_outcome(server_round, round_outcome(self.asked, replies, dropped))
        # needed within the round only: not worth a place in a checkpoint
        sent, drawn, self.sent, self.drawn = self.sent, self.drawn, None, None
        if self.device_dp is None or drawn is None or sent is None:
            if drawn is not None and drawn[0] == 0:
                return None, None  # nobody was drawn: the model stays
            return self.strategy.aggregate_train(server_round, kept)
        return self._device_private(server_round, kept, sent, drawn)

    def _device_private(self, server_round: int, kept: list[Message], sent: ArrayRecord,
                        drawn: tuple[int, int]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg's release for the round, accounted whatever happens to it."""
        self.device_releases.append(self.device_dp.round_release(*drawn))
        denominator = self.device_dp.denominator(*drawn)
        if any(reply.has_error() for reply in kept):
            return self.strategy.aggregate_train(server_round, kept)  # Flower's wrapper releases nothing
        updates = sum(1 for reply in kept if reply.has_content())
        if not updates:
            return self.device_dp.noise_only(sent, denominator), None
        # Flower's wrapper adds noise * clip / num_sampled_clients to the average of the
        # updates: told how many it averages, that is noise * clip on their sum
        self.strategy.num_sampled_clients = updates
        averaged, metrics = self.strategy.aggregate_train(server_round, kept)
        if averaged is None:
            return averaged, metrics
        return self.device_dp.rescaled(averaged, sent, replies=updates, denominator=denominator), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.round_offset, replies)


class _Drawn:
    """The grid as the wrapped strategy sees it in a training round: only the clients drawn."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _content_key(reply: Message) -> tuple[bytes, float]:
    """A reply's place in the canonical order: a digest of its weights, then its epsilon
    (what a reply without weights, sitting out, adds to the round's figures)."""
    if not reply.has_content():
        return b"", -1.0
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(reply.content.array_records):
        for key, array in reply.content.array_records[name].items():
            digest.update(key.encode())
            digest.update(array.data)
    metrics = next(iter(reply.content.metric_records.values()), {})
    epsilon = float(metrics.get(wire.EPSILON, -1.0))
    return digest.digest(), epsilon if epsilon == epsilon else -1.0


def _unchanged(content: RecordDict, sent: ArrayRecord | None) -> bool:
    if sent is None:
        return False
    return all(
        all(np.array_equal(array.numpy(), sent[key].numpy()) for key, array in record.items()
            if key in sent)
        for record in content.array_records.values()
    )


def _all_finite(content: RecordDict) -> bool:
    return all(
        np.isfinite(array.numpy()).all()
        for record in content.array_records.values()
        for array in record.values()
    )
