"""What one party releases for the scoring back end: a sum of clipped embeddings and a
count, noised on the party itself under sample-level DP and written into its ledger.

Each unit the run protects contributes one vector of norm at most 1 and a count of 1:
an utterance its unit embedding (dp-unit=utterance, and runs without DP), a speaker the
mean of its utterances' unit embeddings (dp-unit=speaker), a device the mean of all of
them (device-level DP, where the server adds the noise once). Adding or removing one
unit moves (sum, count) by at most sqrt(2) in L2 norm, so one release with Gaussian noise
of standard deviation ``sqrt(2) * z`` on every coordinate is the Gaussian mechanism with
noise multiplier ``z``: one step at sample rate 1 in the party's Opacus accountant.

With ``backend-whiten`` each unit also contributes the scatter of its recordings'
augmented copies around their own mean (how degradation moves its embeddings), clipped to
Frobenius norm SCATTER_CLIP and released (its upper triangle) in units of SCATTER_CLIP /
SCATTER_WEIGHT, so one unit moves the release by at most sqrt(2 + SCATTER_WEIGHT^2): the
noise is that times ``z`` on every coordinate, still one step of multiplier ``z``. The
weight puts the noise mostly on the mean, which hundreds of recordings average well,
and little on the scatter's 32,896 coordinates.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from fedspeaker.config import RunSettings
from fedspeaker.privacy.dpsgd import calibrate_noise
from fedspeaker.privacy.ledger import DPSteps

SENSITIVITY = math.sqrt(2.0)  # one unit: a vector of norm <= 1 and a count of 1
SCATTER_WEIGHT = 4.0  # the scatter's share of the release against the mean's and the count's
SCATTER_CLIP = 0.1  # Frobenius norm of one unit's scatter: below most (median 0.13 here), so units weigh alike and the noise is small


class Sums(NamedTuple):
    total: torch.Tensor  # (dim,) sum of the units' clipped vectors
    count: float  # units summed (noisy under DP)
    scatter: torch.Tensor | None = None  # backend-whiten: the summed scatter's upper triangle


def unit_scatters(copies: torch.Tensor, labels: Sequence[int], unit: str) -> torch.Tensor:
    """(recordings, copies, dim) embeddings -> one upper triangle per protected unit: each
    recording's scatter of its copies' unit embeddings around their mean (a speaker's: the
    mean of its recordings'), clipped to SCATTER_CLIP."""
    unit_copies = F.normalize(copies.float(), dim=-1)
    deviations = unit_copies - unit_copies.mean(dim=1, keepdim=True)
    scatters = deviations.transpose(1, 2) @ deviations / unit_copies.shape[1]
    norms = scatters.flatten(1).norm(dim=1).clamp_min(1e-12)
    scatters = scatters * (SCATTER_CLIP / norms).clamp(max=1.0)[:, None, None]
    if unit == "speaker":
        label_tensor = torch.tensor(list(labels))
        scatters = torch.stack([scatters[label_tensor == s].mean(dim=0) for s in sorted(set(labels))])
    elif unit != "utterance":
        raise ValueError(f"a scatter's unit must be utterance or speaker; got {unit!r}")
    rows, cols = torch.triu_indices(scatters.shape[1], scatters.shape[1])
    return scatters[:, rows, cols]


def unit_vectors(embeddings: torch.Tensor, labels: Sequence[int], unit: str) -> torch.Tensor:
    """One vector of norm at most 1 per protected unit: each utterance's unit embedding,
    each speaker's mean of them (``speaker``), or the device's mean (``device``)."""
    unit_embeddings = F.normalize(embeddings.float(), dim=1)
    if unit == "utterance" or not len(unit_embeddings):
        return unit_embeddings
    if unit == "device":
        return unit_embeddings.mean(dim=0, keepdim=True)
    if unit != "speaker":
        raise ValueError(f"unit must be utterance, speaker or device; got {unit!r}")
    label_tensor = torch.tensor(list(labels))
    return torch.stack([unit_embeddings[label_tensor == s].mean(dim=0) for s in sorted(set(labels))])


def clipped_sums(embeddings: torch.Tensor, labels: Sequence[int], unit: str) -> Sums:
    """The exact (un-noised) sum and count of the units' vectors."""
    vectors = unit_vectors(embeddings, labels, unit)
    dim = embeddings.shape[1]
    return Sums(vectors.sum(dim=0) if len(vectors) else torch.zeros(dim), float(len(vectors)))


def backend_noise_multiplier(settings: RunSettings) -> float:
    """z such that the run's back-end releases alone spend ``backend_privacy`` epsilon
    (Opacus's calibration: ``backend_releases`` steps at sample rate 1)."""
    return calibrate_noise(settings.backend_privacy, settings.delta, 1.0, settings.backend_releases,
                           settings.accountant)


def device_backend_noise_multiplier(settings: RunSettings) -> float:
    """Under device-level DP: z (the noise's std, each device's vector having norm <= 1)
    such that the back end's releases alone, every device in each, spend ``backend_share``
    epsilon; the device-level accountant composes them with the rounds'."""
    return calibrate_noise(settings.backend_share, settings.delta, 1.0, settings.backend_releases,
                           settings.accountant)


def release_step(noise_multiplier: float) -> DPSteps:
    """One back-end release as the party's accountant records it."""
    return DPSteps(noise_multiplier, 1.0, 1)


def noised(sums: Sums, noise_multiplier: float, generator: torch.Generator) -> Sums:
    """``sums`` with the Gaussian mechanism's noise (std sqrt(2) * z) on every coordinate
    of the sum and on the count; with a scatter, std sqrt(2 + SCATTER_WEIGHT^2) * z on the
    sum, the count and the scatter in units of SCATTER_CLIP / SCATTER_WEIGHT."""
    if sums.scatter is None:
        std = SENSITIVITY * noise_multiplier
        noise = torch.randn(sums.total.numel() + 1, generator=generator, dtype=torch.float64) * std
        return Sums(sums.total + noise[:-1].float(), sums.count + float(noise[-1]))
    std = math.sqrt(2.0 + SCATTER_WEIGHT ** 2) * noise_multiplier
    dim, size = sums.total.numel(), sums.scatter.numel()
    noise = torch.randn(dim + 1 + size, generator=generator, dtype=torch.float64) * std
    return Sums(sums.total + noise[:dim].float(), sums.count + float(noise[dim]),
                sums.scatter + (SCATTER_CLIP / SCATTER_WEIGHT * noise[dim + 1:]).float())
