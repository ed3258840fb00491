"""Identification accuracy, verification EER and minDCF (cosine scoring of embeddings)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


class ErrorCurve(NamedTuple):
    """Every operating point of a trial list: accepting scores >= thresholds[i] gives
    false_reject[i] and false_accept[i]. Made once per trial list (its sort is most of
    the cost) and read for each figure."""

    thresholds: np.ndarray
    false_reject: np.ndarray
    false_accept: np.ndarray

    def eer(self) -> tuple[float, float]:
        """The EER and its threshold: accepting scores >= the threshold gives that EER here."""
        i = int(np.argmin(np.abs(self.false_reject - self.false_accept)))
        return float((self.false_reject[i] + self.false_accept[i]) / 2), float(self.thresholds[i])

    def min_dcf(self, *, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
        """Minimum normalised detection cost (NIST SRE / VoxSRC): the lowest
        c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target) over all thresholds, divided
        by the cost of the better of always accepting or always rejecting."""
        cost = c_miss * self.false_reject * p_target + c_fa * self.false_accept * (1 - p_target)
        return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))

    def threshold_at_far(self, far: float) -> float:
        """The lowest threshold accepting at most a share ``far`` of the non-target trials."""
        # +inf (accept none) always qualifies
        return float(self.thresholds[np.flatnonzero(self.false_accept <= far)[-1]])


def error_rates(scores: np.ndarray, same: np.ndarray) -> ErrorCurve:
    """The :class:`ErrorCurve` of a trial list. A threshold can only fall between distinct
    scores, so there is one point per run of tied scores (and +inf: accept none)."""
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
    return ErrorCurve(thresholds, false_reject, false_accept)


def eer_operating_point(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The EER and its threshold (:meth:`ErrorCurve.eer`)."""
    return error_rates(scores, same).eer()


def min_dcf(scores: np.ndarray, same: np.ndarray, *, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """:meth:`ErrorCurve.min_dcf` of a trial list."""
    return error_rates(scores, same).min_dcf(p_target=p_target, c_miss=c_miss, c_fa=c_fa)
