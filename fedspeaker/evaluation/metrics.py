"""Identification accuracy, verification EER and minDCF (cosine scoring of embeddings)."""

from __future__ import annotations

import numpy as np
import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


def error_rates(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every operating point of a trial list: (thresholds, false-reject, false-accept rates).

    Accepting scores >= thresholds[i] gives those rates; a threshold can only fall between
    distinct scores, so there is one point per run of tied scores (and +inf: accept none).
    """
    n_target, n_nontarget = int(same.sum()), int((~same).sum())
    if n_target == 0 or n_nontarget == 0:
        raise ValueError("EER needs both same-speaker and different-speaker trials")
    # any sort will do: tied scores form one run, and only the ends of runs are read
    # (a stable sort costs six times as much on a full corpus's 350k trials, every round)
    order = np.argsort(-scores)
    ranked, is_target = scores[order], same[order]
    cuts = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    thresholds = np.r_[np.inf, ranked[cuts]]
    false_reject = 1.0 - np.r_[0, np.cumsum(is_target)[cuts]] / n_target
    false_accept = np.r_[0, np.cumsum(~is_target)[cuts]] / n_nontarget
    return thresholds, false_reject, false_accept


def eer_operating_point(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The EER and its threshold: accepting scores >= the threshold gives that EER here."""
    thresholds, false_reject, false_accept = error_rates(scores, same)
    i = int(np.argmin(np.abs(false_reject - false_accept)))
    return float((false_reject[i] + false_accept[i]) / 2), float(thresholds[i])


def min_dcf(scores: np.ndarray, same: np.ndarray, *, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """Minimum normalised detection cost (NIST SRE / VoxSRC): the lowest
    c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target) over all thresholds, divided
    by the cost of the better of always accepting or always rejecting."""
    _, false_reject, false_accept = error_rates(scores, same)
    cost = c_miss * false_reject * p_target + c_fa * false_accept * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))
