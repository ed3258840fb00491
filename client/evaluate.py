"""Scoring the global model on a device's own held-out recordings, with no audio leaving it.

The device enrols each of its speakers (the normalised mean embedding of its training
recordings), then counts: held-out recordings the model's head names right; owner
trials (a held-out recording against its speaker's voiceprint) rejected at the model's
threshold; impostor trials (a voiceprint against the embeddings of the server's public
cohort) accepted. Only these counts travel; the server sums them over devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedspeaker import wire
from fedspeaker.evaluation.operating_point import accepts
from fedspeaker.evaluation.scoring import embed
from fedspeaker.evaluation.voiceprint import voiceprint


@torch.no_grad()
def score_on_device(model: nn.Module, *, enrol: tuple[list[torch.Tensor], list[int]],
                    held_out: tuple[list[torch.Tensor], list[int]], cohort: torch.Tensor,
                    threshold: float) -> dict[str, int]:
    """The evaluate reply's counts (fedspeaker/wire.py) for one device."""
    test_feats, test_labels = held_out
    counts = dict.fromkeys(wire.EVALUATION_COUNTS, 0)
    if not test_feats or not enrol[0]:
        return counts
    raw = embed(model, test_feats, raw=True)
    test = F.normalize(model.backend(raw), dim=1)
    labels = torch.tensor(test_labels)
    enrolled = embed(model, enrol[0])
    enrol_labels = torch.tensor(enrol[1])
    prints = {s: voiceprint(enrolled[enrol_labels == s]) for s in sorted(set(enrol[1]))}
    owned = [i for i, label in enumerate(test_labels) if label in prints]
    owner_scores = torch.stack([test[i] @ prints[test_labels[i]] for i in owned]) if owned else torch.empty(0)
    impostor_scores = torch.stack([p for p in prints.values()]) @ F.normalize(cohort.float(), dim=1).T
    counts.update({
        wire.NUM_EXAMPLES: len(test_feats),
        wire.ID_CORRECT: int((model.head(raw).argmax(dim=1) == labels).sum()),
        wire.TARGET_TRIALS: len(owned),
        wire.FALSE_REJECTS: int((~accepts(owner_scores, threshold)).sum()),
        wire.IMPOSTOR_TRIALS: impostor_scores.numel(),
        wire.FALSE_ACCEPTS: int(accepts(impostor_scores, threshold).sum()),
    })
    return counts
