"""A client's privacy ledger: its DP-SGD history over the whole federation, on disk.

Flower's Opacus example makes a fresh PrivacyEngine every round, so the epsilon it
prints covers one round only. Here a client's accountant history (noise, sampling
rate, steps) is kept in a ledger file on the client and restored before the next
round, so the epsilon reported is what the client has spent over the whole run so far,
even across a resumed run or a restarted SuperNode.

The ledger also says what one DP-SGD sample is (``unit``): an utterance, or under
dp-unit=speaker a speaker, whose steps and sample rates it then counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fedspeaker.errors import FedSpeakerError
from fedspeaker.files import atomic_write

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


class DPSteps(NamedTuple):
    """One round's DP-SGD, as the accountant records it."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyLedger:
    """What one client has spent: Opacus accountant history, with the accountant's name
    and the unit a DP-SGD sample is ("utterance" or "speaker")."""

    accountant: str = "rdp"
    history: History = field(default_factory=list)
    unit: str = "utterance"

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.accountant, self.history, delta)

    def epsilon_after(self, planned: DPSteps, delta: float) -> float:
        """The epsilon this client would have spent after ``planned`` more steps."""
        return epsilon_of(self.accountant, [*self.history, tuple(planned)], delta)

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

    def to_lists(self) -> dict[str, list | str]:
        """Columns, one list per field; the unit where it is not the utterance (ledgers
        written before there was a choice hold none)."""
        columns: dict = {
            "noise": [float(h[0]) for h in self.history],
            "rate": [float(h[1]) for h in self.history],
            "steps": [int(h[2]) for h in self.history],
        }
        if self.unit != "utterance":
            columns["unit"] = self.unit
        return columns

    @classmethod
    def from_lists(cls, accountant: str, columns: dict) -> "PrivacyLedger":
        rows = zip(columns.get("noise", []), columns.get("rate", []), columns.get("steps", []))
        return cls(accountant, [(float(n), float(r), int(s)) for n, r, s in rows],
                   str(columns.get("unit", "utterance")))


def epsilon_of(accountant: str, history: History, delta: float) -> float:
    """Epsilon of a DP-SGD history under Opacus's ``accountant`` ("rdp" or "prv")."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # Opacus takes ~1 s to import: only for DP

    acct = create_accountant(accountant)
    acct.history = list(history)
    return float(acct.get_epsilon(delta))
