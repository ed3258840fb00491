"""The pretrained GE2E speaker encoder (Resemblyzer 0.1.4), frozen: its weights, its
input, and the LSTM states that fine-tuning reads as features.

Weights: ``resemblyzer/pretrained.pt`` from the ``resemblyzer`` wheel (Apache-2.0,
Corentin Jemine; a 3-layer LSTM 40->256 and a linear 256->256 projection trained with
the GE2E loss on VoxCeleb1/2 and LibriSpeech), read through the package metadata: the
package itself (and its librosa and webrtcvad) is never imported.

Input, exactly as the encoder was trained and as ``VoiceEncoder.embed_utterance``
computes it (tests/test_ge2e.py checks the port against its embeddings): 16 kHz wave, volume normalised to -30 dBFS (only ever louder), 40-band
Slaney **power** mel (25 ms periodic Hann, 10 ms hop, centred, zero padding), 1.6 s
partial windows 1.3 times a second (the last kept if 75 % covered), each window's final
LSTM state projected, ReLU, L2-normalised, the windows averaged and normalised again.
Resemblyzer's webrtcvad silence trimming is not reproduced: it removes about half of
each ~2 s clip here and made zero-shot EER worse (0.156 against 0.145).

The LSTM never trains, so its final state for every partial window (:func:`frozen_states`)
is a feature of the recording, computed once per file and cached (data/features.py); it
lives here, below the models, for that reason. What trains on it is model/ge2e.py.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from fedspeaker.errors import ModelError

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms window (resemblyzer hparams.mel_window_length)
HOP_LENGTH = 160  # 10 ms hop (hparams.mel_window_step)
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
HIDDEN_SIZE = 256
EMBEDDING_SIZE = 256
NUM_LAYERS = 3
TARGET_DBFS = -30.0
INT16_MAX = 2**15 - 1


def weights_path() -> Path:
    """Path of ``resemblyzer/pretrained.pt`` in the installed distribution.

    The package is located through its metadata only; it is never imported (it would
    pull in librosa and webrtcvad).
    """
    try:
        dist = metadata.distribution("resemblyzer")
    except metadata.PackageNotFoundError:
        raise ModelError(
            "the GE2E weights come from the 'resemblyzer' wheel, which is not installed; "
            "run `make setup` (or `pip install --no-deps resemblyzer==0.1.4`: only its "
            "pretrained.pt is used)"
        ) from None
    path = Path(dist.locate_file("resemblyzer/pretrained.pt"))
    if not path.is_file():
        raise ModelError(
            f"resemblyzer {dist.version} is installed but {path} is missing; reinstall it"
        )
    return path


class GE2E(nn.Module):
    """Resemblyzer's speaker encoder; parameter names match its checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN_SIZE, NUM_LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN_SIZE, EMBEDDING_SIZE)

    def forward(self, mels: Tensor) -> Tensor:
        """Embed mel windows of shape (batch, frames, 40) as unit vectors (batch, 256).

        Embeddings are non-negative (ReLU) and L2-normalised; an all-zero one stays zero
        where resemblyzer would return NaNs.
        """
        _, (hidden, _) = self.lstm(mels)
        embeds = torch.relu(self.linear(hidden[-1]))
        return embeds / embeds.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @classmethod
    def pretrained(cls, path: str | Path | None = None) -> "GE2E":
        """Build the encoder with resemblyzer's weights, in eval mode."""
        model = cls()
        model.load_state_dict(load_state_dict(path))
        return model.eval()


def load_state_dict(path: str | Path | None = None) -> dict[str, Tensor]:
    """The ``lstm.*`` and ``linear.*`` tensors of the checkpoint.

    The checkpoint's ``model_state`` also holds the GE2E loss's ``similarity_weight`` and
    ``similarity_bias`` scalars, which embedding does not use; they are dropped so that a
    strict ``load_state_dict`` works.
    """
    checkpoint = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    state = checkpoint["model_state"]
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}


@cache
def _mel_transform(device: str = "cpu") -> torchaudio.transforms.MelSpectrogram:
    """librosa.feature.melspectrogram's defaults, as resemblyzer calls it (cached per device)."""
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=N_FFT,
        win_length=N_FFT,
        hop_length=HOP_LENGTH,
        f_min=0.0,
        f_max=SAMPLE_RATE / 2,
        n_mels=N_MELS,
        window_fn=torch.hann_window,  # periodic, as scipy get_window(fftbins=True)
        power=2.0,
        center=True,
        pad_mode="constant",  # librosa >= 0.10 default; torchaudio's own is "reflect"
        norm="slaney",
        mel_scale="slaney",
    ).to(device)


def power_mel(wave: Tensor) -> Tensor:
    """Mel power spectrogram (frames, 40) of a 16 kHz wave, as resemblyzer computes it.

    Equals ``librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=400, hop_length=160,
    n_mels=40).T``; there are ``1 + len(wave) // 160`` frames.
    """
    return _mel_transform(str(wave.device))(wave.float()).transpose(-1, -2)


def normalize_volume(
    wave: Tensor, target_dbfs: float = TARGET_DBFS, increase_only: bool = True
) -> Tensor:
    """Scale ``wave`` so that its RMS is ``target_dbfs``; by default only ever louder.

    A silent wave is returned unchanged (resemblyzer would return NaNs).
    """
    rms = (wave * INT16_MAX).square().mean().sqrt()
    if rms == 0:
        return wave
    change_db = target_dbfs - 20 * torch.log10(rms / INT16_MAX)
    if increase_only and change_db < 0:
        return wave
    return wave * 10 ** (change_db / 20)


def partial_slices(
    n_samples: int, rate: float = 1.3, min_coverage: float = 0.75
) -> tuple[list[slice], list[slice]]:
    """Wave and mel-frame slices of the partial utterances, as resemblyzer's.

    Windows of 160 frames start every ``round(16000 / rate / 160)`` frames (77 at 1.3/s);
    they may run past the wave, which must then be zero-padded to ``wav_slices[-1].stop``.
    The last window is dropped if less than ``min_coverage`` of it is audio, unless it is
    the only one.
    """
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    n_frames = math.ceil((n_samples + 1) / HOP_LENGTH)
    frame_step = round(SAMPLE_RATE / rate / HOP_LENGTH)  # half-to-even, as np.round
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate} gives a step of {frame_step} frames (need 1..160)")
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    mel_slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    wav_slices = [slice(s.start * HOP_LENGTH, s.stop * HOP_LENGTH) for s in mel_slices]
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < min_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices



@cache
def frozen_encoder() -> GE2E:
    """The pretrained encoder, loaded once per process."""
    return GE2E.pretrained()


@cache
def weights_id() -> str:
    """A short digest of the weights file: cached states name the encoder that made them."""
    import hashlib

    return hashlib.sha256(weights_path().read_bytes()).hexdigest()[:12]


def partial_mels(wave: Tensor) -> Tensor:
    """The partial windows of a 16 kHz wave, as the encoder sees them: (windows, 160, 40)."""
    wave = normalize_volume(wave.float())
    wav_slices, mel_slices = partial_slices(wave.numel())
    pad = wav_slices[-1].stop - wave.numel()
    if pad > 0:
        wave = F.pad(wave, (0, pad))
    mel = power_mel(wave)
    return torch.stack([mel[s] for s in mel_slices])


@torch.no_grad()
def frozen_states(wave: Tensor) -> Tensor:
    """The frozen LSTM's final state for every partial window: (256, windows).

    What fine-tuning trains on, computed once per file and cached like the features;
    windows are the time axis, as frames are for the TDNN's features.
    """
    _, (hidden, _) = frozen_encoder().lstm(partial_mels(wave))
    return hidden[-1].T.contiguous()
