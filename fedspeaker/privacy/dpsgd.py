"""Sample-level DP-SGD with Opacus: noise calibration and the private training wrapper.

The one place where a party's training meets Opacus: :func:`dp_sgd` wraps the model,
optimizer and loader, continues the party's ledger (the accountant starts from its
history, and the history it ends with is written back) and picks ghost clipping or
hooks; the training loop gets ready objects and never sees a ledger.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedspeaker.errors import FedSpeakerError
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.privacy.noise import harden

if TYPE_CHECKING:
    from opacus import PrivacyEngine


@contextmanager
def _expected_warnings_quiet() -> Iterator[None]:
    """Opacus warns on every engine about two things that are expected here: the default
    (non-cryptographic) RNG (the noise comes from privacy.noise's generator, hardened), and
    backward hooks on a first layer whose input needs no grad (the frozen features)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class Private(NamedTuple):
    """What a private training loop runs: Opacus's wrapped model, optimizer and Poisson
    loader, and the loss to call (ghost clipping's two-pass loss, or the model's)."""

    model: nn.Module
    optimizer: Optimizer
    loss_fn: Callable[[Tensor, Tensor], Any]
    loader: DataLoader


@contextmanager
def dp_sgd(model: nn.Module, optimizer: Optimizer, loader: DataLoader, loss_fn: Callable[..., Tensor], *,
           ledger: PrivacyLedger, unit: str, noise_multiplier: float, max_grad_norm: float,
           generator: torch.Generator) -> Iterator[Private]:
    """DP-SGD over ``model`` for the ``with`` block, continuing ``ledger``.

    Ghost clipping where the model asks for it (``ghost_clipping``), else Opacus's hooks
    (per-sample gradients, which speaker-level folding needs: its ``PerSpeaker`` wrapper
    asks for no ghost clipping). ``unit`` is what one sample is ("utterance" or
    "speaker"); a ledger holds one. When the block ends, ``ledger.history`` is the
    accountant's, with this block's steps, and the hooks are gone (``model`` keeps the
    trained weights); if the block raises, the ledger is left as it was.
    """
    if ledger.history and ledger.unit != unit:
        raise FedSpeakerError(f"this client's privacy ledger counts {ledger.unit}s, but the run "
                              f"protects {unit}s (dp-unit); one ledger cannot mix the two")
    ledger.unit = unit
    ghost = getattr(model, "ghost_clipping", False)
    with _expected_warnings_quiet():
        engine, dp_model, dp_optimizer, criterion, dp_loader = _private(
            model=model, optimizer=optimizer, loader=loader, ledger=ledger, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, generator=generator, loss_fn=loss_fn if ghost else None)
        yield Private(dp_model, dp_optimizer, criterion if ghost else loss_fn, dp_loader)
    ledger.history = list(engine.accountant.history)
    dp_model.remove_hooks()


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

    Per-sample gradients are materialised (``p.grad_sample``), as speaker-level DP's
    folding needs; :func:`make_private_ghost` clips the same without them, faster.

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
    with _expected_warnings_quiet():
        engine, model, optimizer, _, loader = _private(
            model=model, optimizer=optimizer, loader=loader, ledger=ledger, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, generator=generator, loss_fn=None)
    return engine, model, optimizer, loader


def make_private_ghost(
    *, model: nn.Module, optimizer: Optimizer, loader: DataLoader, ledger: PrivacyLedger,
    noise_multiplier: float, max_grad_norm: float, generator: torch.Generator,
    loss_fn: Callable[..., Tensor],
) -> tuple[PrivacyEngine, nn.Module, Optimizer, Callable[[Tensor, Tensor], Any], DataLoader]:
    """:func:`make_private` with Opacus's ghost clipping: each layer's per-sample gradient
    norms come from its activations and backprops (registered norm samplers), never the
    per-sample gradients themselves (64 copies of the projection's 65k weights a step),
    and a second backward pass of the clipped per-sample losses gives the clipped sum.
    The same clipping factors, noise and accounting as :func:`make_private`.

    ``loss_fn(logits, labels, reduction=...)`` is the model's loss; what comes back in its
    place is the loss to call in training (``.backward()`` runs both passes).
    """
    with _expected_warnings_quiet():
        return _private(model=model, optimizer=optimizer, loader=loader, ledger=ledger,
                        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, generator=generator,
                        loss_fn=loss_fn)


class PerSampleLoss:
    """A loss as Opacus's ghost clipping calls it: it sets ``reduction`` to "none" to get
    the per-sample losses it weighs by their clipping factors."""

    def __init__(self, loss_fn: Callable[..., Tensor]) -> None:
        self.loss_fn, self.reduction = loss_fn, "mean"

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(logits, labels, reduction=self.reduction)


def _private(
    *, model: nn.Module, optimizer: Optimizer, loader: DataLoader, ledger: PrivacyLedger,
    noise_multiplier: float, max_grad_norm: float, generator: torch.Generator,
    loss_fn: Callable[..., Tensor] | None,
) -> tuple[PrivacyEngine, nn.Module, Optimizer, Callable[[Tensor, Tensor], Any] | None, DataLoader]:
    """The engine for :func:`make_private` (``loss_fn`` None: hooks) or ghost clipping."""
    from opacus import PrivacyEngine

    from fedspeaker.privacy import grad_samplers  # noqa: F401  registers our layers' samplers

    engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    common = dict(module=model, optimizer=optimizer, data_loader=loader, noise_generator=generator,
                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True)
    criterion = None
    if loss_fn is None:
        model, optimizer, loader = engine.make_private(**common)
    else:
        model, optimizer, criterion, loader = engine.make_private(
            **common, grad_sample_mode="ghost", criterion=PerSampleLoss(loss_fn))
    # Opacus's Poisson sampler would draw with the loader's own (run-seeded) generator
    loader.batch_sampler.generator = generator
    harden(optimizer)
    return engine, model, optimizer, criterion, loader
