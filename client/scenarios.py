"""Realistic federations in simulation: clients that drop out, lag, or attack.

Which client plays which role is drawn from the run's seed, so every strategy in a
comparison faces the same dropouts, stragglers and attackers. The ClientApp applies
them as a layer around training (:func:`scenario_layer`), and only on simulated nodes
whose run asks for a scenario: a device never imports this module.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from flwr.app import Array, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.messages import TrainRequest, single_array_record
from client.node import Node
from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.training.local import round_seed


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


def flip_labels(settings: RunSettings, partition_id: int, labels: list[int], n_speakers: int) -> list[int]:
    """The label-flip attack, applied to a simulated client's shard as it is loaded (so
    that it trains, enrols and names its classes under them): a Byzantine client of a run
    with attack=label-flip calls speaker i n-1-i; any other keeps its labels."""
    if settings.attack != "label-flip" or not client_role(settings, partition_id).byzantine:
        return labels
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


def scenario_layer(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The scenarios of a simulated run around one train message: a dropout fails (or
    never answers), a straggler is asked for fewer steps, an attacker's weights are
    poisoned on the way out. Label flips (:func:`flip_labels`) happen where a simulated
    client loads its shard (client/data.py)."""
    settings = RunSettings.from_run_config(context.run_config)
    partition_id = Node.of(context).partition
    request = TrainRequest.of(msg)
    server_round = request.server_round
    if drops_out(settings, partition_id, server_round):
        if settings.dropout_mode == "silent":  # answer only after the server stopped waiting
            time.sleep(settings.round_timeout + 1.0)
        raise SimulatedDropout(f"client {partition_id} dropped out of round {server_round} "
                               f"(scenario: dropout={settings.dropout}, {settings.dropout_mode})")
    role = client_role(settings, partition_id)
    if role.straggler:
        for record in msg.content.config_records.values():  # the train config, either format
            if wire.SERVER_ROUND in record:
                record[wire.STEP_FRACTION] = settings.straggler_steps
    reply = call_next(msg, context)
    if not (role.byzantine and settings.attack != "label-flip") or not reply.has_content() \
            or not reply.content.array_records:
        return reply
    sent, trained = single_array_record(msg.content), single_array_record(reply.content)
    keys = list(trained.keys())  # paired in order: both hold the model's tensors, in order
    poisoned = poison_update(
        OrderedDict(zip(keys, (torch.from_numpy(a.numpy().copy()) for a in sent.values()))),
        OrderedDict((k, torch.from_numpy(a.numpy().copy())) for k, a in trained.items()),
        settings.attack, settings.attack_scale, round_seed(settings.seed, partition_id, server_round))
    for key, tensor in poisoned.items():
        trained[key] = Array(tensor.numpy())
    return reply
