"""Realistic federations in simulation: clients that drop out, lag, or attack.

Which client plays which role is drawn from the run's seed, so every strategy in a
comparison faces the same dropouts, stragglers and attackers.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedspeaker.config import RunSettings


class SimulatedDropout(RuntimeError):
    """Raised by a client the dropout scenario takes out of a round."""


@dataclass(frozen=True)
class ClientRole:
    byzantine: bool = False
    straggler: bool = False


def client_role(settings: RunSettings, partition_id: int) -> ClientRole:
    """Fixed for the whole run: round(fraction x clients) of each kind, drawn by seed."""
    def chosen(kind: str, fraction: float) -> bool:
        order = list(range(settings.num_clients))
        random.Random(f"{settings.seed}-{kind}").shuffle(order)
        return partition_id in order[: round(fraction * settings.num_clients)]

    return ClientRole(byzantine=chosen("byzantine", settings.byzantine_fraction),
                      straggler=chosen("straggler", settings.straggler_fraction))


def drops_out(settings: RunSettings, partition_id: int, server_round: int) -> bool:
    """Each sampled client fails each round with probability ``dropout``, independently."""
    return random.Random(f"{settings.seed}-drop-{partition_id}-{server_round}").random() < settings.dropout


def flip_labels(labels: list[int], n_speakers: int) -> list[int]:
    """The label-flip attack: train on wrong speaker names (speaker i called n-1-i)."""
    return [n_speakers - 1 - y for y in labels]


def poison_update(global_state: OrderedDict, local_state: OrderedDict, attack: str, scale: float,
                  seed: int) -> OrderedDict:
    """What a Byzantine client sends instead of its honest weights.

    sign-flip: the global model minus the honest change; scale: the honest change times
    ``scale``; noise: the global model plus Gaussian noise ``scale`` times the honest
    change's spread.
    """
    gen = torch.Generator().manual_seed(seed)
    poisoned = OrderedDict()
    for key, start in global_state.items():
        delta = local_state[key] - start
        if not torch.is_floating_point(delta):
            poisoned[key] = local_state[key]
        elif attack == "sign-flip":
            poisoned[key] = start - delta
        elif attack == "scale":
            poisoned[key] = start + scale * delta
        elif attack == "noise":
            spread = float(delta.std()) if delta.numel() > 1 else float(delta.abs().mean())
            poisoned[key] = start + scale * spread * torch.randn(delta.shape, generator=gen)
        else:
            raise ValueError(f"no weight poisoning for attack {attack!r}")
    return poisoned
