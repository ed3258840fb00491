"""Flower strategies by name: the one place a new strategy is added."""

from __future__ import annotations

from logging import WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedspeaker.config import RunSettings

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


def build_strategy(settings: RunSettings, train_metrics_aggr_fn: MetricsAggregation) -> Strategy:
    """The run's strategy, weighted by examples, with server-side evaluation only."""
    common = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=0.0,  # the server scores the global model centrally
        min_train_nodes=1,
        min_available_nodes=settings.num_clients,
        weighted_by_key="num-examples",
        train_metrics_aggr_fn=train_metrics_aggr_fn,
    )
    strategies = {"fedavg": lambda: FedAvg(**common)}
    return DropNonFiniteUpdates(strategies[settings.strategy]())


class DropNonFiniteUpdates(Strategy):
    """Wraps a strategy; replies holding NaN or infinite weights are dropped, by node.

    Like Flower's DifferentialPrivacy* wrappers, it delegates everything else, so one
    broken or hostile client costs its own update, not the round.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = []
        for reply in replies:
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


def _all_finite(content: RecordDict) -> bool:
    return all(
        np.isfinite(array.numpy()).all()
        for record in content.array_records.values()
        for array in record.values()
    )
