"""Degraded trial conditions: the unseen-speaker trials again, the enrolment side clean
and the test side degraded (babble, stationary noise, simulated rooms, combinations).

A device enrols once in quiet and is then spoken to in streets, cars and across rooms;
this scores that. A condition's trials are exactly the clean trials (same pairs, same
labels); only the test utterance's audio changes. Its degraded copy is drawn once from
the run's seed and the file's content and cached like the features, so every round,
run and strategy with the same seed scores the same degraded audio. Babble is made of
recordings of the training speakers, never of anyone in the trials.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedspeaker.config import RunSettings
from fedspeaker.data.audio import load_audio
from fedspeaker.data.degrade import degrade, room_bank
from fedspeaker.data.features import FeatureCache, FeatureSpec
from fedspeaker.errors import AudioError, ConfigError
from fedspeaker.evaluation.metrics import error_rates
from fedspeaker.evaluation.trials import Trials, trial_scores
from fedspeaker.recipes import Recipe, parse_conditions

log = logging.getLogger(__name__)

def condition_columns(settings: RunSettings) -> list[str]:
    """rounds.csv's columns for the run's conditions: EER and minDCF of each, their mean EER."""
    recipes = parse_conditions(settings.test_conditions)
    if not recipes:
        return []
    return [*(f"{m}_{r.name}" for r in recipes for m in ("eer", "min_dcf")), "degraded_eer_mean"]


@dataclass(frozen=True)
class Degraded:
    """One condition's degraded copy of a recording (a FeatureCache variant)."""

    recipe: Recipe
    seed: int
    talkers: tuple[tuple[Path, str], ...]  # babble's recordings (path, speaker), none in the trials
    talkers_digest: str
    cache_dir: Path

    @property
    def id(self) -> str:
        return f"degraded-{self.recipe.name}-seed{self.seed}-talkers{self.talkers_digest}"

    def apply(self, wave: torch.Tensor, key: str) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, int(key[:15], 16),
                                     int(hashlib.sha256(self.recipe.name.encode()).hexdigest()[:15], 16)])
        rooms = room_bank(self.recipe.rt60, self.seed, self.cache_dir) if self.recipe.rt60 else ()
        return torch.from_numpy(degrade(wave.numpy(), self.recipe, rng, rooms=rooms,
                                        talkers=lambda k: self._talkers(k, rng)))

    def _talkers(self, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        """k recordings, each of a different speaker (as many as there are)."""
        if not self.talkers:
            raise ConfigError(f"test-conditions {self.recipe.name}: babble needs recordings of "
                              "speakers outside the trials, and there are none")
        speakers = sorted({s for _, s in self.talkers})
        chosen = rng.choice(len(speakers), min(k, len(speakers)), replace=False)
        waves = []
        for i in chosen:
            theirs = [p for p, s in self.talkers if s == speakers[i]]
            waves.append(load_audio(theirs[int(rng.integers(len(theirs)))]).numpy())
        return waves


def degraded_test_features(settings: RunSettings, paths: Sequence[Path],
                           talkers: Sequence[tuple[Path, str]]) -> dict[str, list[torch.Tensor]]:
    """Each condition's features of ``paths`` (the trials' utterances, in their order),
    degraded once and cached. ``talkers``: recordings (path, speaker) of speakers outside
    the trials, for babble."""
    recipes = parse_conditions(settings.test_conditions)
    if not recipes:
        return {}
    ordered = tuple(sorted(talkers))
    digest = hashlib.sha256()
    for path, speaker in ordered:
        digest.update(speaker.encode() + hashlib.sha256(path.read_bytes()).digest())
    cache = FeatureCache(settings.feature_cache_dir, FeatureSpec.of(settings))
    started = time.monotonic()
    out: dict[str, list[torch.Tensor]] = {}
    for recipe in recipes:
        variant = Degraded(recipe, settings.seed, ordered, digest.hexdigest()[:16], settings.feature_cache_dir)
        try:
            out[recipe.name] = [cache.get(path, variant) for path in paths]
        except AudioError as exc:
            raise ConfigError(f"test-conditions {recipe.name}: {exc}") from None
    if cache.decoded:
        log.info("test-conditions: %d degraded recordings made and cached in %.0f s", cache.decoded,
                 time.monotonic() - started)
    return out


def condition_figures(clean: torch.Tensor, degraded: dict[str, torch.Tensor], trials: Trials, *,
                      cohort: torch.Tensor | None = None, top: int = 100) -> dict[str, float]:
    """EER and minDCF of every condition: the clean trials, the enrolment side's clean
    embedding against the test side's degraded one (with s-norm where ``cohort`` is given);
    and the mean EER over the conditions."""
    figures: dict[str, float] = {}
    for name, test in degraded.items():
        scores = trial_scores(clean, trials, cohort=cohort, top=top, test_embeddings=test)
        curve = error_rates(scores, trials.target)
        figures[f"eer_{name}"], figures[f"min_dcf_{name}"] = curve.eer()[0], curve.min_dcf()
    if degraded:
        figures["degraded_eer_mean"] = float(np.mean([figures[f"eer_{n}"] for n in degraded]))
    return figures


def babble_talkers(train: Sequence[tuple[Path, str]], trial_speakers: set[str]) -> list[tuple[Path, str]]:
    """The recordings babble is made of: the training speakers' training recordings,
    leaving out any speaker that is in the trials."""
    return [(p, s) for p, s in train if s not in trial_speakers]

