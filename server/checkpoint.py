"""What the server needs to go on after it was stopped: saved after every round.

A checkpoint holds the global arrays (in the strategy's own dtype: FedAdam computes in
float64 and goes on from the arrays it sent, so a float32 copy would drift), the strategy's state (FedAdam's moments, FedAvgM's
momentum, the adaptive clipping norm, the device-level releases...), the report rows so far,
the federation's id (clients key their privacy ledgers by it), the server's random
state and the release candidate (the best round so far and its arrays).

The strategy's state is one dict per strategy in the wrapping chain, each exactly what
that strategy carries from round to round: our wrappers' own ``state_dict()``, and for
Flower's strategies the attributes in FLOWER_STATE. A checkpoint written before
(ad8df77 and earlier: every non-function attribute) still loads: those dicts hold the
same keys, among others. One written before device-level DP had one name (user-dp,
user_epsilon) reads back under today's: its run config through saved_run_config, its
rows through current_row.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvgM,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from fedspeaker.config import RunSettings, saved_run_config
from fedspeaker.errors import ConfigError
from fedspeaker.files import atomic_write
from fedspeaker.reporting.run_report import current_row

FILENAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int  # the last finished round
    arrays: dict[str, np.ndarray]  # the global arrays exactly as the strategy made them
    strategy: list[dict[str, Any]]  # one dict per strategy in the wrapping chain
    rows: list[dict[str, float]]
    seconds: float  # wall seconds of the run up to this round
    federation_id: str
    run_config: dict[str, Any]
    random_state: dict[str, Any] = field(default_factory=dict)
    # release=best: the best round so far by validation, {"round", "arrays"}; None otherwise
    release: dict[str, Any] | None = None

    def save(self, out_dir: Path) -> Path:
        """Atomically: a server killed while writing leaves the previous checkpoint."""
        # protocol 4 stores the arrays' bytes as they are; torch's default (2) spends
        # about half as much again on them
        atomic_write(out_dir / FILENAME, lambda f: torch.save(self.__dict__, f, pickle_protocol=4))
        return out_dir / FILENAME

    @classmethod
    def read(cls, out_dir: Path) -> "Checkpoint":
        """The checkpoint in ``out_dir``, unchecked; a clear error if there is none."""
        path = out_dir / FILENAME
        if not path.exists():
            raise ConfigError(f"resume: {path} not found; a run can only be resumed from the "
                              "out-dir of a run that finished at least one round")
        try:
            checkpoint = cls(**torch.load(path, map_location="cpu", weights_only=False))
        except (OSError, EOFError, pickle.UnpicklingError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"resume: {path} is not a readable checkpoint ({exc})") from None
        checkpoint.rows = [current_row(r) for r in checkpoint.rows]  # resumed under today's columns
        return checkpoint

    @classmethod
    def load(cls, settings: RunSettings) -> "Checkpoint":
        """The run's checkpoint, checked against the settings it is resumed with."""
        return cls.read(settings.out_dir_path).check(settings)

    def check(self, settings: RunSettings) -> "Checkpoint":
        """Itself, if ``settings`` are the checkpointed run's and rounds are left to run."""
        # read from out-dir itself, wherever it is now; the app's signature changes with any
        # edit of the app, which a resume may need (a fix), and is checked by the devices
        ignore = {"resume", "out-dir", "fab-signature"}
        saved, now = saved_run_config(self.run_config), settings.to_run_config()
        changed = sorted(k for k in saved.keys() | now.keys()
                         if k not in ignore and saved.get(k) != now.get(k))
        if changed:
            raise ConfigError("resume: the run config differs from the checkpointed run in "
                              + ", ".join(f"{k} ({saved.get(k)!r} then, {now.get(k)!r} now)" for k in changed))
        if self.round >= settings.rounds:
            raise ConfigError(f"resume: all {settings.rounds} rounds of {settings.out_dir_path} "
                              "are done already")
        return self


# What Flower's strategies carry from one round to the next (the rest is their settings,
# or set afresh in each round's configure_train)
FLOWER_STATE: dict[type, tuple[str, ...]] = {
    FedOpt: ("m_t", "v_t"),  # FedAdam's, FedYogi's, FedAdagrad's moments
    FedAvgM: ("current_arrays", "momentum_vector"),
    DifferentialPrivacyServerSideAdaptiveClipping: ("clipping_norm",),
    DifferentialPrivacyClientSideAdaptiveClipping: ("clipping_norm",),
}


def strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """The state of the strategy and of each strategy it wraps, outermost first."""
    return [s.state_dict() if hasattr(s, "state_dict") else
            {k: _portable(getattr(s, k)) for k in _flower_state(s)} for s in _chain(strategy)]


def restore_strategy_state(strategy: Strategy, state: list[dict[str, Any]]) -> None:
    chain = _chain(strategy)
    if len(chain) != len(state):
        raise ConfigError("resume: the checkpoint's strategy does not match this run's")
    for s, saved in zip(chain, state):
        if hasattr(s, "load_state_dict"):
            s.load_state_dict(saved)
        else:
            vars(s).update({k: _restored(saved[k]) for k in _flower_state(s)})


def _flower_state(strategy: Strategy) -> tuple[str, ...]:
    return next((names for kind, names in FLOWER_STATE.items() if isinstance(strategy, kind)), ())


@dataclass
class _Arrays:
    """An ArrayRecord, saved as numpy copies: on a SuperLink its arrays are views of
    received messages (memoryview), which cannot be pickled."""

    arrays: dict[str, np.ndarray]


def _portable(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return _Arrays({k: np.array(a.numpy(), copy=True) for k, a in value.items()})
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_portable(v) for v in value)
    return value


def _restored(value: Any) -> Any:
    if isinstance(value, _Arrays):
        return ArrayRecord({k: Array(a) for k, a in value.arrays.items()})
    if isinstance(value, dict):
        return {k: _restored(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_restored(v) for v in value)
    return value


def portable_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return _portable(arrays).arrays


def restored_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return _restored(_Arrays(arrays))


def random_state() -> dict[str, Any]:
    """The server's random generators (Flower samples clients with `random`; the DP
    wrappers draw noise with numpy), so a resumed run draws what the first would have."""
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_random_state(state: dict[str, Any]) -> None:
    if state:
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


def _chain(strategy: Strategy) -> list[Strategy]:
    chain = []
    while isinstance(strategy, Strategy):
        chain.append(strategy)
        strategy = getattr(strategy, "strategy", None)  # how Flower's DP wrappers hold theirs
    return chain
