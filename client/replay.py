"""A device's last update, kept so that a round asked again is answered again, not retrained.

When a server crashes after a device trained a round but before it saved that round, the
resumed run asks the device for the same round from the same global model. Training it
again would spend privacy a second time (and, with the run at its target, make the device
refuse the run's last round). Sending the same update again releases nothing new: it is
the output already released, so the ledger does not change.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedspeaker.files import atomic_write


def request_key(server_round: int, arrays: ArrayRecord) -> str:
    """The round and a digest of the global weights it came with."""
    digest = hashlib.sha256(str(server_round).encode())
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name].data)
    return digest.hexdigest()


class LastUpdate:
    """One file per run in the device's state folder: the last reply it trained."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, key: str) -> dict[str, Any] | None:
        """The reply stored for ``key`` (state, examples, metrics), or None."""
        if not self.path.exists():
            return None
        try:
            stored = torch.load(self.path, weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable copy only means training again
            return None
        return stored if stored.get("key") == key else None

    def put(self, key: str, state: dict[str, torch.Tensor], examples: int, metrics: dict[str, float]) -> None:
        buffer = io.BytesIO()
        torch.save({"key": key, "state": state, "examples": examples, "metrics": metrics}, buffer)
        atomic_write(self.path, lambda f: f.write(buffer.getvalue()))
