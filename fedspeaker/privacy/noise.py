"""Where a party's DP randomness comes from: noise only the device knows.

DP-SGD's Gaussian noise and its Poisson sampling decide what an update reveals; whoever
can regenerate them can subtract the noise. On a device they come from a generator
seeded with 64 bits of the operating system's entropy (``os.urandom``), never from the
run config. Opacus's ``secure_mode`` would use torchcsprng, which the package registry
does not carry; its floating-point hardening (each noise draw a sum of four Gaussians,
arXiv:2107.10138) is switched on here all the same (``harden``). A simulation may keep
the noise seeded (``seeded-noise``) so that a run repeats bit for bit; its privacy
sentence then says the noise is reproducible from the run config.
"""

from __future__ import annotations

import os

import torch


def noise_generator(seed: int | None) -> torch.Generator:
    """A generator for DP noise and sampling: ``seed`` (a simulation's seeded noise), or
    None for one seeded from the operating system's entropy (every device)."""
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return generator


def release_seed(seed: int, party: int, fingerprint: str) -> int:
    """A simulation's seed for one party's back-end release: each release is of another
    encoder (its ``fingerprint``), so each draws other noise, and the run repeats bit for bit."""
    return (seed * 1_000_003 + party * 1_009 + int(fingerprint, 16)) % 2**63


def harden(optimizer: torch.optim.Optimizer) -> None:
    """Draw each noise tensor as Opacus's secure mode does (four Gaussians summed, the
    first draw thrown away), which resists floating-point attacks on the noise; the
    generator stays the one given (Opacus's own secure mode needs torchcsprng)."""
    optimizer.secure_mode = True
