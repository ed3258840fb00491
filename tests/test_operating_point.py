"""Decisions at the operator's operating point, calibrated scores, the trials they are
fitted and measured on, and the round a run releases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.evaluate import score_on_device
from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.device.voiceprints import EnrolmentStore, verify
from fedspeaker.errors import ConfigError, CorpusError
from fedspeaker.evaluation.enrolment import operating_figures, unseen_trials, validation_trials
from fedspeaker.evaluation.metrics import min_dcf
from fedspeaker.evaluation.operating_point import (
    Calibration,
    OperatingPoint,
    actual_dcf,
    cllr,
    rates_at,
    threshold_at_far,
)
from fedspeaker.evaluation.release import release_reason, released_row


def _gaussian_trials(n_target: int = 2000, n_nontarget: int = 20000, sigma: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(1.0, sigma, n_target), rng.normal(-1.0, sigma, n_nontarget)]
    return scores, np.r_[np.ones(n_target, bool), np.zeros(n_nontarget, bool)]


@pytest.mark.parametrize("far", [0.001, 0.01, 0.05, 0.3])
def test_the_threshold_meets_its_far_on_the_trials_it_was_fitted_on(far: float) -> None:
    scores, same = _gaussian_trials()
    scores = np.round(scores, 2)  # with ties
    threshold = OperatingPoint.parse(f"far:{far}").threshold(scores, same)
    got_far, got_frr = rates_at(scores, same, threshold)
    assert got_far <= far
    # and it is the lowest such threshold: the next lower score accepts too many impostors
    lower = scores[scores < threshold].max()
    assert rates_at(scores, same, lower)[0] > far
    assert got_frr < 1.0


def test_the_eer_point_balances_the_two_errors() -> None:
    scores, same = _gaussian_trials(sigma=0.9)
    far, frr = rates_at(scores, same, OperatingPoint.parse("eer").threshold(scores, same))
    assert abs(far - frr) < 0.01


def test_an_unreachable_far_accepts_nothing() -> None:
    scores = np.array([0.9, 0.8, 0.95, 0.1])  # an impostor scores highest
    same = np.array([True, True, False, False])
    assert threshold_at_far(scores, same, 0.01) == math.inf


@pytest.mark.parametrize("text", ["far:0", "far:1", "far:-0.1", "far:x", "far", "frr:0.01", "EER", ""])
def test_a_bad_operating_point_is_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match="operating-point"):
        RunSettings.from_run_config({"operating-point": text})


def test_bad_enrolment_and_release_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="enrol-recordings"):
        RunSettings.from_run_config({"enrol-recordings": 0})
    with pytest.raises(ConfigError, match="release"):
        RunSettings.from_run_config({"release": "first"})
    assert str(OperatingPoint.parse(RunSettings().operating_point)) == "far:0.01"


def test_calibration_is_monotone_with_llrs_of_the_right_sign_and_scale() -> None:
    # equal-variance Gaussians at +-1, sd 0.5: the true LLR is 2 * 1 * s / 0.25 = 8 s
    scores, same = _gaussian_trials(sigma=0.5)
    calibration = Calibration.fit(scores, same)
    assert calibration.scale == pytest.approx(8.0, rel=0.1)
    assert abs(calibration.offset) < 0.3
    grid = np.linspace(-2, 2, 41)
    assert np.all(np.diff(calibration.llr(grid)) > 0)  # monotone: it never reorders trials
    llrs = calibration.llr(scores)
    assert np.mean(llrs[same] > 0) > 0.97 and np.mean(llrs[~same] < 0) > 0.97
    assert cllr(llrs, same) < 0.1  # well-separated scores, well calibrated
    assert cllr(np.zeros(len(same)), same) == pytest.approx(1.0)  # no information: 1 bit
    assert cllr(-llrs, same) > 1.0  # the wrong sign costs more than saying nothing
    assert actual_dcf(llrs, same) >= min_dcf(llrs, same) - 1e-12


def test_the_calibration_holds_for_imbalanced_trials() -> None:
    # prior 0.5 weighting: ten times as many impostors must not move the LLRs
    few, many = _gaussian_trials(2000, 2000, seed=1), _gaussian_trials(2000, 20000, seed=1)
    a, b = Calibration.fit(*few), Calibration.fit(*many)
    assert a.scale == pytest.approx(b.scale, rel=0.1) and abs(a.offset - b.offset) < 0.3


def test_the_calibration_reaches_the_optimum_and_stays_finite_on_separable_trials() -> None:
    from scipy.optimize import minimize

    scores, same = _gaussian_trials(500, 5000, seed=2)
    fitted = Calibration.fit(scores, same)
    weight = np.where(same, 0.5 / same.sum(), 0.5 / (~same).sum())

    def prior_weighted_xent(p: np.ndarray) -> float:
        return float(np.sum(weight * np.logaddexp(0.0, -np.where(same, 1, -1) * (p[0] * scores + p[1]))))

    best = minimize(prior_weighted_xent, np.array([1.0, 0.0]), method="Nelder-Mead",
                    options={"xatol": 1e-9, "fatol": 1e-14, "maxiter": 5000})
    assert prior_weighted_xent(np.array([fitted.scale, fitted.offset])) <= best.fun + 1e-9
    separable = Calibration.fit(np.r_[np.full(5, 0.9), np.full(50, 0.1)], np.r_[np.ones(5, bool), np.zeros(50, bool)])
    assert np.isfinite(separable.scale) and separable.scale > 0
    constant = Calibration.fit(np.full(55, 0.5), np.r_[np.ones(5, bool), np.zeros(50, bool)])
    assert np.isfinite([constant.scale, constant.offset]).all()


class _Embedder:
    """An embedder whose files are given vectors."""

    model_id = "m"

    def __init__(self, vectors: dict[str, torch.Tensor], verification: dict) -> None:
        self.vectors, self.verification = vectors, verification

    def embed_file(self, path: Path) -> torch.Tensor:
        return F.normalize(self.vectors[path.name], dim=0)


class _Identity(torch.nn.Module):
    eval_frames = 10
    embedding_dim = 2

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0]

    raw_embed = embed

    def backend(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def head(self, e: torch.Tensor) -> torch.Tensor:
        return e


def test_verify_and_the_server_make_the_same_decision_for_the_same_score(tmp_path: Path) -> None:
    owner, claim = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    score = float(torch.dot(F.normalize(claim, dim=0), owner))
    # thresholds are scores of validation trials, so float32 values like every score
    above = float(np.nextafter(np.float32(score), np.float32(np.inf)))
    for threshold, accepted in ((score, True), (above, False)):
        verification = {"threshold": threshold, "operating_point": "far:0.01", "enrol_recordings": 1,
                        "validation_speakers": 4, "calibration": {"scale": 10.0, "offset": -6.0},
                        "unseen": {"speakers": 2, "far": 0.01, "frr": 0.5}}
        embedder = _Embedder({"enrol.wav": owner, "claim.wav": claim}, verification)
        store = EnrolmentStore(tmp_path / f"{accepted}.json", embedder.model_id)
        store.enroll(embedder, "ann", [Path("enrol.wav")])
        decision = verify(embedder, store, "ann", Path("claim.wav"))
        assert decision.score == score and decision.accept is accepted
        assert decision.llr == pytest.approx(10.0 * score - 6.0)
        # the device evaluation: the claim as a held-out recording, and as an impostor
        counts = score_on_device(_Identity(), enrol=([owner[:, None]], [0]), held_out=([claim[:, None]], [0]),
                                 cohort=claim[None], threshold=threshold)
        assert counts[wire.FALSE_REJECTS] == (0 if accepted else 1)
        assert counts[wire.FALSE_ACCEPTS] == (1 if accepted else 0)
        # and the server's own measurement
        far, frr = rates_at(np.array([score, score], dtype=np.float32), np.array([True, False]), threshold)
        assert (frr, far) == ((0.0, 1.0) if accepted else (1.0, 0.0))


def test_validation_voiceprints_are_disjoint_groups_of_the_training_recordings() -> None:
    enrol = ["a"] * 7 + ["b"] * 6
    test = ["a", "a", "b"]
    trials = validation_trials(enrol, test, 3, seed=0)
    assert [len(g) for g in trials.groups] == [3, 3, 3, 3]  # a's seventh recording is left out
    used = [i for g in trials.groups for i in g]
    assert len(used) == len(set(used))
    for g in trials.groups:
        assert len({enrol[i] for i in g}) == 1
    assert len(trials) == 4 * 3  # every voiceprint against every held-out recording
    owners = [enrol[trials.groups[v][0]] for v in trials.voiceprint]
    assert list(trials.target) == [o == test[t] for o, t in zip(owners, trials.test)]


def test_unseen_trials_never_score_a_recording_against_a_voiceprint_it_is_in() -> None:
    speakers = ["x"] * 7 + ["y"] * 5 + ["z"] * 2
    trials = unseen_trials(speakers, 3, seed=1)
    assert sorted(len(g) for g in trials.groups) == [2, 3, 3, 3]  # z has one voiceprint of 2
    for v, t in zip(trials.voiceprint, trials.test):
        assert t not in trials.groups[v]
    embeddings = torch.randn(len(speakers), 8, generator=torch.Generator().manual_seed(0))
    scores = trials.scores(embeddings, embeddings)
    v, t = int(trials.voiceprint[5]), int(trials.test[5])
    voiceprint = F.normalize(F.normalize(embeddings[list(trials.groups[v])], dim=1).mean(dim=0), dim=0)
    assert scores[5] == pytest.approx(float(voiceprint @ F.normalize(embeddings[t], dim=0)), abs=1e-6)


def test_trials_without_a_target_are_refused_with_the_setting_named() -> None:
    with pytest.raises(CorpusError, match="enrol-recordings=3"):
        unseen_trials(["x"] * 3 + ["y"] * 3, 3, seed=0)  # every recording is in its own voiceprint


def test_the_figures_take_the_threshold_from_validation_and_measure_it_on_the_test() -> None:
    validation, test = _gaussian_trials(seed=2), _gaussian_trials(sigma=0.7, seed=3)
    figures = operating_figures(OperatingPoint(0.01), validation, test)
    assert figures["threshold"] == threshold_at_far(*validation, 0.01)
    assert (figures["far"], figures["frr"]) == rates_at(*test, figures["threshold"])
    assert figures["val_frr"] == rates_at(*validation, figures["threshold"])[1]
    assert figures["frr_at_far_1pct"] <= figures["frr"] or figures["far"] > 0.01
    assert 0 < figures["cllr"] < 1


def _row(r: int, val_frr: float, eer: float) -> dict[str, float]:
    return {"round": r, "val_frr": val_frr, "eer": eer, "far": eer, "frr": eer}


def test_the_release_is_chosen_by_validation_alone_and_round_0_competes() -> None:
    rows = [_row(0, 0.40, 0.14), _row(1, 0.45, 0.10), _row(2, 0.38, 0.20), _row(3, 0.38, 0.05)]
    assert released_row(rows, "best")["round"] == 2  # the lowest validation FRR; a tie keeps the earlier
    shuffled = [{**r, "eer": e, "far": e, "frr": e} for r, e in zip(rows, [0.9, 0.0, 0.5, 0.3])]
    assert released_row(shuffled, "best")["round"] == 2  # the test figures play no part
    assert released_row([_row(0, 0.3, 0.2), _row(1, 0.5, 0.1)], "best")["round"] == 0
    assert released_row(rows, "last")["round"] == 3
    # with a back end at round 0 and the last round, only those compete
    rows[0]["backend_devices"] = rows[3]["backend_devices"] = 10.0
    assert released_row(rows, "best")["round"] == 3  # round 2 (0.38, first of the tie) has none
    assert "those scored with the devices' back end" in release_reason(rows[3], rows, "best", "far:0.01")
