"""The torch-free path's front-end: a waveform to the power spectra embedder.onnx takes,
in numpy, as GE2EWaveformEmbedder computes them in torch (fedspeaker/device/export.py),
and the ONNX model run by onnxruntime. Used by edge.py on a device and by the export's
check; it imports neither torch nor the rest of fedspeaker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

# GE2E's front-end (fedspeaker/data/ge2e.py), repeated here so that torch is not needed
SAMPLE_RATE, N_FFT, HOP, PARTIAL_FRAMES = 16_000, 400, 160, 160
FRAME_STEP = round(SAMPLE_RATE / 1.3 / HOP)


def window_spectra(wave: np.ndarray) -> np.ndarray:
    """(windows, 160, 201) power spectra of the utterance's 1.6 s windows: the ONNX model's input."""
    wave = wave.astype(np.float32)
    rms = float(np.sqrt(np.mean(np.square(wave * 32767.0, dtype=np.float32))))
    if rms > 0:
        change_db = -30.0 - 20 * np.log10(rms / 32767.0)
        if change_db > 0:
            wave = wave * np.float32(10.0 ** (change_db / 20))
    n = wave.size
    n_frames = (n + 1 + HOP - 1) // HOP
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + FRAME_STEP + 1), FRAME_STEP))
    if len(starts) > 1 and (n - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP) < 0.75:
        starts = starts[:-1]
    end = (starts[-1] + PARTIAL_FRAMES) * HOP
    if end > n:
        wave = np.pad(wave, (0, end - n))
    padded = np.pad(wave, (N_FFT // 2, N_FFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann
    power = np.square(np.abs(np.fft.rfft(frames * window, axis=1))).astype(np.float32)
    return np.stack([power[s:s + PARTIAL_FRAMES] for s in starts])


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    """embedder.onnx in onnxruntime, on one CPU thread (a device's share)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed_wave(session: onnxruntime.InferenceSession, wave: np.ndarray) -> np.ndarray:
    """A 16 kHz mono waveform's unit-length embedding."""
    return session.run(None, {"spectra": window_spectra(wave)})[0]
