"""Evaluation without central data: devices score the global model on their own audio.

Wraps the run's strategy. Each of Flower's evaluate messages also carries the model's
accept threshold and impostor embeddings from the server's public cohort (recordings
the operator owns, of speakers no device holds), both under the current model; each
device replies with counts (client/evaluate.py), which are summed here. What the
server learns is those counts, never a recording or an embedding of a device's speaker.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedspeaker import wire

CohortFn = Callable[[ArrayRecord], tuple[float, torch.Tensor]]  # arrays -> threshold, cohort
CountsFn = Callable[[int, dict[str, int]], None]


class DeviceEvaluation(Strategy):
    """The wrapped strategy, with the threshold and cohort added to evaluate messages and
    the devices' counts summed (``on_counts``), in place of averaging their metrics."""

    def __init__(self, strategy: Strategy, *, cohort: CohortFn, on_counts: CountsFn) -> None:
        super().__init__()
        self.strategy = strategy
        self.cohort = cohort
        self.on_counts = on_counts

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if messages:
            threshold, cohort = self.cohort(arrays)
            for message in messages:  # Flower's strategies share one content among them
                message.content[wire.CONFIG][wire.THRESHOLD] = threshold
                message.content[wire.COHORT] = ArrayRecord({wire.COHORT_EMBEDDINGS: cohort.contiguous()})
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        totals = dict.fromkeys(wire.EVALUATION_COUNTS, 0)
        for reply in replies:
            if reply.has_content():
                metrics = reply.content[wire.METRICS]
                for key in totals:
                    totals[key] += int(metrics.get(key, 0))
        totals["devices"] = sum(1 for reply in replies if reply.has_content())
        self.on_counts(server_round, totals)
        return MetricRecord(totals)
