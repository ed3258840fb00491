"""A train message in, a reply out: the two formats a fedspeaker client speaks.

Plain rounds use the Message API (``arrays`` + ``config`` in, ``arrays`` + ``metrics``
out); SecAgg+ rounds speak Flower's legacy Fit messages (FitIns / FitRes records), as
flwr 1.41's SecAgg+ workflow needs. Both are read and written here, so the rest of the
client sees one kind of request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedspeaker import wire

LEGACY_PARAMETERS = "fitins.parameters"  # SecAgg+ runs speak Flower's legacy Fit messages


@dataclass
class TrainRequest:
    """The server's train message, whichever format it came in."""

    msg: Message
    fitins: FitIns | None  # legacy (SecAgg+) rounds only

    @classmethod
    def of(cls, msg: Message) -> "TrainRequest":
        legacy = LEGACY_PARAMETERS in msg.content.array_records
        return cls(msg, compat.recorddict_to_fitins(msg.content, keep_input=True) if legacy else None)

    @property
    def config(self) -> Mapping[str, Any]:
        return self.fitins.config if self.fitins else self.msg.content[wire.CONFIG]

    @property
    def server_round(self) -> int:
        return int(self.config[wire.SERVER_ROUND])

    @property
    def speakers(self) -> list[str]:
        return wire.speakers_from_config(self.config)

    @property
    def federation_id(self) -> str:
        return str(self.config.get(wire.FEDERATION_ID, ""))

    @property
    def proximal_mu(self) -> float:
        return float(self.config.get(wire.PROXIMAL_MU, 0.0))  # sent by FedProx

    @property
    def step_fraction(self) -> float:
        return float(self.config.get(wire.STEP_FRACTION, 1.0))

    def global_state(self, model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
        """The global weights, keyed as ``model``'s state dict."""
        if self.fitins is None:
            return self.msg.content[wire.ARRAYS].to_torch_state_dict()
        return OrderedDict((k, torch.from_numpy(a.copy())) for k, a in
                           zip(model.state_dict(), parameters_to_ndarrays(self.fitins.parameters)))

    def reply(self, state: Mapping[str, torch.Tensor], num_examples: int,
              metrics: dict[str, float], *, own_classes: list[int] | None = None) -> Message:
        """The trained weights and this round's metrics, in the request's format; under
        class-vectors=own, the head rows this client trained (``own_classes``)."""
        if self.fitins:
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([t.numpy() for t in state.values()]),
                            num_examples, metrics)
            return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=self.msg)
        content = RecordDict({wire.ARRAYS: ArrayRecord(OrderedDict(state)),
                              wire.METRICS: MetricRecord(metrics)})
        if own_classes is not None:
            content[wire.FEDAWS] = ConfigRecord({wire.OWN_CLASSES: own_classes})
        return Message(content=content, reply_to=self.msg)

    def reply_without_weights(self, metrics: dict[str, float]) -> Message:
        """A reply that carries metrics only: a client sitting out for its budget."""
        return Message(content=RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=self.msg)

    def refuse(self, reason: str, metrics: dict[str, float]) -> Message:
        """No weights, and why: the device's privacy policy does not accept this run."""
        return Message(content=RecordDict({wire.METRICS: MetricRecord(metrics),
                                           wire.REFUSAL: ConfigRecord({wire.REASON: reason})}),
                       reply_to=self.msg)


def single_array_record(content: RecordDict) -> ArrayRecord:
    """The weights a train message or reply carries (either format holds one ArrayRecord)."""
    (record,) = content.array_records.values()
    return record
