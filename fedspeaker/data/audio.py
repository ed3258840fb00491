"""Decode audio with soundfile (torchaudio.load needs FFmpeg) and bring it to one rate."""

from __future__ import annotations

from pathlib import Path

import torch
import torchaudio.functional as AF

from fedspeaker.data.decode import decode
from fedspeaker.errors import AudioError

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.3
AUDIO_SUFFIXES = (".wav", ".flac")


def load_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Return a mono float waveform of shape (samples,) at ``sample_rate``.

    Raises AudioError naming the file for anything that is not usable speech.
    """
    samples, rate = decode(path)
    wave = torch.from_numpy(samples)
    if rate != sample_rate:
        wave = AF.resample(wave, orig_freq=rate, new_freq=sample_rate)
    if wave.numel() < MIN_SECONDS * sample_rate:
        seconds = wave.numel() / sample_rate
        raise AudioError(f"{path}: too short ({seconds:.2f} s, need at least {MIN_SECONDS} s)")
    return wave
