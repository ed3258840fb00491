"""Device-level DP-FedAvg as the server runs it (Flower's fixed-clipping wrapper around
FedAvg): how it releases a round and accounts for it.

The analysis is of the *sum* of the sampled devices' clipped updates plus Gaussian noise
of std noise * clip, divided by a denominator fixed in advance: the sample size, or
under Poisson sampling its expectation (McMahan et al. 2018, "Learning differentially
private recurrent language models", the fixed-denominator estimator). Flower's wrapper
averages the k updates it gets and adds noise of std noise * clip / num_sampled_clients;
told k, that is noise * clip on their sum, and ``rescaled`` turns the average into the
sum over the fixed denominator, which differs from k under Poisson sampling, dropouts
and clients sitting out. Every round that runs is accounted, whether or not it released
a model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from fedspeaker.config import RunSettings
from fedspeaker.privacy.accounting import device_epsilon

Release = tuple[float, int, int, float]  # (noise, sampled, population, rate), as the accountant takes it


class DeviceDP:
    """Releases and accounts the rounds of device-level DP; ``releases`` is what it has
    released so far (the rounds, and the scoring back end's statistics).

    Args:
        noise_multiplier: the Gaussian noise's std over the clipping norm.
        clip_norm: each device's update is clipped to this L2 norm.
        sampling: "fixed" or "poisson" (how the round's devices are drawn).
        fraction: the share drawn (fixed) or each device's chance (Poisson).
        delta: the delta of the epsilon claimed.
        accountant: "rdp" or "prv".
    """

    def __init__(self, *, noise_multiplier: float, clip_norm: float, sampling: str, fraction: float,
                 delta: float, accountant: str) -> None:
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.sampling, self.fraction, self.delta, self.accountant = sampling, fraction, delta, accountant
        self.releases: list[Release] = []

    @classmethod
    def of(cls, s: RunSettings, wrapped: Strategy) -> "DeviceDP | None":
        """The run's accounting, where its analysis holds (fixed clipping around FedAvg's
        own, linear, aggregation); None elsewhere."""
        inner = getattr(wrapped, "strategy", None)
        if s.device_dp not in ("server-fixed", "client-fixed") or not isinstance(inner, FedAvg) \
                or type(inner).aggregate_train is not FedAvg.aggregate_train:
            return None
        return cls(noise_multiplier=s.device_noise_multiplier, clip_norm=s.device_clip_norm,
                   sampling=s.client_sampling, fraction=s.fraction_train, delta=s.delta,
                   accountant=s.accountant)

    def state_dict(self) -> dict[str, Any]:
        return {"device_releases": [tuple(r) for r in self.releases]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.releases = [tuple(r) for r in state["device_releases"]]

    def epsilon(self) -> float:
        """The device-level epsilon of every release so far."""
        return device_epsilon(sampling=self.sampling, releases=self.releases, delta=self.delta,
                              accountant=self.accountant)

    def account(self, release: Release) -> None:
        """A release made elsewhere (the scoring back end's noisy sums)."""
        self.releases.append(release)

    def release(self, strategy: Strategy, server_round: int, kept: list[Message], sent: ArrayRecord,
                drawn: tuple[int, int]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg's release for the round (``strategy``: Flower's fixed-clipping wrapper;
        ``drawn``: the round's sampled and connected clients), accounted whatever happens
        to it."""
        sampled, population = drawn
        rate = self.fraction if self.sampling == "poisson" else sampled / population
        self.releases.append((self.noise_multiplier, sampled, population, rate))
        denominator = self.fraction * population if self.sampling == "poisson" else float(sampled)
        if any(reply.has_error() for reply in kept):
            return strategy.aggregate_train(server_round, kept)  # Flower's wrapper releases nothing
        updates = sum(1 for reply in kept if reply.has_content())
        if not updates:
            return self._noise_only(sent, denominator), None
        # Flower's wrapper adds noise * clip / num_sampled_clients to the average of the
        # updates: told how many it averages, that is noise * clip on their sum
        strategy.num_sampled_clients = updates
        averaged, metrics = strategy.aggregate_train(server_round, kept)
        if averaged is None:
            return averaged, metrics
        return _rescaled(averaged, sent, replies=updates, denominator=denominator), metrics

    def _noise_only(self, sent: ArrayRecord, denominator: float) -> ArrayRecord:
        """The release of a round without updates (an empty Poisson draw): noise alone."""
        std = self.noise_multiplier * self.clip_norm / denominator
        # numpy's generator, like Flower's noise: a checkpoint keeps its state
        return _arrays_like(sent, lambda g, key: g + np.random.normal(0.0, std, g.shape))


def _rescaled(averaged: ArrayRecord, sent: ArrayRecord, *, replies: int, denominator: float) -> ArrayRecord:
    """sent + (sum of the clipped updates + noise) / denominator, from Flower's noisy
    average of ``replies`` updates: sent + replies / denominator * (average - sent)."""
    if replies == denominator:
        return averaged  # exactly what Flower released
    return _arrays_like(sent, lambda g, key: g + replies / denominator
                        * (averaged[key].numpy().astype(np.float64) - g))


def _arrays_like(sent: ArrayRecord, new: Callable[[np.ndarray, str], np.ndarray]) -> ArrayRecord:
    """``new(array as float64, key)`` for each of ``sent``'s arrays, in its dtype."""
    return ArrayRecord({key: Array(new(a.numpy().astype(np.float64), key).astype(a.numpy().dtype))
                        for key, a in sent.items()})
