"""Trials of the type a device decides: a voiceprint of a few recordings against one.

Two sets of them, kept apart. *Validation*: the training speakers' voiceprints (from
their training recordings) against their held-out recordings; the operating point's
threshold and the calibration are fitted there, and the released round is chosen
there. *Test*: the unseen speakers' voiceprints against their other recordings; the
reported figures are measured there with what validation chose, never fitted on it.
A voiceprint is made as `enroll` makes it: the unit-length mean of unit-length
embeddings of ``enrol-recordings`` recordings (each speaker's recordings are shuffled by
seed and dealt into disjoint voiceprints; one with fewer recordings gets one voiceprint
of all it has).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedspeaker.errors import CorpusError
from fedspeaker.evaluation.metrics import error_rates
from fedspeaker.evaluation.operating_point import (
    Calibration,
    OperatingPoint,
    actual_dcf,
    cllr,
    rates_at,
)
from fedspeaker.evaluation.voiceprint import voiceprint

FAR_1PCT = 0.01


@dataclass(frozen=True)
class EnrolmentTrials:
    """Voiceprints (groups of indices into the enrolment embeddings) against single
    recordings (indices into the test embeddings)."""

    groups: tuple[tuple[int, ...], ...]
    voiceprint: np.ndarray  # each trial's voiceprint
    test: np.ndarray  # each trial's test recording
    target: np.ndarray  # bool: the voiceprint's speaker is the recording's
    speakers: int
    source: str

    def __len__(self) -> int:
        return len(self.target)

    def scores(self, enrol: torch.Tensor, test: torch.Tensor) -> np.ndarray:
        """Each trial's cosine between the voiceprint and the recording's embedding."""
        enrol = enrol.float()
        prints = torch.empty(len(self.groups), enrol.shape[1])
        by_size: dict[int, list[int]] = {}
        for i, group in enumerate(self.groups):
            by_size.setdefault(len(group), []).append(i)
        for rows in by_size.values():  # all groups of a size at once: the same sums, in order
            prints[rows] = voiceprint(enrol[torch.tensor([self.groups[i] for i in rows])].transpose(0, 1))
        matrix = prints @ F.normalize(test.float(), dim=1).T
        return matrix[torch.from_numpy(self.voiceprint), torch.from_numpy(self.test)].numpy()


def _groups(speakers: Sequence[str], k: int, seed: int, salt: str) -> list[tuple[str, tuple[int, ...]]]:
    """Each speaker's recordings, shuffled by seed, dealt into voiceprints of ``k``."""
    by_speaker: dict[str, list[int]] = {}
    for i, speaker in enumerate(speakers):
        by_speaker.setdefault(speaker, []).append(i)
    rng = random.Random(f"{seed}-{salt}")
    groups = []
    for speaker in sorted(by_speaker):
        indices = by_speaker[speaker]
        rng.shuffle(indices)
        chunks = [tuple(indices[i:i + k]) for i in range(0, len(indices) - k + 1, k)] or [tuple(indices)]
        groups += [(speaker, chunk) for chunk in chunks]
    return groups


def validation_trials(enrol_speakers: Sequence[str], test_speakers: Sequence[str], k: int,
                      seed: int) -> EnrolmentTrials:
    """Every voiceprint of the training recordings against every held-out recording."""
    groups = _groups(enrol_speakers, k, seed, "validation-voiceprints")
    voiceprint, test = (a.ravel() for a in np.meshgrid(np.arange(len(groups)), np.arange(len(test_speakers)),
                                                       indexing="ij"))
    owners = np.array([s for s, _ in groups])
    target = owners[voiceprint] == np.asarray(test_speakers)[test]
    _check(target, "validation", "training speakers' held-out", k)
    return EnrolmentTrials(tuple(g for _, g in groups), voiceprint, test, target, len(set(owners)),
                           f"{len(groups)} voiceprints of {k} training recordings against "
                           f"{len(test_speakers)} held-out recordings of {len(set(owners))} "
                           "training speakers")


def unseen_trials(speakers: Sequence[str], k: int, seed: int) -> EnrolmentTrials:
    """Every voiceprint against every recording of the same pool that is not in it."""
    groups = _groups(speakers, k, seed, "test-voiceprints")
    pairs = [(v, t) for v, (_, g) in enumerate(groups) for t in range(len(speakers)) if t not in g]
    voiceprint, test = (np.array(a, dtype=np.int64) for a in zip(*pairs))
    owners = np.array([s for s, _ in groups])
    target = owners[voiceprint] == np.asarray(speakers)[test]
    _check(target, "test", "unseen speakers'", k)
    return EnrolmentTrials(tuple(g for _, g in groups), voiceprint, test, target, len(set(speakers)),
                           f"{len(groups)} voiceprints of {k} recordings against the other "
                           f"recordings of {len(set(speakers))} unseen speakers")


def _check(target: np.ndarray, which: str, recordings: str, k: int) -> None:
    if target.all() or not target.any():
        raise CorpusError(f"the {which} trials (voiceprints of enrol-recordings={k} against the "
                          f"{recordings} recordings) need both same-speaker and different-speaker "
                          "trials: give a corpus with more recordings per speaker, or a smaller "
                          "enrol-recordings")


def operating_figures(point: OperatingPoint, validation: tuple[np.ndarray, np.ndarray],
                      test: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """What validation chooses (``threshold``, the calibration) and how it fares on the
    test trials: ``far`` and ``frr`` at the threshold, ``frr_at_far_1pct`` (at the best
    threshold for FAR 1 % chosen on the test trials themselves), ``enrol_eer``,
    ``enrol_min_dcf``, ``cllr`` and ``act_dcf`` of the calibrated scores; and
    ``val_frr``, the validation FRR at the operating point (the release signal)."""
    val_scores, val_same = validation
    scores, same = test
    threshold = point.threshold(val_scores, val_same)
    calibration = Calibration.fit(val_scores, val_same)
    llrs = calibration.llr(scores.astype(np.float64))
    far, frr = rates_at(scores, same, threshold)
    curve = error_rates(scores, same)
    return {
        "threshold": threshold,
        "far": far,
        "frr": frr,
        "frr_at_far_1pct": rates_at(scores, same, curve.threshold_at_far(FAR_1PCT))[1],
        "enrol_eer": curve.eer()[0],
        "enrol_min_dcf": curve.min_dcf(),
        "cllr": cllr(llrs, same),
        "act_dcf": actual_dcf(llrs, same),
        "llr_scale": calibration.scale,
        "llr_offset": calibration.offset,
        "val_frr": rates_at(val_scores, val_same, threshold)[1],
    }
