"""The global model as one TorchScript file a device runs with `torch` alone.

`fedspeaker export` writes `embedder.pt`: 16 kHz mono waveform in, unit-length speaker
embedding out, features included. For the TDNN, torchaudio's Kaldi fbank cannot be
scripted, so `KaldiFbank` recomputes it from the same window and mel matrix (taken from
torchaudio at export time and stored as buffers); for GE2E, `GE2EWaveformEmbedder`
holds the power mel (same), the frozen LSTM and the fine-tuned projection. The export
checks that it gives the training stack's embedding before it writes anything.

For GE2E it also writes `embedder.onnx` (`GE2EWindowsEmbedder`: the windows' power
spectra in, the embedding out), which a device runs with onnxruntime, numpy and
soundfile alone (fedspeaker/device/edge.py; frontend.py makes those spectra in numpy);
the export checks that the two runtimes agree (cosine at least ONNX_MIN_COSINE).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedspeaker import __version__
from fedspeaker.errors import FedSpeakerError
from fedspeaker.files import file_sha256
from fedspeaker.model.bundle import SpeakerModel
from fedspeaker.data.features import FeatureSpec, compute_features
from fedspeaker.evaluation.scoring import embed
from fedspeaker.model import SpeakerNet

EMBEDDER_FILE = "embedder.pt"
ONNX_FILE = "embedder.onnx"
ONNX_MIN_COSINE = 0.9999  # the torch-free path's embedding against the TorchScript one
MANIFEST_FILE = "manifest.json"
EXPORT_TOLERANCE = 1e-4  # largest embedding difference the export accepts
GE2E_NOTICE = ("embedder.pt holds the GE2E speaker encoder of Resemblyzer 0.1.4 (Copyright "
               "Corentin Jemine, Apache License 2.0, https://github.com/resemble-ai/Resemblyzer), "
               "its projection fine-tuned by fedspeaker (Apache License 2.0).")


class KaldiFbank(nn.Module):
    """torchaudio.compliance.kaldi.fbank as fedspeaker calls it (25 ms povey windows every
    10 ms, pre-emphasis 0.97, power spectrum, log mel energies, no dither), then the
    per-utterance mean removed: fedspeaker.features.compute_features, scriptable."""

    def __init__(self, n_mels: int, sample_rate: int) -> None:
        super().__init__()
        import torchaudio.compliance.kaldi as kaldi

        self.frame = int(sample_rate * 0.025)
        self.shift = int(sample_rate * 0.010)
        self.fft = 1 << (self.frame - 1).bit_length()
        self.floor = float(torch.finfo(torch.float32).eps)  # Kaldi's floor before the log
        banks, _ = kaldi.get_mel_banks(n_mels, self.fft, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
        self.register_buffer("mel", F.pad(banks, (0, 1)))
        self.register_buffer("window", torch.hann_window(self.frame, periodic=False).pow(0.85))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) in [-1, 1] -> (n_mels, frames)."""
        frames = (wave * 32768.0).unfold(0, self.frame, self.shift)
        frames = frames - frames.mean(dim=1, keepdim=True)
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = (frames - 0.97 * previous) * self.window
        power = torch.fft.rfft(frames, n=self.fft).abs().pow(2.0)
        logmel = torch.clamp(power @ self.mel.T, min=self.floor).log()
        return (logmel - logmel.mean(dim=0, keepdim=True)).T


class WaveformEmbedder(nn.Module):
    """Waveform -> unit-length embedding, scored as the server scores (centre crop to
    ``max_frames``), so the saved threshold applies."""

    def __init__(self, net: SpeakerNet, n_mels: int, sample_rate: int, max_frames: int) -> None:
        super().__init__()
        self.features = KaldiFbank(n_mels, sample_rate)
        self.net = net
        self.max_frames = max_frames

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        feats = self.features(wave)
        frames = feats.shape[1]
        if frames > self.max_frames:
            start = (frames - self.max_frames) // 2
            feats = feats[:, start:start + self.max_frames]
        return F.normalize(self.net.embed(feats.unsqueeze(0)), dim=1)[0]


class GE2EWaveformEmbedder(nn.Module):
    """Waveform -> unit-length embedding through the whole GE2E stack: volume
    normalisation, 1.6 s partial windows of the power mel, the frozen LSTM
    (fedspeaker.data.ge2e), the fine-tuned projection (fedspeaker.model.ge2e), the windows
    averaged; scriptable."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        import torchaudio.functional as AF

        from fedspeaker.data import ge2e

        self.lstm = ge2e.frozen_encoder().lstm
        self.projection = net.projection
        self.backend = net.backend  # the scoring back end the bundle holds (identity if none)
        self.sample_rate, self.hop, self.n_fft = ge2e.SAMPLE_RATE, ge2e.HOP_LENGTH, ge2e.N_FFT
        self.partial_frames = ge2e.PARTIAL_FRAMES
        self.frame_step = round(ge2e.SAMPLE_RATE / 1.3 / ge2e.HOP_LENGTH)
        self.register_buffer("window", torch.hann_window(ge2e.N_FFT))
        self.register_buffer("mel", AF.melscale_fbanks(ge2e.N_FFT // 2 + 1, 0.0, ge2e.SAMPLE_RATE / 2,
                                                       ge2e.N_MELS, ge2e.SAMPLE_RATE, "slaney", "slaney"))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave.float()
        rms = (wave * 32767.0).square().mean().sqrt()
        if rms > 0:
            change_db = -30.0 - 20 * torch.log10(rms / 32767.0)
            if change_db > 0:
                wave = wave * torch.pow(10.0, change_db / 20)
        n = wave.numel()
        n_frames = (n + 1 + self.hop - 1) // self.hop
        steps = max(1, n_frames - self.partial_frames + self.frame_step + 1)
        starts = list(range(0, steps, self.frame_step))
        last = starts[-1] * self.hop
        if len(starts) > 1 and (n - last) / (self.partial_frames * self.hop) < 0.75:
            starts = starts[:-1]
        end = (starts[-1] + self.partial_frames) * self.hop
        if end > n:
            wave = F.pad(wave, (0, end - n))
        spec = torch.stft(F.pad(wave[None], (self.n_fft // 2, self.n_fft // 2))[0], self.n_fft,
                          self.hop, window=self.window, center=False, return_complex=True)
        mel = (spec.abs().pow(2.0).T @ self.mel)  # (frames, 40)
        windows = torch.stack([mel[s:s + self.partial_frames] for s in starts])
        _, (hidden, _) = self.lstm(windows)
        partial = F.normalize(torch.relu(self.projection(hidden[-1])), dim=1)
        return self.backend(F.normalize(partial.mean(dim=0), dim=0)[None])[0]


class GE2EWindowsEmbedder(nn.Module):
    """GE2EWaveformEmbedder after its STFT: (windows, 160, 201) power spectra -> the unit-length
    embedding. What ONNX holds; the front-end before it is numpy (fedspeaker/device/edge.py)."""

    def __init__(self, whole: GE2EWaveformEmbedder) -> None:
        super().__init__()
        self.lstm, self.projection, self.backend = whole.lstm, whole.projection, whole.backend
        self.register_buffer("mel", whole.mel.clone())

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(spectra @ self.mel)
        partial = F.normalize(torch.relu(self.projection(hidden[-1])), dim=1)
        return self.backend(F.normalize(partial.mean(dim=0), dim=0)[None])[0]


def export_onnx(whole: GE2EWaveformEmbedder, scripted: torch.jit.ScriptModule, path: Path) -> float:
    """Write ``path`` (ONNX) and return the lowest cosine between its embeddings (numpy
    front-end, onnxruntime) and the TorchScript model's, on a 3 s and a 12 s signal."""
    from fedspeaker.device.frontend import embed_wave, onnx_session, window_spectra

    module = GE2EWindowsEmbedder(whole).eval()
    example = torch.from_numpy(window_spectra(0.1 * torch.randn(3 * 16_000).numpy()))
    with warnings.catch_warnings():  # the LSTM batch-size caveat: checked below on 2 and 9 windows
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["spectra"], output_names=["embedding"],
                          dynamic_axes={"spectra": {0: "windows"}}, dynamo=False, opset_version=17)
    session = onnx_session(path)
    cosines = []
    for seconds in (3, 12):
        wave = 0.1 * torch.randn(seconds * 16_000, generator=torch.Generator().manual_seed(seconds))
        with torch.no_grad():
            reference = scripted(wave).numpy()
        cosines.append(float(embed_wave(session, wave.numpy()) @ reference))
    return min(cosines)


@dataclass
class Export:
    folder: Path
    size_bytes: int
    max_abs_diff: float
    onnx_cosine: float | None = None  # None: no ONNX export (the TDNN)


def export_embedder(bundle_path: Path, folder: Path) -> Export:
    """Write embedder.pt and manifest.json for the global model in ``bundle_path``."""
    model = SpeakerModel.load(bundle_path)
    s = model.settings
    spec = FeatureSpec.of(s)
    if s.model == "ge2e":
        module: nn.Module = GE2EWaveformEmbedder(model.model)
        features = ("GE2E: volume normalised to -30 dBFS, 40-band Slaney power mel (25 ms / 10 ms), "
                    "1.6 s windows 1.3 per second, frozen LSTM, fine-tuned projection, windows "
                    "averaged (inside the model)")
    elif s.features == "fbank":
        module = WaveformEmbedder(model.model, s.n_mels, spec.sample_rate, model.model.eval_frames)
        features = (f"Kaldi fbank, {s.n_mels} mel bins, 25 ms / 10 ms, mean-normalised, "
                    f"centre crop to {model.model.eval_frames} frames (inside the model)")
    else:
        raise FedSpeakerError(f"{bundle_path}: export supports fbank features; this model uses {s.features}")
    scripted = torch.jit.script(module.eval())

    # the same embedding as the training stack's own path, on a 3 s and a 12 s signal
    diffs = []
    for seconds in (3, 12):
        wave = 0.1 * torch.randn(seconds * spec.sample_rate, generator=torch.Generator().manual_seed(seconds))
        reference = F.normalize(embed(model.model, [compute_features(wave, spec)]), dim=1)[0]
        with torch.no_grad():
            diffs.append(float((scripted(wave) - reference).abs().max()))
    if max(diffs) > EXPORT_TOLERANCE:
        raise FedSpeakerError(f"export check failed: the exported model differs by {max(diffs):.2g} "
                              f"from the original (tolerance {EXPORT_TOLERANCE})")

    folder.mkdir(parents=True, exist_ok=True)
    onnx_cosine = None
    if s.model == "ge2e":
        onnx_cosine = export_onnx(module, scripted, folder / ONNX_FILE)
        if not onnx_cosine >= ONNX_MIN_COSINE:
            (folder / ONNX_FILE).unlink()
            raise FedSpeakerError(f"export check failed: the ONNX embedding's cosine with the "
                                  f"TorchScript one is {onnx_cosine:.6f} (at least {ONNX_MIN_COSINE} needed)")
    scripted.save(str(folder / EMBEDDER_FILE))
    size = (folder / EMBEDDER_FILE).stat().st_size
    manifest = {
        "model": EMBEDDER_FILE,
        "input": f"mono float32 waveform at {spec.sample_rate} Hz, samples in [-1, 1], at least 0.3 s",
        "output": f"unit-length speaker embedding ({model.model.embedding_dim} floats); "
                  "score two with their dot product (cosine)",
        "sample_rate": spec.sample_rate,
        "features": features,
        "embedding_dim": model.model.embedding_dim,
        "verification": model.verification,
        "decision": "voiceprint: the unit-length mean of the enrolment recordings' embeddings; "
                    "accept when its dot product with the recording's embedding is >= "
                    "verification.threshold; LLR = calibration.scale * score + calibration.offset",
        "backend": {k: v for k, v in model.model.backend.to_dict().items() if k not in ("mean", "whiten")} or None,
        "source_model": str(bundle_path.resolve()),
        "source_sha256": file_sha256(bundle_path),
        "size_bytes": size,
        "sha256": file_sha256(folder / EMBEDDER_FILE),  # lets a device check what it received
        "max_abs_diff_vs_training_stack": max(diffs),
        "onnx": ({"model": ONNX_FILE, "input": "(windows, 160, 201) float32 power spectra, made from the "
                  "waveform by fedspeaker/device/edge.py's numpy front-end", "sha256": file_sha256(folder / ONNX_FILE),
                  "size_bytes": (folder / ONNX_FILE).stat().st_size,
                  "min_cosine_vs_torchscript": onnx_cosine} if onnx_cosine is not None else None),
        "fedspeaker": __version__,
        "torch": torch.__version__,
    }
    if s.model == "ge2e":
        manifest["licence"] = GE2E_NOTICE
        (folder / "NOTICE").write_text(GE2E_NOTICE + "\n")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return Export(folder, size, max(diffs), onnx_cosine)


class ExportedEmbedder:
    """An export folder, loaded with torch alone, for enrolment and verification."""

    def __init__(self, folder: Path) -> None:
        try:
            self.manifest: dict[str, Any] = json.loads((folder / MANIFEST_FILE).read_text())
            self.module = torch.jit.load(str(folder / EMBEDDER_FILE), map_location="cpu")
        except (OSError, ValueError, RuntimeError) as exc:
            raise FedSpeakerError(f"{folder}: not a fedspeaker export ({exc})") from None
        self.model_id = self.manifest["source_sha256"]
        self.verification = self.manifest.get("verification")
        self.sample_rate = int(self.manifest["sample_rate"])

    @torch.no_grad()
    def embed_file(self, path: Path) -> torch.Tensor:
        from fedspeaker.data.audio import load_audio

        return self.module(load_audio(path, self.sample_rate))
