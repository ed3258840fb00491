"""Flower strategies by name: the one place a new strategy is added."""

from __future__ import annotations

from logging import WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
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
from fedspeaker.privacy import SAT_OUT

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
        fraction_evaluate=0.0,  # the server scores the global model centrally
        min_train_nodes=s.min_train_nodes,
        min_available_nodes=s.num_clients,
        weighted_by_key="num-examples",
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
        "qfedavg": lambda: QFedAvg(client_learning_rate=s.lr, q=s.q, train_loss_key="train-loss",
                                   **common),
    }
    return ScreenedStrategy(strategies[s.strategy](), on_replies)


class ScreenedStrategy(Strategy):
    """Wraps a strategy: replies holding NaN or infinite weights are dropped, by node,
    replies of clients sitting out for their privacy budget are left out, and every
    reply received is shown to ``on_replies`` first.

    Like Flower's DifferentialPrivacy* wrappers, it delegates everything else, so one
    broken or hostile client costs its own update, not the round. The observer sees all
    replies, where a strategy's own metrics see only those it selects (Krum, Bulyan):
    a client's privacy spend and upload count whether or not it was selected.
    """

    def __init__(self, strategy: Strategy, on_replies: ReplyObserver | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.on_replies = on_replies

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.on_replies:
            self.on_replies(server_round, [r.content for r in replies if r.has_content()])
        kept = []
        for reply in replies:
            if reply.has_content() and sat_out(reply.content):
                continue  # it spent its privacy budget and sent no weights
            if reply.has_content() and not _all_finite(reply.content):
                flwr_log(WARNING, "round %d: dropped the update of node %d: it holds NaN or "
                         "infinite weights", server_round, reply.metadata.src_node_id)
                continue
            kept.append(reply)
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def sat_out(content: RecordDict) -> bool:
    """A client that stopped training for its epsilon budget says so in its metrics."""
    return any(record.get(SAT_OUT, 0) for record in content.metric_records.values())


def _all_finite(content: RecordDict) -> bool:
    return all(
        np.isfinite(array.numpy()).all()
        for record in content.array_records.values()
        for array in record.values()
    )
