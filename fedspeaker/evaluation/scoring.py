"""Scoring a speaker model: utterance embeddings, identification and verification."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F

from fedspeaker.evaluation.metrics import accuracy, verification_eer
from fedspeaker.model import SpeakerNet
from fedspeaker.training.loops import fit_length


@torch.no_grad()
def embed(model: SpeakerNet, feats: Sequence[torch.Tensor], max_frames: int) -> torch.Tensor:
    """Embeddings of whole utterances (up to ``max_frames``), batched by equal length."""
    model.eval()
    clipped = [f if f.shape[1] <= max_frames else fit_length(f, max_frames) for f in feats]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, f in enumerate(clipped):
        groups[f.shape[1]].append(i)
    out = torch.empty(len(feats), model.embedding.out_features)
    for idx in groups.values():
        out[idx] = model.embed(torch.stack([clipped[i] for i in idx]))
    return out


@torch.no_grad()
def evaluate(model: SpeakerNet, test_feats: Sequence[torch.Tensor], test_labels: Sequence[int],
             verify_feats: Sequence[torch.Tensor], verify_speakers: list[str],
             max_frames: int) -> dict[str, float]:
    """Identification accuracy/loss on held-out utterances; EER on unseen speakers."""
    logits = model.head(embed(model, test_feats, max_frames))
    labels = torch.tensor(list(test_labels))
    return {
        "accuracy": accuracy(logits, labels),
        "loss": float(F.cross_entropy(logits, labels)),
        "eer": verification_eer(embed(model, verify_feats, max_frames), verify_speakers),
    }
