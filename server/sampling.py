"""Which clients train in a round: drawn by the server, seeded, so a resumed run draws
what the first would have (the wrapped strategy sees only the clients drawn)."""

from __future__ import annotations

import time
from logging import INFO
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid

from fedspeaker import wire
from fedspeaker.config import RunSettings

_SAMPLING_STREAM = 0x5A3B1E  # keeps the draw apart from other uses of the run's seed


class ClientSampling:
    """A fixed number drawn uniformly without replacement (Flower's rule for how many) or
    each client independently with probability ``fraction`` (Poisson). The run's seed,
    the round and the sorted partition ids decide the draw.

    Args:
        how: "fixed" or "poisson".
        fraction: the share of clients drawn (fixed) or each client's chance (Poisson).
        min_nodes: at least this many under fixed sampling.
        population: clients to wait for before drawing.
        seed: the run's seed.
        timeout: seconds to wait for the nodes' partition ids.
    """

    def __init__(self, *, how: str, fraction: float, min_nodes: int, population: int, seed: int,
                 timeout: float = 3600.0) -> None:
        self.how, self.fraction, self.min_nodes = how, fraction, min_nodes
        self.population, self.seed, self.timeout = population, seed, timeout
        # node id -> its partition id in simulation (-1: a real device, or no answer);
        # kept across rounds so each node is asked once
        self.partitions: dict[int, int] = {}

    @classmethod
    def of(cls, s: RunSettings) -> "ClientSampling":
        return cls(how=s.client_sampling, fraction=s.fraction_train, min_nodes=s.min_train_nodes,
                   population=s.num_clients, seed=s.seed, timeout=s.round_timeout)

    def state_dict(self) -> dict[str, Any]:
        return {"partitions": dict(self.partitions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.partitions = dict(state["partitions"])

    def draw(self, grid: Grid, server_round: int) -> tuple[list[int], int]:
        """The round's clients and how many were connected, once ``population`` are.

        A simulation's node ids are new random numbers every launch, so the draw goes by
        partition id, which the nodes are asked for once (a query message)."""
        while len(nodes := list(grid.get_node_ids())) < self.population:
            flwr_log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                     len(nodes), self.population)
            time.sleep(1)
        takes_all = self.how == "fixed" and max(int(len(nodes) * self.fraction), self.min_nodes) >= len(nodes)
        if not takes_all:
            self._ask_partitions(grid, [n for n in nodes if n not in self.partitions])
        chosen = sample_clients(nodes, how=self.how, fraction=self.fraction, min_nodes=self.min_nodes,
                                seed=self.seed, server_round=server_round, partitions=self.partitions)
        flwr_log(INFO, "configure_train: sampled %d of %d nodes (%s sampling)", len(chosen),
                 len(nodes), self.how)
        return chosen, len(nodes)

    def _ask_partitions(self, grid: Grid, nodes: list[int]) -> None:
        """Each of ``nodes``'s partition id (-1: a device, or no answer)."""
        if not nodes:
            return
        queries = [Message(RecordDict({}), dst_node_id=node, message_type=wire.QUERY_PARTITION) for node in nodes]
        self.partitions.update({node: -1 for node in nodes})
        for answer in grid.send_and_receive(queries, timeout=self.timeout):
            if answer.has_content() and wire.NODE in answer.content.config_records:
                self.partitions[answer.metadata.src_node_id] = int(answer.content[wire.NODE][wire.PARTITION_ID])


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


class DrawnGrid:
    """The grid as the wrapped strategy sees it in a training round: only the clients drawn."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
