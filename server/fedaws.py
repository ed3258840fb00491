"""FedAwS on the server (Yu et al. 2020, "Federated learning with only positive labels"):
for devices that train only their own speakers' class vectors (class-vectors=own).

A device that knows one speaker, with a positive-only loss, would pull every embedding
to that speaker's vector, and the model would collapse to one point. FedAwS keeps the
class vectors apart on the server instead: after each round, a few gradient steps on its
spreadout penalty, the squared excess of each pair's cosine over a ceiling. A class
vector is updated only by the devices that hold that speaker (averaged over them,
weighted by their examples), not diluted by the devices that sent it back unchanged.

Each client is sent only the class vectors of its own speakers (the rows it said it
trained, ``own-classes``; a client not heard from yet is asked first, with a query
message), the others zero: a device never receives other speakers' class vectors, which
are close to their voiceprints.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedspeaker import wire

CLASS_VECTORS = "head.weight"  # GE2ESpeakerNet's cosine head: one row per training speaker


class OwnClassVectors(Strategy):
    """Wraps a strategy: it aggregates everything but the class vectors as it always does;
    each class vector becomes the mean of its owners' versions, then all are spread out.

    Args:
        strategy: the strategy that aggregates the rest of the model.
        ceiling: pairs of class vectors whose cosine is above this are pushed apart.
        steps: at most this many gradient steps of the spreadout penalty a round.
        lr: their step size (on unit vectors).
        timeout: seconds to wait for the answers to a query (the round's timeout).
    """

    def __init__(self, strategy: Strategy, *, ceiling: float, steps: int = 50, lr: float = 0.5,
                 timeout: float = 3600.0) -> None:
        super().__init__()
        self.strategy = strategy
        self.ceiling, self.steps, self.lr, self.timeout = ceiling, steps, lr, timeout
        self.sent: ArrayRecord | None = None
        self.holds: dict[int, list[int]] = {}  # node id -> the rows it trained when it last replied

    def state_dict(self) -> dict[str, Any]:
        """Which rows each node holds: kept across rounds so each node is asked once."""
        return {"holds": {node: list(rows) for node, rows in self.holds.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.holds = {int(node): [int(r) for r in rows] for node, rows in state["holds"].items()}

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._ask_new_nodes(messages, config, grid)
        return [self._only_own(msg) for msg in messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        sent, self.sent = self.sent, None  # within the round only: not worth a checkpoint's space
        if arrays is None or sent is None:
            return arrays, metrics
        versions = []
        for reply in replies:
            if not reply.has_content() or wire.FEDAWS not in reply.content.config_records:
                continue  # an error, or a client sitting out: no weights
            own = [int(row) for row in reply.content[wire.FEDAWS][wire.OWN_CLASSES]]
            self.holds[reply.metadata.src_node_id] = own
            versions.append((reply.content[wire.ARRAYS][CLASS_VECTORS].numpy(), own,
                             float(reply.content[wire.METRICS].get(wire.NUM_EXAMPLES, 1))))
        start = sent[CLASS_VECTORS].numpy()
        vectors = spread_out(owners_mean(start, versions), ceiling=self.ceiling, steps=self.steps, lr=self.lr)
        arrays[CLASS_VECTORS] = Array(vectors.astype(start.dtype))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self._ask_new_nodes(messages, config, grid)
        return [self._only_own(msg) for msg in messages]

    def _ask_new_nodes(self, messages: list[Message], config: ConfigRecord, grid: Grid) -> None:
        """Ask each node these messages go to and not heard from yet which rows it holds.
        A node that does not answer is sent no class vector."""
        new = sorted({m.metadata.dst_node_id for m in messages} - set(self.holds))
        if not new or wire.SPEAKERS not in config:
            return
        speakers = ConfigRecord({wire.SPEAKERS: config[wire.SPEAKERS]})
        queries = [Message(RecordDict({wire.CONFIG: speakers}), dst_node_id=node,
                           message_type=wire.QUERY_OWN_CLASSES) for node in new]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            if reply.has_content() and wire.FEDAWS in reply.content.config_records:
                self.holds[reply.metadata.src_node_id] = [
                    int(row) for row in reply.content[wire.FEDAWS][wire.OWN_CLASSES]]

    def _only_own(self, msg: Message) -> Message:
        """``msg`` with every class vector but its node's own speakers' zeroed."""
        if not msg.has_content() or wire.ARRAYS not in msg.content.array_records:
            return msg
        arrays = msg.content[wire.ARRAYS]
        vectors = arrays[CLASS_VECTORS].numpy()
        own = np.zeros_like(vectors)
        rows = self.holds.get(msg.metadata.dst_node_id, [])
        own[rows] = vectors[rows]
        content = RecordDict(dict(msg.content.items()))
        content[wire.ARRAYS] = ArrayRecord({key: Array(own) if key == CLASS_VECTORS else array
                                            for key, array in arrays.items()})
        msg.content = content
        return msg

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def owners_mean(start: np.ndarray, versions: list[tuple[np.ndarray, list[int], float]]) -> np.ndarray:
    """Each row: the weighted mean of the versions of the clients that trained it (each
    version: its rows, the rows it trained, its weight), or ``start``'s row where none
    did (no device of that speaker took part)."""
    total = np.zeros(start.shape, dtype=np.float64)
    weight = np.zeros(start.shape[0], dtype=np.float64)
    for rows, own, w in versions:
        total[own] += w * rows[own]
        weight[own] += w
    out = start.astype(np.float64)
    held = weight > 0
    out[held] = total[held] / weight[held, None]
    return out


def spread_out(vectors: np.ndarray, *, ceiling: float, steps: int = 50, lr: float = 0.5) -> np.ndarray:
    """Gradient steps on sum over pairs of relu(cos - ceiling)^2, on the unit vectors,
    until no pair is above ``ceiling`` or ``steps`` are taken; each row keeps its length
    (the head scores cosines, so only directions matter)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    units = torch.tensor(vectors / np.maximum(norms, 1e-12), dtype=torch.float64)
    off_diagonal = ~torch.eye(len(units), dtype=torch.bool)
    for step in range(steps):
        units.requires_grad_(True)
        excess = torch.relu(units @ units.T - ceiling)[off_diagonal]
        if not bool((excess > 0).any()):
            if step == 0:
                return vectors  # already apart: left exactly as they were
            break
        # the mean over a row's pairs, not their sum: a step of the same size whatever the
        # number of speakers (summed, the shared direction of many close pairs throws every
        # vector to the same point)
        (grad,) = torch.autograd.grad(excess.square().sum() / max(1, len(units) - 1), units)
        with torch.no_grad():
            units = units - lr * grad
            units = units / units.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return units.detach().numpy() * norms
