"""The corpus as features, split for a run; what server, clients and `central` load."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from fedspeaker.config import RunSettings
from fedspeaker.data.corpus import CorpusSplit, Utterance, scan_corpus, split_corpus
from fedspeaker.errors import AudioError, CorpusError
from fedspeaker.data.features import FeatureCache, FeatureSpec

log = logging.getLogger(__name__)


@dataclass
class SpeakerData:
    split: CorpusSplit
    features: dict[Path, torch.Tensor]
    skipped: list[str] = field(default_factory=list)  # "path: reason", one per unusable file
    decoded: int = 0  # audio files decoded (not found in the feature cache)

    @property
    def n_speakers(self) -> int:
        return len(self.split.speakers)

    def train_examples(self, indices: list[int] | None = None) -> tuple[list[torch.Tensor], list[int]]:
        utts = self.split.train if indices is None else [self.split.train[i] for i in indices]
        return [self.features[u.path] for u in utts], [self.split.labels[u.speaker] for u in utts]

    def test_examples(self) -> tuple[list[torch.Tensor], list[int]]:
        return ([self.features[u.path] for u in self.split.test],
                [self.split.labels[u.speaker] for u in self.split.test])

    def verification_examples(self) -> tuple[list[torch.Tensor], list[str]]:
        return ([self.features[u.path] for u in self.split.verification],
                [u.speaker for u in self.split.verification])


def load_split(settings: RunSettings) -> CorpusSplit:
    """The run's split of the corpus, without holding any features: what a simulated
    client needs to find its own shard. Which files are usable is read from the feature
    cache (a file that was never seen is decoded once to find out).

    Kept in memory per process: a Ray actor serving many clients splits once.
    """
    return _split(settings.corpus_dir.resolve(), settings.feature_cache_dir, FeatureSpec.of(settings),
                  settings.seed, settings.unseen_speakers, settings.test_fraction)


def audio_split(settings: RunSettings) -> CorpusSplit:
    """The run's split with files judged by decoding alone, no features computed: for
    `device-data`, which only links recordings. load_split's split wherever a file that
    decodes also gives features (features fail only where decoding does)."""
    from fedspeaker.data.audio import load_audio

    def decodes(path: Path) -> bool:
        try:
            load_audio(path, FeatureSpec.of(settings).sample_rate)
        except AudioError:
            return False
        return True

    utterances, _ = scan_corpus(settings.corpus_dir.resolve())
    return split_corpus([u for u in utterances if decodes(u.path)], settings.seed,
                        settings.unseen_speakers, settings.test_fraction)


@lru_cache(maxsize=2)
def _split(root: Path, cache_dir: Path, spec: FeatureSpec, seed: int, unseen: int,
           test_fraction: float) -> CorpusSplit:
    utterances, _ = scan_corpus(root)
    cache = FeatureCache(cache_dir, spec)
    return split_corpus([u for u in utterances if cache.usable(u.path)], seed, unseen, test_fraction)


def load_examples(settings: RunSettings, utterances: Sequence[Utterance]) -> list[torch.Tensor]:
    """The features of just these utterances (from the cache), held by nobody else."""
    cache = FeatureCache(settings.feature_cache_dir, FeatureSpec.of(settings))
    return [cache.get(u.path) for u in utterances]


def load_speaker_data(settings: RunSettings) -> SpeakerData:
    """Features for the whole corpus, from the cache where possible, then the split: what
    the server scores with and `central` trains on.

    Kept in memory per process.
    """
    return _load(settings.corpus_dir.resolve(), settings.feature_cache_dir,
                 FeatureSpec.of(settings), settings.seed,
                 settings.unseen_speakers, settings.test_fraction)


@lru_cache(maxsize=2)
def _load(root: Path, cache_dir: Path, spec: FeatureSpec, seed: int, unseen: int,
          test_fraction: float) -> SpeakerData:
    utterances, skipped = scan_corpus(root)
    cache = FeatureCache(cache_dir, spec)
    features: dict[Path, torch.Tensor] = {}
    usable = []
    started = last_report = time.monotonic()
    for n, utt in enumerate(utterances, 1):
        try:
            features[utt.path] = cache.get(utt.path)
            usable.append(utt)
        except AudioError as exc:
            log.warning("skipping %s", exc)
            skipped.append(str(exc))
        if cache.decoded and time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            log.info("features: %d/%d files (%d decoded, %.0f s)", n, len(utterances),
                     cache.decoded, last_report - started)
    split = split_corpus(usable, seed, unseen, test_fraction)
    return SpeakerData(split, features, skipped, cache.decoded)


HELD_OUT_ONE_IN = 5  # a device keeps one recording in five (by content) to score models with


def held_out(path: Path) -> bool:
    """Whether a device keeps this recording out of training, to score models with: one in
    five, chosen by the file's content, so the choice is stable and needs no state."""
    return int(hashlib.sha256(path.read_bytes()).hexdigest()[:8], 16) % HELD_OUT_ONE_IN == 0


def device_utterances(root: Path, speakers: list[str], *, part: str = "all") -> list[Utterance]:
    """One device's recordings of the federation's speakers: ``all`` of them, or (when the
    federation scores models on the devices) the ``train`` part or the ``held-out`` part
    (:func:`held_out`). Recordings of other speakers are logged and left out."""
    utterances, _ = scan_corpus(root)
    labels = {speaker: i for i, speaker in enumerate(speakers)}
    unknown = sorted({u.speaker for u in utterances if u.speaker not in labels})
    if unknown:
        log.warning("%s: leaving out speaker folder(s) %s: not among the federation's %d "
                    "training speakers", root, ", ".join(unknown), len(speakers))
    return [u for u in utterances if u.speaker in labels
            and (part == "all" or held_out(u.path) == (part == "held-out"))]


def load_device_examples(root: Path, cache_dir: Path, spec: FeatureSpec, speakers: list[str], *,
                         part: str = "all") -> tuple[list[torch.Tensor], list[int]]:
    """One device's recordings of the federation's speakers (:func:`device_utterances`),
    as features and labels.

    A real client holds its own folder (<root>/<speaker>/<utterance>); the server's
    speaker list is the label space. Unreadable files are logged and left out; a device
    with nothing usable to train on says so.
    """
    labels = {speaker: i for i, speaker in enumerate(speakers)}
    cache = FeatureCache(cache_dir, spec)
    feats: list[torch.Tensor] = []
    ys: list[int] = []
    found = device_utterances(root, speakers, part=part)
    for utt in found:
        try:
            feats.append(cache.get(utt.path))
            ys.append(labels[utt.speaker])
        except AudioError as exc:
            log.warning("skipping %s", exc)
    if not feats and part != "held-out":
        raise CorpusError(f"{root}: no usable recordings of the federation's speakers "
                          f"({len(found)} of theirs found; expected <speaker>/<utterance>.wav|.flac with speaker folders named as "
                          "on the server)")
    return feats, ys
