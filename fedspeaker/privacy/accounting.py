"""Epsilon for what the server and the clients actually did: device-level DP-FedAvg under
the device sampling used, and the group bound a speaker gets from utterance-level DP-SGD.

Only the published accountants do the math (Google's dp_accounting, Opacus); this module
says which event each run is, so the epsilon claimed is the one for the sampling done:

- ``fixed`` (Flower's way: m of the N connected devices a round, uniformly without
  replacement): dp_accounting's RDP accountant with ``SampledWithoutReplacementDpEvent``
  (Wang, Balle and Kasiviswanathan 2019, Theorem 27). That bound is for "replace one"
  neighbours (N is public), under which the sum of updates each clipped to norm C has
  l2-sensitivity 2C (one device's update swapped for its opposite), so the Gaussian's
  noise multiplier relative to that sensitivity is half the configured one.
- ``poisson`` (each device independently with probability q): Opacus's RDP or PRV
  accountant at sample rate q, add-or-remove neighbours, sensitivity C.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Sequence

from fedspeaker.errors import ConfigError

SAMPLINGS = ("fixed", "poisson")
# PLD grid of the group bound: coarser than dp_accounting's default (1e-4), which takes
# minutes for large groups; the discretisation is pessimistic, so it only rounds up
GROUP_DISCRETIZATION = 2e-2


class Release(NamedTuple):
    """One round of DP-FedAvg, as the server ran it (a plain tuple in a checkpoint)."""

    noise_multiplier: float  # noise std on the sum of updates over the clipping norm
    sample_size: int  # devices sampled this round (poisson: as drawn, not used by the bound)
    population: int  # devices connected, which the sample was drawn from
    rate: float  # fixed: sample_size / population; poisson: q


def device_epsilon(*, sampling: str, releases: Sequence[Sequence[float]], delta: float,
                   accountant: str = "rdp") -> float:
    """Device-level epsilon of ``releases`` (rounds of DP-FedAvg) under ``sampling``.

    ``accountant`` ("rdp" or "prv") picks Opacus's accountant for Poisson sampling;
    sampling without replacement has only dp_accounting's RDP bound.
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"client-sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    rounds = [Release(*r) for r in releases]
    if not rounds:
        return 0.0
    if sampling == "poisson":
        from fedspeaker.privacy.ledger import epsilon_of

        return epsilon_of(accountant, _merged([(r.noise_multiplier, r.rate, 1) for r in rounds]), delta)
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for (noise, sampled, population), count in _runs([(r.noise_multiplier, int(r.sample_size),
                                                        int(r.population)) for r in rounds]):
        # replace-one sensitivity of a sum of updates clipped to C is 2C
        acct.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=population, sample_size=sampled,
            event=dp_accounting.GaussianDpEvent(noise / 2)), count)
    return float(acct.get_epsilon(delta))


def accountant_words(sampling: str, accountant: str = "rdp") -> str:
    """The accountant and the sampling it credits, as the summary names them."""
    if sampling == "fixed":
        return ("dp_accounting's RDP accountant for sampling without replacement (a fixed number "
                "of devices a round; replace-one neighbours, sensitivity twice the clipping norm)")
    return (f"Opacus's {accountant.upper()} accountant for Poisson sampling (each device "
            "independently each round; add-or-remove neighbours)")


class GroupBound(NamedTuple):
    """The privacy of a group of ``size`` utterances (one speaker's) in one client."""

    size: int
    epsilon: float
    delta: float


def group_epsilon(*, history: Sequence[Sequence[float]], size: int, delta: float) -> float:
    """Epsilon, at ``delta``, for a group of ``size`` examples under DP-SGD with Poisson
    sampling, given the DP-SGD ``history`` ((noise multiplier, sample rate, steps), as an
    Opacus accountant or a PrivacyLedger keeps it).

    The bound: at each step the group's k examples are each sampled with probability q, so
    the group adds j clipped gradients with j ~ Binomial(k, q); against the Gaussian
    without the group that is a mixture of Gaussians with sensitivities 0..k and those
    binomial weights (Ganesh 2024, "Tight group-level DP guarantees for DP-SGD with
    sampling via mixture of Gaussians mechanisms", arXiv:2401.10294), composed over the
    steps with dp_accounting's PLD accountant (``MixtureOfGaussiansDpEvent``). With
    ``size`` 1 it is the sample-level epsilon.
    """
    if size < 1:
        raise ValueError(f"a group has at least one member, got {size}")
    history = _merged([tuple(h) for h in history])
    if not history:
        return 0.0
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from scipy.stats import binom

    acct = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                         value_discretization_interval=GROUP_DISCRETIZATION)
    for noise, rate, steps in history:
        # components that cannot happen are left out (dp_accounting fails on them): with
        # rate 1 the whole group is in every step, a Gaussian of sensitivity ``size``
        mixture = [(float(j), float(w)) for j, w in enumerate(binom.pmf(range(size + 1), size, rate))
                   if w > 0]
        if len(mixture) == 1:
            event = dp_accounting.GaussianDpEvent(float(noise) / mixture[0][0])
        else:
            event = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
                standard_deviation=float(noise), sensitivities=[j for j, _ in mixture],
                sampling_probs=[w / sum(w for _, w in mixture) for _, w in mixture])
        acct.compose(event, int(steps))
    return float(acct.get_epsilon(delta))


def largest_speaker(labels: Sequence[int]) -> int:
    """How many of ``labels`` the most frequent speaker has (0 for none)."""
    return max(Counter(labels).values(), default=0)


def _runs(events: list[tuple]) -> list[tuple[tuple, int]]:
    """Consecutive equal events as (event, count): an accountant composes a count at once."""
    runs: list[tuple[tuple, int]] = []
    for event in events:
        if runs and runs[-1][0] == event:
            runs[-1] = (event, runs[-1][1] + 1)
        else:
            runs.append((event, 1))
    return runs


def _merged(history: list[tuple]) -> list[tuple[float, float, int]]:
    """Consecutive equal (noise, rate) entries as one, with their steps summed."""
    merged: list[tuple[float, float, int]] = []
    for noise, rate, steps in history:
        if merged and merged[-1][:2] == (float(noise), float(rate)):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(noise), float(rate), int(steps)))
    return merged
