"""Decoding an audio file into checked samples: soundfile and numpy only, so the
torch-free device path (fedspeaker/device/edge.py) and the training stack share it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from fedspeaker.errors import AudioError


def decode(path: Path) -> tuple[np.ndarray, int]:
    """The file's mono float32 samples and its rate; AudioError naming the file for
    anything unreadable, empty or not finite."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        # libsndfile says only "System error." for a missing file
        reason = f"not readable audio ({exc})" if Path(path).exists() else "no such file"
        raise AudioError(f"{path}: {reason}") from None
    if data.size == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    return data.mean(axis=1), rate
