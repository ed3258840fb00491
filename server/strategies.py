"""Flower strategies by name: the one place a new strategy is added."""

from __future__ import annotations

import hashlib
import math
from logging import WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
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

ReplyObserver = Callable[[int, list[RecordDict]], None]


def build_strategy(settings: RunSettings, on_replies: ReplyObserver | None = None) -> Strategy:
    """The run's Flower strategy by name, weighted by examples, evaluated on the server.

    Each strategy's own hyperparameters come from the run config; a server learning
    rate of 0 keeps the strategy's own default (FedAvgM 1.0, FedAdam and FedAdagrad
    0.1, FedYogi 0.01).
    """
    s = settings
    common: dict[str, Any] = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,  # devices scoring it on their own held-out audio
        min_train_nodes=s.min_train_nodes,
        min_available_nodes=s.num_clients,
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
    return ScreenedStrategy(with_user_dp(strategies[s.strategy](), s), on_replies,
                            drop_unchanged=s.user_dp.startswith("server"))


def with_user_dp(strategy: Strategy, s: RunSettings) -> Strategy:
    """Wrap in Flower's user-level DP strategy the run asks for (or none).

    Fixed clipping around plain FedAvg also gets Flower's own RDP accountant (no
    sampling amplification is claimed); Flower has no accountant for the other cases.
    """
    if s.user_dp == "off":
        return strategy
    noise, clients = s.user_noise_multiplier, s.clients_per_round
    if s.user_dp in ("server-fixed", "client-fixed"):
        wrapper = (DifferentialPrivacyServerSideFixedClipping if s.user_dp == "server-fixed"
                   else DifferentialPrivacyClientSideFixedClipping)
        try:
            return wrapper(strategy, noise, s.user_clip_norm, clients, accountant=RdpAccountant(
                PrivacyConfig(target_delta=s.delta, population_size=s.num_clients,
                              neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                              sampling_method=SamplingMethod.NO_AMPLIFICATION)))
        except ValueError:  # Flower accounts for FedAvg only
            return wrapper(strategy, noise, s.user_clip_norm, clients)
    wrapper = (DifferentialPrivacyServerSideAdaptiveClipping if s.user_dp == "server-adaptive"
               else DifferentialPrivacyClientSideAdaptiveClipping)
    # Flower's default noise on the clipped count (clients / 20) must exceed half the
    # noise multiplier; take at least the noise multiplier itself
    return wrapper(strategy, noise, clients, initial_clipping_norm=s.user_clip_norm,
                   clipped_count_stddev=max(clients / 20, noise))


def user_epsilon(strategy: Strategy) -> float:
    """Client-level epsilon from Flower's accountant so far; NaN where there is none."""
    while strategy is not None:
        if hasattr(strategy, "privacy_spent"):
            spent = strategy.privacy_spent()
            return float(spent.epsilon) if spent is not None else math.nan
        strategy = getattr(strategy, "strategy", None)
    return math.nan


class ScreenedStrategy(Strategy):
    """Wraps a strategy: replies holding NaN or infinite weights are dropped, by node,
    replies of clients sitting out for their privacy budget are left out, and every
    reply received is shown to ``on_replies`` first.

    Like Flower's DifferentialPrivacy* wrappers, it delegates everything else, so one
    broken or hostile client costs its own update, not the round. The observer sees all
    replies, where a strategy's own metrics see only those it selects (Krum, Bulyan):
    a client's privacy spend and upload count whether or not it was selected.
    """

    def __init__(self, strategy: Strategy, on_replies: ReplyObserver | None = None,
                 drop_unchanged: bool = False) -> None:
        super().__init__()
        self.strategy = strategy
        self.on_replies = on_replies
        self.drop_unchanged = drop_unchanged  # Flower's server-side clipping divides by the change
        self.sent: ArrayRecord | None = None
        self.round_offset = 0  # rounds done before a resume: Flower counts from 1 again

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        return self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        # in an order set by their content, not by arrival: Flower sums the updates in the
        # order given, and float sums depend on it, so a run (or a resumed run) repeats bit
        # for bit only this way
        replies = sorted(replies, key=_content_key)
        if self.on_replies:
            self.on_replies(server_round, [r.content for r in replies if r.has_content()])
        kept = []
        for reply in replies:
            if reply.has_content() and wire.sat_out(reply.content):
                continue  # it spent its privacy budget and sent no weights
            if self.drop_unchanged and reply.has_content() and _unchanged(reply.content, self.sent):
                flwr_log(WARNING, "round %d: left out the update of node %d: it did not change "
                         "the model", server_round, reply.metadata.src_node_id)
                continue
            if reply.has_content() and not _all_finite(reply.content):
                flwr_log(WARNING, "round %d: dropped the update of node %d: it holds NaN or "
                         "infinite weights", server_round, reply.metadata.src_node_id)
                continue
            kept.append(reply)
        self.sent = None  # needed within the round only: not worth a place in a checkpoint
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.round_offset, replies)


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
