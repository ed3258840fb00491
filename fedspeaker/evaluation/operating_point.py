"""Decisions at an operating point the operator chooses, and calibrated scores.

Applying a decision (:func:`accepts`, :class:`Calibration`'s ``llr``) needs numpy only, so
the torch-free device path (fedspeaker/device/edge.py) shares it; fitting imports scipy
and torch where it runs. One accept rule (:func:`accepts`) serves `verify`, the export's manifest, the devices'
own evaluation and the server's measurements, so they cannot disagree on a score. The
threshold is chosen on validation trials for a target false-accept rate (``far:X``) or
at their EER (``eer``); a linear calibration (logistic regression, prior 0.5, as in
BOSARIS-style toolkits) maps a cosine to a log-likelihood ratio, judged by Cllr and
actual DCF beside minDCF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedspeaker.config import operating_far

S = TypeVar("S")
P_TARGET = 0.01  # the DCF's prior, as minDCF's (p_target 0.01, C_miss = C_fa = 1)


def accepts(score: S, threshold: float) -> S:
    """The accept rule everywhere: a score at or above the threshold is accepted.
    Works on a float, a numpy array or a torch tensor. A fitted threshold is one of the
    validation trials' (float32) scores, so float32 and float64 comparisons agree."""
    return score >= threshold


@dataclass(frozen=True)
class OperatingPoint:
    """``eer`` or ``far:X`` (a target false-accept rate X in (0, 1))."""

    far: float | None  # None: the EER point

    @classmethod
    def parse(cls, text: str) -> "OperatingPoint":
        return cls(operating_far(text))

    def __str__(self) -> str:
        return "eer" if self.far is None else f"far:{self.far:g}"

    def describe(self) -> str:
        return "the EER point" if self.far is None else f"FAR {100 * self.far:g} %"

    def threshold(self, scores: np.ndarray, same: np.ndarray) -> float:
        """The threshold that meets this point on these trials: the lowest one whose
        false-accept rate is at most the target (so the fewest false rejects), or the EER's."""
        if self.far is None:
            from fedspeaker.evaluation.metrics import eer_operating_point

            return eer_operating_point(scores, same)[1]
        return threshold_at_far(scores, same, self.far)


def threshold_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The lowest threshold accepting at most a share ``far`` of the non-target trials."""
    from fedspeaker.evaluation.metrics import error_rates  # torch: not for a torch-free device

    return error_rates(scores, same).threshold_at_far(far)


def rates_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    """(FAR, FRR) of :func:`accepts` at ``threshold``."""
    accepted = accepts(scores, threshold)
    return float(accepted[~same].mean()), float(1.0 - accepted[same].mean())


def frr_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The false-reject rate at the best threshold (chosen on these trials) with FAR <= ``far``."""
    return rates_at(scores, same, threshold_at_far(scores, same, far))[1]


@dataclass(frozen=True)
class Calibration:
    """LLR = scale * score + offset."""

    scale: float
    offset: float

    def llr(self, score: S) -> S:
        return self.scale * score + self.offset

    @classmethod
    def fit(cls, scores: np.ndarray, same: np.ndarray) -> "Calibration":
        """Logistic regression of target against score, targets and non-targets weighted
        to prior 0.5, so the fitted log-odds are log-likelihood ratios (scipy's Newton-CG
        minimises the prior-weighted cross-entropy, i.e. Cllr). It starts where two
        Gaussians of equal variance would put the LLR line, a few Newton steps from the
        optimum: the server fits this every round, on the full corpus's 350k trials."""
        from scipy.optimize import minimize  # fitting only: a torch-free device applies it
        from scipy.special import expit

        x = np.asarray(scores, dtype=np.float64)
        y = np.where(same, 1.0, -1.0)
        weight = np.where(same, 0.5 / same.sum(), 0.5 / (~same).sum())

        last: dict[str, np.ndarray] = {}  # the sigmoid at the last point: Newton asks its hessian there

        def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
            z = y * (params[0] * x + params[1])
            last["params"], last["sigmoid"] = params.copy(), expit(-z)
            grad_z = -weight * y * last["sigmoid"]  # d/dz log(1 + e^-z) = -sigmoid(-z)
            return float(np.sum(weight * np.logaddexp(0.0, -z))), np.array([grad_z @ x, grad_z.sum()])

        def hessian(params: np.ndarray) -> np.ndarray:
            if "params" not in last or not np.array_equal(last["params"], params):
                loss(params)
            sigmoid = last["sigmoid"]
            k = weight * sigmoid * (1.0 - sigmoid)  # sigmoid(z)(1 - sigmoid(z)) is even in z
            return np.array([[k @ (x * x), k @ x], [k @ x, k.sum()]])

        target, other = x[same], x[~same]
        variance = 0.5 * (target.var() + other.var())
        if target.min() > other.max() or variance == 0:  # separable (no finite optimum) or
            # degenerate: BFGS from the identity stops somewhere finite
            fitted = minimize(loss, np.array([1.0, 0.0]), jac=True, method="BFGS")
            return cls(float(fitted.x[0]), float(fitted.x[1]))
        start = np.array([(target.mean() - other.mean()) / variance,
                          (other.mean() ** 2 - target.mean() ** 2) / (2 * variance)])
        fitted = minimize(loss, start, jac=True, hess=hessian, method="Newton-CG")
        return cls(float(fitted.x[0]), float(fitted.x[1]))


def cllr(llrs: np.ndarray, same: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits: 0 is perfect, 1 is a system that always says
    LLR 0 (no information); above 1, badly calibrated scores do harm."""
    target = np.logaddexp(0.0, -llrs[same]).mean()
    nontarget = np.logaddexp(0.0, llrs[~same]).mean()
    return float((target + nontarget) / (2 * np.log(2)))


def actual_dcf(llrs: np.ndarray, same: np.ndarray, p_target: float = P_TARGET) -> float:
    """Normalised DCF of the Bayes decisions the LLRs make at ``p_target`` (C_miss = C_fa
    = 1): what calibration costs against minDCF's best threshold chosen in hindsight."""
    far, frr = rates_at(llrs, same, float(np.log((1 - p_target) / p_target)))
    return (p_target * frr + (1 - p_target) * far) / min(p_target, 1 - p_target)
