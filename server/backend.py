"""The server's half of the scoring back end: ask every connected node for its
statistics under the current global model, sum the replies that count, and under
device-level DP add the Gaussian noise once to that sum and account for it.

A reply counts only if it carries a sum computed under the weights the server sent (its
fingerprint); an error, no answer, or a node that sat out for its budget is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedspeaker import wire
from fedspeaker.errors import FedSpeakerError
from fedspeaker.privacy.backend_stats import Sums
from fedspeaker.privacy.noise import noise_generator


@dataclass
class Collected:
    """The back end's statistics as the server holds them."""

    sums: Sums
    devices: int  # replies counted
    epsilon_max: float  # the largest sample-level epsilon a counted device reported (NaN: none)
    epsilon_mean: float  # their mean
    refused: int = 0  # devices whose privacy policy sends no statistics for this run


def ask_nodes(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> list[Message]:
    """Every connected node's answer to ``query.backend`` under ``arrays``."""
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
    queries = [Message(content, dst_node_id=node, message_type=wire.QUERY_BACKEND) for node in nodes]
    return list(grid.send_and_receive(queries, timeout=timeout)) if queries else []


def combine(replies: Iterable[Message], fingerprint: str) -> Collected:
    """The sum over the replies that count (see the module's docstring), in an order set by
    their content, not by arrival: float sums depend on it, and a run without DP repeats."""
    total, count, devices, eps, refused = None, 0.0, 0, [], 0
    scatter, without_scatter = None, 0
    for reply in sorted(replies, key=_content_key):
        if reply.has_content() and wire.refusal(reply.content) is not None:
            refused += 1
            continue
        if not reply.has_content() or wire.BACKEND not in reply.content.array_records:
            continue  # an error, or a node that sat out for its budget
        content = reply.content
        if str(content[wire.CONFIG].get(wire.FINGERPRINT, "")) != fingerprint:
            continue  # computed under other weights
        vector = torch.from_numpy(content[wire.BACKEND][wire.BACKEND_SUM].numpy().copy()).float()
        total = vector if total is None else total + vector
        if wire.BACKEND_SCATTER in content[wire.BACKEND]:
            part = torch.from_numpy(content[wire.BACKEND][wire.BACKEND_SCATTER].numpy().copy()).float()
            scatter = part if scatter is None else scatter + part
        else:
            without_scatter += 1
        metrics = content[wire.METRICS]
        count += float(metrics[wire.BACKEND_COUNT])
        devices += 1
        if wire.EPSILON in metrics:
            eps.append(float(metrics[wire.EPSILON]))
    if total is None:
        raise FedSpeakerError("no device answered the back end's query with statistics of the "
                              f"current model ({refused} refused by their privacy policy); the run "
                              "goes on without a back end")
    if scatter is not None and without_scatter:  # older devices: the whitening would be theirs only
        scatter = None
    return Collected(Sums(total, count, scatter), devices, max(eps) if eps else float("nan"),
                     sum(eps) / len(eps) if eps else float("nan"), refused)


def _content_key(reply: Message) -> bytes:
    if not reply.has_content() or wire.BACKEND not in reply.content.array_records:
        return b""
    return reply.content[wire.BACKEND][wire.BACKEND_SUM].data


def device_level_noise(collected: Collected, noise_multiplier: float,
                       generator: torch.Generator | None = None) -> Collected:
    """Device-level DP: each device sent one vector of norm <= 1 (its mean), so the sum gets
    Gaussian noise of std ``noise_multiplier`` on every coordinate, once, here. The count
    (the devices that replied) is what the server sees of every round anyway."""
    noise = torch.randn(collected.sums.total.numel(), generator=generator or noise_generator(None))
    return Collected(Sums(collected.sums.total + noise_multiplier * noise, collected.sums.count),
                     collected.devices, collected.epsilon_max, collected.epsilon_mean, collected.refused)
