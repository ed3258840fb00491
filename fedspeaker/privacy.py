"""Sample-level DP-SGD with Opacus, with the privacy ledger kept across rounds.

Flower's Opacus example makes a fresh PrivacyEngine every round, so the epsilon it
prints covers one round only. Here a client's accountant history (noise, sampling
rate, steps) is kept in a ledger file on the client and restored before the next round,
so the epsilon reported is what the client has spent over the whole run so far.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedspeaker.errors import FedSpeakerError
from fedspeaker.files import atomic_write

if TYPE_CHECKING:
    from opacus import PrivacyEngine

UNIT_WEIGHT = "unit-weight"  # reply metric = 1: equal weights for user-level DP averaging
SAT_OUT = "sat-out-for-budget"  # reply metric of a client that stopped for its epsilon budget
FEDERATION_ID = "federation-id"  # train config: one id per federation, kept on resume; a
# client's privacy ledger file is keyed by it, so its epsilon survives any restart
History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


class DPSteps(NamedTuple):
    """One round's DP-SGD, as the accountant records it."""

    noise_multiplier: float
    sample_rate: float
    steps: int

# Opacus warns on every engine about two things that are expected here: the default
# (non-cryptographic) RNG, and backward hooks on a first layer whose input needs no grad.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class PrivacyLedger:
    accountant: str = "rdp"
    history: History = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        return _epsilon(self.accountant, self.history, delta)

    def epsilon_after(self, planned: DPSteps, delta: float) -> float:
        """The epsilon this client would have spent after ``planned`` more steps."""
        return _epsilon(self.accountant, [*self.history, tuple(planned)], delta)

    def save(self, path: Path) -> None:
        atomic_write(path, lambda f: f.write(json.dumps(self.to_lists()).encode()))

    @classmethod
    def load(cls, path: Path, accountant: str) -> "PrivacyLedger":
        """The ledger kept at ``path``, or a new one. An unreadable ledger is an error,
        never a fresh start: that would forget the privacy already spent."""
        if not path.exists():
            return cls(accountant)
        try:
            return cls.from_lists(accountant, json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise FedSpeakerError(f"{path}: unreadable privacy ledger ({exc}); this client will "
                                  "not train until it is restored or the federation restarts "
                                  "with a new id") from None

    def to_lists(self) -> dict[str, list]:
        """Columns, one list per field."""
        return {
            "noise": [float(h[0]) for h in self.history],
            "rate": [float(h[1]) for h in self.history],
            "steps": [int(h[2]) for h in self.history],
        }

    @classmethod
    def from_lists(cls, accountant: str, columns: dict) -> "PrivacyLedger":
        rows = zip(columns.get("noise", []), columns.get("rate", []), columns.get("steps", []))
        return cls(accountant, [(float(n), float(r), int(s)) for n, r, s in rows])


def sat_out(content) -> bool:
    """A client that stopped training for its epsilon budget says so in its reply metrics."""
    return any(record.get(SAT_OUT, 0) for record in content.metric_records.values())


def _epsilon(accountant: str, history: History, delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # Opacus takes ~1 s to import: only for DP

    acct = create_accountant(accountant)
    acct.history = list(history)
    return float(acct.get_epsilon(delta))


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
    model: nn.Module, optimizer: Optimizer, loader: DataLoader, ledger: PrivacyLedger,
    noise_multiplier: float, max_grad_norm: float,
) -> tuple[PrivacyEngine, nn.Module, Optimizer, DataLoader]:
    """Wrap for DP-SGD with Poisson sampling; the engine's accountant continues ``ledger``."""
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
    )
    return engine, model, optimizer, loader


def guarantee_sentence(settings, epsilon: float, user_epsilon: float = math.nan) -> str:
    """The guarantee in one plain sentence per kind of DP, for summaries and the README."""
    sentences = []
    if settings.dp:
        sentences.append(
            f"Each client's training utterances are protected by sample-level "
            f"(epsilon={epsilon:.2f}, delta={settings.delta:g}) differential privacy over the "
            f"whole run (Opacus DP-SGD, {settings.accountant.upper()} accountant, clipping norm "
            f"{settings.max_grad_norm:g}); the bound is the largest any client spent"
            + (f", and no client trained past its budget of epsilon={settings.epsilon_budget:g}."
               if settings.epsilon_budget else "."))
    if settings.user_dp != "off":
        how = (f"Flower's {settings.user_dp.replace('-', '-side ', 1)} clipping wrapper, noise "
               f"multiplier {settings.user_noise_multiplier:g}, clipping norm {settings.user_clip_norm:g}")
        if math.isnan(user_epsilon):
            sentences.append(f"Each client's whole contribution gets user-level DP noise ({how}); "
                             "flwr 1.41 accounts epsilon only for fixed clipping around FedAvg, so "
                             "no epsilon is claimed for this run.")
        else:
            sentences.append(f"Each client's whole contribution is protected by user-level "
                             f"(epsilon={user_epsilon:.2f}, delta={settings.delta:g}) differential "
                             f"privacy over the run ({how}; Flower's RDP accountant, no sampling "
                             "amplification claimed).")
    return " ".join(sentences) or "no differential privacy"
