"""Degraded copies of speech: babble, stationary noise and simulated rooms, at chosen
SNRs and reverberation times, drawn deterministically from a seed.

Devices record in streets, cars and across rooms; these make the same recordings sound
so, for degraded trial conditions (evaluation/conditions.py) and on-device augmentation
(data/augment.py). Rooms are pyroomacoustics' image method (a shoebox of random size,
source and microphone at random places), its absorption set from the requested RT60 by
Sabine's formula and then corrected until the impulse response's own RT60 (Schroeder
backward integration, T30 extrapolated to 60 dB) is within 5 % of the request: Sabine's
estimate alone gives image-method rooms up to 1.5 times more reverberant than asked.

A recipe (fedspeaker/recipes.py) names what is done, e.g. ``room0.3-0.9+babble10``:
the room first (the speech as a microphone across the room hears it), then each noise
added at its SNR to that reverberant speech (power over the whole clip, measured on the mix).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedspeaker.files import atomic_write
from fedspeaker.recipes import Recipe

NOISES = ("babble", "white", "pink", "brown")
BABBLE_TALKERS = 3  # talkers summed into one babble (the probe: 3 other speakers)
RT60_TOLERANCE = 0.05  # a simulated room's measured RT60 is within 5 % of the one asked for
_VERSION = 1  # bump when the rooms or the mixing below change
ROOMS_PER_RANGE = 8  # simulated rooms drawn for one RT60 range (each recording picks one)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech`` plus ``noise`` scaled so that their power ratio over the clip is ``snr_db``."""
    p_speech, p_noise = np.mean(speech ** 2), np.mean(noise ** 2)
    if p_noise == 0 or p_speech == 0:
        return speech.copy()
    return speech + noise * np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10)))


def synthetic_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Stationary Gaussian noise of ``n`` samples: white (flat), pink (power 1/f) or
    brown (power 1/f^2), shaped in the frequency domain, without DC."""
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=float)
    f[0] = np.inf  # no DC
    spectrum /= f ** (0.5 if kind == "pink" else 1.0)
    return np.fft.irfft(spectrum, n)


def babble_noise(talkers: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """Talkers speaking at once, each at equal power, looped and shifted to ``n`` samples."""
    out = np.zeros(n)
    for wave in talkers:
        looped = np.resize(wave, n + len(wave))
        start = int(rng.integers(len(wave)))
        part = looped[start:start + n]
        power = np.mean(part ** 2)
        if power > 0:
            out += part / np.sqrt(power)
    return out


def room_impulse_response(rt60: float, rng: np.random.Generator, sample_rate: int = 16_000) -> np.ndarray:
    """A shoebox room (3-8 x 3-6 x 2.4-3.2 m) with source and microphone at random places
    (0.5 m from the walls, at least 1 m apart) whose impulse response has RT60 ``rt60``
    (within RT60_TOLERANCE, as :func:`measured_rt60` estimates it)."""
    import pyroomacoustics as pra

    dim = np.array([rng.uniform(3, 8), rng.uniform(3, 6), rng.uniform(2.4, 3.2)])
    while True:
        source, mic = rng.uniform(0.5, dim - 0.5), rng.uniform(0.5, dim - 0.5)
        if np.linalg.norm(source - mic) >= 1.0:
            break
    asked = rt60
    best: tuple[float, np.ndarray] | None = None
    for _ in range(6):  # Sabine's absorption, corrected by what the response measures
        absorption, max_order = pra.inverse_sabine(asked, dim)
        room = pra.ShoeBox(dim, fs=sample_rate, materials=pra.Material(min(absorption, 1.0)),
                           max_order=max_order)
        room.add_source(source)
        room.add_microphone(mic)
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], dtype=float)
        got = measured_rt60(rir, sample_rate)
        if best is None or abs(got - rt60) < abs(best[0] - rt60):
            best = (got, rir)
        if abs(got - rt60) <= RT60_TOLERANCE * rt60:
            break
        asked *= rt60 / got
    return best[1] / np.max(np.abs(best[1]))


def measured_rt60(rir: np.ndarray, sample_rate: int = 16_000) -> float:
    """RT60 of an impulse response: Schroeder's backward-integrated energy decay, the
    line fitted from -5 to -35 dB (T30) extrapolated to 60 dB (pyroomacoustics)."""
    import pyroomacoustics as pra

    return float(pra.experimental.measure_rt60(rir, fs=sample_rate, decay_db=30))


def room_bank(rt60: tuple[float, float], seed: int, cache_dir: Path | None = None,
              size: int = ROOMS_PER_RANGE) -> tuple[np.ndarray, ...]:
    """``size`` simulated rooms for one RT60 range, drawn from ``seed``: each recording
    picks one. Simulating a room takes up to ten seconds, so they are shared, kept per
    process and (with ``cache_dir``) on disk beside the features."""
    return _room_bank(rt60, seed, cache_dir, size)


@lru_cache(maxsize=8)
def _room_bank(rt60: tuple[float, float], seed: int, cache_dir: Path | None, size: int
               ) -> tuple[np.ndarray, ...]:
    file = (cache_dir / "rooms" / f"rt60-{rt60[0]:g}-{rt60[1]:g}-seed{seed}-n{size}-v{_VERSION}.npz"
            if cache_dir else None)
    if file is not None and file.exists():
        with np.load(file) as saved:
            return tuple(saved[f"r{i}"] for i in range(size))
    rng = np.random.default_rng([seed, int(rt60[0] * 1000), int(rt60[1] * 1000), 0x600D])
    rooms = tuple(room_impulse_response(float(rng.uniform(*rt60)), rng) for _ in range(size))
    if file is not None:
        atomic_write(file, lambda f: np.savez(f, **{f"r{i}": r for i, r in enumerate(rooms)}))
    return rooms


def reverberate(speech: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``speech`` as heard through ``rir``: convolved, cut to its length from the direct
    sound on, at its original power."""
    from scipy.signal import fftconvolve

    onset = int(np.argmax(np.abs(rir)))
    wet = fftconvolve(speech, rir[onset:])[: len(speech)]
    p_dry, p_wet = np.mean(speech ** 2), np.mean(wet ** 2)
    return wet * np.sqrt(p_dry / p_wet) if p_wet > 0 else wet


def degrade(speech: np.ndarray, recipe: Recipe, rng: np.random.Generator, *,
            rooms: Sequence[np.ndarray] = (),
            talkers: Callable[[int], list[np.ndarray]] | None = None) -> np.ndarray:
    """``speech`` degraded as ``recipe`` says, its random choices from ``rng``: one of
    ``rooms`` (the recipe's :func:`room_bank`), then each noise at its SNR. ``talkers(k)``
    gives k recordings of other speakers for babble (required when the recipe has babble)."""
    out = speech.astype(float)
    if recipe.rt60 is not None:
        if not rooms:
            raise ValueError(f"{recipe.name}: a room needs its room bank")
        out = reverberate(out, rooms[int(rng.integers(len(rooms)))])
    clean = out
    for kind, snr in recipe.noises:
        if kind == "babble":
            if talkers is None:
                raise ValueError(f"{recipe.name}: babble needs other speakers' recordings")
            noise = babble_noise(talkers(BABBLE_TALKERS), len(out), rng)
        else:
            noise = synthetic_noise(kind, len(out), rng)
        out = out + (mix_at_snr(clean, noise, snr) - clean)
    return out.astype(np.float32)
