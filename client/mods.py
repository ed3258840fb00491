"""Layers around the ClientApp's train handler (Flower mods), each switched on by the run.

- :func:`secure_aggregation`: Flower's SecAgg+ mod, for SecAgg+ rounds.
- :func:`device_dp_clipping`: Flower's client-side clipping mod, for client-side device-level DP.
- :func:`simulated_scenarios`: dropouts, stragglers and attackers (client/scenarios.py),
  on simulated nodes of a run that asks for them; a device never imports that code.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.node import Node
from fedspeaker import wire
from fedspeaker.config import RunSettings


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod, for the messages of a run with secure aggregation."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def device_dp_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod, when the run asks for client-side device-level DP.

    A client sitting out for its budget, or refusing the run, sends no weights, so it
    bypasses the mod.
    """
    mod = {"client-fixed": fixedclipping_mod,
           "client-adaptive": adaptiveclipping_mod}.get(RunSettings.from_run_config(context.run_config).device_dp)
    if mod is None:
        return call_next(msg, context)
    resting: list[Message] = []

    def train_unless_sat_out(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_content() and wire.sent_no_weights(reply.content):
            resting.append(reply)
            return Message(Error(0, "sent no weights"), reply_to=m)  # the mod passes errors on
        return reply

    out = mod(msg, context, train_unless_sat_out)
    return resting[0] if resting else out


def simulated_scenarios(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The run's simulated scenarios, where there are any and this node is simulated."""
    if not Node.of(context).simulated:
        return call_next(msg, context)
    s = RunSettings.from_run_config(context.run_config)
    if not (s.dropout or s.straggler_fraction or s.byzantine_fraction):
        return call_next(msg, context)
    from client.scenarios import scenario_layer

    return scenario_layer(msg, context, call_next)
