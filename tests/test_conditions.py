"""Degraded trial conditions (issue 23): the degradations have the SNR and RT60 asked
for, measured on the result, and a condition's trials are the clean trials with only
the test side degraded, made once from the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedspeaker.config import RunSettings
from fedspeaker.data.degrade import degrade, room_bank, room_impulse_response
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.errors import ConfigError
from fedspeaker.evaluation.conditions import babble_talkers, condition_columns, condition_figures
from fedspeaker.evaluation.metrics import eer_operating_point, min_dcf
from fedspeaker.evaluation.scoring import EvaluationSet, embed, evaluate
from fedspeaker.evaluation.trials import all_pairs, trial_scores
from fedspeaker.model import build_model
from fedspeaker.recipes import Recipe, parse_conditions
from fedspeaker.reporting.run_report import progress_line


def _speech(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Speech-like: a gliding harmonic tone switched on and off (syllables and pauses)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16_000) / k for k in (1, 2, 3))
    return (0.2 * voiced * (np.sin(2 * np.pi * 3 * t) > -0.3) + 0.001 * rng.standard_normal(len(t)))


def _snr(reference: np.ndarray, mix: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((mix - reference) ** 2)))


def _schroeder_t30(rir: np.ndarray, rate: int = 16_000) -> float:
    """RT60 by Schroeder backward integration, written here independently of the code under
    test: the energy decay curve's least-squares line from -5 to -35 dB, extrapolated to -60."""
    edc = np.cumsum(rir[::-1] ** 2)[::-1]
    edc_db = 10 * np.log10(edc / edc[0])
    span = (edc_db <= -5) & (edc_db >= -35)
    slope = np.polyfit(np.flatnonzero(span) / rate, edc_db[span], 1)[0]
    return -60.0 / slope


@pytest.mark.parametrize("kind,snr", [("white", 5.0), ("pink", 0.0), ("brown", 10.0), ("babble", -3.0)])
def test_noise_is_mixed_at_the_requested_snr(kind, snr):
    speech = _speech()
    others = [_speech(1.3, seed=s) * (s + 1) for s in (1, 2, 3)]  # different lengths and levels
    mix = degrade(speech, Recipe.parse(f"{kind}{snr:g}"), np.random.default_rng(0), talkers=lambda k: others[:k])
    assert mix.shape == speech.shape and mix.dtype == np.float32
    assert _snr(speech, mix.astype(float)) == pytest.approx(snr, abs=0.01)


def test_coloured_noises_have_their_spectral_slopes():
    from fedspeaker.data.degrade import synthetic_noise

    rng = np.random.default_rng(0)
    for kind, slope in (("white", 0.0), ("pink", -1.0), ("brown", -2.0)):
        power = np.abs(np.fft.rfft(synthetic_noise(kind, 2 ** 16, rng))) ** 2
        bands = [(2 ** k, 2 ** (k + 1)) for k in range(4, 14)]  # octaves, away from DC
        centres = [np.log10(np.sqrt(a * b)) for a, b in bands]
        levels = [np.log10(power[a:b].mean()) for a, b in bands]
        assert np.polyfit(centres, levels, 1)[0] == pytest.approx(slope, abs=0.15), kind
        if kind != "white":  # shaped noise has no DC (brown noise would drift)
            assert power[0] < 1e-6 * power[1:].mean()


@pytest.mark.parametrize("rt60", [0.3, 0.6])
def test_a_room_has_the_requested_rt60(rt60):
    rir = room_impulse_response(rt60, np.random.default_rng(1))
    assert _schroeder_t30(rir) == pytest.approx(rt60, rel=0.08)


def test_room_then_babble_keeps_the_snr_against_the_reverberant_speech(tmp_path):
    speech, other = _speech(), [_speech(1.5, seed=7)]
    recipe = Recipe.parse("room0.3+babble10")
    rooms = room_bank(recipe.rt60, seed=0, cache_dir=tmp_path, size=2)
    dry = degrade(speech, Recipe.parse("room0.3"), np.random.default_rng(5), rooms=rooms)
    wet = degrade(speech, recipe, np.random.default_rng(5), rooms=rooms, talkers=lambda k: other)
    assert _snr(dry.astype(float), wet.astype(float)) == pytest.approx(10.0, abs=0.05)
    assert np.mean(dry.astype(float) ** 2) == pytest.approx(np.mean(speech ** 2), rel=1e-4)  # level kept
    assert all(_schroeder_t30(r) == pytest.approx(0.3, rel=0.08) for r in rooms)
    again = room_bank(recipe.rt60, seed=0, cache_dir=tmp_path, size=2)  # from disk, the same rooms
    assert all(np.array_equal(a, b) for a, b in zip(rooms, again))


def test_conditions_are_checked_with_a_clear_message():
    assert [r.name for r in parse_conditions("standard")] == [
        "babble5", "room0.3-0.9", "room0.3-0.9+babble10", "white5"]
    assert parse_conditions("") == () and parse_conditions("none") == ()
    for bad, words in (("bable5", "cannot read 'bable5'"), ("white5,white5", "twice"),
                       ("room0.9-0.3", "low first"), ("white90", "outside"),
                       ("room0.3+room0.5", "one room")):
        with pytest.raises(ConfigError, match=words):
            RunSettings.from_run_config({"test-conditions": bad})


@pytest.fixture
def degraded_run(synthetic_corpus, cache_dir, single_thread):
    settings = RunSettings.from_run_config({
        "data-dir": str(synthetic_corpus.root), "cache-dir": str(cache_dir), "backend": False,
        "test-conditions": "babble5,room0.3+pink10"})
    data = load_speaker_data(settings)
    return settings, data, EvaluationSet.of(data, settings)


def test_a_condition_is_the_clean_trials_with_the_test_side_degraded(degraded_run):
    settings, data, evaluation = degraded_run
    model = build_model(settings, data.n_speakers)
    clean, unseen = evaluation.verify_feats, [u.speaker for u in data.split.verification]
    trials = all_pairs(unseen)
    assert np.array_equal(trials.enrol, evaluation.trials.enrol) and np.array_equal(trials.test, evaluation.trials.test)
    assert set(evaluation.conditions) == {"babble5", "room0.3+pink10"}
    clean_emb = embed(model, clean)
    scores = evaluate(model, evaluation)
    for name, feats in evaluation.conditions.items():
        assert len(feats) == len(clean) and all(d.shape == c.shape for d, c in zip(feats, clean))
        assert not any(torch.equal(d, c) for d, c in zip(feats, clean))  # every test utterance degraded
        degraded_emb = embed(model, feats)
        # each trial: the enrolment utterance's clean embedding against the test one's degraded
        expected = np.array([float(torch.nn.functional.cosine_similarity(clean_emb[i], degraded_emb[j], dim=0))
                             for i, j in zip(trials.enrol, trials.test)])
        got = trial_scores(clean_emb, evaluation.trials, test_embeddings=degraded_emb)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert scores[f"eer_{name}"] == eer_operating_point(expected.astype(np.float32), trials.target)[0]
        assert scores[f"min_dcf_{name}"] == pytest.approx(min_dcf(got, trials.target))
    # with the clean audio on the test side, a condition is the clean figure exactly
    same = condition_figures(clean_emb, {"none": clean_emb}, evaluation.trials)
    assert same["eer_none"] == scores["eer"] and same["min_dcf_none"] == scores["min_dcf"]
    assert scores["degraded_eer_mean"] == pytest.approx(
        np.mean([scores["eer_babble5"], scores["eer_room0.3+pink10"]]))
    assert "degraded EER mean" in progress_line({"round": 0, "round_seconds": 1.0, **scores})
    assert condition_columns(settings) == ["eer_babble5", "min_dcf_babble5", "eer_room0.3+pink10",
                                           "min_dcf_room0.3+pink10", "degraded_eer_mean"]


def test_degraded_audio_is_made_once_from_the_seed(degraded_run, tmp_path):
    settings, data, evaluation = degraded_run
    again = EvaluationSet.of(data, settings)  # from the cache
    fresh = EvaluationSet.of(data, settings.replace(cache_dir=str(tmp_path / "elsewhere")))  # made anew
    other_seed = EvaluationSet.of(data, settings.replace(cache_dir=str(tmp_path / "seed1"), seed=1))
    for name, feats in evaluation.conditions.items():
        assert all(torch.equal(a, b) for a, b in zip(feats, again.conditions[name]))
        assert all(torch.equal(a, b) for a, b in zip(feats, fresh.conditions[name]))
    assert not all(torch.equal(a, b) for a, b in zip(evaluation.conditions["babble5"],
                                                     other_seed.conditions["babble5"]))


def test_babble_is_made_of_speakers_outside_the_trials(degraded_run):
    _, data, _ = degraded_run
    train = [(u.path, u.speaker) for u in data.split.train]
    unseen = {u.speaker for u in data.split.verification}
    talkers = babble_talkers(train, unseen)
    assert talkers and not {s for _, s in talkers} & unseen
    assert babble_talkers(train, {train[0][1]}) == [t for t in train if t[1] != train[0][1]]
