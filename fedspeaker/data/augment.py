"""On-device augmentation: each training recording with a fixed number of degraded copies
(babble from the device's own other speakers' recordings, white/pink/brown noise,
simulated rooms, a room with noise), made once and cached like the features.

What trains on a device reads cached features (for GE2E, the frozen LSTM's states), so
augmenting on the fly would mean running the frozen layers every step; instead
``augment-copies`` copies per recording are computed once, and each training example
draws one of them or the clean recording. The copies of one recording stay one example:
a step draws the recording (Poisson sampling under DP-SGD), then one of its copies, so
the unit DP-SGD protects and its accounting do not change (training/loops.py).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedspeaker.data.audio import load_audio
from fedspeaker.data.corpus import Utterance
from fedspeaker.data.degrade import degrade, room_bank
from fedspeaker.data.features import FeatureCache, FeatureSpec
from fedspeaker.errors import AudioError
from fedspeaker.recipes import Recipe, parse_families

log = logging.getLogger(__name__)

SNR_RANGE = (0.0, 20.0)  # dB, drawn uniformly for each noise of a copy
RT60_RANGE = (0.2, 1.0)  # s, the rooms a copy may be heard in
ROOMS = 8  # simulated rooms drawn for a run (seeded), each copy heard in one
ROOM_NOISE = 0.5  # chance that a copy heard in a room also gets a noise


@dataclass(frozen=True)
class AugmentedCopy:
    """Copy ``index`` of one recording (a FeatureCache variant): one family drawn from
    ``families`` (babble only where the device holds other speakers), from the run's
    seed and the recording's content."""

    families: tuple[str, ...]
    index: int
    seed: int
    speaker: str  # the recording's own speaker: babble is made of the others
    talkers: tuple[tuple[Path, str], ...]  # the device's recordings (path, speaker)
    talkers_digest: str
    cache_dir: Path

    @property
    def id(self) -> str:
        return (f"augment-{'.'.join(self.families)}-copy{self.index}-seed{self.seed}-"
                f"{self.speaker}-talkers{self.talkers_digest}")

    def others(self) -> list[tuple[Path, str]]:
        return [(p, s) for p, s in self.talkers if s != self.speaker]

    def recipe(self, rng: np.random.Generator) -> Recipe:
        """The degradation of this copy."""
        noises = [f for f in self.families if f != "room" and (f != "babble" or self.others())]
        available = noises + (["room"] if "room" in self.families else [])
        if not available:  # babble alone, and nobody else on this device: the copy stays clean
            return Recipe("clean")
        family = available[int(rng.integers(len(available)))]
        if family == "room":
            extra = noises and rng.random() < ROOM_NOISE
            chosen = ((noises[int(rng.integers(len(noises)))], float(rng.uniform(*SNR_RANGE))),) if extra else ()
            return Recipe("room", RT60_RANGE, chosen)
        return Recipe(family, None, ((family, float(rng.uniform(*SNR_RANGE))),))

    def apply(self, wave: torch.Tensor, key: str) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, int(key[:15], 16), self.index, 0xA06])
        recipe = self.recipe(rng)
        if recipe.name == "clean":
            return wave
        rooms = room_bank(RT60_RANGE, self.seed, self.cache_dir, ROOMS) if recipe.rt60 else ()

        def talkers(k: int) -> list[np.ndarray]:
            others = self.others()
            picks = rng.choice(len(others), min(k, len(others)), replace=False)
            return [load_audio(others[int(i)][0]).numpy() for i in picks]

        return torch.from_numpy(degrade(wave.numpy(), recipe, rng, rooms=rooms, talkers=talkers))


def augmented_examples(augment: str, copies: int, seed: int, spec: FeatureSpec, cache_dir: Path,
                       utterances: Sequence[Utterance], labels: Sequence[int]
                       ) -> tuple[list[torch.Tensor], list[int]]:
    """A device's training examples with their copies: each usable recording as
    (1 + copies, channels, frames), the clean features first; and their labels.
    Unusable recordings are left out (logged), as without augmentation."""
    families = parse_families(augment)
    cache = FeatureCache(cache_dir, spec)
    pool = tuple(sorted((u.path, u.speaker) for u in utterances))
    digest = hashlib.sha256()
    for path, speaker in pool:
        digest.update(speaker.encode() + hashlib.sha256(path.read_bytes()).digest())
    feats, kept = [], []
    for utt, label in zip(utterances, labels):
        try:
            clean = cache.get(utt.path)
            made = [cache.get(utt.path, AugmentedCopy(families, k, seed, utt.speaker, pool,
                                                      digest.hexdigest()[:16], cache_dir))
                    for k in range(copies)]
        except AudioError as exc:
            log.warning("skipping %s", exc)
            continue
        feats.append(torch.stack([clean, *made]))
        kept.append(label)
    if cache.decoded:
        log.info("augment: %d degraded copies made and cached", cache.decoded)
    return feats, kept
