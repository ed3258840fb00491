"""Identification accuracy and verification EER (cosine scoring of embeddings)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


def equal_error_rate(scores: np.ndarray, same: np.ndarray) -> float:
    """EER: the rate where false accepts equal false rejects, over all thresholds."""
    return eer_operating_point(scores, same)[0]


def eer_operating_point(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The EER and its threshold: accepting scores >= the threshold gives that EER here."""
    n_target, n_nontarget = int(same.sum()), int((~same).sum())
    if n_target == 0 or n_nontarget == 0:
        raise ValueError("EER needs both same-speaker and different-speaker trials")
    order = np.argsort(-scores, kind="stable")
    ranked, is_target = scores[order], same[order]
    # A threshold can only fall between distinct scores: accept the top k trials for
    # each k that ends a run of tied scores (and k = 0)
    cuts = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    accepted = np.r_[0, cuts + 1]
    false_reject = 1.0 - np.r_[0, np.cumsum(is_target)[cuts]] / n_target
    false_accept = np.r_[0, np.cumsum(~is_target)[cuts]] / n_nontarget
    i = int(np.argmin(np.abs(false_reject - false_accept)))
    threshold = float(ranked[accepted[i] - 1]) if accepted[i] else float("inf")
    return float((false_reject[i] + false_accept[i]) / 2), threshold


def verification_trials(embeddings: torch.Tensor, speakers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of every pair of utterances, and whether each pair is one speaker."""
    e = F.normalize(embeddings.float(), dim=1)
    scores = (e @ e.T).numpy()
    ids = np.unique(np.asarray(speakers), return_inverse=True)[1]
    rows, cols = np.triu_indices(len(speakers), k=1)
    return scores[rows, cols], ids[rows] == ids[cols]


def verification_eer(embeddings: torch.Tensor, speakers: list[str]) -> float:
    """EER over every pair of utterances, scored by cosine similarity."""
    return equal_error_rate(*verification_trials(embeddings, speakers))
