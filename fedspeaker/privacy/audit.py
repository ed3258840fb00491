"""Membership inference against a trained speaker model: can an attacker holding the
model tell which utterances it was trained on?

Members are training utterances of the training speakers; non-members are held-out
utterances of the same speakers, so speaker identity gives nothing away. Two attacks,
each reported as the AUC of its score (0.5: no better than a coin; 1.0: always right):

- loss: the model's cross-entropy on the true speaker; training utterances tend to
  have a lower loss (Yeom et al., 2018).
- enrolment: the cosine score of the utterance's embedding against its speaker's
  voiceprint, the mean embedding of all the speaker's other utterances (members and
  non-members pooled, leave-one-out), as a verification system would score a trial.
  A model that memorised its training utterances pulls them closer to the voiceprint.

:func:`audit_run` audits a run's global_model.pt: members are the utterances some
client trained on (the union of the shards), non-members the held-out utterances of the
same speakers, both rebuilt from the settings saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from scipy.stats import mannwhitneyu

from fedspeaker.data.partition import client_shards
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.errors import FedSpeakerError
from fedspeaker.evaluation.scoring import embed
from fedspeaker.model.bundle import SpeakerModel


@dataclass(frozen=True)
class AuditResult:
    loss_auc: float
    enrolment_auc: float
    members: int
    nonmembers: int


def membership_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(a member scores higher than a non-member), ties counted half: the ROC AUC."""
    u = mannwhitneyu(member_scores, nonmember_scores, alternative="two-sided").statistic
    return float(u / (len(member_scores) * len(nonmember_scores)))


@torch.no_grad()
def audit_model(model: nn.Module, *, member_feats: Sequence[torch.Tensor], member_labels: Sequence[int],
                nonmember_feats: Sequence[torch.Tensor], nonmember_labels: Sequence[int]) -> AuditResult:
    """Run both attacks; a higher score means 'member' for each."""
    feats = list(member_feats) + list(nonmember_feats)
    labels = torch.tensor(list(member_labels) + list(nonmember_labels))
    is_member = np.r_[np.ones(len(member_feats), bool), np.zeros(len(nonmember_feats), bool)]
    embeddings = embed(model, feats)
    loss_score = -F.cross_entropy(model.head(embeddings), labels, reduction="none").numpy()
    enrolment_score = _leave_one_out_scores(F.normalize(embeddings, dim=1), labels).numpy()
    return AuditResult(
        loss_auc=membership_auc(loss_score[is_member], loss_score[~is_member]),
        enrolment_auc=membership_auc(enrolment_score[is_member], enrolment_score[~is_member]),
        members=int(is_member.sum()), nonmembers=int((~is_member).sum()),
    )


def _leave_one_out_scores(unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cosine of each embedding with the mean of its speaker's other embeddings."""
    n_speakers = int(labels.max()) + 1
    sums = torch.zeros(n_speakers, unit.shape[1]).index_add_(0, labels, unit)
    counts = torch.bincount(labels, minlength=n_speakers)
    others = sums[labels] - unit
    alone = counts[labels] < 2  # no other utterance to enrol from: no evidence either way
    scores = F.cosine_similarity(unit, others, dim=1)
    scores[alone] = 0.0
    return scores


def audit_run(model_path: Path) -> AuditResult:
    """Both attacks against the global model a run saved, on the corpus it trained on."""
    loaded = SpeakerModel.load(model_path)
    settings = loaded.settings
    data = load_speaker_data(settings)
    if list(data.split.speakers) != loaded.speakers:
        raise FedSpeakerError(f"{model_path}: its speakers are not those of {settings.corpus_dir} "
                              "with its seed; audit it where it was trained")
    members = sorted(i for shard in client_shards(settings) for i in shard)
    member_x, member_y = data.train_examples(members)
    other_x, other_y = data.test_examples()
    return audit_model(loaded.model, member_feats=member_x, member_labels=member_y,
                       nonmember_feats=other_x, nonmember_labels=other_y)
