"""Membership inference: near 0.5 on a model that never saw either set, high on one
that memorised its training utterances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedspeaker.privacy.audit import audit_model, membership_auc
from fedspeaker.config import RunSettings
from fedspeaker.training.local import LocalTrainer
from fedspeaker.model import build_model
from fedspeaker.privacy.ledger import PrivacyLedger

N_MELS, SPEAKERS = 24, 4


def utterances(n_per_speaker: int, seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """Speakers differ a little in their mean spectrum; each utterance is mostly its own noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(SPEAKERS, N_MELS, 1, generator=torch.Generator().manual_seed(99)) * 0.3
    feats, labels = [], []
    for spk in range(SPEAKERS):
        for _ in range(n_per_speaker):
            feats.append(centres[spk] + torch.randn(N_MELS, 60, generator=gen))
            labels.append(spk)
    return feats, labels


def test_auc_of_separated_equal_and_tied_scores() -> None:
    assert membership_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert membership_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert membership_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert membership_auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5


@pytest.mark.usefixtures("single_thread")
def test_a_model_that_saw_neither_set_gives_auc_near_one_half() -> None:
    members, member_labels = utterances(40, seed=1)
    others, other_labels = utterances(40, seed=2)
    model = build_model(RunSettings(model="tdnn", head_lr=0.0, n_mels=N_MELS, channels=16, embedding_dim=16), SPEAKERS)
    result = audit_model(model, member_feats=members, member_labels=member_labels, nonmember_feats=others,
                         nonmember_labels=other_labels)
    assert result.members == result.nonmembers == 160
    # 160 vs 160 scores: the AUC's standard error under no signal is about 0.03
    assert abs(result.loss_auc - 0.5) < 0.1, result
    assert abs(result.enrolment_auc - 0.5) < 0.1, result


@pytest.mark.usefixtures("single_thread")
def test_a_model_that_memorised_its_training_utterances_is_caught() -> None:
    members, member_labels = utterances(12, seed=1)
    others, other_labels = utterances(12, seed=2)
    settings = RunSettings(model="tdnn", head_lr=0.0, dp=False, channels=32, embedding_dim=16, n_mels=N_MELS, crop_frames=60,
                           batch_size=8, optimizer="adam", lr=0.003, local_epochs=100)
    trainer = LocalTrainer(settings, SPEAKERS)
    trainer.train(members, member_labels, PrivacyLedger(), seed=0)
    result = audit_model(trainer.model, member_feats=members, member_labels=member_labels, nonmember_feats=others,
                         nonmember_labels=other_labels)
    # 48 vs 48: the standard error under no signal is about 0.06
    assert result.loss_auc > 0.7 and result.enrolment_auc > 0.6, result
