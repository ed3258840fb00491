"""Scoring a speaker model as speaker-recognition users expect it.

Identification: held-out utterances of the training speakers, named by the model's
head and by the nearest enrolled voiceprint (a speaker's voiceprint is the normalised
mean embedding of its training utterances). Verification: trials on speakers never
seen in training (every pair, a seeded sample, or a user's trial list), cosine scoring
(optionally adaptive s-norm against the training utterances' embeddings), EER and
minDCF (p_target 0.01, C_miss = C_fa = 1). Beside them, trials of the type a device
decides (evaluation/enrolment.py): the threshold of the run's operating point and the
calibration, fitted on the training speakers' held-out recordings, and what they give on
the unseen speakers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedspeaker.config import RunSettings
from fedspeaker.data.features import FeatureCache, FeatureSpec, fit_length
from fedspeaker.data.speakers import SpeakerData
from fedspeaker.errors import AudioError, ConfigError
from fedspeaker.evaluation.conditions import babble_talkers, condition_figures, degraded_test_features
from fedspeaker.evaluation.enrolment import EnrolmentTrials, operating_figures, unseen_trials, validation_trials
from fedspeaker.evaluation.metrics import accuracy, error_rates
from fedspeaker.evaluation.operating_point import OperatingPoint
from fedspeaker.evaluation.trials import Trials, choose_trials, read_trial_list, trial_scores
from fedspeaker.evaluation.voiceprint import voiceprint


@torch.no_grad()
def embed(model: nn.Module, feats: Sequence[torch.Tensor], *, raw: bool = False) -> torch.Tensor:
    """Embeddings of whole utterances (up to the model's ``eval_frames``), batched by
    equal length: through the model's scoring back end, or with ``raw`` before it (what
    the training head reads and what devices sum for the back end)."""
    model.eval()
    frames = model.eval_frames
    clipped = [f if f.shape[1] <= frames else fit_length(f, frames) for f in feats]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, f in enumerate(clipped):
        groups[f.shape[1]].append(i)
    out = torch.empty(len(feats), model.embedding_dim)
    for idx in groups.values():
        batch = torch.stack([clipped[i] for i in idx])
        out[idx] = model.raw_embed(batch) if raw else model.embed(batch)
    return out


def voiceprints(embeddings: torch.Tensor, labels: Sequence[int], n_speakers: int) -> torch.Tensor:
    """One voiceprint per speaker (a zero vector for a speaker without embeddings)."""
    labels = torch.tensor(list(labels))
    return torch.stack([voiceprint(embeddings[labels == s]) if (labels == s).any()
                        else torch.zeros(embeddings.shape[1]) for s in range(n_speakers)])


@dataclass
class EvaluationSet:
    """What the server scores every round: held-out utterances of the training speakers,
    their training utterances (enrolment for voiceprints, and the s-norm cohort), and the
    verification utterances with their trials."""

    test_feats: list[torch.Tensor]
    test_labels: list[int]
    enrol_feats: list[torch.Tensor]
    enrol_labels: list[int]
    n_speakers: int
    verify_feats: list[torch.Tensor]
    trials: Trials
    speakers_scored: int  # distinct speakers in the verification trials
    score_norm: str = "none"
    cohort_top: int = 100
    # trials in the enrolment configuration (evaluation/enrolment.py): validation on the
    # training speakers (indices into enrol_feats and test_feats), test on unseen speakers
    # (indices into unseen_feats, or verify_feats where that is None)
    validation: EnrolmentTrials | None = None
    unseen: EnrolmentTrials | None = None
    unseen_feats: list[torch.Tensor] | None = None
    operating_point: OperatingPoint = OperatingPoint(0.01)
    # test-conditions: each condition's degraded copy of verify_feats (evaluation/conditions.py)
    conditions: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, data: SpeakerData, settings: RunSettings) -> "EvaluationSet":
        """The run's evaluation: the split's unseen speakers (all pairs or a seeded sample
        of ``max-trials``), or the trials of ``trial-list``."""
        test_feats, test_labels = data.test_examples()
        enrol_feats, enrol_labels = data.train_examples()
        names = data.split.speakers
        validation = validation_trials([names[i] for i in enrol_labels], [names[i] for i in test_labels],
                                       settings.enrol_recordings, settings.seed)
        unseen_feats, unseen_speakers = data.verification_examples()
        unseen = unseen_trials(unseen_speakers, settings.enrol_recordings, settings.seed)
        train_talkers = [(u.path, u.speaker) for u in data.split.train]
        if settings.trial_list:
            verify_feats, trials, scored, verify_paths = _listed_trials(settings)
            trial_speakers = {_speaker_folder(p, settings.corpus_dir) for p in verify_paths}
        else:
            verify_paths = [u.path for u in data.split.verification]
            trial_speakers = {u.speaker for u in data.split.verification}
            verify_feats, speakers = data.verification_examples()
            trials = choose_trials(speakers, settings.max_trials, settings.seed)
            trials = Trials(trials.enrol, trials.test, trials.target,
                            f"{trials.source} of {len(speakers)} utterances of "
                            f"{len(set(speakers))} unseen speakers")
            scored = len(set(speakers))
            unseen_feats = None  # the same recordings as verify_feats: embedded once
        conditions = degraded_test_features(settings, verify_paths,
                                            babble_talkers(train_talkers, trial_speakers))
        return cls(test_feats, test_labels, enrol_feats, enrol_labels, data.n_speakers,
                   verify_feats, trials, scored, settings.score_norm, settings.cohort_top,
                   validation, unseen, unseen_feats, OperatingPoint.parse(settings.operating_point),
                   conditions)


def _listed_trials(settings: RunSettings) -> tuple[list[torch.Tensor], Trials, int, list[Path]]:
    """The features of a trial list's files, its trials, how many speaker folders they
    come from, and the files."""
    files, trials = read_trial_list(Path(settings.trial_list).expanduser(), settings.corpus_dir)
    cache = FeatureCache(settings.feature_cache_dir, FeatureSpec.of(settings))
    feats = []
    for path in files:
        try:
            feats.append(cache.get(path))
        except AudioError as exc:
            raise ConfigError(f"trial-list {settings.trial_list}: {exc}") from None
    return feats, trials, len({_speaker_folder(path, settings.corpus_dir) for path in files}), files


def _speaker_folder(path: Path, root: Path) -> str:
    """The first folder under the corpus root: the speaker, in fedspeaker's and
    VoxCeleb's layouts."""
    try:
        return path.resolve().relative_to(root.resolve()).parts[0]
    except ValueError:
        return path.parent.name


@torch.no_grad()
def evaluate(model: nn.Module, evaluation: EvaluationSet) -> dict[str, float]:
    """The model's scores on ``evaluation``.

    Returns ``accuracy`` (the head's identification accuracy), ``voiceprint_accuracy``
    (nearest enrolled voiceprint), ``loss`` (the head's cross-entropy), ``eer`` and
    ``min_dcf`` (with the run's score normalisation) and ``trials`` over the verification
    trials; and, in the enrolment configuration, ``threshold`` (the cosine a device
    compares a voiceprint score with, at the run's operating point on validation trials),
    the calibration and the unseen speakers' figures at that threshold
    (:func:`~fedspeaker.evaluation.enrolment.operating_figures`); with ``test-conditions``,
    ``eer_<condition>``, ``min_dcf_<condition>`` and ``degraded_eer_mean``
    (:func:`~fedspeaker.evaluation.conditions.condition_figures`).
    """
    e = evaluation
    raw_test = embed(model, e.test_feats, raw=True)
    test = model.backend(raw_test)
    labels = torch.tensor(list(e.test_labels))
    logits = model.head(raw_test)  # the training head reads embeddings before the back end
    enrolled = embed(model, e.enrol_feats)
    prints = voiceprints(enrolled, e.enrol_labels, e.n_speakers)
    verify = embed(model, e.verify_feats)
    figures = {}
    if e.validation is not None and e.unseen is not None:  # the threshold is a cosine, as on a device
        unseen = verify if e.unseen_feats is None else embed(model, e.unseen_feats)
        figures = operating_figures(
            e.operating_point, (e.validation.scores(enrolled, test), e.validation.target),
            (e.unseen.scores(unseen, unseen), e.unseen.target))
    cohort = enrolled if e.score_norm == "s-norm" else None
    curve = error_rates(trial_scores(verify, e.trials, cohort=cohort, top=e.cohort_top), e.trials.target)
    if e.conditions:  # the same trials, the test side degraded
        figures.update(condition_figures(verify, {name: embed(model, feats) for name, feats in e.conditions.items()},
                                         e.trials, cohort=cohort, top=e.cohort_top))
    return {
        "accuracy": accuracy(logits, labels),
        "voiceprint_accuracy": accuracy(F.normalize(test, dim=1) @ prints.T, labels),
        "loss": float(F.cross_entropy(logits, labels)),
        "eer": curve.eer()[0],
        "min_dcf": curve.min_dcf(),
        "trials": float(len(e.trials)),
        **figures,
    }
