"""Verification trials and scores: all pairs, a seeded sample, a VoxCeleb-format list,
cosine and s-norm scores, minDCF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedspeaker.errors import ConfigError
from fedspeaker.evaluation import trials as trials_module
from fedspeaker.evaluation.metrics import eer_operating_point, min_dcf
from fedspeaker.evaluation.trials import (
    all_pairs,
    choose_trials,
    read_trial_list,
    sampled_pairs,
    trial_scores,
)

SPEAKERS = [f"s{i}" for i in range(6) for _ in range(10)]  # 60 utterances, 1,770 pairs


def test_all_pairs_are_every_pair_once():
    trials = all_pairs(SPEAKERS)
    assert len(trials) == math.comb(60, 2) and int(trials.target.sum()) == 6 * math.comb(10, 2)
    assert all(i < j for i, j in zip(trials.enrol, trials.test))


def test_a_sample_is_seeded_without_repeats_and_half_same_speaker():
    a, b = sampled_pairs(SPEAKERS, 400, seed=0), sampled_pairs(SPEAKERS, 400, seed=0)
    assert np.array_equal(a.enrol, b.enrol) and np.array_equal(a.test, b.test)
    assert not np.array_equal(a.enrol, sampled_pairs(SPEAKERS, 400, seed=1).enrol)
    pairs = set(zip(a.enrol.tolist(), a.test.tolist()))
    assert len(pairs) == len(a) == 400
    assert int(a.target.sum()) == 200
    assert all((SPEAKERS[i] == SPEAKERS[j]) == t for i, j, t in zip(a.enrol, a.test, a.target))
    assert len(choose_trials(SPEAKERS, 0, seed=0)) == 1770  # 0: all pairs
    assert len(choose_trials(SPEAKERS, 5000, seed=0)) == 1770  # fewer pairs than asked: all


def test_a_trial_list_is_read_as_written(tmp_path):
    for name in ("a/1.wav", "a/2.wav", "b/1.wav"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listed = tmp_path / "trials.txt"
    listed.write_text("1 a/1.wav a/2.wav\n0 a/1.wav b/1.wav\n# a comment\n\n0 a/2.wav b/1.wav\n")
    files, trials = read_trial_list(listed, tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/1.wav", "a/2.wav", "b/1.wav"]
    assert trials.enrol.tolist() == [0, 0, 1] and trials.test.tolist() == [1, 2, 2]
    assert trials.target.tolist() == [True, False, False]
    listed.write_text("1 a/1.wav a/2.wav\n2 a/1.wav b/1.wav\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_trial_list(listed, tmp_path)
    listed.write_text("1 a/1.wav missing.wav\n")
    with pytest.raises(ConfigError, match="missing.wav not found"):
        read_trial_list(listed, tmp_path)


def test_scores_are_cosines_whichever_way_they_are_computed(monkeypatch):
    embeddings = torch.randn(60, 8)
    trials = all_pairs(SPEAKERS)
    matrix = trial_scores(embeddings, trials)
    monkeypatch.setattr(trials_module, "MATRIX_UP_TO", 0)
    monkeypatch.setattr(trials_module, "CHUNK", 100)
    chunked = trial_scores(embeddings, trials)
    expected = torch.nn.functional.cosine_similarity(embeddings[trials.enrol], embeddings[trials.test])
    assert np.allclose(matrix, expected.numpy(), atol=1e-6) and np.allclose(chunked, matrix, atol=1e-6)


def test_s_norm_standardises_each_side_against_its_closest_cohort():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cohort = torch.tensor([[1.0, 0.1], [0.9, 0.3], [0.1, 1.0], [0.2, 0.8]])
    trials = all_pairs(["a", "b"])
    normed = trial_scores(embeddings, trials, cohort=cohort, top=2)
    e = torch.nn.functional.normalize(embeddings, dim=1)
    c = torch.nn.functional.normalize(cohort, dim=1)
    against = e @ c.T
    closest = against.topk(2, dim=1).values
    raw = float(e[0] @ e[1])
    mean, std = closest.mean(dim=1), closest.std(dim=1)
    expected = 0.5 * ((raw - mean[0]) / std[0] + (raw - mean[1]) / std[1])
    assert normed[0] == pytest.approx(float(expected), rel=1e-5)


def test_min_dcf_is_the_nist_normalised_cost():
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    same = np.array([True, True, False, True, False, False])
    # thresholds between scores: (miss, fa) = (1,0) (2/3,0) (1/3,0) (1/3,1/3) (0,1/3) (0,2/3) (0,1)
    costs = [0.01 * miss + 0.99 * fa for miss, fa in
             [(1, 0), (2 / 3, 0), (1 / 3, 0), (1 / 3, 1 / 3), (0, 1 / 3), (0, 2 / 3), (0, 1)]]
    assert min_dcf(scores, same) == pytest.approx(min(costs) / 0.01)
    assert min_dcf(np.array([1.0, 0.0]), np.array([True, False])) == 0.0
    assert eer_operating_point(scores, same)[0] == pytest.approx(1 / 3)
