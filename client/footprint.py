"""What a round costs the device: start-up apart from training, and peak memory."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from fedspeaker import wire


def _process_start_monotonic() -> float:
    """When this process started, on the time.monotonic() clock (Linux /proc)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")  # seconds since boot, as CLOCK_MONOTONIC counts
    except (OSError, ValueError, IndexError):
        return time.monotonic()


_PROCESS_STARTED = _process_start_monotonic()
_first_message = True


def footprint(started: float, data_ready: float, fit_seconds: float) -> dict[str, float]:
    """Start-up (process start, imports, loading its features), training seconds, and
    this process's peak memory, as reply metrics.

    A SuperNode starts a fresh ClientApp process per round, so start-up counts from the
    process's own start; a long-lived simulation actor counts only its first round's.
    """
    global _first_message
    startup = data_ready - (_PROCESS_STARTED if _first_message else started)
    _first_message = False
    return {wire.STARTUP_SECONDS: startup, wire.FIT_SECONDS: fit_seconds,
            wire.PEAK_RSS_MB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
