"""Find a corpus's utterances and split its speakers, deterministically by seed.

Layout: ``<root>/<speaker>/<utterance>.{wav,flac}``. Training speakers give both
training utterances and held-out test utterances (identification); unseen speakers
are never trained on and serve only verification trials.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from fedspeaker.data.audio import AUDIO_SUFFIXES
from fedspeaker.errors import CorpusError

log = logging.getLogger(__name__)

MIN_SPEAKERS = 4


@dataclass(frozen=True)
class Utterance:
    path: Path
    speaker: str


@dataclass(frozen=True)
class CorpusSplit:
    speakers: tuple[str, ...]  # training speakers; label i is speakers[i]
    unseen: tuple[str, ...]
    train: tuple[Utterance, ...]
    test: tuple[Utterance, ...]
    verification: tuple[Utterance, ...]

    @cached_property
    def labels(self) -> dict[str, int]:
        return {speaker: i for i, speaker in enumerate(self.speakers)}


def scan_corpus(root: Path) -> tuple[list[Utterance], list[str]]:
    """List the audio files per speaker folder; return them and the files skipped."""
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist (give --data-dir <root>)")
    utterances: list[Utterance] = []
    skipped: list[str] = []
    for speaker_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(speaker_dir.rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() in AUDIO_SUFFIXES:
                utterances.append(Utterance(path, speaker_dir.name))
            else:
                log.warning("skipping %s: not a .wav or .flac file", path)
                skipped.append(f"{path}: not a .wav or .flac file")
    return utterances, skipped


def split_corpus(
    utterances: list[Utterance], seed: int, unseen_speakers: int = 0, test_fraction: float = 0.2
) -> CorpusSplit:
    """Split speakers into training and unseen ones, and training speakers' utterances.

    The unseen draw is ``random.Random(seed).sample(sorted(speakers), k)``, the protocol
    of shared/BASELINES.md, so results compare with it.
    """
    by_speaker: dict[str, list[Utterance]] = {}
    for utt in utterances:
        by_speaker.setdefault(utt.speaker, []).append(utt)
    speakers = sorted(by_speaker)
    if len(speakers) < MIN_SPEAKERS:
        raise CorpusError(
            f"the corpus has {len(speakers)} speaker(s) with usable audio; fedspeaker needs at "
            f"least {MIN_SPEAKERS} (2 to train, 2 unseen for verification). Add speaker folders."
        )
    k = unseen_speakers or max(2, len(speakers) // 4)
    if k > len(speakers) - 2:
        raise CorpusError(
            f"--unseen-speakers {k} leaves fewer than 2 training speakers out of {len(speakers)}"
        )
    rng = random.Random(seed)
    unseen = sorted(rng.sample(speakers, k))
    trained = [s for s in speakers if s not in unseen]
    train: list[Utterance] = []
    test: list[Utterance] = []
    for speaker in trained:
        utts = sorted(by_speaker[speaker], key=lambda u: str(u.path))
        if len(utts) < 2:
            raise CorpusError(
                f"speaker {speaker} has {len(utts)} usable utterance; a training speaker "
                "needs at least 2 (one to train, one to test)"
            )
        rng.shuffle(utts)
        n_test = min(len(utts) - 1, max(1, math.ceil(test_fraction * len(utts))))
        test += utts[:n_test]
        train += utts[n_test:]
    verification = [u for s in unseen for u in sorted(by_speaker[s], key=lambda u: str(u.path))]
    return CorpusSplit(tuple(trained), tuple(unseen), tuple(train), tuple(test), tuple(verification))
