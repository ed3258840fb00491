"""A client's privacy ledger: its DP-SGD history, kept on the device for its whole life.

Flower's Opacus example makes a fresh PrivacyEngine every round, so the epsilon it
prints covers one round only. Here a client's accountant history (noise, sampling
rate, steps) is kept in a ledger file on the client and restored before the next
round, so the epsilon reported is what the client has spent over the whole run so far,
even across a resumed run or a restarted SuperNode. The file (``DeviceLedger``) holds
every run that ever trained on the device's recordings, so their epsilon also composes
over the device's life (``PrivacyLedger.lifetime_epsilon``), whatever federation asks.

The ledger also says what one DP-SGD sample is (``unit``): an utterance, or under
dp-unit=speaker a speaker, whose steps and sample rates it then counts.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

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
    """What one client has spent in this run: Opacus accountant history, with the
    accountant's name and the unit a DP-SGD sample is ("utterance" or "speaker");
    ``earlier``: the steps every other run spent on the same recordings."""

    accountant: str = "rdp"
    history: History = field(default_factory=list)
    unit: str = "utterance"
    earlier: History = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.accountant, self.history, delta)

    def epsilon_after(self, planned: DPSteps, delta: float) -> float:
        """The epsilon this client would have spent after ``planned`` more steps."""
        return epsilon_of(self.accountant, [*self.history, tuple(planned)], delta)

    def lifetime_epsilon(self, delta: float, planned: DPSteps | None = None) -> float:
        """Epsilon over every run on these recordings (after ``planned`` more steps).
        Runs that protected speakers compose with those that protected utterances as
        they are: a speaker-level step is at least as private for one utterance."""
        extra = [tuple(planned)] if planned else []
        return epsilon_of(self.accountant, [*self.earlier, *self.history, *extra], delta)

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


class DeviceLedger:
    """One file per device (per set of recordings): every run that ever trained on them,
    by run (federation id), so a resumed run counts its steps once and a new run starts
    from what the others spent. Ledgers of the older one-file-per-federation layout
    (``ledgers/<federation>.json`` beside it) are folded in. A file lock keeps two runs
    on one device from losing each other's steps."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable  # synced to disk: a power cut must not forget spent privacy

    def open(self, run: str, accountant: str) -> PrivacyLedger:
        """This run's ledger, with every other run's steps as ``earlier``."""
        with self._locked():
            runs = self._runs()
        ledger = PrivacyLedger.from_lists(accountant, runs.get(run, {}))
        ledger.earlier = [step for other, columns in runs.items() if other != run
                          for step in PrivacyLedger.from_lists(accountant, columns).history]
        return ledger

    def record(self, run: str, ledger: PrivacyLedger) -> None:
        """Write this run's steps, keeping every other run's as the file has them now."""
        with self._locked():
            runs = self._runs()
            runs[run] = ledger.to_lists()
            atomic_write(self.path, lambda f: f.write(json.dumps({"runs": runs}, indent=1).encode()),
                         durable=self.durable)

    def _runs(self) -> dict[str, dict]:
        runs: dict[str, dict] = {}
        old = self.path.parent / "ledgers"
        for path in sorted(old.glob("*.json")) if old.is_dir() else []:
            runs[path.stem] = PrivacyLedger.load(path, "rdp").to_lists()
        if self.path.exists():
            try:
                runs.update(dict(json.loads(self.path.read_text())["runs"]))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise FedSpeakerError(f"{self.path}: unreadable privacy ledger ({exc}); this device "
                                      "will not train until it is restored: a fresh start would "
                                      "forget the privacy its recordings already spent") from None
        return runs

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def epsilon_of(accountant: str, history: History, delta: float) -> float:
    """Epsilon of a DP-SGD history under Opacus's ``accountant`` ("rdp" or "prv")."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # Opacus takes ~1 s to import: only for DP

    acct = create_accountant(accountant)
    acct.history = list(history)
    return float(acct.get_epsilon(delta))
