"""A model's input features, computed once per file and cached on disk: torchaudio
filterbanks or MFCCs (the TDNN), or the pretrained GE2E encoder's frozen LSTM states
(fine-tuning GE2E: its lower layers never change, so their output is a feature too).

The cache key is the audio file's content hash plus the feature parameters, so a
renamed file still hits and a changed file or setting misses. Files that fail to
decode are cached too (as their error message): a second run decodes no audio.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedspeaker.config import RunSettings
from fedspeaker.data import audio
from fedspeaker.errors import AudioError
from fedspeaker.files import atomic_write

log = logging.getLogger(__name__)

_VERSION = 1  # bump when the computation below changes


@dataclass(frozen=True)
class FeatureSpec:
    kind: str = "fbank"  # "fbank" (log-mel), "mfcc", or "ge2e" (frozen encoder states)
    n_mels: int = 40  # fbank and mfcc; GE2E's input is fixed (40 power-mel bands)
    sample_rate: int = audio.SAMPLE_RATE

    @classmethod
    def of(cls, settings: RunSettings) -> "FeatureSpec":
        """What the run's model reads: GE2E's frozen states, or the TDNN's ``features``
        with ``n-mels`` bands."""
        if settings.model == "ge2e":
            return cls("ge2e")
        return cls(settings.features, settings.n_mels)

    @property
    def id(self) -> str:
        if self.kind == "ge2e":
            from fedspeaker.data.ge2e import weights_id

            return f"ge2e-{weights_id()}-{self.sample_rate}-v{_VERSION}"
        return f"{self.kind}{self.n_mels}-{self.sample_rate}-v{_VERSION}"


def compute_features(wave: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """(samples,) waveform -> (channels, frames): mean-normalised fbank/MFCC (n_mels,
    frames), or GE2E's frozen LSTM states (256, partial windows)."""
    if spec.kind == "ge2e":
        from fedspeaker.data.ge2e import frozen_states

        return frozen_states(wave)
    import torchaudio.compliance.kaldi as kaldi  # here: a client whose features are cached skips it

    scaled = (wave * 32768.0).unsqueeze(0)  # Kaldi's int16 scale
    if spec.kind == "fbank":
        feats = kaldi.fbank(scaled, num_mel_bins=spec.n_mels, dither=0.0,
                            sample_frequency=spec.sample_rate)
    else:
        feats = kaldi.mfcc(scaled, num_mel_bins=spec.n_mels, num_ceps=spec.n_mels, dither=0.0,
                           sample_frequency=spec.sample_rate)
    feats = feats - feats.mean(dim=0, keepdim=True)
    return feats.T.contiguous()


def fit_length(feats: torch.Tensor, frames: int, start: int | None = None) -> torch.Tensor:
    """Crop (at ``start``, or centred) or repeat-pad (channels, frames) features to exactly
    ``frames``: training's random crops and scoring's longest utterances alike."""
    length = feats.shape[1]
    if length < frames:
        feats = feats.repeat(1, math.ceil(frames / length))
        length = feats.shape[1]
    if start is None:
        start = (length - frames) // 2
    return feats[:, start : start + frames]


class Variant(Protocol):
    """A changed copy of a recording (degraded, augmented) whose features are cached
    under the file's key and the variant's ``id``."""

    id: str

    def apply(self, wave: torch.Tensor, key: str) -> torch.Tensor:
        """The changed wave; ``key`` (the file's content hash) seeds its random choices."""


class FeatureCache:
    """Features of audio files, from ``<root>/<spec id>/`` when already computed."""

    def __init__(self, root: Path, spec: FeatureSpec) -> None:
        self.spec = spec
        self.dir = root / "features" / spec.id
        self.decoded = 0  # files decoded by this instance (cache misses)

    def usable(self, path: Path) -> bool:
        """Whether ``path`` gives features, from the cache where it knows (else computed now)."""
        try:
            key = hashlib.sha256(path.read_bytes()).hexdigest()[:40]
        except OSError:
            return False
        if (self.dir / f"{key}.npy").exists():
            return True
        if (self.dir / f"{key}.err").exists():
            return False
        try:
            self.get(path)
        except AudioError:
            return False
        return True

    def get(self, path: Path, variant: Variant | None = None) -> torch.Tensor:
        """Features of one file, or of its ``variant``; raises AudioError (also from cache)
        if it is unusable."""
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise AudioError(f"{path}: cannot read ({exc.strerror})") from None
        key = content_key = hashlib.sha256(content).hexdigest()[:40]
        if variant is not None:
            key = hashlib.sha256(f"{content_key}|{variant.id}".encode()).hexdigest()[:40]
        npy, err = self.dir / f"{key}.npy", self.dir / f"{key}.err"
        if npy.exists():
            return torch.from_numpy(np.load(npy))
        if err.exists():
            raise AudioError(f"{path}: {err.read_text()}")
        self.decoded += 1
        try:
            wave = audio.load_audio(path, self.spec.sample_rate)
            if variant is not None:
                wave = variant.apply(wave, content_key)
            feats = compute_features(wave, self.spec)
        except AudioError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            atomic_write(err, lambda f: f.write(reason.encode()))
            raise
        atomic_write(npy, lambda f: np.save(f, feats.numpy()))
        return feats
