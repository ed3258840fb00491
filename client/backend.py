"""A node's answer to ``query.backend``: the clipped sum and count of its training
recordings' raw embeddings under the global model, noised here under sample-level DP
and written into the same privacy ledger as its DP-SGD (fedspeaker/privacy/backend_stats.py)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.errors import FedSpeakerError
from fedspeaker.evaluation.scoring import embed
from fedspeaker.privacy.backend_stats import (
    Sums,
    backend_noise_multiplier,
    clipped_sums,
    noised,
    release_step,
    unit_scatters,
)
from fedspeaker.privacy.ledger import DPSteps, PrivacyLedger
from fedspeaker.privacy.noise import noise_generator
from fedspeaker.training.local import spend_cap


def release_unit(settings: RunSettings) -> str:
    """What one vector of the sum stands for: a device under device-level DP (the server
    adds the noise), else the unit DP-SGD protects (an utterance without DP)."""
    if settings.device_dp != "off":
        return "device"
    return settings.dp_unit if settings.dp else "utterance"


def backend_statistics(settings: RunSettings, model: nn.Module, feats: list[torch.Tensor],
                       labels: list[int], ledger: PrivacyLedger, *,
                       copies: list[torch.Tensor] | None = None,
                       refusal: Callable[[DPSteps | None], str | None] | None = None,
                       generator: torch.Generator | None = None) -> tuple[Sums | None, dict[str, float]]:
    """This party's release and its metrics; ``None`` where it would pass the party's
    spending cap (metrics: sat out), or where ``refusal`` (a device's privacy policy)
    gives a reason (metrics: only ``wire.REFUSAL``, the reason). Under
    sample-level DP ``ledger`` gains the release (the caller records it). ``copies``
    (backend-whiten): each recording with its augmented copies, whose scatter is released too."""
    step = release_step(backend_noise_multiplier(settings)) if settings.backend_privacy else None
    if refusal and (reason := refusal(step)):
        return None, {wire.REFUSAL: reason}
    sums = clipped_sums(embed(model, feats, raw=True), labels, release_unit(settings))
    if copies is not None:
        embedded = torch.stack([embed(model, [c[k] for c in copies], raw=True)
                                for k in range(copies[0].shape[0])], dim=1)
        sums = sums._replace(scatter=unit_scatters(embedded, labels, release_unit(settings)).sum(dim=0))
    if step is None:
        return sums, {wire.BACKEND_COUNT: sums.count}
    cap = spend_cap(settings)
    if cap and ledger.epsilon_after(step, settings.delta) > cap:
        return None, {wire.SAT_OUT: 1, wire.EPSILON: ledger.epsilon(settings.delta)}
    if ledger.history and ledger.unit != settings.dp_unit:
        raise FedSpeakerError(f"this client's privacy ledger counts {ledger.unit}s, but the run "
                              f"protects {settings.dp_unit}s (dp-unit); one ledger cannot mix the two")
    released = noised(sums, step.noise_multiplier, generator or noise_generator(None))
    ledger.unit = settings.dp_unit
    ledger.history.append(tuple(step))
    return released, {wire.BACKEND_COUNT: released.count, wire.EPSILON: ledger.epsilon(settings.delta)}
