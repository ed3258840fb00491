"""What a voiceprint is, in one place: the unit-length mean of a speaker's unit-length
embeddings. The server's scoring, a device's own evaluation and `enroll` all make them
here. It takes a torch tensor or a numpy array and imports neither library's functions,
so that the torch-free device path (fedspeaker/device/edge.py) shares it."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

A = TypeVar("A")  # a torch tensor or a numpy array


def unit(x: A) -> A:
    """Each vector (last axis) over its length, at least 1e-12: torch's F.normalize,
    bit for bit on a tensor (the same norm and division, through tensor methods)."""
    if isinstance(x, np.ndarray):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x / x.norm(2, -1, keepdim=True).clamp_min(1e-12)


def voiceprint(embeddings: A) -> A:
    """One speaker's voiceprint from its embeddings, one per row."""
    return unit(unit(embeddings).mean(0))
