"""The node a ClientApp runs on, read once from Flower's Context: a device or a simulated client.

A device is a SuperNode started with a folder of its own recordings (node-config
``data-dir``; optionally ``state-dir`` and ``privacy-policy``). Any other node is one of
Flower's Simulation Engine, which gives each node its ``partition-id`` and
``num-partitions``. The handlers ask a :class:`Node`, not the context, which kind they
run on, so the two branches are decided here once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context

from fedspeaker.config import RunSettings
from fedspeaker.privacy.ledger import DeviceLedger
from fedspeaker.privacy.policy import DevicePolicy, device_policy

LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class Node:
    """What the handlers need to know about this node."""

    data_dir: Path | None  # a device's own recordings; None on a simulated node
    state_dir: Path | None  # a device's own folder (ledger, policy, features), if it has one
    partition: int  # a simulated node's shard of the corpus; 0 on a device (see of())
    num_partitions: int
    config: Mapping[str, Any] = field(repr=False)  # the node config, which a device's policy reads

    @classmethod
    def of(cls, context: Context) -> "Node":
        """The one place the node config is read.

        ``partition``: Flower's simulation sets ``partition-id`` on every node; a node
        without one counts as the only partition, 0. A device holds its own data, not a
        partition, and is 0 too, so that its seeds are those of a one-client simulation;
        the server is told -1 instead (:attr:`reported_partition`).
        """
        config = context.node_config
        simulated = "data-dir" not in config
        state = config.get("state-dir")
        return cls(data_dir=None if simulated else Path(str(config["data-dir"])).expanduser(),
                   state_dir=Path(str(state)).expanduser() if state else None,
                   partition=int(config.get("partition-id", 0)) if simulated else 0,
                   num_partitions=int(config.get("num-partitions", 1)),
                   config=config)

    @property
    def simulated(self) -> bool:
        """A node of Flower's Simulation Engine (no folder of its own)."""
        return self.data_dir is None

    @property
    def reported_partition(self) -> int:
        """The partition id the server draws a round's clients by: -1 for a device."""
        return self.partition if self.simulated else -1

    def seeded_noise(self, settings: RunSettings) -> bool:
        """Whether DP noise is drawn from the run's seed: only in a simulation that asks for
        it; a device's noise is never predictable from the run config."""
        return settings.seeded_noise and self.simulated

    def cache_dir(self, settings: RunSettings) -> Path:
        """Where this node caches features: a device's state-dir, else the run's cache."""
        return self.state_dir or settings.feature_cache_dir

    def policy(self) -> DevicePolicy | None:
        """A device's own privacy policy (fedspeaker/privacy/policy.py); None in simulation."""
        return None if self.simulated else device_policy(self.config, self.state_dir)

    def ledger_path(self, settings: RunSettings, run: str) -> Path:
        """Where this client keeps its lifetime privacy ledger: on a device, one file for
        its recordings (in its state-dir, or in the cache under a name for its data-dir), kept
        across every run and federation; a simulated client is a new device in each run (its
        shard is drawn anew), so its file is per run. On disk rather than in Flower's context,
        so a restarted SuperNode or a resumed run goes on counting what was spent."""
        if self.data_dir is None:
            return settings.feature_cache_dir / "client-state" / run / f"partition-{self.partition}" / LEDGER_FILE
        data = str(self.data_dir.resolve())
        root = self.state_dir or (settings.feature_cache_dir / "devices"
                                  / hashlib.sha256(data.encode()).hexdigest()[:16])
        return root / LEDGER_FILE

    def ledger(self, settings: RunSettings, run: str) -> DeviceLedger:
        """This node's ledger (:meth:`ledger_path`), synced to disk on a device; a simulated
        client has no power to lose, and a sync would be half of its query's time."""
        return DeviceLedger(self.ledger_path(settings, run), durable=not self.simulated)
