"""Sample-level DP-SGD with Opacus: noise calibration and the private training wrapper."""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.privacy.noise import harden

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus warns on every engine about two things that are expected here: the default
# (non-cryptographic) RNG, and backward hooks on a first layer whose input needs no grad.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@lru_cache(maxsize=64)  # the search costs seconds; every round asks the same question
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str) -> float:
    """Noise multiplier that keeps ``epochs`` epochs of DP-SGD within (epsilon, delta)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
            epochs=epochs, accountant=accountant,
        )
    )


def make_private(
    *, model: nn.Module, optimizer: Optimizer, loader: DataLoader, ledger: PrivacyLedger,
    noise_multiplier: float, max_grad_norm: float, generator: torch.Generator,
) -> tuple[PrivacyEngine, nn.Module, Optimizer, DataLoader]:
    """Wrap for DP-SGD with Poisson sampling; the engine's accountant continues ``ledger``.

    Args:
        model: the module to train; only its parameters with ``requires_grad`` are
            clipped and noised.
        optimizer: over those parameters.
        loader: the client's data; replaced by Opacus's Poisson-sampling loader.
        ledger: what this client has spent before; the engine's accountant starts there.
        noise_multiplier: Gaussian noise std over the clipping norm.
        max_grad_norm: per-sample gradient clipping norm.
        generator: draws the noise and the Poisson sampling (privacy.noise): on a device
            one seeded from the operating system, never from the run config.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_generator=generator,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
    )
    # Opacus's Poisson sampler would draw with the loader's own (run-seeded) generator
    loader.batch_sampler.generator = generator
    harden(optimizer)
    return engine, model, optimizer, loader
