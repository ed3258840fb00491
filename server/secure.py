"""Secure aggregation with Flower's SecAgg+: the server learns only the sum of updates.

flwr 1.41 offers SecAgg+ through its legacy ServerApp workflows, so this path runs
Flower's DefaultWorkflow with the SecAggPlusWorkflow and Flower's (legacy) FedAvg;
clients answer through Flower's secaggplus_mod (client/app.py). Everything else (central
scoring, the round report) is shared with the plain path in server/app.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Protocol

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import SpeakerData
from fedspeaker import wire
from server.client_metrics import client_figures


class Rounds(Protocol):
    """What this path uses of server/app.py's RoundTracker: the round report's hooks."""

    data: SpeakerData
    federation_id: str
    client_metrics: dict[str, float]  # the round's row columns from its clients' metrics

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord: ...


def run_secure_aggregation(grid: Grid, context: Context, settings: RunSettings, rounds: Rounds,
                           model: torch.nn.Module) -> ArrayRecord:
    """Run every round under SecAgg+; return the final global weights."""
    keys = list(model.state_dict())

    def as_arrays(ndarrays) -> ArrayRecord:
        return ArrayRecord(OrderedDict((k, torch.from_numpy(a.copy())) for k, a in zip(keys, ndarrays)))

    def evaluate(server_round: int, ndarrays, config) -> tuple[float, dict[str, Scalar]]:
        scores = rounds.evaluate(server_round, as_arrays(ndarrays))
        return float(scores["loss"]), dict(scores)

    def fit_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        """Flower's (legacy) train-metrics hook: the row's figures, as on the plain path."""
        rounds.client_metrics = client_figures([m for _, m in results], upload_bytes=math.nan)  # masked vectors
        return dict(rounds.client_metrics)

    s = settings
    strategy = LegacyFedAvg(
        fraction_fit=s.fraction_train, fraction_evaluate=0.0, min_fit_clients=s.min_train_nodes,
        min_evaluate_clients=0, min_available_clients=s.num_clients, evaluate_fn=evaluate,
        # legacy configs carry no lists: the speaker list travels as one string
        on_fit_config_fn=lambda server_round: {wire.SERVER_ROUND: server_round,
                                               wire.SPEAKERS: "\n".join(rounds.data.split.speakers),
                                               wire.FEDERATION_ID: rounds.federation_id},
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
        fit_metrics_aggregation_fn=fit_metrics,
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=s.rounds, round_timeout=s.round_timeout),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=s.secagg_shares, reconstruction_threshold=s.secagg_threshold,
        timeout=s.round_timeout))
    workflow(grid, legacy)
    final = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                             keep_input=True)
    return as_arrays(parameters_to_ndarrays(final))
